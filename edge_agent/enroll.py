"""``driftless agent enroll``: get this device a certificate from the hub, once.

Rules:
- The private key is made here (P-256, 0600) and never leaves the device; only
  a CSR naming the device goes to the hub, with the enrollment token.
- A key left by an earlier, failed attempt is reused, so retrying with a new
  token does not pile up keys; a key that was ever certified is not: enrolling
  again makes a new one. Nothing is kept until the hub answered with a
  certificate for the key.
- What the hub returns is checked before it is kept: the certificate must be
  for this device id and this key, and signed by the CA that came with it;
  the fleet root must be self-signed by its root threshold.
- Files (under the agent's data directory), each written atomically:
  ``identity/device.key``, ``identity/device.crt``, ``identity/ca.crt``,
  ``identity/enrollment.json`` (device id, broker URL, expiry) and
  ``root.json`` (the fleet root the agent verifies everything against) with
  ``root.json.verified`` (its digest: verified here, so ``agent run`` need not
  load ``cryptography`` to check it again, :mod:`edge_agent.root`).
  ``driftless agent run`` with the same ``--data-dir`` picks them up.
- ``driftless agent run`` with an enrolled data directory uses the enrollment's
  broker URL unless told another, the fleet root unless given ``--root``, and
  for ``mqtts://`` its certificate (:func:`tls_context`), trusting only the fleet CA.
- Importing this module loads neither ``urllib`` nor ``cryptography``:
  ``agent run`` imports it for :class:`Identity` and :func:`tls_context`.
- Exit status: 0 enrolled; 1 the hub refused (the reason is printed) or could
  not be reached; 2 bad arguments or an answer that does not check out.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.store import atomic_write_bytes

if TYPE_CHECKING:  # loaded only to enroll: ``agent run`` imports this module for Identity
    from cryptography.hazmat.primitives.asymmetric import ec

ENROLL_PATH = "/api/v1/enroll"
MAX_ANSWER_BYTES = 256 * 1024
TIMEOUT_S = 30.0


class EnrollError(Exception):
    """Enrollment did not happen; ``status`` is the exit status to use."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Identity:
    """Where an enrolled device's files live (under its data directory)."""

    data_dir: Path

    @property
    def directory(self) -> Path:
        return self.data_dir / "identity"

    @property
    def key(self) -> Path:
        return self.directory / "device.key"

    @property
    def cert(self) -> Path:
        return self.directory / "device.crt"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def record(self) -> Path:
        return self.directory / "enrollment.json"

    @property
    def root(self) -> Path:
        return self.data_dir / "root.json"

    def enrolled(self) -> bool:
        return self.record.exists() and self.cert.exists() and self.key.exists()

    def broker_url(self) -> str | None:
        """The broker the hub named at enrollment, if any."""
        if not self.record.exists():
            return None
        url = json.loads(self.record.read_text()).get("broker_url")
        return url if isinstance(url, str) and url else None


def tls_context(identity: Identity) -> ssl.SSLContext:
    """Mutual TLS with the enrolled identity: trust only the fleet CA, present our certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identity.ca))
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from edge_agent.identity import load_or_create_key

    try:
        return load_or_create_key(path)
    except ValueError as exc:
        raise EnrollError(str(exc), 2) from None


def _post(url: str, body: dict[str, str]) -> tuple[int, dict[str, object]]:
    # Imported here: ``agent run`` imports this module for Identity and never posts.
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, raw = response.status, response.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read(MAX_ANSWER_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise EnrollError(f"cannot reach the hub at {url}: {exc}") from None
    if len(raw) > MAX_ANSWER_BYTES:
        raise EnrollError(f"the hub's answer is larger than {MAX_ANSWER_BYTES} bytes", 2)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise EnrollError(f"the hub answered {status} with no JSON", 2) from None
    if not isinstance(answer, dict):
        raise EnrollError(f"the hub answered {status} with an unexpected body", 2)
    return status, answer


def _check(answer: dict[str, object], device_id: str, key: ec.EllipticCurvePrivateKey) -> None:
    """Raise EnrollError(2) unless the answer is a certificate for this device and key."""
    from cryptography import x509

    from edge_agent.identity import certificate_problem, public_key_der
    from firmware_bundles.trust import TrustedRoot

    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate_pem"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca_pem"]).encode())
        problem = certificate_problem(cert, ca, device_id, public_key_der(key))
        root = answer.get("root_json")
        if root is not None:
            TrustedRoot.from_bytes(str(root).encode())
    except Exception as exc:  # a malformed answer of any kind: say what, keep nothing
        raise EnrollError(f"the hub's answer does not check out: {exc}", 2) from None
    if problem is not None:
        raise EnrollError(f"the hub's certificate does not check out: {problem}", 2)


def enroll(*, hub_url: str, token: str, device_id: str, data_dir: Path) -> Identity:
    """Enroll this device; returns where its identity now lives. Raises EnrollError."""
    import protocols
    from edge_agent.identity import make_csr

    if not protocols.is_valid_device_id(device_id):
        raise EnrollError(f"device id {device_id!r} is not valid", 2)
    if not hub_url.startswith(("http://", "https://")):
        raise EnrollError(f"hub URL {hub_url!r} must start with http:// or https://", 2)
    identity = Identity(data_dir)
    # A key that was ever certified is not reused: enrolling again (after a
    # decommission, say) gets a fresh one, swapped in only once the hub said yes.
    key_path = identity.directory / "device.key.enroll" if identity.cert.exists() else identity.key
    key = _load_or_create_key(key_path)
    status, answer = _post(
        hub_url.rstrip("/") + ENROLL_PATH,
        {"token": token, "device_id": device_id, "csr_pem": make_csr(key, device_id).decode()},
    )
    if status != 200:
        raise EnrollError(f"the hub refused enrollment ({status}): {answer.get('detail')}")
    _check(answer, device_id, key)
    atomic_write_bytes(identity.ca, str(answer["ca_pem"]).encode())
    if key_path != identity.key:  # key first: a crash leaves an old cert that fails loudly
        os.replace(key_path, identity.key)
    atomic_write_bytes(identity.cert, str(answer["certificate_pem"]).encode())
    if answer.get("root_json") is not None:
        from edge_agent.root import remember_verified

        root = str(answer["root_json"]).encode()
        atomic_write_bytes(identity.root, root)
        remember_verified(identity.root, root)  # _check verified it: ``agent run`` need not
    record = {
        "device_id": device_id,
        "broker_url": answer.get("broker_url"),
        "not_after": answer.get("not_after"),
        "hub_url": hub_url,
    }
    atomic_write_bytes(identity.record, json.dumps(record, indent=2).encode() + b"\n")
    return identity


def run_enroll(*, hub_url: str, token: str, device_id: str, data_dir: Path) -> int:
    """Entry point for ``driftless agent enroll``."""
    try:
        identity = enroll(hub_url=hub_url, token=token, device_id=device_id, data_dir=data_dir)
    except EnrollError as exc:
        print(f"driftless agent enroll: {exc}", file=sys.stderr)
        return exc.status
    broker = identity.broker_url() or "(none given: pass --broker to agent run)"
    print(f"enrolled {device_id}: certificate in {identity.cert}, broker {broker}")
    return 0
