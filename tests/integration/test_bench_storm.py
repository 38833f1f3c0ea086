"""The reconnect-storm benchmark end to end at a tiny size, so the script cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_sim_bench import processes_naming
from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_storm_bench_runs_a_storm_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "30", "--workers", "2", "--repeats", "1"),
        *("--first-storm-s", "6", "--offline-s", "2.5"),
        *("--deadline-s", "30", "--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("storm", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio storm/baseline (median)" in done.stdout

    result = json.loads(out.read_text())
    (storm,) = result["storms"]
    assert storm["baseline_s"] > 0 and storm["put_before_return_s"] > 0
    # "connected" comes from the workers' snapshots (every 0.2 s), the rest from polls
    assert 0 < storm["connected_s"] <= storm["storm_s"] + 0.5
    assert 0 < storm["online_s"] <= storm["storm_s"]
    assert storm["hub_cpu_s"] > 0
    # Each device: a Will, a status, a birth and a report reached the hub.
    assert storm["hub_received_per_device"] >= 4
    assert storm["device_in_per_device"] >= 1  # the new document
    counters = result["fleet_counters"]
    assert counters["severed"] == 30 and counters["rejected"] == {}
    assert '"hub stopped"' in (workdir / "hub.log").read_text()
    assert processes_naming(str(workdir)) == []
