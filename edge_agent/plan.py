"""The apply planner: from what the device has to the newest desired document, as steps.

Modelled on balena-supervisor's ``plan(current, target) -> steps``: a purely
computational function, called again after every step finished or failed,
whose first step is the next thing to do. The driver executes each step
through its one executor table and feeds back :class:`edge_agent.core.StepDone`
or :class:`edge_agent.core.StepFailed`; the reconcile core records the outcome
in the :class:`Rollout` and plans again, until the plan is a :class:`NoOp`.

Rules:
- The order of a rollout: fetch the referenced bundles (only if the config
  references any), install them (unpack into new version directories;
  nothing the device runs changes), switch (security versions, ``current``
  pointers, the configuration), then, only where the runtime supervises
  workloads: stop what the new generation no longer has, start what it has,
  wait until every started workload is healthy; then commit.
- Anything that fails before the switch fails the generation and changes
  nothing the device runs. Anything that fails after it (a workload that
  exits or fails its health check, or the health deadline) rolls back to the
  applied generation; the generation is then recorded as failed and reported
  as ``rolled_back``. Either way it is not retried until a newer one arrives.
- :class:`NoOp` ends a plan: the rollout is committed, or failed (and rolled
  back where it had switched). It is explicit, so "nothing to do" is a
  decision the core can log. An empty plan means "wait": the started
  workloads' health events (or the health deadline's timer) come next.
- A supervising runtime starts only what changed: a workload whose desired
  entry equals the applied generation's (same bundle, env, config,
  dependencies, overrides) keeps running untouched and is not waited for, so
  a failed or crash-looping workload the new generation does not change
  never blocks it. A change of ``config`` alone is still a start: the
  runtime restarts the workload (or sends its reload signal) without
  reinstalling it.
- Starts follow ``depends_on`` (a workload after what it depends on), stops
  go the other way.
- A HELD document (``config["hold"] is True``, :func:`is_held`: pre-staging) is
  fetched and installed only: its plan is ``FetchBundles`` (if it references
  bundles), ``Install`` (if it has bundle workloads), then ``NoOp("staged")``.
  Nothing the device runs changes; the core reports it ``staged`` and a newer
  document without ``hold`` switches, its fetch and install finding the files
  and version directories already there.
- Pure: no I/O, no clock (deadlines are computed by the core from ``now``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
from msgspec.structs import replace

from edge_agent.supervisor import spec as _spec
from edge_agent.supervisor.spec import (
    WORKLOAD_NAME,
    EntryOptions,
    check_dependencies,
    dependency_order,
    parse_entry,
)
from protocols import HOLD_KEY, Desired, bundle_references
from protocols.bundles import BUNDLE_KEY, WORKLOADS_KEY, is_sha256

# ---------------------------------------------------------------- the workloads of a config

WorkloadSpecError = _spec.WorkloadSpecError


@dataclass(frozen=True)
class WorkloadSpec:
    """One entry of ``config["workloads"]``: a slot name, the bundle it runs, the device's part."""

    name: str
    bundle: str
    options: EntryOptions = field(default_factory=EntryOptions)


def workload_specs(config: Mapping[str, object]) -> list[WorkloadSpec]:
    """Pure: the bundle workloads of a desired config; raises WorkloadSpecError.

    Entries with a ``bundle`` (the reference rule of :mod:`protocols.bundles`)
    must have a ``name`` usable as a directory name, unique in the list, a
    SHA-256 in hex as ``bundle``, and only the fields
    :func:`edge_agent.supervisor.spec.parse_entry` knows; ``depends_on`` must
    name listed workloads without a cycle.
    """
    workloads = config.get(WORKLOADS_KEY)
    if not isinstance(workloads, list):
        return []
    specs: list[WorkloadSpec] = []
    for index, entry in enumerate(workloads):
        if not isinstance(entry, dict) or not isinstance(entry.get(BUNDLE_KEY), str):
            continue
        bundle = entry[BUNDLE_KEY].lower()
        name = entry.get("name")
        if not isinstance(name, str) or not WORKLOAD_NAME.fullmatch(name):
            raise WorkloadSpecError(
                f"workloads[{index}].name must match {WORKLOAD_NAME.pattern}, got {name!r}"
            )
        if not is_sha256(bundle):
            raise WorkloadSpecError(
                f"workloads[{index}].bundle must be a SHA-256 in hex, got {bundle[:80]!r}"
            )
        if any(spec.name == name for spec in specs):
            raise WorkloadSpecError(f"workloads[{index}].name {name!r} appears twice")
        specs.append(WorkloadSpec(name, bundle, parse_entry(index, entry)))
    check_dependencies({spec.name: spec.options.depends_on for spec in specs})
    return specs


def is_held(config: Mapping[str, object]) -> bool:
    """Pure: whether a desired config is HELD: fetch and install, never switch.

    Only the JSON value ``true`` holds; anything else (absent, false, "yes") does not,
    so a document never stages by accident."""
    return config.get(HOLD_KEY) is True


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class FetchBundles:
    """Make every bundle in ``bundles`` (file SHA-256s) present and verified in the cache."""

    generation: int
    bundles: tuple[str, ...]


@dataclass(frozen=True)
class Install:
    """Verify and unpack the generation's bundle workloads into new version directories."""

    desired: Desired


@dataclass(frozen=True)
class Switch:
    """Raise security versions, switch ``current`` pointers, write the configuration."""

    desired: Desired


@dataclass(frozen=True)
class StopWorkload:
    """Stop a workload the generation no longer has (supervising runtimes only)."""

    generation: int
    name: str


@dataclass(frozen=True)
class StartWorkload:
    """Start (or hand over to) the generation's version of a workload."""

    generation: int
    name: str


@dataclass(frozen=True)
class WaitForHealth:
    """Watch the started workloads' health checks until they pass or ``timeout_s`` passes.

    The core asks for a timer at the deadline; the runtime answers with
    HealthPassed / HealthFailed / WorkloadExited events.
    """

    generation: int
    names: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class Commit:
    """Make the generation the one to come back to (A/B: confirm the slot)."""

    generation: int


@dataclass(frozen=True)
class RollBack:
    """Switch back to ``to_generation``'s versions and configuration, and restart them."""

    generation: int
    to_generation: int
    reason: str


@dataclass(frozen=True)
class NoOp:
    """Nothing left to do for this rollout; ``why`` says how it ended."""

    generation: int
    why: str


Step = (
    FetchBundles
    | Install
    | Switch
    | StopWorkload
    | StartWorkload
    | WaitForHealth
    | Commit
    | RollBack
    | NoOp
)


def step_generation(step: Step) -> int:
    """Pure: the generation a step belongs to."""
    if isinstance(step, Install | Switch):
        return step.desired.generation
    return step.generation


# ---------------------------------------------------------------- what the device has


class Rollout(msgspec.Struct, frozen=True):
    """One generation on its way in: what is done, and what went wrong.

    A frozen struct (not a dataclass): the core replaces it after every step,
    and ``msgspec.structs.replace`` costs a fraction of ``dataclasses.replace``.
    """

    desired: Desired
    specs: tuple[WorkloadSpec, ...] = ()
    fetched: bool = False
    installed: bool = False
    switched: bool = False
    stopped: frozenset[str] = frozenset()
    started: frozenset[str] = frozenset()
    healthy: frozenset[str] = frozenset()
    waiting_health: bool = False
    committed: bool = False
    failure: str | None = None
    rolled_back: bool = False
    rollback_failed: bool = False

    @property
    def generation(self) -> int:
        return self.desired.generation

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    @property
    def held(self) -> bool:
        """A HELD document: staged (fetched and installed), never switched."""
        return is_held(self.desired.config)

    @property
    def staged(self) -> bool:
        """A held rollout that got everything it needs in place, without a failure."""
        return self.held and self.failure is None and not plan_held(self)

    def done(self, step: Step) -> Rollout:
        """Pure: this rollout after ``step`` succeeded."""
        match step:
            case FetchBundles():
                return replace(self, fetched=True)
            case Install():
                return replace(self, installed=True)
            case Switch():
                return replace(self, switched=True)
            case StopWorkload(name=name):
                return replace(self, stopped=self.stopped | {name})
            case StartWorkload(name=name):
                return replace(self, started=self.started | {name})
            case WaitForHealth():
                return replace(self, waiting_health=True)
            case Commit():
                return replace(self, committed=True)
            case RollBack():
                return replace(self, rolled_back=True)
            case NoOp():
                return self
        raise TypeError(f"unknown step {step!r}")

    def failed(self, step: Step | None, reason: str) -> Rollout:
        """Pure: this rollout after ``step`` failed (None: a workload turned out unhealthy).

        A rollback that fails ends the rollout too (it is not tried again): the
        generation is reported ``failed`` with both reasons.
        """
        if isinstance(step, RollBack):
            failure = f"{self.failure}; rolling back failed too: {reason}"
            return replace(self, failure=failure, rolled_back=True, rollback_failed=True)
        return self if self.failure is not None else replace(self, failure=reason)


@dataclass(frozen=True)
class Current:
    """What the device has, as the planner needs it."""

    applied_generation: int
    supervises: bool = False
    """Whether the runtime starts workloads and checks their health (not yet: issue 13)."""
    running: frozenset[str] = frozenset()
    """Workloads running now (supervising runtimes)."""
    health_timeout_s: float = 60.0
    applied: tuple[WorkloadSpec, ...] = ()
    """The applied generation's workloads (supervising runtimes): what is unchanged."""


def targets(current: Current, rollout: Rollout) -> tuple[str, ...]:
    """Pure: the workloads a rollout starts and waits for, in dependency order.

    For a supervising runtime, those whose entry differs from the applied one;
    otherwise every workload of the rollout.
    """
    if not current.supervises:
        return rollout.names
    applied = {spec.name: spec for spec in current.applied}
    changed = [spec.name for spec in rollout.specs if applied.get(spec.name) != spec]
    return tuple(dependency_order(changed, _depends(rollout.specs)))


def _depends(specs: tuple[WorkloadSpec, ...]) -> dict[str, tuple[str, ...]]:
    return {spec.name: spec.options.depends_on for spec in specs}


def plan_held(rollout: Rollout) -> list[Step]:
    """Pure: what is left of the part every document gets before a switch: fetch the
    referenced bundles, install the bundle workloads (all a HELD document gets)."""
    steps: list[Step] = []
    bundles = bundle_references(rollout.desired.config)
    if bundles and not rollout.fetched:
        steps.append(FetchBundles(rollout.generation, tuple(sorted(bundles))))
    if rollout.specs and not rollout.installed:
        steps.append(Install(rollout.desired))
    return steps


def plan(current: Current, rollout: Rollout) -> list[Step]:
    """Pure: every step left to bring ``rollout``'s generation in, the next one first.

    Ends with :class:`NoOp` when nothing is left: committed, or failed (and rolled
    back where it had switched).
    """
    generation = rollout.generation
    if rollout.committed:
        return [NoOp(generation, "committed")]
    if rollout.failure is not None:
        if rollout.switched and not rollout.rolled_back:
            return [RollBack(generation, current.applied_generation, rollout.failure)]
        return [NoOp(generation, "rolled back" if rollout.rolled_back else "failed")]
    steps = plan_held(rollout)
    if rollout.held:
        return [*steps, NoOp(generation, "staged")]
    if not rollout.switched:
        steps.append(Switch(rollout.desired))
    if current.supervises:
        wanted = set(rollout.names)
        gone = sorted(current.running - wanted - rollout.stopped)
        stop_order = dependency_order(gone, _depends(current.applied))[::-1]
        steps += [StopWorkload(generation, name) for name in stop_order]
        names = targets(current, rollout)
        steps += [StartWorkload(generation, name) for name in names if name not in rollout.started]
        if names and not set(names) <= rollout.healthy:
            if not rollout.waiting_health:
                steps.append(WaitForHealth(generation, names, current.health_timeout_s))
            elif not steps:
                return []  # waiting: the runtime's health events (or the timer) come next
    steps.append(Commit(generation))
    return steps
