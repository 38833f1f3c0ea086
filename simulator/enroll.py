"""Provision simulated devices as real ones are: a key and CSR each, a claim token, POST /enroll.

``driftless sim run --enroll`` runs :func:`enroll_fleet` in the parent before the
workers start; each worker then builds every device's own TLS context with
:meth:`DeviceIdentities.tls_context` and connects over ``mqtts://``.

Rules:
- Each device's P-256 key is made here with the agent's own function
  (``edge_agent.identity.create_key``: 0600, never overwritten) and never
  leaves the simulator: only the CSR naming the device goes to the hub, with
  the claim token, on the open enrollment route and without the API token (a
  device has none).
- Files, under the identity directory (``STATE_DIR/identities``, 0700):
  ``<id>.key`` and ``<id>.crt`` per device; ``ca.crt`` (the fleet CA the hub
  returned), ``root.json`` (the fleet root, when the hub has one),
  ``enrollment.json`` (the hub, the broker URL it named, when). Every write is
  atomic; ``ca.crt`` and ``root.json`` are written from the first answer of a
  round, before any certificate of that round, so a round cut short leaves
  certificates that the next run can reuse.
- A device is enrolled only when it has no usable identity
  (:func:`why_enroll`, pure): a certificate for its id and its key, issued by
  the CA that signs the hub's current CRL (``GET /crl``), not listed on it, and
  valid for at least ``min_valid_s`` more. Otherwise it enrolls (again) with
  the key it has. So a rerun or a respawned worker reuses the identities; a
  hub with another CA, a decommissioned device or an expiring certificate gets
  a new certificate.
- One claim token per round (``POST /enrollment-tokens``, admin role, uses =
  the devices to enroll, labels ``sim=PREFIX``, expiring in an hour). At most
  ``concurrency`` enrollments are in flight; every request has the HTTP
  client's timeout. The first refusal or failure ends the round with
  :class:`EnrollError` (the run's status 2): the certificates already kept
  stay, a key made for a request that failed is kept for the next attempt (as
  the agent does), and the token's unused uses expire with it.
- Every answer is checked before it is kept, as ``driftless agent enroll``
  does: the certificate names the device, carries its key and is signed by
  the CA that came with it, and every answer of a round names the same CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import ssl
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the workers load only ``ssl``; the parent loads the rest to enroll
    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

MAX_USES_PER_TOKEN = 1_000_000  # the API's limit (hub.enrollment.api.EnrollmentTokenCreate)
TOKEN_LIFETIME_S = 3600
MIN_VALID_S = 24 * 3600  # a certificate expiring sooner is renewed by enrolling again


class EnrollError(RuntimeError):
    """The devices could not be enrolled (the hub refused, could not be reached, or
    answered something that does not check out), or an identity on disk is unusable."""


@dataclass(frozen=True)
class DeviceIdentities:
    """Where the simulated devices' identities live (one directory for the whole run)."""

    directory: Path

    def key(self, device_id: str) -> Path:
        return self.directory / f"{device_id}.key"

    def cert(self, device_id: str) -> Path:
        return self.directory / f"{device_id}.crt"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def root(self) -> Path:
        return self.directory / "root.json"

    @property
    def record(self) -> Path:
        return self.directory / "enrollment.json"

    def ca_pem(self) -> str:
        """The fleet CA as PEM text; raises EnrollError when it was never stored."""
        try:
            return self.ca.read_text()
        except OSError as exc:
            raise EnrollError(
                f"no fleet CA in {self.directory} ({exc.strerror}): enroll the devices first "
                "(driftless sim run --enroll)"
            ) from None

    def serial(self, device_id: str) -> str:
        """The serial of the device's certificate (hex), which its births name.

        Raises EnrollError when the certificate is missing or unreadable.
        """
        from edge_agent.identity import certificate_serial

        try:
            return certificate_serial(self.cert(device_id).read_bytes())
        except (OSError, ValueError) as exc:
            raise EnrollError(
                f"{device_id}: no readable certificate in {self.directory}: {exc}"
            ) from None

    def tls_context(self, device_id: str, ca_pem: str) -> ssl.SSLContext:
        """Mutual TLS as the device: trust only the fleet CA, present its own certificate.

        Raises EnrollError when its certificate or key is missing or they do not match.
        """
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
        try:
            context.load_cert_chain(self.cert(device_id), self.key(device_id))
        except (OSError, ssl.SSLError) as exc:
            raise EnrollError(
                f"{device_id}: no usable identity in {self.directory}: {exc}; "
                "enroll the devices again (driftless sim run --enroll)"
            ) from None
        return context


# ---------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class FleetTrust:
    """What decides whether a stored certificate is still good (from the hub, this run)."""

    ca: x509.Certificate | None  # the stored CA, if it signs the hub's current CRL
    revoked: frozenset[int]  # serials on that CRL
    now: dt.datetime
    min_valid_s: float = MIN_VALID_S


def why_enroll(
    device_id: str, cert_pem: bytes | None, public_key_der: bytes | None, trust: FleetTrust
) -> str | None:
    """Pure: why this device must enroll (again), or None when its identity is usable.

    ``cert_pem`` and ``public_key_der`` (its key's SubjectPublicKeyInfo) are None
    when the file is missing. The reasons are stable strings (summary keys).
    """
    from cryptography import x509

    from edge_agent.identity import certificate_problem

    if public_key_der is None:
        return "no_key"
    if cert_pem is None:
        return "no_certificate"
    if trust.ca is None:
        return "other_ca"
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:  # unreadable: as good as from another CA
        return "other_ca"
    problem = certificate_problem(cert, trust.ca, device_id, public_key_der)
    if problem is not None:
        return problem
    if cert.serial_number in trust.revoked:
        return "revoked"
    if (cert.not_valid_after_utc - trust.now).total_seconds() < trust.min_valid_s:
        return "expiring"
    return None


def _check_answer(
    answer: Mapping[str, Any], device_id: str, public_key_der: bytes
) -> tuple[bytes, bytes]:
    """Pure: ``(certificate PEM, CA PEM)`` when the answer is a certificate for this device
    and key signed by the CA that came with it; raises EnrollError otherwise."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from edge_agent.identity import certificate_problem

    try:
        cert_pem = str(answer["certificate_pem"]).encode()
        ca_pem = str(answer["ca_pem"]).encode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except (KeyError, ValueError, TypeError) as exc:  # keep nothing
        raise EnrollError(f"{device_id}: the hub's answer does not check out: {exc!r}") from None
    problem = certificate_problem(cert, ca, device_id, public_key_der)
    if problem == "other_ca":
        raise EnrollError(f"{device_id}: the hub's answer does not check out: not signed by its CA")
    if problem == "other_device":
        names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        raise EnrollError(f"{device_id}: the hub's certificate names {names!r}")
    if problem == "other_key":
        raise EnrollError(f"{device_id}: the hub's certificate is not for this device's key")
    return cert_pem, ca_pem


# ---------------------------------------------------------------- the round


@dataclass
class EnrollmentResult:
    """What one round did; ``as_dict`` is the run summary's ``enrollment``."""

    devices: int
    concurrency: int
    enrolled: int = 0
    reused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why devices enrolled
    check_s: float = 0.0  # reading the stored identities and the hub's CRL
    token_s: float = 0.0  # POST /enrollment-tokens
    enroll_s: float = 0.0  # every device's key, CSR, POST /enroll, check and write
    request_ms: list[float] = field(default_factory=list)  # each POST /enroll
    broker_url: str | None = None  # the broker the hub named (public_broker_url)
    root: bool = False  # the hub handed out a fleet root

    def as_dict(self) -> dict[str, Any]:
        ms = sorted(self.request_ms)
        return {
            "devices": self.devices,
            "enrolled": self.enrolled,
            "reused": self.reused,
            "reasons": dict(sorted(self.reasons.items())),
            "concurrency": self.concurrency,
            "check_s": round(self.check_s, 3),
            "token_s": round(self.token_s, 3),
            "enroll_s": round(self.enroll_s, 3),
            "per_s": round(self.enrolled / self.enroll_s, 1) if self.enroll_s > 0 else None,
            "request_ms": {
                "p50": round(statistics.median(ms), 2) if ms else None,
                "p95": round(ms[int(0.95 * (len(ms) - 1))], 2) if ms else None,
                "max": round(ms[-1], 2) if ms else None,
            },
            "broker_url": self.broker_url,
            "root": self.root,
        }


def _public_key_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    from edge_agent.identity import public_key_der

    return public_key_der(key)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The stored key, or None when there is none; raises EnrollError for a foreign file."""
    from edge_agent.identity import load_key

    try:
        return load_key(path)
    except ValueError as exc:
        raise EnrollError(str(exc)) from None


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from edge_agent.identity import load_or_create_key

    try:
        return load_or_create_key(path)
    except ValueError as exc:
        raise EnrollError(str(exc)) from None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


async def _fleet_trust(
    api: httpx.AsyncClient, identities: DeviceIdentities, now: dt.datetime
) -> FleetTrust:
    """The stored CA if it signs the hub's current CRL (else None), and the revoked serials."""
    import httpx
    from cryptography import x509

    stored = _read(identities.ca)
    if stored is None:
        return FleetTrust(ca=None, revoked=frozenset(), now=now)
    try:
        response = await api.get("/crl")
    except httpx.HTTPError as exc:
        raise EnrollError(f"GET /crl: {exc!r}") from None
    if response.status_code != 200:
        raise EnrollError(f"GET /crl: HTTP {response.status_code} {response.text[:300]}")
    try:
        ca = x509.load_pem_x509_certificate(stored)
        crl = x509.load_pem_x509_crl(response.content)
    except ValueError as exc:
        raise EnrollError(f"the stored CA or the hub's CRL is unreadable: {exc}") from None
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        return FleetTrust(ca=None, revoked=frozenset(), now=now)  # another fleet's CA: enroll again
    return FleetTrust(ca=ca, revoked=frozenset(r.serial_number for r in crl), now=now)


def _write(path: Path, data: bytes) -> None:
    from edge_agent.store import atomic_write_bytes

    atomic_write_bytes(path, data)


class _Round:
    """One enrollment round's shared state: the CA every answer must name."""

    def __init__(self, identities: DeviceIdentities, result: EnrollmentResult) -> None:
        self.identities = identities
        self.result = result
        self.ca_pem: bytes | None = None

    def first_answer(self, answer: Mapping[str, Any], ca_pem: bytes) -> None:
        """Keep the CA and the root before any certificate of this round (synchronously:
        no other device's certificate can be written in between)."""
        self.ca_pem = ca_pem
        _write(self.identities.ca, ca_pem)
        root = answer.get("root_json")
        if root is not None:
            from firmware_bundles.trust import TrustedRoot

            try:
                TrustedRoot.from_bytes(str(root).encode())
            except Exception as exc:  # a root that does not verify: keep nothing of it
                raise EnrollError(f"the hub's fleet root does not check out: {exc!r}") from None
            _write(self.identities.root, str(root).encode())
        else:
            self.identities.root.unlink(missing_ok=True)
        broker = answer.get("broker_url")
        self.result.broker_url = broker if isinstance(broker, str) else None
        self.result.root = root is not None


async def _enroll_one(
    device_api: httpx.AsyncClient,
    round_: _Round,
    token: str,
    device_id: str,
    gate: asyncio.Semaphore,
) -> None:
    import httpx

    from edge_agent.identity import make_csr

    identities = round_.identities
    async with gate:
        try:
            key = await asyncio.to_thread(_load_or_create_key, identities.key(device_id))
        except OSError as exc:
            raise EnrollError(f"{device_id}: cannot keep its key: {exc}") from None
        csr = make_csr(key, device_id).decode()
        body = {"token": token, "device_id": device_id, "csr_pem": csr}
        sent = time.monotonic()
        try:
            response = await device_api.post("/enroll", json=body)
        except httpx.HTTPError as exc:
            raise EnrollError(f"{device_id}: POST /enroll: {exc!r}") from None
        round_.result.request_ms.append((time.monotonic() - sent) * 1000)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            detail = answer.get("detail") if isinstance(answer, dict) else response.text[:300]
            raise EnrollError(
                f"{device_id}: the hub refused enrollment ({response.status_code}): {detail}"
            )
        cert_pem, ca_pem = _check_answer(answer, device_id, _public_key_der(key))
        if round_.ca_pem is None:
            round_.first_answer(answer, ca_pem)
        elif ca_pem != round_.ca_pem:
            raise EnrollError(f"{device_id}: the hub answered with another CA than before")
        try:
            await asyncio.to_thread(_write, identities.cert(device_id), cert_pem)
        except OSError as exc:
            raise EnrollError(f"{device_id}: cannot keep its certificate: {exc}") from None
        round_.result.enrolled += 1


async def enroll_fleet(
    api: httpx.AsyncClient,
    device_api: httpx.AsyncClient,
    ids: Sequence[str],
    identities: DeviceIdentities,
    *,
    labels: Mapping[str, str],
    now: dt.datetime,
    concurrency: int = 8,
) -> EnrollmentResult:
    """Give every device in ``ids`` a usable identity; returns what it took.

    ``api`` carries the admin token (``/crl``, ``/enrollment-tokens``);
    ``device_api`` carries none (``/enroll``, as a device calls it). Raises EnrollError.
    """
    import httpx

    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    result = EnrollmentResult(devices=len(ids), concurrency=concurrency)
    identities.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(identities.directory, 0o700)
    started = time.monotonic()
    trust = await _fleet_trust(api, identities, now)
    needed: list[str] = []
    for device_id in ids:
        key = _load_key(identities.key(device_id))
        der = _public_key_der(key) if key is not None else None
        reason = why_enroll(device_id, _read(identities.cert(device_id)), der, trust)
        if reason is None:
            result.reused += 1
        else:
            needed.append(device_id)
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
    result.check_s = time.monotonic() - started
    if not needed:
        result.root = identities.root.exists()
        stored = _read(identities.record)
        with contextlib.suppress(ValueError, AttributeError):
            result.broker_url = json.loads(stored or b"{}").get("broker_url")
        return result
    if len(needed) > MAX_USES_PER_TOKEN:
        raise EnrollError(f"at most {MAX_USES_PER_TOKEN} devices enroll in one round")

    started = time.monotonic()
    body = {"uses": len(needed), "labels": dict(labels), "expires_in_s": TOKEN_LIFETIME_S}
    try:
        response = await api.post("/enrollment-tokens", json=body)
    except httpx.HTTPError as exc:
        raise EnrollError(f"POST /enrollment-tokens: {exc!r}") from None
    if response.status_code != 201:
        refused = response.status_code in (401, 403)
        hint = " (making enrollment tokens needs an admin token)" if refused else ""
        raise EnrollError(
            f"POST /enrollment-tokens: HTTP {response.status_code} {response.text[:300]}{hint}"
        )
    token = str(response.json()["token"])
    result.token_s = time.monotonic() - started

    started = time.monotonic()
    round_ = _Round(identities, result)
    gate = asyncio.Semaphore(concurrency)
    tasks = [
        asyncio.create_task(_enroll_one(device_api, round_, token, d, gate), name=f"enroll:{d}")
        for d in needed
    ]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished  # the first failure ends the round
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.enroll_s = time.monotonic() - started
    record = {
        "hub": str(device_api.base_url),
        "broker_url": result.broker_url,
        "enrolled_at": now.isoformat(),
        "devices": len(ids),
    }
    _write(identities.record, json.dumps(record, indent=2).encode() + b"\n")
    return result
