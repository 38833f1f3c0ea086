"""Virtual devices (the real agent core) against a real Mosquitto, a raw peer playing the hub.

The broker is the secure one: every device connects over mutual TLS with its own
certificate (the identity directory ``sim run --enroll`` leaves), so the ACL holds
it to its own topics; the peer is an ACL-listed identity with the hub's rights.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from protocols import Birth, Channel, Desired, Reported, Status, decode, encode, topic
from simulator.fleet import Fleet, FleetConfig, device_ids
from tests.pki import TestBroker

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool

    @property
    def device(self) -> str:
        return self.topic.split("/")[-2]

    @property
    def channel(self) -> str:
        return self.topic.split("/")[-1]


class Peer:
    """A raw MQTT client that records everything under the device tree and publishes anything."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[Seen] = []
        self._changed = asyncio.Event()

    async def _record(self) -> None:
        async for message in self.client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.seen.append(Seen(message.topic.value, payload, bool(message.retain)))
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[Seen]], bool], what: str, timeout_s: float = DEADLINE_S
    ) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate(self.seen):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; saw {len(self.seen)}") from None

    def of(self, channel: Channel, device: str | None = None) -> list[Seen]:
        return [
            s
            for s in self.seen
            if s.channel == channel.value and (device is None or s.device == device)
        ]

    def births(self, device: str) -> list[Birth]:
        return [decode(s.payload, Birth) for s in self.of(Channel.BIRTH, device)]

    def statuses(self, device: str) -> list[Status]:
        return [decode(s.payload, Status) for s in self.of(Channel.STATUS, device)]

    def reports(self, device: str | None = None) -> list[Reported]:
        return [decode(s.payload, Reported) for s in self.of(Channel.REPORTED, device)]

    async def desired(self, device: str, generation: int, *, retain: bool = True) -> None:
        doc = Desired(
            device_id=device, generation=generation, config={"g": generation}, issued_at=1
        )
        await self.client.publish(topic(device, Channel.DESIRED), encode(doc), qos=1, retain=retain)


@contextlib.asynccontextmanager
async def peer_on(broker: TestBroker, name: str = "test-peer") -> AsyncIterator[Peer]:
    """A peer playing ``name`` (``TestBroker.peer_tls``: the same name, the same client id)."""
    client_id, context = broker.peer_tls(name)
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=context,
    ) as client:
        peer = Peer(client)
        await client.subscribe("driftless/v1/devices/#", qos=1)
        task = asyncio.create_task(peer._record())
        try:
            yield peer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def identities(broker: TestBroker, directory: Path, ids: tuple[str, ...]) -> Path:
    """The identity directory ``sim run --enroll`` would leave for ``ids``: a certificate
    of its own per device from the broker's fleet CA (``FleetConfig.identity_dir``)."""
    return broker.pki.sim_identities(directory, list(ids))


def applied(gen: int, ids: tuple[str, ...]) -> Callable[[list[Seen]], bool]:
    def check(seen: list[Seen]) -> bool:
        done = set()
        for s in seen:
            if s.channel == "reported":
                r = decode(s.payload, Reported)
                if r.phase == "applied" and r.applied_generation >= gen:
                    done.add(r.device_id)
        return done >= set(ids)

    return check


async def test_twenty_devices_announce_themselves_and_apply_retained_desired(
    tmp_path: Path, broker: TestBroker
) -> None:
    ids = device_ids(20, prefix="it")
    early, late = ids[:10], ids[10:]
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        apply_time_s=0.01,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with peer_on(broker) as peer:
        for device in early:  # waiting in the broker before the devices ever connect
            await peer.desired(device, 1)
        async with Fleet(config) as fleet:
            await fleet.wait_connected(timeout_s=DEADLINE_S)
            await peer.wait_for(
                lambda _: all(peer.births(d) and peer.statuses(d) for d in ids), "births"
            )
            for device in ids:
                (birth,) = peer.births(device)
                (status,) = peer.statuses(device)
                assert status.online and status.session == birth.session == 1
                assert birth.applied_generation == 0
            for device in late:
                await peer.desired(device, 1)
            await peer.wait_for(applied(1, ids), "every device to report generation 1")

            for report in peer.reports():
                assert (report.phase, report.generation, report.error) == ("applied", 1, None)
            assert fleet.counters.applied == {1: 20}
            assert fleet.counters.connected == 20 and fleet.counters.rejected == {}
            for device in fleet.devices.values():
                assert device.core.state.applied_generation == 1
                assert device.saved_state == device.core.state

            # A newer document supersedes; garbage is rejected and counted, never fatal.
            await peer.client.publish(topic(ids[0], Channel.DESIRED), b"{oops", qos=1)
            await peer.desired(ids[0], 2)
            await peer.wait_for(applied(2, ids[:1]), "generation 2 on the first device")
            assert fleet.counters.rejected == {"malformed": 1}
            assert fleet.counters.applied == {1: 20, 2: 1}


async def test_will_fires_on_a_dropped_link_and_the_session_survives_it(
    tmp_path: Path, broker: TestBroker
) -> None:
    """A severed device's Will says offline for that session; the broker keeps the
    persistent session (clean_start=False + expiry), so documents published while
    the device is away are delivered on reconnect and coalesce to the newest."""
    ids = device_ids(3, prefix="will")
    target = ids[1]
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        reconnect_min_s=2.0,
        reconnect_max_s=2.0,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with peer_on(broker) as peer, Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        await peer.wait_for(lambda _: bool(peer.births(target)), "first birth")
        assert fleet.devices[target].session_present is False
        (first,) = peer.births(target)
        # The birth goes out before the SUBSCRIBE: sever only once the broker holds the
        # subscription, or the documents below have no session to wait in.
        for _ in range(int(DEADLINE_S / 0.01)):
            if fleet.devices[target].subscribed:
                break
            await asyncio.sleep(0.01)
        assert fleet.devices[target].subscribed

        assert fleet.devices[target].sever()
        await peer.wait_for(
            lambda _: any(not s.online for s in peer.statuses(target)), "the Last Will"
        )
        will = next(s for s in peer.statuses(target) if not s.online)
        assert will.session == first.session

        # The device waits >= 1 s before reconnecting: these queue in its session.
        for gen in (1, 2, 3):
            await peer.desired(target, gen, retain=False)
        await peer.wait_for(lambda _: len(peer.births(target)) == 2, "the second birth")
        second = peer.births(target)[1]
        assert second.session == first.session + 1
        assert fleet.devices[target].session_present is True
        await peer.wait_for(applied(3, (target,)), "the newest queued document applied")
        assert fleet.counters.applied == {3: 1}  # 1 and 2 were coalesced away
        assert fleet.counters.connections_lost == 1 and fleet.counters.connects == 4


async def test_failed_applies_are_reported_with_the_error(
    tmp_path: Path, broker: TestBroker
) -> None:
    ids = device_ids(5, prefix="fail")
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        failure_rate=1.0,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with peer_on(broker) as peer, Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        for device in ids:
            await peer.desired(device, 1)
        await peer.wait_for(lambda _: len(peer.reports()) == 5, "five reports")
        for report in peer.reports():
            assert (report.phase, report.failed_generation, report.applied_generation) == (
                "failed",
                1,
                0,
            )
            assert report.error and "generation 1" in report.error
        assert fleet.counters.failed == {1: 5} and fleet.counters.applied == {}


async def test_orderly_stop_leaves_every_status_offline(tmp_path: Path, broker: TestBroker) -> None:
    ids = device_ids(10, prefix="stop")
    config = FleetConfig(
        broker_url=broker.url,
        device_ids=ids,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        sessions = {d: dev.core.state.session for d, dev in fleet.devices.items()}
    assert fleet.counters.connected == 0 and fleet.counters.connections_lost == 0
    async with peer_on(broker, "late-peer") as peer:  # reads what is retained now
        await peer.wait_for(lambda _: len(peer.of(Channel.STATUS)) == 10, "retained statuses")
        assert all(seen.retain for seen in peer.of(Channel.STATUS))
        for device in ids:
            (status,) = peer.statuses(device)
            assert status.online is False and status.session == sessions[device]
