"""Maintenance windows (hub.schedules.window): validation, open/closed, DST, zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hub.controllers.schedules.plan import catch_up, fire_outcome
from hub.schedules.window import (
    Window,
    WindowError,
    is_open,
    last_fire,
    next_change,
    next_fire,
    next_open,
    parse_window,
    resolve_zone,
    window_states,
    zone_of,
)

BERLIN = "Europe/Berlin"


def at(text: str) -> datetime:
    """An aware UTC instant from ``YYYY-MM-DD HH:MM[:SS]`` (read as UTC)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def win(cron: str, duration_s: float = 3600, timezone: str = "UTC") -> Window:
    return parse_window(cron, duration_s, timezone)


@pytest.mark.parametrize(
    ("cron", "duration_s", "timezone", "message"),
    [
        pytest.param("0 2 * *", 60, "UTC", "cron: 5 fields", id="four-fields"),
        pytest.param("0 0 2 * * * *", 60, "UTC", "cron: 5 fields", id="seven-fields"),
        pytest.param("61 2 * * *", 60, "UTC", "cron: ", id="minute-out-of-range"),
        pytest.param("0 2 * * 8", 60, "UTC", "cron: day of week '8'", id="weekday-8"),
        pytest.param("0 2 * * fri-mon", 60, "UTC", "runs backwards", id="weekday-backwards"),
        pytest.param("0 2 1 * mon", 60, "UTC", "not both", id="day-and-weekday"),
        pytest.param("0 0 30 2 *", 60, "UTC", "never fires", id="february-30"),
        pytest.param("0 2 * * *", 0, "UTC", "duration_s: must be more than 0", id="zero"),
        pytest.param("0 2 * * *", -5, "UTC", "duration_s", id="negative"),
        pytest.param("0 2 * * *", 604801, "UTC", "at most 604800", id="over-7-days"),
        pytest.param("0 2 * * *", float("nan"), "UTC", "duration_s", id="nan"),
        pytest.param("0 2 * * *", True, "UTC", "duration_s: a number", id="bool"),
        pytest.param("0 2 * * *", 60, "Europe/Berlin", "timezone:", id="fixed-zone"),
        pytest.param("0 2 * * *", 60, "label:", "timezone:", id="empty-label"),
        pytest.param("0 2 * * *", 60, "label:a b", "timezone:", id="bad-label-key"),
        pytest.param("0 2 * * *", 60, "utc", "timezone:", id="lowercase-utc"),
    ],
)
def test_bad_windows_are_refused_naming_the_field(
    cron: str, duration_s: float, timezone: str, message: str
) -> None:
    with pytest.raises(WindowError, match=message):
        parse_window(cron, duration_s, timezone)


@pytest.mark.parametrize(
    ("cron", "start", "fires"),
    [
        # 2026-12-06 is a Sunday.
        pytest.param("0 9 * * 0", "2026-12-01 00:00", ["2026-12-06 09:00"], id="0-is-sunday"),
        pytest.param("0 9 * * 7", "2026-12-01 00:00", ["2026-12-06 09:00"], id="7-is-sunday"),
        pytest.param("0 9 * * 1", "2026-12-01 00:00", ["2026-12-07 09:00"], id="1-is-monday"),
        pytest.param(
            "0 9 * * 5-7",
            "2026-12-03 12:00",
            ["2026-12-04 09:00", "2026-12-05 09:00", "2026-12-06 09:00", "2026-12-11 09:00"],
            id="fri-to-sun-numbers",
        ),
        pytest.param(
            "0 9 * * */3",  # crontab: 0,3,6 = Sun, Wed, Sat
            "2026-12-06 10:00",
            ["2026-12-09 09:00", "2026-12-12 09:00", "2026-12-13 09:00"],
            id="weekday-step",
        ),
        pytest.param(
            "*/20 * * * * *",
            "2026-12-06 10:00:05",
            ["2026-12-06 10:00:20", "2026-12-06 10:00:40", "2026-12-06 10:01:00"],
            id="six-fields-seconds",
        ),
    ],
)
def test_fires_in_utc(cron: str, start: str, fires: list[str]) -> None:
    window = win(cron)
    got, after = [], at(start)
    for _ in fires:
        fire = next_fire(window, "UTC", after)
        assert fire is not None
        got.append(fire)
        after = fire
    assert got == [at(f) for f in fires]


@pytest.mark.parametrize(
    ("cron", "start", "fires"),
    [
        # Spring forward: Sunday 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC).
        pytest.param(
            "30 2 * * *",
            "2026-03-28 12:00",
            ["2026-03-29 01:00", "2026-03-30 00:30"],
            id="spring-gap-fires-at-the-jump",
        ),
        pytest.param(
            "*/30 * * * *",
            "2026-03-29 00:10",
            ["2026-03-29 00:30", "2026-03-29 01:00", "2026-03-29 01:30"],
            id="spring-gap-times-fire-once-at-the-jump",
        ),
        pytest.param(
            "30 1 * * *",
            "2026-03-28 12:00",
            ["2026-03-29 00:30", "2026-03-30 23:30"][:1],
            id="spring-before-the-gap-unchanged",
        ),
        # Fall back: Sunday 2026-10-25 03:00 CEST -> 02:00 CET (01:00 UTC).
        pytest.param(
            "30 2 * * *",
            "2026-10-24 12:00",
            ["2026-10-25 00:30", "2026-10-26 01:30"],
            id="fall-repeated-time-fires-once-first",
        ),
        pytest.param(
            "*/30 * * * *",
            "2026-10-25 00:15",
            ["2026-10-25 00:30", "2026-10-25 02:00", "2026-10-25 02:30"],
            id="fall-repeated-hour-skipped-second-time",
        ),
        pytest.param(
            "0 9 * * *",
            "2026-10-24 12:00",
            ["2026-10-25 08:00", "2026-10-26 08:00"],
            id="fall-offset-changes-after",
        ),
    ],
)
def test_fires_in_berlin_across_dst(cron: str, start: str, fires: list[str]) -> None:
    window = win(cron, timezone="label:tz")
    got, after = [], at(start)
    for _ in fires:
        fire = next_fire(window, BERLIN, after)
        assert fire is not None
        got.append(fire)
        after = fire
    assert got == [at(f) for f in fires]


def test_next_fire_from_inside_the_repeated_hour_never_goes_back() -> None:
    """APScheduler 3's CronTrigger in Berlin steps back to 00:30 UTC from here."""
    window = win("*/30 * * * *", timezone="label:tz")
    after = at("2026-10-25 01:00")  # 02:00 CET, the second pass
    assert next_fire(window, BERLIN, after) == at("2026-10-25 02:00")


@pytest.mark.parametrize(
    ("cron", "duration_s", "zone", "now", "open_"),
    [
        pytest.param("0 2 * * *", 3600, "UTC", "2026-12-06 01:59:59", False, id="before"),
        pytest.param("0 2 * * *", 3600, "UTC", "2026-12-06 02:00", True, id="at-fire"),
        pytest.param("0 2 * * *", 3600, "UTC", "2026-12-06 02:59:59", True, id="inside"),
        pytest.param("0 2 * * *", 3600, "UTC", "2026-12-06 03:00", False, id="half-open-end"),
        pytest.param("0 2 * * *", 3600, BERLIN, "2026-12-06 01:00", True, id="berlin-winter"),
        pytest.param("0 2 * * *", 3600, BERLIN, "2026-07-06 00:30", True, id="berlin-summer"),
        pytest.param("0 2 * * *", 3600, BERLIN, "2026-07-06 01:30", False, id="berlin-summer-x"),
        pytest.param(
            "0 2 * * *", 3 * 86400, "UTC", "2026-12-06 01:00", True, id="overlapping-days"
        ),
        pytest.param("* * * * *", 30, "UTC", "2026-12-06 10:00:31", False, id="short-gap"),
        pytest.param("* * * * *", 90, "UTC", "2026-12-06 10:00:31", True, id="overlap"),
        # Spring forward: 02:30 fires at the jump, 01:00 UTC; open for an hour of real time.
        pytest.param("30 2 * * *", 3600, BERLIN, "2026-03-29 00:59:59", False, id="gap-before"),
        pytest.param("30 2 * * *", 3600, BERLIN, "2026-03-29 01:00", True, id="gap-opens"),
        pytest.param("30 2 * * *", 3600, BERLIN, "2026-03-29 01:59:59", True, id="gap-inside"),
        pytest.param("30 2 * * *", 3600, BERLIN, "2026-03-29 02:00", False, id="gap-closed"),
        # Fall back: 02:30 CEST only (00:30 UTC), not again at 02:30 CET.
        pytest.param("30 2 * * *", 1800, BERLIN, "2026-10-25 00:45", True, id="fold-first"),
        pytest.param("30 2 * * *", 1800, BERLIN, "2026-10-25 01:45", False, id="fold-second"),
    ],
)
def test_is_open(cron: str, duration_s: float, zone: str, now: str, open_: bool) -> None:
    assert is_open(win(cron, duration_s, "label:tz"), zone, at(now)) is open_


@pytest.mark.parametrize(
    ("cron", "duration_s", "now", "change"),
    [
        pytest.param("0 2 * * *", 3600, "2026-12-06 01:00", "2026-12-06 02:00", id="opens"),
        pytest.param("0 2 * * *", 3600, "2026-12-06 02:10", "2026-12-06 03:00", id="closes"),
        pytest.param(
            "0 1,3,5 * * *", 3 * 3600, "2026-12-06 02:10", "2026-12-06 08:00", id="overlap-chain"
        ),
        pytest.param("0 2 * * *", 3600, "2026-12-06 03:00", "2026-12-07 02:00", id="at-close"),
    ],
)
def test_next_change(cron: str, duration_s: float, now: str, change: str) -> None:
    window = win(cron, duration_s)
    got = next_change(window, "UTC", at(now))
    assert got == at(change)
    before = got - timedelta(seconds=1)
    assert is_open(window, "UTC", before) is not is_open(window, "UTC", got)


def test_next_change_of_a_window_that_never_closes_is_a_later_look() -> None:
    window = win("* * * * *", 120)
    now = at("2026-12-06 10:00")
    later = next_change(window, "UTC", now)
    assert now + timedelta(hours=1) < later <= now + timedelta(days=8)
    assert is_open(window, "UTC", later)
    assert next_open(window, "UTC", now) is None


def test_next_change_in_berlin_at_the_jump() -> None:
    window = win("30 2 * * *", 3600, "label:tz")
    assert next_change(window, BERLIN, at("2026-03-28 23:00")) == at("2026-03-29 01:00")
    assert next_change(window, BERLIN, at("2026-03-29 01:00")) == at("2026-03-29 02:00")


def test_next_open() -> None:
    window = win("0 2 * * *", 3600)
    assert next_open(window, "UTC", at("2026-12-06 01:00")) == at("2026-12-06 02:00")
    assert next_open(window, "UTC", at("2026-12-06 02:30")) == at("2026-12-07 02:00")


@pytest.mark.parametrize(
    ("since", "now", "fire"),
    [
        pytest.param("2026-11-01 00:00", "2026-12-06 10:30", "2026-12-06 02:00", id="latest"),
        pytest.param("2026-12-06 02:00", "2026-12-06 10:30", None, id="since-is-exclusive"),
        pytest.param("2026-12-06 01:00", "2026-12-06 02:00", "2026-12-06 02:00", id="now-incl"),
        pytest.param("2026-12-06 03:00", "2026-12-06 10:30", None, id="none-since"),
        pytest.param("2026-12-06 10:30", "2026-12-06 10:30", None, id="empty-span"),
    ],
)
def test_last_fire(since: str, now: str, fire: str | None) -> None:
    window = win("0 2 * * *", 3600)
    got = last_fire(window, "UTC", at(now), since=at(since))
    assert got == (at(fire) if fire else None)


@pytest.mark.parametrize(
    ("labels", "zone", "fallback"),
    [
        pytest.param({"tz": "Europe.Berlin"}, BERLIN, None, id="dots-for-slashes"),
        pytest.param({"tz": "UTC"}, "UTC", None, id="utc"),
        pytest.param(
            {"tz": "America.Argentina.Buenos_Aires"},
            "America/Argentina/Buenos_Aires",
            None,
            id="three-parts",
        ),
        pytest.param({}, "UTC", "no label 'tz'", id="no-label"),
        pytest.param({"tz": "Mars.Olympus"}, "UTC", "names no time zone", id="unknown"),
        pytest.param({"tz": ".."}, "UTC", "names no time zone", id="dot-dot"),
        pytest.param({"tz": ""}, "UTC", "names no time zone", id="empty"),
    ],
)
def test_zone_of_a_device(labels: dict[str, str], zone: str, fallback: str | None) -> None:
    window = win("0 2 * * *", timezone="label:tz")
    choice = resolve_zone(window, labels)
    assert choice.zone == zone and zone_of(window, labels) == zone
    if fallback is None:
        assert choice.fallback is None
    else:
        assert choice.fallback is not None and fallback in choice.fallback


def test_utc_window_ignores_labels() -> None:
    assert zone_of(win("0 2 * * *"), {"tz": "Europe.Berlin"}) == "UTC"


def test_window_states_per_device_by_zone() -> None:
    window = win("0 2 * * *", 3600, "label:tz")
    now = at("2026-12-06 01:30")  # 02:30 in Berlin (open), 01:30 in UTC (closed)
    labels = {
        "berlin": {"tz": "Europe.Berlin"},
        "tokyo": {"tz": "Asia.Tokyo"},  # 10:30 there
        "bare": {},
        "bad": {"tz": "Nowhere"},
    }
    assert window_states(window, labels, now) == {
        "berlin": True,
        "tokyo": False,
        "bare": False,
        "bad": False,
    }
    assert window_states(win("0 1 * * *"), labels, now) == dict.fromkeys(labels, True)


def test_window_states_for_5000_devices_is_fast() -> None:
    import time

    window = win("0 2 * * *", 3600, "label:tz")
    zones = ["Europe.Berlin", "Asia.Tokyo", "America.New_York", "UTC", "Bogus"]
    labels = {f"d{i}": {"tz": zones[i % len(zones)]} for i in range(5000)}
    started = time.perf_counter()
    states = window_states(window, labels, at("2026-12-06 01:30"))
    assert len(states) == 5000
    assert time.perf_counter() - started < 0.5


# -- the scheduler's planner (hub.controllers.schedules.plan) -----------------------------


@pytest.mark.parametrize(
    ("fire", "now", "outcome"),
    [
        pytest.param("2026-12-06 02:00", "2026-12-06 02:00:00.2", "fired", id="on-time"),
        pytest.param("2026-12-06 02:00", "2026-12-06 02:59:59", "fired", id="late-but-open"),
        pytest.param("2026-12-06 02:00", "2026-12-06 03:00", "missed", id="after-close"),
    ],
)
def test_fire_outcome(fire: str, now: str, outcome: str) -> None:
    assert fire_outcome(win("0 2 * * *", 3600), at(fire), at(now)) == outcome


@pytest.mark.parametrize(
    ("now", "changed_at", "last_recorded", "expected"),
    [
        pytest.param(
            "2026-12-06 02:30",
            "2026-11-01 00:00",
            None,
            ("2026-12-06 02:00", "late"),
            id="down-through-the-fire-still-open",
        ),
        pytest.param(
            "2026-12-06 05:00",
            "2026-11-01 00:00",
            "2026-12-01 02:00",
            ("2026-12-06 02:00", "missed"),
            id="down-for-days-only-the-newest",
        ),
        pytest.param(
            "2026-12-06 02:30",
            "2026-11-01 00:00",
            "2026-12-06 02:00",
            None,
            id="already-recorded",
        ),
        pytest.param(
            "2026-12-06 02:30", "2026-12-06 02:10", None, None, id="changed-after-the-fire"
        ),
        pytest.param("2026-12-06 02:30", "2026-12-06 02:00", None, None, id="changed-at-the-fire"),
        pytest.param(
            "2026-12-06 01:00",
            "2026-11-01 00:00",
            None,
            ("2026-12-05 02:00", "missed"),
            id="before-todays-fire",
        ),
    ],
)
def test_catch_up(
    now: str, changed_at: str, last_recorded: str | None, expected: tuple[str, str] | None
) -> None:
    caught = catch_up(
        win("0 2 * * *", 3600),
        "UTC",
        now=at(now),
        changed_at=at(changed_at),
        last_recorded=at(last_recorded) if last_recorded else None,
    )
    if expected is None:
        assert caught is None
    else:
        assert caught is not None
        assert (caught.fire_time, caught.outcome) == (at(expected[0]), expected[1])
        assert caught.wakes is (expected[1] == "late")


def test_catch_up_in_berlin_after_the_spring_jump() -> None:
    """Down across 02:30 on the spring-forward night: the fire at the jump is caught up."""
    caught = catch_up(
        win("30 2 * * *", 3600, "label:tz"),
        BERLIN,
        now=at("2026-03-29 01:40"),
        changed_at=at("2026-03-01 00:00"),
        last_recorded=at("2026-03-28 01:30"),
    )
    assert caught is not None and caught.fire_time == at("2026-03-29 01:00")
    assert caught.outcome == "late"
