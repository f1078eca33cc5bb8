"""Baseline: every table as ``create_all`` made it before the node had migrations.

A database made by ``create_all`` before migrations existed may hold some of these tables
already (all of them, or all but ``audit_event``); :mod:`mibi_node.storage.schema` checks
their columns first, and this revision creates only the tables that are missing.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _study() -> None:
    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("modalities", sa.String(64), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=True),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        _time("first_received_at"),
        _time("last_received_at"),
        _time("state_changed_at"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_instance_uid"),
    )
    op.create_index("ix_study_state_last", "study", ["state", "last_received_at"])


def _instance() -> None:
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        _time("received_at"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_instance_study_id", "instance", ["study_id"])


def _job() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("partial", sa.Boolean(), nullable=False),
        _time("not_before", nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _time("lease_expires_at", nullable=True),
        _time("created_at"),
        _time("started_at", nullable=True),
        _time("finished_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("bundle", sa.String(128), nullable=True),
        sa.Column("sr_path", sa.String(255), nullable=True),
        sa.Column("sr_sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("sr_series_instance_uid", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "version", name="uq_job_study_version"),
    )
    op.create_index("ix_job_state_not_before", "job", ["state", "not_before"])
    op.create_index("ix_job_study_id", "job", ["study_id"])


def _delivery() -> None:
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _time("next_attempt_at"),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _time("lease_expires_at", nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_message", sa.Text(), nullable=True),
        _time("created_at"),
        _time("delivered_at", nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_delivery_job_id", "delivery", ["job_id"])
    op.create_index("ix_delivery_state_next", "delivery", ["state", "next_attempt_at"])


def _worker() -> None:
    op.create_table(
        "worker",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("bundle", sa.String(128), nullable=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        _time("started_at"),
        _time("heartbeat_at"),
        sa.PrimaryKeyConstraint("name"),
    )


def _setting() -> None:
    op.create_table(
        "setting",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def _audit_event() -> None:
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        _time("at"),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_event_at", "audit_event", ["at"])
    op.create_index("ix_audit_event_study_id", "audit_event", ["study_id"])
    op.create_index("ix_audit_kind_at", "audit_event", ["kind", "at"])


#: In an order that creates every table after those its foreign keys name.
TABLES: dict[str, Callable[[], None]] = {
    "study": _study,
    "instance": _instance,
    "job": _job,
    "delivery": _delivery,
    "worker": _worker,
    "setting": _setting,
    "audit_event": _audit_event,
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES.items():
        if name not in existing:
            create()


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
