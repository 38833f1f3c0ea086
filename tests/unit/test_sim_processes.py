"""The simulated process table: starts, crashes and probes drawn from the profile, seeded.

Real asyncio timers with delays of milliseconds; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from edge_agent.supervisor.machine import (
    Exited,
    Probe,
    ProbeDone,
    Spawned,
    SpawnFailed,
    SupervisorEvent,
)
from edge_agent.supervisor.spec import HttpGet
from simulator.processes import SimProcessTable
from simulator.profiles import (
    BehaviourOverride,
    ProfileError,
    WorkloadsSpec,
    profile_from_dict,
)

FAST = {"start_s": 0.005, "start_jitter_s": 0.005, "probe_s": 0.001}
CHECK = HttpGet(8080, "/health")


class Recorder:
    """Collects what the table answers; waits for a count with a deadline."""

    def __init__(self) -> None:
        self.events: list[SupervisorEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: SupervisorEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 2.0) -> list[SupervisorEvent]:
        async with asyncio.timeout(timeout_s):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events


def table(spec: WorkloadsSpec, seed: int = 1) -> tuple[SimProcessTable, Recorder]:
    recorder = Recorder()
    return SimProcessTable(
        spec, rng=random.Random(seed), deliver=recorder, clock=time.time
    ), recorder


async def test_a_start_answers_spawned_after_its_delay_and_the_run_is_alive() -> None:
    procs, _ = table(WorkloadsSpec(start_s=0.05, start_jitter_s=0.0))
    answers = Recorder()
    began = time.monotonic()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    assert not procs.alive("web.g1")  # still starting
    [answer] = await answers.wait_for(1)
    assert isinstance(answer, Spawned) and answer.instance == "web.g1"
    assert time.monotonic() - began >= 0.045
    assert procs.alive("web.g1") and list(procs.running()) == ["web.g1"]


async def test_a_start_failure_rate_of_one_answers_spawn_failed_and_leaves_nothing() -> None:
    procs, _ = table(WorkloadsSpec(start_failure_rate=1.0, **FAST))
    answers = Recorder()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    [answer] = await answers.wait_for(1)
    assert isinstance(answer, SpawnFailed) and "simulated start failure" in answer.reason
    assert not procs.alive("web.g1") and len(procs) == 0


async def test_a_run_crashes_with_the_profiles_exit_code() -> None:
    procs, delivered = table(WorkloadsSpec(mean_time_to_crash_s=0.02, crash_exit_code=-9, **FAST))
    answers = Recorder()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    await answers.wait_for(1)
    [exited] = await delivered.wait_for(1)
    assert isinstance(exited, Exited) and (exited.instance, exited.exit_code) == ("web.g1", -9)
    assert not procs.alive("web.g1")


@pytest.mark.parametrize(
    ("rate", "ok"), [pytest.param(0.0, True, id="healthy"), pytest.param(1.0, False, id="bad")]
)
async def test_probes_answer_by_the_runs_health_draw(rate: float, ok: bool) -> None:
    procs, delivered = table(WorkloadsSpec(health_failure_rate=rate, **FAST))
    answers = Recorder()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    await answers.wait_for(1)
    procs.probe(Probe("web.g1", "web", 1, 0, CHECK))
    [done] = await delivered.wait_for(1)
    assert isinstance(done, ProbeDone) and (done.run, done.index, done.ok) == (1, 0, ok)


async def test_a_version_override_makes_only_that_version_bad() -> None:
    spec = WorkloadsSpec(
        versions={
            "2.0.0": BehaviourOverride(health_failure_rate=1.0),
            "db@2.0.0": BehaviourOverride(health_failure_rate=0.0),
        },
        **FAST,
    )
    assert spec.behaviour("web", "1.0.0").health_failure_rate == 0.0
    assert spec.behaviour("web", "2.0.0").health_failure_rate == 1.0
    assert spec.behaviour("db", "2.0.0").health_failure_rate == 0.0  # name@version wins
    assert spec.behaviour("web", "2.0.0").start_s == FAST["start_s"]  # the rest is kept
    procs, delivered = table(spec)
    answers = Recorder()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    procs.spawn("web.g2", "web", "2.0.0", answers)
    await answers.wait_for(2)
    procs.probe(Probe("web.g1", "web", 1, 0, CHECK))
    procs.probe(Probe("web.g2", "web", 1, 0, CHECK))
    done = await delivered.wait_for(2)
    assert {e.instance: e.ok for e in done if isinstance(e, ProbeDone)} == {
        "web.g1": True,
        "web.g2": False,
    }


async def test_a_stop_while_starting_answers_at_once_and_a_stopped_run_says_nothing() -> None:
    procs, delivered = table(WorkloadsSpec(start_s=0.05, mean_time_to_crash_s=0.01))
    answers = Recorder()
    procs.spawn("web.g1", "web", "1.0.0", answers)
    procs.stop("web.g1")
    assert isinstance(answers.events[0], SpawnFailed)  # synchronously: nobody waits forever
    await asyncio.sleep(0.1)  # past the start delay and a crash: neither comes
    assert len(answers.events) == 1 and delivered.events == []
    procs.probe(Probe("web.g1", "web", 1, 0, CHECK))
    [done] = await delivered.wait_for(1)
    assert isinstance(done, ProbeDone) and not done.ok  # not running: not ok


async def outcomes(seed: int) -> list[tuple[str, bool]]:
    spec = WorkloadsSpec(start_failure_rate=0.3, health_failure_rate=0.3, **FAST)
    procs, delivered = table(spec, seed)
    answers = Recorder()
    for i in range(40):
        procs.spawn(f"w{i}.g1", f"w{i}", "1.0.0", answers)
    await answers.wait_for(40)
    for i in range(40):
        procs.probe(Probe(f"w{i}.g1", f"w{i}", 1, 0, CHECK))
    await delivered.wait_for(40)
    started = {e.instance: isinstance(e, Spawned) for e in answers.events}
    healthy = {e.instance: e.ok for e in delivered.events if isinstance(e, ProbeDone)}
    return sorted((name, started[name] and healthy[name]) for name in started)


async def test_a_seed_replays_the_same_outcomes_and_another_seed_differs() -> None:
    first, again, other = await outcomes(5), await outcomes(5), await outcomes(6)
    assert first == again
    assert first != other
    good = sum(ok for _, ok in first)
    assert 10 < good < 30  # ~0.7 * 0.7 * 40 = 20 survive both draws


@pytest.mark.parametrize(
    ("section", "where"),
    [
        pytest.param({"health_failure_rate": 1.5}, "health_failure_rate", id="rate-above-one"),
        pytest.param({"start_s": -1}, "start_s", id="negative-delay"),
        pytest.param({"crash_rate": 0.1}, "crash_rate", id="unknown-field"),
        pytest.param({"versions": {"bad version": {}}}, "versions", id="bad-version-key"),
        pytest.param(
            {"versions": {"2.0.0": {"health_failure_rate": 2}}},
            "health_failure_rate",
            id="bad-override",
        ),
        pytest.param({"crash_exit_code": 999}, "crash_exit_code", id="exit-code-out-of-range"),
    ],
)
def test_a_bad_workloads_section_is_refused_naming_the_field(
    section: dict[str, object], where: str
) -> None:
    with pytest.raises(ProfileError, match=where):
        profile_from_dict({"name": "p", "workloads": section}, source="p.toml")


def test_a_workloads_section_loads_from_toml_shaped_data_over_a_base() -> None:
    profile = profile_from_dict(
        {
            "name": "bad-release",
            "base": "workloads",
            "workloads": {"versions": {"web@2.0.0": {"health_failure_rate": 1.0}}},
        }
    )
    spec = profile.workloads
    assert spec is not None and spec.start_s == 0.2  # from the built-in
    assert spec.behaviour("web", "2.0.0").health_failure_rate == 1.0
    assert profile_from_dict(profile.as_dict()) == profile
