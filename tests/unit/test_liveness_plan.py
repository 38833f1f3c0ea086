"""The liveness planner as tables: who is gone, and when to look again (pure)."""

from __future__ import annotations

import pytest

from hub.controllers.liveness.plan import Seen, deadline, plan

SINCE = 1000.0  # when the hub's link connected


@pytest.mark.parametrize(
    ("seen", "now", "offline", "wake"),
    [
        pytest.param([Seen("a", 1100.0, 10.0)], 1129.0, (), 1.0, id="just-before-3x10s"),
        pytest.param([Seen("a", 1100.0, 10.0)], 1130.0, ("a",), None, id="at-3x10s"),
        pytest.param([Seen("a", 1100.0, None)], 1189.0, (), 1.0, id="hub-default-30s"),
        pytest.param([Seen("a", 1100.0, None)], 1190.0, ("a",), None, id="past-hub-default"),
        pytest.param(
            [Seen("a", 900.0, 10.0)], 1020.0, (), 10.0, id="silence-counts-from-listening"
        ),
        pytest.param([Seen("a", None, 10.0)], 1030.0, ("a",), None, id="never-seen"),
        pytest.param(
            [Seen("a", 1100.0, 10.0), Seen("b", 1110.0, 10.0), Seen("c", 1120.0, 60.0)],
            1135.0,
            ("a",),
            5.0,  # b is due at 1140
            id="one-gone-next-due",
        ),
        pytest.param([], 1200.0, (), None, id="nobody-online"),
        pytest.param([Seen("a", 1199.5, 10.0)], 1229.2, (), 1.0, id="wake-not-below-min"),
    ],
)
def test_plan(seen: list[Seen], now: float, offline: tuple[str, ...], wake: float | None) -> None:
    decided = plan(seen, now=now, listening_since=SINCE, default_heartbeat_s=30.0, missed=3)
    assert decided.offline == offline
    assert decided.wake_after_s == (pytest.approx(wake) if wake is not None else None)
    assert set(decided.reasons) == set(offline)


def test_the_reason_names_the_silence_and_the_intervals() -> None:
    decided = plan(
        [Seen("a", 1100.0, 10.0)],
        now=1140.0,
        listening_since=SINCE,
        default_heartbeat_s=30.0,
        missed=3,
    )
    assert decided.reasons["a"] == "no message for 40.0 s: 3 heartbeats of 10 s missed"


def test_deadline_is_last_seen_plus_missed_intervals() -> None:
    assert (
        deadline(Seen("a", 1100.0, 10.0), listening_since=SINCE, default_heartbeat_s=30.0, missed=2)
        == 1120.0
    )


@pytest.mark.parametrize(("missed", "default"), [(0, 30.0), (3, 0.0), (3, -1.0)])
def test_bad_settings_are_refused(missed: int, default: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        plan([], now=0.0, listening_since=0.0, default_heartbeat_s=default, missed=missed)
