"""Retention: remove the instance files of studies whose results were delivered long ago.

A study qualifies when its analysis is DONE, the latest version's result has at least one
delivery and *every* delivery of it was acknowledged, the last of them more than
``retention.days`` ago, and nothing arrived since (a late image reopens the study, which is
then no longer DONE). Anything else is kept: a result still pending, failed or never sent
(no destination configured), an ignored or failed study, a study being received. The
database rows stay (what was received, when, from whom, what was answered); only the files
go, and one ``retention`` audit event per study records how many. The SR files the node made
stay too (``mibi-node resend`` needs them; they are a few kB each).

The reception disk threshold (``storage.min_free_mb``) stays the last line of defence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import case, exists, func, select

from mibi_node import audit
from mibi_node.config import RetentionConfig
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)

__all__ = ["RetentionOutcome", "expired_studies", "sweep_retention"]

logger = logging.getLogger(__name__)


#: The study's files were removed already (its retention event is in the audit trail).
_REMOVED = exists().where(AuditEvent.kind == "retention", AuditEvent.study_id == Study.id)


@dataclass(frozen=True)
class RetentionOutcome:
    """What one retention sweep removed."""

    studies: int
    files: int
    bytes: int


def expired_studies(
    database: Database,
    days: float,
    now: datetime | None = None,
    limit: int = 100,
    after: int = 0,
) -> list[int]:
    """Ids (above ``after``, ascending) of studies whose instance files may go (the rules in
    the module's docstring)."""
    cutoff = (now or utcnow()) - timedelta(days=days)
    latest = (
        select(Job.study_id, func.max(Job.version).label("version"))
        .group_by(Job.study_id)
        .subquery()
    )
    # Per study, its latest job's deliveries: at least one, all DONE, the last before cutoff.
    undelivered = func.sum(case((Delivery.state == DeliveryState.DONE, 0), else_=1))
    with database.session() as session:
        return list(
            session.scalars(
                select(Study.id)
                .join(latest, latest.c.study_id == Study.id)
                .join(Job, (Job.study_id == Study.id) & (Job.version == latest.c.version))
                .join(Delivery, Delivery.job_id == Job.id)
                .where(
                    Study.state == StudyState.DONE,
                    Study.last_received_at < cutoff,
                    Job.state == JobState.DONE,
                    Study.id > after,
                    ~_REMOVED,
                )
                .group_by(Study.id)
                .having(undelivered == 0, func.max(Delivery.delivered_at) < cutoff)
                .order_by(Study.id)
                .limit(limit)
            ).all()
        )


def sweep_retention(
    database: Database, files: FileStore, config: RetentionConfig, now: datetime | None = None
) -> RetentionOutcome:
    """Remove the instance files of every expired study; ``days = 0`` keeps everything."""
    if config.days <= 0:
        return RetentionOutcome(0, 0, 0)
    studies = removed_files = removed_bytes = 0
    last = 0
    while batch := expired_studies(database, config.days, now, after=last):
        last = batch[-1]
        for study_id in batch:
            removed = _remove_study_files(database, files, study_id, config.days)
            if removed is None:
                continue
            studies += 1
            removed_files += removed[0]
            removed_bytes += removed[1]
    if studies:
        logger.info(
            "retention: removed %d file(s), %.1f MiB, of %d delivered stud(ies)",
            removed_files,
            removed_bytes / (1 << 20),
            studies,
        )
    return RetentionOutcome(studies, removed_files, removed_bytes)


def _remove_study_files(
    database: Database, files: FileStore, study_id: int, days: float
) -> tuple[int, int] | None:
    """Remove one expired study's instance files and record it; ``None`` when it is not due.

    The study's row is locked while its files go, and what made it expired is checked again
    under the lock: an image that arrived since the query reopened it (its files are needed
    again), and another receiver's sweep on the same PostgreSQL may hold it (skipped) or
    have removed them already (its audit row is there). The record commits after the files
    are gone: a crash in between leaves no record, and the next sweep removes what is left
    and writes it.
    """
    with database.write_lock(), database.session() as session, session.begin():
        due = session.scalar(
            select(Study.id)
            .where(Study.id == study_id, Study.state == StudyState.DONE, ~_REMOVED)
            .with_for_update(skip_locked=True)
        )
        if due is None:
            return None
        rows = session.execute(
            select(Instance.path, Instance.size).where(Instance.study_id == study_id)
        ).all()
        count = size = 0
        for path, nbytes in rows:
            target = files.absolute(path)
            if target.exists():
                files.remove(path)
                count += 1
                size += nbytes
        if rows:  # every instance of a study shares one folder (FileStore.relative_path)
            _remove_empty_folder(files, files.absolute(rows[0][0]).parent)
        audit.add(
            session,
            "retention",
            "removed",
            actor="retention",
            study_id=study_id,
            message=f"instance files removed {days:g} days after delivery",
            detail={"files": count, "bytes": size, "instances": len(rows)},
        )
    return count, size


def _remove_empty_folder(files: FileStore, folder: Path) -> None:
    """Remove a study's folder (and its hash-prefix parent) once they are empty."""
    for candidate in (folder, folder.parent):
        if candidate == files.root or files.root not in candidate.parents:
            return
        try:
            candidate.rmdir()
        except OSError:
            return
