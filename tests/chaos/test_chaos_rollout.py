"""Chaos: two rollouts on a flaky simulated fleet while the hub is SIGKILLed.

On the secure broker, a few hundred simulated devices supervise a ``web`` workload
from real signed bundles (``rollout_chaos``). Both rollouts run at once:

- ``good``: 1.0.0 -> 3.0.0 in waves with ``max_in_flight``, where 5% of 3.0.0's
  starts fail their health check (those devices roll back), under a 20% failure
  threshold that must not trip. It must finish ``succeeded`` with the failures
  counted and the devices that were away listed as unknown.
- ``bad``: 1.0.0 -> 2.0.0, which crashes in the soak: the failure threshold aborts
  it by itself, and every touched device gets its previous document back as a new
  generation -- including devices taken offline right after their hand-out, which
  are still away when the abort happens.

Meanwhile 15% of each suite's devices drop out (network down: the broker sends
their Will) for a few seconds, some of them until the rollouts are over, and the
hub is SIGKILLed and restarted once while the good rollout is in its second wave.
Then every device's network comes back and the checks (the published figures, in
``docs/simulator.md``) are:

- nothing lost: for every device the hub's reported and failed generations equal
  what the simulated device itself recorded; its history is in order; every
  device settled (reported or failed its desired generation); the database is
  consistent;
- every touched device on the new or the restored document: good devices serve
  3.0.0, or 1.0.0 with the new generation failed (they rolled back); bad devices
  that were touched have exactly their previous document, untouched ones their
  old generation; everyone serves 1.0.0;
- no device handed the new version twice: a good device's generation rose by
  exactly one, a touched bad device's by two (the hand-out and the restore);
- the restarted hub moved the rollouts on well within the killed hub's lease.

The normal run uses 300 devices; ``DRIFTLESS_CHAOS_FULL=1`` runs 900.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.rollout_chaos import (
    BAD,
    BASE,
    CRASHY,
    GOOD,
    GOOD_FAILURE_RATE,
    NEW,
    SEED,
    ChaosRolloutStack,
    Dropper,
    dropout_schedule,
)
from tests.support import wait_until

FULL = os.environ.get("DRIFTLESS_CHAOS_FULL") == "1"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600 if FULL else 240)]

SIZES = {GOOD: 600, BAD: 300} if FULL else {GOOD: 200, BAD: 100}
DEADLINE_S = 240.0 if FULL else 90.0  # each wait; the full good rollout takes 70-130 s
DROP_SHARE = 0.15
LATE_SHARE = 0.05  # of the random dropouts' suite: away until the rollouts are over
TARGETED_SHARE = 0.05  # of the bad suite: taken down right after their hand-out
LEASE_S = 30.0  # the hub's rollout_lease_s (default)

GOOD_POLICY: dict[str, Any] = {
    "strategy": "waves",
    "waves": ["10%", "30%"],
    "max_in_flight": 40,
    "soak": {"seconds": 1, "reports": 1},
    "failure_threshold": {"percent": 20, "min_reported": 10, "action": "abort"},
    "apply_deadline_s": 30,
}
BAD_POLICY: dict[str, Any] = {
    "strategy": "waves",
    "waves": ["10%", "30%"],
    "max_in_flight": 20,
    "soak": {"seconds": 3, "reports": 1},
    "failure_threshold": {"percent": 20, "min_reported": 15, "action": "abort"},
    "apply_deadline_s": 30,
}


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRolloutStack]:
    instance = ChaosRolloutStack(tmp_path_factory.mktemp("chaos-rollout"), SIZES)
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


def bundle_of(row: dict[str, Any]) -> str:
    return str(row["desired_config"]["workloads"][0]["bundle"])


def settled(row: dict[str, Any]) -> bool:
    """The device reported its desired generation applied, or failed (rolled back)."""
    desired = row["desired_generation"]
    return bool(row["reported_generation"] == desired or row["failed_generation"] == desired)


def all_rows(stack: ChaosRolloutStack) -> dict[str, dict[str, Any]]:
    return {**stack.rows(GOOD), **stack.rows(BAD)}


def test_rollouts_finish_or_restore_through_dropouts_and_a_hub_kill(
    stack: ChaosRolloutStack,
) -> None:
    every = [d for ids in stack.ids.values() for d in ids]
    good_ids, bad_ids = stack.ids[GOOD], stack.ids[BAD]
    for suite in (GOOD, BAD):
        stack.put(suite, suite, BASE, None)

    def on_base() -> dict[str, dict[str, Any]] | None:
        rows = all_rows(stack)
        done = all(rows[d]["in_sync"] for d in every)
        return rows if done and set(stack.serving_all().values()) == {BASE} else None

    before = wait_until(
        on_base,
        timeout_s=DEADLINE_S,
        interval_s=0.5,
        what=f"every device serving {BASE}",
    )

    rng = random.Random(SEED)
    drops = [
        drop
        for suite in (GOOD, BAD)
        for drop in dropout_schedule(
            stack.ids[suite],
            share=DROP_SHARE,
            late_share=LATE_SHARE,
            within_s=8.0,
            offline_s=(1.0, 6.0),
            rng=rng,
        )
    ]
    dropper = Dropper(stack, drops)
    targeted: list[str] = []  # bad devices taken down right after their hand-out
    wanted = max(3, round(SIZES[BAD] * TARGETED_SHARE))
    finished: dict[str, float] = {}  # seconds from the change to the rollout's end
    views: dict[str, dict[str, Any]] = {}
    hub: dict[str, Any] = {}  # when the restarted hub was up, the counts then, when they moved

    start = time.monotonic()
    stack.put(BAD, BAD, CRASHY, BAD_POLICY)
    stack.put(GOOD, GOOD, NEW, GOOD_POLICY)
    dropper.start()

    def progress() -> bool:
        for suite in (GOOD, BAD):
            views[suite] = stack.rollout(suite)
            if views[suite]["finished_at"] is not None:
                finished.setdefault(suite, time.monotonic() - start)
        if views[BAD]["finished_at"] is None and len(targeted) < wanted:
            rows = stack.rows(BAD)
            for d in bad_ids:
                handed = rows[d]["desired_generation"] > before[d]["desired_generation"]
                if handed and d not in targeted and len(targeted) < wanted:
                    stack.network_down(d)  # away from its hand-out until after the abort
                    targeted.append(d)
        if stack.hub_kills == 0 and views[GOOD]["wave"] >= 1:
            hub["killed_s"] = time.monotonic() - start
            stack.kill_hub()
            hub["up_s"] = time.monotonic() - start
        elif "up_s" in hub and "counts" not in hub:
            hub["counts"] = views[GOOD]["counts"]
        elif "counts" in hub and "moved_s" not in hub and views[GOOD]["counts"] != hub["counts"]:
            hub["moved_s"] = time.monotonic() - start
        return len(finished) == 2

    try:
        wait_until(progress, timeout_s=DEADLINE_S, interval_s=0.25, what="both rollouts over")
    except AssertionError as error:
        brief = {s: (v["state"], v["wave"], v["counts"]) for s, v in views.items()}
        raise AssertionError(f"{error}; the rollouts: {brief}") from None
    dropper.wait(timeout_s=30)
    good, bad = views[GOOD], views[BAD]
    away = stack.loop.call(lambda: {d for d, v in stack.fleet.devices.items() if not v.network_up})

    stack.heal_all()

    def back_and_settled() -> dict[str, dict[str, Any]] | None:
        rows = all_rows(stack)
        return rows if all(settled(rows[d]) and rows[d]["online"] for d in every) else None

    rows = wait_until(
        back_and_settled,
        timeout_s=DEADLINE_S,
        interval_s=0.5,
        what="every device back and settled",
    )
    settled_s = time.monotonic() - start
    serving = stack.serving_all()
    states = stack.device_states()
    counters = stack.counters()

    # Every touched device on the new or the restored document, handed out once.
    twice = [
        d for d in good_ids if rows[d]["desired_generation"] != before[d]["desired_generation"] + 1
    ]
    not_new = [d for d in good_ids if bundle_of(rows[d]) != stack.shas[NEW]]
    rolled_back = {
        d for d in good_ids if rows[d]["failed_generation"] == rows[d]["desired_generation"]
    }
    wrong_good = [d for d in good_ids if serving[d] != (BASE if d in rolled_back else NEW)]
    touched = {
        d for d in bad_ids if rows[d]["desired_generation"] != before[d]["desired_generation"]
    }
    not_restored = [
        d
        for d in touched
        if rows[d]["desired_generation"] != before[d]["desired_generation"] + 2
        or rows[d]["desired_config"] != before[d]["desired_config"]
    ]
    wrong_bad = [d for d in bad_ids if serving[d] != BASE or not rows[d]["in_sync"]]

    # Nothing lost: the hub's record of each device is what the device recorded.
    lost = [
        d
        for d in every
        if (rows[d]["reported_generation"], rows[d]["failed_generation"]) != states[d][:2]
    ]
    out_of_order = [d for d in every if states[d][2] != sorted(set(states[d][2]))]
    with sqlite3.connect(stack.hub_.db_path) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        ahead = db.execute(
            "SELECT count(*) FROM device WHERE reported_generation > desired_generation"
        ).fetchone()[0]
    dropped = {drop.device_id for drop in drops} | set(targeted)

    def nonzero(counts: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in counts.items() if v}

    print(
        f"\nchaos rollout: devices={len(every)} (good {len(good_ids)}, bad {len(bad_ids)}) "
        f"dropped={len(dropped)} network_drops={counters['network_drops']} "
        f"away_at_the_end={len(away)} hub_sigkills={stack.hub_kills} "
        f"(killed t+{hub.get('killed_s', 0):.1f} s, up t+{hub.get('up_s', 0):.1f} s, "
        f"rollout moved again t+{hub.get('moved_s', 0):.1f} s)\n"
        f"  good ({GOOD_FAILURE_RATE:.0%} injected): {good['state']} in {finished[GOOD]:.1f} s "
        f"{nonzero(good['counts'])} listed failed={len(good['failed_devices'])} "
        f"unknown={len(good['unknown_devices'])}; rolled back in the end={len(rolled_back)}\n"
        f"  bad: {bad['state']} ({bad['reason']}) in {finished[BAD]:.1f} s "
        f"{nonzero(bad['counts'])} touched={len(touched)} offline_through_abort={len(targeted)}\n"
        f"  all back and settled t+{settled_s:.1f} s: lost={len(lost)} "
        f"out_of_order={len(out_of_order)} handed_twice={len(twice)} not_new={len(not_new)} "
        f"wrong_good={len(wrong_good)} not_restored={len(not_restored)} wrong_bad={len(wrong_bad)}"
    )

    # The good rollout finished; failures counted, the devices that were away listed.
    assert good["state"] == "succeeded", good
    assert good["counts"]["failed"] + good["counts"]["timed_out"] >= 1, (
        "no injected failure showed: the test proves nothing"
    )
    assert good["counts"]["unknown"] >= 1, "no dropout met a hand-out: the test proves nothing"
    assert set(good["unknown_devices"]) <= dropped
    assert {d["device_id"] for d in good["failed_devices"]} <= rolled_back | dropped
    # The bad rollout aborted by itself; the devices away through it came back restored.
    assert bad["state"] == "aborted" and "threshold" in bad["reason"], bad
    assert len(targeted) == wanted and set(targeted) <= touched
    restored_spec = stack.api("get", f"/deployments/{BAD}")["spec"]
    assert restored_spec["workloads"][0]["bundle"] == stack.shas[BASE]
    assert stack.hub_kills == 1 and "moved_s" in hub
    # The restarted hub carries on at once: it does not wait out the lease its killed
    # predecessor held (the lease is the hub's client id on its host, not its process).
    assert hub["moved_s"] - hub["killed_s"] < LEASE_S - 5, hub
    assert counters["network_drops"] >= len(dropped)

    assert twice == [] and not_new == [] and wrong_good == []
    assert not_restored == [] and wrong_bad == []
    untouched = set(bad_ids) - touched
    assert all(rows[d]["desired_generation"] == before[d]["desired_generation"] for d in untouched)
    assert lost == [] and out_of_order == []
    assert integrity == "ok" and ahead == 0
