"""A rollout's transaction on the device: how each start replaces what ran, and how to undo it.

Pure: no I/O, no clock, no processes. The paho agent's
:class:`edge_agent.supervisor.runtime.SupervisingRuntime` (real processes) and
the simulator's :class:`simulator.runtime.SimRuntime` (simulated processes)
both carry out these decisions, so a simulated fleet rolls out and rolls back
exactly as devices do. ``I`` is whatever the runtime calls an instance.

Rules:
- :func:`workload_runs`: a generation's workloads as they run, from each
  verified manifest's ``run`` merged with its desired entry; a ``firmware``
  bundle (or one without ``run``) is *passive*: nothing runs, its A/B slot's
  boot check stands for its health.
- :func:`how_to_start`, in this order: ``keep`` the instance that runs the very
  same specification; ``reload`` it in place when only ``config`` changed and
  the manifest names a reload signal (if the signal cannot be sent, ask again
  with ``may_reload=False``); ``handover`` (start the new one beside the old,
  stop the old at commit) for ``start-then-stop`` while the old one runs;
  otherwise ``replace`` (stop the old one, after the update lock, then start);
  ``fresh`` when nothing ran.
- A :class:`Txn` remembers, per workload, what the first start of the
  generation replaced (a later start of the same workload keeps the first
  record), what it started, handed over from, reloaded or removed.
- :func:`undo` (a rollback): stop every new instance; serve again what each
  start replaced or each stop removed; start those again, except an old one a
  hand-over left running; send the previous run's reload signal to those
  reloaded in place. Then the runtime waits for them to be healthy again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

from edge_agent.supervisor.spec import WorkloadRun, merge

if TYPE_CHECKING:
    from edge_agent.plan import WorkloadSpec
    from firmware_bundles.model import RunSpec

I = TypeVar("I")  # noqa: E741 - the instance type of a runtime

StartHow = Literal["keep", "reload", "handover", "replace", "fresh"]


class RunSource(Protocol):
    """What a verified bundle's manifest says about running it (a ``Manifest`` is one)."""

    @property
    def kind(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def run(self) -> RunSpec | None: ...


def workload_runs(
    items: Iterable[tuple[WorkloadSpec, RunSource]],
) -> tuple[dict[str, WorkloadRun], set[str]]:
    """Pure: ``(runs by workload name, passive workload names)``; raises WorkloadSpecError."""
    runs: dict[str, WorkloadRun] = {}
    passive: set[str] = set()
    for spec, manifest in items:
        if manifest.kind == "firmware" or manifest.run is None:
            passive.add(spec.name)
            continue
        runs[spec.name] = merge(spec.name, manifest.version, manifest.run, spec.options)
    return runs, passive


def how_to_start(
    run: WorkloadRun, old: WorkloadRun | None, old_alive: bool, *, may_reload: bool = True
) -> StartHow:
    """Pure: how ``run`` takes over from the instance serving its workload (see the rules)."""
    if old is None:
        return "fresh"
    if old == run and old_alive:
        return "keep"
    if may_reload and run.reload_signal and old.same_program(run):
        return "reload"
    if run.update == "start-then-stop" and old_alive:
        return "handover"
    return "replace"


@dataclass
class Txn(Generic[I]):
    """What one generation's starts and stops replaced."""

    replaced: dict[str, I | None] = field(default_factory=dict)
    started: dict[str, I] = field(default_factory=dict)
    handover: dict[str, I] = field(default_factory=dict)
    reloaded: dict[str, tuple[I, WorkloadRun]] = field(default_factory=dict)
    """Reloaded in place, with the run it had before."""
    removed: dict[str, I] = field(default_factory=dict)


@dataclass(frozen=True)
class Undo(Generic[I]):
    """A rollback's work, in order: stop, serve again, start again, reload back."""

    stop: dict[str, I]
    serve: dict[str, I]
    restart: list[I]
    reload: list[tuple[I, WorkloadRun]]


def undo(txn: Txn[I], alive: Callable[[I], bool]) -> Undo[I]:
    """Pure (``alive`` reads the process table): how to roll ``txn`` back."""
    serve = {n: old for n, old in {**txn.replaced, **txn.removed}.items() if old is not None}
    restart = [old for n, old in serve.items() if not (n in txn.handover and alive(old))]
    return Undo(dict(txn.started), serve, restart, list(txn.reloaded.values()))
