"""Faults in the fleet: the scheduler's order and catch-up, a device's network state, configs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest

from simulator.fleet import (
    FaultScheduler,
    FleetConfig,
    FleetCounters,
    VirtualDevice,
)
from simulator.profiles import BUILTIN, FlakySpec, Window

BROKER = "mqtt://127.0.0.1:1"


class FakeDevice:
    """Records when its network went down and came back, and its depth of windows."""

    def __init__(self, clock: float) -> None:
        self.t0 = clock
        self.depth = 0
        self.log: list[tuple[str, float, int]] = []

    def network_down(self) -> None:
        self.depth += 1
        self.log.append(("down", time.monotonic() - self.t0, self.depth))

    def network_restored(self) -> None:
        self.depth -= 1
        self.log.append(("up", time.monotonic() - self.t0, self.depth))


async def run_scheduler(
    windows: dict[str, list[Window]], *, epoch_offset_s: float, run_s: float
) -> dict[str, FakeDevice]:
    start = time.monotonic()
    devices = {d: FakeDevice(start) for d in windows}

    def stream(device_id: str) -> Iterator[Window]:
        return iter(windows[device_id])

    scheduler = FaultScheduler(
        devices,  # type: ignore[arg-type]
        stream,
        epoch=start + epoch_offset_s,
        clock=time.monotonic,
    )
    task = asyncio.create_task(scheduler.run())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), run_s)
    task.cancel()
    return devices


async def test_windows_fire_in_time_order_and_overlaps_nest() -> None:
    devices = await run_scheduler(
        {
            "a": [Window(0.05, 0.15), Window(0.10, 0.30)],  # overlapping: up only at 0.30
            "b": [Window(0.20, 0.25)],
        },
        epoch_offset_s=0.0,
        run_s=2.0,
    )
    a = devices["a"].log
    assert [(kind, depth) for kind, _, depth in a] == [
        ("down", 1),
        ("down", 2),
        ("up", 1),
        ("up", 0),
    ]
    expected = [0.05, 0.10, 0.15, 0.30]
    for (_, at, _), due in zip(a, expected, strict=True):
        assert due <= at <= due + 0.1
    assert [(k, d) for k, _, d in devices["b"].log] == [("down", 1), ("up", 0)]


async def test_a_late_start_skips_past_windows_and_joins_one_in_progress() -> None:
    """A worker restarted 10 s into the run: the schedule is the run's, not its own."""
    devices = await run_scheduler(
        {"a": [Window(1.0, 2.0), Window(9.0, 10.1), Window(10.2, 10.3)], "b": [Window(3, 4)]},
        epoch_offset_s=-10.0,
        run_s=1.0,
    )
    kinds = [(k, round(at, 1)) for k, at, _ in devices["a"].log]
    assert kinds[0] == ("down", 0.0)  # 9.0-10.1 was in progress: down at once
    assert [k for k, _ in kinds] == ["down", "up", "down", "up"]
    assert devices["b"].log == []  # entirely in the past


# ---------------------------------------------------------------- the device's side


def device(counters: FleetCounters, changed: asyncio.Event | None = None) -> VirtualDevice:
    config = FleetConfig(broker_url=BROKER, device_ids=("sim-00000",))
    return VirtualDevice(
        "sim-00000",
        config=config,
        settings=config.link_settings(),
        counters=counters,
        connect_gate=asyncio.Semaphore(1),
        changed=changed.set if changed is not None else lambda: None,
        clock=time.time,
    )


async def test_network_state_nests_and_is_counted_once_per_outage() -> None:
    counters = FleetCounters()
    dev = device(counters)
    dev.network_down()
    dev.network_down()
    assert not dev.network_up and counters.offline_now == 1 and counters.network_drops == 1
    assert counters.severed == 0  # nothing was connected
    dev.network_restored()
    assert not dev.network_up and counters.offline_now == 1
    dev.network_restored()
    assert dev.network_up and counters.offline_now == 0
    dev.network_restored()  # more ends than starts: harmless
    assert counters.offline_now == 0
    dev.network_down()
    dev.network_down()
    dev.network_restored(all_windows=True)
    assert dev.network_up and counters.offline_now == 0 and counters.network_drops == 2


async def test_a_device_whose_network_is_down_makes_no_attempt_until_it_returns() -> None:
    counters = FleetCounters()
    changed = asyncio.Event()
    dev = device(counters, changed)
    dev.network_down()
    runner = asyncio.create_task(dev.run())
    await asyncio.sleep(0.2)
    assert counters.connect_failures == 0  # broker port 1 would refuse at once
    dev.network_restored()
    async with asyncio.timeout(5):
        while counters.connect_failures == 0:
            changed.clear()
            await changed.wait()
    await dev.stop()
    async with asyncio.timeout(5):
        await runner


async def test_stop_wakes_a_device_waiting_for_its_network() -> None:
    dev = device(FleetCounters())
    dev.network_down()
    runner = asyncio.create_task(dev.run())
    await asyncio.sleep(0.05)
    await dev.stop()
    async with asyncio.timeout(2):
        await runner


# ---------------------------------------------------------------- config from a profile


def test_fleet_config_from_profile_carries_every_setting() -> None:
    flaky = BUILTIN["flaky"]
    config = FleetConfig.from_profile(flaky, broker_url=BROKER, device_ids=("a",), seed=4)
    assert config.apply_time_s == flaky.apply.time_s
    assert config.apply_jitter_s == flaky.apply.jitter_s
    assert config.failure_rate == flaky.apply.failure_rate
    assert config.flaky == flaky.flaky and config.storm is None and config.slow is None
    assert config.seed == 4 and config.profile().flaky == FlakySpec(**_fields(flaky.flaky))
    assert config.profile().apply == flaky.apply
    slow = FleetConfig.from_profile(BUILTIN["slow"], broker_url=BROKER, device_ids=("a",))
    assert slow.link_settings().slow == BUILTIN["slow"].slow


def _fields(spec: object) -> dict[str, float]:
    return {name: getattr(spec, name) for name in spec.__struct_fields__}  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["stable", "slow"])
def test_profiles_without_windows_start_no_scheduler(name: str) -> None:
    config = FleetConfig.from_profile(BUILTIN[name], broker_url=BROKER, device_ids=("a",))
    assert not config.profile().has_offline_windows
