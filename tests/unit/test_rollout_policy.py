"""A spec's rollout policy: every field with its default, every refusal naming its field,
and the canonical JSON form that parses back to the same policy."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hub.controllers.rollout.policy import (
    FailureThreshold,
    Policy,
    PolicyError,
    Quorum,
    Rate,
    Size,
    Soak,
    parse_policy,
)


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_defaults() -> None:
    policy = parse_policy(None)
    assert policy == parse_policy({}) == Policy()
    assert policy.strategy == "all-at-once"
    assert policy.canary is None and policy.waves == ()
    assert policy.pause_s is None and policy.max_in_flight is None and policy.rate is None
    assert policy.soak == Soak(0.0, 0) and policy.soak.none
    assert policy.failure_threshold == FailureThreshold(None, 20.0, 1, "abort")
    assert policy.quorum is None
    assert (policy.apply_deadline_s, policy.progress_deadline_s) == (600.0, 1800.0)
    assert policy.on_progress_deadline == "pause"
    assert policy.prestage is False
    assert (policy.activate_at, policy.start_at, policy.window) == (None, None, None)


def test_the_contract_example() -> None:
    policy = parse_policy(
        {
            "strategy": "canary",
            "canary": {"count": 5},
            "pause_s": 60,
            "max_in_flight": 50,
            "rate": {"per_minute": 100, "growth_factor": 2.0, "growth_after": 50},
            "soak": {"seconds": 30, "reports": 2},
            "failure_threshold": {"percent": 20, "min_reported": 1, "action": "abort"},
            "quorum": {"percent": 80, "within_s": 600},
            "apply_deadline_s": 600,
            "progress_deadline_s": 1800,
            "on_progress_deadline": "pause",
            "prestage": True,
            "activate_at": "2026-12-07T02:00:00Z",
            "start_at": "2026-12-07T01:00:00+00:00",
            "window": "nightly",
        }
    )
    assert policy == Policy(
        strategy="canary",
        canary=Size(count=5),
        pause_s=60.0,
        max_in_flight=50,
        rate=Rate(100.0, 2.0, 50),
        soak=Soak(30.0, 2),
        failure_threshold=FailureThreshold(None, 20.0, 1, "abort"),
        quorum=Quorum(80.0, 600.0),
        prestage=True,
        activate_at=at("2026-12-07T02:00:00"),
        start_at=at("2026-12-07T01:00:00"),
        window="nightly",
    )
    assert parse_policy(policy.as_json()) == policy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"strategy": "canary"}, {"canary": Size(count=1)}),
        ({"strategy": "canary", "canary": {"percent": 5}}, {"canary": Size(percent=5.0)}),
        (
            {"strategy": "waves", "waves": [10, "25%", "100%", " 12.5% "]},
            {"waves": (Size(count=10), Size(percent=25.0), Size(percent=100.0),
                       Size(percent=12.5))},
        ),
        ({"rate": {"per_minute": 0.5}}, {"rate": Rate(0.5, 1.0, 0)}),
        ({"failure_threshold": {"count": 3}}, {"failure_threshold": FailureThreshold(3, None)}),
        (
            {"failure_threshold": {"action": "pause", "min_reported": 0}},
            {"failure_threshold": FailureThreshold(None, 20.0, 0, "pause")},
        ),
        ({"soak": {"reports": 2}}, {"soak": Soak(0.0, 2)}),
        ({"pause_s": 0}, {"pause_s": 0.0}),
        ({"start_at": "2026-12-07T03:00:00+02:00"}, {"start_at": at("2026-12-07T01:00:00")}),
        ({"window": None, "rate": None}, {}),  # null is absent
        ({"window": "a"}, {"window": "a"}),
        ({"on_progress_deadline": "abort"}, {"on_progress_deadline": "abort"}),
    ],
)  # fmt: skip
def test_fields(raw: dict[str, Any], expected: dict[str, Any]) -> None:
    policy = parse_policy(raw)
    for name, value in expected.items():
        assert getattr(policy, name) == value, name
    assert parse_policy(policy.as_json()) == policy


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("canary", "rollout: must be an object, not 'canary'"),
        ({"strategy": "blue-green"}, "rollout.strategy: must be one of all-at-once, canary, waves"),
        ({"stratgey": "canary"}, "rollout: unknown key(s) stratgey"),
        ({"strategy": "canary", "canary": {"count": 0}}, "rollout.canary.count: must be >= 1"),
        ({"strategy": "canary", "canary": {"count": 1.5}}, "rollout.canary.count: must be a whole"),
        ({"strategy": "canary", "canary": {"percent": 0}}, "rollout.canary.percent: must be > 0"),
        ({"strategy": "canary", "canary": {"percent": 101}},
         "rollout.canary.percent: must be <= 100"),
        ({"strategy": "canary", "canary": {}}, "rollout.canary: needs exactly one of"),
        ({"strategy": "canary", "canary": {"count": 1, "percent": 5}},
         "rollout.canary: needs exactly one of"),
        ({"strategy": "canary", "canary": {"size": 1}}, "rollout.canary: unknown key(s) size"),
        ({"canary": {"count": 1}}, "rollout.canary: only with strategy canary"),
        ({"waves": [1]}, "rollout.waves: only with strategy waves"),
        ({"strategy": "waves"}, "rollout.waves: strategy waves needs a list"),
        ({"strategy": "waves", "waves": []}, "rollout.waves: strategy waves needs a list"),
        ({"strategy": "waves", "waves": [0]}, "rollout.waves[0]: a count must be >= 1"),
        ({"strategy": "waves", "waves": [5, -1]}, "rollout.waves[1]: a count must be >= 1"),
        ({"strategy": "waves", "waves": ["0%"]}, "rollout.waves[0]: '0%' must be a percent > 0"),
        ({"strategy": "waves", "waves": ["150%"]}, "rollout.waves[0]: '150%' must be a percent"),
        ({"strategy": "waves", "waves": ["x%"]}, "rollout.waves[0]: 'x%' must be a percent"),
        ({"strategy": "waves", "waves": ["25"]}, "rollout.waves[0]: '25' is not a count or"),
        ({"strategy": "waves", "waves": [True]}, "rollout.waves[0]: True is not a count"),
        ({"pause_s": -1}, "rollout.pause_s: must be >= 0"),
        ({"pause_s": "60"}, "rollout.pause_s: must be a number, not '60'"),
        ({"pause_s": True}, "rollout.pause_s: must be a number, not True"),
        ({"max_in_flight": 0}, "rollout.max_in_flight: must be >= 1, not 0"),
        ({"max_in_flight": -5}, "rollout.max_in_flight: must be >= 1, not -5"),
        ({"rate": {}}, "rollout.rate.per_minute: needed"),
        ({"rate": {"per_minute": 0}}, "rollout.rate.per_minute: must be > 0"),
        ({"rate": {"per_minute": 10, "growth_factor": 0.5}},
         "rollout.rate.growth_factor: must be >= 1"),
        ({"rate": {"per_minute": 10, "growth_factor": 2}}, "rollout.rate.growth_after: needed"),
        ({"rate": {"per_minute": 10, "growth_after": -1}},
         "rollout.rate.growth_after: must be >= 0"),
        ({"rate": {"per_minute": 10, "burst": 3}}, "rollout.rate: unknown key(s) burst"),
        ({"rate": 100}, "rollout.rate: must be an object, not 100"),
        ({"soak": {"seconds": -1}}, "rollout.soak.seconds: must be >= 0"),
        ({"soak": {"reports": -2}}, "rollout.soak.reports: must be >= 0"),
        ({"failure_threshold": {"count": 3, "percent": 5}},
         "rollout.failure_threshold: count or percent, not both"),
        ({"failure_threshold": {"count": 0}}, "rollout.failure_threshold.count: must be >= 1"),
        ({"failure_threshold": {"percent": 0}}, "rollout.failure_threshold.percent: must be > 0"),
        ({"failure_threshold": {"min_reported": -1}},
         "rollout.failure_threshold.min_reported: must be >= 0"),
        ({"failure_threshold": {"action": "rollback"}},
         "rollout.failure_threshold.action: must be one of abort, pause"),
        ({"quorum": {"percent": 80}}, "rollout.quorum.within_s: needed"),
        ({"quorum": {"within_s": 60}}, "rollout.quorum.percent: needed"),
        ({"quorum": {"percent": 120, "within_s": 60}}, "rollout.quorum.percent: must be <= 100"),
        ({"quorum": {"percent": 80, "within_s": 0}}, "rollout.quorum.within_s: must be > 0"),
        ({"apply_deadline_s": 0}, "rollout.apply_deadline_s: must be > 0"),
        ({"progress_deadline_s": -3}, "rollout.progress_deadline_s: must be > 0"),
        ({"apply_deadline_s": float("inf")}, "rollout.apply_deadline_s: must be > 0"),
        ({"on_progress_deadline": "wait"}, "rollout.on_progress_deadline: must be one of abort"),
        ({"prestage": "yes"}, "rollout.prestage: must be true or false, not 'yes'"),
        ({"activate_at": "2026-12-07T02:00:00Z"}, "rollout.activate_at: needs prestage: true"),
        ({"prestage": True, "activate_at": "tomorrow"},
         "rollout.activate_at: 'tomorrow' is not an ISO 8601 time"),
        ({"start_at": "2026-12-07T02:00:00"},
         "rollout.start_at: '2026-12-07T02:00:00' needs a time"),
        ({"start_at": 1800000000}, "rollout.start_at: must be an ISO 8601 time, not 1800000000"),
        ({"window": "Nightly"}, "rollout.window: 'Nightly' must match ^[a-z0-9][a-z0-9-]{0,62}$"),
        ({"window": "-x"}, "rollout.window: '-x' must match"),
        ({"window": "a" * 64}, "rollout.window: 'aaaa"),
        ({"window": "nightly\n"}, "rollout.window: 'nightly\\n' must match"),
        ({"window": 3}, "rollout.window: 3 must match"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(raw: Any, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(raw)
    assert str(caught.value).startswith(message), str(caught.value)


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


def test_as_json_is_canonical() -> None:
    assert parse_policy(None).as_json() == {
        "strategy": "all-at-once",
        "soak": {"seconds": 0.0, "reports": 0},
        "failure_threshold": {"percent": 20.0, "min_reported": 1, "action": "abort"},
        "apply_deadline_s": 600.0,
        "progress_deadline_s": 1800.0,
        "on_progress_deadline": "pause",
        "prestage": False,
    }
    policy = parse_policy(
        {
            "strategy": "waves",
            "waves": [10, "25%", "12.5%"],
            "failure_threshold": {"count": 3},
            "prestage": True,
            "activate_at": "2026-12-07T04:00:00+02:00",
            "max_in_flight": 7,
            "rate": {"per_minute": 6, "growth_factor": 1.5, "growth_after": 4},
        }
    )
    out = policy.as_json()
    assert out["waves"] == [10, "25%", "12.5%"]
    assert out["failure_threshold"] == {"count": 3, "min_reported": 1, "action": "abort"}
    assert out["activate_at"] == "2026-12-07T02:00:00Z"
    assert out["max_in_flight"] == 7
    assert out["rate"] == {"per_minute": 6.0, "growth_factor": 1.5, "growth_after": 4}
    assert parse_policy(out) == policy
    assert parse_policy({"strategy": "canary"}).as_json()["canary"] == {"count": 1}


@pytest.mark.parametrize(
    ("size", "total", "expected"),
    [
        (Size(count=5), 20, 5), (Size(count=5), 3, 3), (Size(percent=5.0), 20, 1),
        (Size(percent=5.0), 10, 1), (Size(percent=25.0), 10, 3), (Size(percent=10.0), 30, 3),
        (Size(percent=100.0), 7, 7), (Size(percent=1.0), 1, 1), (Size(count=3), 0, 0),
    ],
)  # fmt: skip
def test_sizes_round_up_to_at_least_one(size: Size, total: int, expected: int) -> None:
    assert size.of(total) == expected


@pytest.mark.parametrize(
    ("rate", "succeeded", "expected"),
    [
        (Rate(10.0), 1000, 10.0), (Rate(10.0, 2.0, 5), 4, 10.0), (Rate(10.0, 2.0, 5), 5, 20.0),
        (Rate(10.0, 2.0, 5), 17, 80.0), (Rate(10.0, 10.0, 1), 10_000, 1e9),
    ],
)  # fmt: skip
def test_rate_growth(rate: Rate, succeeded: int, expected: float) -> None:
    assert rate.now(succeeded) == expected


@pytest.mark.parametrize(
    ("threshold", "failed", "reported", "crossed"),
    [
        (FailureThreshold(), 0, 0, False), (FailureThreshold(), 1, 1, True),
        (FailureThreshold(), 1, 5, True), (FailureThreshold(), 1, 6, False),
        (FailureThreshold(min_reported=10), 5, 9, False),
        (FailureThreshold(min_reported=10), 2, 10, True),
        (FailureThreshold(count=3, percent=None), 2, 2, False),
        (FailureThreshold(count=3, percent=None), 3, 100, True),
        (FailureThreshold(min_reported=0), 0, 0, False),
    ],
)  # fmt: skip
def test_threshold(threshold: FailureThreshold, failed: int, reported: int, crossed: bool) -> None:
    assert threshold.crossed(failed, reported) is crossed
