"""Recording a radiologist's verdict on one AI finding: accepted, rejected or corrected.

The finding and the corrected value are checked against what the analysis says of the
stored result (:meth:`~mibi_node.analyses.base.Analysis.findings`), so a verdict can only
name a finding the result has and a correction only a value the finding may take. The row
and its audit event commit together.

:func:`queue_assessment` sends the verdicts back to PACS (``validation.send_assessment``):
one assessment SR per job holding every verdict that stands on its findings, each one
superseding the job's previous one, queued for the job's destinations like a result.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from mibi_node import audit
from mibi_node.analyses.base import Finding
from mibi_node.analyses.registry import get_analysis
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Verdict,
    VerdictDecision,
    utcnow,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from mibi_node.config import Config

__all__ = [
    "AssessmentError",
    "QueuedAssessment",
    "RecordedVerdict",
    "VerdictError",
    "job_findings",
    "queue_assessment",
    "record_verdict",
    "standing_verdicts",
]

logger = logging.getLogger(__name__)

_MAX_VALUE = 128
_MAX_READER = 128


class VerdictError(MibiNodeError):
    """A verdict that cannot be recorded; the message names the argument and the problem."""


@dataclass(frozen=True)
class RecordedVerdict:
    """What was recorded (the REST API's answer)."""

    id: int
    job: int
    analysis: str
    finding: str
    decision: str
    value: str | None
    reader: str


def job_findings(job: Job) -> tuple[Finding, ...]:
    """The findings of a finished job's stored result.

    Raises
    ------
    VerdictError
        The job has no result (not DONE).
    """
    if job.state is not JobState.DONE or not job.result:
        raise VerdictError(f"job #{job.id} has no result to judge (it is {job.state.value})")
    return get_analysis(job.analysis).findings(dict(job.result))


def standing_verdicts(session: Session, jobs: Iterable[Job]) -> dict[int, dict[str, Verdict]]:
    """The verdicts that stand on each job's findings, by job id and finding key.

    A finding's latest verdict on the job itself stands. Where the job has none (a later
    version of the study, opened by a late instance), the latest verdict on the same finding
    of an earlier version of the same analysis stands, provided the model said the same of it
    there: the reader judged that very value. A finding whose value changed starts without
    a verdict. Shadow jobs neither give nor take carried verdicts.
    """
    wanted = [job for job in jobs if job.result]
    if not wanted:
        return {}
    studies = {job.study_id for job in wanted}
    analyses = {job.analysis for job in wanted}
    history: dict[tuple[int, str], list[Job]] = defaultdict(list)
    for earlier in session.scalars(
        select(Job)
        .where(
            Job.study_id.in_(studies),
            Job.analysis.in_(analyses),
            Job.shadow.is_(False),
            Job.state == JobState.DONE,
        )
        .order_by(Job.version)
    ):
        history[(earlier.study_id, earlier.analysis)].append(earlier)
    related = {job.id: job for job in wanted} | {
        job.id: job for versions in history.values() for job in versions
    }
    given: dict[int, dict[str, Verdict]] = defaultdict(dict)
    for row in session.scalars(
        select(Verdict).where(Verdict.job_id.in_(related)).order_by(Verdict.id)
    ):
        given[row.job_id][row.finding] = row
    standing: dict[int, dict[str, Verdict]] = {}
    for job in wanted:
        own = dict(given.get(job.id, {}))
        if not job.shadow:
            values = {f.key: f.value for f in _findings(job)}
            for earlier in reversed(history.get((job.study_id, job.analysis), [])):
                if earlier.version >= job.version or not given.get(earlier.id):
                    continue
                before = {f.key: f.value for f in _findings(earlier)}
                for key, row in given[earlier.id].items():
                    if key in values and key not in own and before.get(key) == values[key]:
                        own[key] = row
        standing[job.id] = own
    return standing


def _findings(job: Job) -> tuple[Finding, ...]:
    try:
        return job_findings(job)
    except (VerdictError, KeyError):
        return ()


def record_verdict(
    database: Database,
    job_id: int,
    finding: str,
    decision: str,
    *,
    reader: str,
    value: str | None = None,
    comment: str | None = None,
    actor: str = "",
) -> RecordedVerdict:
    """Record a verdict on finding ``finding`` of job ``job_id``'s result, with its audit row.

    Parameters
    ----------
    finding
        The finding's key (:attr:`Finding.key`), e.g. ``diagnosis`` or ``L4-L5``.
    decision
        ``accepted``, ``rejected`` or ``corrected``.
    reader
        Who judged it (the radiologist's name or login); kept on the row and in the audit.
    value
        The right value, for ``corrected`` only: one of the finding's choices where it has
        any, and not the value the model gave.
    comment
        Free text for people.
    actor
        Through what it came (``cli:<login>``, ``web``); the audit's actor is ``reader``
        followed by it.

    Raises
    ------
    VerdictError
        No such job or finding, a bad decision, a missing, needless or unknown value, no
        reader.
    """
    reader = (reader or "").strip()
    if not reader:
        raise VerdictError('Argument "reader" should name who judged the finding.')
    if len(reader) > _MAX_READER:
        raise VerdictError(f'Argument "reader" should be at most {_MAX_READER} characters.')
    try:
        verdict = VerdictDecision(str(decision).strip().lower())
    except ValueError:
        choices = ", ".join(d.value for d in VerdictDecision)
        raise VerdictError(
            f'Argument "decision" should be one of {choices}, not {decision!r}.'
        ) from None
    value = value.strip() if isinstance(value, str) else None
    with database.write_lock(), database.session() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise VerdictError(f"there is no job #{job_id}")
        findings = {f.key: f for f in job_findings(job)}
        judged = findings.get(finding)
        if judged is None:
            known = ", ".join(findings) or "none"
            raise VerdictError(
                f"job #{job_id} ({job.analysis}) has no finding {finding!r}; its findings: {known}"
            )
        _check_value(verdict, judged, value)
        row = Verdict(
            job_id=job.id,
            finding=judged.key,
            decision=verdict,
            value=value if verdict is VerdictDecision.CORRECTED else None,
            reader=reader,
            comment=(comment or None),
        )
        session.add(row)
        session.flush()
        audit.add(
            session,
            "verdict",
            verdict.value,
            actor=f"{reader} ({actor})" if actor else reader,
            study_id=job.study_id,
            message=f"verdict on {judged.label}: {verdict.value}",
            detail={
                "job": job.id,
                "analysis": job.analysis,
                "finding": judged.key,
                "kind": judged.type,
                "ai": judged.value,
                **({"value": row.value} if row.value else {}),
            },
        )
        return RecordedVerdict(
            id=row.id,
            job=job.id,
            analysis=job.analysis,
            finding=judged.key,
            decision=verdict.value,
            value=row.value,
            reader=reader,
        )


def _check_value(decision: VerdictDecision, finding: Finding, value: str | None) -> None:
    if decision is not VerdictDecision.CORRECTED:
        if value:
            raise VerdictError(
                f'Argument "value" is only for a corrected finding, not an {decision.value} one.'
            )
        return
    if not value:
        hint = f" (one of {', '.join(finding.choices)})" if finding.choices else ""
        raise VerdictError(f'Argument "value" should give the right value{hint}.')
    if len(value) > _MAX_VALUE:
        raise VerdictError(f'Argument "value" should be at most {_MAX_VALUE} characters.')
    if finding.choices and value not in finding.choices:
        raise VerdictError(
            f'Argument "value" should be one of {", ".join(finding.choices)} for '
            f"{finding.label}, not {value!r}."
        )
    if value == finding.value:
        raise VerdictError(
            f'Argument "value" is what the model said ({value!r}): that is "accepted".'
        )


# -- the assessment SR back to PACS ---------------------------------------------------------


class AssessmentError(MibiNodeError):
    """The assessment SR of a job cannot be made; the message says why."""


@dataclass(frozen=True)
class QueuedAssessment:
    """What :func:`queue_assessment` wrote and queued (the CLI's and REST API's answer)."""

    job: int
    #: The document's Instance Number: 1 for a job's first assessment, then 2, 3, ...
    instance_number: int
    #: Findings the document assesses.
    findings: int
    #: The deliveries due now, one per destination of the job.
    deliveries: tuple[int, ...]


def queue_assessment(
    config: Config, database: Database, job_id: int, *, actor: str = ""
) -> QueuedAssessment:
    """Write job ``job_id``'s assessment SR next to its results and queue it for sending.

    The document (:func:`mibi_node.report.assessment.build_assessment_sr`) holds every
    verdict that stands on the job's findings (:func:`standing_verdicts`) and references the
    job's AI SR. A job has one assessment file (its store path is a hash of the study and of
    the AI SR, like a result's): a new one replaces it on disk and, in PACS, supersedes it
    (same series, next Instance Number, the earlier one in its Predecessor Documents).

    It is queued for each destination the job's result went to (its delivery rows, with
    ``files`` the assessment file only): a pending delivery of the file is made due now,
    otherwise a new one is added; the dispatch sweep sends it with retries like a result.
    A job whose result went nowhere gets none. The whole runs in one write transaction with
    the job locked, so two verdicts given at once make two documents in turn.

    Raises
    ------
    AssessmentError
        No such job, a shadow job (never sent), no AI SR, no verdict, or the AI SR cannot be
        read or assessed.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
    from mibi_node.report.assessment import (
        ASSESSMENT_SERIES_OFFSET,
        FindingAssessment,
        build_assessment_sr,
    )
    from mibi_node.storage.filestore import FileStore

    results = FileStore(config.results_dir)
    with database.write_lock(), database.session() as session, session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise AssessmentError(f"there is no job #{job_id}")
        if job.shadow:
            raise AssessmentError(f"job #{job.id} is a shadow job: its results are never sent")
        if job.state is not JobState.DONE or not job.sr_path:
            raise AssessmentError(f"job #{job.id} has no AI SR to assess")
        standing = standing_verdicts(session, [job]).get(job.id, {})
        assessments = [
            FindingAssessment(
                key=finding.key,
                value=finding.value,
                decision=VerdictDecision(row.decision).value,
                reader=row.reader,
                corrected=row.value,
                comment=row.comment,
                assessed_at=row.created_at,
            )
            for finding in job_findings(job)
            if (row := standing.get(finding.key)) is not None
        ]
        if not assessments:
            raise AssessmentError(f"job #{job.id} has no verdict to send")
        try:
            ai_sr = pydicom.dcmread(results.absolute(job.sr_path))
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AssessmentError(f"the AI SR of job #{job.id} cannot be read: {why}") from None
        relative = results.relative_path(
            str(ai_sr.StudyInstanceUID), f"{ai_sr.SOPInstanceUID}/assessment"
        )
        predecessor = _earlier_assessment(results.absolute(relative))
        try:
            sr = build_assessment_sr(
                ai_sr,
                assessments,
                series_number=config.series_number_for(job.analysis) + ASSESSMENT_SERIES_OFFSET,
                instance_number=1 if predecessor is None else int(predecessor.InstanceNumber) + 1,
                series_instance_uid=None if predecessor is None else predecessor.SeriesInstanceUID,
                predecessor=predecessor,
                institution_name=config.report.institution_name or None,
            )
        except (TypeError, ValueError) as exc:
            raise AssessmentError(f"the AI SR of job #{job.id} cannot be assessed: {exc}") from None
        handle, temporary = tempfile.mkstemp(dir=results.incoming, suffix=".dcm")
        os.close(handle)
        sr.file_meta = FileMetaDataset(getattr(sr, "file_meta", FileMetaDataset()))
        sr.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        sr.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        sr.save_as(temporary, enforce_file_format=True)
        results.place(Path(temporary), relative)
        deliveries = _queue(session, job, relative)
        audit.add(
            session,
            "assessment",
            "queued",
            actor=actor,
            study_id=job.study_id,
            message=f"assessment SR {sr.InstanceNumber} of job #{job.id}",
            detail={
                "job": job.id,
                "analysis": job.analysis,
                "instance": int(sr.InstanceNumber),
                "findings": len(assessments),
                "deliveries": len(deliveries),
            },
        )
        return QueuedAssessment(job.id, int(sr.InstanceNumber), len(assessments), deliveries)


def _earlier_assessment(path: Path) -> Dataset | None:
    """The job's previous assessment SR, if it has one that can be read."""
    import pydicom

    if not path.exists():
        return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, ValueError) as exc:
        logger.warning("the earlier assessment SR cannot be read (%s); starting anew", exc)
        return None


def _queue(session: Session, job: Job, relative: str) -> tuple[int, ...]:
    """Make the assessment file due for every destination of the job; the delivery ids."""
    rows = session.scalars(
        select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)
    ).all()
    destinations: dict[str, dict[str, object]] = {}
    waiting: dict[str, Delivery] = {}
    for row in rows:
        data = {k: v for k, v in dict(row.destination).items() if k != "files"}
        destinations.setdefault(row.label, data)
        if row.state is DeliveryState.PENDING and row.destination.get("files") == [relative]:
            waiting[row.label] = row
    due = []
    for label, destination in destinations.items():
        found = waiting.get(label)
        if found is None:
            found = Delivery(
                job_id=job.id, destination={**destination, "files": [relative]}, label=label
            )
            session.add(found)
        found.next_attempt_at = utcnow()
        found.attempts = 0
        due.append(found)
    session.flush()
    return tuple(row.id for row in due)
