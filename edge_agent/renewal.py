"""Certificate renewal over MQTT: a new key, a CSR on ``cert_req``, the answer on ``cert``.

Rules:
- Due when ``renew_at_fraction`` of the certificate's lifetime has passed
  (two thirds by default): the old certificate is still valid for a third of
  its life, so a device that is offline for a while, or misses an answer,
  has time to ask again (every ``retry_s``, or when the hub's refusal says).
- The new key is made on the device (``identity/device.key.next``, 0600) and
  reused by every retry until a certificate for it arrives; only a CSR leaves,
  with the current certificate and the current key's signature over the request
  (:func:`protocols.renewal_proof_bytes`): the hub renews only for the holder of
  the current key.
- An answer is taken only if it is for the request in flight, for this
  device's id and the new key, and signed by the fleet CA the device already
  trusts; anything else is logged and changes nothing.
- Switching is crash-safe: the certificate is written as ``device.crt.next``,
  then the key and then the certificate are renamed into place;
  :meth:`Renewal.recover` at start finishes a switch a crash interrupted, so
  ``device.key`` and ``device.crt`` always end up a pair.
- The certificate's dates are looked at without ``cryptography``
  (:mod:`plumbing.certinfo`); the new key, the CSR and the checks of an answer
  load it, so an agent pays its ~8 MB only once a renewal is due.
- After a switch the driver reconnects with the new pair (a clean reconnect:
  the persistent session keeps everything queued).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.enroll import Identity
from edge_agent.store import atomic_write_bytes
from plumbing.certinfo import read_pem_certificate
from protocols import (
    CertIssued,
    CertRequest,
    Channel,
    ProtocolError,
    decode,
    encode,
    renewal_proof_bytes,
    topic,
)

log = logging.getLogger("driftless.agent")

DEFAULT_RENEW_AT_FRACTION = 2 / 3
DEFAULT_RETRY_S = 3600.0


def renewal_due(not_before: float, not_after: float, now: float, at_fraction: float) -> bool:
    """Pure: whether ``at_fraction`` of the lifetime ``[not_before, not_after]`` has passed."""
    return now >= not_before + (not_after - not_before) * at_fraction


@dataclass
class Renewal:
    """One device's renewal state; driven from the network thread."""

    identity: Identity
    device_id: str
    publish: Callable[[str, bytes], object]
    at_fraction: float = DEFAULT_RENEW_AT_FRACTION
    retry_s: float = DEFAULT_RETRY_S
    clock: Callable[[], float] = time.time
    check_s: float = 60.0  # how often the certificate's dates are looked at
    _pending: int | None = None
    _next_at: float = float("-inf")  # nothing to do before this time

    @property
    def next_key(self) -> Path:
        return self.identity.directory / "device.key.next"

    @property
    def next_cert(self) -> Path:
        return self.identity.directory / "device.crt.next"

    def recover(self) -> None:
        """Finish a switch a crash interrupted, or drop its leftovers."""
        if not self.next_cert.exists():
            return
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        from edge_agent.identity import load_key, public_key_der

        cert_key = x509.load_pem_x509_certificate(self.next_cert.read_bytes()).public_key()
        for key_path in (self.identity.key, self.next_key):
            key = load_key(key_path)
            if (
                key is not None
                and isinstance(cert_key, ec.EllipticCurvePublicKey)
                and public_key_der(key) == public_key_der(cert_key)
            ):
                if key_path == self.next_key:
                    os.replace(self.next_key, self.identity.key)
                os.replace(self.next_cert, self.identity.cert)
                log.info(
                    "certificate switch finished after a restart", extra={"device": self.device_id}
                )
                return
        self.next_cert.unlink()

    def maybe_request(self) -> bool:
        """Send a CertRequest if one is due and none is in flight; True if sent.

        Reads the certificate's dates without ``cryptography`` (loaded only once
        a renewal is due); raises ValueError for a certificate it cannot read."""
        now = self.clock()
        if now < self._next_at or not self.identity.enrolled():
            return False
        cert = read_pem_certificate(self.identity.cert.read_bytes())
        if not renewal_due(cert.not_before, cert.not_after, now, self.at_fraction):
            self._next_at = now + self.check_s
            return False
        from edge_agent.identity import load_or_create_key, make_csr, sign_proof

        key = load_or_create_key(self.next_key)
        request_id = max(1, int(now * 1000))
        csr_pem = make_csr(key, self.device_id).decode()
        proof = sign_proof(
            self.identity.key, renewal_proof_bytes(self.device_id, request_id, csr_pem)
        )
        self._pending = request_id
        self._next_at = now + self.retry_s  # unless an answer comes first
        request = CertRequest(
            device_id=self.device_id,
            request_id=request_id,
            csr_pem=csr_pem,
            certificate_pem=self.identity.cert.read_text(),
            proof=proof,
            ts=now,
        )
        self.publish(topic(self.device_id, Channel.CERT_REQ), encode(request))
        log.info(
            "certificate renewal requested",
            extra={
                "device": self.device_id,
                "not_after": dt.datetime.fromtimestamp(cert.not_after, dt.UTC).isoformat(),
            },
        )
        return True

    def on_answer(self, payload: bytes) -> bool:
        """Take a CertIssued; True when the new certificate is in place (reconnect now)."""
        try:
            answer = decode(payload, CertIssued)
        except ProtocolError as exc:
            log.warning(
                "renewal answer rejected", extra={"device": self.device_id, "error": str(exc)}
            )
            return False
        if answer.device_id != self.device_id or answer.request_id != self._pending:
            log.warning(
                "renewal answer ignored: not for the request in flight",
                extra={"device": self.device_id, "request_id": answer.request_id},
            )
            return False
        if answer.certificate_pem is None:
            retry_in_s = self.retry_s
            if answer.retry_after_s is not None:  # the hub says when asking again can work
                retry_in_s = min(self.retry_s, answer.retry_after_s)
            self._next_at = self.clock() + retry_in_s
            log.warning(
                "renewal refused by the hub",
                extra={"device": self.device_id, "error": answer.error, "retry_in_s": retry_in_s},
            )
            self._pending = None
            return False
        try:
            self._check(answer.certificate_pem.encode())
        except ValueError as exc:
            log.warning(
                "renewal answer rejected", extra={"device": self.device_id, "error": str(exc)}
            )
            return False
        atomic_write_bytes(self.next_cert, answer.certificate_pem.encode())
        os.replace(self.next_key, self.identity.key)
        os.replace(self.next_cert, self.identity.cert)
        self._pending = None
        self._next_at = float("-inf")  # the next one is due by the new certificate's dates
        log.info("certificate renewed; reconnecting with it", extra={"device": self.device_id})
        return True

    def _check(self, pem: bytes) -> None:
        from cryptography import x509

        from edge_agent.identity import certificate_problem, load_key, public_key_der

        try:
            cert = x509.load_pem_x509_certificate(pem)
            ca = x509.load_pem_x509_certificate(self.identity.ca.read_bytes())
            key = load_key(self.next_key)
        except Exception as exc:  # any parse failure: not ours to use
            raise ValueError(f"certificate or key unreadable: {exc}") from None
        if key is None:
            raise ValueError("the key made for this renewal is gone")
        problem = certificate_problem(cert, ca, self.device_id, public_key_der(key))
        if problem is not None:  # other_ca, other_device or other_key
            raise ValueError(f"certificate is not this device's own: {problem}")
