"""Worker split and counter arithmetic; the runner's pure parts (lines, tables, batches, API)."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import pytest

from simulator.fleet import device_ids
from simulator.profiles import BUILTIN
from simulator.runner import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_DEVICES,
    LiveView,
    RunConfig,
    Tick,
    batch_size,
    change_config,
    format_summary,
    format_tick,
    our_devices,
    register,
)
from simulator.workers import WorkerSpec, split, sum_counts, totals_only

# ---------------------------------------------------------------- the split


@pytest.mark.parametrize(
    "count, workers, sizes",
    [
        pytest.param(10, 3, [4, 3, 3], id="uneven"),
        pytest.param(5000, 2, [2500, 2500], id="even"),
        pytest.param(2, 8, [1, 1], id="more-workers-than-devices"),
        pytest.param(1, 1, [1], id="one"),
        pytest.param(0, 4, [0], id="none"),
    ],
)
def test_split_is_contiguous_balanced_and_covers_every_device(
    count: int, workers: int, sizes: list[int]
) -> None:
    ranges = split(count, workers)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(count))


def test_split_is_deterministic_and_names_the_same_devices_every_time() -> None:
    ids = device_ids(1001)
    first = [ids[r.start : r.stop] for r in split(1001, 4)]
    assert first == [ids[r.start : r.stop] for r in split(1001, 4)]
    assert first[0][0] == "sim-00000" and first[-1][-1] == "sim-01000"


def test_split_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        split(10, 0)
    with pytest.raises(ValueError):
        split(-1, 2)


def test_worker_spec_round_trips_with_its_profile() -> None:
    import msgspec

    spec = WorkerSpec(
        index=1,
        prefix="sim",
        count=10,
        start=5,
        stop=10,
        broker_url="mqtt://127.0.0.1:1883",
        seed=3,
        profile=BUILTIN["storm"],
        epoch=1.5,
        parent_pid=1,
    )
    assert msgspec.json.decode(msgspec.json.encode(spec), type=WorkerSpec) == spec


# ---------------------------------------------------------------- counters


def test_sum_counts_adds_nested_counters_and_keeps_other_values() -> None:
    a = {"connects": 3, "applied": {"1": 2}, "rejected": {}, "name": "x"}
    b = {"connects": 4, "applied": {"1": 1, "2": 5}, "rejected": {"malformed": 1}, "name": "y"}
    assert sum_counts(a, b) == {
        "connects": 7,
        "applied": {"1": 3, "2": 5},
        "rejected": {"malformed": 1},
        "name": "y",
    }
    assert sum_counts({}, b) == b


def test_a_dead_incarnation_leaves_totals_but_no_levels() -> None:
    snap = {"connected": 40, "offline_now": 3, "connects": 50, "applied": {"1": 40}}
    assert totals_only(snap) == {"connects": 50, "applied": {"1": 40}}


# ---------------------------------------------------------------- the run's config


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"devices": 0}, id="no-devices"),
        pytest.param({"workers": 0}, id="no-workers"),
        pytest.param({"duration_s": 0.0}, id="zero-duration"),
        pytest.param({"change_every_s": -1.0}, id="negative-change"),
        pytest.param({"settle_s": -1.0}, id="negative-settle"),
        pytest.param({"max_respawns": -1}, id="negative-respawns"),
    ],
)
def test_run_config_refuses_nonsense(overrides: dict[str, Any]) -> None:
    settings: dict[str, Any] = {
        "devices": 10,
        "broker_url": "mqtt://127.0.0.1:1883",
        "hub_url": "http://127.0.0.1:8080",
        "profile": BUILTIN["stable"],
        **overrides,
    }
    with pytest.raises(ValueError):
        RunConfig(**settings)


@pytest.mark.parametrize(
    "hub, api",
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/api/v1"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/api/v1"),
        ("http://127.0.0.1:8080/api/v1/", "http://127.0.0.1:8080/api/v1"),
    ],
)
def test_the_hub_url_may_or_may_not_name_the_api(hub: str, api: str) -> None:
    cfg = RunConfig(devices=1, broker_url="mqtt://h:1", hub_url=hub, profile=BUILTIN["stable"])
    assert cfg.api_url == api and cfg.labels == {"sim": "sim"}


@pytest.mark.parametrize("prefix", ["sim", "p" * 50])
@pytest.mark.parametrize("count", [10, 10_000, 250_000])
def test_registration_batches_stay_within_the_api_limits(prefix: str, count: int) -> None:
    size = batch_size(prefix, count)
    assert 1 <= size <= MAX_BATCH_DEVICES
    ids = device_ids(count, prefix)[:size]
    body = json.dumps({"devices": [{"id": d, "labels": {"sim": prefix}} for d in ids]})
    assert len(body) <= MAX_BATCH_BODY_BYTES


def test_each_change_is_a_different_whole_document() -> None:
    assert change_config(1, "flaky", 3) != change_config(2, "flaky", 3)
    assert change_config(2, "flaky", 3) == {"sim": {"change": 2, "profile": "flaky", "seed": 3}}


# ---------------------------------------------------------------- the hub, mocked


async def test_register_posts_batches_and_counts_created_and_existing() -> None:
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        ids = [d["id"] for d in body["devices"]]
        return httpx.Response(200, json={"created": ids[1:], "existing": ids[:1]})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer), base_url="http://hub/api/v1"
    ) as api:
        created, existing = await register(api, device_ids(25), {"sim": "sim"}, chunk=10)
    assert [len(b["devices"]) for b in bodies] == [10, 10, 5]
    assert (created, existing) == (22, 3)
    assert bodies[0]["devices"][0] == {"id": "sim-00000", "labels": {"sim": "sim"}}


async def test_register_says_what_the_hub_refused() -> None:
    from simulator.runner import RunError

    transport = httpx.MockTransport(lambda r: httpx.Response(422, json={"detail": "bad id"}))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub/api/v1") as api:
        with pytest.raises(RunError, match=r"HTTP 422.*bad id"):
            await register(api, ["a"], {}, chunk=10)


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        pytest.param(401, "--token or DRIFTLESS_TOKEN", id="no-token"),
        pytest.param(403, "needs an admin token", id="too-little-role"),
    ],
)
async def test_register_says_how_to_authenticate_when_refused(status: int, hint: str) -> None:
    from simulator.runner import RunError

    transport = httpx.MockTransport(lambda r: httpx.Response(status, json={"detail": "no"}))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub/api/v1") as api:
        with pytest.raises(RunError, match=rf"HTTP {status}.*{hint}"):
            await register(api, ["a"], {}, chunk=10)


async def test_our_devices_pages_by_label_and_counts_settled() -> None:
    devices = [
        {"id": f"sim-{i}", "in_sync": i % 3 != 0, "online": i % 2 == 0}
        | {"desired_generation": 5, "failed_generation": 5 if i % 3 == 0 else 0}
        for i in range(2500)
    ]
    devices[0]["failed_generation"] = 4  # failed an older one: neither in sync nor settled
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.params))
        offset, limit = int(request.url.params["offset"]), int(request.url.params["limit"])
        page = devices[offset : offset + limit]
        return httpx.Response(200, json={"items": page, "total": len(devices)})

    cfg = RunConfig(
        devices=2500, broker_url="mqtt://h:1", hub_url="http://hub", profile=BUILTIN["stable"]
    )
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer), base_url=cfg.api_url
    ) as api:
        counts = await our_devices(api, cfg)
    assert len(seen) == 3 and all("label=sim%3Dsim" in q for q in seen)
    in_sync = sum(1 for i in range(2500) if i % 3 != 0)
    assert counts == {
        "total": 2500,
        "in_sync": in_sync,
        "failed_newest": 2500 - in_sync - 1,
        "online": 1250,
        "settled": 2499,
    }


# ---------------------------------------------------------------- what is shown


def tick(**overrides: Any) -> Tick:
    values: dict[str, Any] = {
        "elapsed_s": 12.34,
        "devices": 5000,
        "connected": 4998,
        "hub": {"in_sync": 4990, "total": 5000},
        "generations": {3: 4990, 2: 8, 1: 1, 0: 1},
        "applied": 15000,
        "failed": 12,
        "disconnects": 240,
        "rejected": 0,
        "offline_now": 2,
        "workers_alive": 2,
        "workers": 2,
        "pids": (101, 102),
    }
    return Tick(**(values | overrides))


def test_progress_line_is_compact_and_complete() -> None:
    line = format_tick(tick())
    assert line == (
        "   12.3s conn 4998/5000 sync 4990/5000 gen 3:4990 2:8 1:1 … apply 15000 ok 12 failed "
        "disc 240 off 2 rej 0 workers 2/2 [101,102]"
    )
    assert len(line) < 130


def test_progress_line_when_the_hub_does_not_answer() -> None:
    assert " sync ? " in format_tick(tick(hub=None, generations={}))
    assert " gen - " in format_tick(tick(generations={}))


def test_live_view_overwrites_on_a_terminal_and_appends_otherwise() -> None:
    tty, plain = io.StringIO(), io.StringIO()
    for stream, is_tty in ((tty, True), (plain, False)):
        view = LiveView(stream, tty=is_tty)
        view.progress("one")
        view.progress("two")
        view.event("worker 1 died")
        view.progress("three")
        view.close()
    assert plain.getvalue() == "one\ntwo\nworker 1 died\nthree\n"
    assert tty.getvalue() == ("\r\x1b[Kone\r\x1b[Ktwo\r\x1b[Kworker 1 died\n\r\x1b[Kthree\n")


def summary() -> dict[str, Any]:
    return {
        "devices": 100,
        "profile": {"name": "flaky"},
        "seed": 3,
        "duration_s": 20.0,
        "stopped_by": "duration",
        "connects": 130,
        "disconnects": 30,
        "network_drops": 31,
        "applies": {"ok": 290, "failed": 3},
        "failures": 3,
        "rejected": 0,
        "messages": {"in": 320, "out": 900},
        "connected_s": 2.1,
        "changes": [
            {"index": 1, "converged_s": 3.2, "failed": 2},
            {"index": 2, "converged_s": None, "failed": 0, "superseded": True},
            {"index": 3, "converged_s": None, "failed": 0, "superseded": False},
        ],
        "final": {"in_sync": 99, "failed_newest": 1},
        "settled_s": 1.5,
        "memory": {
            "workers_rss_bytes": 60 * 2**20,
            "per_device_bytes": 600 * 1024,
            "per_device_marginal_bytes": 40 * 1024,
        },
        "workers": {
            "count": 2,
            "each": [
                {"index": 0, "pid": 11, "devices": 50, "restarts": 1, "rss_bytes": 2**25}
                | {"pids": [10, 11]},
                {"index": 1, "pid": 12, "devices": 50, "restarts": 0, "rss_bytes": 2**25}
                | {"pids": [12]},
            ],
        },
        "errors": [],
    }


def test_summary_table_shows_the_figures_a_reader_needs() -> None:
    table = format_summary(summary())
    assert table.splitlines()[0] == (
        "driftless sim: 100 devices, profile flaky, seed 3, 2 workers, 20.0 s (duration)"
    )
    for expected in (
        "connects",
        "1.3",  # connects per device
        "change 1 converged after",
        "3.2s  (2 failed it)",
        "final in sync",
        "99",
        "1 failed newest",
        "600.0 KiB",
        "marginal 40.0 KiB/device",
        "10,11",
    ):
        assert expected in table, expected
    change_2 = next(line for line in table.splitlines() if line.startswith("change 2"))
    assert change_2.rstrip().endswith("superseded")
    change_3 = next(line for line in table.splitlines() if line.startswith("change 3"))
    assert change_3.rstrip().endswith("-")
