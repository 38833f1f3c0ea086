"""Rollouts, one-shot jobs, maintenance windows and schedules, liveness and soak.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Issue 15: a deployment change rolls out in stages (``rollout``, one row per
change, and ``rollout_device``, each touched device's progress and outcome);
jobs are queued per device (``job``, ``job_device``); recurring maintenance
windows and start times are schedules (``schedule``) whose every fire is
recorded once (``schedule_fire``, unique per schedule and fire time). Devices
gain the heartbeat interval their birth announced, the soak's health evidence
(``healthy_since``, ``healthy_reports``, ``unhealthy_at`` for the applied
generation) and the generation they staged (downloaded and verified, not
switched).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hub.db import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("deployment", sa.String(63), nullable=False),
        sa.Column("from_version", sa.BigInteger(), nullable=True),
        sa.Column("to_version", sa.BigInteger(), nullable=False),
        sa.Column("from_spec", sa.JSON(), nullable=True),
        sa.Column("to_spec", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("waves", sa.JSON(), nullable=False),
        sa.Column("promoted", sa.Integer(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("accepted_failures", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("wave_started_at", UTCDateTime(), nullable=True),
        sa.Column("progress_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("start_at", UTCDateTime(), nullable=True),
        sa.Column("activate_at", UTCDateTime(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_rollout_deployment", "rollout", ["deployment"])
    op.create_index("ix_rollout_state", "rollout", ["state"])
    op.create_table(
        "rollout_device",
        sa.Column("rollout_id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("handed_out_at", UTCDateTime(), nullable=True),
        sa.Column("staged_at", UTCDateTime(), nullable=True),
        sa.Column("outcome_at", UTCDateTime(), nullable=True),
        sa.Column("detail", sa.String(512), nullable=False),
    )
    op.create_table(
        "job",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("command", sa.JSON(), nullable=False),
        sa.Column("deadline_s", sa.Float(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("idempotent", sa.Boolean(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("selector", sa.String(1024), nullable=True),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(512), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("canceled_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "job_device",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("handed_out_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("message", sa.String(256), nullable=True),
        sa.Column("log_tail", sa.String(4096), nullable=True),
    )
    op.create_index("ix_job_device_device_id", "job_device", ["device_id"])
    op.create_table(
        "schedule",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("cron", sa.String(128), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("timezone", sa.String(128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "schedule_fire",
        sa.Column("schedule", sa.String(63), primary_key=True),
        sa.Column("fire_time", UTCDateTime(), primary_key=True),
        sa.Column("zone", sa.String(64), primary_key=True),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("heartbeat_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("healthy_since", UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("healthy_reports", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("unhealthy_at", UTCDateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("staged_generation", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("staged_generation")
        batch_op.drop_column("unhealthy_at")
        batch_op.drop_column("healthy_reports")
        batch_op.drop_column("healthy_since")
        batch_op.drop_column("heartbeat_s")
    op.drop_table("schedule_fire")
    op.drop_table("schedule")
    op.drop_index("ix_job_device_device_id", table_name="job_device")
    op.drop_table("job_device")
    op.drop_table("job")
    op.drop_table("rollout_device")
    op.drop_index("ix_rollout_state", table_name="rollout")
    op.drop_index("ix_rollout_deployment", table_name="rollout")
    op.drop_table("rollout")
