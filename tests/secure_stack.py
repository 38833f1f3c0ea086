"""Test plumbing: the secure stack (mutual-TLS Mosquitto with the ACL and a CRL, a hub over mTLS).

The same setup as the ``secure`` fixture of ``tests/integration/test_enroll_mtls.py``:
the fleet CA is the hub's own (``identity/`` beside its database), the broker's
TLS files come from it, and the hub keeps the broker's CRL and ACL current
(``--broker-crl``, ``--broker-acl``, ``--broker-pid-file``). With ``signed``,
the hub has a throw-away fleet root and hub key (``DevFleet``): enrollment
hands devices the root, and the hub signs every desired document.

Rule: whatever it starts is stopped on every exit path (hub first, then broker).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_bundles.devfleet import DevFleet
from hub.broker_config import TlsFiles, hub_identities, write_secure_files
from hub.devbroker import MosquittoBroker
from hub.identity import CertificateAuthority
from tests.support import HubProcess


@dataclass
class SecureStack:
    broker: MosquittoBroker
    files: TlsFiles
    hub: HubProcess
    ca: CertificateAuthority
    fleet: DevFleet | None


@contextlib.contextmanager
def secure_stack(
    tmp_path: Path, *, signed: bool = True, hub_args: Sequence[str] = ()
) -> Iterator[SecureStack]:
    """Start the broker and the hub (ready, MQTT link up); stop both afterwards.

    ``hub_args`` are appended to ``driftless hub serve``'s arguments.
    """
    now = dt.datetime.now(dt.UTC)
    hub_dir = tmp_path / "hub"
    ca = CertificateAuthority.load_or_create(hub_dir / "identity", now=now)
    files = write_secure_files(
        ca, tmp_path / "broker-tls", hub_identities=hub_identities("driftless-hub"),
        revoked=[], now=now,
    )  # fmt: skip
    broker = MosquittoBroker(tmp_path / "broker", tls=files)
    fleet = DevFleet(tmp_path / "fleet") if signed else None
    hub = HubProcess(hub_dir, broker.url)
    if fleet is not None:
        hub.argv += ["--trust-root", str(fleet.root_path), "--signing-key", str(fleet.hub_key_path)]
    hub.argv += [
        "--public-broker-url", broker.url,
        "--broker-crl", str(files.crl), "--broker-acl", str(files.acl),
        "--broker-pid-file", str(broker.pid_path), *hub_args,
    ]  # fmt: skip
    broker.start()
    try:
        hub.start()
        yield SecureStack(broker, files, hub, ca, fleet)
    finally:
        hub.close()
        broker.kill()
