"""The supervisor of one device's workloads, sans I/O: events in, actions out.

Like h11's ``Connection`` it does no I/O and reads no clock: the runtime on a
device (threads, real processes) and the simulator (asyncio, simulated
processes, thousands of devices in one process) feed it the same events and
carry out the same actions. One :class:`Supervisor` per device; it holds one
entry per *instance* (a workload's process under one name, e.g. ``web.g7``:
during a hand-over the old and new instance of a workload run side by side).

Rules:
- Events: :class:`Supervise` (start one), :class:`Adopt` (watch one that
  already runs), :class:`Spawned` / :class:`SpawnFailed` (the answer to a
  :class:`Spawn`), :class:`Exited`, :class:`ProbeDone` (the answer to a
  :class:`Probe`), :class:`Tick` (time passed: call it at
  :meth:`Supervisor.next_wakeup`), :class:`Watch`, :class:`Unwatch`, :class:`Reloaded`,
  :class:`Release`. Every event carries ``now``.
- Actions: :class:`Spawn`, :class:`Probe`, and the agent core's events
  ``WorkloadExited``, ``HealthPassed`` and ``HealthFailed`` (feed them to
  :class:`edge_agent.core.AgentCore`).
- An exit is decided by :func:`edge_agent.supervisor.restart.next_restart`:
  restart after the delay (``WorkloadExited(restarting=True)``), or give
  up: ``failed`` (stays stopped) or finished. A failed instance takes no
  further action and blocks nothing: a newer generation releases it.
- Health by :mod:`edge_agent.supervisor.health`: ``HealthPassed`` once when
  an instance turns healthy (again), ``HealthFailed`` when a healthy one
  fails a check ``failures`` times in a row, or when one was never healthy
  by its deadline (``HealthSpec.deadline_s`` after its start).
- Core events of an instance are held until it is watched (:class:`Watch`:
  the rollout is ready for them), then delivered in order: a new version
  started by a rollout reports to the core only once the core waits for its
  health, so no verdict is lost to a race with the step's own answer.
  :class:`Unwatch` holds them again: the core's events name a workload, not an
  instance, so during a hand-over the outgoing instance is unwatched and its
  crashes or health cannot pass for the new version's (nor fail it).
- A probe's answer counts only for the run it was asked for (``run`` grows
  with every spawn); answers for a released or restarted instance are
  dropped.
- Randomness (the restart jitter) comes from the ``jitter`` callable given
  at construction; a seeded ``random.Random(...).random`` makes runs
  repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.supervisor.health import CheckState, failing, observe, verdict
from edge_agent.supervisor.restart import DEFAULT_FLOOR_S, GiveUp, exits_in_window, next_restart
from edge_agent.supervisor.spec import AliveFor, HealthSpec, Probed, RestartPolicy

FIRST_PROBE_MAX_S = 0.5
"""The first probe of a run comes after its interval, or this, whichever is sooner."""

InstanceState = Literal["spawning", "running", "backoff", "failed", "finished"]


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Supervise:
    """Start ``instance`` of ``workload`` and keep it running by its policy."""

    instance: str
    workload: str
    restart: RestartPolicy
    health: HealthSpec
    now: float
    watched: bool = True


@dataclass(frozen=True, slots=True)
class Adopt:
    """Watch ``instance``, already running as ``pid`` since ``started_at`` (agent restart)."""

    instance: str
    workload: str
    restart: RestartPolicy
    health: HealthSpec
    pid: int
    started_at: float
    now: float
    watched: bool = True


@dataclass(frozen=True, slots=True)
class Spawned:
    instance: str
    pid: int
    now: float


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    """The process could not be started (an exit with no code, for the policy)."""

    instance: str
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Exited:
    """The process ended; ``exit_code`` negative for a signal, None when unknowable."""

    instance: str
    exit_code: int | None
    now: float


@dataclass(frozen=True, slots=True)
class ProbeDone:
    instance: str
    run: int
    index: int
    ok: bool
    detail: str
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Watch:
    """From now on the core hears about ``instance`` (held events first, in order)."""

    instance: str
    now: float


@dataclass(frozen=True, slots=True)
class Unwatch:
    """From now on the core's events of ``instance`` are held (until a :class:`Watch`): a
    hand-over's outgoing instance, whose crashes and health are not the new version's."""

    instance: str
    now: float


@dataclass(frozen=True, slots=True)
class Reloaded:
    """The instance was sent its reload signal: its health is judged afresh, unwatched."""

    instance: str
    now: float


@dataclass(frozen=True, slots=True)
class Release:
    """Forget ``instance`` (stopped by the runtime, or replaced)."""

    instance: str
    now: float


SupervisorEvent = (
    Supervise
    | Adopt
    | Spawned
    | SpawnFailed
    | Exited
    | ProbeDone
    | Tick
    | Watch
    | Unwatch
    | Reloaded
    | Release
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start the process of ``instance``; answer Spawned or SpawnFailed."""

    instance: str
    workload: str


@dataclass(frozen=True, slots=True)
class Probe:
    """Run health check ``index`` of ``instance``; answer ProbeDone with ``run``."""

    instance: str
    workload: str
    run: int
    index: int
    check: Probed


CoreEvent = WorkloadExited | HealthPassed | HealthFailed
SupervisorAction = Spawn | Probe | CoreEvent


# ---------------------------------------------------------------- the machine


@dataclass(slots=True)
class _Instance:
    instance: str
    workload: str
    restart: RestartPolicy
    health: HealthSpec
    watched: bool
    state: InstanceState = "spawning"
    pid: int | None = None
    run: int = 0
    started_at: float = 0.0
    health_from: float = 0.0
    checks: list[CheckState] = field(default_factory=list)
    next_probe: list[float | None] = field(default_factory=list)
    healthy: bool = False
    deadline_reported: bool = False
    restart_at: float | None = None
    exits: list[float] = field(default_factory=list)
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    reason: str = ""
    held: list[CoreEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What the runtime may read about an instance (reports, waits)."""

    instance: str
    workload: str
    state: InstanceState
    pid: int | None
    healthy: bool
    restarts: int
    last_exit_code: int | None
    last_exit_at: float | None
    reason: str


class Supervisor:
    """The supervisor of one device: :meth:`handle` per event, carry out the actions."""

    __slots__ = ("_instances", "_jitter", "floor_s")

    def __init__(self, *, jitter: Callable[[], float], floor_s: float = DEFAULT_FLOOR_S) -> None:
        self._instances: dict[str, _Instance] = {}
        self._jitter = jitter
        self.floor_s = floor_s

    # -- reading

    def view(self, instance: str) -> InstanceView | None:
        entry = self._instances.get(instance)
        if entry is None:
            return None
        return InstanceView(
            entry.instance,
            entry.workload,
            entry.state,
            entry.pid,
            entry.healthy,
            entry.restarts,
            entry.last_exit_code,
            entry.last_exit_at,
            entry.reason,
        )

    def instances(self) -> list[str]:
        return list(self._instances)

    def next_wakeup(self) -> float | None:
        """When :class:`Tick` has something to do, if nothing else happens first."""
        times = [t for entry in self._instances.values() for t in self._wakeups(entry)]
        return min(times, default=None)

    # -- events

    def handle(self, event: SupervisorEvent) -> list[SupervisorAction]:
        """Pure with respect to the outside world: updates this object and returns actions."""
        handler = _HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"unknown supervisor event {event!r}")
        return handler(self, event)

    def _supervise(self, event: Supervise) -> list[SupervisorAction]:
        name, workload = event.instance, event.workload
        self._instances[name] = _Instance(
            name, workload, event.restart, event.health, event.watched
        )
        return [Spawn(name, workload)]

    def _adopt(self, event: Adopt) -> list[SupervisorAction]:
        entry = _Instance(
            event.instance, event.workload, event.restart, event.health, event.watched
        )
        self._instances[event.instance] = entry
        return self._running(entry, event.pid, event.started_at, event.now)

    def _spawned(self, event: Spawned) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None or entry.state != "spawning":
            return []
        return self._running(entry, event.pid, event.now, event.now)

    def _spawn_failed(self, event: SpawnFailed) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None or entry.state != "spawning":
            return []
        return self._ended(entry, None, event.now, f"cannot start: {event.reason}")

    def _exited(self, event: Exited) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None or entry.state != "running":
            return []
        return self._ended(entry, event.exit_code, event.now, "")

    def _ticked(self, event: Tick) -> list[SupervisorAction]:
        actions: list[SupervisorAction] = []
        for entry in list(self._instances.values()):
            actions += self._tick(entry, event.now)
        return actions

    def _watch(self, event: Watch) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None:
            return []
        entry.watched = True
        held, entry.held = entry.held, []
        return [*held, *self._evaluate(entry, event.now)]

    def _unwatch(self, event: Unwatch) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is not None:
            entry.watched = False
        return []

    def _reloaded(self, event: Reloaded) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None or entry.state != "running":
            return []
        entry.watched = entry.healthy = entry.deadline_reported = False
        entry.health_from = event.now
        entry.checks = [CheckState() for _ in entry.health.checks]
        entry.next_probe = self._first_probes(entry.health, event.now)
        return []

    def _release(self, event: Release) -> list[SupervisorAction]:
        self._instances.pop(event.instance, None)
        return []

    # -- internals

    @staticmethod
    def _first_probes(health: HealthSpec, now: float) -> list[float | None]:
        return [
            None if isinstance(c, AliveFor) else now + min(c.interval_s, FIRST_PROBE_MAX_S)
            for c in health.checks
        ]

    def _running(
        self, entry: _Instance, pid: int, started_at: float, now: float
    ) -> list[SupervisorAction]:
        entry.state, entry.pid, entry.run = "running", pid, entry.run + 1
        entry.started_at = entry.health_from = started_at
        entry.healthy = entry.deadline_reported = False
        entry.restart_at = None
        entry.checks = [CheckState() for _ in entry.health.checks]
        entry.next_probe = self._first_probes(entry.health, now)
        return self._evaluate(entry, now)

    def _emit(self, entry: _Instance, event: CoreEvent) -> list[SupervisorAction]:
        if entry.watched:
            return [event]
        entry.held.append(event)
        return []

    def _ended(
        self, entry: _Instance, code: int | None, now: float, why: str
    ) -> list[SupervisorAction]:
        entry.pid = None
        entry.healthy = False
        entry.last_exit_code, entry.last_exit_at = code, now
        entry.exits = exits_in_window([*entry.exits, now], now, entry.restart.interval_s)
        decision = next_restart(
            entry.restart,
            entry.exits,
            now,
            self._jitter(),
            exit_code=code,
            floor_s=self.floor_s,
        )
        if isinstance(decision, GiveUp):
            entry.state = "failed" if decision.failed else "finished"
            entry.reason = f"{why}; {decision.reason}" if why else decision.reason
            return self._emit(entry, WorkloadExited(entry.workload, code, False, now))
        entry.state, entry.restart_at = "backoff", now + decision
        entry.restarts += 1
        entry.reason = why or f"restarting in {decision:.1f} s"
        return self._emit(entry, WorkloadExited(entry.workload, code, True, now))

    def _probe_done(self, event: ProbeDone) -> list[SupervisorAction]:
        entry = self._instances.get(event.instance)
        if entry is None or entry.state != "running" or entry.run != event.run:
            return []
        check = entry.health.checks[event.index]
        if isinstance(check, AliveFor):
            return []
        entry.checks[event.index] = observe(
            entry.checks[event.index], event.ok, event.detail, event.now
        )
        entry.next_probe[event.index] = event.now + check.interval_s
        return self._evaluate(entry, event.now)

    def _tick(self, entry: _Instance, now: float) -> list[SupervisorAction]:
        if entry.state == "backoff" and entry.restart_at is not None and entry.restart_at <= now:
            entry.state, entry.restart_at = "spawning", None
            return [Spawn(entry.instance, entry.workload)]
        if entry.state != "running":
            return []
        actions: list[SupervisorAction] = []
        for index, due in enumerate(entry.next_probe):
            check = entry.health.checks[index]
            if due is not None and due <= now and not isinstance(check, AliveFor):
                entry.next_probe[index] = None  # in flight until ProbeDone
                actions.append(Probe(entry.instance, entry.workload, entry.run, index, check))
        return actions + self._evaluate(entry, now)

    def _evaluate(self, entry: _Instance, now: float) -> list[SupervisorAction]:
        if entry.state != "running":
            return []
        health = entry.health
        if entry.healthy:
            why = failing(health, entry.checks)
            if why is None:
                return []
            entry.healthy = False
            entry.reason = why
            return self._emit(entry, HealthFailed(entry.workload, why, now))
        seen = verdict(health, entry.checks, started_at=entry.health_from, now=now)
        if seen.healthy:
            entry.healthy, entry.reason = True, "healthy"
            return self._emit(entry, HealthPassed(entry.workload, now))
        entry.reason = seen.reason
        if not entry.deadline_reported and now >= entry.health_from + health.deadline_s:
            entry.deadline_reported = True
            why = f"not healthy within {health.deadline_s:g} s: {seen.reason}"
            return self._emit(entry, HealthFailed(entry.workload, why, now))
        return []

    def _wakeups(self, entry: _Instance) -> list[float]:
        if entry.state == "backoff" and entry.restart_at is not None:
            return [entry.restart_at]
        if entry.state != "running":
            return []
        times = [t for t in entry.next_probe if t is not None]
        if not entry.healthy:
            seen = verdict(entry.health, entry.checks, started_at=entry.health_from, now=0.0)
            if seen.at is not None:
                times.append(seen.at)
            if not entry.deadline_reported:
                times.append(entry.health_from + entry.health.deadline_s)
        return times


_HANDLERS: dict[type, Callable[[Supervisor, Any], list[SupervisorAction]]] = {
    Supervise: Supervisor._supervise,
    Adopt: Supervisor._adopt,
    Spawned: Supervisor._spawned,
    SpawnFailed: Supervisor._spawn_failed,
    Exited: Supervisor._exited,
    ProbeDone: Supervisor._probe_done,
    Tick: Supervisor._ticked,
    Watch: Supervisor._watch,
    Unwatch: Supervisor._unwatch,
    Reloaded: Supervisor._reloaded,
    Release: Supervisor._release,
}
