"""Firmware A/B end to end: a real agent process, a real Mosquitto with mutual TLS, real
signed firmware bundles served by a raw chunk peer, desired documents signed with the
fleet's hub key.

A good firmware is written to the inactive slot, the agent restarts itself (exec, same
pid), confirms the slot by its health check before it connects, reports the new slot in
its birth and the generation applied. A bad one (its health check fails) falls back to
the old slot, the agent restarts once more into it, and the device reports the old slot
and the generation rolled back with the check's reason; it does not try it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from firmware_bundles import archive
from protocols import Birth, Channel, Desired, Reported, decode, encode, topic
from protocols.signed import seal
from tests.integration.bundle_support import DAY, Keys, ScriptedChunkServer, now, sha256_of
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.integration

DEVICE = "fw-1"
GOOD = "#!/bin/sh\ntest -f version.txt\n"
BAD = "#!/bin/sh\necho 'sensor bus not found' >&2\nexit 3\n"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def peer(broker: TestBroker) -> Iterator[RawPeer]:
    """Plays the hub: publishes signed desired documents, records births and reports."""
    instance = RawPeer(broker)
    instance.subscribe(topic(DEVICE, Channel.BIRTH))
    instance.subscribe(topic(DEVICE, Channel.REPORTED))
    yield instance
    instance.close()


@pytest.fixture
def agent(tmp_path: Path, broker: TestBroker, keys: Keys) -> Iterator[AgentProcess]:
    instance = AgentProcess(tmp_path, DEVICE, broker, root=keys.root_path)
    yield instance
    instance.kill()


def firmware(tmp_path: Path, keys: Keys, version: str, health: str, security: int) -> Path:
    """A signed firmware bundle with an executable ``health`` at its root."""
    src = tmp_path / f"fw-{version}"
    src.mkdir()
    (src / "version.txt").write_text(version)
    (src / "health").write_text(health)
    (src / "health").chmod(0o755)
    out = tmp_path / f"fw-{version}.bundle"
    archive.build(
        src,
        name="os",
        version=version,
        security_version=security,
        kind="firmware",
        architectures=["any"],
        created=now() - 60,
        expires=now() + DAY,
        out=out,
    )
    for key in keys.fleet.release_keys:
        archive.sign(out, key)
    return out


def desire(peer: RawPeer, keys: Keys, generation: int, sha: str) -> None:
    config = {"workloads": [{"name": "os", "bundle": sha}]}
    document = Desired(device_id=DEVICE, generation=generation, config=config, issued_at=1.0)
    sealed = seal(encode(document), keys.fleet.hub_keys)
    peer.publish(topic(DEVICE, Channel.DESIRED), sealed, retain=True)  # as the hub does


def births(peer: RawPeer) -> list[Birth]:
    name = topic(DEVICE, Channel.BIRTH)
    return [decode(p, Birth) for t, p, _ in list(peer.messages) if t == name]


def reports(peer: RawPeer, generation: int) -> list[Reported]:
    name = topic(DEVICE, Channel.REPORTED)
    found = [decode(p, Reported) for t, p, _ in list(peer.messages) if t == name]
    return [r for r in found if r.generation == generation]


def running(birth: Birth) -> tuple[str | None, str | None]:
    assert birth.inventory is not None
    return birth.inventory.firmware_slot, birth.inventory.firmware_version


def finished(peer: RawPeer, generation: int) -> Reported:
    return wait_until(
        lambda: next((r for r in reports(peer, generation) if r.phase != "applying"), None),
        timeout_s=60,
        what=f"generation {generation} finished",
    )


def install_good(
    tmp_path: Path, broker: TestBroker, keys: Keys, peer: RawPeer, agent: AgentProcess
) -> None:
    """Generation 1: firmware 1.0 to slot b, restart, confirm, applied."""
    good = firmware(tmp_path, keys, "1.0", GOOD, 1)
    server = ScriptedChunkServer(broker, {sha256_of(good): good.read_bytes()})
    try:
        agent.start()
        wait_until(lambda: births(peer), what="first birth")
        assert running(births(peer)[0]) == (None, None)  # no firmware yet
        pid = agent.proc.pid if agent.proc else 0
        desire(peer, keys, 1, sha256_of(good))
        report = finished(peer, 1)
        assert report.phase == "applied", report
        assert agent.running() and agent.proc is not None and agent.proc.pid == pid
        log = agent.log()
        assert log.count('"agent restarting"') == 1 and '"firmware confirmed"' in log
        assert running(births(peer)[-1]) == ("b", "1.0")
        data = agent.data_dir / "firmware"
        assert (data / "slot-b" / "version.txt").read_text() == "1.0"
    finally:
        server.close()


def test_a_good_firmware_is_confirmed_after_the_restart_and_reported(
    tmp_path: Path, broker: TestBroker, keys: Keys, peer: RawPeer, agent: AgentProcess
) -> None:
    install_good(tmp_path, broker, keys, peer, agent)
    assert StateStore(agent.data_dir).load().applied_generation == 1


def test_a_firmware_update_that_fails_its_health_check_falls_back_to_the_old_slot(
    tmp_path: Path, keys: Keys, peer: RawPeer, agent: AgentProcess, broker: TestBroker
) -> None:
    install_good(tmp_path, broker, keys, peer, agent)
    bad = firmware(tmp_path, keys, "2.0", BAD, 2)
    server = ScriptedChunkServer(broker, {sha256_of(bad): bad.read_bytes()})
    try:
        seen = len(births(peer))
        desire(peer, keys, 2, sha256_of(bad))
        report = finished(peer, 2)
        assert report.phase == "rolled_back", report
        assert report.error is not None
        assert "firmware 2.0 in slot a fell back to slot b" in report.error
        assert "exit status 3: sensor bus not found" in report.error
        assert running(births(peer)[-1]) == ("b", "1.0")  # the old slot runs
        assert len(births(peer)) == seen + 1  # one connect: after the fallback's restart
        log = agent.log()
        assert log.count('"agent restarting"') == 3  # switch to 1.0; switch to 2.0; fallback
        state = StateStore(agent.data_dir).load()
        assert (state.applied_generation, state.failed_generation) == (1, 2)
        firmware_dir = agent.data_dir / "firmware"
        assert (firmware_dir / "slot-b" / "version.txt").read_text() == "1.0"
        assert (firmware_dir / "slot-a" / "version.txt").read_text() == "2.0"
        assert "sensor bus not found" in (firmware_dir / "health.log").read_text()

        # The retained document arrives on every reconnect: never tried again.
        agent.terminate()
        agent.start()
        wait_until(lambda: len(births(peer)) == seen + 2, what="birth after a plain restart")
        assert running(births(peer)[-1]) == ("b", "1.0")
        wait_until(
            lambda: '"ignored desired"' in agent.log() or "not newer" in agent.log(),
            what="generation 2 ignored",
        )
        assert agent.log().count('"agent restarting"') == 3
    finally:
        server.close()
