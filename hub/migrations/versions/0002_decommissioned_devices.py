"""Decommissioned devices stay visible; the broker's cut-off; a re-enrolled unit's wait.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

Issue 10: ``decommissioned_at`` (the row stays, refused, until purged),
``cut_off_at`` (when the broker confirmed the live connections closed) and
``awaiting_birth`` (a re-enrolled id counts nothing until its new unit's birth).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decommissioned_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("cut_off_at", sa.DateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("awaiting_birth", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("awaiting_birth")
        batch_op.drop_column("cut_off_at")
        batch_op.drop_column("decommissioned_at")
