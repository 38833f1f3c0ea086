"""The real agent process against a real Mosquitto, with a raw peer playing the hub."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from protocols import Birth, Channel, Desired, Reported, Status, decode, encode, topic
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.integration


def desired(device: str, gen: int, **config: object) -> bytes:
    return encode(Desired(device_id=device, generation=gen, config=dict(config), issued_at=1.0))


def applied_generation(agent: AgentProcess) -> int:
    path = agent.data_dir / "state.json"
    return StateStore(agent.data_dir).load().applied_generation if path.exists() else 0


@pytest.fixture
def peer(broker: TestBroker) -> RawPeer:
    instance = RawPeer(broker)
    instance.subscribe("driftless/v1/devices/#")
    yield instance  # type: ignore[misc]
    instance.close()


def test_birth_status_report_and_will(broker: TestBroker, peer: RawPeer, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, "dev-a", broker)
    agent.start()
    try:
        _, raw, _ = peer.wait_for(lambda m: m[0] == topic("dev-a", Channel.BIRTH))
        birth = decode(raw, Birth)
        status = decode(peer.wait_for(lambda m: m[0].endswith("dev-a/status"))[1], Status)
        assert status.online and status.session == birth.session
        peer.publish(topic("dev-a", Channel.DESIRED), desired("dev-a", 1, x=1), retain=True)
        report = decode(peer.wait_for(lambda m: m[0].endswith("dev-a/reported"))[1], Reported)
        assert (report.phase, report.applied_generation) == ("applied", 1)
        assert (report.boot_epoch, report.seq) > (birth.boot_epoch, birth.seq)
        config = json.loads((agent.data_dir / "config.json").read_text())
        assert config == {"generation": 1, "issued_at": 1.0, "config": {"x": 1}}
        # A crash: the broker sends the Will, for the same session as the birth.
        agent.kill()
        will = peer.wait_for(
            lambda m: m[0].endswith("dev-a/status") and not decode(m[1], Status).online,
            timeout_s=60,
        )
        assert decode(will[1], Status).session == birth.session
    finally:
        agent.kill()


def test_offline_device_applies_only_newest_of_three(
    broker: TestBroker, peer: RawPeer, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, "dev-b", broker)
    agent.start()
    try:
        peer.publish(topic("dev-b", Channel.DESIRED), desired("dev-b", 1, v=1), retain=True)
        wait_until(lambda: applied_generation(agent) == 1, what="generation 1 applied")
        assert agent.terminate() == 0
        for gen in (2, 3, 4):  # queued in the persistent session and retained
            peer.publish(topic("dev-b", Channel.DESIRED), desired("dev-b", gen, v=gen), retain=True)
        agent.start()
        wait_until(lambda: applied_generation(agent) == 4, what="generation 4 applied")
        history = [h.generation for h in StateStore(agent.data_dir).load().history]
        assert history == [1, 4]
    finally:
        agent.kill()


def test_duplicate_and_older_desired_change_nothing(
    broker: TestBroker, peer: RawPeer, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, "dev-c", broker)
    agent.start()
    try:
        name = topic("dev-c", Channel.DESIRED)
        peer.publish(name, desired("dev-c", 5, v="five"), retain=True)
        wait_until(lambda: applied_generation(agent) == 5, what="generation 5 applied")
        for gen in (5, 3, 5, 1):
            peer.publish(name, desired("dev-c", gen, v="stale"))
        peer.publish(name, b"{garbage")
        peer.publish(name, desired("dev-c", 6, v="six"))  # a marker after the noise
        wait_until(lambda: applied_generation(agent) == 6, what="generation 6 applied")
        history = [h.generation for h in StateStore(agent.data_dir).load().history]
        assert history == [5, 6]
        assert '"rejected message"' in agent.log() and "malformed" in agent.log()
    finally:
        agent.kill()


def test_sigkill_during_applies_never_tears_state(
    broker: TestBroker, peer: RawPeer, tmp_path: Path
) -> None:
    """Kill the agent at random instants while it applies; files are always old or new."""
    rng = random.Random(7)
    agent = AgentProcess(tmp_path, "dev-d", broker)
    name = topic("dev-d", Channel.DESIRED)
    big = "x" * 100_000  # makes each write take long enough to be caught in the middle
    gen = 0
    try:
        for _ in range(8):
            agent.start()
            for _ in range(3):
                gen += 1
                peer.publish(name, desired("dev-d", gen, blob=big, g=gen), retain=True)
            wait_until(lambda: agent.data_dir.joinpath("state.json").exists(), what="state")
            wait_until(
                lambda target=gen - 1: rng.random() < 0.3 or applied_generation(agent) >= target,
                interval_s=0.01,
                what="a moment to strike",
            )
            agent.kill()
            state = StateStore(agent.data_dir).load()  # raises if torn
            assert not agent.data_dir.joinpath("state.corrupt").exists()
            if agent.data_dir.joinpath("config.json").exists():
                doc = json.loads(agent.data_dir.joinpath("config.json").read_text())
                assert doc["config"]["g"] == doc["generation"] <= gen
                assert state.applied_generation <= doc["generation"]
        agent.start()
        wait_until(lambda: applied_generation(agent) == gen, what=f"generation {gen} applied")
        doc = json.loads(agent.data_dir.joinpath("config.json").read_text())
        assert doc["generation"] == gen
        generations = [h.generation for h in StateStore(agent.data_dir).load().history]
        assert generations == sorted(generations)
    finally:
        agent.kill()


def test_agent_survives_broker_restart(broker: TestBroker, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, "dev-e", broker)
    agent.start()
    try:
        peer = RawPeer(broker)
        peer.subscribe("driftless/v1/devices/dev-e/birth")
        peer.wait_for(lambda m: True)
        peer.close()
        broker.kill()
        broker.wipe_persistence()
        broker.start()
        peer = RawPeer(broker)
        peer.subscribe("driftless/v1/devices/dev-e/birth")
        birth = decode(peer.wait_for(lambda m: True, timeout_s=40)[1], Birth)
        assert birth.session >= 2  # a new session, with a new Will
        peer.publish(topic("dev-e", Channel.DESIRED), desired("dev-e", 1), retain=True)
        wait_until(lambda: applied_generation(agent) == 1, what="apply after broker restart")
        peer.close()
    finally:
        agent.kill()


def test_publishes_from_other_threads_are_written_by_the_loop_thread_over_tls(
    broker: TestBroker, peer: RawPeer
) -> None:
    """The fetcher publishes from its own thread while the network thread reads. On one TLS
    connection only one thread may touch the socket: every write must come from the loop."""
    import threading

    from edge_agent.transport import MqttTransport, TConnected, TDisconnected, TransportEvent

    events: list[TransportEvent] = []
    device = "dev-threads"
    transport = MqttTransport(
        device, broker.url, events.append, tls_context=broker.pki.client_context(device)
    )
    writers: set[int] = set()
    client = transport._client  # the one place paho writes from
    real_loop_write = client.loop_write

    def loop_write() -> object:
        writers.add(threading.get_ident())
        return real_loop_write()

    client.loop_write = loop_write  # type: ignore[method-assign]
    transport.connect()
    stop = threading.Event()

    def network() -> None:
        while not stop.is_set() and transport.loop(0.5):
            pass

    thread = threading.Thread(target=network, name="mqtt")
    thread.start()
    try:
        wait_until(lambda: any(isinstance(e, TConnected) for e in events), what="connected")
        name = topic(device, Channel.REPORTED)
        for n in range(200):
            transport.publish(name, n.to_bytes(4, "big") * 4096, qos=1, retain=False)
        wait_until(
            lambda: sum(1 for m in peer.messages if m[0] == name) == 200,
            what="all 200 publishes delivered",
        )
        assert not [e for e in events if isinstance(e, TDisconnected)], events
        assert writers == {thread.ident}, "a publish wrote from the caller's thread"
    finally:
        stop.set()
        thread.join(timeout=10)
        transport.disconnect()
