"""Provisioning end to end on a mutual-TLS Mosquitto: enroll, run, converge, revoke.

Real processes throughout: Mosquitto with the fleet CA, the device ACL and a
CRL; the hub (its own client certificates, issued from the fleet CA it keeps);
``driftless agent enroll`` and ``driftless agent run`` with nothing but the
enrolled data directory.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import find_mosquitto, free_port, wait_for_port
from edge_agent.store import StateStore
from firmware_bundles.devfleet import DevFleet
from hub.identity import CertificateAuthority
from protocols import Channel, topic
from tests.secure_stack import (
    SecureStack,
    connects,
    connects_with,
    driftless,
    enroll,
    enrollment_token,
    secure_stack,
)
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration

RENEW_MIN_INTERVAL_S = 3.0  # the hub mints at most one certificate per device this often


Secure = SecureStack


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    hub_args = ["--cert-renew-min-interval-s", str(RENEW_MIN_INTERVAL_S)]
    with secure_stack(tmp_path, hub_args=hub_args) as stack:
        yield stack


def test_enroll_run_converge_then_decommission_cuts_the_device_off(
    tmp_path: Path, secure: Secure
) -> None:
    hub = secure.hub
    agent = AgentProcess(tmp_path, "pump-1", secure.broker.url)
    token = enrollment_token(hub, device_id="pump-1", labels={"site": "plant-7"})
    result = enroll(hub, token, "pump-1", agent.data_dir)
    assert result.returncode == 0, result.stderr
    identity = agent.data_dir / "identity"
    assert {p.name for p in identity.iterdir()} >= {"device.key", "device.crt", "ca.crt"}
    assert (identity / "device.key").stat().st_mode & 0o077 == 0
    assert json.loads((identity / "enrollment.json").read_text())["broker_url"] == secure.broker.url
    assert (agent.data_dir / "root.json").read_bytes() == secure.fleet.root_path.read_bytes()

    # The token was for one use: a second enrollment with it is refused, and says why.
    again = enroll(hub, token, "pump-1", tmp_path / "again")
    assert again.returncode == 1 and "used up" in again.stderr

    # ``agent run`` with only the enrolled data dir: mTLS broker, fleet root, signed documents.
    agent.argv = [a for a in agent.argv if a != "--insecure-unsigned"]
    broker_at = agent.argv.index("--broker")
    del agent.argv[broker_at : broker_at + 2]
    agent.start()
    try:
        wait_until(lambda: hub.device("pump-1")["online"], timeout_s=30, what="pump-1 online")
        assert hub.device("pump-1")["labels"] == {"site": "plant-7"}
        response = hub.api.put("/devices/pump-1/desired", json={"config": {"mode": "eco"}})
        generation = response.json()["desired_generation"]
        wait_until(
            lambda: StateStore(agent.data_dir).load().applied_generation == generation,
            what="pump-1 applied its signed document over mTLS",
        )
        cert, key = identity / "device.crt", identity / "device.key"

        # Decommission: the certificate (CRL), the topics (ACL), and the live connection,
        # which the broker closes itself (nothing else connects as the device here).
        assert hub.api.delete("/devices/pump-1").status_code == 204
        wait_until(
            lambda: '"event": "disconnected"' in agent.log(),
            timeout_s=10,
            what="the revoked device's live connection closed by the broker",
        )
        assert "Administrative action" in agent.log()
        wait_until(
            lambda: not connects_with(secure.broker, secure.files, cert, key),
            timeout_s=20,
            what="the revoked certificate refused",
        )
        assert "user pump-1\ntopic deny #" in secure.files.acl.read_text()
        device = hub.device("pump-1")  # still listed, for the operator, as decommissioned
        assert device["state"] == "decommissioned" and not device["online"]
        agent.kill()
        agent.start()  # a restarted agent cannot get back in
        wait_until(
            lambda: (
                agent.log().count("before the broker accepted it")
                + agent.log().count("broker unreachable")
                >= 2
            ),
            what="the restarted agent refused, twice",
        )
        assert agent.log().count('"event": "connected"') == 1  # only the first run's
    finally:
        agent.kill()


def test_the_hub_and_other_devices_are_unaffected_by_a_revocation(
    tmp_path: Path, secure: Secure
) -> None:
    """Another device enrolled with a claim token keeps working after pump-1 is revoked."""
    hub = secure.hub
    claim = enrollment_token(hub, uses=2)
    dirs = {d: tmp_path / d for d in ("line-1", "line-2")}
    for device_id, data_dir in dirs.items():
        assert enroll(hub, claim, device_id, data_dir).returncode == 0
    assert hub.api.delete("/devices/line-1").status_code == 204
    identity = dirs["line-2"] / "identity"
    assert connects_with(
        secure.broker, secure.files, identity / "device.crt", identity / "device.key"
    )
    assert hub.stats()["mqtt_connected"]  # the hub's own certificates still work
    assert topic("line-2", Channel.DESIRED)  # (the topic tree is the device's own)


def test_broker_config_writes_a_mutual_tls_config_that_mosquitto_runs(tmp_path: Path) -> None:
    port = free_port()
    identity, out = tmp_path / "identity", tmp_path / "broker"
    result = driftless(
        "broker", "config", "--identity-dir", str(identity), "--out", str(out),
        "--host", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = (out / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "crlfile "):
        assert line in config
    assert f"--broker-crl {out / 'tls' / 'crl.pem'}" in result.stdout
    ca = CertificateAuthority.load_or_create(identity, now=dt.datetime.now(dt.UTC))
    key_pem, issued = ca.issue_keypair("dev-9", server=False, now=dt.datetime.now(dt.UTC))
    (tmp_path / "dev.key").write_bytes(key_pem)
    (tmp_path / "dev.crt").write_bytes(issued.pem)
    proc = subprocess.Popen([find_mosquitto(), "-c", str(out / "mosquitto.conf")])
    try:
        wait_for_port("127.0.0.1", port, timeout_s=10)
        assert connects(port, ca.cert_path, tmp_path / "dev.crt", tmp_path / "dev.key")
        assert not connects(port, ca.cert_path, None, None)  # no certificate, no entry
    finally:
        proc.kill()
        proc.wait(timeout=10)


def serial_of(cert: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def test_a_device_renews_its_certificate_over_mqtt_and_carries_on(
    tmp_path: Path, secure: Secure
) -> None:
    """Renewal due at once (--renew-at-fraction 0): refused while the enrollment's
    certificate is younger than the hub's interval (the answer says when to ask
    again), then granted; the device reconnects with the new pair and keeps
    converging, and its old certificate still works until it expires."""
    hub = secure.hub
    agent = AgentProcess(tmp_path, "pump-2", secure.broker.url)
    token = enrollment_token(hub, device_id="pump-2")
    assert enroll(hub, token, "pump-2", agent.data_dir).returncode == 0
    identity = agent.data_dir / "identity"
    old_cert = tmp_path / "old.crt"
    old_key = tmp_path / "old.key"
    old_cert.write_bytes((identity / "device.crt").read_bytes())
    old_key.write_bytes((identity / "device.key").read_bytes())
    old_key.chmod(0o600)
    first_serial = serial_of(identity / "device.crt")
    agent.argv = [a for a in agent.argv if a != "--insecure-unsigned"]
    agent.argv += ["--renew-at-fraction", "0"]
    agent.start()
    try:
        wait_until(
            lambda: serial_of(identity / "device.crt") != first_serial,
            timeout_s=30,
            what="a renewed certificate in place",
        )
        wait_until(
            lambda: agent.log().count('"event": "connected"') >= 2,
            what="a reconnect with the new certificate",
        )
        # (device.key.next may already exist again: with fraction 0 the next renewal is due)
        assert connects_with(
            secure.broker, secure.files, identity / "device.crt", identity / "device.key"
        )
        assert connects_with(secure.broker, secure.files, old_cert, old_key)  # the overlap
        # The first ask came within the interval of the enrollment: refused, with a retry time.
        assert "renewals are at most one per 3 s" in agent.log()
        response = hub.api.put("/devices/pump-2/desired", json={"config": {"after": "renewal"}})
        generation = response.json()["desired_generation"]
        wait_until(
            lambda: StateStore(agent.data_dir).load().applied_generation == generation,
            what="pump-2 converges on its new certificate",
        )
    finally:
        agent.kill()


def test_the_readme_flow_broker_run_hub_enroll_agent(tmp_path: Path) -> None:
    """``driftless broker run`` (mutual TLS by default) prints the hub's flags; with them
    a hub, an enrolled agent and a desired change work end to end, as the README says."""
    identity = tmp_path / "identity"
    broker_proc = subprocess.Popen(
        [sys.executable, "-m", "driftless.cli", "broker", "run", "--data-dir",
         str(tmp_path / "broker"), "--identity-dir", str(identity)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    hub: HubProcess | None = None
    agent: AgentProcess | None = None
    try:
        assert broker_proc.stdout is not None
        first = broker_proc.stdout.readline()
        flags = broker_proc.stdout.readline().split()
        assert "mqtts://127.0.0.1:" in first and flags[:2] == ["hub", "flags:"], first
        url = flags[flags.index("--broker") + 1]
        fleet = DevFleet(tmp_path / "fleet")
        hub = HubProcess(tmp_path / "hub", url)
        hub.argv += [*flags[2:], "--trust-root", str(fleet.root_path)]
        hub.argv += ["--signing-key", str(fleet.hub_key_path)]
        hub.start()
        agent = AgentProcess(tmp_path, "pump-9", url, enrolled=True)
        token = enrollment_token(hub, device_id="pump-9")
        assert enroll(hub, token, "pump-9", agent.data_dir).returncode == 0
        agent.start()
        wait_until(lambda: hub.device("pump-9")["online"], timeout_s=30, what="pump-9 online")
        response = hub.api.put("/devices/pump-9/desired", json={"config": {"x": 1}})
        generation = response.json()["desired_generation"]
        wait_until(
            lambda: StateStore(agent.data_dir).load().applied_generation == generation,
            what="pump-9 applied",
        )
    finally:
        if agent is not None:
            agent.kill()
        if hub is not None:
            hub.close()
        broker_proc.terminate()
        broker_proc.wait(timeout=20)
    # SIGTERM to ``broker run`` stops its Mosquitto too.
    left = [
        cmdline
        for cmdline in Path("/proc").glob("[0-9]*/cmdline")
        if str(tmp_path / "broker") in cmdline.read_bytes().decode(errors="replace")
    ]
    assert left == [], "broker run left its Mosquitto behind"


def test_the_api_can_be_served_over_https(tmp_path: Path) -> None:
    """``--api-tls-cert/--api-tls-key``: tokens no longer travel in clear."""
    import httpx

    from devtools.procs import HubChild

    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=now)
    key_pem, issued = ca.issue_keypair("localhost", server=True, now=now)
    (tmp_path / "api.key").write_bytes(key_pem)
    (tmp_path / "api.crt").write_bytes(issued.pem)
    hub = HubChild(tmp_path / "hub", f"mqtt://127.0.0.1:{free_port()}")
    hub.argv += ["--api-tls-cert", str(tmp_path / "api.crt")]
    hub.argv += ["--api-tls-key", str(tmp_path / "api.key")]
    hub.start()
    try:
        wait_for_port("127.0.0.1", hub.api_port, timeout_s=30)
        url = f"https://127.0.0.1:{hub.api_port}/api/v1"
        trust = ssl.create_default_context(cafile=str(ca.cert_path))
        with httpx.Client(verify=trust, headers=hub.headers) as client:
            assert client.get(f"{url}/health").status_code == 200
            assert client.get(f"{url}/devices").status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to an HTTPS port is not answered
            httpx.get(f"http://127.0.0.1:{hub.api_port}/api/v1/health", timeout=5)
    finally:
        hub.terminate()


def test_a_decommissioned_device_enrolled_again_gets_back_in(
    tmp_path: Path, secure: Secure
) -> None:
    """Its old certificate stays refused, but a new enrollment lifts the ACL's deny."""
    hub = secure.hub
    agent = AgentProcess(tmp_path, "pump-5", secure.broker.url, enrolled=True)
    assert (
        enroll(hub, enrollment_token(hub, device_id="pump-5"), "pump-5", agent.data_dir).returncode
        == 0
    )
    identity = agent.data_dir / "identity"
    old_cert, old_key = tmp_path / "old.crt", tmp_path / "old.key"
    old_cert.write_bytes((identity / "device.crt").read_bytes())
    old_key.write_bytes((identity / "device.key").read_bytes())
    old_key.chmod(0o600)
    assert hub.api.delete("/devices/pump-5").status_code == 204
    assert "user pump-5\ntopic deny #" in secure.files.acl.read_text()
    wait_until(  # the id is reused only once the broker confirmed the old unit cut off
        lambda: hub.device("pump-5")["broker_cut_off_at"], what="the broker's confirmation"
    )
    again = enroll(hub, enrollment_token(hub, device_id="pump-5"), "pump-5", agent.data_dir)
    assert again.returncode == 0, again.stderr
    assert "pump-5" not in secure.files.acl.read_text()
    assert (identity / "device.key").read_bytes() != old_key.read_bytes()  # a fresh key
    agent.start()
    try:
        wait_until(lambda: hub.device("pump-5")["online"], timeout_s=30, what="pump-5 back")
        generation = hub.api.put("/devices/pump-5/desired", json={"config": {"back": True}}).json()[
            "desired_generation"
        ]
        wait_until(
            lambda: StateStore(agent.data_dir).load().applied_generation >= generation,
            what="pump-5 converges again",
        )
        assert not connects_with(secure.broker, secure.files, old_cert, old_key)
    finally:
        agent.kill()
