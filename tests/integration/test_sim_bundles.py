"""Simulated devices fetch a signed bundle from a real hub over a real Mosquitto.

A small fleet (the real agent core and the real fetch core per device, one
process) is told to run a workload whose bundle the hub holds. On a flaky,
slow network every device still applies it, each byte is served about once
(resumption does not ask again for what arrived), and at least one transfer
resumed after a disconnect. A copy tampered with on the hub's disk is refused
by every device, and none applies it. The broker is the secure one: each device
connects over mutual TLS with its own certificate, so the ACL holds it to its own
bundle requests and frames.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.settings import FetchConfig
from simulator.fleet import Fleet, FleetConfig, FleetCounters, device_ids
from simulator.profiles import FlakySpec, Profile, SlowSpec
from tests.integration.bundle_support import (
    Keys,
    build_bundle,
    bundle_stats,
    hub_file,
    hub_with_root,
    upload,
)
from tests.integration.test_sim_bench import processes_naming
from tests.integration.test_sim_fleet import identities
from tests.pki import TestBroker
from tests.support import HubProcess, run_bench

pytestmark = pytest.mark.integration

DEVICES = 20
DEADLINE_S = 25.0
SLACK = 0.10  # duplicates allowed: answers in flight when a link drops, sent again after it
LABELS = {"test": "sim-bundles"}
CHUNK_BYTES = 8 * 1024
WINDOW = 4


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def hub(tmp_path: Path, broker: TestBroker, keys: Keys) -> Iterator[HubProcess]:
    instance = hub_with_root(tmp_path / "hub", broker, keys)
    try:
        yield instance
    finally:
        instance.close()


def register(hub: HubProcess, ids: tuple[str, ...]) -> None:
    body = {"devices": [{"id": d, "labels": LABELS} for d in ids]}
    hub.api.post("/devices/batch", json=body).raise_for_status()


def push_workload(hub: HubProcess, sha: str) -> int:
    """One fleet-wide desired state running the bundle; returns the generation it set."""
    config = {"workloads": [{"name": "thermo", "bundle": sha}]}
    response = hub.api.put(
        "/fleet/desired", json={"selector": {"labels": LABELS}, "config": config}
    )
    response.raise_for_status()
    generations = {int(d["generation"]) for d in response.json()["devices"]}
    assert len(generations) == 1, generations
    return generations.pop()


async def hub_eventually(
    hub: HubProcess, done: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll ``GET /fleet/summary`` without blocking the fleet's event loop."""
    last: dict[str, Any] = {}
    for _ in range(int(DEADLINE_S / 0.1)):
        last = (await asyncio.to_thread(hub.api.get, "/fleet/summary")).json()
        if done(last):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last={last}")


def tamper(stored: Path) -> None:
    """Flip one payload byte of the hub's stored copy, behind the hub's back."""
    os.chmod(stored, 0o600)
    with open(stored, "r+b") as handle:
        handle.seek(stored.stat().st_size - 100)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def settled(generation: int) -> Callable[[FleetCounters], bool]:
    def check(c: FleetCounters) -> bool:
        return c.applied.get(generation, 0) + c.failed.get(generation, 0) >= DEVICES

    return check


async def test_a_flaky_fleet_fetches_a_bundle_resuming_and_each_byte_is_served_about_once(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=160_000)
    size = bundle.stat().st_size
    sha = upload(hub, bundle)
    ids = device_ids(DEVICES, prefix="fetch")
    register(hub, ids)
    # Transfers of ~1.6 s each (100 kB/s links) against ~0.8 s online: most drop mid-way.
    profile = Profile(
        name="flaky-slow",
        flaky=FlakySpec(mean_online_s=0.8, mean_offline_s=0.3, max_offline_s=1.0),
        slow=SlowSpec(latency_s=0.005, bandwidth_bytes_per_s=100_000),
    )
    config = FleetConfig.from_profile(
        profile,
        broker_url=broker.url,
        device_ids=ids,
        seed=4,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        root_path=keys.root_path,
        fetch=FetchConfig(chunk_bytes=CHUNK_BYTES, window_chunks=WINDOW),
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    served_before = bundle_stats(hub)["bytes_served"]
    async with Fleet(config) as fleet:
        await fleet.wait_until(
            lambda c: c.ever_connected == DEVICES, timeout_s=DEADLINE_S, what="every device"
        )
        generation = push_workload(hub, sha)
        await fleet.wait_until(
            settled(generation), timeout_s=DEADLINE_S, what="every device to finish"
        )
        c = fleet.counters
        b = c.bundles
    served = bundle_stats(hub)["bytes_served"] - served_before
    assert c.applied == {generation: DEVICES} and c.failed == {}, (c.failed, b.errors)
    assert (b.jobs_ok, b.fetched, b.errors) == (DEVICES, DEVICES, {})
    assert b.bytes_accepted == DEVICES * size  # every byte of every copy verified once
    assert b.link_drops >= 1 and b.resumes >= 1 and b.fetched_after_resume >= 1, b
    assert b.resumed_bytes > 0
    assert DEVICES * size <= served <= DEVICES * size * (1 + SLACK), (served / DEVICES / size, b)
    # Beyond one copy each, at most the requests in flight when a link dropped were served
    # twice: the device cannot know which of them reached the hub, so it asks again.
    assert served - DEVICES * size <= b.link_drops * WINDOW * CHUNK_BYTES


async def test_a_bundle_tampered_with_on_the_hubs_disk_is_refused_by_every_device(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, payload_bytes=50_000)
    sha = upload(hub, bundle)
    tamper(hub_file(hub, sha))
    ids = device_ids(DEVICES, prefix="tamper")
    register(hub, ids)
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        seed=1,
        root_path=keys.root_path,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        generation = push_workload(hub, sha)
        await fleet.wait_until(
            settled(generation), timeout_s=DEADLINE_S, what="every device to finish"
        )
        c = fleet.counters
        assert c.failed == {generation: DEVICES} and c.applied == {}
        assert c.bundles.errors == {"HashMismatchError": DEVICES}
        assert c.bundles.fetched == 0
        for device in fleet.devices.values():
            state = device.core.state
            assert state.applied_generation == 0 and state.failed_generation == generation
            assert state.last_error is not None and "HashMismatchError" in state.last_error
            assert device.transfers is not None and not device.transfers.disk.verified
            assert not device.transfers.disk.partials  # nothing of it stays
        summary = await hub_eventually(
            hub, lambda s: s["failed"] == DEVICES, "the hub to see every device fail"
        )
        assert summary["in_sync"] == 0


def test_the_bundle_fleet_bench_runs_both_phases_and_cleans_up(tmp_path: Path) -> None:
    """The benchmark end to end at a tiny size (worker processes, --root), so it cannot rot."""
    profile = tmp_path / "quick-flaky.toml"
    profile.write_text(
        'name = "quick-flaky"\nbase = "flaky"\n'
        "[flaky]\nmean_online_s = 1.0\nmean_offline_s = 0.3\nmax_offline_s = 1.0\n"
    )
    out, work = tmp_path / "bundle-fleet.json", tmp_path / "work"
    argv = [
        *("--devices", str(DEVICES), "--workers", "2", "--repeats", "1"),
        *("--payload-kib", "192", "--fetch-chunk-kib", "16", "--flaky-profile", str(profile)),
        *("--deadline-s", "30", "--json", str(out), "--workdir", str(work)),
    ]
    done = run_bench("bundle_fleet", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio flaky/stable time" in done.stdout
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m simulator.bench.bundle_fleet")
    stable, flaky = result["phases"]
    assert (stable["profile"], flaky["profile"]) == ("stable", "flaky")
    for phase in (stable, flaky):
        assert phase["devices"]["fetched"] == DEVICES and phase["devices"]["errors"] == {}
        assert phase["bundle_bytes"] > 192 * 1024 and phase["applied_s"] > 0
        assert phase["requests"] == phase["chunks_served"]  # every request answered with bytes
    assert stable["served_per_device_ratio"] == 1.0 and stable["devices"]["link_drops"] == 0
    assert 1.0 <= flaky["served_per_device_ratio"] <= 1 + SLACK
    assert flaky["network_drops"] > 0
    assert processes_naming(str(work)) == []
