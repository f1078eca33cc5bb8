"""Local validation, second part (issue 19): the camera and accession number on the study
row, shadow jobs, and each job's input summary.

* ``study``: ``accession_number``, ``station_name``, ``manufacturer_model_name`` and
  ``device_serial_number``, recorded at reception from the first image instance that has
  them (so performance per camera and input drift survive the retention sweep). Studies
  received before this revision keep them empty; performance then reads the stored headers.
* ``job.shadow``: a job of a candidate (shadow) bundle, run beside the current one on the
  same study version; its results are stored and compared, never sent. Versions stay
  counted per analysis, so the unique constraint becomes (study, analysis, version,
  shadow): rebuilt on SQLite (Alembic's batch mode), altered in place on PostgreSQL.
* ``job.inputs``: the summary of what the job read (matrix, pixel size, counts, intensity
  histogram, acquisition parameters) that input drift is measured on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_STATION = ("station_name", "manufacturer_model_name", "device_serial_number")


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(
            sa.Column("accession_number", sa.String(16), nullable=False, server_default="")
        )
        for name in _STATION:
            batch.add_column(sa.Column(name, sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("job") as batch:
        batch.add_column(
            sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("inputs", sa.JSON(), nullable=True))
        batch.drop_constraint("uq_job_study_analysis_version", type_="unique")
        batch.create_unique_constraint(
            "uq_job_study_analysis_version_shadow", ["study_id", "analysis", "version", "shadow"]
        )


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint("uq_job_study_analysis_version_shadow", type_="unique")
        batch.create_unique_constraint(
            "uq_job_study_analysis_version", ["study_id", "analysis", "version"]
        )
        batch.drop_column("inputs")
        batch.drop_column("shadow")
    with op.batch_alter_table("study") as batch:
        for name in reversed(_STATION):
            batch.drop_column(name)
        batch.drop_column("accession_number")
