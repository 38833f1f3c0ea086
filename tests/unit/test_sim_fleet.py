"""The simulator's pure parts: ids, config, the simulated applier, backoff, counters, mapping."""

from __future__ import annotations

import ast
import asyncio
import json
import random
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.core import Booted, Connected, Connecting, DesiredPayload, Subscribed
from edge_agent.runtime import ApplyError
from protocols import Desired, encode
from simulator.fleet import (
    Fleet,
    FleetConfig,
    FleetCounters,
    FleetError,
    FleetTimeout,
    SimApplier,
    VirtualDevice,
    device_backoff,
    device_ids,
    device_rng,
    raise_nofile_limit,
)

BROKER = "mqtt://127.0.0.1:1"


def doc(gen: int, device: str = "sim-00000") -> Desired:
    return Desired(device_id=device, generation=gen, config={"k": gen}, issued_at=1.0)


def test_fleet_module_imports_no_mqtt_library() -> None:
    """Only simulator/link.py may import aiomqtt or paho (no MQTT types leak into the driver)."""
    source = (Path(__file__).parents[2] / "simulator" / "fleet.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert not roots & {"aiomqtt", "paho"}, roots


# ---------------------------------------------------------------- ids and config


def test_device_ids_are_unique_valid_and_sorted() -> None:
    ids = device_ids(1200)
    assert len(set(ids)) == 1200
    assert ids == tuple(sorted(ids))
    assert ids[0] == "sim-00000" and ids[-1] == "sim-01199"
    assert device_ids(0) == ()


def test_device_ids_widen_past_five_digits() -> None:
    ids = device_ids(100_001, prefix="x")
    assert ids[-1] == "x-100000" and ids == tuple(sorted(ids))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"failure_rate": 1.5}, id="failure-rate-above-one"),
        pytest.param({"failure_rate": -0.1}, id="failure-rate-negative"),
        pytest.param({"apply_time_s": -1.0}, id="negative-apply-time"),
        pytest.param({"max_concurrent_connects": 0}, id="no-connects-allowed"),
        pytest.param({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, id="backoff-inverted"),
        pytest.param({"device_ids": ("a", "a")}, id="duplicate-client-ids"),
        pytest.param({"device_ids": ("bad/id",)}, id="id-with-slash"),
        pytest.param({"broker_url": "mqtts://127.0.0.1:8883"}, id="tls-url"),
    ],
)
def test_config_refuses_bad_settings(overrides: dict[str, object]) -> None:
    settings: dict[str, object] = {"broker_url": BROKER, "device_ids": ("a",), **overrides}
    with pytest.raises(ValueError):
        FleetConfig(**settings).link_settings()  # type: ignore[arg-type]


# ---------------------------------------------------------------- simulated applier


def test_applier_is_deterministic_per_seed() -> None:
    def outcomes(seed: int) -> list[tuple[float, str | None]]:
        applier = SimApplier(
            apply_time_s=1.0, jitter_s=0.5, failure_rate=0.5, rng=random.Random(seed)
        )
        return [(o.duration_s, o.error) for o in (applier.plan(doc(g)) for g in range(1, 50))]

    assert outcomes(7) == outcomes(7)
    assert outcomes(7) != outcomes(8)


@pytest.mark.parametrize(
    "rate, low, high",
    [
        pytest.param(0.0, 0, 0, id="never"),
        pytest.param(1.0, 2000, 2000, id="always"),
        pytest.param(0.3, 500, 700, id="thirty-percent"),
    ],
)
def test_applier_fails_at_the_configured_rate(rate: float, low: int, high: int) -> None:
    applier = SimApplier(apply_time_s=0.0, failure_rate=rate, rng=random.Random(3))
    failures = sum(applier.plan(doc(g)).error is not None for g in range(1, 2001))
    assert low <= failures <= high


def test_applier_duration_stays_within_time_plus_jitter() -> None:
    applier = SimApplier(apply_time_s=0.2, jitter_s=0.1, rng=random.Random(1))
    durations = [applier.plan(doc(1)).duration_s for _ in range(500)]
    assert all(0.2 <= d <= 0.3 for d in durations)
    assert max(durations) - min(durations) > 0.05  # jitter actually spreads


async def test_applier_raises_apply_error_naming_the_generation() -> None:
    failing = SimApplier(apply_time_s=0.0, failure_rate=1.0, rng=random.Random(1))
    with pytest.raises(ApplyError, match="generation 4"):
        await failing.apply(doc(4))
    await SimApplier(apply_time_s=0.0, rng=random.Random(1)).apply(doc(4))


# ---------------------------------------------------------------- randomness and backoff


def test_device_rng_depends_on_seed_device_and_purpose() -> None:
    def draw(seed: int, device: str, purpose: str) -> float:
        return device_rng(seed, device, purpose).random()

    assert draw(1, "a", "apply") == draw(1, "a", "apply")
    assert len({draw(1, "a", "apply"), draw(2, "a", "apply"), draw(1, "b", "apply")}) == 3
    assert draw(1, "a", "apply") != draw(1, "a", "backoff")


def test_device_backoff_uses_the_config_and_grows_to_the_cap() -> None:
    config = FleetConfig(
        broker_url=BROKER, device_ids=("a",), reconnect_min_s=1.0, reconnect_max_s=4.0
    )
    backoff = device_backoff(config, "a")
    delays = [backoff.next_delay_s() for _ in range(5)]
    for delay, ceiling in zip(delays, [1, 2, 4, 4, 4], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    again = device_backoff(config, "a")
    assert [again.next_delay_s() for _ in range(5)] == delays


def test_device_backoff_spreads_a_fleet_that_lost_its_broker_together() -> None:
    config = FleetConfig(broker_url=BROKER, device_ids=device_ids(50))
    first = {device_backoff(config, d).next_delay_s() for d in config.device_ids}
    assert len(first) == 50


# ---------------------------------------------------------------- file descriptors


def test_nofile_soft_limit_is_raised_to_hard() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    now = raise_nofile_limit(10)
    assert now >= soft
    if hard != resource.RLIM_INFINITY:
        assert now == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_nofile_beyond_hard_limit_is_a_clear_error() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on this machine")
    with pytest.raises(FleetError, match="ulimit"):
        raise_nofile_limit(hard + 1)


# ---------------------------------------------------------------- counters


def test_counter_snapshot_is_json_ready() -> None:
    counters = FleetCounters(applied={2: 3, 1: 5}, failed={2: 1}, rejected={"malformed": 2})
    snap = json.loads(json.dumps(counters.snapshot()))
    assert snap["applied"] == {"1": 5, "2": 3}
    assert snap["rejected"] == {"malformed": 2}


async def test_wait_until_returns_at_once_when_true_and_times_out_saying_what() -> None:
    fleet = Fleet(FleetConfig(broker_url=BROKER, device_ids=("a",)))
    await fleet.wait_until(lambda c: c.connected == 0, timeout_s=0.01, what="nothing")
    with pytest.raises(FleetTimeout, match="1 devices connected"):
        await fleet.wait_connected(timeout_s=0.05)


# ---------------------------------------------------------------- event/action mapping


class Harness:
    """A VirtualDevice with no connection: the core and its executors only."""

    def __init__(self, *, failure_rate: float = 0.0) -> None:
        self.counters = FleetCounters()
        self.changed = asyncio.Event()
        config = FleetConfig(
            broker_url=BROKER, device_ids=("sim-00000",), failure_rate=failure_rate
        )
        self.device = VirtualDevice(
            "sim-00000",
            config=config,
            settings=config.link_settings(),
            counters=self.counters,
            connect_gate=asyncio.Semaphore(1),
            changed=self.changed.set,
            clock=lambda: 1_700_000_000.0,
        )

    async def until(self, predicate: Callable[[FleetCounters], bool]) -> None:
        async with asyncio.timeout(2):
            while not predicate(self.counters):
                self.changed.clear()
                await self.changed.wait()

    async def ready(self) -> None:
        for event in (
            Booted(1.0),
            Connecting(1.0),
            Connected(1.0, session_present=False),
            Subscribed(1.0),
        ):
            await self.device.feed(event)


async def test_mapping_persists_in_memory_and_sets_the_will() -> None:
    h = Harness()
    await h.device.feed(Booted(1_700_000_000.0))
    assert h.device.saved_state.boot_epoch == 1_700_000_000
    await h.device.feed(Connecting(1.0))
    assert h.device.saved_state.session == 1
    assert h.device._will is not None
    assert h.device._will[0] == "driftless/v1/devices/sim-00000/status"


async def test_apply_runs_and_report_waits_for_the_next_connection_when_offline() -> None:
    h = Harness()
    await h.ready()
    await h.device.feed(DesiredPayload(encode(doc(1)), 2.0))
    await h.until(lambda c: c.applied == {1: 1})
    assert h.device.saved_state.applied_generation == 1
    assert h.counters.reports_deferred == 1 and h.counters.reports_sent == 0


async def test_failed_apply_is_counted_per_generation() -> None:
    h = Harness(failure_rate=1.0)
    await h.ready()
    await h.device.feed(DesiredPayload(encode(doc(3)), 2.0))
    await h.until(lambda c: c.failed == {3: 1})
    assert h.device.saved_state.failed_generation == 3
    assert h.counters.applied == {}


async def test_rejected_and_ignored_documents_are_counted() -> None:
    h = Harness()
    await h.ready()
    await h.device.feed(DesiredPayload(b"{oops", 2.0))
    await h.device.feed(DesiredPayload(encode(doc(1, device="someone-else")), 2.0))
    assert h.counters.rejected == {"malformed": 1, "device_mismatch": 1}
    await h.device.feed(DesiredPayload(encode(doc(1)), 2.0))
    await h.until(lambda c: c.applied == {1: 1})
    await h.device.feed(DesiredPayload(encode(doc(1)), 3.0))
    assert h.counters.ignored == 1
