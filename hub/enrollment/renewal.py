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
- Over MQTT, :class:`RenewalHandler` serves ``$share/<group>/.../+/cert_req`` on
  the link's session (only when the hub holds the fleet CA): each request is
  answered on the device's ``cert`` topic, one at a time, and acknowledged once
  the answer went out. A request that breaks the contract (bad topic, bad body, a
  body naming another device than its topic) is rejected, counted and logged,
  and gets no answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlmodel import Session, col, select

import protocols
from hub.context import Clock
from hub.db import begin_write, new_session
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate
from hub.enrollment.store import record_certificate
from hub.identity import CertificateAuthority, IdentityError, proven_certificate
from hub.metrics import Renewal
from hub.mqtt.session import Incoming, MqttSession, Publish
from hub.settings import HubSettings
from hub.stats import LinkStats
from protocols import CertIssued, CertRequest, Channel, renewal_proof_bytes
from protocols.topics import shared_subscription

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


class RenewalHandler:
    """Answers devices' ``cert_req`` messages (see the module rules)."""

    def __init__(
        self,
        *,
        engine: Engine,
        ca: CertificateAuthority,
        settings: HubSettings,
        stats: LinkStats,
        clock: Clock,
    ) -> None:
        self._engine = engine
        self._ca = ca
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._send: Publish | None = None

    def subscriptions(self) -> list[str]:
        return [shared_subscription(self._settings.mqtt_shared_group, Channel.CERT_REQ)]

    def attach(self, session: MqttSession) -> None:
        self._send = session.publish
        session.route(self.subscriptions(), self.handle)

    async def handle(self, batch: Sequence[Incoming]) -> None:
        """Answer each request in order; returns once every answer went out."""
        for message in batch:
            await self._renew(message)

    async def _renew(self, message: Incoming) -> None:
        assert self._send is not None
        topic_name = message.topic
        self._stats.received["total"] += 1
        self._stats.received[Channel.CERT_REQ.value] += 1
        try:
            device_id, _ = protocols.parse_topic(topic_name)
            request = protocols.decode(message.payload, CertRequest)
            if request.device_id != device_id:
                raise protocols.ProtocolError(
                    protocols.Reason.DEVICE_MISMATCH,
                    f"body names {request.device_id!r} on {device_id!r}'s topic",
                )
        except protocols.ProtocolError as exc:
            self._stats.reject(topic_name, None, exc.reason.value, exc.detail)
            return
        answer = await asyncio.to_thread(self._renew_sync, request)
        outcome = Renewal.REFUSED if answer.error is not None else Renewal.GRANTED
        self._stats.renewals[outcome.value] += 1
        await self._send(protocols.topic(device_id, Channel.CERT), protocols.encode(answer))

    def _renew_sync(self, request: CertRequest) -> CertIssued:
        s = self._settings
        with new_session(self._engine) as session:
            return renew(
                session,
                self._ca,
                request=request,
                now=self._clock(),
                validity_days=s.device_cert_validity_days,
                min_interval_s=s.cert_renew_min_interval_s,
            )
