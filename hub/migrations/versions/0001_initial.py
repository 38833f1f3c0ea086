"""The schema as the hub created it before migrations existed (commit 1f12664).

Revision ID: 0001
Revises: -
Create Date: 2026-12-06

A database that ``create_all`` made before this revision existed has these tables
and no ``alembic_version``; :func:`hub.db.migrate` recognises it and stamps it
here (or at 0002) instead of creating anything.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_token",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=True),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    op.create_table(
        "bundle",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("security_version", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("payload_size", sa.BigInteger(), nullable=False),
        sa.Column("payload_offset", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.BigInteger(), nullable=False),
        sa.Column("signer_keyids", sa.JSON(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("uploaded_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_bundle_name"), ["name"], unique=False)

    op.create_table(
        "device",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("desired_generation", sa.BigInteger(), nullable=False),
        sa.Column("desired_config", sa.JSON(), nullable=False),
        sa.Column("desired_updated_at", sa.DateTime(), nullable=True),
        sa.Column("desired_seq", sa.BigInteger(), nullable=False),
        sa.Column("reported_generation", sa.BigInteger(), nullable=False),
        sa.Column("failed_generation", sa.BigInteger(), nullable=False),
        sa.Column("report_phase", sa.String(length=16), nullable=True),
        sa.Column("report_error", sa.String(length=2048), nullable=True),
        sa.Column("report_generation", sa.BigInteger(), nullable=False),
        sa.Column("last_report_epoch", sa.BigInteger(), nullable=False),
        sa.Column("last_report_seq", sa.BigInteger(), nullable=False),
        sa.Column("session", sa.BigInteger(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("inventory", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_desired_seq"), ["desired_seq"], unique=False)

    op.create_table(
        "device_certificate",
        sa.Column("serial", sa.String(length=48), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("not_after", sa.DateTime(), nullable=False),
        sa.Column("issued_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    with op.batch_alter_table("device_certificate", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_device_certificate_device_id"), ["device_id"], unique=False
        )

    op.create_table(
        "device_deletion",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    with op.batch_alter_table("device_deletion", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_device_deletion_device_id"), ["device_id"], unique=False
        )

    op.create_table(
        "enrollment_token",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("uses_left", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )


def downgrade() -> None:
    op.drop_table("enrollment_token")
    with op.batch_alter_table("device_deletion", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_deletion_device_id"))

    op.drop_table("device_deletion")
    with op.batch_alter_table("device_certificate", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_certificate_device_id"))

    op.drop_table("device_certificate")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_desired_seq"))

    op.drop_table("device")
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundle_name"))

    op.drop_table("bundle")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))

    op.drop_table("audit_log")
    op.drop_table("api_token")
