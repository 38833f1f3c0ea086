"""A workload's specification: the signed manifest's ``run`` plus the desired entry's part.

Pure: no I/O, no clock. Who may set what (``docs/runtime.md``, "The
specification"):

- The bundle's manifest (signed by a release key) owns how the program runs:
  command and arguments, working directory, default environment, health
  checks, ``min_healthy_ms`` and the deadline, stop signal and grace, restart
  policy and backoff, resource ceilings, log bounds, the update strategy and
  the reload signal.
- The desired entry (signed by the hub) owns the device's part: ``env``
  (added to the manifest's, winning on a clash; ``DRIFTLESS_*`` is reserved),
  ``config`` (any JSON, rendered to a file whose path is in
  ``DRIFTLESS_CONFIG``), ``depends_on`` (start order), ``restart`` (policy and
  backoff overrides) and ``limits``, which may lower a ceiling the manifest
  set but never raise it.
- Every rule is checked before anything on the device changes, with an error
  that names the entry and the field (:class:`WorkloadSpecError`): unknown
  fields, bad names, a ``depends_on`` naming an unknown workload or making a
  cycle, limits above the manifest's ceiling.
- The objects here are frozen and hashable, so a rollout can compare the
  applied generation's entries with the new ones: equal means unchanged.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

from firmware_bundles.model import AliveCheck, HttpCheck

if TYPE_CHECKING:
    from firmware_bundles.model import RunSpec

WORKLOAD_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV_PREFIX = "DRIFTLESS_"
MAX_CONFIG_BYTES = 256 * 1024
ENTRY_FIELDS = frozenset({"name", "bundle", "env", "config", "depends_on", "restart", "limits"})
RESTART_FIELDS = frozenset(
    {"policy", "attempts", "interval_s", "delay_ms", "max_delay_ms", "jitter_pct"}
)
LIMIT_FIELDS = (
    "memory_bytes",
    "cpu_seconds",
    "open_files",
    "cgroup_memory_bytes",
    "cgroup_cpu_millicores",
)
RestartMode = Literal["always", "on-failure", "never"]
UpdateStrategy = Literal["stop-then-start", "start-then-stop"]


class WorkloadSpecError(ValueError):
    """A desired config whose ``workloads`` list cannot be installed as written."""


# ---------------------------------------------------------------- the device's form


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When an exited workload starts again (``edge_agent.supervisor.restart``)."""

    mode: RestartMode = "on-failure"
    attempts: int = 5
    """Restarts allowed within ``interval_s``; one more exit gives up (``failed``)."""
    interval_s: float = 600.0
    delay_s: float = 1.0
    max_delay_s: float = 300.0
    jitter: float = 0.25
    """Each delay is spread by this fraction either way."""


@dataclass(frozen=True, slots=True)
class AliveFor:
    """Passes once the process has run ``for_s`` seconds."""

    for_s: float


@dataclass(frozen=True, slots=True)
class HttpGet:
    """GET ``path`` on 127.0.0.1:``port``; 2xx/3xx passes."""

    port: int
    path: str = "/"
    interval_s: float = 2.0
    timeout_s: float = 1.0
    failures: int = 3


@dataclass(frozen=True, slots=True)
class RunCommand:
    """``argv`` in the workload's directory and environment; exit 0 passes."""

    argv: tuple[str, ...]
    interval_s: float = 5.0
    timeout_s: float = 2.0
    failures: int = 3


Check = AliveFor | HttpGet | RunCommand
Probed = HttpGet | RunCommand


@dataclass(frozen=True, slots=True)
class HealthSpec:
    """Healthy: every check passed continuously for ``min_healthy_s`` since the start."""

    checks: tuple[Check, ...] = ()
    min_healthy_s: float = 10.0
    deadline_s: float = 60.0
    """From the start: not healthy by then is a health failure (the rollout rolls back)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource ceilings, None: none (units in the names)."""

    memory_bytes: int | None = None
    cpu_seconds: int | None = None
    open_files: int | None = None
    cgroup_memory_bytes: int | None = None
    cgroup_cpu_millicores: int | None = None


@dataclass(frozen=True, slots=True)
class RestartOverride:
    """The desired entry's ``restart``: None keeps the manifest's value."""

    policy: RestartMode | None = None
    attempts: int | None = None
    interval_s: int | None = None
    delay_ms: int | None = None
    max_delay_ms: int | None = None
    jitter_pct: int | None = None


@dataclass(frozen=True, slots=True)
class EntryOptions:
    """The desired entry's part of a workload's specification."""

    env: tuple[tuple[str, str], ...] = ()
    config: bytes | None = None
    """The ``config`` value as JSON with sorted keys (compared to detect a change)."""
    depends_on: tuple[str, ...] = ()
    restart: RestartOverride = field(default_factory=RestartOverride)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class WorkloadRun:
    """Everything the runtime needs to start and watch one workload version."""

    name: str
    version: str
    argv: tuple[str, ...]
    """As the manifest wrote it: ``argv[0]`` relative to the version directory, or bare."""
    working_dir: str
    env: tuple[tuple[str, str], ...]
    config: bytes | None
    restart: RestartPolicy
    health: HealthSpec
    limits: Limits
    stop_signal: int = signal.SIGTERM
    stop_grace_s: float = 10.0
    reload_signal: int | None = None
    log_max_bytes: int = 1 << 20
    log_keep: int = 3
    update: UpdateStrategy = "stop-then-start"
    handover_timeout_s: float = 30.0

    def same_program(self, other: WorkloadRun) -> bool:
        """Whether only ``config`` differs (a reload signal may then do instead of a restart)."""
        return (
            self.version == other.version
            and self.argv == other.argv
            and (self.env == other.env and self.working_dir == other.working_dir)
        )


# ---------------------------------------------------------------- the desired entry


def _fail(index: int, message: str) -> WorkloadSpecError:
    return WorkloadSpecError(f"workloads[{index}].{message}")


def _int_in(index: int, where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(index, f"{where} must be a whole number within {low}..{high}, got {value!r}")
    return value


def parse_entry(index: int, entry: Mapping[str, object]) -> EntryOptions:
    """Pure: the device's part of ``workloads[index]``; raises WorkloadSpecError."""
    unknown = sorted(set(entry) - ENTRY_FIELDS)
    if unknown:
        known = ", ".join(sorted(ENTRY_FIELDS))
        raise _fail(index, f"{unknown[0]}: unknown field (known: {known})")
    return EntryOptions(
        env=_env(index, entry.get("env", {})),
        config=_config(index, entry.get("config")),
        depends_on=_depends(index, entry.get("depends_on", [])),
        restart=_restart(index, entry.get("restart", {})),
        limits=_limits(index, entry.get("limits", {})),
    )


def _env(index: int, env: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(env, dict):
        raise _fail(index, f"env must be an object of strings, got {type(env).__name__}")
    pairs = []
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise _fail(index, f"env: {name!r} is not a variable name")
        if name.startswith(RESERVED_ENV_PREFIX):
            raise _fail(index, f"env: {name} is reserved (DRIFTLESS_* is the runtime's)")
        if not isinstance(value, str) or len(value) > 4096 or "\x00" in value:
            raise _fail(index, f"env.{name} must be a string of at most 4096 characters")
        pairs.append((name, value))
    return tuple(sorted(pairs))


def _config(index: int, config: object) -> bytes | None:
    if config is None:
        return None
    encoded = msgspec.json.encode(config, order="sorted")
    if len(encoded) > MAX_CONFIG_BYTES:
        raise _fail(index, f"config is {len(encoded)} bytes; at most {MAX_CONFIG_BYTES}")
    return encoded


def _depends(index: int, depends: object) -> tuple[str, ...]:
    if not isinstance(depends, list):
        raise _fail(index, "depends_on must be a list of workload names")
    for name in depends:
        if not isinstance(name, str) or not WORKLOAD_NAME.fullmatch(name):
            raise _fail(index, f"depends_on: {name!r} is not a workload name")
    if len(set(depends)) != len(depends):
        raise _fail(index, "depends_on names a workload twice")
    return tuple(depends)


def _restart(index: int, restart: object) -> RestartOverride:
    if not isinstance(restart, dict):
        raise _fail(index, "restart must be an object")
    unknown = sorted(set(restart) - RESTART_FIELDS)
    if unknown:
        raise _fail(index, f"restart.{unknown[0]}: unknown field")
    policy = restart.get("policy")
    if policy is not None and policy not in ("always", "on-failure", "never"):
        raise _fail(index, f"restart.policy must be always, on-failure or never, got {policy!r}")
    bounds = {
        "attempts": (0, 1000),
        "interval_s": (1, 7 * 24 * 3600),
        "delay_ms": (1, 3600 * 1000),
        "max_delay_ms": (1, 3600 * 1000),
        "jitter_pct": (0, 100),
    }
    values = {
        name: _int_in(index, f"restart.{name}", restart[name], *bounds[name])
        for name in bounds
        if restart.get(name) is not None
    }
    return RestartOverride(policy=policy, **values)


def _limits(index: int, limits: object) -> Limits:
    if not isinstance(limits, dict):
        raise _fail(index, "limits must be an object")
    unknown = sorted(set(limits) - set(LIMIT_FIELDS))
    if unknown:
        raise _fail(index, f"limits.{unknown[0]}: unknown field")
    return Limits(
        **{
            name: _int_in(index, f"limits.{name}", limits[name], 1, 2**53 - 1)
            for name in LIMIT_FIELDS
            if limits.get(name) is not None
        }
    )


def check_dependencies(deps: Mapping[str, Sequence[str]]) -> None:
    """Pure: every ``depends_on`` names a workload of the list, and there is no cycle."""
    for name, wanted in deps.items():
        for dep in wanted:
            if dep not in deps:
                raise WorkloadSpecError(f"workload {name} depends_on {dep!r}, which is not listed")
            if dep == name:
                raise WorkloadSpecError(f"workload {name} depends_on itself")
    dependency_order(deps, deps)


def dependency_order(names: Iterable[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """Pure: ``names`` with every workload after what it depends on (stable otherwise).

    Dependencies outside ``names`` are already in place and impose nothing.
    Raises WorkloadSpecError naming a cycle.
    """
    wanted = list(names)
    chosen = set(wanted)
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: placed

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise WorkloadSpecError(f"depends_on makes a cycle: {cycle}")
        state[name] = 1
        for dep in deps.get(name, ()):
            if dep in chosen:
                visit(dep, (*path, name))
        state[name] = 2
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


# ---------------------------------------------------------------- the merge


def _signal(name: str) -> int:
    return int(signal.Signals[name])


def _checks(run: RunSpec) -> tuple[Check, ...]:
    checks: list[Check] = []
    if run.health is not None:  # the first spelling of a command check
        old = run.health
        checks.append(
            RunCommand(
                tuple(old.command),
                interval_s=float(old.interval_s),
                timeout_s=float(old.timeout_s),
                failures=max(1, old.retries),
            )
        )
    for check in run.checks:
        if isinstance(check, AliveCheck):
            checks.append(AliveFor(check.for_ms / 1000))
        elif isinstance(check, HttpCheck):
            checks.append(
                HttpGet(
                    check.port,
                    check.path,
                    interval_s=check.interval_ms / 1000,
                    timeout_s=check.timeout_ms / 1000,
                    failures=check.failures,
                )
            )
        else:
            checks.append(
                RunCommand(
                    tuple(check.command),
                    interval_s=check.interval_ms / 1000,
                    timeout_s=check.timeout_ms / 1000,
                    failures=check.failures,
                )
            )
    return tuple(checks)


def _merged_limits(name: str, ceiling: Limits, wanted: Limits) -> Limits:
    values: dict[str, int | None] = {}
    for field_name in LIMIT_FIELDS:
        top: int | None = getattr(ceiling, field_name)
        asked: int | None = getattr(wanted, field_name)
        if asked is not None and top is not None and asked > top:
            raise WorkloadSpecError(
                f"workload {name}: limits.{field_name} {asked} is above the manifest's "
                f"ceiling {top}; the desired entry may lower a limit, not raise it"
            )
        values[field_name] = asked if asked is not None else top
    return Limits(**values)


def merge(name: str, version: str, run: RunSpec, options: EntryOptions) -> WorkloadRun:
    """Pure: the workload as it runs, from its verified manifest's ``run`` and its entry.

    Raises WorkloadSpecError (a limit raised above the manifest's ceiling).
    """
    over = options.restart
    backoff = run.backoff
    delay_ms = over.delay_ms if over.delay_ms is not None else backoff.delay_ms
    max_delay_ms = over.max_delay_ms if over.max_delay_ms is not None else backoff.max_delay_ms
    if max_delay_ms < delay_ms:
        raise WorkloadSpecError(f"workload {name}: restart max_delay_ms is below delay_ms")
    policy = RestartPolicy(
        mode=over.policy or run.restart,
        attempts=over.attempts if over.attempts is not None else backoff.attempts,
        interval_s=float(over.interval_s if over.interval_s is not None else backoff.interval_s),
        delay_s=delay_ms / 1000,
        max_delay_s=max_delay_ms / 1000,
        jitter=(over.jitter_pct if over.jitter_pct is not None else backoff.jitter_pct) / 100,
    )
    m = run.limits
    ceiling = Limits(
        m.memory_bytes, m.cpu_seconds, m.open_files, m.cgroup_memory_bytes, m.cgroup_cpu_millicores
    )
    env = dict(sorted(run.env.items()))
    env.update(options.env)
    return WorkloadRun(
        name=name,
        version=version,
        argv=tuple(run.command),
        working_dir=run.working_dir,
        env=tuple(sorted(env.items())),
        config=options.config,
        restart=policy,
        health=HealthSpec(
            checks=_checks(run),
            min_healthy_s=run.min_healthy_ms / 1000,
            deadline_s=_deadline(run),
        ),
        limits=_merged_limits(name, ceiling, options.limits),
        stop_signal=_signal(run.stop_signal),
        stop_grace_s=float(run.stop_timeout_s),
        reload_signal=_signal(run.reload_signal) if run.reload_signal else None,
        log_max_bytes=run.logs.max_bytes,
        log_keep=run.logs.keep,
        update=run.update,
        handover_timeout_s=float(run.handover_timeout_s),
    )


def _deadline(run: RunSpec) -> float:
    """Pure: how long a new instance has to turn healthy.

    In a ``start-then-stop`` hand-over the old and the new version run together until the
    new one is healthy, so ``handover_timeout_s`` bounds that too (0: no bound of its own).
    """
    deadline = float(run.health_deadline_s)
    if run.update == "start-then-stop" and run.handover_timeout_s > 0:
        return min(deadline, float(run.handover_timeout_s))
    return deadline
