"""The hub's MQTT session against a real Mosquitto: dispatch by filter, acknowledgement only
after the handler returned, the connection's hooks and tasks, and publish."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt
import pytest

from hub.broker_config import hub_identities
from hub.mqtt.session import Incoming, MqttSession, SessionError, SessionOptions
from plumbing.net import parse_broker_url
from protocols import Channel, topic
from protocols.topics import shared_subscription, subscription
from tests.pki import TestBroker

pytestmark = pytest.mark.integration

CLIENT_ID = "hub-test"


@dataclass
class Counters:
    mqtt_connected: bool = False
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    internal_errors: int = 0
    events: list[str] = field(default_factory=list)

    def count_internal_error(self) -> None:
        self.internal_errors += 1


def options(**overrides: object) -> SessionOptions:
    fields: dict[str, object] = {
        "name": "test",
        "client_id": CLIENT_ID,
        "clean_start": False,
        "batch_max": 100,
        "keepalive_s": 15,
        "timeout_s": 10.0,
        "max_inflight_publishes": 10,
        "pending_calls_threshold": 20,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "stable_after_s": 5.0,
        "session_expiry_s": 600,
        "receive_max_messages": 50,
        **overrides,
    }
    return SessionOptions(**fields)  # type: ignore[arg-type]


def session(broker: TestBroker, counters: Counters) -> MqttSession:
    tls = broker.pki.client_context(hub_identities(CLIENT_ID)[0])
    return MqttSession(
        broker=parse_broker_url(broker.url), options=options(), stats=counters, tls_context=tls
    )


@pytest.fixture
async def device(broker: TestBroker) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier="dev-1",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=broker.pki.client_context("dev-1"),
    ) as client:
        yield client


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_messages_go_to_their_handler_and_are_acknowledged_only_after_it_returned(
    broker: TestBroker, device: aiomqtt.Client
) -> None:
    counters = Counters()
    hub = session(broker, counters)
    reports: list[bytes] = []
    statuses: list[bytes] = []
    failures = Counter[bytes]()

    async def on_reports(batch: Sequence[Incoming]) -> None:
        for message in batch:
            assert message.topic == topic("dev-1", Channel.REPORTED)
            if message.payload == b"poison" and not failures[message.payload]:
                failures[message.payload] += 1
                raise RuntimeError("the commit failed")  # ends the connection, no PUBACK
            reports.append(message.payload)

    async def on_status(batch: Sequence[Incoming]) -> None:
        statuses.extend(message.payload for message in batch)

    subscribed = asyncio.Event()

    async def on_connect() -> None:
        subscribed.set()

    hub.route([shared_subscription("hub", Channel.REPORTED)], on_reports)
    hub.route([subscription(Channel.STATUS)], on_status)
    hub.on_connect(on_connect)
    assert hub.subscriptions == [
        shared_subscription("hub", Channel.REPORTED),
        subscription(Channel.STATUS),
    ]
    hub.start()
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()  # hooks run once the broker granted every filter
        await device.publish(topic("dev-1", Channel.STATUS), b"online", qos=1)
        await device.publish(topic("dev-1", Channel.REPORTED), b"one", qos=1)
        await until(lambda: reports == [b"one"] and statuses == [b"online"], "first messages")
        await device.publish(topic("dev-1", Channel.REPORTED), b"poison", qos=1)
        # The handler raised: the connection ends, the message was never acknowledged, so
        # the broker hands it over again on the resumed session, and this time it lands.
        await until(lambda: b"poison" in reports, "the unacknowledged message again")
        assert counters.connects == 2 and counters.reconnects == 1
        assert counters.internal_errors == 1  # the handler's failure, logged with its traceback
        await device.publish(topic("dev-1", Channel.REPORTED), b"two", qos=1)
        await until(lambda: reports[-1:] == [b"two"], "after the reconnect")
    finally:
        await hub.stop()
    assert reports == [b"one", b"poison", b"two"]  # acknowledged ones never came back
    assert not hub.connected


async def test_the_connection_runs_its_hooks_in_order_and_publishes(
    broker: TestBroker, device: aiomqtt.Client
) -> None:
    counters = Counters()
    hub = session(broker, counters)
    events = counters.events
    ended = asyncio.Event()

    async def on_connect() -> None:
        events.append("connect")
        await hub.publish(topic("dev-1", Channel.DESIRED), b"doc", qos=1, retain=True)

    async def worker() -> None:
        events.append("task")
        if events.count("task") == 1:
            await ended.wait()
            raise SessionError("the task saw the connection go")  # the connection ends
        await asyncio.Event().wait()

    async def on_disconnect() -> None:
        events.append("disconnect")

    hub.on_connect(on_connect)
    hub.while_connected("worker", worker)
    hub.on_disconnect(on_disconnect)
    with pytest.raises(SessionError):
        await hub.publish("driftless/v1/devices/dev-1/desired", b"x")  # not connected
    await device.subscribe(topic("dev-1", Channel.DESIRED), qos=1)
    hub.start()
    with pytest.raises(RuntimeError):
        hub.route(["a/b"], lambda batch: asyncio.sleep(0))
    try:
        async with asyncio.timeout(10):
            message = await anext(device.messages)
        assert message.payload == b"doc"
        await until(lambda: events == ["connect", "task"], "first connection")
        ended.set()
        await until(lambda: events[-3:] == ["disconnect", "connect", "task"], "reconnected")
        assert counters.reconnects == 1 and counters.internal_errors == 0
    finally:
        await hub.stop()
    assert events == ["connect", "task", "disconnect", "connect", "task", "disconnect"]
