"""The supervising runtime: the agent's steps carried out with real, supervised processes.

``SupervisingRuntime`` is the agent's :class:`edge_agent.runtime.Runtime` with
``supervises = True``. It installs and switches through
:class:`edge_agent.runtime.WorkloadApplier`, runs workloads through
:class:`edge_agent.supervisor.processes.ProcessTable`, and lets the pure
:class:`edge_agent.supervisor.machine.Supervisor` decide restarts and health;
the machine's core events go to the agent core through ``feed``.

Rules (``docs/runtime.md``):
- The machine is touched under one lock; the process table and probes are
  never called under it (the table calls back from its watcher thread).
  Core events are fed after the lock is released.
- Instances are named ``<workload>.g<generation>``; the one serving a workload
  is in ``_serving``. How a start replaces what runs, and a rollback's work,
  are the pure decisions of :mod:`edge_agent.supervisor.transaction` (shared
  with the simulator); a rollout's ``Txn`` remembers what each start replaced.
- Before a stop or a stop-then-start switch the update-lock gate is asked;
  while it names a holder the step waits (up to ``lock_wait_max_s``).
- ``switch.json`` records what a switch replaced until commit or rollback;
  an agent that died in between rolls it back at the next start (the hub
  then sends the generation again). ``applied.json`` is the committed
  generation's configuration, what ``resume`` runs.
- At start (``resume``) a process still running from before is adopted when
  its launch is the one the applied generation wants, otherwise stopped;
  exactly one instance per workload runs afterwards.
- Every wait has a deadline (``SupervisorSettings``).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.plan import WorkloadSpec, WorkloadSpecError, workload_specs
from edge_agent.runtime import ApplyError, WorkloadApplier
from edge_agent.settings import BundleSettings, SupervisorSettings
from edge_agent.store import atomic_write_bytes
from edge_agent.supervisor import limits as limits_mod
from edge_agent.supervisor.lockfiles import LOCK_DIR_ENV, lock_dir
from edge_agent.supervisor.machine import (
    Adopt,
    Exited,
    Probe,
    ProbeDone,
    Release,
    Reloaded,
    Spawn,
    Spawned,
    SpawnFailed,
    Supervise,
    Supervisor,
    SupervisorAction,
    SupervisorEvent,
    Tick,
    Unwatch,
    Watch,
)
from edge_agent.supervisor.processes import Exited as ProcessExited
from edge_agent.supervisor.processes import Launch, ProcessTable, Running, SpawnError
from edge_agent.supervisor.spec import HttpGet, WorkloadRun
from edge_agent.supervisor.transaction import Txn, how_to_start, undo, workload_runs
from protocols import Desired

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot

log = logging.getLogger("driftless.agent.supervisor")
CONFIG_FILE = "config.json"


class LockGate(Protocol):
    """The update-lock check before a workload is stopped or switched."""

    def blocking(self, workload: str, now: float) -> str | None:
        """Who holds ``workload``'s update lock and until when, or None when free."""


class NoLocks:
    """No update locks on this device: nothing ever blocks."""

    def blocking(self, workload: str, now: float) -> str | None:
        return None


@dataclass
class _Instance:
    name: str
    run: WorkloadRun
    launch: Launch


_Txn = Txn[_Instance]


class SupervisingRuntime:
    """Install, switch, start, stop, watch health, commit and roll back, with processes."""

    supervises = True

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: BundleSettings,
        supervisor: SupervisorSettings,
        trusted_root: TrustedRoot | None,
        agent_version: str,
        clock: Callable[[], float] = time.time,
        lock_gate: LockGate | None = None,
        tag: str | None = None,
        request_restart: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.settings = supervisor
        self.clock = clock
        self.gate: LockGate = lock_gate or NoLocks()
        self.applier = WorkloadApplier(
            data_dir,
            settings=settings,
            trusted_root=trusted_root,
            agent_version=agent_version,
            clock=clock,
            request_restart=request_restart,  # firmware A/B: a switch restarts the agent
        )
        self.state_dir = self.data_dir / "supervisor"
        self._tag = tag
        self._table: ProcessTable | None = None  # made on first use: see :attr:`table`
        self._table_lock = threading.Lock()
        self.machine = Supervisor(jitter=random.Random().random, floor_s=supervisor.restart_floor_s)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closing = threading.Event()
        self._feed: Callable[[Any], None] = lambda _event: None
        self._runs: dict[int, dict[str, WorkloadRun]] = {}
        self._passive: set[str] = set()  # workloads with nothing to run (firmware slots)
        self._serving: dict[str, _Instance] = {}
        self._instances: dict[str, _Instance] = {}
        self._txn: dict[int, _Txn] = {}
        self._probes: queue.Queue[Probe | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._loop, name="supervisor", daemon=True),
            threading.Thread(target=self._probe_loop, name="probes", daemon=True),
        ]

    # ---------------------------------------------------------------- steps

    def install(self, desired: Desired) -> None:
        self._runs[desired.generation] = self._merge(desired, self.applier.prepare(desired))

    def switch(self, desired: Desired) -> None:
        generation = desired.generation
        if generation not in self._runs:
            self.install(desired)
        runs = self._runs[generation]
        configs = {name: self._read(self._config_path(name)) for name in runs}
        self.applier.switch(desired)
        pointers, config = self.applier.undo_record(generation) or ({}, None)
        record = {
            "generation": generation,
            "pointers": pointers,
            "config": _b64(config),
            "configs": {name: _b64(data) for name, data in configs.items()},
        }
        try:
            atomic_write_bytes(self._switch_path, msgspec.json.encode(record))
            for name, run in runs.items():
                if run.config is not None:
                    atomic_write_bytes(self._config_path(name), run.config)
        except OSError as exc:
            raise ApplyError(f"cannot write workload configuration: {exc}") from None

    def start_workload(self, generation: int, name: str) -> None:
        if name in self._passive and name not in self._runs.get(generation, {}):
            return  # firmware: nothing runs here; its slot was confirmed at boot
        run = self._run(generation, name)
        txn = self._txn.setdefault(generation, _Txn())
        old = self._serving.get(name)
        alive = old is not None and self._alive(old.launch.instance)
        how = how_to_start(run, old.run if old else None, alive)
        if how == "keep":
            return
        if how == "reload" and old is not None:
            if self._signal(old.launch.instance, run.reload_signal or 0):
                txn.reloaded[name] = (old, old.run)
                old.run = run
                self._handle(Reloaded(old.launch.instance, self.clock()))
                return
            how = how_to_start(run, old.run, alive, may_reload=False)
        if how == "handover" and old is not None:
            txn.handover[name] = old
            self._handle(Unwatch(old.launch.instance, self.clock()))  # not the new version's
        elif old is not None:
            self._wait_for_lock(name)
            self._stop(old)
        txn.replaced.setdefault(name, old)
        instance = self._new_instance(name, run, generation)
        self._spawn_now(instance, watched=False)
        txn.started[name] = instance
        self._serving[name] = instance

    def stop_workload(self, generation: int, name: str) -> None:
        old = self._serving.pop(name, None)
        if old is None:
            return
        self._wait_for_lock(name)
        self._stop(old)
        self._txn.setdefault(generation, _Txn()).removed[name] = old

    def wait_for_health(self, generation: int, names: tuple[str, ...]) -> None:
        for name in names:
            if name in self._passive and name not in self._runs.get(generation, {}):
                self._feed(HealthPassed(name, self.clock()))  # confirmed at boot, or no commit
                continue
            serving = self._serving.get(name)
            if serving is None:
                raise ApplyError(f"workload {name} was not started")
            self._handle(Watch(serving.launch.instance, self.clock()))

    def commit(self, generation: int) -> None:
        txn = self._txn.pop(generation, _Txn())
        for old in txn.handover.values():
            self._wait_for_lock(old.name)
            self._stop(old)
        for name in txn.removed:
            if name not in self._serving:
                self._remove_files(name)
        self.applier.commit(generation)
        config = self._read(self.applier.config_path)
        try:
            if config is not None:
                atomic_write_bytes(self._applied_path, config)
        except OSError as exc:
            raise ApplyError(f"cannot record the applied configuration: {exc}") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._switch_path)
        for older in [g for g in self._runs if g < generation]:
            del self._runs[older]

    def roll_back(self, generation: int, to_generation: int) -> str | None:
        txn = self._txn.pop(generation, _Txn())
        tails = self._tails(list(txn.started) + list(txn.reloaded))
        work = undo(txn, lambda old: self._alive(old.launch.instance))
        for name, new in work.stop.items():
            self._stop(new)
            self._serving.pop(name, None)
        self.applier.roll_back(generation, to_generation)
        self._undo_configs()
        self._serving.update(work.serve)
        for old in txn.handover.values():
            if old not in work.restart:  # left running: it speaks for its workload again
                self._handle(Watch(old.launch.instance, self.clock()))
        back: list[_Instance] = []
        for old in work.restart:
            self._spawn_now(old, watched=False)
            back.append(old)
        for old, previous in work.reload:
            old.run = previous
            self._signal(old.launch.instance, previous.reload_signal or 0)
            self._handle(Reloaded(old.launch.instance, self.clock()))
            back.append(old)
        self._wait_healthy(back)
        return tails or None

    # ---------------------------------------------------------------- agent start and stop

    def resume(self, feed: Callable[[Any], None]) -> tuple[WorkloadSpec, ...]:
        """Adopt or restart the applied generation's workloads; see the module's rules."""
        self._feed = feed
        self._finish_interrupted_switch()
        applied = self._read(self._applied_path) or self._read(self.applier.config_path)
        adopted = self.table.adopt()
        specs: tuple[WorkloadSpec, ...] = ()
        runs: dict[str, WorkloadRun] = {}
        generation = 0
        if applied is not None:
            try:
                document = msgspec.json.decode(applied)
                generation = int(document.get("generation", 0))
                config = document.get("config") or {}
                specs = tuple(workload_specs(config))
                if specs:
                    desired = Desired(
                        device_id="local", generation=generation, config=config, issued_at=0
                    )
                    runs = self._merge(desired, self.applier.prepare(desired))
            except (ApplyError, WorkloadSpecError, ValueError, msgspec.DecodeError) as exc:
                log.error("cannot resume the applied workloads", extra={"error": str(exc)})
                specs, runs = (), {}
        keep = self._choose_adopted(adopted, runs, generation)
        kept = {running.instance for running in keep.values()}
        for running in adopted:
            if running.instance not in kept:
                self.table.stop(running.instance)
        for name, run in runs.items():
            found = keep.get(name)
            if found is not None:
                instance = _Instance(name, run, found.launch or self._launch(name, run, generation))
                self._instances[found.instance] = instance
                self._serving[name] = instance
                self._handle(
                    Adopt(found.instance, name, run.restart, run.health, found.pid,
                          found.started_at, self.clock())
                )  # fmt: skip
                continue
            instance = self._new_instance(name, run, generation)
            self._serving[name] = instance
            try:
                self._spawn_now(instance, watched=True)
            except ApplyError as exc:
                log.error("cannot restart workload", extra={"workload": name, "error": str(exc)})
        return specs

    @property
    def table(self) -> ProcessTable:
        """The process table, made (and the supervisor's threads started) on first use.

        Lazily, so an agent that is built but never run (tests, `agent enroll`) starts no
        threads and does not make itself a subreaper.
        """
        table = self._table
        if table is None:
            with self._table_lock:
                if self._table is None:
                    self._table = ProcessTable(
                        self.state_dir, on_exit=self._on_exit, clock=self.clock, tag=self._tag
                    )
                    for thread in self._threads:
                        thread.start()
                table = self._table
        return table

    def close(self) -> None:
        with self._table_lock:
            table, started = self._table, self._table is not None
        if not started:
            return
        self._closing.set()
        self._wakeup.set()
        self._probes.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        assert table is not None
        table.close()

    # ---------------------------------------------------------------- machine plumbing

    def _handle(self, event: SupervisorEvent) -> None:
        """Feed the machine, carry out its actions (never under the lock), then the core's."""
        pending: list[SupervisorEvent] = [event]
        for_core: list[Any] = []
        while pending:
            with self._lock:
                actions: list[SupervisorAction] = self.machine.handle(pending.pop(0))
            for action in actions:
                if isinstance(action, Spawn):
                    pending.append(self._spawn(action.instance))
                elif isinstance(action, Probe):
                    self._probes.put(action)
                else:
                    for_core.append(action)
        for core_event in for_core:
            self._log_event(core_event)
            self._feed(core_event)
        self._wakeup.set()

    def _spawn(self, name: str) -> SupervisorEvent:
        instance = self._instances.get(name)
        now = self.clock()
        if instance is None:
            return SpawnFailed(name, "unknown instance", now)
        try:
            running = self.table.start(instance.launch)
        except SpawnError as exc:
            return SpawnFailed(name, str(exc), now)
        return Spawned(name, running.pid, now)

    def _spawn_now(self, instance: _Instance, *, watched: bool) -> None:
        """Start ``instance`` now; a start that fails raises ApplyError (nothing left running)."""
        name, run = instance.launch.instance, instance.run
        self._instances[name] = instance
        with self._lock:
            self.machine.handle(
                Supervise(name, instance.name, run.restart, run.health, self.clock(), watched)
            )
        try:
            running = self.table.start(instance.launch)
        except SpawnError as exc:
            with self._lock:
                self.machine.handle(Release(name, self.clock()))
            raise ApplyError(f"workload {instance.name}: cannot start: {exc}") from None
        self._handle(Spawned(name, running.pid, self.clock()))

    def _on_exit(self, exited: ProcessExited) -> None:
        code = -exited.signal if exited.signal else exited.exit_code
        self._handle(Exited(exited.instance, code, exited.at))

    def _loop(self) -> None:
        rotate_at = 0.0
        while not self._closing.is_set():
            with self._lock:
                due = self.machine.next_wakeup()
            now = self.clock()
            wait = self.settings.log_rotate_s if due is None else max(0.0, due - now)
            self._wakeup.wait(min(wait, self.settings.log_rotate_s))
            if self._closing.is_set():
                return
            self._handle(Tick(self.clock()))
            # After the tick, not before: handling sets the event, and clearing it first made
            # the next wait return at once (22 % of a core at idle). A wake-up lost here is
            # harmless: the next pass reads next_wakeup() afresh.
            self._wakeup.clear()
            if time.monotonic() >= rotate_at:
                rotate_at = time.monotonic() + self.settings.log_rotate_s
                self.table.rotate_logs()

    def _probe_loop(self) -> None:
        from edge_agent.supervisor.probes import command_probe, http_probe

        while (probe := self._probes.get()) is not None:
            check = probe.check
            instance = self._instances.get(probe.instance)
            if isinstance(check, HttpGet):
                result = http_probe(check.port, check.path, timeout_s=check.timeout_s)
            elif instance is None:
                continue
            else:
                result = command_probe(
                    check.argv,
                    cwd=instance.launch.cwd,
                    env=instance.launch.env,
                    timeout_s=check.timeout_s,
                )
            self._handle(
                ProbeDone(probe.instance, probe.run, probe.index, result.ok, result.detail,
                          self.clock())
            )  # fmt: skip

    # ---------------------------------------------------------------- helpers

    @property
    def _switch_path(self) -> Path:
        return self.state_dir / "switch.json"

    @property
    def _applied_path(self) -> Path:
        return self.state_dir / "applied.json"

    def _config_path(self, name: str) -> Path:
        return self.applier.workloads.directory / name / CONFIG_FILE

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ApplyError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _merge(self, desired: Desired, prepared: list[Any]) -> dict[str, WorkloadRun]:
        try:
            runs, passive = workload_runs((item.spec, item.manifest) for item in prepared)
        except WorkloadSpecError as exc:
            raise ApplyError(str(exc)) from None
        self._passive |= passive  # firmware A/B: the slot's boot checks it
        return runs

    def _run(self, generation: int, name: str) -> WorkloadRun:
        run = self._runs.get(generation, {}).get(name)
        if run is None:
            raise ApplyError(f"workload {name} of generation {generation} is not installed")
        return run

    def _launch(self, name: str, run: WorkloadRun, generation: int) -> Launch:
        version_dir = self.applier.workloads.version_dir(name, run.version)
        argv = list(run.argv)
        if "/" in argv[0] and not os.path.isabs(argv[0]):
            argv[0] = str(version_dir / argv[0])
        env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
        env.update(run.env)
        env.update(DRIFTLESS_WORKLOAD=name, DRIFTLESS_VERSION=run.version)
        env[LOCK_DIR_ENV] = str(lock_dir(self.data_dir))  # where it may take its update lock
        if run.config is not None:
            env["DRIFTLESS_CONFIG"] = str(self._config_path(name))
        lim = run.limits
        return Launch(
            workload=name,
            instance=f"{name}.g{generation}",
            argv=tuple(argv),
            cwd=(version_dir / run.working_dir).resolve(),
            env=env,
            limits=limits_mod.Limits(
                memory_bytes=lim.memory_bytes,
                cpu_seconds=lim.cpu_seconds,
                open_files=lim.open_files,
                cgroup_memory_max=lim.cgroup_memory_bytes,
                cgroup_cpu_max=(
                    lim.cgroup_cpu_millicores / 1000 if lim.cgroup_cpu_millicores else None
                ),
            ),
            log_max_bytes=run.log_max_bytes,
            log_keep=run.log_keep,
            stop_signal=run.stop_signal,
            stop_grace_s=run.stop_grace_s,
        )

    def _new_instance(self, name: str, run: WorkloadRun, generation: int) -> _Instance:
        instance = _Instance(name, run, self._launch(name, run, generation))
        if self._alive(instance.launch.instance):  # same name still running: replace it
            self._stop(self._instances.get(instance.launch.instance, instance))
        return instance

    def _alive(self, instance: str) -> bool:
        return instance in self.table.running()

    def _signal(self, instance: str, signum: int) -> bool:
        running = self.table.running().get(instance)
        if running is None:
            return False
        try:
            os.kill(running.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def _stop(self, instance: _Instance) -> None:
        with self._lock:
            self.machine.handle(Release(instance.launch.instance, self.clock()))
        self.table.stop(instance.launch.instance)

    def _wait_for_lock(self, name: str) -> None:
        deadline = time.monotonic() + self.settings.lock_wait_max_s
        while (holder := self.gate.blocking(name, self.clock())) is not None:
            if time.monotonic() >= deadline:
                raise ApplyError(f"workload {name}: update lock still held by {holder}")
            log.info("switch waits for an update lock", extra={"workload": name, "by": holder})
            time.sleep(self.settings.lock_poll_s)

    def _wait_healthy(self, instances: list[_Instance]) -> None:
        deadline = time.monotonic() + self.settings.step_timeout_s
        waiting = {i.launch.instance: i for i in instances}
        while waiting:
            for name in list(waiting):
                view = self.machine.view(name)
                if view is not None and view.healthy:
                    self._handle(Watch(name, self.clock()))
                    del waiting[name]
                elif view is None or view.state == "failed":
                    raise ApplyError(f"previous version of {waiting[name].name} failed again")
            if waiting and time.monotonic() >= deadline:
                names = ", ".join(i.name for i in waiting.values())
                raise ApplyError(
                    f"previous versions of {names} not healthy again within "
                    f"{self.settings.step_timeout_s:g} s"
                )
            if waiting:
                time.sleep(0.05)

    def _tails(self, names: list[str]) -> str:
        parts = []
        for name in names:
            lines = self.table.log_tail(
                name, self.settings.log_tail_lines, self.settings.log_tail_bytes
            )
            if lines:
                parts.append(f"{name} log:\n" + "\n".join(lines))
        return "\n".join(parts)

    def _undo_configs(self) -> None:
        record = self._read(self._switch_path)
        if record is None:
            return
        configs = msgspec.json.decode(record).get("configs", {})
        for name, data in configs.items():
            path = self._config_path(name)
            if data is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            else:
                atomic_write_bytes(path, base64.b64decode(data))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._switch_path)

    def _finish_interrupted_switch(self) -> None:
        """A switch the agent did not commit or roll back before it died: roll it back."""
        record = self._read(self._switch_path)
        if record is None:
            return
        document = msgspec.json.decode(record)
        log.warning(
            "rolling back a switch interrupted by an agent restart",
            extra={"generation": document.get("generation")},
        )
        for name, version in document.get("pointers", {}).items():
            self.applier.workloads.point(name, version)
        config = document.get("config")
        if config is not None:
            atomic_write_bytes(self.applier.config_path, base64.b64decode(config))
        self._undo_configs()

    def _choose_adopted(
        self, adopted: list[Running], runs: dict[str, WorkloadRun], generation: int
    ) -> dict[str, Running]:
        """The one adopted process per applied workload whose launch is the wanted one."""
        keep: dict[str, Running] = {}
        for running in sorted(adopted, key=lambda r: r.started_at, reverse=True):
            run = runs.get(running.workload)
            if run is None or running.workload in keep or running.launch is None:
                continue
            wanted = self._launch(running.workload, run, generation)
            launch = running.launch
            if (launch.argv, launch.cwd, dict(launch.env)) == (
                wanted.argv,
                wanted.cwd,
                dict(wanted.env),
            ):
                keep[running.workload] = running
        return keep

    def _remove_files(self, name: str) -> None:
        for path in (
            self.applier.workloads.directory / name,
            self.table.log_path(name).parent,
        ):
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _log_event(event: Any) -> None:
        if isinstance(event, WorkloadExited):
            log.info(
                "workload exited",
                extra={
                    "workload": event.name,
                    "exit_code": event.exit_code,
                    "restarting": event.restarting,
                },
            )
        elif isinstance(event, HealthFailed):
            log.warning("workload unhealthy", extra={"workload": event.name, "why": event.reason})
        elif isinstance(event, HealthPassed):
            log.info("workload healthy", extra={"workload": event.name})


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()
