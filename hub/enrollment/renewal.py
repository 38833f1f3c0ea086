"""Certificate renewal over MQTT: a device sends a CSR for a new key, the hub answers.

Rules:
- Proof of possession, not the topic, authenticates the request: it carries the
  device's current certificate and a signature by that certificate's key over
  the request (:func:`protocols.renewal_proof_bytes`). The certificate must be
  from the fleet CA, name the device, and be one of the device's certificates
  on record, not revoked, not expired. So a request that merely arrives on a
  device's ``cert_req`` topic (the broker's ACL lets only the device and the
  hub's identities publish there) gets nothing for its sender's key.
- Refused with an answer saying why, nothing issued, when: the device is not
  registered or is decommissioned; the proof is missing or fails any check
  above; the CSR does not name the device or is not self-signed; or a
  certificate was issued one less than ``min_interval_s`` ago, so a stolen
  device cannot make the CA mint certificates in a loop.
- Issued as at enrollment (CN = device id, client authentication only) and
  recorded. Older certificates stay valid until they expire: the overlap lets
  a device that missed the answer keep working and ask again.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlmodel import Session, col, select

from hub.db import begin_write
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate
from hub.enrollment.store import record_certificate
from hub.identity import CertificateAuthority, IdentityError, proven_certificate
from protocols import CertIssued, CertRequest, renewal_proof_bytes

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
    device = session.get(Device, device_id)
    if device is None:
        raise RenewalRefused(f"device {device_id!r} is not registered")
    if device.decommissioned_at is not None:
        raise RenewalRefused(f"device {device_id!r} is decommissioned")
    if request.certificate_pem is None or request.proof is None:
        raise RenewalRefused(
            "no proof of possession: a renewal carries the current certificate and a "
            "signature by its key (update the agent, or enroll again)"
        )
    message = renewal_proof_bytes(device_id, request.request_id, request.csr_pem)
    try:
        presented = proven_certificate(
            ca,
            certificate_pem=request.certificate_pem,
            device_id=device_id,
            message=message,
            proof=request.proof,
        )
    except IdentityError as exc:
        raise RenewalRefused(f"proof of possession refused: {exc}") from None
    certificates = session.exec(
        select(DeviceCertificate).where(col(DeviceCertificate.device_id) == device_id)
    ).all()
    serial = format(presented.serial_number, "x")
    record = next((c for c in certificates if c.serial == serial), None)
    if record is None or record.revoked_at is not None or record.not_after <= now:
        raise RenewalRefused(
            "proof of possession refused: the presented certificate is not a current "
            f"certificate of {device_id!r} (revoked, expired or not on record; enroll again)"
        )
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
