"""Profiles against a real Mosquitto: slow links, storms and flaky devices, seen from outside."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from protocols import Birth, Channel, Status, decode, topic
from simulator.fleet import Fleet, FleetConfig, device_ids
from simulator.link import DeviceLink, LinkError, LinkSettings
from simulator.profiles import FlakySpec, Profile, SlowSpec, StormSpec
from tests.integration.test_sim_fleet import Peer, applied, identities, peer_on
from tests.pki import TestBroker

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0
SLACK_S = 0.5  # scheduling on a busy 2-core machine
STORM_AT_S = 2.0  # 20 devices connect well before this


def device_link(broker: TestBroker, device_id: str, settings: LinkSettings) -> DeviceLink:
    """A bare link as ``device_id`` over mutual TLS (its own certificate, so the device ACL:
    it writes its status, its Will, and reported, and reads desired)."""
    return DeviceLink(
        device_id,
        settings,
        will_topic=topic(device_id, Channel.STATUS),
        will_payload=b"gone",
        tls_context=broker.pki.client_context(device_id),
    )


async def watch(peer: Peer, stamps: list[tuple[float, str, bytes]]) -> None:
    """Stamp everything the peer sees with the (monotonic) time it saw it."""
    seen = 0
    while True:  # ends when the test cancels it
        await peer.wait_for(lambda s, n=seen: len(s) > n, "anything", timeout_s=3600)
        now = time.monotonic()
        for s in peer.seen[seen:]:
            stamps.append((now, s.topic, s.payload))
        seen = len(peer.seen)


# ---------------------------------------------------------------- connecting


async def test_a_link_connects_without_binding_its_socket_first(
    broker: TestBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho binds every socket to ("", 0) before connecting; with thousands of simulated
    devices on one host that bind took most of a reconnect's CPU (docs/benchmarks.md).
    The link lets connect() choose the port, over TLS as over plain TCP."""
    binds: list[object] = []
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: object) -> None:
        binds.append(address)
        real_bind(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    link = device_link(broker, "unbound-1", LinkSettings.from_url(broker.url))
    assert await link.open() is False  # a new session, over mutual TLS
    try:
        await link.publish(topic("unbound-1", Channel.STATUS), b"up", qos=1, retain=False)
    finally:
        await link.close()
    assert binds == []


# ---------------------------------------------------------------- slow


async def test_a_slow_link_delays_each_direction_by_latency_plus_bytes_over_bandwidth(
    broker: TestBroker,
) -> None:
    spec = SlowSpec(latency_s=0.3, bandwidth_bytes_per_s=1000)
    settings = LinkSettings.from_url(broker.url, slow=spec)
    link = device_link(broker, "slow-1", settings)
    out, into = topic("slow-1", Channel.REPORTED), topic("slow-1", Channel.DESIRED)
    async with peer_on(broker) as peer:  # it sees the whole device tree
        t = time.monotonic()
        await link.open()  # CONNECT up (64 B) + CONNACK down: two one-way latencies at least
        assert 0.6 + 0.064 <= time.monotonic() - t <= 0.6 + 0.1 + SLACK_S
        try:
            assert await link.subscribe(into, qos=1)

            # Device -> broker: a 500-byte payload (~545 on the wire) takes 0.545 s + 0.3 s.
            t = time.monotonic()
            publishing = asyncio.create_task(link.publish(out, b"x" * 500, qos=1, retain=False))
            await peer.wait_for(lambda seen: any(s.topic == out for s in seen), "the slow publish")
            arrived = time.monotonic() - t
            assert 0.8 <= arrived <= 0.8 + SLACK_S
            await publishing  # ... and its PUBACK comes back over the slow link too
            assert time.monotonic() - t >= arrived + 0.3 - 0.05

            # Broker -> device: two 500-byte messages at once queue behind each other.
            t = time.monotonic()
            for n in (1, 2):
                await peer.client.publish(into, bytes([n]) * 500, qos=1)
            first = await asyncio.wait_for(link.receive(), DEADLINE_S)
            first_s = time.monotonic() - t
            second = await asyncio.wait_for(link.receive(), DEADLINE_S)
            second_s = time.monotonic() - t
            assert (first.payload[0], second.payload[0]) == (1, 2)
            assert 0.8 <= first_s <= 0.8 + SLACK_S
            assert 1.3 <= second_s <= 1.3 + SLACK_S  # waited for the first to cross
        finally:
            await link.close()


async def test_a_slow_fleet_still_converges(tmp_path: Path, broker: TestBroker) -> None:
    ids = device_ids(5, prefix="slowf")
    profile = Profile(name="slowish", slow=SlowSpec(latency_s=0.1, bandwidth_bytes_per_s=5000))
    config = FleetConfig.from_profile(
        profile,
        broker_url=broker.url,
        device_ids=ids,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with peer_on(broker) as peer, Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        t = time.monotonic()
        for device in ids:
            await peer.desired(device, 1)
        await peer.wait_for(applied(1, ids), "the slow devices to apply")
        # desired down (0.1 s + bytes) + apply (0.05-0.1 s) + report up (0.1 s + bytes)
        assert time.monotonic() - t >= 0.25


# ---------------------------------------------------------------- storm


async def test_a_storm_drops_every_device_at_once_and_they_return_within_the_window(
    tmp_path: Path, broker: TestBroker
) -> None:
    ids = device_ids(20, prefix="storm")
    storm = StormSpec(at_s=(STORM_AT_S,), every_s=0, offline_s=1.0, reconnect_window_s=1.0)
    profile = Profile(name="one-storm", storm=storm)
    config = FleetConfig.from_profile(
        profile,
        broker_url=broker.url,
        device_ids=ids,
        seed=5,
        reconnect_min_s=0.05,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    stamps: list[tuple[float, str, bytes]] = []
    async with peer_on(broker) as peer:
        watcher = asyncio.create_task(watch(peer, stamps))
        epoch_wall = time.time()
        epoch = time.monotonic()
        try:
            async with Fleet(config, epoch=epoch_wall) as fleet:
                await fleet.wait_connected(timeout_s=DEADLINE_S)
                assert time.monotonic() - epoch < STORM_AT_S, (
                    "the fleet must be up before the storm"
                )
                await peer.wait_for(
                    lambda _: all(len(peer.births(d)) == 2 for d in ids), "every second birth"
                )
                await fleet.wait_connected(timeout_s=DEADLINE_S)
                counters = fleet.counters
                assert counters.network_drops == 20 and counters.severed == 20
                assert counters.connections_lost == 20 and counters.offline_now == 0
        finally:
            watcher.cancel()

    wills = [
        (at - epoch, decode(payload, Status))
        for at, name, payload in stamps
        if name.endswith("/status") and not decode(payload, Status).online
    ]
    # Every Will (no DISCONNECT was sent) came right after the storm, for the first session.
    assert len({w.device_id for _, w in wills if w.session == 1}) == 20
    assert all(STORM_AT_S <= at <= STORM_AT_S + SLACK_S for at, w in wills if w.session == 1)
    rebirths = [
        (at - epoch, decode(payload, Birth))
        for at, name, payload in stamps
        if name.endswith("/birth") and decode(payload, Birth).session == 2
    ]
    back = sorted(at for at, _ in rebirths)
    assert len(back) == 20
    assert back[0] >= STORM_AT_S + 1.0  # nobody before the network returned
    assert back[-1] <= STORM_AT_S + 1.0 + 1.0 + SLACK_S  # everybody within the window
    assert back[-1] - back[0] >= 0.3  # spread over it, not at one instant


# ---------------------------------------------------------------- flaky


async def test_flaky_devices_drop_on_their_own_and_all_converge_once_healed(
    tmp_path: Path, broker: TestBroker
) -> None:
    ids = device_ids(12, prefix="flaky")
    profile = Profile(
        name="very-flaky",
        flaky=FlakySpec(mean_online_s=0.6, mean_offline_s=0.3, max_offline_s=1.0),
    )
    config = FleetConfig.from_profile(
        profile,
        broker_url=broker.url,
        device_ids=ids,
        seed=9,
        reconnect_min_s=0.05,
        identity_dir=identities(broker, tmp_path / "identities", ids),
    )
    async with peer_on(broker) as peer, Fleet(config) as fleet:
        await fleet.wait_until(
            lambda c: c.network_drops >= 24, timeout_s=DEADLINE_S, what="two drops per device"
        )
        for device in ids:  # published while devices come and go
            await peer.desired(device, 1)
        await fleet.heal()
        await fleet.wait_connected(timeout_s=DEADLINE_S)
        await peer.wait_for(applied(1, ids), "every device to apply generation 1")
        c = fleet.counters
        assert c.offline_now == 0 and c.connects > len(ids) and c.connections_lost >= c.severed
        assert c.applied == {1: 12}
        for device in ids:  # a Will per severed session, and births only grow
            sessions = [b.session for b in peer.births(device)]
            assert sessions == sorted(sessions)
        drops_after_heal = c.network_drops
        await asyncio.sleep(0.5)  # healed: no window may start any more
        assert fleet.counters.network_drops == drops_after_heal
    wills = [s for s in peer.of(Channel.STATUS) if not decode(s.payload, Status).online]
    assert len(wills) >= 12


# ---------------------------------------------------------------- a cut link


async def test_a_publish_waiting_for_its_ack_fails_as_soon_as_the_link_is_cut(
    broker: TestBroker,
) -> None:
    """aiomqtt alone waits for its timeout (10 s here); the device must hear at once."""
    settings = LinkSettings.from_url(broker.url, op_timeout_s=10.0)
    link = device_link(broker, "cut-1", settings)
    out = topic("cut-1", Channel.REPORTED)
    await link.open()
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)  # no PUBACK can come
    try:
        publishing = asyncio.create_task(link.publish(out, b"x", qos=1, retain=False))
        await asyncio.sleep(0.2)
        assert not publishing.done()
        t = time.monotonic()
        link.sever()
        with pytest.raises(LinkError, match="connection lost"):
            await asyncio.wait_for(publishing, DEADLINE_S)
        assert time.monotonic() - t < 1.0
        with pytest.raises(LinkError):  # and nothing more is attempted on it
            await link.publish(out, b"y", qos=1, retain=False)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        await link.close()
