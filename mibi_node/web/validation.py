"""Local validation on the status page (``docs/validation.md``): the findings of a study's
finished analyses with the verdict that stands on each, the verdict and truth forms, and the
performance page with its reliability plot.

The forms act through :func:`mibi_node.validation.verdicts.record_verdict` and
:func:`mibi_node.validation.truth.import_truth`, exactly as the CLI and the REST API do (actor
``web``), so their checks and audit rows are the same. scikit-learn and matplotlib are
imported when a page needs them, not with the status page.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs, quote, unquote

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import Job, JobState, Verdict
from mibi_node.web.reader import Reader

if TYPE_CHECKING:
    from mibi_node.validation.performance import Classification, GroupPerformance
    from mibi_node.validation.verdicts import RecordedVerdict

__all__ = [
    "FIGURES",
    "READER_COOKIE",
    "AnalysisPerformance",
    "FindingRow",
    "JobFindings",
    "PostedForm",
    "StandingVerdict",
    "analysis_names",
    "parse_form",
    "performance_sections",
    "read_form",
    "record_from_form",
    "reliability_png",
    "remember_reader",
    "remembered_reader",
    "study_findings",
    "truth_form",
    "truth_from_form",
    "verdict_form",
]

logger = logging.getLogger(__name__)

#: The cookie that keeps the reader name last used in a verdict form (not a secret).
READER_COOKIE = "mibi_node_reader"
_READER_COOKIE_DAYS = 90
_MAX_VERDICT_FORM_BYTES = 16 * 1024
_MAX_TRUTH_FORM_BYTES = 4 * 1024 * 1024
#: The figures of a classifier, in the order the performance page lists them.
FIGURES = (
    ("accuracy", "Accuracy"),
    ("macro_auc", "Macro AUC (one-vs-rest)"),
    ("macro_f1", "Macro F1"),
    ("kappa", "Cohen's kappa"),
    ("ece", "ECE (10 bins)"),
)


# -- findings and verdicts -------------------------------------------------------------------


@dataclass(frozen=True)
class StandingVerdict:
    """The verdict that stands on one finding."""

    decision: str
    value: str | None
    reader: str
    comment: str | None
    at: datetime
    #: The study version it was given on, where that is an earlier version (carried over
    #: because the model said the same there); ``None`` when given on this job.
    from_version: int | None


@dataclass(frozen=True)
class FindingRow:
    """One AI finding of a job, with its standing verdict."""

    key: str
    label: str
    value: str
    #: The values a correction may take, the model's own left out; empty: free text.
    choices: tuple[str, ...]
    probability: float | None
    kind: str
    verdict: StandingVerdict | None


@dataclass(frozen=True)
class JobFindings:
    """The findings of one finished (non-shadow) job."""

    job_id: int
    analysis: str
    title: str
    version: int
    #: The newest finished version of its analysis (older ones are shown folded).
    latest: bool
    findings: list[FindingRow] = field(default_factory=list)
    #: Why the findings cannot be listed (the analysis is not installed), else ``None``.
    problem: str | None = None


def study_findings(reader: Reader, study_id: int) -> list[JobFindings]:
    """Each finished, non-shadow job of a study (newest version first), with its findings
    and the verdict that stands on each (:func:`~mibi_node.validation.verdicts.standing_verdicts`).
    """
    from mibi_node.analyses.registry import available_analyses
    from mibi_node.validation.verdicts import standing_verdicts

    analyses = available_analyses()
    with reader.session() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.study_id == study_id, Job.state == JobState.DONE, Job.shadow.is_(False))
            .order_by(Job.version.desc(), Job.analysis)
        ).all()
        try:
            standing = standing_verdicts(session, [j for j in jobs if j.analysis in analyses])
        except Exception:  # noqa: BLE001 - the page shows the findings without verdicts
            logger.exception("cannot read the verdicts of study #%d", study_id)
            standing = {}
        versions = {job.id: job.version for job in jobs}
        shown: list[JobFindings] = []
        seen: set[str] = set()
        for job in jobs:
            latest = job.analysis not in seen
            seen.add(job.analysis)
            unit = analyses.get(job.analysis)
            title = unit.title if unit is not None else job.analysis
            rows, problem = _finding_rows(job, standing.get(job.id, {}), versions, unit is None)
            shown.append(
                JobFindings(job.id, job.analysis, title, job.version, latest, rows, problem)
            )
        return shown


def _finding_rows(
    job: Job, given: Mapping[str, Verdict], versions: Mapping[int, int], missing: bool
) -> tuple[list[FindingRow], str | None]:
    """A job's findings with their standing verdicts, or why they cannot be listed."""
    from mibi_node.validation.verdicts import job_findings

    if missing:
        return [], f"the analysis {job.analysis!r} is not installed on this node"
    try:
        findings = job_findings(job)
    except Exception as exc:  # noqa: BLE001 - a result its analysis cannot read: say so
        logger.exception("analysis %s cannot list job #%d's findings", job.analysis, job.id)
        return [], f"its findings cannot be read ({type(exc).__name__})"
    return [
        FindingRow(
            key=finding.key,
            label=finding.label,
            value=finding.value,
            choices=tuple(c for c in finding.choices if c != finding.value),
            probability=finding.probability,
            kind=finding.type,
            verdict=_standing(given.get(finding.key), job, versions),
        )
        for finding in findings
    ], None


def _standing(
    verdict: Verdict | None, job: Job, versions: Mapping[int, int]
) -> StandingVerdict | None:
    if verdict is None:
        return None
    carried = verdict.job_id != job.id
    return StandingVerdict(
        decision=verdict.decision.value,
        value=verdict.value,
        reader=verdict.reader,
        comment=verdict.comment,
        at=verdict.created_at,
        from_version=versions.get(verdict.job_id) if carried else None,
    )


def record_from_form(
    database: Database, reader: Reader, study_id: int, form: Mapping[str, str]
) -> RecordedVerdict:
    """Record the verdict a study page's form sent (actor ``web``).

    The ``value`` field counts only for a correction (the form sends its select with every
    button).

    Raises
    ------
    VerdictError
        The job is not one of the study's, or :func:`record_verdict` refuses the verdict.
    """
    from mibi_node.validation.verdicts import VerdictError, record_verdict

    job_text = form.get("job", "").strip()
    if not job_text.isdigit():
        raise VerdictError('The form should name the job ("job" field).')
    job_id = int(job_text)
    with reader.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.study_id != study_id:
            raise VerdictError(f"job #{job_id} is not an analysis of study #{study_id}")
    decision = form.get("decision", "")
    corrected = decision.strip().lower() == "corrected"
    return record_verdict(
        database,
        job_id,
        form.get("finding", ""),
        decision,
        reader=form.get("reader", ""),
        value=form.get("value") if corrected else None,
        comment=form.get("comment", "").strip() or None,
        actor="web",
    )


def remember_reader(request: Request, response: Response, name: str) -> None:
    """Keep ``name`` in a cookie, so the next verdict form is prefilled with it."""
    response.set_cookie(
        READER_COOKIE,
        quote(name),
        max_age=_READER_COOKIE_DAYS * 86400,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def remembered_reader(request: Request) -> str:
    """The reader name the last verdict form of this browser used ("" if none)."""
    return unquote(request.cookies.get(READER_COOKIE, ""))[:128]


# -- posted forms ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PostedForm:
    """A form a browser posted: its text fields and uploaded files (last one per name)."""

    fields: dict[str, str] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    #: Why the form could not be read (too large), else ``None``.
    problem: str | None = None

    def get(self, name: str, default: str = "") -> str:
        """A text field's value."""
        return self.fields.get(name, default)


async def read_form(request: Request, limit: int) -> PostedForm:
    """Read a posted form of at most ``limit`` bytes (urlencoded or multipart)."""
    too_large = PostedForm(problem=f"the form is larger than {limit // 1024} KiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            return too_large
    return parse_form(bytes(body), request.headers.get("content-type", ""))


async def verdict_form(request: Request) -> PostedForm:
    """The verdict form a study page posted (a dependency of its route)."""
    return await read_form(request, _MAX_VERDICT_FORM_BYTES)


async def truth_form(request: Request) -> PostedForm:
    """The truth upload the performance page posted (a dependency of its route)."""
    return await read_form(request, _MAX_TRUTH_FORM_BYTES)


def parse_form(body: bytes, content_type: str) -> PostedForm:
    """The fields of a form body, ``application/x-www-form-urlencoded`` or
    ``multipart/form-data`` (read with the standard library's MIME parser)."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        text = body.decode("utf-8", "replace")
        pairs = parse_qs(text, keep_blank_values=True)
        return PostedForm(fields={name: values[-1] for name, values in pairs.items()})
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = cast(EmailMessage, BytesParser(policy=policy.HTTP).parsebytes(head + body))
    if not message.is_multipart():
        return PostedForm(problem="the form could not be read (a multipart body without parts)")
    fields: dict[str, str] = {}
    uploads: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if part.get_filename() is not None:
            uploads[name] = data
        else:
            fields[name] = data.decode("utf-8", "replace")
    return PostedForm(fields=fields, uploads=uploads)


def truth_from_form(database: Database, files: FileStore, form: PostedForm) -> int:
    """Import the final diagnoses the performance page's form sent: the uploaded CSV file,
    else the pasted text. Returns how many were imported.

    Raises
    ------
    TruthImportError
        A bad line (each named); nothing was imported.
    MibiNodeError
        No CSV was given, or it is not UTF-8 text.
    """
    from mibi_node.validation.truth import import_truth

    if form.problem is not None:
        raise MibiNodeError(f"Nothing imported: {form.problem}.")
    upload = form.uploads.get("file", b"")
    if upload.strip():
        try:
            text = upload.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise MibiNodeError("Nothing imported: the file is not UTF-8 text.") from None
    else:
        text = form.get("csv")
    if not text.strip():
        raise MibiNodeError("Nothing imported: choose a CSV file or paste its lines.")
    try:
        return import_truth(database, files, text, imported_by="web")
    except csv.Error as exc:
        raise MibiNodeError(f"Nothing imported: the CSV cannot be read ({exc}).") from None


# -- performance -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalysisPerformance:
    """The performance page's section of one analysis."""

    analysis: str
    title: str
    #: Over all its cases (bundle version, station and AE ``*``).
    overall: GroupPerformance
    #: Per (bundle version, station, sending AE).
    groups: list[GroupPerformance]


def analysis_names() -> dict[str, str]:
    """Every registered analysis' name and title."""
    from mibi_node.analyses.registry import available_analyses

    return {name: unit.title for name, unit in available_analyses().items()}


def performance_sections(groups: Sequence[GroupPerformance]) -> list[AnalysisPerformance]:
    """:func:`~mibi_node.validation.performance.performance`'s groups, one section per
    analysis."""
    from mibi_node.analyses.registry import available_analyses
    from mibi_node.validation.performance import ALL

    analyses = available_analyses()
    sections: list[AnalysisPerformance] = []
    for group in groups:
        if (group.bundle_version, group.station, group.calling_ae_title) == (ALL, ALL, ALL):
            unit = analyses.get(group.analysis)
            title = unit.title if unit is not None else group.analysis
            sections.append(AnalysisPerformance(group.analysis, title, group, []))
        elif sections and sections[-1].analysis == group.analysis:
            sections[-1].groups.append(group)
    return sections


def reliability_png(title: str, classification: Classification | None) -> bytes:
    """The reliability plot of a classifier as PNG: the diagonal (perfect calibration) and
    each non-empty confidence bin's mean confidence against its accuracy, with its count."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 6.0), dpi=100)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="#718096", label="perfect calibration")
    if classification is None or not classification.reliability:
        axes.text(0.5, 0.5, "no assessed studies yet", ha="center", va="center", fontsize=13)
        axes.set_title(title)
    else:
        bins = classification.reliability
        axes.bar(
            [b["low"] for b in bins],
            [b["accuracy"] for b in bins],
            width=[b["high"] - b["low"] for b in bins],
            align="edge",
            color="#bee3f8",
            edgecolor="#3182ce",
            label="accuracy of the bin",
        )
        axes.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            marker="o",
            color="#dd6b20",
            label="mean confidence vs accuracy",
        )
        for b in bins:
            axes.annotate(
                f"n={int(b['count'])}",
                (b["confidence"], b["accuracy"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
        axes.set_title(f"{title}: ECE {classification.ece:.3f}, {classification.n} studies")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.08)
    axes.set_xlabel("confidence (probability of the predicted class)")
    axes.set_ylabel("accuracy (share predicted right)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
