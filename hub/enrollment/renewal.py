"""Certificate renewal over MQTT: a device sends a CSR for a new key, the hub answers.

Rules:
- The broker authenticates the request: only the device itself may publish on
  its ``cert_req`` topic (the ACL, with the certificate's name as MQTT user).
  The hub still checks the body names the topic's device.
- Refused with an answer saying why, nothing issued, when: the device is not
  registered; it holds no unrevoked, unexpired certificate (never enrolled, or
  decommissioned); the CSR does not name it or is not self-signed; or it was
  issued one less than ``min_interval_s`` ago, so a stolen device cannot make
  the CA mint certificates in a loop.
- Issued as at enrollment (CN = device id, client authentication only) and
  recorded. Older certificates stay valid until they expire: the overlap lets
  a device that missed the answer keep working and ask again.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlmodel import Session, col, select

from hub.db import begin_write
from hub.enrollment.models import DeviceCertificate
from hub.enrollment.store import record_certificate
from hub.identity import CertificateAuthority, IdentityError
from hub.models import Device
from protocols import CertIssued, CertRequest

log = logging.getLogger(__name__)


class RenewalRefused(Exception):
    """Why a renewal was not granted; the text goes back to the device."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def renew(
    session: Session,
    ca: CertificateAuthority,
    *,
    request: CertRequest,
    now: dt.datetime,
    validity_days: int,
    min_interval_s: float,
) -> CertIssued:
    """Issue a certificate for the CSR in ``request``, or answer why not."""
    device_id = request.device_id
    try:
        pem = _issue(session, ca, request, now, validity_days, min_interval_s)
    except RenewalRefused as exc:
        session.rollback()
        log.warning("renewal refused", extra={"device": device_id, "error": str(exc)})
        return CertIssued(
            device_id=device_id,
            request_id=request.request_id,
            error=str(exc),
            retry_after_s=exc.retry_after_s,
            ts=now.timestamp(),
        )
    log.info("certificate renewed", extra={"device": device_id})
    return CertIssued(
        device_id=device_id,
        request_id=request.request_id,
        certificate_pem=pem,
        ts=now.timestamp(),
    )


def _issue(
    session: Session,
    ca: CertificateAuthority,
    request: CertRequest,
    now: dt.datetime,
    validity_days: int,
    min_interval_s: float,
) -> str:
    device_id = request.device_id
    begin_write(session)
    if session.get(Device, device_id) is None:
        raise RenewalRefused(f"device {device_id!r} is not registered")
    certificates = session.exec(
        select(DeviceCertificate).where(col(DeviceCertificate.device_id) == device_id)
    ).all()
    current = [c for c in certificates if c.revoked_at is None and c.not_after > now]
    if not current:
        raise RenewalRefused("no valid certificate to renew (enroll again)")
    newest = max(c.issued_at for c in certificates)
    elapsed_s = (now - newest).total_seconds()
    if elapsed_s < min_interval_s:
        raise RenewalRefused(
            f"a certificate was issued {int(elapsed_s)} s ago; "
            f"renewals are at most one per {int(min_interval_s)} s",
            retry_after_s=round(min_interval_s - elapsed_s, 3),
        )
    try:
        issued = ca.issue_from_csr(
            request.csr_pem.encode(), device_id=device_id, now=now, validity_days=validity_days
        )
    except IdentityError as exc:
        raise RenewalRefused(f"CSR refused: {exc}") from None
    record_certificate(session, device_id=device_id, issued=issued, now=now)
    session.commit()
    return issued.pem.decode()
