"""Data access for API tokens and the audit log. Keyword-only; raises domain errors."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from hub.auth.models import ApiToken, AuditEntry, Role
from hub.db import begin_write
from hub.identity import new_token

TOKEN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}"


class TokenNameTaken(Exception):
    """Another token already has this name."""


class TokenNotFound(Exception):
    """No token has this name."""


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, *, name: str, role: Role, now: datetime) -> str:
    """Create a token and return its secret (shown once; only the hash is kept)."""
    if re.fullmatch(TOKEN_NAME_PATTERN, name) is None:
        raise ValueError(f"token name {name[:80]!r} must match {TOKEN_NAME_PATTERN}")
    begin_write(session)
    if session.exec(select(ApiToken).where(ApiToken.name == name)).first() is not None:
        session.rollback()
        raise TokenNameTaken(name)
    secret = new_token()
    session.add(ApiToken(token_hash=token_hash(secret), name=name, role=role.name, created_at=now))
    session.commit()
    return secret


def authenticate(session: Session, *, secret: str) -> ApiToken | None:
    """The live token for ``secret``, or None (unknown or revoked)."""
    row = session.get(ApiToken, token_hash(secret))
    if row is None or row.revoked_at is not None:
        return None
    return row


def revoke_token(session: Session, *, name: str, now: datetime) -> ApiToken:
    begin_write(session)
    row = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if row is None:
        session.rollback()
        raise TokenNotFound(name)
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
    session.commit()
    return row


def list_tokens(session: Session) -> Sequence[ApiToken]:
    return session.exec(select(ApiToken).order_by(col(ApiToken.name))).all()


def record(session: Session, *, entry: AuditEntry) -> None:
    begin_write(session)
    session.add(entry)
    session.commit()


def audit_page(session: Session, *, limit: int, offset: int) -> tuple[Sequence[AuditEntry], int]:
    """Newest first."""
    total = session.exec(select(func.count()).select_from(AuditEntry)).one()
    rows = session.exec(
        select(AuditEntry).order_by(col(AuditEntry.id).desc()).offset(offset).limit(limit)
    ).all()
    return rows, int(total)
