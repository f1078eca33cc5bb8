"""Database rows: what was received, from whom, and where each study stands.

The database is the node's memory across crashes: a row exists only for an instance whose
file is durable, and every state change of a study is one committed transaction.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from mibi_node.errors import MibiNodeError

__all__ = [
    "AuditEvent",
    "Base",
    "CommitmentState",
    "Delivery",
    "DeliveryState",
    "Instance",
    "InvalidTransitionError",
    "Job",
    "JobState",
    "Setting",
    "Study",
    "StudyState",
    "Truth",
    "Verdict",
    "VerdictDecision",
    "WorkerStatus",
    "check_delivery_transition",
    "check_job_transition",
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
    StudyState.IGNORED: frozenset({StudyState.RECEIVING, StudyState.QUEUED}),
    StudyState.AWAITING_PHASE: frozenset(
        {StudyState.RECEIVING, StudyState.QUEUED, StudyState.RUNNING, StudyState.FAILED}
    ),
    StudyState.QUEUED: frozenset({StudyState.RECEIVING, StudyState.RUNNING, StudyState.FAILED}),
    StudyState.RUNNING: frozenset(
        {
            StudyState.RECEIVING,
            StudyState.QUEUED,
            StudyState.AWAITING_PHASE,
            StudyState.DONE,
            StudyState.FAILED,
        }
    ),
    StudyState.DONE: frozenset({StudyState.RECEIVING, StudyState.QUEUED}),
    StudyState.FAILED: frozenset({StudyState.RECEIVING, StudyState.QUEUED}),
}


class JobState(enum.StrEnum):
    """Where one analysis of one version of a study is."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


_JOB_ALLOWED: dict[JobState, frozenset[JobState]] = {
    # QUEUED -> FAILED: a study re-routed as not MIBI, or cancelled by hand.
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # RUNNING -> QUEUED: a retry, an expired lease, or a study waiting for its next phase.
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    # FAILED -> QUEUED: ``mibi-node requeue``.
    JobState.FAILED: frozenset({JobState.QUEUED}),
}


class DeliveryState(enum.StrEnum):
    """Where the sending of one result to one destination is."""

    PENDING = "PENDING"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"


_DELIVERY_ALLOWED: dict[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset({DeliveryState.SENDING}),
    DeliveryState.SENDING: frozenset(
        {DeliveryState.PENDING, DeliveryState.DONE, DeliveryState.FAILED}
    ),
    # DONE/FAILED -> PENDING: ``mibi-node resend``.
    DeliveryState.DONE: frozenset({DeliveryState.PENDING}),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
}


class CommitmentState(enum.StrEnum):
    """Whether the PACS has confirmed that it keeps a delivered result (``dispatch/commitment``).

    A delivery is DONE once the PACS acknowledged every C-STORE; its commitment says more:
    NONE (not asked: the destination's ``commitment`` is ``"none"``), PENDING (to be asked,
    or asked and the answer awaited), COMMITTED (Storage Commitment said so, or C-FIND found
    every instance), FAILED (the PACS reported failures, or never answered: an alert), or
    UNCONFIRMED (``"auto"`` and the PACS supports neither Storage Commitment nor C-FIND).
    """

    NONE = "NONE"
    PENDING = "PENDING"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    UNCONFIRMED = "UNCONFIRMED"


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


def check_job_transition(current: JobState, new: JobState) -> None:
    """The one place that says which job state may follow which.

    Raises
    ------
    InvalidTransitionError
        ``new`` is not reachable from ``current``.
    """
    if new not in _JOB_ALLOWED[current]:
        raise InvalidTransitionError(f"a job cannot go from {current.value} to {new.value}")


def check_delivery_transition(current: DeliveryState, new: DeliveryState) -> None:
    """The one place that says which delivery state may follow which.

    Raises
    ------
    InvalidTransitionError
        ``new`` is not reachable from ``current``.
    """
    if new not in _DELIVERY_ALLOWED[current]:
        raise InvalidTransitionError(f"a delivery cannot go from {current.value} to {new.value}")


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
    #: Accession Number and the camera or scanner (Station Name, Manufacturer Model Name,
    #: Device Serial Number) of the first image instance that had them ("" where none).
    accession_number: Mapped[str] = mapped_column(String(16), default="", server_default="")
    station_name: Mapped[str] = mapped_column(String(64), default="", server_default="")
    manufacturer_model_name: Mapped[str] = mapped_column(String(64), default="", server_default="")
    device_serial_number: Mapped[str] = mapped_column(String(64), default="", server_default="")
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


class Job(Base):
    """One analysis of one version of a study: the worker's unit of work.

    A study that several analyses take has one job per analysis and version, each with its
    own result and SR.

    A study's first analysis is version 1; an instance that arrives after it opens version 2,
    whose SR supersedes the first. ``attempts`` counts claims, so a worker killed while it
    works on the job counts as an attempt too.
    """

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    #: The analysis this job runs (:mod:`mibi_node.analyses`); versions count per analysis.
    analysis: Mapped[str] = mapped_column(
        String(32), default="parathyroid", server_default="parathyroid"
    )
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Run with the phases that are there (the wait for the missing one is over).
    partial: Mapped[bool] = mapped_column(Boolean, default=False)
    not_before: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    traceback: Mapped[str | None] = mapped_column(Text, default=None)
    #: Stage -> seconds of the last attempt: read, denoise, inference, sr.
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    #: The result as ``StudyResult.to_dict`` gives it (no pixels).
    result: Mapped[dict[str, object] | None] = mapped_column(JSON, default=None)
    bundle: Mapped[str | None] = mapped_column(String(128), default=None)
    sr_path: Mapped[str | None] = mapped_column(String(255), default=None)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    sr_series_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    #: A job of the analysis' candidate (shadow) bundle: stored and compared, never sent.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Summary of the inputs the job read (input drift; :mod:`mibi_node.validation.drift`).
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    __table_args__ = (
        UniqueConstraint(
            "study_id",
            "analysis",
            "version",
            "shadow",
            name="uq_job_study_analysis_version_shadow",
        ),
        Index("ix_job_state_not_before", "state", "not_before"),
    )

    def transition(self, new: JobState, error: str | None = None) -> None:
        """Move to ``new`` if the job state machine allows it (``error`` is kept on FAILED).

        Raises
        ------
        InvalidTransitionError
            ``new`` is not reachable from the current state.
        """
        check_job_transition(JobState(self.state), new)
        self.state = new
        if new in (JobState.DONE, JobState.FAILED):
            self.finished_at = utcnow()
            self.lease_owner = None
            self.lease_expires_at = None
        if new is JobState.FAILED:
            self.error = error
        elif new is JobState.QUEUED:
            self.lease_owner = None
            self.lease_expires_at = None


#: The claim order (:func:`mibi_node.jobs.queue.claim_jobs`): retried jobs first, then the
#: oldest; a claim reads the first rows of this index instead of sorting the whole queue.
Index("ix_job_claim", Job.state, Job.attempts.desc(), Job.id)


class Delivery(Base):
    """The sending of one job's result files to one destination."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    #: The destination as it was configured when the result was made (AE, host, port, TLS).
    destination: Mapped[dict[str, object]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(128))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    #: Storage commitment (revision 0006): whether the PACS confirmed it keeps the files.
    commitment: Mapped[CommitmentState] = mapped_column(
        Enum(CommitmentState, native_enum=False, length=16),
        default=CommitmentState.NONE,
        server_default=CommitmentState.NONE.value,
    )
    #: The N-ACTION's Transaction UID, kept across its repeats: a late report still matches.
    commit_transaction_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    #: N-ACTIONs (or C-FIND read-backs) sent for the current commitment.
    commit_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: When the commitment sweep asks (again): due now, or once the report is overdue.
    commit_due_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    committed_at: Mapped[datetime | None] = mapped_column(_UTCDateTime, default=None)
    commit_message: Mapped[str | None] = mapped_column(Text, default=None)
    #: C-STOREs sent again because the PACS reported it could not commit them (at most 1).
    commit_resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_delivery_state_next", "state", "next_attempt_at"),
        Index("ix_delivery_commitment_due", "commitment", "commit_due_at"),
    )

    def transition(self, new: DeliveryState) -> None:
        """Move to ``new`` if the delivery state machine allows it.

        Raises
        ------
        InvalidTransitionError
            ``new`` is not reachable from the current state.
        """
        check_delivery_transition(DeliveryState(self.state), new)
        self.state = new
        if new is not DeliveryState.SENDING:
            self.lease_owner = None
            self.lease_expires_at = None


class WorkerStatus(Base):
    """What each worker process last said about itself (``mibi-node status`` shows it)."""

    __tablename__ = "worker"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255), default="")
    device: Mapped[str] = mapped_column(String(32), default="")
    bundle: Mapped[str | None] = mapped_column(String(128), default=None)
    state: Mapped[str] = mapped_column(String(32), default="starting")
    message: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)


class Setting(Base):
    """Small values the node keeps across restarts (e.g. its Device Observer UID)."""

    __tablename__ = "setting"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """One line of the audit trail: an association, a study result, a delivery, an operator.

    ``kind`` is ``association``, ``result``, ``delivery``, ``operator``, ``retention``,
    ``verdict`` or ``truth``;
    ``outcome`` says how it ended (``accepted``, ``rejected``, ``done``, ``failed``, ``sent``,
    ``requeue`` ...). ``detail`` holds counts and reasons, never patient names or IDs.
    """

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128), default="")
    study_id: Mapped[int | None] = mapped_column(ForeignKey("study.id"), default=None, index=True)
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_audit_kind_at", "kind", "at"),)


class VerdictDecision(enum.StrEnum):
    """What a radiologist said of one AI finding (IHE AIRA's accept / reject / modify)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CORRECTED = "corrected"


class Verdict(Base):
    """A radiologist's verdict on one finding of one job's result.

    Verdicts are never changed or deleted: a later verdict on the same (job, finding)
    replaces the earlier one for the figures, and both stay for the record.
    """

    __tablename__ = "verdict"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"))
    #: :attr:`mibi_node.analyses.base.Finding.key`.
    finding: Mapped[str] = mapped_column(String(64))
    decision: Mapped[VerdictDecision] = mapped_column(
        Enum(VerdictDecision, native_enum=False, length=16)
    )
    #: The right value of a corrected finding (one of the finding's choices where it has any).
    value: Mapped[str | None] = mapped_column(String(128), default=None)
    reader: Mapped[str] = mapped_column(String(128))
    comment: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_verdict_job_finding", "job_id", "finding", "id"),)


class Truth(Base):
    """A study's final diagnosis for one analysis (histology, follow-up), as imported.

    Imports never overwrite: the latest imported row of a (study, analysis) counts.
    """

    __tablename__ = "truth"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"))
    analysis: Mapped[str] = mapped_column(String(32))
    diagnosis: Mapped[str] = mapped_column(String(128))
    diagnosed_on: Mapped[date] = mapped_column(Date)
    source: Mapped[str] = mapped_column(String(128), default="")
    imported_at: Mapped[datetime] = mapped_column(_UTCDateTime, default=utcnow)
    imported_by: Mapped[str] = mapped_column(String(128), default="")

    __table_args__ = (Index("ix_truth_study_analysis", "study_id", "analysis", "id"),)
