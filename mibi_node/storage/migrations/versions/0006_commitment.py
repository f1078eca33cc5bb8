"""Storage commitment (issue 20): whether the PACS confirmed that it keeps each delivery.

* ``delivery.commitment``: NONE, PENDING, COMMITTED, FAILED or UNCONFIRMED (see
  ``CommitmentState``). Deliveries made before this revision are NONE: they were never
  asked about, and nothing asks about them now.
* ``delivery.commit_transaction_uid``: the Transaction UID of the N-ACTION, indexed: the
  N-EVENT-REPORT names only that.
* ``delivery.commit_attempts``, ``commit_due_at``: the N-ACTIONs sent for the current
  commitment, and when the commitment sweep asks (again); indexed with ``commitment``.
* ``delivery.committed_at``, ``commit_message``, ``commit_resends``: when the PACS
  committed, what it said last, and how often the files were stored again because it
  reported failures.

Added in place on both SQLite and PostgreSQL (Alembic's batch mode, as 0005).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(
            sa.Column("commitment", sa.String(16), nullable=False, server_default="NONE")
        )
        batch.add_column(sa.Column("commit_transaction_uid", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("commit_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("commit_due_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("commit_message", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("commit_resends", sa.Integer(), nullable=False, server_default="0")
        )
        batch.create_index("ix_delivery_commit_transaction_uid", ["commit_transaction_uid"])
        batch.create_index("ix_delivery_commitment_due", ["commitment", "commit_due_at"])


def downgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.drop_index("ix_delivery_commitment_due")
        batch.drop_index("ix_delivery_commit_transaction_uid")
        for name in (
            "commit_resends",
            "commit_message",
            "committed_at",
            "commit_due_at",
            "commit_attempts",
            "commit_transaction_uid",
            "commitment",
        ):
            batch.drop_column(name)
