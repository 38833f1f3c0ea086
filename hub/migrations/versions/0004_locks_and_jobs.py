"""Update locks and one-shot job states from reports.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Issue 13, items 4 and 8: the agent reports who holds which update lock
(``Reported.locks``) and each one-shot job's progress and result
(``Reported.jobs``); the hub keeps the newest lock list and the last state per
job id on the device row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("locks", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("jobs", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("jobs")
        batch_op.drop_column("locks")
