"""An API-only hub process beside the one that runs the MQTT link, on one database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from protocols import Channel, topic
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def hubs(tmp_path: Path, broker: TestBroker) -> Iterator[tuple[HubProcess, HubProcess]]:
    link = HubProcess(tmp_path / "link", broker)
    link.argv += ["--desired-poll-s", "0.1"]
    api = HubProcess(tmp_path / "api", broker)
    at = api.argv.index("--db") + 1
    api.argv[at] = f"sqlite:///{link.db_path}"  # the same database
    api.db_path = link.db_path  # its admin token goes into that database too
    api._token = None
    api.api.close()
    api.api = api.client()
    api.argv += ["--no-link"]
    link.start()
    api.start(wait_mqtt=False)
    try:
        yield link, api
    finally:
        api.close()
        link.close()


def test_a_change_made_through_an_api_only_process_reaches_the_device(
    tmp_path: Path, broker: TestBroker, hubs: tuple[HubProcess, HubProcess]
) -> None:
    link, api = hubs
    assert api.api.get("/health").json()["mqtt_connected"] is False  # it runs no link
    api.api.post("/devices", json={"id": "pump-1"}).raise_for_status()
    agent = AgentProcess(tmp_path, "pump-1", broker)
    agent.start()
    try:
        wait_until(lambda: link.device("pump-1")["online"], what="pump-1 online")
        for value in (1, 2, 3):
            response = api.api.put("/devices/pump-1/desired", json={"config": {"v": value}})
            generation = response.json()["desired_generation"]
            wait_until(
                lambda g=generation: StateStore(agent.data_dir).load().applied_generation == g,
                what=f"generation {generation} applied",
            )
        # Fleet-wide through the API process too; the link published each change once.
        api.api.put("/fleet/desired", json={"config": {"v": 4}}).raise_for_status()
        wait_until(lambda: api.device("pump-1")["in_sync"], what="in sync after fleet change")
        stats = link.stats()
        assert stats["feed_changes"] == 4
        assert stats["desired_published"] == 4
    finally:
        agent.kill()


def test_the_link_process_alone_publishes_a_change_once(
    tmp_path: Path, broker: TestBroker, hubs: tuple[HubProcess, HubProcess]
) -> None:
    """Heard in-process and seen in the feed: published once, not twice."""
    link, _ = hubs
    link.api.post("/devices", json={"id": "pump-2"}).raise_for_status()
    link.api.put("/devices/pump-2/desired", json={"config": {"v": 1}}).raise_for_status()
    wait_until(lambda: link.stats()["desired_published"] >= 1, what="published")
    # Give the feed several polls to (wrongly) queue it again.
    wait_until(lambda: link.stats()["sweeps"] >= 1, what="link up")
    link.api.put("/devices/pump-2/desired", json={"config": {"v": 2}}).raise_for_status()
    wait_until(lambda: link.stats()["desired_published"] >= 2, what="second published")
    assert link.stats()["desired_published"] == 2


def test_a_device_deleted_through_an_api_only_process_loses_its_retained_document(
    broker: TestBroker, hubs: tuple[HubProcess, HubProcess]
) -> None:
    """The deletion is in the change feed: the link clears the broker's retained copy, and
    a change made after it (its feed value is new, not the deleted row's) still goes out."""
    link, api = hubs
    for device in ("pump-3", "pump-4"):
        api.api.post("/devices", json={"id": device}).raise_for_status()
    api.api.put("/devices/pump-3/desired", json={"config": {"v": 1}}).raise_for_status()
    api.api.put("/devices/pump-4/desired", json={"config": {"v": 1}}).raise_for_status()
    wait_until(lambda: link.stats()["desired_published"] >= 2, what="both published")
    assert api.api.delete("/devices/pump-4").status_code == 204  # it held the newest change
    wait_until(lambda: link.stats()["desired_cleared"] >= 1, what="retained copy cleared")
    api.api.put("/devices/pump-3/desired", json={"config": {"v": 2}}).raise_for_status()
    peer = RawPeer(broker)  # a fresh subscriber sees what the broker retains now
    try:
        peer.subscribe(topic("pump-3", Channel.DESIRED))
        peer.subscribe(topic("pump-4", Channel.DESIRED))
        peer.wait_for(lambda m: m[0] == topic("pump-3", Channel.DESIRED) and b'"v":2' in m[1])
        assert not [m for m in peer.messages if m[0] == topic("pump-4", Channel.DESIRED)]
    finally:
        peer.close()
