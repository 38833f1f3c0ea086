"""Bundles end to end: a real hub, a real agent, a real Mosquitto, real keys and bundles.

An operator uploads a signed bundle to the hub and sets a device's desired
state to a workload that references it; the agent downloads it over MQTT (or
HTTP), verifies it, unpacks it into ``workloads/<name>/<version>/``, switches
``current`` and reports the generation applied. Then the same path through
failures (agent killed mid-transfer, broker restarted) and bad input, each its
own test; a bad bundle must leave nothing outside the agent's temporary area.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from protocols import BundleRequest, Channel, Desired, decode, encode, encode_chunk, topic
from protocols.signed import seal
from tests.integration.bundle_support import (
    DAY,
    Keys,
    MiB,
    ScriptedChunkServer,
    build_bundle,
    bundle_stats,
    exact_answer,
    head_end,
    hub_file,
    hub_with_root,
    now,
    register,
    set_workloads,
    sha256_of,
    upload,
    wait_phase,
)
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until
from tests.unit.test_bundles_support import Fleet

pytestmark = pytest.mark.integration

DEVICE = "dev-1"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def hub(tmp_path: Path, broker: TestBroker, keys: Keys) -> Iterator[HubProcess]:
    instance = hub_with_root(tmp_path / "hub", broker, keys)
    try:
        register(instance, DEVICE)
        yield instance
    finally:
        instance.kill()
        instance.api.close()


def agent_for(tmp_path: Path, broker: TestBroker, keys: Keys | None, *extra: str) -> AgentProcess:
    return AgentProcess(
        tmp_path, DEVICE, broker, root=keys.root_path if keys else None, extra=extra
    )


def partial_bytes(agent: AgentProcess) -> int:
    try:
        return sum(p.stat().st_size for p in (agent.data_dir / "bundles" / "partial").iterdir())
    except FileNotFoundError:
        return 0


def assert_nothing_installed(agent: AgentProcess, sha: str) -> None:
    """A refused bundle leaves nothing outside the temporary area (which it also leaves empty)."""
    data = agent.data_dir
    workloads = data / "workloads"
    assert not workloads.exists() or not any(workloads.iterdir()), list(workloads.rglob("*"))
    assert not (data / "bundles" / f"{sha}.bundle").exists()
    assert partial_bytes(agent) == 0
    assert not (data / "config.json").exists()


def installed(agent: AgentProcess, name: str) -> str:
    return os.readlink(agent.data_dir / "workloads" / name / "current")


# ---------------------------------------------------------------- the whole path


def test_upload_desired_download_verify_install_report(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, version="1.2.0", payload_bytes=MiB)
    sha = upload(hub, bundle)
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        status = wait_phase(hub, DEVICE, generation)
        assert status["phase"] == "applied", status
        assert installed(agent, "thermo") == "1.2.0"
        app = agent.data_dir / "workloads" / "thermo" / "current" / "bin" / "app"
        assert app.read_text() == "#!/bin/sh\necho thermo 1.2.0\nexec sleep 3600\n"
        assert sha256_of(agent.data_dir / "bundles" / f"{sha}.bundle") == sha
        assert partial_bytes(agent) == 0
        stats = bundle_stats(hub)
        assert stats["bytes_served"] == bundle.stat().st_size  # every byte exactly once
        assert stats["rejected"] == {} and stats["errors_sent"] == {}
        config = json.loads((agent.data_dir / "config.json").read_text())
        assert config["config"]["workloads"] == [{"name": "thermo", "bundle": sha}]
        assert hub.device(DEVICE)["in_sync"] is True
    finally:
        agent.kill()


def test_resume_after_the_agent_is_killed_mid_transfer(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "big.bundle", keys, payload_bytes=16 * MiB)
    size = bundle.stat().st_size
    sha = upload(hub, bundle)
    watcher = RawPeer(broker)
    watcher.subscribe(topic(DEVICE, Channel.BUNDLE_REQ))
    window, chunk = 2, 16 * 1024  # slow enough to be caught in the middle
    agent = agent_for(
        tmp_path, broker, keys, "--fetch-window", str(window), "--fetch-chunk-bytes", str(chunk)
    )
    agent.start()
    try:
        generation = set_workloads(hub, DEVICE, thermo=sha)
        wait_until(
            lambda: partial_bytes(agent) > size // 4, interval_s=0.005, what="a quarter on disk"
        )
        agent.kill()
        on_disk = partial_bytes(agent)
        assert 0 < on_disk < size, "killed mid-transfer"
        asked_before = len(watcher.messages)
        agent.start()
        status = wait_phase(hub, DEVICE, generation)
        assert status["phase"] == "applied", status
        after = [decode_request(raw) for _, raw, _ in watcher.messages[asked_before:]]
        assert after, "the restarted agent asked for the rest"
        assert min(r.offset for r in after) >= on_disk  # nothing on disk was asked for again
        served = bundle_stats(hub)["bytes_served"]
        # Only chunks in flight at the kill can be served twice.
        assert size <= served <= size + 2 * window * chunk, (served, size)
        assert '"resuming bundle download"' in agent.log()
    finally:
        agent.kill()
        watcher.close()


def decode_request(raw: bytes) -> BundleRequest:
    return decode(raw, BundleRequest)


def test_resume_after_the_broker_restarts(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "big.bundle", keys, payload_bytes=16 * MiB)
    size = bundle.stat().st_size
    sha = upload(hub, bundle)
    agent = agent_for(tmp_path, broker, keys, "--fetch-window", "2", "--fetch-chunk-bytes", "16384")
    agent.start()
    try:
        generation = set_workloads(hub, DEVICE, thermo=sha)
        wait_until(
            lambda: partial_bytes(agent) > size // 4, interval_s=0.005, what="a quarter on disk"
        )
        broker.kill()  # a crash: queued chunks and sessions are lost
        on_disk = partial_bytes(agent)
        assert on_disk < size
        broker.start()
        status = wait_phase(hub, DEVICE, generation, timeout_s=90)
        assert status["phase"] == "applied", status
        assert installed(agent, "thermo") == "1.0.0"
        assert bundle_stats(hub)["connects"] >= 2
        assert bundle_stats(hub)["bytes_served"] <= size + 4 * 16384
    finally:
        agent.kill()


def test_http_range_download_path(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=3 * MiB)
    sha = upload(hub, bundle)
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = AgentProcess(tmp_path, DEVICE, broker, root=keys.root_path, hub_url=hub.base_url)
    agent.start()
    try:
        status = wait_phase(hub, DEVICE, generation)
        assert status["phase"] == "applied", status
        assert installed(agent, "thermo") == "1.0.0"
        assert bundle_stats(hub)["requests"] == 0  # nothing came over MQTT
    finally:
        agent.kill()


# ---------------------------------------------------------------- bad input


def refused(hub: HubProcess, generation: int, *fragments: str) -> None:
    status = wait_phase(hub, DEVICE, generation)
    assert status["phase"] == "failed", status
    for fragment in fragments:
        assert fragment in (status["error"] or ""), status


def test_truncated_transfer(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=500_000)
    sha = upload(hub, bundle)
    stored = hub_file(hub, sha)
    os.truncate(stored, stored.stat().st_size - 1000)  # the hub's storage lost the tail
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        refused(hub, generation, "SizeMismatchError", "truncated")
        assert_nothing_installed(agent, sha)
    finally:
        agent.kill()


def test_flipped_byte_in_the_payload_served(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=500_000)
    sha = upload(hub, bundle)
    stored = hub_file(hub, sha)
    data = bytearray(stored.read_bytes())
    data[head_end(bundle) + 1234] ^= 0x01  # tampered on the hub's disk after the upload
    stored.write_bytes(bytes(data))
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        refused(hub, generation, "HashMismatchError")
        assert_nothing_installed(agent, sha)
    finally:
        agent.kill()


def test_manifest_signed_by_an_unauthorised_key(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    """The hub trusts the key (another fleet's root); the device's root does not.

    The device's root authorises the same hub key (desired documents verify) but
    other release keys, so only the bundle is foreign.
    """
    device_keys = Keys(tmp_path / "device-keys", fleet=Fleet(hub_keys=keys.fleet.hub_keys))
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=500_000)
    sha = upload(hub, bundle)
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = agent_for(tmp_path, broker, device_keys)
    agent.start()
    try:
        refused(hub, generation, "ThresholdNotMetError", "release")
        assert_nothing_installed(agent, sha)
        # Refused from the signed manifest: not one payload byte was asked for.
        assert bundle_stats(hub)["bytes_served"] == head_end(bundle)
    finally:
        agent.kill()


def test_lower_security_version_than_installed(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    newer = upload(
        hub, build_bundle(tmp_path / "v2.bundle", keys, version="2.0", security_version=2)
    )
    older_file = build_bundle(tmp_path / "v1.bundle", keys, version="1.0", security_version=1)
    older = upload(hub, older_file)
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        first = set_workloads(hub, DEVICE, thermo=newer)
        assert wait_phase(hub, DEVICE, first)["phase"] == "applied"
        served = bundle_stats(hub)["bytes_served"]
        second = set_workloads(hub, DEVICE, thermo=older)
        refused(hub, second, "RollbackError", "lower than installed 2")
        assert installed(agent, "thermo") == "2.0"
        assert not (agent.data_dir / "workloads" / "thermo" / "1.0").exists()
        assert bundle_stats(hub)["bytes_served"] - served == head_end(older_file)
    finally:
        agent.kill()


def test_unknown_bundle(tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys) -> None:
    """The hub refuses a reference it cannot serve; a file lost later fails on the device."""
    config = {"workloads": [{"name": "thermo", "bundle": "5e" * 32}]}
    refused_put = hub.api.put(f"/devices/{DEVICE}/desired", json={"config": config})
    assert refused_put.status_code == 422 and "5e" * 32 in refused_put.json()["detail"]
    sha = upload(hub, build_bundle(tmp_path / "thermo.bundle", keys))
    generation = set_workloads(hub, DEVICE, thermo=sha)
    hub_file(hub, sha).unlink()  # the hub's disk lost it after the desired state was set
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        refused(hub, generation, "unknown_bundle")
        assert_nothing_installed(agent, sha)
        assert bundle_stats(hub)["errors_sent"] == {"unknown_bundle": 1}
    finally:
        agent.kill()


def test_without_a_root_a_bundle_reference_fails_clearly(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    sha = upload(hub, build_bundle(tmp_path / "thermo.bundle", keys))
    generation = set_workloads(hub, DEVICE, thermo=sha)
    agent = agent_for(tmp_path, broker, None)
    agent.start()
    try:
        refused(hub, generation, "no trusted root", "--root")
        assert bundle_stats(hub)["requests"] == 0
    finally:
        agent.kill()


# ---------------------------------------------------------------- a scripted, broken hub


@pytest.fixture
def device_topic_peer(broker: TestBroker) -> Iterator[RawPeer]:
    peer = RawPeer(broker)
    peer.subscribe(f"driftless/v1/devices/{DEVICE}/reported")
    yield peer
    peer.close()


def desire(peer: RawPeer, keys: Keys, generation: int, sha: str) -> None:
    """Publish a desired document signed with the fleet's hub key, as the hub would."""
    config = {"workloads": [{"name": "thermo", "bundle": sha}]}
    document = Desired(device_id=DEVICE, generation=generation, config=config, issued_at=1.0)
    sealed = seal(encode(document), keys.fleet.hub_keys)
    peer.publish(topic(DEVICE, Channel.DESIRED), sealed, retain=True)


def state(agent: AgentProcess) -> tuple[int, int, str | None]:
    loaded = StateStore(agent.data_dir).load()
    return loaded.applied_generation, loaded.failed_generation, loaded.last_error


def test_a_chunk_at_the_wrong_offset_is_refused_and_asked_for_again(
    tmp_path: Path, broker: TestBroker, keys: Keys, device_topic_peer: RawPeer
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=300_000)
    data, sha = bundle.read_bytes(), sha256_of(bundle)
    payload_at = head_end(bundle)
    lied: list[int] = []

    def answer(request: BundleRequest, data: bytes) -> list[bytes]:
        if request.offset > payload_at and not lied:  # one chunk comes at the wrong offset
            lied.append(request.offset)
            wrong = request.offset + request.length
            return [encode_chunk(request.bundle, wrong, data[wrong : wrong + request.length])]
        return exact_answer(request, data)

    server = ScriptedChunkServer(broker, {sha: data}, answer)
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        desire(device_topic_peer, keys, 1, sha)
        wait_until(lambda: state(agent)[0] == 1, timeout_s=60, what="applied")
        assert installed(agent, "thermo") == "1.0.0"
        asked = [r.offset for r in server.seen()]
        assert asked.count(lied[0]) == 2  # refused, then asked for again
        assert '"why": "wrong_offset"' in agent.log() or "wrong_offset" in agent.log()
    finally:
        agent.kill()
        server.close()


def test_expired_manifest(
    tmp_path: Path, broker: TestBroker, keys: Keys, device_topic_peer: RawPeer
) -> None:
    """The hub refuses expired bundles at upload; a broken hub serving one is refused too."""
    bundle = build_bundle(
        tmp_path / "old.bundle", keys, created=now() - 30 * DAY, expires=now() - DAY
    )
    data, sha = bundle.read_bytes(), sha256_of(bundle)
    server = ScriptedChunkServer(broker, {sha: data})
    agent = agent_for(tmp_path, broker, keys)
    agent.start()
    try:
        desire(device_topic_peer, keys, 1, sha)
        wait_until(lambda: state(agent)[1] == 1, timeout_s=60, what="failed")
        error = state(agent)[2] or ""
        assert "ExpiredMetadataError" in error and "expired" in error
        assert max(r.offset + r.length for r in server.seen()) <= head_end(bundle)
        assert_nothing_installed(agent, sha)
    finally:
        agent.kill()
        server.close()
