"""SimRuntime: the agent's supervisor machine and transaction over simulated processes.

Each test drives the runtime's steps as the core would and checks the core
events it feeds; the processes are the seeded simulated table on real timers.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import pytest

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.runtime import ApplyError
from firmware_bundles.model import Backoff, HttpCheck, RunSpec
from protocols import Desired
from simulator.profiles import BehaviourOverride, WorkloadsSpec
from simulator.runtime import SimRuntime

SHA = {v: f"{i:064x}" for i, v in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1)}
FAST = {"start_s": 0.005, "start_jitter_s": 0.005, "probe_s": 0.001}


@dataclass(frozen=True)
class Source:
    """What a verified manifest says about running the bundle."""

    version: str
    kind: str = "app"
    run: RunSpec | None = None


def source(version: str, *, deadline_s: int = 1, **run: Any) -> Source:
    return Source(
        version,
        run=RunSpec(
            command=["bin/web"],
            checks=[HttpCheck(port=8080, interval_ms=50, failures=1)],
            min_healthy_ms=50,
            health_deadline_s=deadline_s,
            **{"backoff": Backoff(delay_ms=1, attempts=3), **run},
        ),
    )


class Core:
    """Stands for the agent core: records the events fed to it, waits with a deadline."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, kind: type, count: int = 1, timeout_s: float = 3.0) -> list[Any]:
        async with asyncio.timeout(timeout_s):
            while len(found := [e for e in self.events if isinstance(e, kind)]) < count:
                self._changed.clear()
                await self._changed.wait()
        return found


def runtime(
    spec: WorkloadsSpec, core: Core, sources: dict[str, Source] | None = None
) -> SimRuntime:
    known = sources if sources is not None else {SHA[v]: source(v) for v in SHA}
    return SimRuntime(
        spec,
        manifests=known.get,
        feed=core,
        clock=time.time,
        process_rng=random.Random(1),
        restart_rng=random.Random(2),
        floor_s=0.01,
        step_timeout_s=3.0,
    )


def desired(generation: int, version: str) -> Desired:
    config = {"workloads": [{"name": "web", "bundle": SHA[version]}]}
    return Desired(device_id="d", generation=generation, config=config, issued_at=0)


async def wait_alive(rt: SimRuntime, instance: str, timeout_s: float = 3.0) -> None:
    """The simulated table signals no change, so a short poll under a deadline."""
    async with asyncio.timeout(timeout_s):
        while not rt.table.alive(instance):  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.005)


async def roll_out(rt: SimRuntime, generation: int, version: str) -> None:
    rt.install(desired(generation, version))
    await rt.start_workload(generation, "web")
    rt.wait_for_health(generation, ("web",))


async def test_a_good_version_turns_healthy_and_commits() -> None:
    core = Core()
    rt = runtime(WorkloadsSpec(**FAST), core)
    try:
        await roll_out(rt, 1, "1.0.0")
        [passed] = await core.wait_for(HealthPassed)
        assert passed.name == "web"
        rt.commit(1)
        serving = rt.serving()["web"]
        assert (serving.instance, serving.run.version) == ("web.g1", "1.0.0")
        assert rt.table.alive("web.g1")
    finally:
        rt.close()


async def test_a_bad_version_fails_health_and_the_rollback_serves_the_old_one_again() -> None:
    core = Core()
    spec = WorkloadsSpec(versions={"2.0.0": BehaviourOverride(health_failure_rate=1.0)}, **FAST)
    rt = runtime(spec, core)
    try:
        await roll_out(rt, 1, "1.0.0")
        await core.wait_for(HealthPassed)
        rt.commit(1)
        await roll_out(rt, 2, "2.0.0")  # stop-then-start: 1.0.0 is stopped first
        assert not rt.table.alive("web.g1")
        [failed] = await core.wait_for(HealthFailed)
        assert failed.name == "web" and "not healthy within 1 s" in failed.reason
        assert await rt.roll_back(2, 1) is None  # returns once the old version is healthy
        serving = rt.serving()["web"]
        assert (serving.instance, serving.run.version) == ("web.g1", "1.0.0")
        assert rt.table.alive("web.g1") and not rt.table.alive("web.g2")
        view = rt.machine.view("web.g1")
        assert view is not None and view.healthy
        assert rt.machine.view("web.g2") is None
    finally:
        rt.close()


async def test_a_crashing_run_is_restarted_by_its_policy_and_reported() -> None:
    core = Core()
    rt = runtime(WorkloadsSpec(mean_time_to_crash_s=0.05, **FAST), core)
    try:
        await roll_out(rt, 1, "1.0.0")
        exits = await core.wait_for(WorkloadExited, count=2)
        assert all(e.restarting and e.exit_code == 1 for e in exits[:2])
        view = rt.machine.view("web.g1")
        assert view is not None and view.restarts >= 2
    finally:
        rt.close()


async def test_a_bundle_not_on_the_device_fails_the_install_naming_it() -> None:
    rt = runtime(WorkloadsSpec(**FAST), Core(), sources={})
    try:
        with pytest.raises(ApplyError, match=f"bundle {SHA['1.0.0']} is not on this device"):
            rt.install(desired(1, "1.0.0"))
    finally:
        rt.close()


async def test_a_start_that_fails_fails_the_step_and_leaves_nothing_running() -> None:
    core = Core()
    rt = runtime(WorkloadsSpec(start_failure_rate=1.0, **FAST), core)
    try:
        rt.install(desired(1, "1.0.0"))
        with pytest.raises(ApplyError, match="web: cannot start: simulated start failure"):
            await rt.start_workload(1, "web")
        assert len(rt.table) == 0 and rt.machine.instances() == [] and core.events == []
    finally:
        rt.close()


async def test_a_firmware_bundle_is_passive_and_healthy_at_once() -> None:
    core = Core()
    rt = runtime(WorkloadsSpec(**FAST), core, sources={SHA["1.0.0"]: Source("1.0.0", "firmware")})
    try:
        await roll_out(rt, 1, "1.0.0")
        [passed] = await core.wait_for(HealthPassed)
        assert passed.name == "web" and len(rt.table) == 0
    finally:
        rt.close()


async def test_the_outgoing_instance_of_a_hand_over_does_not_speak_for_the_new_version() -> None:
    """start-then-stop: while the new version waits for its health, the old one runs on
    beside it; its crashes are not the new version's (they used to fail the rollout that
    replaced a crashing version, so an abort's restore of a bad release failed on the very
    devices it was for). Held, not lost: a rollback that keeps the old one serving hears them."""
    core = Core()
    spec = WorkloadsSpec(
        versions={
            "1.0.0": BehaviourOverride(mean_time_to_crash_s=0.05),
            "2.0.0": BehaviourOverride(start_s=0.3),  # a long hand-over
        },
        **FAST,
    )
    again = Backoff(delay_ms=1, attempts=1000)
    sources = {
        SHA[v]: source(v, update="start-then-stop", backoff=again) for v in ("1.0.0", "2.0.0")
    }
    rt = runtime(spec, core, sources)
    try:
        await roll_out(rt, 1, "1.0.0")  # watched: its crashes are reported
        await core.wait_for(WorkloadExited)
        rt.commit(1)
        await wait_alive(rt, "web.g1")
        await roll_out(rt, 2, "2.0.0")  # a hand-over: web.g1 runs on beside web.g2
        seen = len(core.events)
        await core.wait_for(HealthPassed)
        after = core.events[seen:]
        assert [type(e).__name__ for e in after] == ["HealthPassed"], after
        new, old = rt.machine.view("web.g2"), rt.machine.view("web.g1")
        assert new is not None and new.healthy  # the pass was the new version's
        assert old is not None and old.restarts > 0  # the old one did crash, unheard
        rt.commit(2)
        assert not rt.table.alive("web.g1") and rt.table.alive("web.g2")
    finally:
        rt.close()


async def test_a_rollback_that_keeps_the_old_instance_hears_it_again() -> None:
    core = Core()
    spec = WorkloadsSpec(
        versions={
            "1.0.0": BehaviourOverride(mean_time_to_crash_s=0.05),
            "2.0.0": BehaviourOverride(health_failure_rate=1.0),
        },
        **FAST,
    )
    again = Backoff(delay_ms=1, attempts=1000)
    sources = {
        SHA[v]: source(v, update="start-then-stop", backoff=again) for v in ("1.0.0", "2.0.0")
    }
    rt = runtime(spec, core, sources)
    try:
        await roll_out(rt, 1, "1.0.0")
        await core.wait_for(WorkloadExited)
        rt.commit(1)
        await wait_alive(rt, "web.g1")
        await roll_out(rt, 2, "2.0.0")
        seen = len(core.events)
        [failed] = await core.wait_for(HealthFailed)
        assert "not healthy within 1 s" in failed.reason
        assert not any(isinstance(e, WorkloadExited) for e in core.events[seen:])
        await rt.roll_back(2, 1)
        assert rt.serving()["web"].instance == "web.g1"
        exits = len([e for e in core.events if isinstance(e, WorkloadExited)])
        await core.wait_for(WorkloadExited, count=exits + 1)  # heard again
    finally:
        rt.close()
