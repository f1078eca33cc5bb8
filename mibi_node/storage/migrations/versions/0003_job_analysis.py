"""A job is a study version x an analysis: the ``job.analysis`` column.

Every job made before analyses were units was a parathyroid MIBI analysis, so the column's
default fills them in as ``parathyroid``. A study's versions are now counted per analysis:
the unique constraint (study, version) becomes (study, analysis, version). SQLite cannot
alter a constraint, so the table is rebuilt there (Alembic's batch mode); PostgreSQL alters
it in place.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(
            sa.Column("analysis", sa.String(32), nullable=False, server_default="parathyroid")
        )
        batch.drop_constraint("uq_job_study_version", type_="unique")
        batch.create_unique_constraint(
            "uq_job_study_analysis_version", ["study_id", "analysis", "version"]
        )


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint("uq_job_study_analysis_version", type_="unique")
        batch.create_unique_constraint("uq_job_study_version", ["study_id", "version"])
        batch.drop_column("analysis")
