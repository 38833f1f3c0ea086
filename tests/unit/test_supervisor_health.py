"""Health verdicts as tables (pure): checks passing continuously for min_healthy_s."""

from __future__ import annotations

import pytest

from edge_agent.supervisor.health import CheckState, failing, observe, verdict
from edge_agent.supervisor.spec import AliveFor, HealthSpec, HttpGet, RunCommand

HTTP = HttpGet(8080, "/health", interval_s=1, failures=2)
CMD = RunCommand(("true",), interval_s=1, failures=1)
PASS_AT_3 = CheckState(passing_since=3.0)
NEVER = CheckState()


@pytest.mark.parametrize(
    ("checks", "states", "now", "healthy", "at"),
    [
        pytest.param((), (), 4.9, False, 5.0, id="no-checks-running-for-min-time"),
        pytest.param((), (), 5.0, True, 5.0, id="no-checks-healthy-at-min-time"),
        pytest.param((HTTP,), (NEVER,), 100.0, False, None, id="never-passed"),
        pytest.param((HTTP,), (PASS_AT_3,), 7.9, False, 8.0, id="passing-not-long-enough"),
        pytest.param((HTTP,), (PASS_AT_3,), 8.0, True, 8.0, id="passing-long-enough"),
        pytest.param((HTTP, CMD), (PASS_AT_3, NEVER), 50.0, False, None, id="every-check-counts"),
        pytest.param(
            (HTTP, CMD),
            (PASS_AT_3, CheckState(passing_since=6.0)),
            10.0,
            False,
            11.0,
            id="latest-check-decides",
        ),
        pytest.param((AliveFor(8),), (NEVER,), 12.9, False, 13.0, id="alive-for-plus-min"),
        pytest.param((AliveFor(8),), (NEVER,), 13.0, True, 13.0, id="alive-for-passes"),
    ],
)
def test_verdicts(
    checks: tuple[object, ...],
    states: tuple[CheckState, ...],
    now: float,
    healthy: bool,
    at: float | None,
) -> None:
    spec = HealthSpec(checks=checks, min_healthy_s=5.0)  # type: ignore[arg-type]
    seen = verdict(spec, states, started_at=0.0, now=now)
    assert (seen.healthy, seen.at) == (healthy, at), seen.reason


def test_one_failure_breaks_the_run_and_passing_starts_a_new_one() -> None:
    state = observe(NEVER, True, "200", 1.0)
    state = observe(state, True, "200", 2.0)
    assert state.passing_since == 1.0
    state = observe(state, False, "status 503", 3.0)
    assert state == CheckState(passing_since=None, failures=1, detail="status 503")
    state = observe(state, True, "200", 4.0)
    assert (state.passing_since, state.failures) == (4.0, 0)


def test_a_healthy_workload_is_unhealthy_only_after_its_failure_threshold() -> None:
    spec = HealthSpec(checks=(HTTP,), min_healthy_s=1)
    once = observe(PASS_AT_3, False, "refused", 9.0)
    assert failing(spec, [once]) is None
    twice = observe(once, False, "refused", 10.0)
    assert failing(spec, [twice]) == "http GET :8080/health failed 2 times: refused"
