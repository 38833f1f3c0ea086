"""Resource limits for a workload: rlimits through prlimit(1), cgroup v2 where the agent may write.

Rules:
- rlimits are set by wrapping the command in ``prlimit --as=N --cpu=N --nofile=N:N --``:
  prlimit sets its own limits and execs the workload, so the pid (and its start
  time) stays the workload's. Never ``preexec_fn``: the agent is multi-threaded
  (paho's network thread, the step worker), and a fork that runs Python code in
  the child can deadlock on a lock another thread held.
- Soft and hard limits are the same number: a workload cannot raise its own.
- cgroup v2 is used only where it is available and writable
  (:func:`cgroup_support` says so, or says why not); otherwise asking for a cgroup
  limit is a no-op whose reason the runtime reports. The agent creates
  ``<root>/driftless.<tag>/<instance>``, enables ``memory`` and ``cpu`` on the way
  down (``cgroup.subtree_control``), writes ``memory.max`` and ``cpu.max`` and
  moves the pid into ``cgroup.procs``. ``root`` must be a cgroup delegated to the
  agent (for example a systemd unit with ``Delegate=yes``), since v2 allows no
  processes in a cgroup whose controllers are enabled for its children.
- The move happens right after the spawn: the workload runs outside its group for
  the microseconds before the move, while it is still exec-ing prlimit.
- Bad limits (zero, negative) raise ValueError when the :class:`Limits` is made.
- Standard library only, cheap to import (the agent loads it on every start).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
"""The cpu.max period: a quota of 50,000 in it is half a core."""
NEEDED_CONTROLLERS = ("memory", "cpu")


@dataclass(frozen=True)
class Limits:
    """What one workload may use; ``None`` is unlimited (the agent's own limit is inherited)."""

    memory_bytes: int | None = None
    """RLIMIT_AS: address space, so an allocation past it fails (MemoryError in Python)."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU: CPU time, after which the kernel sends SIGXCPU, then SIGKILL."""
    open_files: int | None = None
    """RLIMIT_NOFILE."""
    cgroup_memory_max: int | None = None
    """cgroup v2 ``memory.max`` in bytes (the OOM killer acts past it), where writable."""
    cgroup_cpu_max: float | None = None
    """cgroup v2 ``cpu.max`` in cores: 0.5 is ``50000 100000``, where writable."""

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "cpu_seconds", "open_files", "cgroup_memory_max"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise ValueError(f"limits.{name} must be a positive integer, got {value!r}")
        cores = self.cgroup_cpu_max
        if cores is not None and (isinstance(cores, bool) or not cores > 0 or cores > 4096):
            raise ValueError(f"limits.cgroup_cpu_max must be cores in (0, 4096], got {cores!r}")

    @property
    def wants_cgroup(self) -> bool:
        """Whether any cgroup v2 limit is asked for."""
        return self.cgroup_memory_max is not None or self.cgroup_cpu_max is not None


def wrap_argv(
    argv: Sequence[str], limits: Limits, *, prlimit: str = "/usr/bin/prlimit"
) -> list[str]:
    """Pure: ``argv`` prefixed with prlimit and the rlimits asked for, or unchanged if none."""
    options: list[str] = []
    if limits.memory_bytes is not None:
        options.append(f"--as={limits.memory_bytes}")
    if limits.cpu_seconds is not None:
        options.append(f"--cpu={limits.cpu_seconds}")
    if limits.open_files is not None:
        options.append(f"--nofile={limits.open_files}:{limits.open_files}")
    if not options:
        return list(argv)
    return [prlimit, *options, "--", *argv]


@dataclass(frozen=True)
class CgroupSupport:
    """Whether the agent can set cgroup v2 limits under ``root``, or why not."""

    available: bool
    root: Path | None
    reason: str
    """Why not (empty when available): what an operator reads in the device's report."""


def cgroup_support(root: Path = CGROUP_ROOT) -> CgroupSupport:
    """Look at ``root`` (a cgroup v2 directory delegated to the agent); never raises."""
    controllers_file = root / "cgroup.controllers"
    try:
        controllers = controllers_file.read_text().split()
    except FileNotFoundError:
        v1 = [name for name in NEEDED_CONTROLLERS if (root / name).is_dir()]
        layout = f"cgroup v1 controllers mounted there: {', '.join(v1)}" if v1 else "nothing"
        return CgroupSupport(False, None, f"no cgroup v2 hierarchy at {root} ({layout})")
    except OSError as exc:
        return CgroupSupport(False, None, f"cannot read {controllers_file}: {exc.strerror}")
    missing = [name for name in NEEDED_CONTROLLERS if name not in controllers]
    if missing:
        return CgroupSupport(
            False,
            None,
            f"cgroup v2 at {root} lacks the {' and '.join(missing)} controller"
            f"{'s' if len(missing) > 1 else ''} (bound to cgroup v1, or not delegated)",
        )
    subtree = root / "cgroup.subtree_control"
    if not (os.access(root, os.W_OK) and os.access(subtree, os.W_OK)):
        return CgroupSupport(False, None, f"cgroup v2 at {root} is not writable by the agent")
    return CgroupSupport(True, root, "")


class CgroupError(OSError):
    """A cgroup that was available could not be set up (a write was refused)."""


def cgroup_path(support: CgroupSupport, tag: str, instance: str) -> Path | None:
    """Pure: where one instance's cgroup lives, or None without cgroup support."""
    if not support.available or support.root is None:
        return None
    return support.root / f"driftless.{tag}" / instance


def place_in_cgroup(
    support: CgroupSupport, tag: str, instance: str, pid: int, limits: Limits
) -> Path:
    """Create the instance's cgroup, write its limits, move ``pid`` in; raises CgroupError.

    Only call when ``support.available`` and ``limits.wants_cgroup``.
    """
    group = cgroup_path(support, tag, instance)
    if group is None:
        raise CgroupError(f"cgroup v2 not available: {support.reason}")
    try:
        _enable_controllers(group.parent.parent)
        group.parent.mkdir(exist_ok=True)
        _enable_controllers(group.parent)
        group.mkdir(exist_ok=True)
        if limits.cgroup_memory_max is not None:
            (group / "memory.max").write_text(f"{limits.cgroup_memory_max}\n")
        if limits.cgroup_cpu_max is not None:
            quota = max(1000, round(limits.cgroup_cpu_max * CPU_PERIOD_US))
            (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}\n")
        (group / "cgroup.procs").write_text(f"{pid}\n")
    except OSError as exc:
        raise CgroupError(f"cannot set up cgroup {group}: {exc.strerror or exc}") from exc
    return group


def remove_cgroup(group: Path) -> None:
    """Remove an instance's (now empty) cgroup; best effort, never raises.

    On cgroupfs ``rmdir`` removes the interface files with the directory; anything
    else (a cgroup that still holds a process) is left in place.
    """
    with contextlib.suppress(OSError):
        group.rmdir()


def _enable_controllers(level: Path) -> None:
    control = level / "cgroup.subtree_control"
    enabled = [name.lstrip("+") for name in control.read_text().split()] if control.exists() else []
    wanted = [name for name in NEEDED_CONTROLLERS if name not in enabled]
    if wanted:
        control.write_text(" ".join(f"+{name}" for name in wanted) + "\n")
