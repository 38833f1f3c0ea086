"""The stack behind ``test_orchestration.py``: a real Mosquitto (mutual TLS, the device
ACL), a real hub planning every ``PLACEMENT_INTERVAL_S``, and simulated fleets (the
real agent core per device) on an event loop in a thread of their own.

Rules:
- The devices live in one asyncio loop in a background thread (:class:`FleetLoop`), so
  the tests drive the hub's API synchronously while the fleet keeps running; every
  call into the loop has a deadline.
- One stack serves the whole module: the fleet connects once (~250 TLS sessions), and
  each test works on the devices of its own ``suite`` label, so its deployments touch
  no other test's devices. Tests remove their deployments and heal every device's
  network afterwards (:meth:`Stack.clean_up`).
- A test that must show that something did *not* happen waits for a plan instead of
  sleeping: :meth:`Stack.plan_barrier` registers a probe device that the ``probe``
  deployment targets and waits until the placement controller assigned it, which
  proves a whole-fleet plan ran after the barrier began.
- A raw MQTT peer with the hub's rights records every message under the device tree,
  so a test can read the desired document a device was actually sent.
- Every wait has a deadline and says what it waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from protocols import Channel, Desired, decode
from simulator.fleet import Fleet, FleetConfig, VirtualDevice, device_ids
from tests.integration.test_sim_fleet import Peer, peer_on
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

T = TypeVar("T")

PLACEMENT_INTERVAL_S = 0.5
SEED = 14
DEADLINE_S = 30.0
PROBE = "probe"

# Each test's devices, by their ``suite`` label (240 devices in all, in this order).
SUITES = {"late": 40, "merge": 60, "preview": 60, "placed": 30, "flap": 20, "restart": 30}
MAIN_IDS = device_ids(sum(SUITES.values()), prefix="orch")
LATE_IDS = device_ids(40, prefix="late")
"""Devices registered (and started) only by the test of late devices."""


def labels_of(index: int, suite: str) -> dict[str, str]:
    """The labels of the ``index``-th device of ``suite`` (every main device has
    ``fleet=main``)."""
    labels = {"fleet": "main", "suite": suite}
    if suite == "merge":
        if index % 3 == 0:
            labels["canary"] = "yes"
        if index % 4 == 0:
            labels["own"] = "yes"
    elif suite == "preview":
        labels["tier"] = ("gold", "silver", "bronze")[index % 3]
        labels["zone"] = ("a", "b")[index % 2]
    return labels


def main_fleet() -> list[dict[str, Any]]:
    """The registration bodies of the main fleet, suite by suite."""
    bodies: list[dict[str, Any]] = []
    ids = iter(MAIN_IDS)
    for suite, count in SUITES.items():
        for index in range(count):
            bodies.append({"id": next(ids), "labels": labels_of(index, suite)})
    return bodies


def suite_of(device_id: str) -> str:
    """The ``suite`` label of a device of this module."""
    if device_id in LATE_IDS:
        return "late"
    index = MAIN_IDS.index(device_id)
    for suite, count in SUITES.items():
        if index < count:
            return suite
        index -= count
    raise KeyError(device_id)


def workload(name: str, **config: Any) -> dict[str, Any]:
    """A desired workload entry (no bundle: the simulated devices apply configuration)."""
    return {"name": name, "config": config}


def timestamp(value: str | None) -> float:
    """An API datetime as unix seconds."""
    assert value is not None
    return datetime.fromisoformat(value).timestamp()


def sleep_until(moment: float) -> None:
    """Wait for a moment of a test's own schedule (``time.monotonic``), e.g. a flap."""
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class FleetLoop:
    """An asyncio loop in a daemon thread; the test thread runs coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fleets", daemon=True)
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], *, timeout_s: float = DEADLINE_S) -> T:
        """Run ``work`` on the loop; its result, or TimeoutError past ``timeout_s``."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` in the loop's thread (the devices are not thread-safe)."""

        async def once() -> T:
            return fn()

        return self.run(once(), timeout_s=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Stack:
    """The broker, the hub, the fleets and the recording peer of one test module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = TestBroker(workdir)
        self.hub = HubProcess(workdir / "hub", self.broker)
        self.hub.argv += ["--placement-interval-s", str(PLACEMENT_INTERVAL_S)]
        self.loop = FleetLoop()
        self.fleets: list[Fleet] = []
        self.peer: Peer | None = None
        self._exits = contextlib.AsyncExitStack()
        self._probes = itertools.count()
        self.identities = workdir / "identities"

    # -- lifecycle

    def start(self) -> None:
        """Broker, hub, the main fleet registered and connected, the probe deployment."""
        self.broker.start()
        self.hub.start()
        self.api("post", "/devices/batch", json={"devices": main_fleet()})
        self.broker.pki.sim_identities(self.identities, [*MAIN_IDS, *LATE_IDS])
        self.peer = self.loop.run(self._exits.enter_async_context(peer_on(self.broker)))
        self.start_fleet(MAIN_IDS)
        self.put(PROBE, {"selector": "probe=yes", "workloads": [workload(PROBE)]})

    def start_fleet(self, ids: tuple[str, ...]) -> Fleet:
        """Start simulated devices for ``ids`` (registered already); returns once the hub
        has seen every one of them online with its inventory."""
        config = FleetConfig(
            broker_url=self.broker.url,
            device_ids=ids,
            seed=SEED,
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            identity_dir=self.identities,
        )
        fleet = Fleet(config)
        self.fleets.append(fleet)
        self.loop.run(fleet.start())
        self.loop.run(fleet.wait_connected(timeout_s=DEADLINE_S), timeout_s=DEADLINE_S + 5)
        wanted = set(ids)
        selector = f"suite in ({','.join(sorted({suite_of(i) for i in ids}))})"
        wait_until(
            lambda: (
                wanted
                <= {d["id"] for d in self.listing(selector) if d["online"] and d["inventory"]}
            ),
            timeout_s=DEADLINE_S,
            what=f"the hub to see {len(ids)} devices online with an inventory",
        )
        return fleet

    def close(self) -> None:
        """Everything down, in order; nothing is left running."""
        try:
            for fleet in reversed(self.fleets):
                with contextlib.suppress(Exception):
                    self.loop.run(fleet.stop(), timeout_s=60)
            with contextlib.suppress(Exception):
                self.loop.run(self._exits.aclose(), timeout_s=10)
            self.loop.close()
        finally:
            self.hub.kill()
            self.hub.api.close()
            self.broker.kill()

    def ensure_hub(self) -> None:
        """Start the hub again if a test left it stopped (a failed restart test)."""
        if not self.hub.running():
            self.hub.start()

    def clean_up(self) -> None:
        """After a test: every network back up, every deployment but the probe gone."""
        for fleet in self.fleets:
            self.loop.run(fleet.heal())
        self.ensure_hub()
        for item in self.api("get", "/deployments", params={"limit": 1000})["items"]:
            if item["name"] != PROBE:
                self.api("delete", f"/deployments/{item['name']}")

    # -- the hub's API

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One admin call that must succeed (2xx); its JSON body."""
        response = self.hub.api.request(method.upper(), path, **kwargs)
        assert response.is_success, (
            f"{method.upper()} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def put(self, name: str, spec: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """``PUT /deployments/{name}`` (or its dry run); the answer."""
        answer: dict[str, Any] = self.api(
            "put",
            f"/deployments/{name}",
            params={"dry_run": str(dry_run).lower()},
            json={"spec": spec},
        )
        assert answer["dry_run"] is dry_run
        return answer

    def delete(self, name: str, *, dry_run: bool = False) -> dict[str, Any]:
        answer: dict[str, Any] = self.api(
            "delete", f"/deployments/{name}", params={"dry_run": str(dry_run).lower()}
        )
        return answer

    def status(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api("get", f"/deployments/{name}/status")
        return found

    def instances(self, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.status(name)["instances"]
        return found

    def row(self, device_id: str) -> dict[str, Any]:
        return self.hub.device(device_id)

    def listing(self, selector: str) -> list[dict[str, Any]]:
        """The devices ``selector`` matches, sorted by id."""
        page = self.api("get", "/devices", params={"selector": selector, "limit": 1000})
        assert page["total"] == len(page["items"]), "more devices than one page"
        return sorted(page["items"], key=lambda d: d["id"])

    def rows(self, selector: str) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.listing(selector)}

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The device's orchestration history, oldest first."""
        page = self.api("get", f"/devices/{device_id}/events", params={"limit": 1000})
        return list(reversed(page["items"]))

    # -- the devices

    def sim(self, device_id: str) -> VirtualDevice:
        for fleet in self.fleets:
            if device_id in fleet.devices:
                return fleet.devices[device_id]
        raise KeyError(f"{device_id} is not a simulated device of this stack")

    def applied(self, device_id: str) -> int:
        """The generation the simulated device has applied (its core's state)."""
        return self.sim(device_id).core.state.applied_generation

    def delivered(self, device_id: str) -> Desired | None:
        """The newest desired document the broker delivered for the device."""
        assert self.peer is not None
        seen = [s for s in list(self.peer.seen) if s.device == device_id]
        documents = [
            decode(s.payload, Desired) for s in seen if s.channel == Channel.DESIRED and s.payload
        ]
        return max(documents, key=lambda d: d.generation, default=None)

    def wait_applied(self, ids: Iterable[str]) -> None:
        """Until the hub's document of each device is the one its simulated device has
        applied and reported (``reported_generation == desired_generation``)."""
        wanted = sorted(ids)
        selector = f"suite in ({','.join(sorted({suite_of(d) for d in wanted}))})"
        behind: list[str] = []

        def done() -> bool:
            rows = self.rows(selector)
            behind[:] = [
                d
                for d in wanted
                if not rows[d]["in_sync"] or self.applied(d) != rows[d]["desired_generation"]
            ]
            return not behind

        try:
            wait_until(done, timeout_s=DEADLINE_S, what=f"{len(wanted)} devices to apply")
        except AssertionError:
            raise AssertionError(
                f"{len(behind)} of {len(wanted)} devices did not apply their document: "
                + ", ".join(
                    f"{d} (hub desired {self.row(d)['desired_generation']}, reported "
                    f"{self.row(d)['reported_generation']}; device applied {self.applied(d)})"
                    for d in behind[:5]
                )
            ) from None

    def take_offline(self, device_id: str) -> float:
        """Cut the device's network (the broker sends its Will); returns when the hub
        counts it offline since (``online_changed_at``, unix seconds)."""
        self.loop.call(self.sim(device_id).network_down)
        row = wait_until(
            lambda: None if (r := self.row(device_id))["online"] else r,
            timeout_s=10,
            what=f"the hub to see {device_id} offline",
        )
        assert row is not None
        return timestamp(row["online_changed_at"])

    def bring_back(self, device_id: str) -> None:
        """Restore the device's network; returns when the hub counts it online again."""
        self.loop.call(self.sim(device_id).network_restored)
        wait_until(
            lambda: self.row(device_id)["online"],
            timeout_s=10,
            what=f"the hub to see {device_id} online again",
        )

    def plan_barrier(self) -> None:
        """Returns once the placement controller has planned the whole fleet after this
        call began (see the module rules)."""
        probe = f"probe-{next(self._probes):05d}"
        self.api("post", "/devices", json={"id": probe, "labels": {"probe": "yes"}})
        wait_until(
            lambda: self.row(probe)["contributions"] == {PROBE: f"deployment:{PROBE}"},
            timeout_s=10,
            what=f"the placement controller to assign {probe}",
        )
