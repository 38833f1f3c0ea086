"""Signed desired state end to end: a real hub signs, a real agent verifies (invariant 9).

A raw MQTT peer plays a compromised broker: it overwrites the device's retained
desired document with forgeries. The agent must refuse each, keep running what
it had, and still apply the hub's next genuine change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from firmware_bundles.devfleet import DevFleet
from firmware_bundles.keys import SigningKey
from protocols import Channel, Desired, encode, topic
from protocols.signed import seal
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration

DEVICE = "signed-1"


@pytest.fixture
def fleet(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "keys")


@pytest.fixture
def hub(tmp_path: Path, broker: TestBroker, fleet: DevFleet) -> Iterator[HubProcess]:
    instance = HubProcess(tmp_path / "hub", broker)
    instance.argv += ["--trust-root", str(fleet.root_path)]
    instance.argv += ["--signing-key", str(fleet.hub_key_path)]
    instance.start()
    try:
        yield instance
    finally:
        instance.close()


def applied(agent: AgentProcess) -> tuple[int, dict[str, object] | None]:
    state = StateStore(agent.data_dir).load()
    config_file = agent.data_dir / "config.json"
    config = json.loads(config_file.read_text())["config"] if config_file.exists() else None
    return state.applied_generation, config


def set_desired(hub: HubProcess, **config: object) -> int:
    response = hub.api.put(f"/devices/{DEVICE}/desired", json={"config": config})
    response.raise_for_status()
    generation: int = response.json()["desired_generation"]
    return generation


def forged(generation: int, **config: object) -> bytes:
    doc = Desired(device_id=DEVICE, generation=generation, config=config, issued_at=1.0)
    return encode(doc)


def test_the_agent_applies_hub_signed_documents_and_refuses_forgeries(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, fleet: DevFleet
) -> None:
    hub.api.post("/devices", json={"id": DEVICE}).raise_for_status()
    agent = AgentProcess(tmp_path, DEVICE, broker, root=fleet.root_path)
    agent.start()
    peer = RawPeer(broker)
    try:
        first = set_desired(hub, mode="eco", threshold=0.75)
        wait_until(lambda: applied(agent)[0] == first, what="genuine document applied")
        assert applied(agent)[1] == {"mode": "eco", "threshold": 0.75}

        # The broker (or anyone with its credentials) replaces the retained document.
        desired_topic = topic(DEVICE, Channel.DESIRED)
        forgeries = {
            "unsigned": forged(50, mode="evil"),
            "bad_signature": seal(forged(51, mode="evil"), [SigningKey.generate()]),
            "release key": seal(forged(52, mode="evil"), [fleet.release_key]),
        }
        for payload in forgeries.values():
            peer.publish(desired_topic, payload, retain=True)
        wait_until(
            lambda: agent.log().count("rejected message") >= len(forgeries),
            what="every forgery rejected",
        )
        log = agent.log()
        assert '"reason": "unsigned"' in log and '"reason": "bad_signature"' in log
        assert applied(agent) == (first, {"mode": "eco", "threshold": 0.75})

        # The hub's next change still goes through: a forgery blocks nothing.
        second = set_desired(hub, mode="boost")
        wait_until(lambda: applied(agent)[0] == second, what="next genuine document applied")
        assert applied(agent)[1] == {"mode": "boost"}
        history = [h.generation for h in StateStore(agent.data_dir).load().history]
        assert history == [first, second]
    finally:
        peer.close()
        agent.kill()


def _driftless(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driftless.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_an_agent_without_a_root_starts_only_when_told_it_is_insecure(tmp_path: Path) -> None:
    result = _driftless(
        "agent", "run", "--device-id", "d", "--broker", "mqtt://127.0.0.1:9",
        "--data-dir", str(tmp_path / "agent"),
    )  # fmt: skip
    assert result.returncode == 2
    assert "--insecure-unsigned" in result.stderr and "no --root" in result.stderr


def test_a_hub_whose_key_the_root_does_not_authorise_refuses_to_start(
    tmp_path: Path, fleet: DevFleet
) -> None:
    result = _driftless(
        "hub", "serve", "--broker", "mqtt://127.0.0.1:9", "--port", "9",
        "--db", f"sqlite:///{tmp_path / 'hub.db'}",
        "--trust-root", str(fleet.root_path),
        "--signing-key", str(fleet.release_key_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "hub cannot start" in result.stderr and "hub threshold" in result.stderr
