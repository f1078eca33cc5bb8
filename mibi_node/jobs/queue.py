"""The analysis queue: atomic claims with leases, renewals, retries and completion.

A worker claims jobs by picking them and marking them RUNNING with an ``UPDATE ... RETURNING``
in one transaction (``BEGIN IMMEDIATE`` on SQLite; on PostgreSQL the pick is a ``SELECT ...
FOR UPDATE SKIP LOCKED`` that locks the jobs together with their studies' rows), so two
workers never hold the same job. The
claim writes a lease (owner, expiry) that the worker renews while it works; a lease that
expires (the worker was killed, the machine froze) returns the job to the queue, and after
``jobs.max_attempts`` claims the job FAILED. Every change to a job changes its study's state
in the same transaction, and every transition goes through the state machines of
:mod:`mibi_node.storage.models`.

On PostgreSQL (READ COMMITTED) every function locks the rows it reads before it changes
them, jobs before their studies (``FOR UPDATE``; sweeps and claims skip rows another
transaction holds), which SQLite's compiler leaves out: there ``BEGIN IMMEDIATE`` and the
write lock already make every transaction the only writer.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydicom.uid import generate_uid
from sqlalchemy import Connection, Table, bindparam, insert, null, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from mibi_node import audit
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import (
    Delivery,
    Instance,
    Job,
    JobState,
    Setting,
    Study,
    StudyState,
    check_job_transition,
    check_transition,
    utcnow,
)

if TYPE_CHECKING:
    from mibi_node.config import Config

__all__ = [
    "ClaimedJob",
    "CompletedJob",
    "claim_jobs",
    "complete_job",
    "defer_job",
    "device_uid",
    "fail_job",
    "queue_shadow_job",
    "release_expired_jobs",
    "renew_leases",
    "requeue_study",
]

logger = logging.getLogger(__name__)

_JOB: Table = Job.__table__  # type: ignore[assignment]
_STUDY: Table = Study.__table__  # type: ignore[assignment]
_INSTANCE: Table = Instance.__table__  # type: ignore[assignment]
_DELIVERY: Table = Delivery.__table__  # type: ignore[assignment]

#: Study states a worker may take a study from when it claims its job.
_CLAIMABLE_STUDY_STATES = (StudyState.QUEUED, StudyState.AWAITING_PHASE)


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to analyse one claimed job."""

    id: int
    study_id: int
    study_instance_uid: str
    version: int
    attempts: int
    partial: bool
    first_received_at: datetime
    #: Store-relative paths of the study's image instances.
    paths: tuple[str, ...]
    #: The latest earlier SR of this study (its store-relative result path), if any.
    predecessor_sr_path: str | None
    #: The result series of earlier versions, so every version lands in one series.
    sr_series_instance_uid: str | None
    #: The analysis to run (:mod:`mibi_node.analyses`).
    analysis: str = "parathyroid"
    #: A job of the analysis' candidate bundle: its result is stored, never sent.
    shadow: bool = False


@dataclass(frozen=True)
class CompletedJob:
    """What a worker records when a job succeeded."""

    result: dict[str, Any]
    timings: dict[str, float]
    bundle: str
    sr_path: str
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    #: Store-relative paths of every file to send (the SR first, then any key image).
    files: tuple[str, ...]
    #: Destinations as plain data (``Destination.model_dump(mode="json")``).
    destinations: tuple[dict[str, Any], ...]
    #: Summary of the images the job read, for input drift (:mod:`mibi_node.validation.drift`);
    #: ``None`` when it could not be made.
    inputs: dict[str, Any] | None = None


def claim_jobs(
    database: Database,
    owner: str,
    lease_seconds: float,
    limit: int,
    analyses: Collection[str] | None = None,
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due jobs for ``owner``; a job that failed before comes alone.

    ``analyses``: only jobs of these analyses (those whose bundles the worker has loaded);
    ``None`` takes any.

    A job whose earlier attempt ended with its worker's death may be the cause (a poison
    study), so it is claimed on its own: it cannot take a batch of good studies down with it.

    One claim is six statements whatever ``limit`` is (pick, claim, read the studies, move
    them, read their instances, read their earlier results), so a batch costs the database
    about as much as a single job. Claims and completions are every worker's hot path, so
    they are written in SQLAlchemy Core, as reception is (benchmarks/bench_queue.py).
    """
    now = utcnow()
    due = (
        select(_JOB.c.id, _JOB.c.attempts)
        .where(
            _JOB.c.state == JobState.QUEUED,
            (_JOB.c.not_before.is_(None)) | (_JOB.c.not_before <= now),
        )
        .order_by(_JOB.c.attempts.desc(), _JOB.c.id)
        .limit(limit)
    )
    if analyses is not None:
        due = due.where(_JOB.c.analysis.in_(sorted(analyses)))
    if database.is_postgresql:
        # The job and its study are locked together, and a job whose row or study another
        # transaction holds (another worker's claim, a receiver's instance) is skipped. The
        # pick is a statement of its own: as a subquery of the UPDATE, PostgreSQL may run it
        # again for every row and so claim more than ``limit``.
        due = due.join(_STUDY, _STUDY.c.id == _JOB.c.study_id).with_for_update(
            skip_locked=True, of=(_JOB, _STUDY)
        )
    with database.write_lock(), database.engine.begin() as connection:
        picked = connection.execute(due).all()
        if not picked:
            return []
        if picked[0].attempts:
            picked = picked[:1]
        returned = connection.execute(
            update(_JOB)
            .where(_JOB.c.id.in_([row.id for row in picked]), _JOB.c.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=_JOB.c.attempts + 1,
                started_at=now,
            )
            .returning(
                _JOB.c.id,
                _JOB.c.study_id,
                _JOB.c.analysis,
                _JOB.c.version,
                _JOB.c.attempts,
                _JOB.c.partial,
                _JOB.c.shadow,
            )
        ).all()
        if not returned:
            return []
        jobs = sorted(returned, key=lambda job: job.id)
        study_ids = [job.study_id for job in jobs]
        studies = {
            row.id: row
            for row in connection.execute(
                select(
                    _STUDY.c.id,
                    _STUDY.c.state,
                    _STUDY.c.study_instance_uid,
                    _STUDY.c.first_received_at,
                ).where(_STUDY.c.id.in_(study_ids))
            )
        }
        moves = []
        for job in jobs:
            state = StudyState(studies[job.study_id].state)
            if state in _CLAIMABLE_STUDY_STATES and not job.shadow:  # shadows move nothing
                check_transition(state, StudyState.RUNNING)
                moves.append({"moved": job.study_id, "reason": f"analysing version {job.version}"})
        if moves:  # one executemany, not one UPDATE a study
            connection.execute(
                update(_STUDY)
                .where(_STUDY.c.id == bindparam("moved"))
                .values(
                    state=StudyState.RUNNING,
                    state_reason=bindparam("reason"),
                    state_changed_at=now,
                ),
                moves,
            )
        paths: dict[int, list[str]] = {study_id: [] for study_id in study_ids}
        for study_id, path, modality, sop_class in connection.execute(
            select(
                _INSTANCE.c.study_id,
                _INSTANCE.c.path,
                _INSTANCE.c.modality,
                _INSTANCE.c.sop_class_uid,
            )
            .where(_INSTANCE.c.study_id.in_(study_ids))
            .order_by(_INSTANCE.c.id)
        ):
            if is_image_instance(modality, sop_class):
                paths[study_id].append(path)
        done = connection.execute(
            select(
                _JOB.c.study_id,
                _JOB.c.analysis,
                _JOB.c.version,
                _JOB.c.sr_path,
                _JOB.c.sr_series_instance_uid,
            )
            .where(
                _JOB.c.study_id.in_(study_ids),
                _JOB.c.state == JobState.DONE,
                _JOB.c.shadow.is_(False),  # a shadow SR is never a predecessor
            )
            .order_by(_JOB.c.version.desc())
        ).all()
    claimed = []
    for job in jobs:
        study = studies[job.study_id]
        earlier = next(
            (
                row
                for row in done
                if row.study_id == job.study_id
                and row.analysis == job.analysis
                and row.version < job.version
                and not job.shadow  # a shadow SR stands alone, in a series of its own
            ),
            None,
        )
        claimed.append(
            ClaimedJob(
                id=job.id,
                study_id=job.study_id,
                study_instance_uid=study.study_instance_uid,
                version=job.version,
                attempts=job.attempts,
                partial=job.partial,
                first_received_at=study.first_received_at,
                paths=tuple(paths[job.study_id]),
                predecessor_sr_path=earlier.sr_path if earlier else None,
                sr_series_instance_uid=earlier.sr_series_instance_uid if earlier else None,
                analysis=job.analysis,
                shadow=job.shadow,
            )
        )
    return claimed


def renew_leases(
    database: Database, owner: str, lease_seconds: float, job_ids: Collection[int]
) -> int:
    """Extend the leases ``owner`` holds on ``job_ids``; returns how many it still holds.

    Only the jobs the worker is working on: a claim whose commit the worker never saw (the
    connection broke in the middle of it) is not renewed, so its lease runs out and the
    job goes back to the queue.
    """
    if not job_ids:
        return 0
    with database.write_lock(), database.session() as session, session.begin():
        result = session.execute(
            update(Job)
            .where(
                Job.id.in_(list(job_ids)),
                Job.lease_owner == owner,
                Job.state == JobState.RUNNING,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _aggregate(desired: StudyState, others: set[JobState], failed: bool) -> StudyState:
    """The study's state when one of its jobs asks for ``desired``.

    A study is RUNNING while any of its jobs runs, QUEUED while one waits; once none is
    active it is FAILED when the latest job of any analysis failed, else DONE. Shadow jobs
    (a candidate bundle's) are not among its jobs here: the study never waits for them.
    """
    if JobState.RUNNING in others:
        return StudyState.RUNNING
    if JobState.QUEUED in others and desired in (StudyState.DONE, StudyState.FAILED):
        return StudyState.QUEUED
    if desired is StudyState.DONE and failed:
        return StudyState.FAILED
    return desired


def _target(
    connection: Connection, study_id: int, job_id: int, desired: StudyState, summary: str
) -> tuple[StudyState, str | None]:
    """Where a RUNNING study goes when its job ``job_id`` wants ``desired``.

    Returns the state and, for a study of several analyses that is now finished, a reason
    naming each analysis' outcome (``summary`` is this job's: its finding or "failed").
    With one analysis the state is ``desired`` itself; one statement reads the jobs.
    """
    rows = connection.execute(
        select(_JOB.c.id, _JOB.c.analysis, _JOB.c.version, _JOB.c.state, _JOB.c.result).where(
            _JOB.c.study_id == study_id, _JOB.c.shadow.is_(False)
        )
    ).all()
    active = {JobState(row.state) for row in rows if row.id != job_id} & {
        JobState.QUEUED,
        JobState.RUNNING,
    }
    latest: dict[str, Any] = {}
    for row in rows:
        if row.analysis not in latest or row.version > latest[row.analysis].version:
            latest[row.analysis] = row
    failed = any(
        JobState(row.state) is JobState.FAILED for row in latest.values() if row.id != job_id
    )
    state = _aggregate(desired, active, failed)
    if len(latest) < 2 or state not in (StudyState.DONE, StudyState.FAILED):
        return state, None
    parts = []
    for name, row in sorted(latest.items()):
        if row.id == job_id:
            outcome = summary
        elif JobState(row.state) is JobState.DONE:
            outcome = str((row.result or {}).get("predicted") or "done")
        else:
            outcome = JobState(row.state).value.lower()
        parts.append(f"{name} v{row.version}: {outcome}")
    return state, "; ".join(parts)


def _settle(
    connection: Connection,
    study_id: int,
    job_id: int,
    desired: StudyState,
    reason: str,
    summary: str,
    now: datetime,
) -> None:
    """Move a RUNNING study where :func:`_target` says (a RECEIVING one stays as it is)."""
    state, combined = _target(connection, study_id, job_id, desired, summary)
    if state is StudyState.RUNNING:
        return
    check_transition(StudyState.RUNNING, state)
    connection.execute(
        update(_STUDY)
        .where(_STUDY.c.id == study_id, _STUDY.c.state == StudyState.RUNNING)
        .values(state=state, state_reason=combined or reason, state_changed_at=now)
    )


def _move(session: Session, study: Study, job: Job, desired: StudyState, reason: str) -> None:
    """:func:`_settle` for the functions that hold the study as an ORM object (a shadow
    job's study stays as it is)."""
    if study.state is not StudyState.RUNNING or job.shadow:
        return
    summary = "failed" if desired is StudyState.FAILED else desired.value.lower()
    state, combined = _target(session.connection(), study.id, job.id, desired, summary)
    if state is not StudyState.RUNNING:
        study.transition(state, combined or reason)


def _owned(session: Session, job_id: int, owner: str) -> tuple[Job, Study] | None:
    """The job ``owner`` holds and its study, both locked (one statement), else ``None``."""
    row = session.execute(
        select(Job, Study)
        .join(Study, Study.id == Job.study_id)
        .where(Job.id == job_id)
        .with_for_update()
    ).first()
    if row is None or row[0].state is not JobState.RUNNING or row[0].lease_owner != owner:
        logger.warning(
            "job #%d is no longer held by %s (lease expired?); result dropped", job_id, owner
        )
        return None
    return row[0], row[1]


def complete_job(database: Database, owner: str, job_id: int, done: CompletedJob) -> list[int]:
    """Record a job's result and create one delivery per destination.

    A shadow job's result (a candidate bundle's) is recorded with an audit row of kind
    ``shadow``, and nothing else: no delivery, and its study stays as it is.

    Four statements: one ``UPDATE ... RETURNING`` takes the job from RUNNING to DONE only if
    ``owner`` still holds it (the check and the change in one statement, which also locks
    the row), one moves its study, then the audit row and the deliveries are inserted.

    Returns
    -------
    list of int
        Ids of the new deliveries (empty when the lease was lost: then nothing is recorded).
    """
    check_job_transition(JobState.RUNNING, JobState.DONE)
    check_transition(StudyState.RUNNING, StudyState.DONE)
    now = utcnow()
    with database.write_lock(), database.engine.begin() as connection:
        job = connection.execute(
            update(_JOB)
            .where(
                _JOB.c.id == job_id,
                _JOB.c.state == JobState.RUNNING,
                _JOB.c.lease_owner == owner,
            )
            .values(
                # What Job.transition(DONE) does, plus the result.
                state=JobState.DONE,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                result=done.result,
                timings=done.timings,
                bundle=done.bundle,
                sr_path=done.sr_path,
                sr_sop_instance_uid=done.sr_sop_instance_uid,
                sr_series_instance_uid=done.sr_series_instance_uid,
                inputs=done.inputs if done.inputs is not None else null(),
                error=None,
                traceback=None,
            )
            .returning(_JOB.c.study_id, _JOB.c.analysis, _JOB.c.version, _JOB.c.shadow)
        ).first()
        if job is None:
            logger.warning(
                "job #%d is no longer held by %s (lease expired?); result dropped", job_id, owner
            )
            return []
        predicted = done.result.get("predicted", "?")
        if not job.shadow:
            _settle(
                connection,
                job.study_id,
                job_id,
                StudyState.DONE,
                f"version {job.version}: {predicted}",
                str(predicted),
                now,
            )
        audit.add(
            connection,
            "shadow" if job.shadow else "result",
            "done",
            actor=owner,
            study_id=job.study_id,
            detail={
                "job": job_id,
                "analysis": job.analysis,
                "version": job.version,
                "predicted": predicted,
                **({"bundle": done.bundle} if job.shadow else {}),
            },
        )
        if not done.destinations or job.shadow:  # a shadow result is never sent
            return []
        return list(
            connection.scalars(
                insert(_DELIVERY).returning(_DELIVERY.c.id, sort_by_parameter_order=True),
                [
                    {
                        "job_id": job_id,
                        "destination": {**destination, "files": list(done.files)},
                        "label": _label(destination),
                    }
                    for destination in done.destinations
                ],
            )
        )


def _label(destination: dict[str, Any]) -> str:
    name = str(destination.get("name") or "")
    return name or f"{destination['ae_title']}@{destination['host']}:{destination['port']}"


def fail_job(
    database: Database,
    owner: str,
    job_id: int,
    error: str,
    *,
    traceback: str | None = None,
    retry: bool,
    max_attempts: int,
) -> JobState | None:
    """Record a failed attempt: back to the queue while attempts remain and ``retry``.

    Returns the job's new state, or ``None`` when the lease was lost.
    """
    with database.write_lock(), database.session() as session, session.begin():
        owned = _owned(session, job_id, owner)
        if owned is None:
            return None
        job, study = owned
        job.traceback = traceback
        if retry and job.attempts < max_attempts:
            job.transition(JobState.QUEUED)
            job.error = error
            _move(
                session,
                study,
                job,
                StudyState.QUEUED,
                f"attempt {job.attempts} of {max_attempts} failed: {error}",
            )
        else:
            job.transition(JobState.FAILED, error)
            _move(session, study, job, StudyState.FAILED, error)
            audit.add(
                session,
                "shadow" if job.shadow else "result",
                "failed",
                actor=owner,
                study_id=study.id,
                message=error,
                detail={
                    "job": job.id,
                    "analysis": job.analysis,
                    "version": job.version,
                    "attempts": job.attempts,
                },
            )
        return JobState(job.state)


def defer_job(database: Database, owner: str, job_id: int, until: datetime, reason: str) -> bool:
    """Put a job back to wait for a missing phase until ``until`` (then it runs partial).

    The attempt does not count: nothing failed, the study is just not complete yet.
    """
    with database.write_lock(), database.session() as session, session.begin():
        owned = _owned(session, job_id, owner)
        if owned is None:
            return False
        job, study = owned
        job.transition(JobState.QUEUED)
        job.attempts -= 1
        job.not_before = until
        job.partial = True
        _move(session, study, job, StudyState.AWAITING_PHASE, reason)
        return True


def release_expired_jobs(database: Database, max_attempts: int) -> list[int]:
    """Return jobs whose lease expired to the queue, or fail them after their attempts."""
    now = utcnow()
    released = []
    with database.write_lock(), database.session() as session, session.begin():
        expired = session.scalars(
            select(Job)
            .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
            .with_for_update(skip_locked=True)  # another receiver's sweep has those
        ).all()
        for job in expired:
            study = session.get_one(Study, job.study_id, with_for_update=True)
            error = f"the worker stopped while analysing (attempt {job.attempts})"
            if job.attempts >= max_attempts:
                job.transition(JobState.FAILED, f"{error}; no attempts left")
                _move(session, study, job, StudyState.FAILED, f"{error}; no attempts left")
                audit.add(
                    session,
                    "shadow" if job.shadow else "result",
                    "failed",
                    actor=job.lease_owner or "",
                    study_id=study.id,
                    message=f"{error}; no attempts left",
                    detail={
                        "job": job.id,
                        "analysis": job.analysis,
                        "version": job.version,
                        "attempts": job.attempts,
                    },
                )
            else:
                job.transition(JobState.QUEUED)
                job.error = error
                _move(session, study, job, StudyState.QUEUED, error)
            logger.warning("job #%d: %s", job.id, error)
            released.append(job.id)
    return released


def requeue_study(
    database: Database,
    study_instance_uid: str,
    actor: str = "cli",
    analysis: str | None = None,
    config: Config | None = None,
) -> int:
    """Analyse a study again (``mibi-node requeue``); returns the (first) job id.

    Every analysis that analysed the study before (or only ``analysis``) is queued again: a
    FAILED job with fresh attempts, a DONE one as a new version (its SR supersedes the
    previous one). A study no analysis took gets a job of ``analysis`` (default
    parathyroid). With ``config``, an analysis with a candidate bundle gets its shadow job
    of the same version beside it (:func:`queue_shadow_job`).

    Raises
    ------
    MibiNodeError
        No such study, or it is being received or analysed right now.
    """
    with database.write_lock(), database.session() as session, session.begin():
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).first()
        if study is None:
            raise MibiNodeError(f"no study with Study Instance UID {study_instance_uid}")
        # Jobs before their study, as everywhere (PostgreSQL); the study is read again locked.
        jobs = session.scalars(
            select(Job)
            .where(Job.study_id == study.id)
            .order_by(Job.version.desc(), Job.id.desc())
            .with_for_update()
        ).all()
        study = session.get_one(Study, study.id, with_for_update=True, populate_existing=True)
        if study.state in (StudyState.RECEIVING, StudyState.STABLE, StudyState.RUNNING):
            raise MibiNodeError(
                f"the study is {study.state.value.lower()}; requeue it when that has ended"
            )
        latest: dict[str, Job] = {}
        for job in jobs:
            if not job.shadow:
                latest.setdefault(job.analysis, job)
        names = [analysis] if analysis is not None else list(latest) or ["parathyroid"]
        requeued: list[Job] = []
        for name in names:
            found = latest.get(name)
            if found is not None and found.state is JobState.QUEUED:
                found.not_before = None
            elif found is not None and found.state is JobState.FAILED:
                found.transition(JobState.QUEUED)
                found.attempts = 0
                found.not_before = None
                found.partial = False
            else:
                version = (found.version + 1) if found else 1
                found = Job(study_id=study.id, analysis=name, version=version)
                session.add(found)
            requeued.append(found)
        if study.state is not StudyState.QUEUED:
            study.transition(StudyState.QUEUED, f"queued again by hand ({actor})")
        session.flush()
        if config is not None:
            from mibi_node.validation.shadow import bundle_choices

            choices = bundle_choices(session, config, {job.analysis for job in requeued})
            for job in list(requeued):
                if choices[job.analysis].candidate is not None:
                    queue_shadow_job(session, job)
        for job in requeued:
            audit.add(
                session,
                "operator",
                "requeue",
                actor=actor,
                study_id=study.id,
                detail={"job": job.id, "analysis": job.analysis, "version": job.version},
            )
        return requeued[0].id


def queue_shadow_job(session: Session, job: Job) -> Job | None:
    """Queue the shadow job of ``job``'s version beside it (in ``session``'s transaction).

    A new one is made when there is none; a FAILED one is queued again with fresh attempts,
    a QUEUED one is due at once; a RUNNING or DONE one is left as it is (``None``).
    """
    shadow = session.scalars(
        select(Job)
        .where(
            Job.study_id == job.study_id,
            Job.analysis == job.analysis,
            Job.version == job.version,
            Job.shadow.is_(True),
        )
        .with_for_update()
    ).first()
    if shadow is None:
        shadow = Job(study_id=job.study_id, analysis=job.analysis, version=job.version, shadow=True)
        session.add(shadow)
    elif shadow.state is JobState.FAILED:
        shadow.transition(JobState.QUEUED)
        shadow.attempts = 0
        shadow.not_before = None
        shadow.partial = False
    elif shadow.state is JobState.QUEUED:
        shadow.not_before = None
        shadow.partial = False
    else:
        return None
    session.flush()
    return shadow


def device_uid(database: Database, configured: str = "") -> str:
    """The node's Device Observer UID: ``configured``, else one made once and kept."""
    if configured:
        return configured
    with database.write_lock(), database.session() as session, session.begin():
        setting = session.get(Setting, "device_uid")
        if setting is None and database.is_postgresql:
            # Workers on other hosts may make it at this very moment: the first one wins.
            session.execute(
                pg_insert(Setting)
                .values(key="device_uid", value=generate_uid())
                .on_conflict_do_nothing(index_elements=["key"])
            )
            setting = session.get_one(Setting, "device_uid")
        elif setting is None:
            setting = Setting(key="device_uid", value=generate_uid())
            session.add(setting)
        return setting.value
