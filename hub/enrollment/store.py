"""Data access for enrollment (see the package rules). Keyword-only; raises domain errors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

import protocols
from hub.db import begin_write
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate, EnrollmentToken
from hub.identity import CertificateAuthority, IdentityError, Issued, new_token


class EnrollmentRefused(Exception):
    """The token or the CSR does not allow this enrollment; the reason is safe to show."""


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session,
    *,
    device_id: str | None,
    uses: int,
    expires_at: datetime,
    labels: Mapping[str, str],
    now: datetime,
) -> tuple[str, EnrollmentToken]:
    """Create a token and return ``(secret, row)``; the secret is not stored."""
    if device_id is not None:
        protocols.validate_device_id(device_id)
        uses = 1
    if uses < 1:
        raise ValueError("a token needs at least one use")
    if expires_at <= now:
        raise ValueError("a token must expire in the future")
    secret = new_token()
    row = EnrollmentToken(
        token_hash=token_hash(secret),
        device_id=device_id,
        uses_left=uses,
        expires_at=expires_at,
        labels=dict(labels),
        created_at=now,
    )
    begin_write(session)
    session.add(row)
    session.commit()
    return secret, row


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    certificate: Issued
    created_device: bool
    reactivated: bool = False  # a decommissioned id enrolled again (a desired change)


def redeem(
    session: Session,
    *,
    secret: str,
    device_id: str,
    csr_pem: bytes,
    ca: CertificateAuthority,
    now: datetime,
    require_cut_off: bool = True,
) -> Enrolled:
    """Enroll ``device_id`` with its CSR; raises EnrollmentRefused (nothing consumed then).

    A decommissioned id enrolled again is a replacement unit: the row is reactivated
    (:func:`hub.devices.store.reactivate_for_enrollment`), once the broker confirmed the old
    unit's connections closed (else CutOffPending, nothing consumed) when
    ``require_cut_off``.
    """
    if not protocols.is_valid_device_id(device_id):
        raise EnrollmentRefused(f"device id {device_id[:80]!r} is not valid")
    begin_write(session)
    try:
        token = session.get(EnrollmentToken, token_hash(secret))
        if token is None:
            raise EnrollmentRefused("unknown enrollment token")
        if token.expires_at <= now:
            raise EnrollmentRefused("enrollment token has expired")
        if token.uses_left <= 0:
            raise EnrollmentRefused("enrollment token has been used up")
        if token.device_id is not None and token.device_id != device_id:
            raise EnrollmentRefused("enrollment token is for another device")
        try:
            issued = ca.issue_from_csr(csr_pem, device_id=device_id, now=now)
        except IdentityError as exc:
            raise EnrollmentRefused(f"CSR refused: {exc}") from None
        token.uses_left -= 1
        session.add(token)
        existing = session.get(Device, device_id)
        created = existing is None
        reactivated = False
        if existing is None:
            session.add(Device(id=device_id, labels=dict(token.labels), created_at=now))
        elif existing.decommissioned_at is not None:
            from hub.devices.store import reactivate_for_enrollment

            reactivate_for_enrollment(session, existing, now=now, require_cut_off=require_cut_off)
            reactivated = True
        record_certificate(session, device_id=device_id, issued=issued, now=now)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return Enrolled(
        device_id=device_id,
        certificate=issued,
        created_device=created,
        reactivated=reactivated,
    )


def record_certificate(session: Session, *, device_id: str, issued: Issued, now: datetime) -> None:
    """Add the row for a certificate the CA issued (the caller commits)."""
    session.add(
        DeviceCertificate(
            serial=format(issued.serial, "x"),
            device_id=device_id,
            not_after=issued.not_after,
            issued_at=now,
        )
    )


def revoked(session: Session) -> list[tuple[int, datetime]]:
    """Every revoked serial with its time, for the CRL."""
    rows = session.exec(
        select(DeviceCertificate).where(col(DeviceCertificate.revoked_at).is_not(None))
    ).all()
    return [(int(row.serial, 16), row.revoked_at) for row in rows if row.revoked_at is not None]


def cut_off_devices(session: Session) -> list[str]:
    """Ids whose certificates are all revoked: the broker's ACL denies them everything."""
    rows = session.exec(select(DeviceCertificate.device_id, DeviceCertificate.revoked_at)).all()
    revoked: set[str] = set()
    valid: set[str] = set()
    for device_id, revoked_at in rows:
        (revoked if revoked_at is not None else valid).add(device_id)
    return sorted(revoked - valid)


def was_revoked(session: Session, device_id: str) -> bool:
    """Whether ``device_id`` has had a certificate revoked (decommissioned before)."""
    row = session.exec(
        select(DeviceCertificate.serial)
        .where(col(DeviceCertificate.device_id) == device_id)
        .where(col(DeviceCertificate.revoked_at).is_not(None))
        .limit(1)
    ).first()
    return row is not None
