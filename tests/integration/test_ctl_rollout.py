"""``driftless rollout …`` and ``driftless jobs …`` as an operator runs them: the real console
script as a child process against a real hub (real Mosquitto, mutual TLS) whose devices
are a small simulated fleet (the agent's own core per device).

A change with a canary policy stops after its canary wave waiting for a promote; the
commands show it, refuse what its state does not allow (409), refuse an abort nobody
confirmed, promote it, and watch it to the end (exit 0); a second change is aborted
and a watch of it exits 1. Jobs are listed, shown and canceled.

These need the hub's rollout and jobs APIs (docs/rollouts.md, docs/jobs.md); before
they exist the first rollout request answers 404 and the test says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulator.fleet import Fleet, FleetConfig, device_ids
from tests.integration.orchestration_support import FleetLoop
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration

DRIFTLESS = str(Path(sys.executable).with_name("driftless"))
IDS = device_ids(4, prefix="ctl")
DEADLINE_S = 40.0
CANARY = {
    "strategy": "canary",
    "canary": {"count": 1},  # no pause_s: the canary waits for a promote
    "soak": {"seconds": 0, "reports": 0},
    "apply_deadline_s": 30,
    "progress_deadline_s": 120,
}


@dataclass
class Stack:
    hub: HubProcess
    token_file: Path

    def run(self, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """The console script with the hub's address and token from the environment, no
        terminal on stdin or stdout (as in CI)."""
        env = {
            **os.environ,
            "DRIFTLESS_HUB_URL": self.hub.base_url,
            "DRIFTLESS_TOKEN_FILE": str(self.token_file),
        }
        env.pop("DRIFTLESS_TOKEN", None)
        return subprocess.run(
            [DRIFTLESS, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )

    def put(self, name: str, spec: dict[str, Any]) -> None:
        response = self.hub.api.put(f"/deployments/{name}", json={"spec": spec})
        assert response.is_success, (
            f"PUT /deployments/{name}: {response.status_code} {response.text}"
        )

    def view(self, name: str) -> dict[str, Any]:
        """The rollout view as ``rollout status NAME --json`` prints it."""
        done = self.run("rollout", "status", name, "--json")
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def in_sync(self, version: int) -> bool:
        rows = [self.hub.api.get(f"/devices/{d}").json() for d in IDS]
        return all(
            row["in_sync"]
            and [w.get("config") for w in (row.get("desired_config") or {}).get("workloads", [])]
            == [{"version": version}]
            for row in rows
        )


@pytest.fixture
def stack(broker: TestBroker, tmp_path: Path) -> Iterator[Stack]:
    hub = HubProcess(tmp_path / "hub", broker)
    loop = FleetLoop()
    fleet: Fleet | None = None
    try:
        hub.start()
        bodies = [{"id": d, "labels": {"suite": "ctl"}} for d in IDS]
        hub.api.post("/devices/batch", json={"devices": bodies}).raise_for_status()
        config = FleetConfig(
            broker_url=broker.url,
            device_ids=IDS,
            seed=15,
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            identity_dir=broker.pki.sim_identities(tmp_path / "identities", list(IDS)),
        )
        fleet = Fleet(config)
        loop.run(fleet.start())
        loop.run(fleet.wait_connected(timeout_s=DEADLINE_S), timeout_s=DEADLINE_S + 5)
        token_file = tmp_path / "token"
        token_file.write_text(hub.token + "\n")
        token_file.chmod(0o600)
        yield Stack(hub, token_file)
    finally:
        if fleet is not None:
            loop.run(fleet.stop(), timeout_s=60)
        loop.close()
        hub.kill()
        hub.api.close()


def _spec(version: int, rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": "suite=ctl",
        "workloads": [{"name": "web", "config": {"version": version}}],
    }
    if rollout is not None:
        spec["rollout"] = rollout
    return spec


def test_a_canary_shown_steered_promoted_and_watched_to_the_end(stack: Stack) -> None:
    missing = stack.run("rollout", "status", "nosuch")
    assert missing.returncode == 1
    assert "deployment/nosuch: no rollout to show" in missing.stderr

    stack.put("web", _spec(1))
    wait_until(lambda: stack.in_sync(1), timeout_s=DEADLINE_S, what="version 1 on every device")

    stack.put("web", _spec(2, CANARY))
    first = stack.run("rollout", "status", "web")
    assert first.returncode == 0, (
        "GET /api/v1/deployments/web/rollout did not answer a rollout view "
        f"(is the rollout API there?): {first.stderr}"
    )
    waiting = wait_until(
        lambda: (v := stack.view("web"))["state"] == "waiting_promote" and v,
        timeout_s=DEADLINE_S,
        what="the canary to pass and wait for a promote",
    )
    assert waiting["from_version"] is not None and waiting["to_version"] == 2
    assert waiting["counts"]["succeeded"] == 1

    shown = stack.run("rollout", "status", "web")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"deployment/web rollout {waiting['id']}: version 1 -> 2"
    assert lines[1].startswith("State:      waiting for promote")
    assert (
        "Policy:     canary of 1 device, pause until promoted, abort at 20% failed, "
        "apply deadline 30s"
    ) in lines
    assert "Waves:      wave 1 of 2" in lines
    assert any(t.startswith("Progress:   [") and "1 succeeded" in t for t in lines)

    # What the state does not allow: the hub's 409, named.
    resumed = stack.run("rollout", "resume", "web")
    assert resumed.returncode == 1
    assert "409 deployment/web: the rollout's state does not allow resume" in resumed.stderr

    # No terminal, no --yes: the abort is refused before anything is sent.
    refused = stack.run("rollout", "abort", "web")
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr
    assert stack.view("web")["state"] == "waiting_promote"

    promoted = stack.run("rollout", "promote", "web", "--reason", "canary looks good")
    assert promoted.returncode == 0, promoted.stderr
    assert f"deployment/web rollout {waiting['id']} promoted" in promoted.stderr
    assert promoted.stdout.splitlines()[0] == lines[0]

    watched = stack.run("rollout", "status", "web", "--watch", "--interval", "0.2")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "\x1b" not in watched.stdout  # not a terminal: a line per change
    out = watched.stdout.splitlines()
    assert out[-1] == f"deployment/web rollout {waiting['id']} succeeded"
    assert any(t.endswith("4 succeeded of 4") for t in out)
    assert wait_until(lambda: stack.in_sync(2), timeout_s=DEADLINE_S, what="version 2 everywhere")

    finished = stack.run("rollout", "pause", "web")
    assert finished.returncode == 1
    assert "409 deployment/web: the rollout's state does not allow pause" in finished.stderr

    # A second change, aborted: the watch of it exits 1, and version 2 is restored.
    stack.put("web", _spec(3, CANARY))
    second = wait_until(
        lambda: (v := stack.view("web"))["to_version"] == 3 and v,
        timeout_s=DEADLINE_S,
        what="the second change's rollout",
    )
    aborted = stack.run("rollout", "abort", "web", "--yes", "--reason", "wrong version")
    assert aborted.returncode == 0, aborted.stderr
    assert "State:      aborted" in aborted.stdout
    watch_aborted = stack.run("rollout", "status", "web", "--watch", "--interval", "0.2")
    assert watch_aborted.returncode == 1
    assert watch_aborted.stdout.splitlines()[-1].startswith(
        f"deployment/web rollout {second['id']} aborted"
    )
    wait_until(lambda: stack.in_sync(2), timeout_s=DEADLINE_S, what="version 2 restored")


def test_jobs_listed_shown_and_canceled(stack: Stack) -> None:
    # A device that is registered and never connects: its job stays queued.
    stack.hub.api.post("/devices", json={"id": "ctl-away", "labels": {}}).raise_for_status()
    created = stack.hub.api.post(
        "/jobs",
        json={
            "id": "logs-1",
            "command": ["collect-logs"],
            "deadline_s": 60,
            "device_id": "ctl-away",
        },
    )
    assert created.status_code == 201, f"POST /api/v1/jobs: {created.status_code} {created.text}"

    listed = stack.run("jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0].split() == [
        "ID",
        "STATE",
        "TARGET",
        "COMMAND",
        "DEVICES",
        "AGE",
    ]
    assert any(
        t.startswith("logs-1 ") and "device ctl-away" in t for t in listed.stdout.splitlines()
    )

    got = stack.run("jobs", "get", "logs-1")
    assert got.returncode == 0, got.stderr
    assert "Command:    collect-logs" in got.stdout
    assert "  ctl-away  queued" in got.stdout

    canceled = stack.run("jobs", "cancel", "logs-1", "--reason", "not needed")
    assert canceled.returncode == 0, canceled.stderr
    assert "  ctl-away  canceled" in canceled.stdout

    missing = stack.run("jobs", "get", "nope")
    assert missing.returncode == 1
    assert "404 job/nope: no such job" in missing.stderr
