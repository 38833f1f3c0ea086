"""``driftless rollout …`` and ``driftless jobs …``: the pure renderer on fixed views, and
the commands against an in-memory hub (httpx.MockTransport) for requests, output and
exit codes.

The views are the design contract's shape (``GET /api/v1/deployments/{name}/rollout``);
the real hub is the integration test's (tests/integration/test_ctl_rollout.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctl import commands, documents
from ctl import rollout_render as show
from ctl.client import HubClient
from ctl.errors import DocumentError
from driftless.cli import build_parser

NOW = datetime(2026, 12, 6, 16, 55, tzinfo=UTC)
ZERO = dict.fromkeys(show.DEVICE_STATES, 0)


def view(**overrides: Any) -> dict[str, Any]:
    """A rollout view of the contract's shape: canary of 5, then 10, then 5 (20 devices)."""
    counts = {**ZERO, "pending": 5, "in_flight": 3, "succeeded": 10, "failed": 1, "unknown": 1}
    base: dict[str, Any] = {
        "id": 3,
        "deployment": "web",
        "from_version": 1,
        "to_version": 2,
        "state": "running",
        "reason": "",
        "wave": 1,
        "waves": [
            {"index": 0, "size": 5, "counts": {**ZERO, "succeeded": 4, "failed": 1}},
            {
                "index": 1,
                "size": 10,
                "counts": {**ZERO, "succeeded": 6, "in_flight": 3, "unknown": 1},
            },
            {"index": 2, "size": 5, "counts": {**ZERO, "pending": 5}},
        ],
        "counts": counts,
        "targeted": 20,
        "staged": 0,
        "policy": {
            "strategy": "canary",
            "canary": {"count": 5},
            "pause_s": None,
            "max_in_flight": 50,
            "soak": {"seconds": 30, "reports": 2},
            "failure_threshold": {"percent": 20, "min_reported": 1, "action": "abort"},
        },
        "created_at": "2026-12-06T16:40:00Z",
        "started_at": "2026-12-06T16:40:01Z",
        "updated_at": "2026-12-06T16:54:00Z",
        "finished_at": None,
        "progress_deadline_at": "2026-12-06T17:20:00Z",
        "failed_devices": [
            {"device_id": "pump-0003", "state": "failed", "detail": "web: health check failed"}
        ],
        "unknown_devices": ["pump-0017"],
        "notes": ["wave 1 started", "canary passed: 4 of 5 succeeded", "wave 2 started"],
    }
    base.update(overrides)
    return base


# ---------------------------------------------------------------- the renderer


def test_status_shows_state_policy_bar_waves_times_devices_and_notes() -> None:
    lines = show.status(view(), NOW)
    assert lines == [
        "deployment/web rollout 3: version 1 -> 2",
        "State:      running",
        "Policy:     canary of 5 devices, pause until promoted, at most 50 in flight, "
        "soak 30s and 2 healthy reports, abort at 20% failed",
        "Progress:   [####################xx??>>>>>>..........] 10 succeeded, 1 failed, "
        "1 unknown, 3 in flight, 5 waiting of 20 devices",
        "Devices:    5 pending, 3 in flight, 10 succeeded, 1 failed, 1 unknown",
        "Waves:      wave 2 of 3",
        "    WAVE  DEVICES  STATES",
        "       1        5  4 succeeded, 1 failed",
        "  >    2       10  3 in flight, 6 succeeded, 1 unknown",
        "       3        5  5 pending",
        "Created:    2026-12-06T16:40:00Z (15m ago)",
        "Started:    2026-12-06T16:40:01Z (14m ago)",
        "Deadline:   progress by 2026-12-06T17:20:00Z (in 25m; else pause)",
        "Failed devices (1):",
        "  pump-0003  failed  web: health check failed",
        "Unknown devices (1, offline: neither passed nor failed): pump-0017",
        "Notes:",
        "  wave 1 started",
        "  canary passed: 4 of 5 succeeded",
        "  wave 2 started",
    ]


TERMINAL_VIEW = {"finished_at": "2026-12-06T16:50:00Z", "progress_deadline_at": None}


@pytest.mark.parametrize(
    ("state", "reason", "overrides", "shown"),
    [
        ("scheduled", "starts at 2026-12-07T01:00:00Z", {"started_at": None}, "scheduled"),
        ("running", "", {}, "running"),
        ("paused", "failure threshold 20% crossed: 3 of 10", {}, "paused"),
        ("waiting_promote", "canary passed; promote to go on", {}, "waiting for promote"),
        ("succeeded", "", TERMINAL_VIEW, "succeeded"),
        ("aborted", "failure threshold 20% crossed: 3 of 10", TERMINAL_VIEW, "aborted"),
        ("superseded", "version 3 replaced it", TERMINAL_VIEW, "superseded"),
    ],
)
def test_every_state_is_shown_with_its_reason(
    state: str, reason: str, overrides: dict[str, Any], shown: str
) -> None:
    current = view(state=state, reason=reason, **overrides)
    lines = show.status(current, NOW)
    expected = f"State:      {shown}" + (f" ({reason})" if reason else "")
    assert lines[1] == expected
    assert show.is_terminal(current) is (state in ("succeeded", "aborted", "superseded"))
    assert show.line(current).startswith(f"deployment/web rollout 3: {shown}")
    # The current wave is marked only while the rollout can still move.
    assert any(text.startswith("  >") for text in lines) is not show.is_terminal(current)
    assert any(text.startswith("Finished:") for text in lines) is show.is_terminal(current)
    assert any(text.startswith("Deadline:") for text in lines) is not show.is_terminal(current)
    if state == "scheduled":
        assert "Started:    -" in lines
    if show.is_terminal(current):
        tail = f": {reason}" if reason else ""
        assert show.outcome(current) == f"deployment/web rollout 3 {state}{tail}"


def test_empty_lists_and_no_waves_print_no_empty_sections() -> None:
    empty = view(
        waves=[],
        counts=dict(ZERO),
        targeted=0,
        failed_devices=[],
        unknown_devices=[],
        notes=[],
        from_version=None,
        progress_deadline_at=None,
    )
    lines = show.status(empty, NOW)
    assert lines[0] == "deployment/web rollout 3: version 2 (new deployment)"
    assert f"Progress:   [{'.' * show.BAR_WIDTH}] 0 succeeded of 0 devices" in lines
    assert "Devices:    -" in lines
    assert "Waves:      no waves yet" in lines
    assert not [t for t in lines if t.startswith(("Failed", "Unknown", "Notes", "    WAVE"))]


def test_a_view_missing_fields_still_renders() -> None:
    lines = show.status({"state": "running"}, NOW)
    assert lines[0] == "deployment/? rollout ?: version ? (new deployment)"
    assert "Policy:     all-at-once" in lines
    assert show.line({}) == "deployment/? rollout ?: ?, no waves yet: 0 succeeded of 0"


def test_device_lists_are_cut_with_the_count_of_the_rest() -> None:
    failed = [{"device_id": f"f{i:03}", "state": "timed_out", "detail": ""} for i in range(100)]
    unknown = [f"u{i:03}" for i in range(100)]  # the hub caps its lists at 100
    counts = {**ZERO, "failed": 70, "timed_out": 50, "unknown": 150}
    big = view(counts=counts, failed_devices=failed, unknown_devices=unknown)
    lines = show.status(big, NOW, ids=3)
    at = lines.index("Failed devices (120):")
    assert lines[at + 1 : at + 5] == [
        "  f000  timed out",
        "  f001  timed out",
        "  f002  timed out",
        "  … (+117 more)",
    ]
    assert (
        "Unknown devices (150, offline: neither passed nor failed): u000, u001, u002, … (+147 more)"
        in lines
    )
    # 0: every id the hub sent, and still the count of those it did not.
    every = show.status(big, NOW, ids=0)
    assert "  f099  timed out" in every and "  … (+20 more)" in every
    assert any(t.endswith("u099, … (+50 more)") for t in every)


def test_a_long_failure_detail_is_cut() -> None:
    detail = "x" * 500
    lines = show.status(
        view(failed_devices=[{"device_id": "d1", "state": "failed", "detail": detail}]), NOW
    )
    shown = next(t for t in lines if t.startswith("  d1  failed  "))
    assert len(shown) == len("  d1  failed  ") + show.DETAIL_CHARS
    assert shown.endswith("…")


@pytest.mark.parametrize(
    ("counts", "width", "expected"),
    [
        ({"succeeded": 10}, 10, "[##########]"),
        ({"pending": 10}, 10, "[..........]"),
        ({"succeeded": 1, "failed": 1, "unknown": 1, "in_flight": 1}, 8, "[##xx??>>]"),
        # failed counts timed_out; in flight counts soaking; waiting is the rest.
        ({"timed_out": 2, "soaking": 2, "staged": 4}, 8, "[xx>>....]"),
        # one in three: the edges are rounded from cumulative counts, width stays exact.
        ({"succeeded": 1, "failed": 1, "pending": 1}, 10, "[###xxxx...]"),
        ({"succeeded": 1, "pending": 999}, 10, "[..........]"),
        ({}, 5, "[.....]"),
    ],
)
def test_the_bar(counts: dict[str, int], width: int, expected: str) -> None:
    drawn = show.bar(counts, width)
    assert drawn == expected
    assert len(drawn) == width + 2


def test_the_live_frame_redraws_in_place_and_the_line_mode_has_no_escapes() -> None:
    lines = show.status(view(), NOW)
    frame = show.frame(lines, "footer")
    assert frame.startswith(show.HOME) and frame.endswith(show.ERASE_BELOW)
    assert "\x1b[2J" not in frame  # no clear-screen: no flicker
    body = frame.removeprefix(show.HOME).removesuffix(show.ERASE_BELOW).split("\n")
    assert body[-1] == ""
    assert [t.removesuffix(show.ERASE_LINE) for t in body[:-1]] == [*lines, "", "footer"]
    assert all(t.endswith(show.ERASE_LINE) for t in body[:-1])
    assert "\x1b" not in show.line(view()) and "\x1b" not in "\n".join(lines)


def test_new_notes_are_those_not_printed_yet() -> None:
    assert show.fresh_notes([], view()) == list(view()["notes"])
    assert show.fresh_notes(["wave 1 started"], view(notes=["wave 1 started", "paused"])) == [
        "paused"
    ]
    assert show.fresh_notes(["a"], view(notes=[])) == []


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        ({}, "all-at-once"),
        # the hub's canonical form: floats, defaults written out
        (
            {
                "strategy": "canary",
                "canary": {"percent": 5.0},
                "rate": {"per_minute": 100.0, "growth_factor": 2.0, "growth_after": 50},
                "soak": {"seconds": 0.0, "reports": 0},
                "failure_threshold": {"percent": 20.0, "min_reported": 1, "action": "abort"},
                "quorum": {"percent": 80.0, "within_s": 600.0},
                "apply_deadline_s": 600.0,
                "progress_deadline_s": 1800.0,
                "on_progress_deadline": "pause",
                "prestage": False,
            },
            "canary of 5%, pause until promoted, 100/min, abort at 20% failed, "
            "quorum 80% within 10m, apply deadline 10m",
        ),
        (
            {"strategy": "canary", "canary": {"percent": 5}, "pause_s": 600},
            "canary of 5%, pause 10m",
        ),
        (
            {"strategy": "waves", "waves": [10, "25%", "100%"], "pause_s": 60},
            "waves 10, 25%, 100%, pause 60s",
        ),
        (
            {"rate": {"per_minute": 100}, "failure_threshold": {"count": 3, "action": "pause"}},
            "all-at-once, 100/min, pause at 3 failed",
        ),
        (
            {"prestage": True, "activate_at": "2026-12-07T02:00:00Z", "window": "nightly"},
            "all-at-once, prestaged, activate at 2026-12-07T02:00:00Z, window nightly",
        ),
        ({"prestage": True}, "all-at-once, prestaged, activate on promote"),
        ({"soak": {"seconds": 0, "reports": 0}}, "all-at-once"),
    ],
)
def test_the_policy_in_one_line(policy: dict[str, Any], text: str) -> None:
    assert show.policy(policy) == text


def test_prestaged_rollouts_show_how_many_are_staged() -> None:
    lines = show.status(view(staged=12, policy={"prestage": True}), NOW)
    assert "Staged:     12 of 20" in lines
    assert not [t for t in show.status(view(), NOW) if t.startswith("Staged:")]


def test_a_passed_deadline_says_so() -> None:
    policy = {"on_progress_deadline": "abort"}
    lines = show.status(view(progress_deadline_at="2026-12-06T16:45:00+00:00", policy=policy), NOW)
    assert "Deadline:   progress by 2026-12-06T16:45:00+00:00 (passed 10m ago; else abort)" in lines


JOB = {
    "id": "collect-logs-1",
    "command": ["collect-logs", "--since", "1h"],
    "deadline_s": 120.0,
    "env": {},
    "idempotent": True,
    "device_id": None,
    "selector": "env=prod",
    "rollout": {},
    "state": "in_progress",
    "reason": "",
    "created_at": "2026-12-06T16:50:00Z",
    "expires_at": "2026-12-07T16:50:00Z",
    "canceled_at": None,
    "finished_at": None,
    "targeted": 3,
    "counts": {"succeeded": 1, "failed": 1, "queued": 1},
    "devices": [
        {"device_id": "d1", "seq": 1, "state": "succeeded", "exit_code": 0, "message": None},
        {"device_id": "d2", "seq": 1, "state": "failed", "exit_code": 2, "message": "no logs"},
        {"device_id": "d3", "seq": 1, "state": "queued", "exit_code": None, "message": None},
    ],
    "devices_total": 3,
}


def test_jobs_table_and_one_job() -> None:
    table = show.jobs_table([JOB], NOW)
    assert table[0].split() == ["ID", "STATE", "TARGET", "COMMAND", "DEVICES", "AGE"]
    assert table[1].startswith('collect-logs-1   in_progress   selector "env=prod"')
    assert table[1].endswith("3: 1 succeeded, 1 failed, 1 queued   5m")
    lines = show.job(JOB, NOW, ids=2)
    assert lines[:3] == [
        "job/collect-logs-1: in_progress",
        "Command:    collect-logs --since 1h",
        'Target:     selector "env=prod"',
    ]
    assert "Expires:    2026-12-07T16:50:00Z (in 23h)" in lines
    assert lines[-4:] == [
        "Per device:",
        "  d1  succeeded  exit 0",
        "  d2  failed  exit 2; no logs",
        "  … (+1 more)",
    ]
    assert show.job({"device_id": "d9"}, NOW)[2] == "Target:     device d9"


# ---------------------------------------------------------------- the commands


def _problem(status: int, detail: str, **extra: Any) -> httpx.Response:
    titles = {404: "Not Found", 409: "Conflict", 422: "Unprocessable Content"}
    body = {"title": titles.get(status, "Error"), "status": status, "detail": detail, **extra}
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


@dataclass
class FakeHub:
    """The rollout and jobs routes of the contract, in memory: GETs of the rollout answer
    ``views`` in turn (the last one again and again); actions answer ``acted``."""

    views: list[dict[str, Any] | httpx.Response | Exception] = field(
        default_factory=lambda: [view()]
    )
    acted: dict[str, httpx.Response | dict[str, Any]] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=lambda: [JOB])
    requests: list[tuple[str, str, Any]] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t0ken"
        body = json.loads(request.content) if request.content else None
        target = request.url.raw_path.decode()
        self.requests.append((request.method, target, body))
        path = request.url.path
        if path.startswith("/api/v1/jobs"):
            return self._jobs(request, path.removeprefix("/api/v1/jobs"))
        prefix = "/api/v1/deployments/web/rollout"
        if not path.startswith(prefix):
            return _problem(404, "no deployment 'other'")
        action = path.removeprefix(prefix).strip("/")
        if request.method == "GET" and not action:
            answer = self.views.pop(0) if len(self.views) > 1 else self.views[0]
            if isinstance(answer, Exception):
                raise answer
            return (
                answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)
            )
        assert request.method == "POST" and action in commands_actions()
        acted = self.acted.get(action, view())
        return acted if isinstance(acted, httpx.Response) else httpx.Response(200, json=acted)

    def _jobs(self, request: httpx.Request, rest: str) -> httpx.Response:
        if request.method == "GET" and not rest:
            return httpx.Response(200, json={"items": self.jobs})
        job_id = rest.strip("/").removesuffix("/cancel")
        found = [j for j in self.jobs if j["id"] == job_id]
        if not found:
            return _problem(404, f"no job {job_id!r}")
        if request.method == "POST":
            if found[0]["state"] == "succeeded":
                return _problem(409, "the job finished on every device")
            return httpx.Response(200, json={**found[0], "state": "canceled"})
        return httpx.Response(200, json=found[0])

    def sent(self) -> list[tuple[str, str]]:
        return [(method, target) for method, target, _ in self.requests]


def commands_actions() -> tuple[str, ...]:
    return ("pause", "resume", "abort", "promote", "retry-failed")


@dataclass
class Run:
    code: int
    out: str
    err: str
    sleeps: list[float]


def _run(
    hub: FakeHub,
    *argv: str,
    answer: str = "",
    tty: bool = True,
    out_tty: bool = False,
    sleep: Callable[[float], None] | None = None,
) -> Run:
    args = build_parser(list(argv)).parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    console = commands.Console(out, err, io.StringIO(answer), interactive=tty, out_tty=out_tty)
    sleeps: list[float] = []

    def connect() -> HubClient:
        http = httpx.Client(
            transport=httpx.MockTransport(hub.handle),
            base_url="http://hub.test/api/v1",
            headers={"Authorization": "Bearer t0ken"},
        )
        return HubClient(http)

    code = commands.run(
        args, console=console, connect=connect, clock=lambda: NOW, sleep=sleep or sleeps.append
    )
    return Run(code, out.getvalue(), err.getvalue(), sleeps)


ROLLOUT = "/api/v1/deployments/web/rollout"


def test_status_is_one_get_and_the_rendered_view() -> None:
    hub = FakeHub()
    done = _run(hub, "rollout", "status", "web")
    assert done.code == 0, done.err
    assert hub.sent() == [("GET", ROLLOUT)]
    assert done.out.splitlines() == show.status(view(), NOW)


def test_status_json_is_the_hubs_view() -> None:
    done = _run(FakeHub(), "rollout", "status", "web", "--json")
    assert done.code == 0
    assert json.loads(done.out) == view()


def test_status_of_a_deployment_without_a_rollout_is_exit_1_and_says_so() -> None:
    hub = FakeHub(views=[_problem(404, "deployment 'web' has no rollout")])
    done = _run(hub, "rollout", "status", "web")
    assert done.code == 1
    assert done.out == ""
    assert done.err.startswith(
        f"error: GET {ROLLOUT}: 404 deployment/web: no rollout to show: "
        "deployment 'web' has no rollout (no such deployment, or no change of it"
    )


def _progress(
    *steps: tuple[str, int, list[str]],
) -> list[dict[str, Any] | httpx.Response | Exception]:
    """Views of a rollout going through (state, succeeded, notes)."""
    return [
        view(
            state=state,
            counts={**ZERO, "succeeded": succeeded, "pending": 20 - succeeded},
            notes=notes,
        )
        for state, succeeded, notes in steps
    ]


def test_watch_without_a_terminal_prints_a_line_per_change_until_it_succeeds() -> None:
    hub = FakeHub(
        views=_progress(
            ("running", 5, ["wave 1 started"]),
            ("running", 5, ["wave 1 started"]),  # no change: nothing printed
            ("running", 15, ["wave 1 started", "wave 2 started"]),
            ("succeeded", 20, ["wave 1 started", "wave 2 started", "rollout succeeded"]),
        )
    )
    done = _run(hub, "rollout", "status", "web", "--watch", "--interval", "0.5")
    assert done.code == 0, done.err
    assert hub.sent() == [("GET", ROLLOUT)] * 4
    assert done.sleeps == [0.5] * 3
    assert "\x1b" not in done.out
    assert done.out.splitlines() == [
        "deployment/web rollout 3: running, wave 2 of 3: 5 succeeded, 15 waiting of 20",
        "  note: wave 1 started",
        "deployment/web rollout 3: running, wave 2 of 3: 15 succeeded, 5 waiting of 20",
        "  note: wave 2 started",
        "deployment/web rollout 3: succeeded, wave 2 of 3: 20 succeeded of 20",
        "  note: rollout succeeded",
        "deployment/web rollout 3 succeeded",
    ]


@pytest.mark.parametrize("state", ["aborted", "superseded"])
def test_watch_on_a_terminal_redraws_in_place_and_exits_1_when_it_did_not_succeed(
    state: str,
) -> None:
    hub = FakeHub(views=_progress(("running", 5, []), (state, 5, [])))
    done = _run(hub, "rollout", "status", "web", "-w", out_tty=True)
    assert done.code == 1
    assert done.out.count(show.HOME) == 2
    assert done.out.count(show.ERASE_BELOW) == 2
    assert "16:55:00Z  every 2s; Ctrl-C stops watching (the rollout carries on)" in done.out
    assert done.out.endswith(show.ERASE_BELOW + f"deployment/web rollout 3 {state}\n")


def test_watch_of_a_finished_rollout_returns_at_once() -> None:
    hub = FakeHub(views=_progress(("succeeded", 20, [])))
    done = _run(hub, "rollout", "status", "web", "--watch")
    assert done.code == 0
    assert done.sleeps == []


def test_watch_json_prints_each_changed_view_as_one_line() -> None:
    views = _progress(("running", 5, []), ("running", 5, []), ("succeeded", 20, []))
    hub = FakeHub(views=list(views))
    done = _run(hub, "rollout", "status", "web", "--watch", "--json", out_tty=True)
    assert done.code == 0
    assert [json.loads(t) for t in done.out.splitlines()] == [views[0], views[2]]


def test_ctrl_c_stops_the_watch_with_130_and_leaves_the_rollout_alone() -> None:
    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    hub = FakeHub()
    done = _run(hub, "rollout", "status", "web", "--watch", sleep=interrupt)
    assert done.code == commands.EXIT_INTERRUPTED == 130
    assert "stopped watching; the rollout carries on" in done.err
    assert hub.sent() == [("GET", ROLLOUT)]


def test_a_watch_outlives_a_hub_that_cannot_be_reached_for_a_while() -> None:
    down = httpx.ConnectError("connection refused")
    hub = FakeHub(views=[down, down, *_progress(("succeeded", 20, []))])
    done = _run(hub, "rollout", "status", "web", "--watch")
    assert done.code == 0
    assert done.err.count("cannot reach the hub") == 1  # said once per outage
    assert "the hub answers again" in done.err
    assert len(done.sleeps) == 2


def test_a_refusal_during_a_watch_ends_it() -> None:
    hub = FakeHub(views=[*_progress(("running", 5, [])), _problem(404, "gone")])
    done = _run(hub, "rollout", "status", "web", "--watch")
    assert done.code == 1
    assert "404 deployment/web: no rollout to show: gone" in done.err


@pytest.mark.parametrize("action", ["pause", "resume", "promote", "retry-failed"])
def test_each_action_is_one_post_and_prints_the_resulting_view(action: str) -> None:
    after = view(state="paused" if action == "pause" else "running")
    hub = FakeHub(acted={action: after})
    done = _run(hub, "rollout", action, "web", tty=False)
    assert done.code == 0, done.err
    assert hub.requests == [("POST", f"{ROLLOUT}/{action}", None)]
    assert done.out.splitlines() == show.status(after, NOW)
    assert done.err == show.acted(action, after) + "\n"
    assert done.err.startswith("deployment/web rollout 3 ")


def test_a_reason_travels_in_the_body() -> None:
    hub = FakeHub()
    done = _run(hub, "rollout", "pause", "web", "--reason", "looking at pump-0003", "--json")
    assert done.code == 0
    assert hub.requests == [("POST", f"{ROLLOUT}/pause", {"reason": "looking at pump-0003"})]
    assert json.loads(done.out) == view()
    assert done.err == ""


def test_an_action_the_state_does_not_allow_is_exit_1_with_the_hubs_reason() -> None:
    refused = _problem(409, "resume only from paused; the rollout is running")
    hub = FakeHub(acted={"resume": refused})
    done = _run(hub, "rollout", "resume", "web")
    assert done.code == 1
    assert done.out == ""
    assert done.err.strip() == (
        f"error: POST {ROLLOUT}/resume: 409 deployment/web: the rollout's state does not allow "
        "resume: resume only from paused; the rollout is running "
        "(driftless rollout status NAME shows its state)"
    )


def test_a_malformed_request_lists_the_hubs_field_errors() -> None:
    refused = _problem(
        422, "the request is invalid", errors=[{"loc": ["body", "reason"], "msg": "too long"}]
    )
    hub = FakeHub(acted={"pause": refused})
    done = _run(hub, "rollout", "pause", "web")
    assert done.code == 1
    assert "422 deployment/web: the hub refused the pause request as malformed" in done.err
    assert "\n  body.reason: too long" in done.err


def test_abort_without_a_terminal_needs_yes_and_sends_nothing() -> None:
    hub = FakeHub()
    done = _run(hub, "rollout", "abort", "web", tty=False)
    assert done.code == 2
    assert "pass --yes" in done.err and "nothing was changed" in done.err
    assert hub.requests == []


@pytest.mark.parametrize(("answer", "code"), [("n\n", 3), ("\n", 3), ("yes\n", 0)])
def test_abort_asks_on_a_terminal(answer: str, code: int) -> None:
    after = view(state="aborted", reason="aborted by the operator: bad config")
    hub = FakeHub(acted={"abort": after})
    done = _run(hub, "rollout", "abort", "web", "--reason", "bad config", answer=answer)
    assert done.code == code
    assert "Abort it and restore the previous version on every device it touched? [y/N]" in done.err
    assert show.line(view()) in done.err  # what is about to be aborted
    posts = [r for r in hub.requests if r[0] == "POST"]
    if code == 0:
        assert posts == [("POST", f"{ROLLOUT}/abort", {"reason": "bad config"})]
        assert "State:      aborted (aborted by the operator: bad config)" in done.out
        assert "aborted (the previous version is being restored); now aborted" in done.err
    else:
        assert posts == []
        assert "declined: nothing changed" in done.err


def test_abort_with_yes_asks_nothing() -> None:
    hub = FakeHub(acted={"abort": view(state="aborted")})
    done = _run(hub, "rollout", "abort", "web", "--yes", tty=False)
    assert done.code == 0
    assert hub.sent() == [("POST", f"{ROLLOUT}/abort")]


def test_an_action_on_a_deployment_without_a_rollout() -> None:
    hub = FakeHub(acted={"promote": _problem(404, "deployment 'web' has no rollout")})
    done = _run(hub, "rollout", "promote", "web")
    assert done.code == 1
    assert "404 deployment/web: no rollout to promote" in done.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rollout", "status", "Web_1"], "'Web_1' is not a deployment name"),
        (["rollout", "pause", "web", "--reason", "x" * 257], "--reason: at most 256 characters"),
        (["rollout", "status", "web", "--watch", "--interval", "0"], "--interval: at least 0.1"),
        (["jobs", "get", "a b"], "'a b' is not a job id"),
        (["jobs", "list", "--limit", "0"], "--limit: at least 1"),
    ],
)
def test_bad_usage_is_exit_2_before_any_request(argv: list[str], message: str) -> None:
    hub = FakeHub()
    done = _run(hub, *argv)
    assert done.code == 2
    assert message in done.err
    assert hub.requests == []


@pytest.mark.parametrize(
    "argv",
    [
        ["rollout"],
        ["rollout", "status"],
        ["rollout", "rewind", "web"],
        ["jobs", "list", "--state", "x"],
    ],
)
def test_the_parser_refuses_missing_and_unknown_actions(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser(argv).parse_args(argv)
    assert exited.value.code == 2


def test_jobs_list_get_and_cancel() -> None:
    hub = FakeHub()
    listed = _run(hub, "jobs", "list", "--state", "in_progress", "--device", "d2", "--limit", "5")
    assert listed.code == 0
    assert hub.sent() == [("GET", "/api/v1/jobs?limit=5&state=in_progress&device_id=d2")]
    assert listed.out.splitlines() == show.jobs_table([JOB], NOW)

    got = _run(hub, "jobs", "get", "collect-logs-1")
    assert got.code == 0
    assert got.out.splitlines() == show.job(JOB, NOW)

    canceled = _run(hub, "jobs", "cancel", "collect-logs-1", "--reason", "wrong fleet")
    assert canceled.code == 0
    assert hub.requests[-1] == (
        "POST",
        "/api/v1/jobs/collect-logs-1/cancel",
        {"reason": "wrong fleet"},
    )
    assert "job/collect-logs-1 cancel requested; now canceled" in canceled.err
    assert canceled.out.splitlines()[0] == "job/collect-logs-1: canceled"


def test_jobs_refusals_and_an_empty_list() -> None:
    hub = FakeHub(jobs=[{**JOB, "state": "succeeded"}])
    missing = _run(hub, "jobs", "get", "nope")
    assert missing.code == 1
    assert "404 job/nope: no such job: no job 'nope' (driftless jobs list shows the jobs)" in (
        missing.err
    )
    late = _run(hub, "jobs", "cancel", "collect-logs-1")
    assert late.code == 1
    assert "409 job/collect-logs-1: cannot be canceled now: the job finished" in late.err
    empty = _run(FakeHub(jobs=[]), "jobs", "list")
    assert (empty.code, empty.out, empty.err) == (0, "", "no jobs\n")
    as_json = _run(FakeHub(), "jobs", "list", "--json")
    assert json.loads(as_json.out) == {"items": [JOB]}


def test_the_rollout_commands_load_none_of_the_hub_agent_or_web_stack() -> None:
    code = (
        "import sys\n"
        "from driftless.cli import build_parser\n"
        "argv = ['rollout', 'status', 'web', '--watch']\n"
        "assert build_parser(argv).parse_args(argv).command == 'rollout'\n"
        "import ctl.rollouts, ctl.rollout_render\n"
        "others = ('hub', 'edge_agent', 'simulator', 'devtools', 'fastapi', 'sqlmodel',\n"
        "          'sqlalchemy', 'pydantic', 'paho', 'aiomqtt')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(others)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- the files' rollout member


def _deployment_file(tmp_path: Path, rollout: dict[str, Any]) -> str:
    path = tmp_path / "web.yaml"
    document = {
        "apiVersion": "driftless/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"workloads": [{"name": "web", "bundle": "1" * 64}], "rollout": rollout},
    }
    path.write_text(json.dumps(document))
    return str(path)


def test_a_deployment_file_may_carry_the_contracts_rollout_policy(tmp_path: Path) -> None:
    policy = {
        "strategy": "waves",
        "waves": [10, "25%", "100%"],
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
        "start_at": "2026-12-07T01:00:00Z",
        "window": "nightly",
    }
    (loaded,) = documents.load([_deployment_file(tmp_path, policy)], stdin=io.StringIO())
    assert loaded.spec["rollout"] == policy


@pytest.mark.parametrize(
    ("policy", "where", "message"),
    [
        ({"waves": [10, "150%"]}, "$.spec.rollout.waves[1]", 'a percentage such as "25%"'),
        ({"waves": [0]}, "$.spec.rollout.waves[0]", "minimum of 1"),
        ({"waves": [2.5]}, "$.spec.rollout.waves[0]", "is not of type"),
        ({"strategy": "blue-green"}, "$.spec.rollout.strategy", "blue-green"),
        ({"canary": {"count": 0}}, "$.spec.rollout.canary.count", "minimum of 1"),
        ({"soak": {"minutes": 5}}, "$.spec.rollout.soak", "minutes"),
        (
            {"failure_threshold": {"action": "ignore"}},
            "$.spec.rollout.failure_threshold.action",
            "",
        ),
        ({"window": "Nightly"}, "$.spec.rollout.window", "Nightly"),
    ],
)
def test_a_bad_rollout_policy_is_named_before_anything_is_sent(
    tmp_path: Path, policy: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(DocumentError) as failed:
        documents.load([_deployment_file(tmp_path, policy)], stdin=io.StringIO())
    text = str(failed.value)
    assert where + ":" in text and message in text, text
