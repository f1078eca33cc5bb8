"""Local validation (issue 19): radiologists' verdicts on findings and final diagnoses.

Two new tables, nothing changed in the others: ``verdict`` (one row per verdict on one
finding of one job; the latest per job and finding counts) and ``truth`` (one row per
imported final diagnosis of a study for one analysis; the latest counts).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verdict",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("job.id"), nullable=False),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("value", sa.String(128), nullable=True),
        sa.Column("reader", sa.String(128), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_verdict_job_finding", "verdict", ["job_id", "finding", "id"])
    op.create_table(
        "truth",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("study.id"), nullable=False),
        sa.Column("analysis", sa.String(32), nullable=False),
        sa.Column("diagnosis", sa.String(128), nullable=False),
        sa.Column("diagnosed_on", sa.Date(), nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("imported_by", sa.String(128), nullable=False),
    )
    op.create_index("ix_truth_study_analysis", "truth", ["study_id", "analysis", "id"])


def downgrade() -> None:
    op.drop_index("ix_truth_study_analysis", table_name="truth")
    op.drop_table("truth")
    op.drop_index("ix_verdict_job_finding", table_name="verdict")
    op.drop_table("verdict")
