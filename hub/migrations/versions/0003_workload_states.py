"""Per-workload states from reports, and the device outbox's drop count from births.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Issue 12: the agent reports each workload's state (``Reported.workloads``) and how
many events its bounded outbox had to drop (``Birth.events_dropped``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("workloads", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("events_dropped", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("events_dropped")
        batch_op.drop_column("workloads")
