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
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import Table, bindparam, insert, select, update
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

__all__ = [
    "ClaimedJob",
    "CompletedJob",
    "claim_jobs",
    "complete_job",
    "defer_job",
    "device_uid",
    "fail_job",
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


def claim_jobs(
    database: Database, owner: str, lease_seconds: float, limit: int
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due jobs for ``owner``; a job that failed before comes alone.

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
            .returning(_JOB.c.id, _JOB.c.study_id, _JOB.c.version, _JOB.c.attempts, _JOB.c.partial)
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
            if state in _CLAIMABLE_STUDY_STATES:
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
            select(_JOB.c.study_id, _JOB.c.version, _JOB.c.sr_path, _JOB.c.sr_series_instance_uid)
            .where(_JOB.c.study_id.in_(study_ids), _JOB.c.state == JobState.DONE)
            .order_by(_JOB.c.version.desc())
        ).all()
    claimed = []
    for job in jobs:
        study = studies[job.study_id]
        earlier = next(
            (row for row in done if row.study_id == job.study_id and row.version < job.version),
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
                error=None,
                traceback=None,
            )
            .returning(_JOB.c.study_id, _JOB.c.version)
        ).first()
        if job is None:
            logger.warning(
                "job #%d is no longer held by %s (lease expired?); result dropped", job_id, owner
            )
            return []
        predicted = done.result.get("predicted", "?")
        connection.execute(
            update(_STUDY)
            .where(_STUDY.c.id == job.study_id, _STUDY.c.state == StudyState.RUNNING)
            .values(
                state=StudyState.DONE,
                state_reason=f"version {job.version}: {predicted}",
                state_changed_at=now,
            )
        )
        audit.add(
            connection,
            "result",
            "done",
            actor=owner,
            study_id=job.study_id,
            detail={"job": job_id, "version": job.version, "predicted": predicted},
        )
        if not done.destinations:
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
            if study.state is StudyState.RUNNING:
                study.transition(
                    StudyState.QUEUED, f"attempt {job.attempts} of {max_attempts} failed: {error}"
                )
        else:
            job.transition(JobState.FAILED, error)
            if study.state is StudyState.RUNNING:
                study.transition(StudyState.FAILED, error)
            audit.add(
                session,
                "result",
                "failed",
                actor=owner,
                study_id=study.id,
                message=error,
                detail={"job": job.id, "version": job.version, "attempts": job.attempts},
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
        if study.state is StudyState.RUNNING:
            study.transition(StudyState.AWAITING_PHASE, reason)
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
                if study.state is StudyState.RUNNING:
                    study.transition(StudyState.FAILED, f"{error}; no attempts left")
                audit.add(
                    session,
                    "result",
                    "failed",
                    actor=job.lease_owner or "",
                    study_id=study.id,
                    message=f"{error}; no attempts left",
                    detail={"job": job.id, "version": job.version, "attempts": job.attempts},
                )
            else:
                job.transition(JobState.QUEUED)
                job.error = error
                if study.state is StudyState.RUNNING:
                    study.transition(StudyState.QUEUED, error)
            logger.warning("job #%d: %s", job.id, error)
            released.append(job.id)
    return released


def requeue_study(database: Database, study_instance_uid: str, actor: str = "cli") -> int:
    """Analyse a study again (``mibi-node requeue``); returns the job id.

    A FAILED job is queued again with fresh attempts; a study whose analysis is DONE gets a
    new version (its SR supersedes the previous one).

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
        job = session.scalars(
            select(Job)
            .where(Job.study_id == study.id)
            .order_by(Job.version.desc())
            .with_for_update()
        ).first()
        study = session.get_one(Study, study.id, with_for_update=True, populate_existing=True)
        if study.state in (StudyState.RECEIVING, StudyState.STABLE, StudyState.RUNNING):
            raise MibiNodeError(
                f"the study is {study.state.value.lower()}; requeue it when that has ended"
            )
        if job is not None and job.state is JobState.QUEUED:
            job.not_before = None
        elif job is not None and job.state is JobState.FAILED:
            job.transition(JobState.QUEUED)
            job.attempts = 0
            job.not_before = None
            job.partial = False
        else:
            job = Job(study_id=study.id, version=(job.version + 1) if job else 1)
            session.add(job)
        if study.state is not StudyState.QUEUED:
            study.transition(StudyState.QUEUED, f"queued again by hand ({actor})")
        session.flush()
        audit.add(
            session,
            "operator",
            "requeue",
            actor=actor,
            study_id=study.id,
            detail={"job": job.id, "version": job.version},
        )
        return job.id


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
