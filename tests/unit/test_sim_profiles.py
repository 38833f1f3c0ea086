"""Profiles: built-ins, files (good and bad), deterministic schedules and their statistics."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from simulator.profiles import (
    BUILTIN,
    FlakySpec,
    Profile,
    ProfileError,
    Shaper,
    SlowSpec,
    StormSpec,
    Window,
    device_rng,
    flaky_windows,
    load_profile,
    load_profile_file,
    offline_windows,
    profile_from_dict,
    publish_wire_bytes,
    storm_offline_s,
    storm_times,
    storm_windows,
)


def first(windows: object, n: int) -> list[Window]:
    return list(itertools.islice(windows, n))  # type: ignore[call-overload]


# ---------------------------------------------------------------- built-ins


def test_the_four_builtins_exist_and_say_what_they_do() -> None:
    assert set(BUILTIN) == {"stable", "flaky", "storm", "slow", "workloads"}
    assert not BUILTIN["stable"].has_offline_windows and BUILTIN["stable"].slow is None
    assert BUILTIN["flaky"].flaky is not None and BUILTIN["flaky"].storm is None
    assert BUILTIN["storm"].storm is not None and BUILTIN["storm"].storm.reconnect_window_s == 1.0
    assert BUILTIN["slow"].slow is not None and BUILTIN["slow"].slow.bandwidth_bytes_per_s > 0
    for profile in BUILTIN.values():
        assert profile.description


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtins_round_trip_through_their_json(name: str) -> None:
    profile = BUILTIN[name]
    again = profile_from_dict(json.loads(json.dumps(profile.as_dict())))
    assert again == profile


def test_load_profile_prefers_a_builtin_name() -> None:
    assert load_profile("flaky") is BUILTIN["flaky"]


# ---------------------------------------------------------------- files


def test_a_toml_file_with_every_section(tmp_path: Path) -> None:
    path = tmp_path / "lab.toml"
    path.write_text(
        """
name = "lab-wifi"
description = "our lab"

[apply]
time_s = 0.5
jitter_s = 0.25
failure_rate = 0.1

[flaky]
mean_online_s = 20
mean_offline_s = 2

[storm]
at_s = [5, 15]
every_s = 0
offline_s = 1
reconnect_window_s = 0.5

[slow]
latency_s = 0.05
bandwidth_bytes_per_s = 10000
"""
    )
    profile = load_profile(str(path))
    assert profile.name == "lab-wifi"
    assert (profile.apply.time_s, profile.apply.jitter_s, profile.apply.failure_rate) == (
        0.5,
        0.25,
        0.1,
    )
    assert profile.flaky == FlakySpec(mean_online_s=20, mean_offline_s=2)
    assert profile.storm == StormSpec(
        at_s=(5.0, 15.0), every_s=0, offline_s=1, reconnect_window_s=0.5
    )
    assert profile.slow == SlowSpec(latency_s=0.05, bandwidth_bytes_per_s=10000)


def test_a_json_file_based_on_a_builtin_overrides_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "flakier.json"
    body = {"base": "flaky", "name": "flakier", "flaky": {"mean_offline_s": 9}}
    path.write_text(json.dumps(body))
    profile = load_profile_file(path)
    assert profile.flaky is not None and BUILTIN["flaky"].flaky is not None
    assert profile.flaky.mean_offline_s == 9
    assert profile.flaky.mean_online_s == BUILTIN["flaky"].flaky.mean_online_s
    assert profile.apply == BUILTIN["flaky"].apply


def test_a_minimal_file_is_stable_with_default_applies(tmp_path: Path) -> None:
    path = tmp_path / "mini.toml"
    path.write_text('name = "mini"\n')
    profile = load_profile_file(path)
    assert profile == Profile(name="mini")
    assert not profile.has_offline_windows and profile.slow is None


@pytest.mark.parametrize(
    "name, text, message",
    [
        pytest.param("a.toml", "name = [", "not valid TOML", id="toml-syntax"),
        pytest.param("a.json", "{", "not valid JSON", id="json-syntax"),
        pytest.param("a.json", "[1, 2]", "top level", id="json-not-an-object"),
        pytest.param("a.toml", 'description = "x"', "missing required field `name`", id="no-name"),
        pytest.param(
            "a.toml", 'name = "x"\ncolour = "red"', "unknown field `colour`", id="unknown-key"
        ),
        pytest.param(
            "a.toml",
            'name = "x"\n[flaky]\nmean_online = 3',
            r"unknown field `mean_online` - at `\$.flaky`",
            id="typo-in-section",
        ),
        pytest.param(
            "a.toml",
            'name = "x"\n[flaky]\nmean_online_s = "soon"',
            r"Expected `float`, got `str` - at `\$.flaky.mean_online_s`",
            id="wrong-type",
        ),
        pytest.param(
            "a.toml",
            'name = "x"\n[flaky]\nmean_offline_s = 0',
            r"> 0.0 - at `\$.flaky.mean_offline_s`",
            id="zero-mean",
        ),
        pytest.param(
            "a.toml",
            'name = "x"\n[apply]\nfailure_rate = 1.5',
            r"<= 1.0 - at `\$.apply.failure_rate`",
            id="probability-above-one",
        ),
        pytest.param(
            "a.toml",
            'name = "x"\n[slow]\nlatency_s = -1',
            r">= 0.0 - at `\$.slow.latency_s`",
            id="negative-latency",
        ),
        pytest.param(
            "a.toml", 'name = "x"\n[storm]\nat_s = []', "at least one time", id="storm-no-times"
        ),
        pytest.param("a.toml", 'name = "a b/c"', r"at `\$.name`", id="bad-name"),
        pytest.param("a.toml", 'base = "hurricane"\nname = "x"', "not a built-in", id="bad-base"),
        pytest.param("a.yaml", 'name = "x"', "must end in .toml or .json", id="wrong-extension"),
    ],
)
def test_bad_profile_files_are_refused_saying_where(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as caught:
        load_profile(str(path))
    assert str(path) in str(caught.value)


def test_a_missing_file_and_an_unknown_name_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(tmp_path / "nope.toml"))
    with pytest.raises(ProfileError, match="not a built-in"):
        load_profile("hurricane")


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"name": "x", "description": "' + "x" * 70_000 + '"}')
    with pytest.raises(ProfileError, match="at most 64 KiB"):
        load_profile_file(path)


# ---------------------------------------------------------------- determinism


def schedule(profile: Profile, seed: int, device: str, n: int = 20) -> list[Window]:
    return first(offline_windows(profile, seed, device), n)


@pytest.mark.parametrize("name", ["flaky", "storm"])
def test_same_seed_same_schedule_different_seed_or_device_different(name: str) -> None:
    profile = BUILTIN[name]
    assert schedule(profile, 7, "sim-00001") == schedule(profile, 7, "sim-00001")
    assert schedule(profile, 7, "sim-00001") != schedule(profile, 8, "sim-00001")
    assert schedule(profile, 7, "sim-00001") != schedule(profile, 7, "sim-00002")


def test_schedules_do_not_depend_on_the_order_devices_are_asked_in() -> None:
    profile = Profile(name="both", flaky=FlakySpec(), storm=StormSpec(every_s=20))
    ids = [f"d-{i}" for i in range(30)]
    forward = {d: schedule(profile, 3, d) for d in ids}
    backward = {d: schedule(profile, 3, d) for d in reversed(ids)}
    assert forward == backward


def test_device_rng_depends_on_each_input() -> None:
    draws = {
        device_rng(s, d, p).random() for s, d, p in [(1, "a", "x"), (2, "a", "x"), (1, "b", "x")]
    }
    assert len(draws) == 3 and device_rng(1, "a", "x").random() in draws


# ---------------------------------------------------------------- flaky statistics


def test_flaky_windows_are_ordered_disjoint_capped_and_have_the_configured_means() -> None:
    spec = FlakySpec(mean_online_s=30.0, mean_offline_s=3.0, max_offline_s=12.0)
    windows = first(flaky_windows(spec, device_rng(5, "sim-00000", "flaky")), 4000)
    gaps = [b.start_s - a.end_s for a, b in itertools.pairwise(windows)]
    offline = [w.end_s - w.start_s for w in windows]
    assert all(g > 0 for g in gaps) and windows[0].start_s > 0
    assert all(0 <= d <= 12.0 for d in offline)
    assert 27.0 <= statistics.mean(gaps) <= 33.0
    # the cap trims the exponential's tail a little: E[min(X, 12)] = 3 (1 - e^-4) ~ 2.95
    assert 2.7 <= statistics.mean(offline) <= 3.2
    assert statistics.median(offline) < statistics.mean(offline)  # skewed, as exponential is


def test_flaky_windows_across_a_fleet_are_independent() -> None:
    spec = FlakySpec(mean_online_s=10.0, mean_offline_s=1.0)
    starts = {first(flaky_windows(spec, device_rng(1, f"d-{i}", "flaky")), 1)[0].start_s
              for i in range(200)}  # fmt: skip
    assert len(starts) == 200


# ---------------------------------------------------------------- storm statistics


def test_storm_times_then_repeat() -> None:
    assert list(storm_times(StormSpec(at_s=(30.0, 10.0), every_s=0))) == [10.0, 30.0]
    assert list(itertools.islice(storm_times(StormSpec(at_s=(5.0,), every_s=7.0)), 4)) == [
        5.0,
        12.0,
        19.0,
        26.0,
    ]


def test_storm_drops_every_device_together_and_returns_them_within_the_window() -> None:
    spec = StormSpec(at_s=(10.0, 40.0), every_s=0, offline_s=3.0, reconnect_window_s=1.0)
    fleet = [list(storm_windows(spec, 11, f"sim-{i:05d}")) for i in range(1000)]
    for storm, at in enumerate((10.0, 40.0)):
        windows = [device[storm] for device in fleet]
        assert {w.start_s for w in windows} == {at}
        back = [w.end_s - at for w in windows]
        assert all(3.0 <= b <= 4.0 for b in back)
        assert max(back) - min(back) > 0.95  # spread over the whole window ...
        assert 3.45 <= statistics.mean(back) <= 3.55  # ... evenly
    assert all(len(device) == 2 for device in fleet)


def test_storm_offline_time_is_the_windows_own_draw() -> None:
    """What a benchmark's bare clients use to return on the devices' schedule."""
    spec = StormSpec(at_s=(40.0, 10.0), every_s=0, offline_s=6.0, reconnect_window_s=1.0)
    for device_id in ("storm-00000", "storm-00001", "storm-04999"):
        windows = list(storm_windows(spec, 7, device_id))
        offline = [storm_offline_s(spec, 7, device_id, i) for i in range(2)]
        assert offline == pytest.approx([w.end_s - w.start_s for w in windows], abs=1e-9)
    assert storm_offline_s(spec, 7, "d", 0) != storm_offline_s(spec, 8, "d", 0)


def test_storm_with_no_window_returns_everyone_at_once() -> None:
    spec = StormSpec(at_s=(1.0,), offline_s=2.0, reconnect_window_s=0.0)
    assert {next(storm_windows(spec, 1, f"d{i}")).end_s for i in range(50)} == {3.0}


def test_flaky_and_storm_merge_in_start_order() -> None:
    profile = Profile(name="both", flaky=FlakySpec(mean_online_s=5), storm=StormSpec(every_s=10))
    windows = schedule(profile, 2, "d", 60)
    assert [w.start_s for w in windows] == sorted(w.start_s for w in windows)
    assert {10.0, 20.0, 30.0} <= {w.start_s for w in windows}


# ---------------------------------------------------------------- the slow link model


def test_shaper_adds_transmission_then_latency_and_queues_back_to_back_messages() -> None:
    shaper = Shaper(SlowSpec(latency_s=0.2, bandwidth_bytes_per_s=1000))
    assert shaper.deliver_at(10.0, 500) == pytest.approx(10.7)  # 0.5 s on the wire + 0.2 s
    assert shaper.deliver_at(10.0, 500) == pytest.approx(11.2)  # waits for the first
    assert shaper.deliver_at(20.0, 0) == pytest.approx(20.2)  # an idle link: latency only


def test_shaper_without_a_bandwidth_cap_is_latency_only() -> None:
    shaper = Shaper(SlowSpec(latency_s=0.05, bandwidth_bytes_per_s=0))
    assert [shaper.deliver_at(1.0, 10**6) for _ in range(3)] == [pytest.approx(1.05)] * 3


@pytest.mark.parametrize(
    "payload, qos, expected",
    [
        pytest.param(0, 0, 1 + 1 + 2 + 5 + 1, id="empty-qos0"),
        pytest.param(100, 1, 1 + 1 + 2 + 5 + 2 + 1 + 100, id="small-qos1"),
        pytest.param(200, 1, 1 + 2 + 2 + 5 + 2 + 1 + 200, id="two-length-bytes"),
    ],
)
def test_publish_wire_bytes(payload: int, qos: int, expected: int) -> None:
    assert publish_wire_bytes("a/b/c", payload, qos) == expected
