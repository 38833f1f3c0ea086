"""A simulated fleet supervises its workloads with the agent's own runtime core.

Fifty simulated devices (the real agent core with ``supervises=True``, the
real supervisor machine and transaction, simulated processes) run a workload
from real signed bundles served by a real hub over a real Mosquitto with
mutual TLS. A good version becomes healthy everywhere and is applied; a bad
one (its probes always fail, by the profile's per-version override) rolls
back by itself on every device, which reports ``rolled_back`` and serves the
good version again, and the hub shows that per device; a flaky one (its runs
fail their health checks with probability 0.3) fails on some devices, and
which ones follows from the seed alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.fleet import Fleet, FleetConfig, FleetCounters, device_ids
from simulator.profiles import BehaviourOverride, Profile, WorkloadsSpec, device_rng
from tests.integration.bundle_support import Keys, hub_with_root, upload, web_bundle
from tests.integration.test_sim_fleet import identities
from tests.pki import TestBroker
from tests.support import HubProcess

pytestmark = pytest.mark.integration

DEVICES = 50
SEED = 7
DEADLINE_S = 30.0
LABELS = {"test": "sim-workloads"}
FLAKY_RATE = 0.3
DRAWS_PER_START = 4  # simulator.processes: every start draws exactly four numbers
UNHEALTHY_DRAW = 2  # ... the third decides whether the run's probes fail


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


@pytest.fixture
def hub(tmp_path: Path, broker: TestBroker, keys: Keys) -> Iterator[HubProcess]:
    instance = hub_with_root(tmp_path / "hub", broker, keys)
    try:
        yield instance
    finally:
        instance.close()


def push(hub: HubProcess, sha: str) -> int:
    config = {"workloads": [{"name": "web", "bundle": sha}]}
    response = hub.api.put(
        "/fleet/desired", json={"selector": {"labels": LABELS}, "config": config}
    )
    response.raise_for_status()
    generations = {int(d["generation"]) for d in response.json()["devices"]}
    assert len(generations) == 1, generations
    return generations.pop()


def settled(generation: int) -> Callable[[FleetCounters], bool]:
    def check(c: FleetCounters) -> bool:
        return c.applied.get(generation, 0) + c.failed.get(generation, 0) >= DEVICES

    return check


async def hub_views(hub: HubProcess, ids: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    def read() -> dict[str, dict[str, Any]]:
        return {d: hub.api.get(f"/devices/{d}").json() for d in ids}

    return await asyncio.to_thread(read)


async def hub_eventually(
    hub: HubProcess,
    ids: tuple[str, ...],
    done: Callable[[dict[str, Any]], bool],
    what: str,
) -> dict[str, dict[str, Any]]:
    views: dict[str, dict[str, Any]] = {}
    for _ in range(int(DEADLINE_S / 0.2)):
        views = await hub_views(hub, ids)
        if all(done(v) for v in views.values()):
            return views
        await asyncio.sleep(0.2)
    late = {d: (v["report_phase"], v["workloads"]) for d, v in views.items() if not done(v)}
    raise AssertionError(f"timed out waiting for {what}; not yet: {late}")


def unhealthy_by_seed(device_id: str, start: int, rate: float) -> bool:
    """Pure: whether a device's ``start``-th simulated start (0-based) fails its probes."""
    rng = device_rng(SEED, device_id, "processes")
    draws = [rng.random() for _ in range((start + 1) * DRAWS_PER_START)]
    return draws[start * DRAWS_PER_START + UNHEALTHY_DRAW] < rate


def serving_version(fleet: Fleet, device_id: str) -> str:
    runtime = fleet.devices[device_id].runtime
    serving = runtime.serving()["web"]
    assert runtime.table.alive(serving.instance)
    return serving.run.version


async def test_good_bad_and_flaky_versions_across_a_simulated_fleet(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, keys: Keys
) -> None:
    shas = {v: upload(hub, web_bundle(tmp_path, keys, v)) for v in ("1.0.0", "2.0.0", "3.0.0")}
    ids = device_ids(DEVICES, prefix="wl")
    hub.api.post(
        "/devices/batch", json={"devices": [{"id": d, "labels": LABELS} for d in ids]}
    ).raise_for_status()
    profile = Profile(
        name="good-bad-flaky",
        workloads=WorkloadsSpec(
            start_s=0.05,
            start_jitter_s=0.05,
            versions={
                "2.0.0": BehaviourOverride(health_failure_rate=1.0),
                "web@3.0.0": BehaviourOverride(health_failure_rate=FLAKY_RATE),
            },
            health_timeout_s=10.0,
        ),
    )
    config = FleetConfig.from_profile(
        profile,
        broker_url=broker.url,
        device_ids=ids,
        seed=SEED,
        root_path=keys.root_path,
        identity_dir=identities(broker, tmp_path / "identities", ids),
        rollback_timeout_s=10.0,
    )
    async with Fleet(config) as fleet:
        await fleet.wait_connected(timeout_s=DEADLINE_S)

        # A good version: every device starts it, sees it healthy, commits.
        good = push(hub, shas["1.0.0"])
        await fleet.wait_until(settled(good), timeout_s=DEADLINE_S, what="the good version")
        assert fleet.counters.applied == {good: DEVICES}, fleet.counters.snapshot()
        assert all(serving_version(fleet, d) == "1.0.0" for d in ids)
        views = await hub_eventually(
            hub, ids, lambda v: v["report_phase"] == "applied", "the hub to see it applied"
        )
        assert all(
            [(w["name"], w["state"]) for w in v["workloads"]] == [("web", "healthy")]
            for v in views.values()
        )

        # A bad version: never healthy anywhere, so every device rolls back by itself.
        bad = push(hub, shas["2.0.0"])
        await fleet.wait_until(settled(bad), timeout_s=DEADLINE_S, what="the bad version")
        assert fleet.counters.failed == {bad: DEVICES}, fleet.counters.snapshot()
        assert fleet.counters.applied.get(bad) is None
        assert all(serving_version(fleet, d) == "1.0.0" for d in ids)  # the good one again
        views = await hub_eventually(
            hub, ids, lambda v: v["report_phase"] == "rolled_back", "the hub to see rollbacks"
        )
        for view in views.values():
            assert view["failed_generation"] == bad and view["reported_generation"] == good
            assert [(w["name"], w["state"]) for w in view["workloads"]] == [("web", "rolled_back")]
            assert "web" in view["report_error"] and "not healthy" in view["report_error"]

        # A flaky version: the devices whose run drew a failing health check roll back.
        flaky = push(hub, shas["3.0.0"])
        await fleet.wait_until(settled(flaky), timeout_s=DEADLINE_S, what="the flaky version")
        failed = {d for d in ids if fleet.devices[d].core.state.failed_generation == flaky}
        # Starts so far per device: 1.0.0, 2.0.0, 1.0.0 again (the rollback), now 3.0.0.
        expected = {d for d in ids if unhealthy_by_seed(d, 3, FLAKY_RATE)}
        assert failed == expected
        assert 0 < len(failed) < DEVICES, len(failed)
        counters = fleet.counters
        assert counters.failed[flaky] == len(failed)
        assert counters.applied[flaky] == DEVICES - len(failed)
        assert {d: serving_version(fleet, d) for d in ids} == {
            d: "1.0.0" if d in failed else "3.0.0" for d in ids
        }
        views = await hub_eventually(
            hub,
            ids,
            lambda v: v["report_phase"] == ("rolled_back" if v["id"] in failed else "applied"),
            "the hub to see the flaky outcome",
        )
        assert counters.workloads.start_failures == 0 and counters.workloads.restarts == 0
