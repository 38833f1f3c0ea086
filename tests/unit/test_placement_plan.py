"""The placement planner (pure): fleet and placed targets, constraints, capacity, spread,
distinct, affinity, every reason, stability, determinism, and failover that does not flap."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from hub.controllers.placement.plan import (
    DECOMMISSIONED,
    DELETED,
    DEVICE_GONE,
    INSUFFICIENT_DISK,
    INSUFFICIENT_MEMORY,
    LOST,
    NEW_INSTANCE,
    NO_INVENTORY,
    NOT_SELECTED,
    OFFLINE,
    SCALED_DOWN,
    SELECTED,
    Plan,
    plan,
)
from hub.deployments.selectors import parse_selector
from hub.deployments.spec import (
    Affinity,
    Constraint,
    DeploymentSpec,
    DeviceFacts,
    Instance,
    Move,
    Reschedule,
    Resources,
    SpecError,
    Spread,
    spec_from_json,
    version_key,
)

MIB = 1 << 20
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def inventory(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "arch": "x86_64", "os": "linux", "cpu_count": 4, "mem_total_bytes": 1024 * MIB,
        "mem_free_bytes": 512 * MIB, "disk_total_bytes": 4096 * MIB, "disk_free_bytes": 0,
        "firmware_slot": None, "firmware_version": None, "cgroups": "v2",
    }  # fmt: skip
    return base | over


def device(device_id: str, /, **over: Any) -> DeviceFacts:
    base: dict[str, Any] = {
        "labels": {}, "online": True, "online_since": T0 - 86400, "offline_since": None,
        "inventory": inventory(), "agent_version": "0.4.0",
    }  # fmt: skip
    return DeviceFacts(device_id, **(base | over))


def fleet(name: str, selector: str = "", **over: Any) -> DeploymentSpec:
    return DeploymentSpec(name, parse_selector(selector), kind="fleet", **over)


def placed(name: str, replicas: int, selector: str = "", **over: Any) -> DeploymentSpec:
    return DeploymentSpec(name, parse_selector(selector), kind="placed", replicas=replicas, **over)


def run(
    devices: Sequence[DeviceFacts],
    deployments: Sequence[DeploymentSpec],
    before: Plan | None = None,
    now: float = T0,
) -> Plan:
    """Plan as the driver does: the previous plan's instances and assignments carried over."""
    return plan(
        devices=devices,
        deployments=deployments,
        instances=before.instances if before else (),
        current={k: frozenset(v) for k, v in before.assignments.items()} if before else {},
        now=now,
    )


def hosts(result: Plan, name: str) -> list[str]:
    return sorted(d for d, names in result.assignments.items() if name in names)


def where(result: Plan, name: str) -> dict[int, str | None]:
    return {i.index: i.device_id for i in result.instances if i.deployment == name}


# -- fleet ----------------------------------------------------------------------------------


def test_a_fleet_deployment_reaches_every_selected_device_and_one_registered_later() -> None:
    devices = [device("a", labels={"env": "prod"}), device("b", labels={"env": "dev"})]
    web = fleet("web", "env=prod")
    first = run(devices, [web])
    assert hosts(first, "web") == ["a"]
    assert [(e.device_id, e.kind, e.detail) for e in first.events] == [("a", "placed", SELECTED)]
    later = run([*devices, device("c", labels={"env": "prod"}, online=False)], [web], first)
    assert hosts(later, "web") == ["a", "c"]  # offline: its document waits for it
    assert [(e.device_id, e.kind) for e in later.events] == [("c", "placed")]


def test_a_fleet_deployment_leaves_a_device_whose_labels_stop_matching() -> None:
    web = fleet("web", "env=prod")
    first = run([device("a", labels={"env": "prod"})], [web])
    second = run([device("a", labels={"env": "dev"})], [web], first)
    assert second.assignments == {"a": ()}
    assert [(e.kind, e.detail) for e in second.events] == [("unplaced", NOT_SELECTED)]
    assert second.unplaceable == {}  # not selected any more: no reason owed


def test_deleted_and_decommissioned_say_so() -> None:
    web, api = fleet("web"), fleet("api")
    first = run([device("a"), device("b")], [web, api])
    second = run([device("a"), device("b", active=False)], [web], first)
    details = {(e.device_id, e.deployment): e.detail for e in second.events}
    assert details == {
        ("a", "api"): DELETED,
        ("b", "api"): DELETED,
        ("b", "web"): DECOMMISSIONED,
    }


# -- constraints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constraint", "facts", "ok"),
    [
        pytest.param(Constraint("arch", "=", "x86_64"), {}, True, id="eq"),
        pytest.param(Constraint("arch", "!=", "x86_64"), {}, False, id="ne"),
        pytest.param(Constraint("arch", "in", values=frozenset({"aarch64"})), {}, False, id="in"),
        pytest.param(
            Constraint("arch", "notin", values=frozenset({"aarch64"})), {}, True, id="notin"
        ),
        pytest.param(
            Constraint("label.site", "exists"), {"labels": {"site": "a"}}, True, id="exists"
        ),
        pytest.param(Constraint("label.site", "exists"), {}, False, id="exists-missing"),
        pytest.param(Constraint("label.site", "!exists"), {}, True, id="not-exists"),
        pytest.param(Constraint("label.site", "!=", "a"), {}, True, id="ne-missing-label"),
        pytest.param(Constraint("label.site", "=", "a"), {}, False, id="eq-missing-label"),
        pytest.param(Constraint("cpu_count", ">=", 4), {}, True, id="ge-number"),
        pytest.param(Constraint("cpu_count", ">", 4), {}, False, id="gt-number"),
        pytest.param(Constraint("cpu_count", "<", 8), {}, True, id="lt-number"),
        pytest.param(Constraint("cpu_count", "<=", 3), {}, False, id="le-number"),
        pytest.param(Constraint("cpu_count", "=", 4), {}, True, id="eq-number-as-text"),
        pytest.param(Constraint("inventory.cgroups", "=", "v2"), {}, True, id="inventory-field"),
        pytest.param(
            Constraint("label.cores", ">=", 2), {"labels": {"cores": "8"}}, True, id="label-number"
        ),
        pytest.param(
            Constraint("label.cores", ">=", 2), {"labels": {"cores": "x"}}, False, id="label-nan"
        ),
        pytest.param(Constraint("agent_version", ">=", "0.4.0"), {}, True, id="version-equal"),
        pytest.param(
            Constraint("agent_version", ">=", "0.10.0"), {}, False, id="version-not-text-order"
        ),
        pytest.param(
            Constraint("agent_version", ">=", "0.4.0"),
            {"agent_version": "0.4.0rc1"},
            False,
            id="version-prerelease-before-release",
        ),
        pytest.param(
            Constraint("agent_version", ">", "0.4"),
            {"agent_version": "v0.4.0.1"},
            True,
            id="version-longer",
        ),
        pytest.param(
            Constraint("agent_version", ">=", "0.1"),
            {"agent_version": None},
            False,
            id="version-unknown",
        ),
    ],
)
def test_each_constraint_op(constraint: Constraint, facts: dict[str, Any], ok: bool) -> None:
    result = run([device("a", **facts)], [fleet("web", constraints=(constraint,))])
    assert hosts(result, "web") == (["a"] if ok else [])
    expected = {} if ok else {"web": {"a": (f"constraint not met: {constraint}",)}}
    assert result.unplaceable == expected


def test_a_device_without_inventory_fails_inventory_constraints_but_not_label_ones() -> None:
    spec = fleet(
        "web",
        constraints=(
            Constraint("arch", "=", "x86_64"),
            Constraint("inventory.cpu_count", ">=", 2),
            Constraint("label.site", "exists"),
        ),
    )
    result = run([device("a", inventory=None, labels={"site": "s"})], [spec])
    assert result.unplaceable == {"web": {"a": (NO_INVENTORY,)}}


def test_versions_compare_as_versions() -> None:
    assert version_key("0.10.0") > version_key("0.9.9")  # type: ignore[operator]
    assert version_key("1.0") == version_key("1")
    assert version_key("1.0rc1") < version_key("1.0")  # type: ignore[operator]
    assert version_key("latest") is None


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        pytest.param(lambda: Constraint("colour", "=", "red"), "unknown attribute", id="attr"),
        pytest.param(lambda: Constraint("arch", "~", "x"), "unknown op", id="op"),  # type: ignore[arg-type]
        pytest.param(lambda: Constraint("arch", "in"), "takes 'values'", id="in-no-values"),
        pytest.param(
            lambda: Constraint("arch", "exists", "x"), "takes no value", id="exists-value"
        ),
        pytest.param(lambda: Constraint("cpu_count", ">", "four"), "needs a number", id="gt-text"),
        pytest.param(
            lambda: Constraint("agent_version", ">=", "new"), "not a version", id="bad-version"
        ),
        pytest.param(
            lambda: Constraint("inventory.gpu", "exists"),
            "unknown attribute",
            id="unknown-inventory-field",
        ),
        pytest.param(lambda: placed("db", 0), "replicas 1..10000", id="no-replicas"),
        pytest.param(lambda: fleet("db", replicas=2), "placed only", id="fleet-replicas"),
        pytest.param(lambda: fleet("Bad_Name"), "name must match", id="name"),
        pytest.param(lambda: fleet("p", priority=1001), "priority", id="priority"),
        pytest.param(lambda: Spread("label.site", {"a": 80, "b": 30}), "add up", id="spread"),
        pytest.param(
            lambda: Affinity(Constraint("arch", "=", "x"), 101), "weight", id="weight-range"
        ),
        pytest.param(lambda: Reschedule(0, 10), "delay_s", id="zero-delay"),
        pytest.param(
            lambda: spec_from_json("x", {"selector": "a in ()"}), "selector:", id="json-selector"
        ),
        pytest.param(
            lambda: spec_from_json("x", {"kind": "placed", "replicas": "many"}),
            "malformed",
            id="json-replicas",
        ),
    ],
)
def test_bad_specs_are_refused_with_the_field_named(build: Any, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        build()


def test_the_json_shape_of_the_contract_converts() -> None:
    spec = spec_from_json(
        "db",
        {
            "selector": "env=prod,region in (eu,us)", "priority": 10, "kind": "placed",
            "replicas": 2, "workloads": [{"name": "web", "bundle": "ab"}],
            "constraints": [
                {"attribute": "arch", "op": "in", "values": ["x86_64", "aarch64"]},
                {"attribute": "agent_version", "op": ">=", "value": "0.4.0"},
                {"attribute": "label.site", "op": "exists"},
                {"attribute": "inventory.cpu_count", "op": ">=", "value": 2},
            ],
            "resources": {"memory_bytes": 64 * MIB, "disk_bytes": 100 * MIB},
            "spread": {"attribute": "label.site", "targets": {"a": 50, "b": 50}},
            "distinct": ["label.site"],
            "affinities": [{"attribute": "label.zone", "op": "=", "value": "z1", "weight": 50}],
            "lost_after_s": 300, "reschedule": {"delay_s": 30, "max_delay_s": 3600},
            "reconcile": "keep_replacement",
        },
    )  # fmt: skip
    assert str(spec.selector) == "env=prod,region in (eu,us)"
    assert [str(c) for c in spec.constraints] == [
        "arch in (aarch64,x86_64)", "agent_version >= 0.4.0", "label.site exists",
        "inventory.cpu_count >= 2",
    ]  # fmt: skip
    assert spec.affinities[0].weight == 50 and spec.replicas == 2


# -- capacity ---------------------------------------------------------------------------------


def test_capacity_goes_to_the_higher_priority_and_what_runs_keeps_its_room() -> None:
    small = [device("a", inventory=inventory(mem_total_bytes=100 * MIB))]
    low = fleet("low", priority=1, resources=Resources(memory_bytes=60 * MIB))
    high = fleet("high", priority=5, resources=Resources(memory_bytes=60 * MIB))
    first = run(small, [low, high])
    assert first.assignments == {"a": ("high",)}
    assert first.unplaceable == {"low": {"a": (INSUFFICIENT_MEMORY,)}}
    # What runs is kept first: a new higher priority does not evict it.
    top = fleet("top", priority=9, resources=Resources(memory_bytes=60 * MIB))
    second = run(small, [low, high, top], first)
    assert second.assignments == {"a": ("high",)}
    assert second.unplaceable["top"] == {"a": (INSUFFICIENT_MEMORY,)}


def test_disk_and_missing_inventory_block_a_request_but_not_a_zero_one() -> None:
    devices = [device("a", inventory=inventory(disk_total_bytes=10)), device("b", inventory=None)]
    result = run(devices, [fleet("big", resources=Resources(disk_bytes=20)), fleet("free")])
    assert hosts(result, "free") == ["a", "b"]
    assert result.unplaceable == {"big": {"a": (INSUFFICIENT_DISK,), "b": (NO_INVENTORY,)}}


def test_placed_and_fleet_share_the_room_of_a_device() -> None:
    devices = [device(f"d{i}", inventory=inventory(mem_total_bytes=100 * MIB)) for i in range(3)]
    daemon = fleet("daemon", priority=10, resources=Resources(memory_bytes=50 * MIB))
    db = placed("db", 2, resources=Resources(memory_bytes=60 * MIB))
    result = run(devices, [daemon, db])
    assert hosts(result, "daemon") == ["d0", "d1", "d2"]
    assert all(d is None for d in where(result, "db").values())
    assert result.unplaceable["db"] == {d: (INSUFFICIENT_MEMORY,) for d in ("d0", "d1", "d2")}
    assert "3 insufficient memory" in (result.instances[0].reason or "")


# -- spread, distinct, affinity ---------------------------------------------------------------


def sites(counts: Mapping[str, int]) -> list[DeviceFacts]:
    return [
        device(f"{site}{i:02d}", labels={"site": site})
        for site, n in counts.items()
        for i in range(n)
    ]


def placed_sites(result: Plan, name: str) -> Counter[str]:
    return Counter((d or "?")[0] for d in where(result, name).values())


def test_spread_follows_its_targets() -> None:
    spec = placed("db", 10, spread=Spread("label.site", {"a": 70, "b": 30}))
    result = run(sites({"a": 10, "b": 10, "c": 10}), [spec])
    assert placed_sites(result, "db") == {"a": 7, "b": 3}


def test_spread_without_targets_is_even_over_the_values_present() -> None:
    spec = placed("db", 9, spread=Spread("label.site"))
    result = run(sites({"a": 10, "b": 10, "c": 10}), [spec])
    assert placed_sites(result, "db") == {"a": 3, "b": 3, "c": 3}


def test_spread_uses_other_values_when_a_target_value_runs_out() -> None:
    spec = placed("db", 4, spread=Spread("label.site", {"a": 100}))
    result = run(sites({"a": 2, "b": 5}), [spec])
    assert placed_sites(result, "db") == {"a": 2, "b": 2}


def test_distinct_allows_one_instance_per_value_and_says_why_the_rest_wait() -> None:
    spec = placed("db", 3, distinct=("label.site",))
    result = run([*sites({"a": 3, "b": 3}), device("nosite")], [spec])
    assert sorted(placed_sites(result, "db").items()) == [("?", 1), ("a", 1), ("b", 1)]
    waiting = [i for i in result.instances if i.device_id is None]
    assert [i.index for i in waiting] == [2]
    assert waiting[0].reason == (
        "no eligible device: 7 selected (2 already running it, 5 taken (distinct or spread))"
    )


def test_affinity_prefers_and_negative_affinity_avoids() -> None:
    devices = [device(f"d{i}", labels={"zone": "z1" if i % 3 == 0 else "z2"}) for i in range(12)]
    near = placed("near", 4, affinities=(Affinity(Constraint("label.zone", "=", "z1"), 50),))
    far = placed("far", 4, affinities=(Affinity(Constraint("label.zone", "=", "z1"), -50),))
    result = run(devices, [near, far])
    zone = {d.id: d.labels["zone"] for d in devices}
    assert {zone[d] for d in where(result, "near").values() if d} == {"z1"}
    assert {zone[d] for d in where(result, "far").values() if d} == {"z2"}


def test_new_instances_prefer_devices_online_for_a_while() -> None:
    devices = [device(f"new{i}", online_since=T0 - 10) for i in range(5)] + [
        device("old", online_since=T0 - 3600)
    ]
    result = run(devices, [placed("db", 1)])
    assert where(result, "db") == {0: "old"}


# -- every reason -----------------------------------------------------------------------------


def test_every_unplaceable_reason_for_a_placed_deployment() -> None:
    devices = [
        device("arm", inventory=inventory(arch="aarch64")),
        device("bare", inventory=None),
        device("away", online=False, offline_since=T0 - 5),
        device("tiny", inventory=inventory(mem_total_bytes=MIB)),
        device("flat", inventory=inventory(disk_total_bytes=1)),
        device("ok"),
        device("gone", active=False),
    ]
    spec = placed(
        "db", 2, constraints=(Constraint("arch", "=", "x86_64"),),
        resources=Resources(memory_bytes=2 * MIB, disk_bytes=2),
    )  # fmt: skip
    result = run(devices, [spec])
    assert result.unplaceable == {
        "db": {
            "arm": ("constraint not met: arch = x86_64",),
            "bare": (NO_INVENTORY,),
            "away": (OFFLINE,),
            "tiny": (INSUFFICIENT_MEMORY,),
            "flat": (INSUFFICIENT_DISK,),
        }
    }
    assert where(result, "db") == {0: "ok", 1: None}
    assert result.instances[1].reason == (
        "no eligible device: 6 selected (1 already running it, 1 constraint not met, "
        "1 insufficient disk, 1 insufficient memory, 1 no inventory yet, 1 offline)"
    )


def test_no_selected_device_says_so_and_a_timer_looks_again() -> None:
    result = run([device("a", labels={"env": "dev"})], [placed("db", 1, "env=prod")])
    (instance,) = result.instances
    assert instance.device_id is None
    assert instance.reason == "no eligible device: no active device is selected"
    assert (instance.attempts, instance.next_attempt_at) == (1, T0 + 30)
    assert result.wake_after_s == 30.0


# -- stability and determinism ----------------------------------------------------------------


def mixed_fleet(n: int) -> list[DeviceFacts]:
    rng = random.Random(7)
    return [
        device(
            f"dev-{i:05d}",
            labels={"site": f"s{i % 7}", "env": "prod" if i % 5 else "dev", "zone": f"z{i % 3}"},
            online=rng.random() > 0.1,
            offline_since=None if i % 10 else T0 - rng.uniform(0, 600),
            inventory=None
            if i % 97 == 0
            else inventory(
                arch="aarch64" if i % 4 == 0 else "x86_64",
                mem_total_bytes=rng.choice((256, 512, 1024)) * MIB,
            ),
        )
        for i in range(n)
    ]


def mixed_deployments(n: int) -> list[DeploymentSpec]:
    out: list[DeploymentSpec] = []
    for i in range(n):
        common: dict[str, Any] = {
            "priority": i % 4 * 10,
            "resources": Resources(memory_bytes=(i % 3) * 40 * MIB),
            "constraints": (Constraint("arch", "=", "x86_64"),) if i % 4 == 0 else (),
        }
        if i % 2:
            out.append(fleet(f"fleet-{i:02d}", "env=prod" if i % 3 else "", **common))
        else:
            out.append(
                placed(
                    f"placed-{i:02d}",
                    5 + i * 10,
                    "env=prod",
                    spread=Spread("label.site") if i % 4 == 0 else None,
                    distinct=("label.zone",) if i == 6 else (),
                    affinities=(Affinity(Constraint("label.zone", "=", "z1"), 30),),
                    **common,
                )
            )
    return out


def test_planning_again_from_the_last_plan_changes_nothing() -> None:
    devices, deployments = mixed_fleet(300), mixed_deployments(8)
    first = run(devices, deployments)
    again = run(devices, deployments, first)
    assert (again.assignments, again.instances, again.unplaceable) == (
        first.assignments, first.instances, first.unplaceable,
    )  # fmt: skip
    assert again.events == ()
    assert again.wake_at == first.wake_at


def test_shuffled_inputs_give_the_same_plan() -> None:
    devices, deployments = mixed_fleet(300), mixed_deployments(8)
    first = run(devices, deployments)
    rng = random.Random(1)
    for _ in range(3):
        shuffled_devices, shuffled_deployments = devices[:], deployments[:]
        rng.shuffle(shuffled_devices)
        rng.shuffle(shuffled_deployments)
        instances = list(first.instances)
        rng.shuffle(instances)
        current = {k: frozenset(v) for k, v in first.assignments.items()}
        assert run(shuffled_devices, shuffled_deployments) == first
        assert plan(
            devices=shuffled_devices, deployments=shuffled_deployments,
            instances=instances, current=current, now=T0,
        ) == run(devices, deployments, first)  # fmt: skip


def test_inputs_given_twice_are_refused() -> None:
    with pytest.raises(ValueError, match="device 'a' given twice"):
        run([device("a"), device("a")], [])
    with pytest.raises(ValueError, match="deployment name is given twice"):
        run([], [fleet("x"), fleet("x")])
    twice = (Instance("db", 0), Instance("db", 0))
    with pytest.raises(ValueError, match="instance db/0 given twice"):
        plan(devices=[], deployments=[placed("db", 1)], instances=twice, current={}, now=T0)


# -- replicas ---------------------------------------------------------------------------------


def test_replicas_up_keeps_the_placed_and_down_removes_the_highest() -> None:
    devices = [device(f"d{i}") for i in range(6)]
    two = run(devices, [placed("db", 2)])
    four = run(devices, [placed("db", 4)], two)
    assert {k: v for k, v in where(four, "db").items() if k < 2} == where(two, "db")
    assert [e.detail for e in four.events] == [f"instance {i}: {NEW_INSTANCE}" for i in (2, 3)]
    one = run(devices, [placed("db", 1)], four)
    assert where(one, "db") == {0: where(two, "db")[0]}
    assert sorted(e.detail for e in one.events) == [
        f"instance {i}: {SCALED_DOWN}" for i in (1, 2, 3)
    ]
    assert len(one.assignments) == 4 and sum(map(len, one.assignments.values())) == 1


def test_scale_down_drops_unplaced_instances_first() -> None:
    three = run([device("a"), device("b")], [placed("db", 3)])
    assert sorted(where(three, "db").values(), key=lambda d: (d is None, str(d))) == [
        "a",
        "b",
        None,
    ]
    two = run([device("a"), device("b")], [placed("db", 2)], three)
    assert sorted(where(two, "db").values(), key=str) == ["a", "b"]
    assert two.events == ()


# -- failover ---------------------------------------------------------------------------------


def offline(device_id: str, since: float, **over: Any) -> DeviceFacts:
    return device(device_id, online=False, offline_since=since, online_since=None, **over)


def test_an_instance_moves_once_its_device_is_lost_and_not_before() -> None:
    spec = placed("db", 1, lost_after_s=300)
    devices = [device("a"), device("b")]
    first = run(devices, [spec])
    home = where(first, "db")[0]
    other = "b" if home == "a" else "a"
    away = [offline(home, T0 + 10), device(other)]
    waiting = run(away, [spec], first, now=T0 + 309)
    assert where(waiting, "db") == {0: home}
    assert waiting.instances[0].reason == f"offline since {when(T0 + 10)}"
    assert waiting.wake_at == T0 + 310 and waiting.wake_after_s == 1.0
    moved = run(away, [spec], waiting, now=T0 + 310)
    assert where(moved, "db") == {0: other}
    instance = moved.instances[0]
    assert instance.original_device_id == home
    assert instance.history[-1].from_device == home and instance.history[-1].reason == LOST
    assert (instance.attempts, instance.next_attempt_at) == (1, T0 + 310 + 30)
    assert [(e.device_id, e.kind) for e in moved.events] == [(home, "moved"), (other, "placed")]
    assert moved.assignments == {home: (), other: ("db",)}


def test_the_returning_device_keeps_nothing_and_nothing_moves_back() -> None:
    spec = placed("db", 1, lost_after_s=60)
    first = run([device("a"), device("b", online_since=T0)], [spec])
    assert where(first, "db") == {0: "a"}  # online longer: settled
    moved = run([offline("a", T0), device("b", online_since=T0)], [spec], first, now=T0 + 60)
    assert where(moved, "db") == {0: "b"}
    back = run([device("a", online_since=T0 + 100), device("b")], [spec], moved, now=T0 + 100)
    assert where(back, "db") == {0: "b"}
    assert back.assignments == {"b": ("db",)}
    assert back.events == ()
    later = run([device("a"), device("b")], [spec], back, now=T0 + 100_000)
    assert where(later, "db") == {0: "b"} and later.events == ()


def test_a_decommissioned_or_unselected_device_loses_its_instance_at_once() -> None:
    spec = placed("db", 1, "env=prod", lost_after_s=3600)
    labels = {"env": "prod"}
    first = run([device("a", labels=labels), device("b", labels=labels, online_since=T0)], [spec])
    assert where(first, "db") == {0: "a"}
    gone = run(
        [device("a", labels=labels, active=False), device("b", labels=labels)], [spec], first,
        now=T0 + 1,
    )  # fmt: skip
    assert where(gone, "db") == {0: "b"}
    assert gone.instances[0].history[-1].reason == DECOMMISSIONED
    assert gone.instances[0].attempts == 0  # not a failure: no backoff
    relabelled = run([device("b", labels={"env": "dev"})], [spec], gone, now=T0 + 2)
    (instance,) = relabelled.instances
    assert instance.device_id is None
    assert instance.history[-1].to_device is None
    assert instance.reason == f"{NOT_SELECTED}; no eligible device: no active device is selected"
    assert [(e.kind, e.detail) for e in relabelled.events] == [
        ("unplaced", f"instance 0: {NOT_SELECTED}")
    ]
    vanished = run([device("c", labels=labels)], [spec], gone, now=T0 + 3)
    assert where(vanished, "db") == {0: "c"}
    assert vanished.instances[0].history[-1].reason == DEVICE_GONE


def test_a_flapping_device_moves_nothing() -> None:
    """Online and offline every few seconds for twenty minutes of simulated time, with
    the controller planning at every change: no move, no event."""
    spec = placed("db", 1, lost_after_s=300)
    last = run([device("a"), device("b")], [spec])
    home = where(last, "db")[0]
    rng = random.Random(3)
    now, up, since = T0, True, T0
    while now < T0 + 1200:
        now += rng.uniform(1, 8)
        up, since = not up, now
        flapper = device(home, online_since=since) if up else offline(home, since)
        others = [device(d) for d in ("a", "b") if d != home]
        last = run([flapper, *others], [spec], last, now=now)
        assert where(last, "db") == {0: home}
        assert last.events == ()
    assert last.instances[0].attempts == 0


def test_backoff_grows_between_moves_and_stops_at_its_cap() -> None:
    """Every device dies soon after it gets the instance: the tries spread out 10, 20,
    40, 80 s and then every 100 s (the cap), and the history keeps every move."""
    spec = placed("db", 1, lost_after_s=5, reschedule=Reschedule(delay_s=10, max_delay_s=100))
    names = [f"d{i}" for i in range(12)]
    dead: dict[str, float] = {}
    last = run([device(n) for n in names], [spec])
    now, moves = T0, []
    for _ in range(400):
        now += 1
        home = where(last, "db")[0]
        assert home is not None
        dead.setdefault(home, now)  # dies one second after it got the instance
        devices = [offline(n, dead[n]) if n in dead else device(n) for n in names]
        last = run(devices, [spec], last, now=now)
        if last.events:
            moves.append(now)
    gaps = [b - a for a, b in itertools.pairwise(moves)]
    assert gaps[:5] == [10, 20, 40, 80, 100]
    assert set(gaps[5:]) == {100}
    instance = last.instances[0]
    assert [m.reason for m in instance.history] == [NEW_INSTANCE] + [LOST] * len(moves)
    assert instance.attempts == len(moves)


def test_a_lost_instance_with_nowhere_to_go_stays_and_tries_again_later() -> None:
    spec = placed("db", 1, lost_after_s=10, reschedule=Reschedule(delay_s=30, max_delay_s=60))
    first = run([device("a")], [spec])
    stuck = run([offline("a", T0)], [spec], first, now=T0 + 10)
    (instance,) = stuck.instances
    assert instance.device_id == "a" and stuck.assignments == {"a": ("db",)}
    assert instance.reason == (
        f"{LOST}; no eligible device: 1 selected (1 offline); next try at {when(T0 + 40)}"
    )
    assert stuck.wake_at == T0 + 40 and stuck.events == ()
    same = run([offline("a", T0)], [spec], stuck, now=T0 + 20)
    assert same.instances == stuck.instances  # not due: nothing changes
    rescued = run([offline("a", T0), device("b")], [spec], same, now=T0 + 40)
    assert where(rescued, "db") == {0: "b"}
    assert rescued.instances[0].attempts == 2


def test_history_survives_many_plans_and_the_original_device_is_remembered() -> None:
    spec = placed("db", 1, lost_after_s=1, reschedule=Reschedule(delay_s=1, max_delay_s=1))
    first = run([device("a"), device("b"), device("c")], [spec])
    order = [where(first, "db")[0]]
    last = first
    for step in range(1, 3):
        devices = [offline(d, T0) if d in order else device(d) for d in "abc"]
        last = run(devices, [spec], last, now=T0 + 10 * step)
        order.append(where(last, "db")[0])
    assert len(set(order)) == 3
    instance = last.instances[0]
    assert instance.original_device_id == order[0]
    assert [(m.from_device, m.to_device) for m in instance.history] == [
        (None, order[0]), (order[0], order[1]), (order[1], order[2]),
    ]  # fmt: skip


def test_a_replacement_avoids_a_device_the_instance_left_before() -> None:
    """Nomad #6212: a replacement should not land back where the instance was lost."""
    spec = placed("db", 1, lost_after_s=1, reschedule=Reschedule(delay_s=1, max_delay_s=1))
    devices = [device(d) for d in "acdefg"] + [offline("b", T0 - 100)]
    baseline = run(devices, [spec])
    favourite = where(baseline, "db")[0]  # the device the hash prefers
    assert favourite is not None
    left = Instance(
        "db", 0, "b", T0 - 200, favourite, (Move(T0 - 200, favourite, "b", LOST),), 1, None
    )
    result = plan(
        devices=devices, deployments=[spec], instances=[left],
        current={"b": frozenset({"db"})}, now=T0,
    )  # fmt: skip
    assert where(result, "db")[0] not in (None, "b", favourite)


# -- scale --------------------------------------------------------------------------------------


def test_ten_thousand_devices_twenty_deployments(capsys: pytest.CaptureFixture[str]) -> None:
    """Correct at scale; the times are printed (run with -s), not asserted."""
    devices, deployments = mixed_fleet(10_000), mixed_deployments(20)
    started = time.perf_counter()
    first = run(devices, deployments)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    again = run(devices, deployments, first)
    warm = time.perf_counter() - started
    assert again.events == () and again.instances == first.instances
    placed_total = sum(1 for i in first.instances if i.device_id)
    with capsys.disabled():
        print(
            f"\nplan 10,000 devices x 20 deployments: first {cold:.3f} s, "
            f"again {warm:.3f} s, {len(first.instances)} instances ({placed_total} placed)"
        )
