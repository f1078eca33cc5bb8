"""Importing final diagnoses (histology after surgery, follow-up) from a CSV or JSON rows.

Every line is checked before anything is written: an unknown study, an unknown analysis, a
diagnosis the analysis does not know or a bad date is reported with its line number, and
then nothing is imported. A good file is imported in one transaction with one audit row.

CSV columns (header line first, any order): ``study_instance_uid`` or ``accession_number``
(one of the two per line), ``analysis``, ``diagnosis``, ``date`` (YYYY-MM-DD), ``source``.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import select

from mibi_node import audit
from mibi_node.analyses.registry import available_analyses
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import Study, Truth
from mibi_node.validation.headers import study_headers

__all__ = ["COLUMNS", "TruthImportError", "import_truth", "read_truth_csv"]

logger = logging.getLogger(__name__)

#: The columns a truth file has; of the first two, each line fills at least one.
COLUMNS = ("study_instance_uid", "accession_number", "analysis", "diagnosis", "date", "source")
_REQUIRED = ("analysis", "diagnosis", "date")


class TruthImportError(MibiNodeError):
    """A truth file with bad lines; nothing of it was imported.

    Attributes
    ----------
    problems
        One sentence per problem, each starting ``line N:``.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"nothing imported: {count} problem{'s' if count != 1 else ''}\n"
            + "\n".join(self.problems)
        )


@dataclass(frozen=True)
class _Line:
    number: int
    study_id: int
    analysis: str
    diagnosis: str
    diagnosed_on: date
    source: str


def read_truth_csv(source: Path | str) -> list[dict[str, str]]:
    """The rows of a truth CSV (a file, or its text), with the columns named as above.

    Raises
    ------
    TruthImportError
        The file cannot be read, or its header lacks a required column.
    """
    if isinstance(source, Path):
        try:
            text = source.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise TruthImportError([f"line 0: cannot read {source}: {exc}"]) from None
    else:
        text = source.lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [name.strip().lower() for name in reader.fieldnames or []]
    except csv.Error as exc:
        raise TruthImportError([f"line 1: not CSV: {exc}"]) from None
    missing = [c for c in _REQUIRED if c not in header]
    if "study_instance_uid" not in header and "accession_number" not in header:
        missing.insert(0, "study_instance_uid or accession_number")
    if missing:
        raise TruthImportError([f"line 1: the header lacks {', '.join(missing)}"])
    reader.fieldnames = header
    try:
        return [
            {key: (value or "").strip() for key, value in row.items() if isinstance(key, str)}
            for row in reader
        ]
    except csv.Error as exc:  # e.g. a field over the csv module's limit
        raise TruthImportError([f"line {reader.line_num + 1}: not CSV: {exc}"]) from None


def import_truth(
    database: Database,
    files: FileStore,
    rows: Path | str | Sequence[Mapping[str, Any]],
    *,
    imported_by: str,
) -> int:
    """Check every row, then import them all (or none); returns how many were imported.

    Parameters
    ----------
    rows
        A CSV file, CSV text, or rows as mappings with the CSV's column names (REST's JSON).
        Line numbers count the CSV's header as line 1 (JSON rows: row 1 is line 2).
    imported_by
        Who imported them (``cli:<login>``, ``web``), kept on each row and in the audit.

    Raises
    ------
    TruthImportError
        Any row is bad; its ``problems`` name each by line, and nothing was imported.
    """
    if isinstance(rows, Path | str):
        rows = read_truth_csv(rows)
    if not rows:
        raise TruthImportError(["line 2: the file has no rows"])
    lines, problems = _check(database, files, rows)
    if problems:
        raise TruthImportError(problems)
    with database.write_lock(), database.session() as session, session.begin():
        for line in lines:
            session.add(
                Truth(
                    study_id=line.study_id,
                    analysis=line.analysis,
                    diagnosis=line.diagnosis,
                    diagnosed_on=line.diagnosed_on,
                    source=line.source,
                    imported_by=imported_by,
                )
            )
        analyses = sorted({line.analysis for line in lines})
        audit.add(
            session,
            "truth",
            "imported",
            actor=imported_by,
            message=f"{len(lines)} final diagnos{'is' if len(lines) == 1 else 'es'} imported",
            detail={"rows": len(lines), "studies": len({line.study_id for line in lines}),
                    "analyses": analyses},
        )  # fmt: skip
    return len(lines)


def _check(
    database: Database, files: FileStore, rows: Sequence[Mapping[str, Any]]
) -> tuple[list[_Line], list[str]]:
    analyses = available_analyses()
    with database.session() as session:
        uids = dict(session.execute(select(Study.study_instance_uid, Study.id)).all())
    accessions: dict[str, list[int]] = {}
    if any(str(row.get("accession_number") or "").strip() for row in rows):
        for known, header in study_headers(database, files, uids.values()).items():
            if header.accession_number:
                accessions.setdefault(header.accession_number, []).append(known)
    lines: list[_Line] = []
    problems: list[str] = []
    for number, row in enumerate(rows, start=2):
        found: list[str] = []
        value = {key: str(row.get(key) or "").strip() for key in COLUMNS}
        study_id: int | None = None
        if value["study_instance_uid"]:
            study_id = uids.get(value["study_instance_uid"])
            if study_id is None:
                found.append(f"no study with Study Instance UID {value['study_instance_uid']}")
        elif value["accession_number"]:
            matches = accessions.get(value["accession_number"], [])
            if len(matches) == 1:
                study_id = matches[0]
            elif matches:
                found.append(
                    f"accession number {value['accession_number']} names "
                    f"{len(matches)} studies: give the Study Instance UID"
                )
            else:
                found.append(f"no study with accession number {value['accession_number']}")
        else:
            found.append("neither study_instance_uid nor accession_number is given")
        analysis = analyses.get(value["analysis"])
        if analysis is None:
            found.append(f"unknown analysis {value['analysis']!r} (known: {', '.join(analyses)})")
        diagnosis = value["diagnosis"]
        if not diagnosis:
            found.append("the diagnosis is empty")
        elif len(diagnosis) > 128:
            found.append("the diagnosis is longer than 128 characters")
        elif analysis is not None and analysis.diagnoses and diagnosis not in analysis.diagnoses:
            found.append(
                f"{diagnosis!r} is not a {analysis.name} diagnosis "
                f"(one of {', '.join(analysis.diagnoses)})"
            )
        try:
            diagnosed_on = date.fromisoformat(value["date"])
        except ValueError:
            found.append(f"date {value['date']!r} is not YYYY-MM-DD")
            diagnosed_on = date.min
        if len(value["source"]) > 128:
            found.append("the source is longer than 128 characters")
        if found:
            problems.extend(f"line {number}: {problem}" for problem in found)
        elif study_id is not None:
            lines.append(
                _Line(number, study_id, value["analysis"], diagnosis, diagnosed_on, value["source"])
            )
    return lines, problems
