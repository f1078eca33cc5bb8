"""Database rows: what was received, from whom, and where each study stands.

The database is the node's memory across crashes: a row exists only for an instance whose
file is durable, and every state change of a study is one committed transaction.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from mibi_node.errors import MibiNodeError

__all__ = [
    "Base",
    "Instance",
    "InvalidTransitionError",
    "Study",
    "StudyState",
    "check_transition",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (what every timestamp column holds)."""
    return datetime.now(UTC)


class _UTCDateTime(TypeDecorator[datetime]):
    """Store aware datetimes; SQLite gives naive ones back, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class StudyState(enum.StrEnum):
    """Where a study is in its life (see docs/architecture.md)."""

    RECEIVING = "RECEIVING"
    STABLE = "STABLE"
    IGNORED = "IGNORED"
    AWAITING_PHASE = "AWAITING_PHASE"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


_ALLOWED: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.STABLE}),
    StudyState.STABLE: frozenset(
        {
            StudyState.RECEIVING,
            StudyState.IGNORED,
            StudyState.AWAITING_PHASE,
            StudyState.QUEUED,
        }
    ),
    StudyState.IGNORED: frozenset({StudyState.RECEIVING}),
    StudyState.AWAITING_PHASE: frozenset(
        {StudyState.RECEIVING, StudyState.QUEUED, StudyState.FAILED}
    ),
    StudyState.QUEUED: frozenset({StudyState.RECEIVING, StudyState.RUNNING}),
    StudyState.RUNNING: frozenset({StudyState.QUEUED, StudyState.DONE, StudyState.FAILED}),
    StudyState.DONE: frozenset({StudyState.RECEIVING}),
    StudyState.FAILED: frozenset({StudyState.RECEIVING, StudyState.QUEUED}),
}


class InvalidTransitionError(MibiNodeError):
    """A study was asked to move to a state that its current state does not lead to."""


def check_transition(current: StudyState, new: StudyState) -> None:
    """The one place that says which study state may follow which.

    Raises
    ------
    InvalidTransitionError
        ``new`` is not reachable from ``current``.
    """
    if new not in _ALLOWED[current]:
        raise InvalidTransitionError(f"a study cannot go from {current.value} to {new.value}")


class Base(DeclarativeBase):
    """Declarative base of every mibi-node table."""


class Study(Base):
    """One study as the node has received it so far."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), default=StudyState.RECEIVING
    )
    state_reason: Mapped[str | None] = mapped_column(Text, default=None)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    modalities: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str | None] = mapped_column(String(64), default=None)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_study_state_last", "state", "last_received_at"),)

    def transition(self, new: StudyState, reason: str | None = None) -> None:
        """Move to ``new`` if the state machine allows it, recording the reason.

        Raises
        ------
        InvalidTransitionError
            ``new`` is not reachable from the current state.
        """
        check_transition(StudyState(self.state), new)
        self.state = new
        self.state_reason = reason
        self.state_changed_at = utcnow()


class Instance(Base):
    """One stored SOP instance: a durable file in the store and what it is."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")
