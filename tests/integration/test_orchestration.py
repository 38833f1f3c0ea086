"""Fleet orchestration at fleet scale: 240 simulated devices on a real hub and a real Mosquitto.

One stack serves the module (``orchestration_support``): the hub plans every 0.5 s, the
devices run the real agent core over mutual TLS, and each test works on the devices of
its own ``suite`` label. What is checked is what an operator relies on
(docs/orchestration.md): a ``fleet`` deployment reaches devices that come later; layers
merge per workload name (highest priority wins whole, the device's own document is the
base) and a change that leaves a device's merged document as it was bumps nothing; the
preview is, device by device, what the change then does; a ``placed`` instance leaves a
device that stays away past ``lost_after_s`` and does not come back with it, while a
flapping device moves nothing; a hub killed mid-way resumes with the same decisions; and
every matched device that cannot run a deployment says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from simulator.inventory import DeviceInventory
from tests.integration.orchestration_support import (
    LATE_IDS,
    SEED,
    Stack,
    sleep_until,
    workload,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    instance = Stack(tmp_path_factory.mktemp("orchestration"))
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture(autouse=True)
def _clean(stack: Stack) -> Iterator[None]:
    """Each test leaves no deployment of its own and no device cut off."""
    yield
    stack.clean_up()


def by_name(document: dict[str, Any]) -> dict[str, Any]:
    return {w["name"]: w for w in document.get("workloads") or ()}


def generations(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {d: r["desired_generation"] for d, r in rows.items()}


def kinds(events: list[dict[str, Any]], deployment: str) -> list[str]:
    return [e["kind"] for e in events if e["deployment"] == deployment]


# ------------------------------------------------------------------- fleet: late devices


def test_a_fleet_deployment_reaches_devices_that_register_and_come_online_later(
    stack: Stack,
) -> None:
    early = sorted(stack.rows("suite=late"))
    assert len(early) == 40
    answer = stack.put("late-web", {"selector": "suite=late", "workloads": [workload("web", v=1)]})
    assert [d["device_id"] for d in answer["preview"]["devices"]] == early
    stack.wait_applied(early)

    # Registered after the deployment (and never connected): the controller assigns them,
    # their documents wait for them.
    body = {"devices": [{"id": d, "labels": {"suite": "late"}} for d in LATE_IDS]}
    stack.api("post", "/devices/batch", json=body)

    def assigned_while_away() -> bool:
        rows = stack.rows("suite=late")
        return all(
            rows[d]["contributions"] == {"web": "deployment:late-web"} and not rows[d]["online"]
            for d in LATE_IDS
        )

    wait_until(assigned_while_away, timeout_s=10, what="the late devices assigned while away")
    first = LATE_IDS[0]
    row = stack.row(first)
    assert row["desired_config"] == {"workloads": [workload("web", v=1)]}
    assert row["desired_generation"] == 1 and row["assignments"] == ["late-web"]
    (placed,) = stack.events(first)
    assert (placed["kind"], placed["deployment"], placed["detail"]) == (
        "placed",
        "late-web",
        "selected",
    )

    # They come online later and apply what waited for them.
    stack.start_fleet(LATE_IDS)
    stack.wait_applied([*early, *LATE_IDS])
    for device_id in LATE_IDS[::7]:
        delivered = stack.delivered(device_id)
        assert delivered is not None and delivered.generation == 1
        assert delivered.config == {"workloads": [workload("web", v=1)]}
    status = stack.status("late-web")
    assert (status["targeted"], status["placed"], status["in_sync"]) == (80, 80, 80)
    assert (status["unplaceable"], status["failed"], status["offline"]) == (0, 0, 0)


# ------------------------------------------------------------------- layers


OWN: dict[str, Any] = {
    "rate": 5,
    "workloads": [workload("own", o=1), workload("metrics", source="device")],
}
BASE: dict[str, Any] = {
    "selector": "suite=merge",
    "priority": 0,
    "workloads": [workload("web", v=1, threads=4), workload("metrics", interval=10)],
}
CANARY: dict[str, Any] = {
    "selector": "suite=merge,canary=yes",
    "priority": 10,
    "workloads": [workload("web", v=2)],
}


def merged(labels: dict[str, str], base: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The document the merge rules promise for a device of the merge suite, and who
    contributed each workload: own document first, then ``base``, then the canary."""
    document: dict[str, Any] = {}
    chosen: dict[str, tuple[dict[str, Any], str]] = {}
    if labels.get("own") == "yes":
        document["rate"] = OWN["rate"]
        chosen.update({w["name"]: (w, "device") for w in OWN["workloads"]})
    chosen.update({w["name"]: (w, "deployment:merge-base") for w in base["workloads"]})
    if labels.get("canary") == "yes":
        chosen.update({w["name"]: (w, "deployment:merge-canary") for w in CANARY["workloads"]})
    document["workloads"] = [chosen[name][0] for name in sorted(chosen)]
    return document, {name: chosen[name][1] for name in sorted(chosen)}


def test_layered_deployments_merge_per_workload_and_a_no_op_bumps_nothing(stack: Stack) -> None:
    rows = stack.rows("suite=merge")
    ids = sorted(rows)
    canaries = {d for d, r in rows.items() if r["labels"].get("canary") == "yes"}
    owners = {d for d, r in rows.items() if r["labels"].get("own") == "yes"}
    assert (len(ids), len(canaries), len(owners)) == (60, 20, 15)
    stack.api(
        "put",
        "/fleet/desired",
        json={"selector": {"labels": {"suite": "merge", "own": "yes"}}, "config": OWN},
    )
    stack.put("merge-base", BASE)
    stack.put("merge-canary", CANARY)
    stack.wait_applied(ids)

    rows = stack.rows("suite=merge")
    for device_id, row in rows.items():
        document, contributions = merged(row["labels"], BASE)
        assert row["desired_config"] == document, device_id
        assert row["contributions"] == contributions, device_id
        expected_assignments = ["merge-base", "merge-canary"] if device_id in canaries else []
        assert row["assignments"] == (expected_assignments or ["merge-base"])
        # What the device was sent, and applied, is that very document.
        delivered = stack.delivered(device_id)
        assert delivered is not None
        assert (delivered.generation, delivered.config) == (row["desired_generation"], document)
        assert stack.applied(device_id) == row["desired_generation"]
    # Whole entries: the canary's web has none of the base's keys.
    assert by_name(rows[min(canaries)]["desired_config"])["web"] == workload("web", v=2)
    assert by_name(rows[min(owners - canaries)]["desired_config"])["metrics"] == workload(
        "metrics", interval=10
    )
    before = generations(rows)

    # The same spec again: nothing stored, nothing bumped.
    again = stack.put("merge-base", BASE)
    assert again["deployment"]["version"] == 1
    assert again["preview"]["devices"] == [] and again["preview"]["summary"]["changed"] == 0
    # A base entry every canary overrides: only the others change.
    base_v2 = {**BASE, "workloads": [workload("web", v=1, threads=8), BASE["workloads"][1]]}
    changed = stack.put("merge-base", base_v2)
    assert changed["deployment"]["version"] == 2
    listed = changed["preview"]["devices"]
    assert sorted(d["device_id"] for d in listed) == sorted(set(ids) - canaries)
    assert all((d["added"], d["removed"], d["changed"]) == ([], [], ["web"]) for d in listed)
    stack.plan_barrier()  # and the controller, planning after it, bumps nothing more
    rows = stack.rows("suite=merge")
    for device_id, row in rows.items():
        bump = 0 if device_id in canaries else 1
        assert row["desired_generation"] == before[device_id] + bump, device_id
        document, contributions = merged(row["labels"], base_v2)
        assert (row["desired_config"], row["contributions"]) == (document, contributions)
    stack.wait_applied(ids)


# ------------------------------------------------------------------- the preview


def assert_preview_was_done(
    preview: dict[str, Any], before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> None:
    """Each listed device changed exactly as listed (one generation, those workloads);
    every other device did not change at all."""
    listed = {d["device_id"]: d for d in preview["devices"]}
    assert set(listed) <= set(before)
    for device_id, old in before.items():
        new = after[device_id]
        if device_id not in listed:
            assert new["desired_generation"] == old["desired_generation"], device_id
            assert new["desired_config"] == old["desired_config"], device_id
            continue
        shown = listed[device_id]
        assert shown["generation_bump"] is True
        assert new["desired_generation"] == old["desired_generation"] + 1, device_id
        was, now = by_name(old["desired_config"]), by_name(new["desired_config"])
        assert shown["added"] == sorted(now.keys() - was.keys()), device_id
        assert shown["removed"] == sorted(was.keys() - now.keys()), device_id
        assert shown["changed"] == sorted(n for n in was.keys() & now.keys() if was[n] != now[n])
        touched = {*shown["added"], *shown["removed"], *shown["changed"]}
        assert set(shown["before"]) == set(shown["after"]) == touched, device_id
        assert all(shown["before"][n] == was.get(n) for n in touched), device_id
        assert all(shown["after"][n] == now.get(n) for n in touched), device_id
        assert shown["contributions"] == new["contributions"], device_id


def documents(rows: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """What a deployment change may change on a device (not what the device reports)."""
    fields = ("desired_generation", "desired_config", "assignments", "contributions")
    return {d: tuple(r[f] for f in fields) for d, r in rows.items()}


def previewed_then_done(
    stack: Stack, change: str, name: str, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Dry run, check nothing changed, do it, check the preview was what happened."""
    selector = "suite=preview"
    before = stack.rows(selector)
    version = stack.api("get", "/deployments", params={"limit": 1000})["items"]
    dry: dict[str, Any]
    if change == "put":
        assert spec is not None
        dry = stack.put(name, spec, dry_run=True)["preview"]
    else:
        dry = stack.delete(name, dry_run=True)["preview"]
    assert documents(stack.rows(selector)) == documents(before), "a dry run changed devices"
    assert stack.api("get", "/deployments", params={"limit": 1000})["items"] == version
    real = (stack.put(name, spec) if spec is not None else stack.delete(name))["preview"]
    assert real == dry
    assert_preview_was_done(dry, before, stack.rows(selector))
    return dry


def test_the_preview_is_what_the_change_then_does_device_by_device(stack: Stack) -> None:
    ids = sorted(stack.rows("suite=preview"))
    stack.put(
        "pv-base",
        {"selector": "suite=preview", "workloads": [workload("app", v=1), workload("log", v=1)]},
    )
    stack.wait_applied(ids)
    gold = {
        "selector": "suite=preview,tier in (gold,silver),zone=a",
        "priority": 5,
        "workloads": [workload("app", v=2), workload("extra", v=1)],
    }
    created = previewed_then_done(stack, "put", "pv-gold", gold)
    assert created["summary"]["changed"] == 20  # gold and silver of zone a: 2 of 6
    assert all(d["added"] == ["extra"] and d["changed"] == ["app"] for d in created["devices"])

    narrower = {**gold, "selector": "suite=preview,tier=gold", "workloads": [workload("app", v=3)]}
    updated = previewed_then_done(stack, "put", "pv-gold", narrower)
    kinds_of_change = {(tuple(d["added"]), tuple(d["removed"])) for d in updated["devices"]}
    assert kinds_of_change == {((), ("extra",)), ((), ())}
    assert updated["summary"]["changed"] == 30  # every gold device, and silver of zone a

    removed = previewed_then_done(stack, "delete", "pv-base")
    assert removed["summary"]["changed"] == 60
    stack.wait_applied(ids)
    for device_id, row in stack.rows("suite=preview").items():
        expected = [workload("app", v=3)] if row["labels"]["tier"] == "gold" else []
        assert row["desired_config"].get("workloads", []) == expected, device_id


# ------------------------------------------------------------------- failover


def sleep_until_unix(moment: float) -> None:
    """Wait for a moment of the test's own schedule given in unix time (the hub's clock)."""
    sleep_until(time.monotonic() + moment - time.time())


def wait_moved(stack: Stack, name: str, index: int, lost: str) -> dict[str, Any]:
    """The instance once it runs on a device other than ``lost``."""

    def moved() -> dict[str, Any] | None:
        instance = stack.instances(name)[index]
        return instance if instance["device_id"] not in (lost, None) else None

    found = wait_until(moved, timeout_s=20, what=f"{name} instance {index} to leave {lost}")
    assert found is not None
    return found


def placed_spec(selector: str, *, replicas: int, lost_after_s: float) -> dict[str, Any]:
    return {
        "kind": "placed",
        "selector": selector,
        "replicas": replicas,
        "lost_after_s": lost_after_s,
        "reschedule": {"delay_s": 1, "max_delay_s": 4},
        "workloads": [workload("api", v=1)],
    }


def where(instances: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What must not change about instances that did not move."""
    return [
        (i["index"], i["device_id"], i["placed_at"], i["original_device_id"], len(i["history"]))
        for i in instances
    ]


def test_a_placed_instance_leaves_a_lost_device_and_does_not_come_back_with_it(
    stack: Stack,
) -> None:
    ids = sorted(stack.rows("suite=placed"))
    stack.put("placed-api", placed_spec("suite=placed", replicas=3, lost_after_s=2))
    first = stack.instances("placed-api")
    hosts = [i["device_id"] for i in first]
    assert len(set(hosts)) == 3 and set(hosts) <= set(ids)
    stack.wait_applied(ids)
    lost = hosts[0]
    generation = stack.row(lost)["desired_generation"]
    assert "api" in by_name(stack.row(lost)["desired_config"])

    offline_since = stack.take_offline(lost)
    moved = wait_moved(stack, "placed-api", 0, lost)
    target = moved["device_id"]
    assert target in ids and target not in hosts
    move = moved["history"][-1]
    assert (move["from_device"], move["to_device"], move["reason"]) == (lost, target, "lost")
    assert move["at"] >= offline_since + 2.0  # not before lost_after_s of continuous absence
    assert (moved["original_device_id"], moved["attempts"], len(moved["history"])) == (
        hosts[0],
        1,
        2,
    )
    assert where(stack.instances("placed-api")[1:]) == where(first[1:])
    # The lost device's document already lacks the instance (waiting for it); the target has it.
    row = stack.row(lost)
    assert row["desired_generation"] == generation + 1 and not row["online"]
    assert "api" not in by_name(row["desired_config"]) and row["assignments"] == []
    assert kinds(stack.events(lost), "placed-api") == ["placed", "moved"]
    arrived = [e for e in stack.events(target) if e["kind"] == "placed"]
    assert [e["detail"] for e in arrived] == [f"instance 0: from {lost}: lost"]
    stack.wait_applied([target])

    # It returns: it gets the document without the instance and applies it; nothing moves back.
    stack.bring_back(lost)
    stack.wait_applied([lost])
    delivered = stack.delivered(lost)
    assert delivered is not None and delivered.generation == generation + 1
    assert "api" not in by_name(delivered.config)
    stack.plan_barrier()
    after = stack.instances("placed-api")
    assert where(after) == where([moved, *first[1:]])
    assert kinds(stack.events(lost), "placed-api") == ["placed", "moved"]
    status = stack.status("placed-api")
    assert (status["placed"], status["in_sync"], status["offline"]) == (3, 3, 0)


def test_a_device_flapping_every_second_moves_nothing(stack: Stack) -> None:
    lost_after_s = 5.0
    ids = sorted(stack.rows("suite=flap"))
    stack.put("flap-api", placed_spec("suite=flap", replicas=2, lost_after_s=lost_after_s))
    first = stack.instances("flap-api")
    stack.wait_applied(ids)
    flapper = first[0]["device_id"]
    generation = stack.row(flapper)["desired_generation"]

    # Ten cycles of ~0.6 s away and ~0.4 s back: more than lost_after_s away in total,
    # never that long at once. The hub sees every flip.
    away_s, start = 0.0, time.monotonic()
    for cycle in range(10):
        began = start + cycle
        gone_at = time.monotonic()
        stack.take_offline(flapper)
        if cycle == 0:  # the planner notices the absence (and starts counting)
            wait_until(
                lambda: (stack.instances("flap-api")[0]["reason"] or "").startswith(
                    "offline since"
                ),
                timeout_s=3,
                what="the instance to say its device is offline",
            )
        sleep_until(began + 0.6)
        stack.bring_back(flapper)
        away_s += time.monotonic() - gone_at
        sleep_until(began + 1.0)
    assert away_s > lost_after_s

    stack.plan_barrier()
    assert where(stack.instances("flap-api")) == where(first)
    assert all(i["reason"] is None and i["attempts"] == 0 for i in stack.instances("flap-api"))
    assert "moved" not in kinds(stack.events(flapper), "flap-api")
    assert stack.row(flapper)["desired_generation"] == generation
    stack.wait_applied(ids)


# ------------------------------------------------------------------- a hub killed mid-way


def test_a_hub_killed_mid_placement_resumes_with_the_same_decisions(stack: Stack) -> None:
    lost_after_s = 8.0
    ids = sorted(stack.rows("suite=restart"))
    agent_v1 = {"selector": "suite=restart", "workloads": [workload("agent", v=1)]}
    stack.put("restart-agent", agent_v1)
    stack.put("restart-api", placed_spec("suite=restart", replicas=3, lost_after_s=lost_after_s))
    first = stack.instances("restart-api")
    stack.wait_applied(ids)
    lost = first[1]["device_id"]

    # A lost timer runs ...
    offline_since = stack.take_offline(lost)
    wait_until(
        lambda: (stack.instances("restart-api")[1]["reason"] or "").startswith("offline since"),
        timeout_s=5,
        what="the lost timer to start",
    )
    # Three seconds into it (so that a timer restarted with the hub would show) ...
    sleep_until_unix(offline_since + 3.0)
    # ... and a change is committed: the hub dies the instant it answers, before it can
    # have sent the new documents to every device.
    before = stack.rows("suite=restart")
    changed = stack.put("restart-agent", {**agent_v1, "workloads": [workload("agent", v=2)]})
    stack.hub.kill()
    listed = {d["device_id"]: d for d in changed["preview"]["devices"]}
    assert sorted(listed) == ids
    stack.hub.start()
    up_at = time.time()

    # The lost timer counted from the disconnect, not from the restart.
    moved = wait_moved(stack, "restart-api", 1, lost)
    target = moved["device_id"]
    move = moved["history"][-1]
    assert (move["from_device"], move["to_device"], move["reason"]) == (lost, target, "lost")
    due = offline_since + lost_after_s
    assert due <= move["at"] <= max(due, up_at) + 2.5, (
        move["at"] - offline_since,
        up_at - offline_since,
    )
    assert target in ids and target not in {i["device_id"] for i in first}
    assert where([i for i in stack.instances("restart-api") if i["index"] != 1]) == where(
        [first[0], first[2]]
    )
    # Every device holds what the answer said (one bump, the previewed workloads), plus,
    # for the two the instance moved between, that move; nothing else was decided again.
    after = stack.rows("suite=restart")
    for device_id in ids:
        moves = 1 if device_id in (lost, target) else 0
        new, old = after[device_id], before[device_id]
        assert new["desired_generation"] == old["desired_generation"] + 1 + moves, device_id
        if not moves:
            expected = {**by_name(old["desired_config"]), **listed[device_id]["after"]}
            assert by_name(new["desired_config"]) == expected, device_id
            assert new["contributions"] == listed[device_id]["contributions"], device_id
            assert new["assignments"] == old["assignments"], device_id
    assert by_name(after[target]["desired_config"])["api"] == workload("api", v=1)
    # Every device that is online applies it, though the hub may have died before sending.
    stack.wait_applied([d for d in ids if d != lost])
    for device_id in ids:
        if device_id != lost:
            delivered = stack.delivered(device_id)
            assert delivered is not None, device_id
            assert by_name(delivered.config)["agent"] == workload("agent", v=2), device_id

    # The lost device returns to a document with v2 and without the instance; a plan later
    # nothing has moved.
    stack.bring_back(lost)
    stack.wait_applied([lost])
    assert by_name(stack.row(lost)["desired_config"]) == {"agent": workload("agent", v=2)}
    stack.plan_barrier()
    assert where(stack.instances("restart-api")) == where([first[0], moved, first[2]])


# ------------------------------------------------------------------- reasons


def test_devices_that_cannot_run_a_deployment_carry_their_reasons(stack: Stack) -> None:
    main = stack.rows("fleet=main")
    assert len(main) == 240 and all(r["inventory"] for r in main.values())
    before = generations(main)

    nowhere = {
        "selector": "fleet=main",
        "constraints": [{"attribute": "arch", "op": "in", "values": ["s390x"]}],
        "workloads": [workload("mainframe")],
    }
    reason = "constraint not met: arch in (s390x)"
    dry = stack.put("nowhere", nowhere, dry_run=True)["preview"]
    assert dry["devices"] == [] and dry["summary"]["unplaceable"] == 240
    assert {u["device_id"]: u["reasons"] for u in dry["unplaceable"]} == {d: [reason] for d in main}
    assert stack.put("nowhere", nowhere)["preview"] == dry
    status = stack.status("nowhere")
    assert (status["targeted"], status["placed"], status["unplaceable"]) == (240, 0, 240)
    assert status["reasons"] == {reason: 240}

    # Bigger than any simulated device's memory (16 GiB at most).
    too_big = {
        "kind": "placed",
        "selector": "fleet=main",
        "replicas": 2,
        "resources": {"memory_bytes": 32 * 2**30},
        "workloads": [workload("huge")],
    }
    preview = stack.put("too-big", too_big)["preview"]
    assert preview["devices"] == []
    assert {u["device_id"] for u in preview["unplaceable"]} == set(main)
    assert all(u["reasons"] == ["insufficient memory"] for u in preview["unplaceable"])
    status = stack.status("too-big")
    assert status["reasons"] == {"insufficient memory": 240} and status["placed"] == 0
    summary = "no eligible device: 240 selected (240 insufficient memory)"
    assert [(i["device_id"], i["reason"]) for i in status["instances"]] == [(None, summary)] * 2

    # Devices that never reported an inventory fail constraints on it.
    ghosts = [f"ghost-{i}" for i in range(2)]
    stack.api(
        "post",
        "/devices/batch",
        json={"devices": [{"id": g, "labels": {"suite": "ghost"}} for g in ghosts]},
    )
    needs_cpus = {
        "selector": "suite=ghost",
        "constraints": [{"attribute": "inventory.cpu_count", "op": ">=", "value": 2}],
        "workloads": [workload("busy")],
    }
    preview = stack.put("needs-cpus", needs_cpus)["preview"]
    assert preview["unplaceable"] == [
        {"device_id": g, "reasons": ["no inventory yet"]} for g in ghosts
    ]
    assert stack.status("needs-cpus")["reasons"] == {"no inventory yet": 2}

    # A constraint some devices meet: the preview splits the fleet by the simulated hardware.
    x86 = {**nowhere, "constraints": [{"attribute": "arch", "op": "=", "value": "x86_64"}]}
    split = stack.put("x86-only", x86, dry_run=True)["preview"]
    expected = {d for d in main if DeviceInventory(SEED, d).arch == "x86_64"}
    assert 0 < len(expected) < 240
    assert {d["device_id"] for d in split["devices"]} == expected
    assert {u["device_id"]: u["reasons"] for u in split["unplaceable"]} == {
        d: ["constraint not met: arch = x86_64"] for d in set(main) - expected
    }
    stack.plan_barrier()
    assert generations(stack.rows("fleet=main")) == before  # nothing could run anywhere
