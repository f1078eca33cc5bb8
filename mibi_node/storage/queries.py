"""Read-only views of the database for people: ``mibi-node status`` and the status page."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from mibi_node.storage.database import Database
from mibi_node.storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    WorkerStatus,
    utcnow,
)

__all__ = [
    "DeliverySummary",
    "StudySummary",
    "WorkerSummary",
    "count_jobs",
    "list_deliveries",
    "list_studies",
    "list_workers",
]


@dataclass(frozen=True)
class StudySummary:
    """One line of ``mibi-node status``."""

    id: int
    study_instance_uid: str
    state: str
    state_reason: str | None
    instance_count: int
    modalities: str
    calling_ae_title: str
    first_received_at: datetime
    last_received_at: datetime

    def as_json(self) -> dict[str, Any]:
        """Plain JSON-ready data (timestamps in ISO 8601, UTC)."""
        data = asdict(self)
        data["first_received_at"] = self.first_received_at.isoformat()
        data["last_received_at"] = self.last_received_at.isoformat()
        return data


def list_studies(database: Database, limit: int = 200) -> list[StudySummary]:
    """The most recently active studies first."""
    with database.session() as session:
        rows = session.scalars(
            select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        ).all()
        return [
            StudySummary(
                id=row.id,
                study_instance_uid=row.study_instance_uid,
                state=row.state.value,
                state_reason=row.state_reason,
                instance_count=row.instance_count,
                modalities=row.modalities,
                calling_ae_title=row.calling_ae_title,
                first_received_at=row.first_received_at,
                last_received_at=row.last_received_at,
            )
            for row in rows
        ]


@dataclass(frozen=True)
class WorkerSummary:
    """One worker process as it last reported itself."""

    name: str
    pid: int
    device: str
    bundle: str | None
    state: str
    message: str | None
    heartbeat_at: datetime
    #: Whether the worker has reported lately (a dead worker's row stays behind).
    alive: bool

    def as_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["heartbeat_at"] = self.heartbeat_at.isoformat()
        return data


@dataclass(frozen=True)
class DeliverySummary:
    """One delivery that has not succeeded (yet), or the latest ones that did."""

    id: int
    study_instance_uid: str
    version: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_message: str | None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        data = asdict(self)
        data["next_attempt_at"] = self.next_attempt_at.isoformat()
        return data


def list_workers(database: Database, stale_after: float = 60.0) -> list[WorkerSummary]:
    """Every worker that has reported, most recent heartbeat first.

    A worker renews its heartbeat every ``jobs.lease_seconds / 3``; one silent for
    ``stale_after`` seconds is reported as not alive (stopped, killed, or hung).
    """
    cutoff = utcnow() - timedelta(seconds=stale_after)
    with database.session() as session:
        rows = session.scalars(select(WorkerStatus).order_by(WorkerStatus.heartbeat_at.desc()))
        return [
            WorkerSummary(
                name=row.name,
                pid=row.pid,
                device=row.device,
                bundle=row.bundle,
                state=row.state,
                message=row.message,
                heartbeat_at=row.heartbeat_at,
                alive=row.state != "stopped" and row.heartbeat_at >= cutoff,
            )
            for row in rows
        ]


def count_jobs(database: Database) -> dict[str, int]:
    """Number of jobs per state."""
    with database.session() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {JobState(state).value: int(count) for state, count in rows}


def list_deliveries(
    database: Database,
    states: Sequence[DeliveryState] = (
        DeliveryState.PENDING,
        DeliveryState.SENDING,
        DeliveryState.FAILED,
    ),
    limit: int = 200,
) -> list[DeliverySummary]:
    """Deliveries in ``states``, oldest first."""
    with database.session() as session:
        rows = session.execute(
            select(Delivery, Job.version, Study.study_instance_uid)
            .join(Job, Delivery.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(Delivery.state.in_(list(states)))
            .order_by(Delivery.id)
            .limit(limit)
        ).all()
        return [
            DeliverySummary(
                id=delivery.id,
                study_instance_uid=uid,
                version=version,
                destination=delivery.label,
                state=delivery.state.value,
                attempts=delivery.attempts,
                next_attempt_at=delivery.next_attempt_at,
                last_status=delivery.last_status,
                last_message=delivery.last_message,
            )
            for delivery, version, uid in rows
        ]
