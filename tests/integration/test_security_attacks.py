"""Attacks from outside, on the documented mutual-TLS setup, with what an attacker has.

The attacker holds a claim token (``agent enroll`` works for it), a raw MQTT client,
the public CLI and API, and the files of a device it enrolled or stole. Each test
would pass against a hub without the defence only if the attack failed by accident;
each was first run against the code before the defence and failed there:

- a claim token minted a certificate named like the hub's own identities, which the
  broker's ACL treated as the hub (reserved names: ``hub:``/``admin:`` carry a
  character no device id may hold);
- the hub renewed a certificate for any device whose ``cert_req`` topic the
  request arrived on (renewal now proves possession of the device's current key);
- decommissioning left the device's live session open (the broker now closes it:
  the hub asks Mosquitto's dynamic security plugin to kick that username);
- re-enrolling the id gave the still-open session its topics back, and the hub
  counted its reports (the session is closed first, and a re-enrolled id counts
  nothing until the new certificate's birth).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.identity import load_or_create_key, make_csr
from edge_agent.store import StateStore
from hub.broker_config import hub_identities
from protocols import Birth, Channel, Status, encode, topic
from tests.integration.mqtt_client import RawPeer
from tests.secure_stack import SecureStack, enroll, enrollment_token, secure_stack
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.integration

HUB_CLIENT_ID = "driftless-hub"  # what ``hub serve`` uses unless told otherwise


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureStack]:
    # No renewal rate limit: a refusal must come from the possession check alone.
    with secure_stack(tmp_path, hub_args=["--cert-renew-min-interval-s", "0"]) as stack:
        yield stack


def identity_files(data_dir: Path) -> tuple[Path, Path, Path]:
    identity = data_dir / "identity"
    return identity / "ca.crt", identity / "device.crt", identity / "device.key"


def peer_from(secure: SecureStack, data_dir: Path) -> RawPeer:
    ca, cert, key = identity_files(data_dir)
    return RawPeer.from_files(secure.broker.port, ca, cert, key)


def fence(observer: RawPeer, attacker: RawPeer, attacker_id: str, marker: str) -> None:
    """Wait until ``attacker`` has been delivered what was published before this call.

    The observer (with the hub's rights) publishes on the attacker's own desired topic,
    which the attacker may read; the broker delivers to one connection in order, so
    anything published to the attacker before this marker has arrived by then.
    """
    attacker.subscribe(topic(attacker_id, Channel.DESIRED))
    observer.publish(topic(attacker_id, Channel.DESIRED), marker.encode())
    attacker.wait_for(lambda m: m[1] == marker.encode())


def test_a_claim_token_cannot_mint_an_identity_with_the_hubs_rights(
    tmp_path: Path, secure: SecureStack
) -> None:
    hub = secure.hub
    claim = enrollment_token(hub, uses=20)
    assert enroll(hub, claim, "victim-1", tmp_path / "victim").returncode == 0
    # Every name the broker grants the hub's rights, and the names as they were before
    # the reserved name space: each is refused, or enrolls a plain device.
    names = [*hub_identities(HUB_CLIENT_ID), HUB_CLIENT_ID, f"{HUB_CLIENT_ID}-bundles"]
    names += [secure.broker.pki.peer_name("admin"), "hub:x", "admin:ops"]
    observer = RawPeer(secure.broker, role="observer")
    observer.subscribe(topic("victim-1", Channel.REPORTED))
    enrolled: list[str] = []
    try:
        for name in dict.fromkeys(names):
            data_dir = tmp_path / f"attacker-{len(enrolled)}-{name.replace(':', '_')}"
            result = enroll(hub, claim, name, data_dir)
            if result.returncode != 0:
                assert "not valid" in result.stderr or "must match" in result.stderr, result
                # The CLI checked the id itself; an attacker skips the CLI: the hub refuses.
                csr = make_csr(load_or_create_key(data_dir / "k.key"), name).decode()
                raw = httpx.post(
                    f"{hub.base_url}/api/v1/enroll",
                    json={"token": claim, "device_id": name, "csr_pem": csr},
                    timeout=10,
                )
                assert raw.status_code == 403 and "not valid" in raw.text, raw.text
                continue
            enrolled.append(name)
            attacker = peer_from(secure, data_dir)
            try:
                attacker.subscribe("driftless/v1/devices/+/reported")
                attacker.subscribe("driftless/v1/devices/+/birth")
                forged = Status(device_id="victim-1", online=True, session=999, ts=time.time())
                reason = attacker.publish_reason(topic("victim-1", Channel.STATUS), encode(forged))
                assert reason == "Not authorized", f"{name}: forged status got {reason}"
                csr = make_csr(load_or_create_key(data_dir / "rogue.key"), "victim-1").decode()
                request = {"v": 1, "kind": "cert_req", "device_id": "victim-1"}
                request |= {"request_id": 1, "csr_pem": csr, "ts": time.time()}
                reason = attacker.publish_reason(
                    topic("victim-1", Channel.CERT_REQ), json.dumps(request).encode()
                )
                assert reason == "Not authorized", f"{name}: cert request got {reason}"
                # A report of the victim's reaches the hub's side but not this "device".
                victim = peer_from(secure, tmp_path / "victim")
                try:
                    own = Birth(
                        device_id="victim-1", session=1, boot_epoch=1, seq=1,
                        applied_generation=0, agent_version="v", ts=time.time(),
                    )  # fmt: skip
                    reason = victim.publish_reason(topic("victim-1", Channel.BIRTH), encode(own))
                    assert reason == "Success"
                finally:
                    victim.close()
                fence(observer, attacker, name, f"fence-{name}")
                leaked = [m[0] for m in attacker.messages if "victim-1" in m[0]]
                assert leaked == [], f"{name} read another device's topics: {leaked}"
            finally:
                attacker.close()
        # The forged status (session 999) changed nothing: the victim's own birth counts.
        wait_until(lambda: hub.device("victim-1")["session"] == 1, what="the victim's birth")
    finally:
        observer.close()
    assert not any(":" in name for name in enrolled)  # reserved names never enroll


def test_renewal_needs_the_devices_current_key_not_just_its_topic(
    tmp_path: Path, secure: SecureStack
) -> None:
    """Something with the hub's broker rights (a leaked admin certificate) asks for a
    certificate for another device, with its own key, on that device's topic."""
    hub = secure.hub
    token = enrollment_token(hub, device_id="victim-2")
    assert enroll(hub, token, "victim-2", tmp_path / "v").returncode == 0
    rogue = RawPeer(secure.broker, role="rogue-admin")
    try:
        rogue.subscribe(topic("victim-2", Channel.CERT))
        key = load_or_create_key(tmp_path / "rogue.key")
        request = {"v": 1, "kind": "cert_req", "device_id": "victim-2", "request_id": 5}
        request |= {"csr_pem": make_csr(key, "victim-2").decode(), "ts": time.time()}
        # It even presents the victim's certificate (public) with a proof made by its own key.
        cert_pem = (tmp_path / "v" / "identity" / "device.crt").read_text()
        request |= {"certificate_pem": cert_pem, "proof": "AAAA"}
        rogue.publish(topic("victim-2", Channel.CERT_REQ), json.dumps(request).encode())
        _, payload, _ = rogue.wait_for(lambda m: m[0] == topic("victim-2", Channel.CERT))
    finally:
        rogue.close()
    answer = json.loads(payload)
    assert answer.get("certificate_pem") is None, "a certificate for another device's name"
    assert "proof" in answer["error"]


def test_decommissioning_closes_the_live_session_at_the_broker(
    tmp_path: Path, secure: SecureStack
) -> None:
    """Nothing connects as the device before the DELETE: the broker itself must end it."""
    hub = secure.hub
    data_dir = tmp_path / "stolen"
    assert (
        enroll(hub, enrollment_token(hub, device_id="pump-1"), "pump-1", data_dir).returncode == 0
    )
    thief = peer_from(secure, data_dir)  # the device's own files, in an attacker's client
    try:
        thief.subscribe(topic("pump-1", Channel.DESIRED))
        started = time.monotonic()
        assert hub.api.delete("/devices/pump-1").status_code == 204
        reason = thief.wait_disconnected(timeout_s=10)
        assert reason == "Administrative action", reason
        assert time.monotonic() - started < 10
    finally:
        thief.close()
    device = wait_until(
        lambda: (d := hub.device("pump-1"))["broker_cut_off_at"] is not None and d,
        what="the hub records the broker's confirmation",
    )
    assert device["state"] == "decommissioned" and device["online"] is False


def test_an_enrolled_agent_is_cut_off_and_a_re_enrollment_does_not_revive_it(
    tmp_path: Path, secure: SecureStack
) -> None:
    hub = secure.hub
    old = AgentProcess(tmp_path / "old", "pump-6", secure.broker.url, enrolled=True)
    token = enrollment_token(hub, device_id="pump-6")
    assert enroll(hub, token, "pump-6", old.data_dir).returncode == 0
    old.argv = [a for a in old.argv if a != "--insecure-unsigned"]
    old.start()
    try:
        wait_until(lambda: hub.device("pump-6")["online"], timeout_s=30, what="pump-6 online")
        applied_before = StateStore(old.data_dir).load().applied_generation
        epoch_before = hub.device("pump-6")["last_report_epoch"]
        assert hub.api.delete("/devices/pump-6").status_code == 204
        wait_until(
            lambda: '"event": "disconnected"' in old.log(),
            timeout_s=10,
            what="the old agent's connection closed by the broker",
        )
        assert "Administrative action" in old.log()
        # The replacement unit is enrolled under the same id; it has not started yet.
        new_dir = tmp_path / "new" / "agent-pump-6"
        again = enroll(hub, enrollment_token(hub, device_id="pump-6"), "pump-6", new_dir)
        assert again.returncode == 0, again.stderr
        observer = RawPeer(secure.broker, role="observer")
        try:
            observer.subscribe(topic("pump-6", Channel.DESIRED))
            for n in (3, 5):
                hub.api.put("/devices/pump-6/desired", json={"config": {"n": n}})
            observer.wait_for(lambda m: b'"n":5' in m[1] or b'\\"n\\":5' in m[1])
        finally:
            observer.close()
        # Had the old session survived, it would have it now (the observer did).
        time.sleep(2.0)  # an absence: the bound within which a live session would apply
        assert StateStore(old.data_dir).load().applied_generation == applied_before
        device = hub.device("pump-6")
        assert device["online"] is False and device["in_sync"] is False
        assert device["last_report_epoch"] != epoch_before or device["last_report_epoch"] == -1
        assert old.log().count('"event": "connected"') == 1  # it never got back in
    finally:
        old.kill()
