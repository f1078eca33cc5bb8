"""Read-only views of the database for people: ``mibi-node status`` and the status page."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from mibi_node.storage.database import Database
from mibi_node.storage.models import Study

__all__ = ["StudySummary", "list_studies"]


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
