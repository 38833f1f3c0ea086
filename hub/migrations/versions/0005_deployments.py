"""Deployments, placement decisions, device events, layered documents.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Issue 14: operators declare deployments (``deployment``); the placement
controller stores what it decided (``deployment_instance``, ``unplaced``, the
device's ``assignments`` and ``contributions``) and each device's history
(``device_event``). A device's own document moves to ``manual_config`` (the
base layer); ``desired_config`` becomes the merged result, equal to it for every
existing device. ``online_changed_at`` lets failover count continuous absence.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hub.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "deployment_instance",
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("idx", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("placed_at", sa.Float(), nullable=True),
        sa.Column("original_device_id", sa.String(64), nullable=True),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(512), nullable=True),
    )
    op.create_table(
        "unplaced",
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
    )
    op.create_table(
        "device_event",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("deployment", sa.String(63), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.String(1024), nullable=False),
    )
    op.create_index("ix_device_event_device_id", "device_event", ["device_id"])
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("manual_config", sa.JSON(), nullable=False, server_default="{}")
        )
        batch_op.add_column(
            sa.Column("assignments", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(
            sa.Column("contributions", sa.JSON(), nullable=False, server_default="{}")
        )
        batch_op.add_column(
            sa.Column("events_generation", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("online_changed_at", UTCDateTime(), nullable=True))
    op.execute("UPDATE device SET manual_config = desired_config")


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("online_changed_at")
        batch_op.drop_column("events_generation")
        batch_op.drop_column("contributions")
        batch_op.drop_column("assignments")
        batch_op.drop_column("manual_config")
    op.drop_index("ix_device_event_device_id", table_name="device_event")
    op.drop_table("device_event")
    op.drop_table("unplaced")
    op.drop_table("deployment_instance")
    op.drop_table("deployment")
