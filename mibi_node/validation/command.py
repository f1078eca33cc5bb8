"""The validation commands: ``verdict``, ``truth import`` and ``performance``.

Each turns bad input into one sentence on stderr and exit status 2; the figures go to
stdout as a table or, with ``--json``, as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["performance_command", "truth_app", "verdict_command"]

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration.")]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder of the database and stored files (default ./var)."),
]

truth_app = typer.Typer(
    help="Final diagnoses (histology, follow-up) to measure the models against.",
    no_args_is_help=True,
)


def _cli() -> Any:
    from mibi_node import cli

    return cli


def verdict_command(
    job: Annotated[int, typer.Argument(help="The job id (`mibi-node status`, the study page).")],
    finding: Annotated[str, typer.Argument(help="The finding's key, e.g. diagnosis or L4-L5.")],
    decision: Annotated[str, typer.Argument(help="accepted, rejected or corrected.")],
    reader: Annotated[str, typer.Option("--reader", help="Who judged the finding.")],
    value: Annotated[
        str | None, typer.Option("--value", help="The right value (corrected only).")
    ] = None,
    comment: Annotated[str | None, typer.Option("--comment", help="Free text.")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Record a radiologist's verdict on one AI finding of a job's result.

    With ``validation.send_assessment`` on, the job's assessment SR then goes to the job's
    destinations (exit status 1 when it cannot be made: the verdict stays recorded).
    """
    from mibi_node.errors import MibiNodeError
    from mibi_node.validation.verdicts import AssessmentError, queue_assessment, record_verdict

    cli = _cli()
    resolved = cli._load(config, node={"data_dir": data_dir})
    database = cli._open_existing(resolved)
    try:
        try:
            recorded = record_verdict(
                database,
                job,
                finding,
                decision,
                reader=reader,
                value=value,
                comment=comment,
                actor=cli._operator(),
            )
        except MibiNodeError as exc:
            raise cli._fail(str(exc), 2) from None
        cli._out.print(
            f"verdict #{recorded.id}: job #{recorded.job} {recorded.finding} {recorded.decision}"
            + (f" -> {recorded.value}" if recorded.value else ""),
            highlight=False,
        )
        if resolved.validation.send_assessment:
            try:
                actor = f"{recorded.reader} ({cli._operator()})"
                queued = queue_assessment(resolved, database, recorded.job, actor=actor)
            except AssessmentError as exc:
                raise cli._fail(
                    f"the verdict is recorded, but no assessment SR is sent: {exc}"
                ) from None
            cli._out.print(
                f"assessment SR {queued.instance_number} of job #{queued.job} "
                f"({queued.findings} finding(s)) queued for {len(queued.deliveries)} "
                "destination(s)",
                highlight=False,
            )
    finally:
        database.dispose()


@truth_app.command("import")
def truth_import(
    file: Annotated[Path, typer.Argument(help="CSV: study_instance_uid or accession_number, "
                                             "analysis, diagnosis, date, source.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:  # fmt: skip
    """Import final diagnoses; every line is checked first and a bad one imports nothing."""
    from mibi_node.storage.filestore import FileStore
    from mibi_node.validation.truth import TruthImportError, import_truth

    cli = _cli()
    resolved = cli._load(config, node={"data_dir": data_dir})
    database = cli._open_existing(resolved)
    try:
        count = import_truth(
            database, FileStore(resolved.store_dir), file, imported_by=cli._operator()
        )
    except TruthImportError as exc:
        raise cli._fail(str(exc), 2) from None
    finally:
        database.dispose()
    cli._out.print(f"imported {count} final diagnos{'is' if count == 1 else 'es'}")


def performance_command(
    analysis: Annotated[str | None, typer.Option("--analysis", help="Only this analysis.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples for the 95 % intervals.")
    ] = 500,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Show how the models do on this node's assessed studies (docs/validation.md)."""
    from rich.table import Table

    from mibi_node.analyses.registry import available_analyses
    from mibi_node.storage.filestore import FileStore
    from mibi_node.validation.performance import performance

    cli = _cli()
    if analysis is not None and analysis not in available_analyses():
        known = ", ".join(available_analyses())
        raise cli._fail(f"unknown analysis {analysis!r} (known: {known})", 2)
    if resamples < 0:
        raise cli._fail('"--resamples" should be 0 or more', 2)
    resolved = cli._load(config, node={"data_dir": data_dir})
    database = cli._open_existing(resolved)
    try:
        groups = performance(database, FileStore(resolved.store_dir), analysis, resamples)
    finally:
        database.dispose()
    if as_json:
        sys.stdout.write(json.dumps([g.to_dict() for g in groups], indent=2) + "\n")
        return
    table = Table(title="local performance")
    for column in (
        "analysis",
        "bundle",
        "station",
        "AE",
        "cases",
        "truth",
        "verdicts",
        "accuracy",
        "macro AUC",
        "macro F1",
        "kappa",
        "ECE",
        "agreement",
    ):
        table.add_column(column)  # fmt: skip
    for group in groups:
        c = group.classification
        share = group.agreement.get("share")
        table.add_row(
            group.analysis,
            group.bundle_version,
            group.station,
            group.calling_ae_title,
            str(group.cases),
            str(group.with_truth),
            str(group.with_verdict),
            *(
                _figure(c, name) if c is not None else ""
                for name in ("accuracy", "macro_auc", "macro_f1", "kappa", "ece")
            ),
            "" if share is None else f"{float(share):.0%} of {group.agreement['compared']}",
        )
    cli._out.print(table)


def _figure(classification: Any, name: str) -> str:
    value = getattr(classification, name)
    if value is None:
        return "n/a"
    interval = classification.intervals.get(name)
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
