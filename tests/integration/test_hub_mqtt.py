"""The hub as a real process on a real Mosquitto, driven by a raw MQTT test device.

Every wait has a deadline (tests.support.wait_until or a condition variable); nothing sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from protocols import (
    MAX_PAYLOAD_BYTES,
    Birth,
    Channel,
    Desired,
    Message,
    Reported,
    Status,
    decode,
    encode,
    topic,
)
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration


class Peer:
    """A raw MQTT 5 client: publishes anything, records what it receives."""

    def __init__(
        self, broker: TestBroker, *, role: str | None = None, will: tuple[str, bytes] | None = None
    ) -> None:
        """``role``: the same role connects with the same certificate (hence client id)."""
        self.received: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        client_id, context = broker.peer_tls(role)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(context)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_message = self._on_message
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(5), "test peer could not connect"

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append(message)
            self._cond.notify_all()

    def subscribe(self, name: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(name, qos=1)
        assert done.wait(5), f"no SUBACK for {name}"

    def publish_raw(self, name: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(name, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"publish to {name} not acknowledged"

    def send(self, message: Message, *, retain: bool = False) -> None:
        channel = Channel(type(message).__struct_config__.tag)
        self.publish_raw(topic(message.device_id, channel), encode(message), retain=retain)

    def wait_for(
        self, predicate: Callable[[mqtt.MQTTMessage], bool], *, timeout_s: float = 10
    ) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for message in self.received:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.received]
                    raise AssertionError(f"no matching message after {timeout_s}s; got {seen}")
                self._cond.wait(left)

    def wait_for_desired(self, device_id: str, generation: int) -> Desired:
        def match(m: mqtt.MQTTMessage) -> bool:
            if m.topic != topic(device_id, Channel.DESIRED) or not m.payload:
                return False
            return decode(m.payload, Desired).generation == generation

        return decode(self.wait_for(match).payload, Desired)

    def drop_with_will(self) -> None:
        """DISCONNECT with reason 0x04: the broker publishes the Will, as after a crash."""
        self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
        self.client.loop_stop()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def birth(device_id: str = "d1", **kw: Any) -> Birth:
    fields: dict[str, Any] = {
        "session": 1,
        "boot_epoch": 1,
        "seq": 0,
        "applied_generation": 0,
        "agent_version": "test-1",
        "ts": time.time(),
    }
    return Birth(device_id=device_id, **{**fields, **kw})


def report(device_id: str = "d1", **kw: Any) -> Reported:
    fields: dict[str, Any] = {
        "boot_epoch": 1,
        "seq": 1,
        "phase": "applied",
        "generation": 1,
        "applied_generation": 1,
        "ts": time.time(),
    }
    return Reported(device_id=device_id, **{**fields, **kw})


def status(device_id: str = "d1", **kw: Any) -> Status:
    return Status(device_id=device_id, **{"online": True, "session": 1, "ts": time.time(), **kw})


@pytest.fixture
def peer(broker: TestBroker) -> Iterator[Peer]:
    instance = Peer(broker)
    try:
        yield instance
    finally:
        instance.close()


def register(hub: HubProcess, device_id: str = "d1") -> None:
    hub.api.post("/devices", json={"id": device_id}).raise_for_status()


def set_desired(hub: HubProcess, device_id: str, **config: object) -> int:
    response = hub.api.put(f"/devices/{device_id}/desired", json={"config": config})
    response.raise_for_status()
    return int(response.json()["desired_generation"])


def applied(hub: HubProcess) -> int:
    return int(hub.stats()["applied"])


# -- births, wills, status -----------------------------------------------------------------


def test_birth_marks_online_and_republishes_lost_retained_desired(
    hub: HubProcess, peer: Peer, broker: TestBroker
) -> None:
    register(hub)
    generation = set_desired(hub, "d1", rate=5)
    peer.subscribe(topic("d1", Channel.DESIRED))
    assert peer.wait_for_desired("d1", generation).config == {"rate": 5}
    # The broker "loses" its retained copy; a fresh subscriber gets nothing.
    peer.publish_raw(topic("d1", Channel.DESIRED), b"", retain=True)
    published = hub.stats()["desired_published"]
    fresh = Peer(broker)
    try:
        fresh.subscribe(topic("d1", Channel.DESIRED))
        peer.send(birth(session=1, applied_generation=0, agent_version="agent-7"))
        wait_until(lambda: hub.device("d1")["online"], what="d1 online")
        document = fresh.wait_for_desired("d1", generation)  # republished because of the birth
        assert document.config == {"rate": 5}
        assert fresh.wait_for(lambda m: m.topic.endswith("/desired")).retain is False  # live copy
    finally:
        fresh.close()
    device = hub.device("d1")
    assert (device["session"], device["agent_version"]) == (1, "agent-7")
    assert device["last_seen"] is not None
    assert hub.stats()["desired_published"] == published + 1
    # and it is retained again: a late subscriber finds it
    late = Peer(broker)
    try:
        late.subscribe(topic("d1", Channel.DESIRED))
        assert late.wait_for(lambda m: m.topic.endswith("/desired") and bool(m.payload)).retain
    finally:
        late.close()


def test_birth_already_at_desired_generation_is_not_republished(
    hub: HubProcess, peer: Peer
) -> None:
    register(hub)
    generation = set_desired(hub, "d1", rate=1)
    wait_until(lambda: hub.stats()["desired_published"] == 1, what="first publish")
    peer.send(birth(applied_generation=generation))
    wait_until(lambda: hub.device("d1")["in_sync"], what="in sync from the birth")
    assert hub.stats()["desired_published"] == 1


def test_will_from_older_session_after_newer_birth_is_ignored(
    hub: HubProcess, peer: Peer, broker: TestBroker
) -> None:
    register(hub)
    will = (topic("d1", Channel.STATUS), encode(status(online=False, session=1)))
    old = Peer(broker, role="d1-old", will=will)
    old.send(status(session=1), retain=True)
    old.send(birth(session=1))
    wait_until(lambda: hub.device("d1")["session"] == 1, what="session 1")
    peer.send(status(session=2), retain=True)
    peer.send(birth(session=2, seq=1))
    wait_until(lambda: hub.device("d1")["session"] == 2, what="session 2")
    old.drop_with_will()  # the broker now delivers the Will of session 1
    wait_until(lambda: hub.stats()["stale"].get("stale_status") == 1, what="stale will counted")
    device = hub.device("d1")
    assert device["online"] is True and device["session"] == 2


def test_will_of_current_session_marks_offline(hub: HubProcess, broker: TestBroker) -> None:
    register(hub)
    will = (topic("d1", Channel.STATUS), encode(status(online=False, session=3)))
    device = Peer(broker, role="d1", will=will)
    device.send(status(session=3), retain=True)
    device.send(birth(session=3))
    wait_until(lambda: hub.device("d1")["online"], what="online")
    device.drop_with_will()
    wait_until(lambda: not hub.device("d1")["online"], what="offline after the Will")
    assert hub.device("d1")["session"] == 3
    assert hub.stats()["stale"] == {}


def test_stale_birth_from_older_session_changes_nothing(hub: HubProcess, peer: Peer) -> None:
    register(hub)
    peer.send(birth(session=5, agent_version="new"))
    wait_until(lambda: hub.device("d1")["session"] == 5, what="session 5")
    peer.send(birth(session=4, boot_epoch=9, agent_version="old"))
    wait_until(lambda: hub.stats()["stale"].get("stale_birth") == 1, what="stale birth")
    assert hub.device("d1")["agent_version"] == "new"


# -- reports -------------------------------------------------------------------------------


def test_duplicate_and_out_of_order_reports_change_nothing(hub: HubProcess, peer: Peer) -> None:
    register(hub)
    set_desired(hub, "d1", v=1)
    set_desired(hub, "d1", v=2)
    newest = report(boot_epoch=2, seq=5, generation=2, applied_generation=2)
    peer.send(newest)
    wait_until(lambda: hub.device("d1")["reported_generation"] == 2, what="report applied")
    before = hub.device("d1")
    peer.send(newest)  # duplicate delivery
    peer.send(report(boot_epoch=2, seq=4, generation=1, applied_generation=1))  # late
    peer.send(report(boot_epoch=1, seq=99, phase="failed", generation=2, applied_generation=1,
                     failed_generation=2, error="old boot"))  # fmt: skip
    wait_until(lambda: hub.stats()["stale"].get("stale_report") == 3, what="3 stale reports")
    after = hub.device("d1")
    assert after == before
    assert (after["last_report_epoch"], after["last_report_seq"]) == (2, 5)
    assert after["in_sync"] is True and after["status"]["phase"] == "applied"


def test_failed_report_is_shown_with_its_error(hub: HubProcess, peer: Peer) -> None:
    register(hub)
    generation = set_desired(hub, "d1", v=1)
    peer.send(
        report(phase="failed", generation=generation, applied_generation=0,
               failed_generation=generation, error="exit status 3")
    )  # fmt: skip
    wait_until(lambda: hub.device("d1")["status"]["phase"] == "failed", what="failed report")
    device = hub.device("d1")
    assert device["status"] == {"phase": "failed", "generation": 1, "error": "exit status 3"}
    assert device["failed_generation"] == 1 and device["in_sync"] is False
    assert hub.api.get("/fleet/summary").json()["failed"] == 1


# -- bad input -----------------------------------------------------------------------------

VALID = report()


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        pytest.param(topic("d1", Channel.REPORTED), b'{"v":1,"kind":', "malformed", id="malformed"),
        pytest.param(
            topic("d1", Channel.REPORTED),
            encode(VALID).replace(b'"v":1', b'"v":2'),
            "unsupported_version",
            id="wrong-protocol-version",
        ),
        pytest.param(
            topic("d1", Channel.REPORTED),
            b"{" + b" " * MAX_PAYLOAD_BYTES + b"}",
            "oversized",
            id="oversized",
        ),
        pytest.param(
            topic("d1", Channel.REPORTED),
            encode(report(device_id="d2")),
            "device_mismatch",
            id="body-claims-another-device",
        ),
        pytest.param(
            topic("d1", Channel.REPORTED), encode(birth()), "wrong_kind", id="birth-on-reported"
        ),
        pytest.param(
            topic("d1", Channel.BIRTH),
            encode(birth()).replace(b'"session":1', b'"session":"x"'),
            "invalid_fields",
            id="invalid-field",
        ),
        pytest.param(
            "driftless/v1/devices/-bad/reported",
            encode(VALID),
            "bad_device_id",
            id="illegal-device-id-in-topic",
        ),
        pytest.param(
            topic("ghost", Channel.REPORTED),
            encode(report(device_id="ghost")),
            "unknown_device",
            id="unregistered-device",
        ),
    ],
)
def test_bad_input_is_rejected_counted_and_the_hub_keeps_serving(
    hub: HubProcess, peer: Peer, name: str, payload: bytes, reason: str
) -> None:
    register(hub)
    register(hub, "d2")
    peer.publish_raw(name, payload)
    wait_until(lambda: hub.stats()["rejected"].get(reason) == 1, what=f"rejection {reason}")
    assert sum(hub.stats()["rejected"].values()) == 1
    assert hub.device("d1")["last_report_seq"] == -1
    assert hub.device("d2")["last_report_seq"] == -1
    peer.send(VALID)
    wait_until(lambda: hub.device("d1")["reported_generation"] == 1, what="valid report")
    assert hub.stats()["errors"] == {}
    assert "Traceback" not in hub.log()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("driftless/v1/devices/d1/nope", id="unknown-channel"),
        pytest.param("driftless/v1/devices/d1/reported/extra", id="extra-level"),
        pytest.param("driftless/v1/devices/d1/desired", id="desired-from-device"),
    ],
)
def test_unparseable_topics_never_reach_the_hub(hub: HubProcess, peer: Peer, name: str) -> None:
    """Its subscriptions match only ``+/birth``, ``+/reported`` and ``+/status``: the broker
    does not deliver these at all (the bad_topic rule itself is unit-tested)."""
    register(hub)
    peer.publish_raw(name, encode(VALID))
    peer.send(VALID)  # published after; delivered in order on the hub's one connection
    wait_until(lambda: hub.device("d1")["reported_generation"] == 1, what="valid report")
    stats = hub.stats()
    assert stats["received"] == {"total": 1, "reported": 1}
    assert stats["rejected"] == {}


# -- broker and hub restarts ---------------------------------------------------------------


def test_desired_change_while_broker_down_arrives_after_it_returns(
    hub: HubProcess, broker: TestBroker
) -> None:
    register(hub)
    broker.stop()
    wait_until(lambda: not hub.api.get("/health").json()["mqtt_connected"], what="link down")
    generation = set_desired(hub, "d1", mode="offline-edit")  # accepted: the DB is the truth
    assert generation == 1
    broker.start()  # same port
    wait_until(lambda: hub.api.get("/health").json()["mqtt_connected"], what="link back")
    device = Peer(broker)
    try:
        device.subscribe(topic("d1", Channel.DESIRED))
        assert device.wait_for_desired("d1", generation).config == {"mode": "offline-edit"}
    finally:
        device.close()
    assert hub.stats()["reconnects"] >= 1


def test_reports_sent_while_hub_is_down_are_applied_after_restart(
    hub: HubProcess, peer: Peer
) -> None:
    """Persistent session: the broker queues QoS 1 messages for the stopped hub."""
    register(hub)
    assert hub.terminate() == 0  # SIGTERM: clean exit with status 0
    peer.send(birth(session=1, applied_generation=0))
    peer.send(report(seq=1, applied_generation=0, generation=0))
    peer.send(report(seq=2, applied_generation=0, generation=0, phase="applying"))
    hub.start()
    wait_until(lambda: hub.device("d1")["last_report_seq"] == 2, what="queued reports applied")
    assert hub.device("d1")["status"]["phase"] == "applying"


def test_delete_clears_the_retained_desired(
    hub: HubProcess, peer: Peer, broker: TestBroker
) -> None:
    register(hub)
    generation = set_desired(hub, "d1", v=1)
    peer.subscribe(topic("d1", Channel.DESIRED))
    peer.wait_for_desired("d1", generation)
    assert hub.api.delete("/devices/d1").status_code == 204
    peer.wait_for(lambda m: m.topic == topic("d1", Channel.DESIRED) and m.payload == b"")
    late = Peer(broker)
    try:
        late.subscribe(topic("d1", Channel.DESIRED))
        marker = f"driftless/v1/devices/marker-{uuid.uuid4().hex[:6]}/desired"
        late.subscribe(marker)
        late.publish_raw(marker, b"x")
        late.wait_for(lambda m: m.topic == marker)
        assert [m.topic for m in late.received] == [marker]  # nothing retained for d1
    finally:
        late.close()


def test_bulk_change_reaches_every_device(hub: HubProcess, peer: Peer) -> None:
    ids = [f"bulk-{i:03d}" for i in range(50)]
    for device_id in ids:
        register(hub, device_id)
    peer.subscribe("driftless/v1/devices/+/desired")
    result = hub.api.put("/fleet/desired", json={"config": {"rate": 9}}).json()
    assert result["updated"] == 50
    for device_id in ids:
        peer.wait_for_desired(device_id, 1)


def test_on_connect_sweep_delivers_what_a_restarted_hub_never_published(
    hub: HubProcess, broker: TestBroker
) -> None:
    """The change is committed while the broker is down, then the hub process restarts, so
    nothing in memory remembers it: only the on-connect sweep (DB scan) can deliver it."""
    register(hub)
    broker.stop()
    generation = set_desired(hub, "d1", v="swept")
    hub.kill()  # SIGKILL: a crash after the commit, before any publish
    hub.start(wait_mqtt=False)
    assert hub.api.get("/health").json()["mqtt_connected"] is False
    broker.start()
    wait_until(lambda: hub.api.get("/health").json()["mqtt_connected"], what="link up")
    device = Peer(broker)
    try:
        device.subscribe(topic("d1", Channel.DESIRED))
        assert device.wait_for_desired("d1", generation).config == {"v": "swept"}
    finally:
        device.close()


def test_backlog_larger_than_receive_maximum_is_applied_after_restart(
    hub: HubProcess, peer: Peer
) -> None:
    """2,500 reports queue at the broker while the hub is down. The hub acknowledges only
    after its DB commit, with at most 1,000 unacknowledged (Receive Maximum): a missing
    acknowledgement would stall delivery at 1,000."""
    ids = [f"q{i:02d}" for i in range(25)]
    for device_id in ids:
        register(hub, device_id)
    assert hub.terminate() == 0
    infos = [
        peer.client.publish(
            topic(device_id, Channel.REPORTED),
            encode(report(device_id, seq=seq, generation=0, applied_generation=0)),
            qos=1,
        )
        for seq in range(1, 101)
        for device_id in ids
    ]
    for info in infos:
        info.wait_for_publish(timeout=10)
    hub.start()
    wait_until(lambda: hub.stats()["applied"] == 2500, timeout_s=30, what="backlog applied")
    assert {hub.device(i)["last_report_seq"] for i in ids} == {100}
    assert hub.stats()["ingest_batch_max_seen"] > 1  # batched, not one transaction per message


def test_a_poisoned_message_is_counted_and_does_not_block_the_others(
    hub: HubProcess, peer: Peer
) -> None:
    """A database fault on one device's row (a trigger here): that message is logged with
    its traceback and counted as internal_error; the rest of its batch is applied."""
    register(hub, "poison")
    register(hub, "d1")
    assert hub.terminate() == 0
    with sqlite3.connect(hub.db_path) as db:
        db.execute(
            "CREATE TRIGGER poison BEFORE UPDATE ON device WHEN NEW.id = 'poison' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )
    peer.send(report("d1", seq=1))
    peer.send(report("poison", seq=1))
    peer.send(report("d1", seq=2))
    hub.start()  # the three arrive together from the persistent session
    wait_until(lambda: hub.device("d1")["last_report_seq"] == 2, what="d1 applied")
    wait_until(lambda: hub.stats()["errors"].get("internal_error") == 1, what="poison counted")
    assert "poisoned row" in hub.log() and "Traceback" in hub.log()
    peer.send(report("d1", seq=3))
    wait_until(lambda: hub.device("d1")["last_report_seq"] == 3, what="still serving")
    assert hub.device("poison")["last_report_seq"] == -1
