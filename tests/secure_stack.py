"""Test plumbing: the secure stack with the hub managing the broker (revocation, enrollment).

The ``broker`` fixture's setup (``tests/pki.py``), and a hub that also keeps the
broker's CRL and ACL current (``--broker-crl``, ``--broker-acl``,
``--broker-pid-file``) and hands enrolling devices the broker's URL. With
``signed``, the hub has a throw-away fleet root and hub key (``DevFleet``):
enrollment hands devices the root, and the hub signs every desired document.

Rule: whatever it starts is stopped on every exit path (hub first, then broker).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_bundles.devfleet import DevFleet
from hub.broker_config import TlsFiles
from hub.identity import CertificateAuthority
from tests.pki import TestBroker
from tests.support import HubProcess


@dataclass
class SecureStack:
    broker: TestBroker
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
    broker = TestBroker(tmp_path)
    fleet = DevFleet(tmp_path / "fleet") if signed else None
    hub = HubProcess(tmp_path / "hub", broker, manage_broker=True)
    if fleet is not None:
        hub.argv += ["--trust-root", str(fleet.root_path), "--signing-key", str(fleet.hub_key_path)]
    hub.argv += list(hub_args)
    broker.start()
    try:
        hub.start()
        yield SecureStack(broker, broker.pki.files, hub, broker.pki.ca, fleet)
    finally:
        hub.close()
        broker.kill()
