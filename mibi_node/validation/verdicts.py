"""Recording a radiologist's verdict on one AI finding: accepted, rejected or corrected.

The finding and the corrected value are checked against what the analysis says of the
stored result (:meth:`~mibi_node.analyses.base.Analysis.findings`), so a verdict can only
name a finding the result has and a correction only a value the finding may take. The row
and its audit event commit together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mibi_node import audit
from mibi_node.analyses.base import Finding
from mibi_node.analyses.registry import get_analysis
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.models import Job, JobState, Verdict, VerdictDecision

__all__ = ["RecordedVerdict", "VerdictError", "job_findings", "record_verdict"]

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
