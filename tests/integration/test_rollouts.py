"""Staged rollouts on a simulated fleet over a real Mosquitto and a real hub.

Each test changes its own deployment on its own devices (``rollout_support``): a
canary that passes waits for a promote and then reaches everyone; a canary that fails
its soak aborts and every touched device gets its previous document back as a new
generation, and nothing retries the bad version; a failure threshold crossed in the
second wave stops the rollout before the third; offline devices are counted apart,
do not block, and converge when they return; devices that never answer time out; a
hub killed in the middle of a rollout carries on where it was, handing no device out
twice; a closed maintenance window holds the installs while the downloads proceed;
pre-staged devices switch together when promoted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.integration.rollout_support import IDS, SLOW_IDS, RolloutStack
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolloutStack]:
    instance = RolloutStack(tmp_path_factory.mktemp("rollouts"))
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


def baseline(stack: RolloutStack, suite: str) -> dict[str, dict[str, Any]]:
    """The suite's deployment at 1.0.0 everywhere, applied; the device rows then."""
    ids = list(IDS[suite])
    stack.put(suite, suite, "1.0.0", None)
    stack.wait_serving(ids, "1.0.0")
    return wait_until(
        lambda: rows if all((rows := stack.rows(suite))[d]["in_sync"] for d in ids) else None,
        what=f"{suite}: every device in sync on 1.0.0",
    )


def bundle_of(row: dict[str, Any]) -> str:
    return str(row["desired_config"]["workloads"][0]["bundle"])


def test_a_canary_that_passes_waits_for_a_promote_then_reaches_every_device(
    stack: RolloutStack,
) -> None:
    ids = list(IDS["promote"])
    before = baseline(stack, "promote")
    policy = {
        "strategy": "canary",
        "canary": {"count": 3},
        "soak": {"seconds": 1, "reports": 1},
    }
    stack.put("promote", "promote", "3.0.0", policy)

    view = stack.wait_rollout(
        "promote", lambda v: v["state"] == "waiting_promote", "the canary to pass its soak"
    )
    assert view["counts"]["succeeded"] == 3 and view["counts"]["pending"] == len(ids) - 3
    assert view["from_version"] == 1 and view["to_version"] == 2
    rows = stack.rows("promote")
    canary = {d for d in ids if bundle_of(rows[d]) == stack.shas["3.0.0"]}
    assert len(canary) == 3
    untouched = set(ids) - canary
    assert all(rows[d]["desired_generation"] == before[d]["desired_generation"] for d in untouched)
    assert {d for d in ids if stack.serving(d) == "3.0.0"} == canary

    assert stack.command("promote", "promote").status_code == 200
    view = stack.wait_rollout("promote", lambda v: v["state"] == "succeeded", "every wave")
    assert view["counts"]["succeeded"] == len(ids)
    assert view["finished_at"] is not None
    stack.wait_serving(ids, "3.0.0")
    rows = stack.rows("promote")
    # Each device was handed the new version once: one generation each.
    assert all(rows[d]["desired_generation"] == before[d]["desired_generation"] + 1 for d in ids), {
        d: (before[d]["desired_generation"], rows[d]["desired_generation"]) for d in ids
    }
    # A command a finished rollout cannot take is refused, naming why.
    refused = stack.command("promote", "pause")
    assert refused.status_code == 409, refused.text


def test_a_canary_that_fails_its_soak_aborts_and_restores_the_previous_document(
    stack: RolloutStack,
) -> None:
    ids = list(IDS["abort"])
    before = baseline(stack, "abort")
    policy = {
        "strategy": "canary",
        "canary": {"count": 3},
        "soak": {"seconds": 4, "reports": 2},
        "failure_threshold": {"count": 1, "min_reported": 1, "action": "abort"},
    }
    stack.put("abort", "abort", "2.0.0", policy)  # healthy at first, then it crashes

    view = stack.wait_rollout("abort", lambda v: v["state"] == "aborted", "the abort")
    assert "threshold" in view["reason"], view
    assert view["counts"]["failed"] >= 1
    assert view["counts"]["pending"] == len(ids) - 3  # nobody past the canary

    touched = wait_until(
        lambda: (
            t
            if (rows := stack.rows("abort"))
            and (
                t := {
                    d
                    for d in ids
                    if rows[d]["desired_generation"] != before[d]["desired_generation"]
                }
            )
            and all(rows[d]["in_sync"] for d in t)
            else None
        ),
        what="the restore applied on every touched device",
    )
    rows = stack.rows("abort")
    assert len(touched) == 3
    for d in touched:
        # A new generation (the bad one, then the restore), with the old document.
        assert rows[d]["desired_generation"] == before[d]["desired_generation"] + 2
        assert rows[d]["desired_config"] == before[d]["desired_config"]
    stack.wait_serving(ids, "1.0.0")
    deployment = stack.api("get", "/deployments/abort")
    assert deployment["spec"]["workloads"][0]["bundle"] == stack.shas["1.0.0"]
    assert deployment["version"] == 3  # 1.0.0, 2.0.0, the restore

    # Clearing the abort never retries the bad version: nothing resumes an aborted
    # rollout, and the deployment itself is the previous version.
    assert stack.command("abort", "resume").status_code == 409
    assert stack.command("abort", "retry-failed").status_code == 409
    rows = stack.rows("abort")
    assert all(bundle_of(rows[d]) == stack.shas["1.0.0"] for d in ids)


def test_a_failure_threshold_crossed_in_the_second_wave_stops_the_rollout(
    stack: RolloutStack,
) -> None:
    ids = list(IDS["threshold"])
    baseline(stack, "threshold")
    policy = {
        "strategy": "waves",
        "waves": [1, 10],
        "failure_threshold": {"count": 3, "min_reported": 1, "action": "pause"},
        "apply_deadline_s": 30,
    }
    stack.put("threshold", "threshold", "4.0.0", policy)  # never healthy: rolled back

    view = stack.wait_rollout("threshold", lambda v: v["state"] == "paused", "the pause")
    assert view["wave"] == 1, view
    assert "threshold" in view["reason"], view
    assert view["waves"][2]["counts"].get("pending", 0) == view["waves"][2]["size"] == 19
    failed = {d["device_id"] for d in view["failed_devices"]}
    assert len(failed) >= 3
    assert all("web" in d["detail"] for d in view["failed_devices"] if d["detail"])

    # The operator aborts: every touched device is restored.
    assert stack.command("threshold", "abort").status_code == 200
    view = stack.wait_rollout("threshold", lambda v: v["state"] == "aborted", "the abort")
    rows = wait_until(
        lambda: r if all((r := stack.rows("threshold"))[d]["in_sync"] for d in ids) else None,
        what="every device in sync after the abort",
    )
    assert all(bundle_of(rows[d]) == stack.shas["1.0.0"] for d in ids)
    stack.wait_serving(ids, "1.0.0")


def test_offline_devices_are_counted_apart_do_not_block_and_converge_later(
    stack: RolloutStack,
) -> None:
    ids = list(IDS["offline"])
    baseline(stack, "offline")
    away = ids[:4]
    for d in away:
        stack.network_down(d)
    wait_until(
        lambda: not any(stack.rows("offline")[d]["online"] for d in away),
        what="the hub to see four devices offline",
    )
    policy = {"strategy": "waves", "waves": ["25%"], "apply_deadline_s": 5}
    stack.put("offline", "offline", "3.0.0", policy)

    view = stack.wait_rollout("offline", lambda v: v["state"] == "succeeded", "the rollout")
    assert view["counts"]["succeeded"] == len(ids) - len(away)
    assert view["counts"]["unknown"] == len(away)
    assert sorted(view["unknown_devices"]) == sorted(away)
    assert view["counts"]["failed"] == view["counts"]["timed_out"] == 0

    for d in away:
        stack.network_restored(d)
    stack.wait_serving(ids, "3.0.0")


def test_a_device_that_never_answers_times_out(stack: RolloutStack) -> None:
    policy = {"strategy": "all-at-once", "apply_deadline_s": 2}
    stack.put("silent", "silent", "1.0.0", policy)  # a new deployment, rolled out
    view = stack.wait_rollout("silent", lambda v: v["state"] == "aborted", "the timeouts")
    assert view["counts"]["timed_out"] == len(SLOW_IDS), view
    assert view["from_version"] is None
    # Restoring a new deployment means removing it.
    assert stack.hub_.api.get("/deployments/silent").status_code == 404


def test_a_hub_killed_mid_rollout_resumes_where_it_was(stack: RolloutStack) -> None:
    ids = list(IDS["restart"])
    before = baseline(stack, "restart")
    policy = {"strategy": "waves", "waves": [10, 10], "pause_s": 1.0}
    stack.put("restart", "restart", "3.0.0", policy)
    stack.wait_rollout("restart", lambda v: v["wave"] >= 1, "the second wave")

    stack.hub_.kill()
    stack.hub_.start()

    view = stack.wait_rollout("restart", lambda v: v["state"] == "succeeded", "the rollout")
    assert view["counts"]["succeeded"] == len(ids)
    stack.wait_serving(ids, "3.0.0")
    rows = stack.rows("restart")
    assert all(rows[d]["desired_generation"] == before[d]["desired_generation"] + 1 for d in ids), (
        "a device was handed the new version twice"
    )
    assert [w["index"] for w in view["waves"]] == [0, 1, 2]


def handed_out_at(stack: RolloutStack, deployment: str) -> dict[str, str | None]:
    """Each device's hand-out time of the deployment's newest rollout, from the hub's
    database (read-only)."""
    with sqlite3.connect(f"file:{stack.hub_.db_path}?mode=ro", uri=True) as db:
        (rollout_id,) = db.execute(
            "SELECT max(id) FROM rollout WHERE deployment = ?", (deployment,)
        ).fetchone()
        return dict(
            db.execute(
                "SELECT device_id, handed_out_at FROM rollout_device WHERE rollout_id = ?",
                (rollout_id,),
            ).fetchall()
        )


def test_a_closed_window_holds_installs_while_downloads_proceed(stack: RolloutStack) -> None:
    ids = list(IDS["window"])
    baseline(stack, "window")
    minute = (datetime.now(UTC).minute + 30) % 60  # half an hour away: closed now
    closed = {"cron": f"{minute} * * * *", "duration_s": 60, "timezone": "UTC"}
    stack.api("put", "/windows/night", json=closed)
    stack.put("window", "window", "3.0.0", {"strategy": "all-at-once", "window": "night"})

    # Downloads proceed: every device stages the held document; nothing switches.
    view = stack.wait_rollout(
        "window",
        lambda v: v["staged"] == len(ids) and v["counts"]["waiting_window"] == len(ids),
        "every device staged and waiting for its window",
    )
    assert view["state"] == "running"
    assert all(stack.serving(d) == "1.0.0" for d in ids)
    waiting = stack.api(
        "get", f"/rollouts/{view['id']}/devices", params={"state": "waiting_window"}
    )
    assert sorted(d["device_id"] for d in waiting["items"]) == sorted(ids)
    rows = stack.rows("window")
    assert all(rows[d]["desired_config"].get("hold") is True for d in ids)
    assert all(rows[d]["staged_generation"] == rows[d]["desired_generation"] for d in ids)

    # The window opens: the installs go ahead.
    stack.api("put", "/windows/night", json={**closed, "cron": "* * * * *", "duration_s": 3600})
    view = stack.wait_rollout("window", lambda v: v["state"] == "succeeded", "the installs")
    assert view["counts"]["succeeded"] == len(ids)
    stack.wait_serving(ids, "3.0.0")
    assert all("hold" not in stack.rows("window")[d]["desired_config"] for d in ids)


def test_pre_staged_devices_switch_together_on_promote(stack: RolloutStack) -> None:
    ids = list(IDS["prestage"])
    baseline(stack, "prestage")
    stack.put("prestage", "prestage", "3.0.0", {"strategy": "all-at-once", "prestage": True})

    view = stack.wait_rollout(
        "prestage",
        lambda v: v["state"] == "waiting_promote" and v["staged"] == len(ids),
        "every device staged",
    )
    assert view["counts"]["in_flight"] == 0
    assert all(stack.serving(d) == "1.0.0" for d in ids)
    staged_at = set(handed_out_at(stack, "prestage").values())
    assert len(staged_at) == 1  # the held document went out to all at once

    assert stack.command("prestage", "promote").status_code == 200
    view = stack.wait_rollout("prestage", lambda v: v["state"] == "succeeded", "the switch")
    assert view["counts"]["succeeded"] == len(ids)
    stack.wait_serving(ids, "3.0.0")
    # One switch for all: the same instant for every device, after the staging.
    switched_at = set(handed_out_at(stack, "prestage").values())
    assert len(switched_at) == 1 and switched_at != staged_at
