"""The broker cut-off's planner (pure): whom to ask when, the commands sent, what an answer
confirms; and the rule that every controller's planner imports no I/O."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from hub.controllers.cutoff.plan import commands, plan, read_answer


def test_each_device_is_created_then_deleted_which_kicks_it_and_leaves_nothing() -> None:
    sent = json.loads(commands(["pump-1", "pump-2"]))["commands"]
    assert [(c["command"], c["username"]) for c in sent] == [
        ("createClient", "pump-1"),
        ("deleteClient", "pump-1"),
        ("createClient", "pump-2"),
        ("deleteClient", "pump-2"),
    ]
    assert all("password" not in c for c in sent)  # never a way in, not even briefly


def test_an_answer_confirms_each_successful_delete_and_names_failures() -> None:
    answer = read_answer(
        json.dumps(
            {
                "responses": [
                    {"command": "createClient", "error": "Client already exists"},
                    {"command": "deleteClient", "correlationData": "driftless-cutoff:pump-1"},
                    {
                        "command": "deleteClient",
                        "correlationData": "driftless-cutoff:pump-2",
                        "error": "Client not found",
                    },
                    {"command": "deleteClient", "correlationData": "someone-else"},
                    "garbage",
                ]
            }
        ).encode()
    )
    assert answer.cut_off == ["pump-1"]
    assert answer.failed == {"pump-2": "Client not found"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"other": 1}', id="no-responses"),
    ],
)
def test_what_is_not_a_dynsec_response_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="not a dynamic security response"):
        read_answer(payload)


FIRST, MAX = 5.0, 300.0


@pytest.mark.parametrize(
    ("pending", "asked", "now", "pause_s", "ask", "next_pause_s", "wait_s"),
    [
        pytest.param(
            [], {}, 100.0, FIRST, (), FIRST, None, id="nothing-pending-sleeps-until-woken"
        ),
        pytest.param([], {}, 100.0, 80.0, (), FIRST, None, id="nothing-pending-resets-the-pause"),
        pytest.param(["a", "b"], {}, 100.0, FIRST, ("a", "b"), FIRST, FIRST, id="never-asked"),
        pytest.param(
            ["a", "b"], {"a": 99.0}, 100.0, FIRST, ("b",), FIRST, FIRST, id="asked-just-now-waits"
        ),
        pytest.param(
            ["a"],
            {"a": 95.0},
            100.0,
            FIRST,
            ("a",),
            2 * FIRST,
            2 * FIRST,
            id="asked-again-after-a-pause-doubles-it",
        ),
        pytest.param(
            ["a"], {"a": 99.0}, 100.0, FIRST, (), FIRST, FIRST, id="woken-early-changes-nothing"
        ),
        pytest.param(
            ["a"], {"a": 0.0}, 250.0, 200.0, ("a",), MAX, MAX, id="the-pause-stops-growing"
        ),
        pytest.param(
            ["a", "b"],
            {"a": 99.0},
            100.0,
            20.0,
            ("b",),
            20.0,
            20.0,
            id="a-first-ask-keeps-the-pause",
        ),
    ],
)
def test_who_is_asked_when(
    pending: list[str],
    asked: dict[str, float],
    now: float,
    pause_s: float,
    ask: tuple[str, ...],
    next_pause_s: float,
    wait_s: float | None,
) -> None:
    decided = plan(pending, asked, now=now, pause_s=pause_s, first_pause_s=FIRST, max_pause_s=MAX)
    assert (decided.ask, decided.pause_s, decided.wait_s) == (ask, next_pause_s, wait_s)


def test_an_unanswered_device_is_asked_ever_less_often() -> None:
    """The controller looks again after each pause; a broker that never answers gets
    asked at 0, 5, 15, 35, 75 s ... up to every 300 s, never every few seconds."""
    asked: dict[str, float] = {}
    pause_s, now, times = FIRST, 0.0, []
    while now < 1000:
        decided = plan(["a"], asked, now=now, pause_s=pause_s, first_pause_s=FIRST, max_pause_s=MAX)
        if decided.ask:
            times.append(now)
            asked["a"] = now
        pause_s = decided.pause_s
        assert decided.wait_s is not None
        now += decided.wait_s
    assert times == [0.0, 5.0, 15.0, 35.0, 75.0, 155.0, 315.0, 615.0, 915.0]


PLANNERS = sorted((Path(__file__).parents[2] / "hub" / "controllers").glob("*/plan.py"))
BANNED = {
    "aiomqtt", "paho", "asyncio", "socket", "subprocess", "threading", "os", "time",
    "sqlalchemy", "sqlmodel", "fastapi", "hub.db", "hub.mqtt", "hub.context",
}  # fmt: skip


@pytest.mark.parametrize("path", PLANNERS, ids=[p.parent.name for p in PLANNERS])
def test_planners_import_no_io(path: Path) -> None:
    """architecture rule 8: a controller's planner is pure; its imports say so."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            assert not {parts[0], ".".join(parts[:2])} & BANNED, f"{path}: imports {name}"


def test_every_controller_has_a_planner() -> None:
    assert [p.parent.name for p in PLANNERS] == [
        "cutoff",
        "jobs",
        "liveness",
        "placement",
        "rollout",
        "schedules",
    ]
