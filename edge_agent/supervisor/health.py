"""Health verdicts: is a workload healthy, and since when.

Pure: no I/O, no clock. Rules (``docs/runtime.md``, "Healthy"):

- Healthy means the process runs and every declared check has passed
  continuously for ``min_healthy_s`` since it started: a check's
  ``passing_since`` is the first of an unbroken run of passing probes
  (an ``alive`` check passes from ``started_at + for_s``), and the workload
  is healthy from ``max(started_at, every passing_since) + min_healthy_s``.
  With no checks, running for ``min_healthy_s`` is healthy.
- One failed probe breaks the run (``passing_since`` is forgotten); a
  healthy workload turns unhealthy only after ``failures`` consecutive
  failures of one check, and healthy again by the rule above.
- Only what the supervisor observed counts: a probe's answer or the
  process's own age. Nothing the workload writes (files, pid files, logs)
  is taken as health.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from edge_agent.supervisor.spec import AliveFor, Check, HealthSpec, HttpGet, RunCommand


@dataclass(frozen=True, slots=True)
class CheckState:
    """What one check's probes have shown so far."""

    passing_since: float | None = None
    failures: int = 0
    """Consecutive failed probes."""
    detail: str = "not probed yet"


@dataclass(frozen=True, slots=True)
class Verdict:
    healthy: bool
    at: float | None
    """When it is (or will be, if every check keeps passing) healthy; None: not in sight."""
    reason: str


def observe(state: CheckState, ok: bool, detail: str, now: float) -> CheckState:
    """Pure: ``state`` after one probe answered ``ok`` at ``now``."""
    if ok:
        since = state.passing_since if state.passing_since is not None else now
        return CheckState(passing_since=since, failures=0, detail=detail)
    return replace(state, passing_since=None, failures=state.failures + 1, detail=detail)


def describe(check: Check) -> str:
    """Pure: a short name for a check, for reasons."""
    match check:
        case AliveFor(for_s=for_s):
            return f"alive for {for_s:g} s"
        case HttpGet(port=port, path=path):
            return f"http GET :{port}{path}"
        case RunCommand(argv=argv):
            return f"command {' '.join(argv)[:60]}"
    raise TypeError(check)


def verdict(
    spec: HealthSpec, states: Sequence[CheckState], *, started_at: float, now: float
) -> Verdict:
    """Pure: the health of a workload running since ``started_at`` (``states`` by check)."""
    since = started_at
    for check, state in zip(spec.checks, states, strict=True):
        if isinstance(check, AliveFor):
            passing: float | None = started_at + check.for_s
        else:
            passing = state.passing_since
        if passing is None:
            return Verdict(False, None, f"{describe(check)} not passing: {state.detail}")
        since = max(since, passing)
    at = since + spec.min_healthy_s
    if now >= at:
        return Verdict(True, at, "healthy")
    return Verdict(False, at, f"checks passing; healthy at {at - started_at:.1f} s after start")


def failing(spec: HealthSpec, states: Sequence[CheckState]) -> str | None:
    """Pure: why a healthy workload is now unhealthy (a check failed ``failures`` times)."""
    for check, state in zip(spec.checks, states, strict=True):
        if isinstance(check, HttpGet | RunCommand) and state.failures >= check.failures:
            return f"{describe(check)} failed {state.failures} times: {state.detail}"
    return None
