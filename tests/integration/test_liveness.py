"""Liveness with a real hub, a real Mosquitto and simulated devices (the real agent core).

Devices heartbeat every second; the hub marks a device offline after two missed
intervals. A muted device (a hung agent whose MQTT client still answers pings, so
the broker keeps its connection and sends no Will) is marked offline by the
liveness controller alone, the others stay online, and its next heartbeat brings it
back; the history of both flips is at ``GET /api/v1/devices/{id}/events``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from simulator.fleet import Fleet, FleetConfig, device_ids
from tests.pki import TestBroker
from tests.support import HubProcess

pytestmark = pytest.mark.integration

T = TypeVar("T")
HEARTBEAT_S = 1.0
MISSED = 2
DEADLINE_S = 20.0


@pytest.fixture
def hub(tmp_path: Path, broker: TestBroker) -> Iterator[HubProcess]:
    instance = HubProcess(tmp_path / "hub", broker)
    # The hub's default interval is long: only the devices' announced 1 s can explain
    # a device marked offline within the deadline.
    instance.argv += ["--heartbeat-s", "600", "--offline-after-missed", str(MISSED)]
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()
        instance.api.close()


async def poll(predicate: Callable[[], T], what: str, timeout_s: float = DEADLINE_S) -> T:
    """Poll a (blocking) predicate off the event loop, so the fleet keeps running."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last={value!r}")
        await asyncio.sleep(0.1)


def events(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    response = hub.api.get(f"/devices/{device_id}/events")
    response.raise_for_status()
    return list(reversed(response.json()["items"]))  # oldest first


async def test_a_silent_device_is_marked_offline_without_a_will_and_comes_back(
    tmp_path: Path, broker: TestBroker, hub: HubProcess
) -> None:
    ids = device_ids(3, prefix="live")
    quiet, others = ids[0], ids[1:]
    for device_id in ids:
        hub.api.post("/devices", json={"id": device_id}).raise_for_status()
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        heartbeat_s=HEARTBEAT_S,
        identity_dir=broker.pki.sim_identities(tmp_path / "identities", list(ids)),
    )
    async with Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        await poll(lambda: all(hub.device(d)["online"] for d in ids), "every device online")

        fleet.devices[quiet].mute()
        muted_at = time.monotonic()
        await poll(lambda: not hub.device(quiet)["online"], f"{quiet} marked offline")
        took = time.monotonic() - muted_at
        assert took >= (MISSED - 1) * HEARTBEAT_S, took  # not before its intervals ran out
        assert all(hub.device(d)["online"] for d in others)  # their heartbeats kept coming
        assert fleet.counters.connections_lost == 0  # no Will: the connection never dropped
        offline = events(hub, quiet)[-1]
        assert offline["kind"] == "offline"
        assert f"{MISSED} heartbeats of {HEARTBEAT_S:g} s missed" in offline["detail"]

        fleet.devices[quiet].mute(False)
        await poll(lambda: hub.device(quiet)["online"], f"{quiet} back with its next heartbeat")
        assert [e["kind"] for e in events(hub, quiet)] == ["online", "offline", "online"]
        assert all([e["kind"] for e in events(hub, d)] == ["online"] for d in others)
        device = hub.device(quiet)
        assert device["online_changed_at"] == events(hub, quiet)[-1]["at"]
