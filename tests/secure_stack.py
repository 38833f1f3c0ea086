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
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import MosquittoBroker
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


def driftless(*args: str) -> subprocess.CompletedProcess[str]:
    """The public command line, as an operator or an attacker runs it."""
    return subprocess.run(
        [sys.executable, "-m", "driftless.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def enrollment_token(hub: HubProcess, **body: object) -> str:
    response = hub.api.post("/enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def enroll(
    hub: HubProcess, token: str, device_id: str, data_dir: Path
) -> subprocess.CompletedProcess[str]:
    """``driftless agent enroll``: what anyone holding a claim token can run."""
    return driftless(
        "agent", "enroll", "--hub", hub.base_url, "--token", token,
        "--device-id", device_id, "--data-dir", str(data_dir),
    )  # fmt: skip


def connects_with(broker: MosquittoBroker, files: TlsFiles, cert: Path, key: Path) -> bool:
    """Whether a fresh MQTT connection with this certificate is accepted."""
    return connects(broker.port, files.ca_cert, cert, key)


def connects(port: int, ca: Path, cert: Path | None, key: Path | None) -> bool:
    """Whether the broker sends CONNACK. Under TLS 1.3 (Mosquitto negotiates it even with
    ``tls_version tlsv1.2``, a minimum) a refused client certificate surfaces only at the
    client's first read, so the handshake call succeeding proves nothing: wait for CONNACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    client.tls_set_context(context)
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        for _ in range(50):
            client.loop(timeout=0.1)
            if client.is_connected():
                return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        client.disconnect()
    return False
