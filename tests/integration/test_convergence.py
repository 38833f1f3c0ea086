"""End to end: hub and agents as real processes on a real Mosquitto, through failures."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_agent.store import StateStore
from protocols import Birth, Channel, Status, encode, topic
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration


class Fleet:
    def __init__(self, tmp_path: Path, broker: TestBroker, hub: HubProcess, n: int) -> None:
        self.hub = hub
        self.agents = [AgentProcess(tmp_path, f"dev-{i}", broker) for i in range(n)]
        for agent in self.agents:
            hub.api.post("/devices", json={"id": agent.device_id}).raise_for_status()
            agent.start()
        wait_until(lambda: self.summary()["online"] == n, timeout_s=30, what="all online")

    def summary(self) -> dict[str, int]:
        return self.hub.api.get("/fleet/summary").json()  # type: ignore[no-any-return]

    def set_all(self, **config: object) -> int:
        response = self.hub.api.put("/fleet/desired", json={"config": config})
        response.raise_for_status()
        return max(d["generation"] for d in response.json()["devices"])

    def converged(self, generation: int, *, timeout_s: float = 40) -> None:
        def check() -> bool:
            devices = self.hub.api.get("/devices", params={"limit": 100}).json()["items"]
            return all(
                d["in_sync"] and d["reported_generation"] == generation for d in devices
            ) and all(
                StateStore(a.data_dir).load().applied_generation == generation for a in self.agents
            )

        wait_until(check, timeout_s=timeout_s, what=f"all devices at generation {generation}")

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()


@pytest.fixture
def fleet(tmp_path: Path, broker: TestBroker, hub: HubProcess) -> Iterator[Fleet]:
    instance = Fleet(tmp_path, broker, hub, 3)
    try:
        yield instance
    finally:
        instance.close()


def test_each_agent_reports_its_inventory_in_its_birth(fleet: Fleet, tmp_path: Path) -> None:
    """Real agents: the hub shows what each device is and has left, as the device measured it."""
    for agent in fleet.agents:
        inventory = fleet.hub.device(agent.device_id)["inventory"]
        assert inventory is not None, agent.device_id
        assert inventory["arch"] == platform.machine().lower()
        assert inventory["os"].startswith(platform.system())
        assert inventory["cpu_count"] == os.cpu_count()
        assert 0 < inventory["mem_free_bytes"] <= inventory["mem_total_bytes"]
        assert 0 < inventory["disk_free_bytes"] <= inventory["disk_total_bytes"]
        # The disk is the one holding the agent's data directory.
        assert inventory["disk_total_bytes"] == shutil.disk_usage(agent.data_dir).total


def test_offline_device_applies_only_newest_generation(fleet: Fleet) -> None:
    gen = fleet.set_all(rate=1)
    fleet.converged(gen)
    away = fleet.agents[0]
    assert away.terminate() == 0
    wait_until(lambda: not fleet.hub.device(away.device_id)["online"], what="offline")
    for rate in (2, 3, 4):
        gen = fleet.set_all(rate=rate)
    assert not fleet.hub.device(away.device_id)["in_sync"]
    away.start()
    fleet.converged(gen)
    history = [h.generation for h in StateStore(away.data_dir).load().history]
    assert history == [gen - 3, gen]
    device = fleet.hub.device(away.device_id)
    assert device["online"] and device["in_sync"] and device["last_seen"]


def test_hub_sigkill_and_restart_loses_nothing(fleet: Fleet) -> None:
    gen = fleet.set_all(rate=1)
    fleet.hub.kill()  # possibly before it published: the DB holds the truth
    fleet.hub.start()
    fleet.converged(gen)
    gen = fleet.set_all(rate=2)
    fleet.converged(gen)


def test_broker_restart_with_persistence(fleet: Fleet, broker: TestBroker) -> None:
    gen = fleet.set_all(rate=1)
    fleet.converged(gen)
    broker.stop()
    broker.start()
    gen = fleet.set_all(rate=2)
    fleet.converged(gen)


def test_broker_sigkill_with_nothing_retained(fleet: Fleet, broker: TestBroker) -> None:
    gen = fleet.set_all(rate=1)
    fleet.converged(gen)
    broker.kill()
    broker.wipe_persistence()
    broker.start()
    wait_until(lambda: fleet.hub.api.get("/health").json()["mqtt_connected"], what="hub link")
    gen = fleet.set_all(rate=2)
    fleet.converged(gen)
    # A device that restarts now finds no retained document: the birth republish serves it.
    agent = fleet.agents[1]
    agent.kill()
    broker.kill()
    broker.wipe_persistence()
    broker.start()
    agent.start()
    fleet.converged(gen)


def test_change_while_broker_down_is_delivered_when_it_returns(
    fleet: Fleet, broker: TestBroker
) -> None:
    fleet.converged(fleet.set_all(rate=1))
    broker.stop()
    wait_until(lambda: not fleet.hub.api.get("/health").json()["mqtt_connected"], what="link down")
    gen = fleet.set_all(rate=99)  # the API accepts: the DB is the truth
    assert fleet.hub.device("dev-0")["desired_generation"] == gen
    broker.start()
    fleet.converged(gen)


def test_late_will_from_older_session_does_not_mark_device_offline(
    broker: TestBroker, hub: HubProcess
) -> None:
    """A real Last Will, delivered by the broker after the device's next birth, is ignored."""
    hub.api.post("/devices", json={"id": "ghost"}).raise_for_status()
    status_topic = topic("ghost", Channel.STATUS)
    old_id, old_tls = broker.peer_tls("ghost-old")
    old = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=old_id, protocol=mqtt.MQTTv5)
    old.tls_set_context(old_tls)
    old.will_set(
        status_topic,
        encode(Status(device_id="ghost", online=False, session=1, ts=1)),
        qos=1,
        retain=True,
    )
    old.connect("127.0.0.1", broker.port, keepalive=60)
    old.loop_start()
    peer = RawPeer(broker, role="ghost-new")
    try:
        birth = Birth(
            device_id="ghost",
            session=2,
            boot_epoch=1,
            seq=1,
            applied_generation=0,
            agent_version="t",
            ts=2,
        )
        peer.publish(
            status_topic,
            encode(Status(device_id="ghost", online=True, session=2, ts=2)),
            retain=True,
        )
        peer.publish(topic("ghost", Channel.BIRTH), encode(birth))
        wait_until(lambda: hub.device("ghost")["online"], what="ghost online")
        # Cut the old connection without DISCONNECT: the broker publishes its Will now.
        watcher = RawPeer(broker)
        watcher.subscribe(status_topic)
        old.loop_stop()
        old.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        watcher.wait_for(lambda m: b'"online":false' in m[1] and b'"session":1' in m[1])
        watcher.close()
        marker = Birth(
            device_id="ghost",
            session=2,
            boot_epoch=1,
            seq=2,
            applied_generation=0,
            agent_version="marker",
            ts=3,
        )
        peer.publish(topic("ghost", Channel.BIRTH), encode(marker))
        wait_until(
            lambda: hub.device("ghost").get("agent_version") == "marker",
            what="hub processed messages after the Will",
        )
        assert hub.device("ghost")["online"] is True
        assert hub.stats()["stale"].get("stale_status", 0) >= 1
    finally:
        peer.close()


def test_device_registered_again_still_converges(fleet: Fleet) -> None:
    """The hub's count restarts at 1; the agent remembers more. The hub must re-issue past it."""
    for rate in (1, 2, 3):
        gen = fleet.set_all(rate=rate)
    fleet.converged(gen)
    agent = fleet.agents[0]
    assert fleet.hub.api.delete(f"/devices/{agent.device_id}").status_code == 204
    wait_until(  # the broker closes the agent's connection; then the id may be forgotten
        lambda: fleet.hub.device(agent.device_id)["broker_cut_off_at"], what="cut off"
    )
    purge = fleet.hub.api.delete(f"/devices/{agent.device_id}", params={"purge": "true"})
    assert purge.status_code == 204, purge.text
    fleet.hub.api.post("/devices", json={"id": agent.device_id}).raise_for_status()
    response = fleet.hub.api.put(f"/devices/{agent.device_id}/desired", json={"config": {"r": 9}})
    assert response.json()["desired_generation"] == 1  # what a fresh row knows

    def applied_new_config() -> bool:
        doc = agent.data_dir.joinpath("config.json").read_text()
        device = fleet.hub.device(agent.device_id)
        return '"r": 9' in doc and device["in_sync"] and device["desired_generation"] > gen

    wait_until(applied_new_config, what="re-registered device applies the new config")
