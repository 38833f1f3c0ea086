"""Simulated workload processes: the supervisor machine's process table, on asyncio timers.

The role of :class:`edge_agent.supervisor.processes.ProcessTable` for the
machine (:mod:`edge_agent.supervisor.machine`), with no process at all: a
start answers ``Spawned`` or ``SpawnFailed`` after a delay, a run ends with
``Exited`` when its drawn crash time comes, a probe answers ``ProbeDone``.
Thousands of devices share one event loop; a run costs one small object and
at most one timer.

Rules:
- How a run behaves comes from the profile
  (:class:`simulator.profiles.ProcessBehaviour`, per workload and version via
  :meth:`simulator.profiles.WorkloadsSpec.behaviour`), drawn when the start is
  asked for: its start delay, whether it fails to start, whether its probes
  fail (the whole run), and when it crashes. Every start draws exactly four
  numbers from the device's own rng, so a seed replays a device's runs
  whatever else the loop is doing.
- A start's answer goes to the ``then`` callback given with it, once: a stop
  while it is still starting answers ``SpawnFailed`` at once (nobody waits for
  ever). ``Exited`` (a crash) and ``ProbeDone`` go to ``deliver``. A stopped
  run says nothing: the runtime releases it from the machine itself, as
  the real runtime does.
- A probe of a run that is not (or no longer) running answers not ok; the
  machine drops answers for another run anyway.
- Event times are the ``clock`` (the fleet's wall clock, as the machine is
  fed); delays are loop timers.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.supervisor.machine import Exited, Probe, ProbeDone, Spawned, SpawnFailed
from simulator.profiles import ProcessBehaviour, WorkloadsSpec

FIRST_PID = 1000
Answer = Spawned | SpawnFailed


@dataclass(slots=True)
class SimProcess:
    """One simulated run of an instance."""

    instance: str
    workload: str
    version: str
    pid: int
    unhealthy: bool  # its probes fail (drawn at the start)
    crash_after_s: float | None  # run time before it crashes; None: until stopped
    running: bool = False
    timer: asyncio.TimerHandle | None = None
    then: Callable[[Answer], None] | None = None  # while starting


class SimProcessTable:
    """The simulated processes of one device. Loop-bound; not thread-safe."""

    __slots__ = ("_behaviours", "_clock", "_deliver", "_loop", "_next_pid", "_procs", "_rng")

    def __init__(
        self,
        spec: WorkloadsSpec,
        *,
        rng: random.Random,
        deliver: Callable[[Exited | ProbeDone], None],
        clock: Callable[[], float],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._behaviours = _Behaviours(spec)
        self._rng = rng
        self._deliver = deliver
        self._clock = clock
        self._loop = loop or asyncio.get_running_loop()
        self._procs: dict[str, SimProcess] = {}
        self._next_pid = FIRST_PID

    # -- reading

    def alive(self, instance: str) -> bool:
        proc = self._procs.get(instance)
        return proc is not None and proc.running

    def running(self) -> dict[str, SimProcess]:
        return {name: p for name, p in self._procs.items() if p.running}

    def __len__(self) -> int:
        return len(self._procs)

    # -- commands

    def spawn(
        self, instance: str, workload: str, version: str, then: Callable[[Answer], None]
    ) -> None:
        """Start ``instance``; ``then`` gets Spawned or SpawnFailed after the start delay.

        A run of the same instance still here is stopped first (as a real start
        refuses two copies of one instance)."""
        self.stop(instance)
        how = self._behaviours.get(workload, version)
        rng = self._rng
        delay = how.start_s + how.start_jitter_s * rng.random()
        fails = rng.random() < how.start_failure_rate
        unhealthy = rng.random() < how.health_failure_rate
        crash_draw = rng.random()
        crash_after = (
            -how.mean_time_to_crash_s * _log1m(crash_draw) if how.mean_time_to_crash_s else None
        )
        self._next_pid += 1
        proc = SimProcess(instance, workload, version, self._next_pid, unhealthy, crash_after)
        proc.then = then
        self._procs[instance] = proc
        proc.timer = self._loop.call_later(delay, self._started, proc, fails, how.crash_exit_code)

    def stop(self, instance: str) -> None:
        """Stop ``instance`` at once (a simulated stop takes no grace period)."""
        proc = self._procs.pop(instance, None)
        if proc is None:
            return
        if proc.timer is not None:
            proc.timer.cancel()
        then, proc.then, proc.running = proc.then, None, False
        if then is not None:  # still starting: whoever waits hears it did not
            then(SpawnFailed(instance, "stopped while starting", self._clock()))

    def probe(self, probe: Probe) -> None:
        """Answer ``probe`` after the version's probe time (not ok for an unhealthy run)."""
        proc = self._procs.get(probe.instance)
        how = self._behaviours.get(probe.workload, proc.version if proc else "")
        self._loop.call_later(how.probe_s, self._answer_probe, probe, proc)

    def close(self) -> None:
        """Stop everything (the device stops); no callbacks after this."""
        for proc in self._procs.values():
            if proc.timer is not None:
                proc.timer.cancel()
            proc.then, proc.running = None, False
        self._procs.clear()

    # -- timers

    def _started(self, proc: SimProcess, fails: bool, exit_code: int) -> None:
        then, proc.then, proc.timer = proc.then, None, None
        now = self._clock()
        if fails:
            self._procs.pop(proc.instance, None)
            if then is not None:
                then(SpawnFailed(proc.instance, "simulated start failure", now))
            return
        proc.running = True
        if proc.crash_after_s is not None:
            proc.timer = self._loop.call_later(proc.crash_after_s, self._crashed, proc, exit_code)
        if then is not None:
            then(Spawned(proc.instance, proc.pid, now))

    def _crashed(self, proc: SimProcess, exit_code: int) -> None:
        proc.timer, proc.running = None, False
        if self._procs.get(proc.instance) is proc:
            del self._procs[proc.instance]
            self._deliver(Exited(proc.instance, exit_code, self._clock()))

    def _answer_probe(self, probe: Probe, proc: SimProcess | None) -> None:
        current = self._procs.get(probe.instance)
        ok = current is proc and proc is not None and proc.running and not proc.unhealthy
        detail = "ok (simulated)" if ok else "simulated probe failure"
        self._deliver(ProbeDone(probe.instance, probe.run, probe.index, ok, detail, self._clock()))


class _Behaviours:
    """Each (workload, version)'s resolved behaviour, worked out once."""

    __slots__ = ("_cache", "_spec")

    def __init__(self, spec: WorkloadsSpec) -> None:
        self._spec = spec
        self._cache: dict[tuple[str, str], ProcessBehaviour] = {}

    def get(self, workload: str, version: str) -> ProcessBehaviour:
        key = (workload, version)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._spec.behaviour(workload, version)
        return found


def _log1m(u: float) -> float:
    """log(1 - u) for u in [0, 1): an exponential draw from one uniform one."""
    return math.log1p(-u)
