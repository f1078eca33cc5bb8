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
from sqlalchemy import select, update
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
    about as much as a single job (benchmarks/bench_queue.py).
    """
    now = utcnow()
    due = (
        select(Job.id, Job.attempts)
        .where(
            Job.state == JobState.QUEUED,
            (Job.not_before.is_(None)) | (Job.not_before <= now),
        )
        .order_by(Job.attempts.desc(), Job.id)
        .limit(limit)
    )
    if database.is_postgresql:
        # The job and its study are locked together, and a job whose row or study another
        # transaction holds (another worker's claim, a receiver's instance) is skipped. The
        # pick is a statement of its own: as a subquery of the UPDATE, PostgreSQL may run it
        # again for every row and so claim more than ``limit``.
        due = due.join(Study, Study.id == Job.study_id).with_for_update(
            skip_locked=True, of=(Job, Study)
        )
    with database.write_lock(), database.session() as session, session.begin():
        picked = session.execute(due).all()
        if not picked:
            return []
        if picked[0].attempts:
            picked = picked[:1]
        returned = session.execute(
            update(Job)
            .where(Job.id.in_([row.id for row in picked]), Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                started_at=now,
            )
            .returning(Job.id, Job.study_id, Job.version, Job.attempts, Job.partial)
            .execution_options(synchronize_session=False)
        ).all()
        if not returned:
            return []
        jobs = sorted(returned, key=lambda job: job.id)
        study_ids = [job.study_id for job in jobs]
        studies = {
            row.id: row
            for row in session.execute(
                select(
                    Study.id, Study.state, Study.study_instance_uid, Study.first_received_at
                ).where(Study.id.in_(study_ids))
            )
        }
        moves = []
        for job in jobs:
            state = StudyState(studies[job.study_id].state)
            if state in _CLAIMABLE_STUDY_STATES:
                check_transition(state, StudyState.RUNNING)
                moves.append(
                    {
                        "id": job.study_id,
                        "state": StudyState.RUNNING,
                        "state_reason": f"analysing version {job.version}",
                        "state_changed_at": now,
                    }
                )
        if moves:
            # One executemany by primary key (the ORM's bulk UPDATE), not one UPDATE each.
            session.execute(update(Study), moves)
        paths: dict[int, list[str]] = {study_id: [] for study_id in study_ids}
        for study_id, path, modality, sop_class in session.execute(
            select(Instance.study_id, Instance.path, Instance.modality, Instance.sop_class_uid)
            .where(Instance.study_id.in_(study_ids))
            .order_by(Instance.id)
        ):
            if is_image_instance(modality, sop_class):
                paths[study_id].append(path)
        done = session.execute(
            select(Job.study_id, Job.version, Job.sr_path, Job.sr_series_instance_uid)
            .where(Job.study_id.in_(study_ids), Job.state == JobState.DONE)
            .order_by(Job.version.desc())
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

    Returns
    -------
    list of int
        Ids of the new deliveries (empty when the lease was lost: then nothing is recorded).
    """
    with database.write_lock(), database.session() as session, session.begin():
        owned = _owned(session, job_id, owner)
        if owned is None:
            return []
        job, study = owned
        job.transition(JobState.DONE)
        job.result = done.result
        job.timings = done.timings
        job.bundle = done.bundle
        job.sr_path = done.sr_path
        job.sr_sop_instance_uid = done.sr_sop_instance_uid
        job.sr_series_instance_uid = done.sr_series_instance_uid
        job.error = job.traceback = None
        predicted = done.result.get("predicted", "?")
        if study.state is StudyState.RUNNING:
            study.transition(StudyState.DONE, f"version {job.version}: {predicted}")
        audit.add(
            session,
            "result",
            "done",
            actor=owner,
            study_id=study.id,
            detail={"job": job.id, "version": job.version, "predicted": predicted},
        )
        deliveries = [
            Delivery(
                job_id=job.id,
                destination={**destination, "files": list(done.files)},
                label=_label(destination),
            )
            for destination in done.destinations
        ]
        session.add_all(deliveries)
        session.flush()
        return [delivery.id for delivery in deliveries]


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
