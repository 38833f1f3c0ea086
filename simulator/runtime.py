"""The simulated device's supervising runtime: the agent's steps with simulated processes.

What :class:`edge_agent.supervisor.runtime.SupervisingRuntime` is on a device,
on one asyncio loop for thousands of devices: the same pure
:class:`edge_agent.supervisor.machine.Supervisor` decides restarts and health,
the same :mod:`edge_agent.supervisor.transaction` decides how a start replaces
what runs and what a rollback undoes, and the same
:func:`edge_agent.supervisor.spec.merge` turns each verified manifest's ``run``
and its desired entry into the workload's specification. Only the processes
are simulated (:class:`simulator.processes.SimProcessTable`).

Rules:
- Instances are named ``<workload>.g<generation>`` as on a device; the one
  serving a workload is in ``_serving``.
- ``install`` reads each workload's manifest from the device's simulated disk
  (``manifests``: bundle sha -> what the verified manifest says); a bundle that
  is not there, or a spec the merge refuses, fails the step (ApplyError).
- A rollout's first start of an instance is awaited: ``SpawnFailed`` fails the
  step (nothing of it stays), as a real start that cannot exec. Restarts are
  the machine's ``Spawn`` actions; their answers go back to the machine.
- The machine's core events go to ``feed`` in order (the device queues them
  behind the event it is handling); its next wake-up is one loop timer.
- A rollback waits for the previous versions to be healthy again, woken by
  the machine's changes, up to ``step_timeout_s``.
- Deliberate differences from a device: no files, no update locks (nothing
  waits for one), no log tails in a rollback's report, and a worker that
  restarts does not re-adopt: its devices' simulated disks are gone with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.plan import WorkloadSpec, WorkloadSpecError, workload_specs
from edge_agent.runtime import ApplyError
from edge_agent.supervisor.machine import (
    Probe,
    Release,
    Reloaded,
    Spawn,
    SpawnFailed,
    Supervise,
    Supervisor,
    SupervisorEvent,
    Tick,
    Unwatch,
    Watch,
)
from edge_agent.supervisor.restart import DEFAULT_FLOOR_S
from edge_agent.supervisor.spec import WorkloadRun
from edge_agent.supervisor.transaction import RunSource, Txn, how_to_start, undo, workload_runs
from protocols import Desired
from simulator.processes import Answer, SimProcessTable
from simulator.profiles import WorkloadsSpec

CoreEvent = WorkloadExited | HealthPassed | HealthFailed
DEFAULT_STEP_TIMEOUT_S = 120.0


@dataclass(slots=True)
class SimInstance:
    name: str  # the workload
    run: WorkloadRun
    instance: str  # <workload>.g<generation>


class SimRuntime:
    """Install, start, stop, watch health, commit and roll back, with simulated processes."""

    supervises = True

    def __init__(
        self,
        spec: WorkloadsSpec,
        *,
        manifests: Callable[[str], RunSource | None],
        feed: Callable[[CoreEvent], None],
        clock: Callable[[], float],
        process_rng: random.Random,
        restart_rng: random.Random,
        floor_s: float = DEFAULT_FLOOR_S,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    ) -> None:
        self._manifests = manifests
        self._feed = feed
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self.step_timeout_s = step_timeout_s
        self.machine = Supervisor(jitter=restart_rng.random, floor_s=floor_s)
        self.table = SimProcessTable(
            spec, rng=process_rng, deliver=self._handle, clock=clock, loop=self._loop
        )
        self._runs: dict[int, dict[str, WorkloadRun]] = {}
        self._passive: set[str] = set()
        self._serving: dict[str, SimInstance] = {}
        self._instances: dict[str, SimInstance] = {}
        self._txn: dict[int, Txn[SimInstance]] = {}
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at: float | None = None
        self._changed = asyncio.Event()
        self._closed = False

    # ---------------------------------------------------------------- reading

    def serving(self) -> Mapping[str, SimInstance]:
        """The instance serving each workload now."""
        return dict(self._serving)

    # ---------------------------------------------------------------- steps

    def install(self, desired: Desired) -> None:
        """The generation's workloads as they will run; raises ApplyError."""
        try:
            specs = workload_specs(desired.config)
        except WorkloadSpecError as exc:
            raise ApplyError(str(exc)) from None
        items: list[tuple[WorkloadSpec, RunSource]] = []
        for spec in specs:
            source = self._manifests(spec.bundle)
            if source is None:
                raise ApplyError(
                    f"workload {spec.name}: bundle {spec.bundle} is not on this device"
                )
            items.append((spec, source))
        try:
            runs, passive = workload_runs(items)
        except WorkloadSpecError as exc:
            raise ApplyError(str(exc)) from None
        self._passive |= passive
        self._runs[desired.generation] = runs

    async def start_workload(self, generation: int, name: str) -> None:
        """As the device's start (see :mod:`edge_agent.supervisor.transaction`)."""
        if name in self._passive and name not in self._runs.get(generation, {}):
            return  # firmware: nothing runs; its slot's boot check stands for it
        run = self._run(generation, name)
        txn = self._txn.setdefault(generation, Txn())
        old = self._serving.get(name)
        alive = old is not None and self.table.alive(old.instance)
        how = how_to_start(run, old.run if old else None, alive)
        if how == "keep":
            return
        if how == "reload" and old is not None:  # alive: a simulated signal always arrives
            if alive:
                txn.reloaded[name] = (old, old.run)
                old.run = run
                self._handle(Reloaded(old.instance, self._clock()))
                return
            how = how_to_start(run, old.run, alive, may_reload=False)
        if how == "handover" and old is not None:
            txn.handover[name] = old
            self._handle(Unwatch(old.instance, self._clock()))  # not the new version's
        elif old is not None:
            self._stop(old)
        txn.replaced.setdefault(name, old)
        instance = SimInstance(name, run, f"{name}.g{generation}")
        await self._start_now(instance)
        txn.started[name] = instance
        self._serving[name] = instance

    def stop_workload(self, generation: int, name: str) -> None:
        old = self._serving.pop(name, None)
        if old is None:
            return
        self._stop(old)
        self._txn.setdefault(generation, Txn()).removed[name] = old

    def wait_for_health(self, generation: int, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self._passive and name not in self._runs.get(generation, {}):
                self._feed(HealthPassed(name, self._clock()))
                continue
            serving = self._serving.get(name)
            if serving is None:
                raise ApplyError(f"workload {name} was not started")
            self._handle(Watch(serving.instance, self._clock()))

    def commit(self, generation: int) -> None:
        txn = self._txn.pop(generation, Txn())
        for old in txn.handover.values():
            self._stop(old)
        for older in [g for g in self._runs if g < generation]:
            del self._runs[older]

    async def roll_back(self, generation: int, to_generation: int) -> str | None:
        """Stop the new instances, start the previous ones, wait until they are healthy."""
        txn = self._txn.pop(generation, Txn())
        work = undo(txn, lambda old: self.table.alive(old.instance))
        for name, new in work.stop.items():
            self._stop(new)
            self._serving.pop(name, None)
        self._runs.pop(generation, None)
        self._serving.update(work.serve)
        for old in txn.handover.values():
            if old not in work.restart:  # left running: it speaks for its workload again
                self._handle(Watch(old.instance, self._clock()))
        back: list[SimInstance] = []
        for old in work.restart:
            await self._start_now(old)
            back.append(old)
        for old, previous in work.reload:
            old.run = previous
            self._handle(Reloaded(old.instance, self._clock()))
            back.append(old)
        await self._wait_healthy(back)
        return None

    def close(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.cancel()
        self.table.close()

    # ---------------------------------------------------------------- machine plumbing

    def _handle(self, event: SupervisorEvent) -> None:
        """Feed the machine and carry out its actions; core events go to ``feed`` in order."""
        if self._closed:
            return
        pending: list[SupervisorEvent] = [event]
        while pending:
            for action in self.machine.handle(pending.pop(0)):
                if isinstance(action, Spawn):
                    self._respawn(action)
                elif isinstance(action, Probe):
                    self.table.probe(action)
                else:
                    self._feed(action)
        self._changed.set()
        self._schedule()

    def _respawn(self, action: Spawn) -> None:
        instance = self._instances.get(action.instance)
        if instance is None:
            self._handle(SpawnFailed(action.instance, "unknown instance", self._clock()))
            return
        self.table.spawn(action.instance, action.workload, instance.run.version, self._handle)

    def _schedule(self) -> None:
        due = self.machine.next_wakeup()
        if due == self._wakeup_at:
            return
        if self._wakeup is not None:
            self._wakeup.cancel()
        self._wakeup_at = due
        self._wakeup = (
            None
            if due is None
            else self._loop.call_later(max(0.0, due - self._clock()), self._tick)
        )

    def _tick(self) -> None:
        self._wakeup = self._wakeup_at = None
        self._handle(Tick(self._clock()))

    async def _start_now(self, instance: SimInstance) -> None:
        """Start ``instance`` and wait for its answer; a failed start raises ApplyError."""
        name, run = instance.instance, instance.run
        self._instances[name] = instance
        # The machine's Spawn is carried out here, awaited, as the device's first start is.
        self.machine.handle(
            Supervise(name, instance.name, run.restart, run.health, self._clock(), False)
        )
        answer: asyncio.Future[Answer] = self._loop.create_future()
        self.table.spawn(name, instance.name, run.version, partial(_answer, answer))
        result = await answer
        if isinstance(result, SpawnFailed):
            self.machine.handle(Release(name, self._clock()))
            self._instances.pop(name, None)
            raise ApplyError(f"workload {instance.name}: cannot start: {result.reason}")
        self._handle(result)

    def _stop(self, instance: SimInstance) -> None:
        self.machine.handle(Release(instance.instance, self._clock()))
        self.table.stop(instance.instance)
        self._schedule()

    def _run(self, generation: int, name: str) -> WorkloadRun:
        run = self._runs.get(generation, {}).get(name)
        if run is None:
            raise ApplyError(f"workload {name} of generation {generation} is not installed")
        return run

    async def _wait_healthy(self, instances: list[SimInstance]) -> None:
        deadline = self._loop.time() + self.step_timeout_s
        waiting = {i.instance: i for i in instances}
        while waiting:
            for name in list(waiting):
                view = self.machine.view(name)
                if view is not None and view.healthy:
                    self._handle(Watch(name, self._clock()))
                    del waiting[name]
                elif view is None or view.state == "failed":
                    raise ApplyError(f"previous version of {waiting[name].name} failed again")
            if not waiting:
                return
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                names = ", ".join(i.name for i in waiting.values())
                raise ApplyError(
                    f"previous versions of {names} not healthy again within "
                    f"{self.step_timeout_s:g} s"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def _answer(future: asyncio.Future[Answer], answer: Answer) -> None:
    """A start's answer to whoever still waits for it (a cancelled step does not)."""
    if not future.done():
        future.set_result(answer)
