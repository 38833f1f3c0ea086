"""Held documents and heartbeats with the real agent (paho), a real hub and a real Mosquitto.

A held document (config ``hold: true``) is fetched, verified and installed but not
switched: the hub shows the device ``staged`` with nothing applied and records its
``staged_generation``; the next generation without ``hold`` switches, its bundle
served only once (the staged copy in the cache is reused). Meanwhile the agent's
heartbeats arrive at the interval it announced in its birth.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols import Birth, Reported, decode
from tests.integration.bundle_support import (
    Keys,
    build_bundle,
    bundle_stats,
    hub_with_root,
    register,
    sha256_of,
    upload,
    wait_phase,
)
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration

DEVICE = "held-1"
HEARTBEAT_S = 1.0


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


def put_config(hub: HubProcess, config: dict[str, Any]) -> int:
    response = hub.api.put(f"/devices/{DEVICE}/desired", json={"config": config})
    response.raise_for_status()
    generation: int = response.json()["desired_generation"]
    return generation


def staged_generation(hub: HubProcess) -> int:
    db = sqlite3.connect(hub.db_path)
    try:
        (value,) = db.execute(
            "SELECT staged_generation FROM device WHERE id = ?", (DEVICE,)
        ).fetchone()
    finally:
        db.close()
    return int(value)


def test_a_held_document_stages_the_next_one_switches_and_heartbeats_keep_time(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    bundle = build_bundle(tmp_path / "thermo.bundle", keys, version="2.0.0")
    sha = upload(hub, bundle)
    workloads = [{"name": "thermo", "bundle": sha}]
    held = put_config(hub, {"workloads": workloads, "hold": True})
    peer = RawPeer(broker)
    peer.subscribe(f"driftless/v1/devices/{DEVICE}/+")
    agent = AgentProcess(
        tmp_path, DEVICE, broker, root=keys.root_path, extra=["--heartbeat-s", str(HEARTBEAT_S)]
    )
    agent.start()
    try:
        status = wait_until(
            lambda: (s := hub.device(DEVICE)["status"])["phase"] == "staged" and s,
            timeout_s=60,
            what="the held generation staged",
        )
        assert status["generation"] == held
        device = hub.device(DEVICE)
        assert device["reported_generation"] == 0 and not device["in_sync"]
        assert staged_generation(hub) == held
        data = agent.data_dir
        assert sha256_of(data / "bundles" / f"{sha}.bundle") == sha  # fetched and verified
        assert (data / "workloads" / "thermo" / "2.0.0").is_dir()  # installed (unpacked)
        assert not (data / "workloads" / "thermo" / "current").exists()  # not switched
        assert not (data / "config.json").exists()  # nothing applied

        switch = put_config(hub, {"workloads": workloads})
        assert wait_phase(hub, DEVICE, switch)["phase"] == "applied"
        assert os.readlink(data / "workloads" / "thermo" / "current") == "2.0.0"
        assert bundle_stats(hub)["bytes_served"] == bundle.stat().st_size  # once, when staged

        # Heartbeats: state reports at the announced interval (the device's own clock).
        births = [decode(p, Birth) for t, p, _ in peer.messages if t.endswith("/birth")]
        assert births and births[-1].heartbeat_s == HEARTBEAT_S
        first = len(peer.messages)
        wait_until(
            lambda: sum(1 for t, _, _ in peer.messages[first:] if t.endswith("/reported")) >= 4,
            timeout_s=15,
            what="four heartbeats",
        )
        beats = [
            decode(p, Reported) for t, p, _ in peer.messages[first:] if t.endswith("/reported")
        ]
        assert all(b.phase == "applied" and b.generation == switch for b in beats), beats
        assert [b.seq for b in beats] == sorted({b.seq for b in beats})  # the next seq each
        gaps = [b.ts - a.ts for a, b in itertools.pairwise(beats)]
        assert all(0.8 * HEARTBEAT_S <= gap <= 2.0 * HEARTBEAT_S for gap in gaps), gaps
        assert beats[-1].workloads and beats[-1].workloads[0].state == "healthy"
    finally:
        agent.kill()
        peer.close()
