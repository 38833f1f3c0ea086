"""The restart policy as tables, over simulated hours (pure: time is an input)."""

from __future__ import annotations

import pytest

from edge_agent.supervisor.restart import GiveUp, next_restart
from edge_agent.supervisor.spec import RestartPolicy

POLICY = RestartPolicy(
    mode="on-failure", attempts=3, interval_s=1800, delay_s=2, max_delay_s=60, jitter=0.25
)


@pytest.mark.parametrize(
    ("mode", "code", "restarts"),
    [
        pytest.param("never", 1, False, id="never-after-failure"),
        pytest.param("never", 0, False, id="never-after-success"),
        pytest.param("on-failure", 0, False, id="on-failure-clean-exit-finishes"),
        pytest.param("on-failure", 2, True, id="on-failure-code"),
        pytest.param("on-failure", -9, True, id="on-failure-signal"),
        pytest.param("on-failure", None, True, id="on-failure-unknown-code-adopted"),
        pytest.param("always", 0, True, id="always-clean-exit"),
    ],
)
def test_modes(mode: str, code: int | None, restarts: bool) -> None:
    policy = RestartPolicy(mode=mode, attempts=3)  # type: ignore[arg-type]
    decision = next_restart(policy, [100.0], 100.0, 0.5, exit_code=code)
    assert isinstance(decision, float) is restarts, decision
    if not restarts:
        assert isinstance(decision, GiveUp) and decision.failed is (code != 0)


def simulate(policy: RestartPolicy, crash_every_s: float, hours: float) -> tuple[int, float | None]:
    """A workload that crashes ``crash_every_s`` after each start: restarts, and when it failed."""
    now, exits, restarts = 0.0, [], 0
    while now < hours * 3600:
        now += crash_every_s
        exits = [*exits, now]
        decision = next_restart(policy, exits, now, 0.5, exit_code=1, floor_s=1.0)
        if isinstance(decision, GiveUp):
            return restarts, now
        restarts += 1
        now += decision
    return restarts, None


@pytest.mark.parametrize(
    ("crash_every_s", "gives_up"),
    [
        pytest.param(0.1, True, id="crash-loop-fails-within-seconds"),
        pytest.param(300, True, id="every-5-min-exceeds-3-in-30-min"),
        pytest.param(700, False, id="every-11-min-stays-within-policy-for-hours"),
        pytest.param(3600, False, id="hourly-crash-always-restarted"),
    ],
)
def test_crash_rates_over_simulated_hours(crash_every_s: float, gives_up: bool) -> None:
    restarts, failed_at = simulate(POLICY, crash_every_s, hours=6)
    assert (failed_at is not None) is gives_up
    if gives_up:
        assert restarts == POLICY.attempts  # exactly the attempts, then failed
    else:
        assert restarts > 6 * 3600 / (crash_every_s + 60) - 1


def test_crash_loop_backs_off_exponentially_to_the_cap_and_never_below_the_floor() -> None:
    policy = RestartPolicy(attempts=100, interval_s=10_000, delay_s=0.1, max_delay_s=5, jitter=0)
    exits: list[float] = []
    delays = []
    for n in range(10):
        exits.append(float(n))
        delay = next_restart(policy, exits, float(n), 0.5, exit_code=1, floor_s=1.0)
        assert isinstance(delay, float)
        delays.append(delay)
    assert delays == [1.0, 1.0, 1.0, 1.0, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]


@pytest.mark.parametrize(
    ("draw", "delay"),
    [
        pytest.param(0.0, 7.5, id="low"),
        pytest.param(0.5, 10.0, id="mid"),
        pytest.param(0.999999, 12.5, id="high"),
    ],
)
def test_jitter_spreads_a_quarter_either_way(draw: float, delay: float) -> None:
    policy = RestartPolicy(attempts=5, delay_s=10, max_delay_s=100, jitter=0.25)
    assert next_restart(policy, [0.0], 0.0, draw, exit_code=1) == pytest.approx(delay, abs=1e-4)


def test_old_exits_leave_the_window() -> None:
    policy = RestartPolicy(attempts=1, interval_s=60, delay_s=1)
    assert isinstance(next_restart(policy, [0.0, 30.0], 30.0, 0.5, exit_code=1), GiveUp)
    assert isinstance(next_restart(policy, [0.0, 61.0], 61.0, 0.5, exit_code=1), float)
