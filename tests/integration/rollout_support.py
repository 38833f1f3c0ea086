"""The stack behind ``test_rollouts.py``: a real Mosquitto (mutual TLS), a real hub that
signs documents and serves real signed bundles, and a simulated fleet whose devices
supervise a ``web`` workload with the agent's own runtime core.

Rules:
- One stack serves the module: the fleet connects once, and each test works on the
  devices of its own ``suite`` label through its own deployment, so no test touches
  another's devices.
- The ``web`` versions behave by the profile's per-version overrides: 1.0.0 and 3.0.0
  are good, 2.0.0 turns healthy and then crashes within about a second (it fails a
  soak), 4.0.0 never turns healthy (every device rolls it back).
- Every wait has a deadline and says what it waited for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulator.fleet import Fleet, FleetConfig, device_ids
from simulator.profiles import BehaviourOverride, Profile, WorkloadsSpec
from tests.integration.bundle_support import Keys, upload
from tests.integration.bundle_support import web_bundle as shared_web_bundle
from tests.integration.orchestration_support import FleetLoop
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

SEED = 15
DEADLINE_S = 40.0
HEARTBEAT_S = 1.0
VERSIONS = ("1.0.0", "2.0.0", "3.0.0", "4.0.0")
SUITES = {
    "promote": 30,
    "abort": 30,
    "threshold": 30,
    "offline": 20,
    "restart": 30,
    "window": 15,
    "prestage": 15,
}
IDS = {suite: device_ids(count, prefix=f"ro-{suite}") for suite, count in SUITES.items()}
SLOW_IDS = device_ids(2, prefix="ro-silent")
"""Devices that take every document and never finish applying it (a second fleet)."""


def web_bundle(directory: Path, keys: Keys, version: str) -> Path:
    """The ``web`` bundle of these tests: healthy after 200 ms, restarted after 500 ms."""
    return shared_web_bundle(
        directory, keys, version, min_healthy_ms=200, health_deadline_s=2, restart_delay_ms=500
    )


class RolloutStack:
    """The broker, the hub, the fleets of one test module."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = TestBroker(workdir / "broker")
        self.keys = Keys(workdir / "keys")
        self.hub: HubProcess | None = None
        self.loop = FleetLoop()
        self.fleets: list[Fleet] = []
        self.shas: dict[str, str] = {}

    # -- lifecycle

    def start_hub(self, *, log_level: str | None = None) -> HubProcess:
        """The broker and a hub that signs documents and holds every ``web`` version."""
        self.broker.start()
        hub = HubProcess(self.workdir / "hub", self.broker)
        hub.argv += [
            "--trust-root",
            str(self.keys.root_path),
            "--signing-key",
            str(self.keys.hub_key_path),
            "--rollout-interval-s",
            "0.2",
            "--placement-interval-s",
            "0.5",
        ]
        if log_level is not None:
            hub.argv[hub.argv.index("--log-level") + 1] = log_level
        self.hub = hub
        hub.start()
        wait_until(
            lambda: hub.stats()["bundles"]["mqtt_connected"], what="hub chunk server connected"
        )
        self.shas = {v: upload(hub, web_bundle(self.workdir, self.keys, v)) for v in VERSIONS}
        return hub

    def start(self) -> None:
        self.start_hub()
        every = [d for ids in IDS.values() for d in ids]
        bodies = [{"id": d, "labels": {"suite": suite}} for suite, ids in IDS.items() for d in ids]
        bodies += [{"id": d, "labels": {"suite": "silent"}} for d in SLOW_IDS]
        self.api("post", "/devices/batch", json={"devices": bodies})
        identities = self.broker.pki.sim_identities(
            self.workdir / "identities", [*every, *SLOW_IDS]
        )
        profile = Profile(
            name="rollouts",
            workloads=WorkloadsSpec(
                start_s=0.05,
                start_jitter_s=0.05,
                versions={
                    "2.0.0": BehaviourOverride(mean_time_to_crash_s=0.7),
                    "4.0.0": BehaviourOverride(health_failure_rate=1.0),
                },
                health_timeout_s=10.0,
            ),
        )
        common: dict[str, Any] = {
            "broker_url": self.broker.url,
            "seed": SEED,
            "root_path": self.keys.root_path,
            "identity_dir": identities,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "heartbeat_s": HEARTBEAT_S,
        }
        self.start_fleet(
            FleetConfig.from_profile(
                profile, device_ids=tuple(every), rollback_timeout_s=10.0, **common
            )
        )
        # Never finish an apply: no supervision, an apply that takes an hour.
        self.start_fleet(FleetConfig(device_ids=SLOW_IDS, apply_time_s=3600.0, **common))

    def start_fleet(self, config: FleetConfig) -> Fleet:
        fleet = Fleet(config)
        self.fleets.append(fleet)
        self.loop.run(fleet.start())
        self.loop.run(fleet.wait_connected(timeout_s=DEADLINE_S), timeout_s=DEADLINE_S + 5)
        return fleet

    def close(self) -> None:
        try:
            for fleet in reversed(self.fleets):
                with contextlib.suppress(Exception):
                    self.loop.run(fleet.stop(), timeout_s=60)
            self.loop.close()
        finally:
            if self.hub is not None:
                self.hub.kill()
                self.hub.api.close()
            self.broker.kill()

    # -- the hub's API

    @property
    def hub_(self) -> HubProcess:
        assert self.hub is not None
        return self.hub

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.hub_.api.request(method.upper(), path, **kwargs)
        if response.status_code >= 500:
            raise AssertionError(
                f"{method.upper()} {path}: {response.status_code}; the hub's log:\n"
                + self.hub_.log()[-4000:]
            )
        assert response.is_success, (
            f"{method.upper()} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def put(self, name: str, suite: str, version: str, rollout: dict[str, Any] | None) -> None:
        spec: dict[str, Any] = {
            "selector": f"suite={suite}",
            "workloads": [{"name": "web", "bundle": self.shas[version]}],
        }
        if rollout is not None:
            spec["rollout"] = rollout
        self.api("put", f"/deployments/{name}", json={"spec": spec})

    def rollout(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api("get", f"/deployments/{name}/rollout")
        return found

    def command(self, name: str, action: str) -> Any:
        return self.hub_.api.post(f"/deployments/{name}/rollout/{action}", json={})

    def wait_rollout(
        self,
        name: str,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout_s: float = DEADLINE_S,
    ) -> dict[str, Any]:
        try:
            found: dict[str, Any] = wait_until(
                lambda: view if done(view := self.rollout(name)) else None,
                timeout_s=timeout_s,
                what=f"{name}: {what}",
                interval_s=0.1,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}; the rollout: {self._brief(name)}") from None
        return found

    def _brief(self, name: str) -> str:
        with contextlib.suppress(Exception):
            view = self.rollout(name)
            return f"{view['state']} wave {view['wave']} {view['counts']} {view['notes'][-3:]}"
        return "?"

    def rows(self, suite: str) -> dict[str, dict[str, Any]]:
        page = self.api("get", "/devices", params={"selector": f"suite={suite}", "limit": 1000})
        return {d["id"]: d for d in page["items"]}

    # -- the devices

    def serving(self, device_id: str) -> str | None:
        """The ``web`` version the simulated device serves now (None: nothing)."""

        def read() -> str | None:
            for fleet in self.fleets:
                device = fleet.devices.get(device_id)
                if device is None or device.runtime is None:
                    continue
                serving = device.runtime.serving().get("web")
                return None if serving is None else serving.run.version
            return None

        return self.loop.call(read)

    def wait_serving(self, ids: list[str], version: str) -> None:
        behind: list[str] = []

        def done() -> bool:
            behind[:] = [d for d in ids if self.serving(d) != version]
            return not behind

        wait_until(
            done, timeout_s=DEADLINE_S, what=f"{len(ids)} devices serving {version}: {behind[:5]}"
        )

    def network_down(self, device_id: str) -> None:
        self.loop.call(self._device(device_id).network_down)

    def network_restored(self, device_id: str) -> None:
        self.loop.call(self._device(device_id).network_restored)

    def _device(self, device_id: str) -> Any:
        for fleet in self.fleets:
            if device_id in fleet.devices:
                return fleet.devices[device_id]
        raise KeyError(device_id)
