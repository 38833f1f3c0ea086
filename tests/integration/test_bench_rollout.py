"""Issue 15's rollout benchmark at a tiny size, so the script cannot silently rot: a
deployment change in five waves over a real broker and hub, against bare publish/echo
rounds of the same sizes, and its refusal of a fleet too small for five waves."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.integration.test_sim_bench import processes_naming
from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_rollout_bench_rolls_a_change_out_in_five_waves_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "rollout-50.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "50", "--repeats", "1", "--deadline-s", "30"),
        *("--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("rollout", argv, timeout_s=90)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    for figure in (
        "baseline: 5 bare echo rounds",
        "ours: rollout succeeded",
        "hub CPU seconds (PUT->succeeded)",
        "hub CPU ms per device",
        "wave 4:",
        "ratio ours/baseline (median)",
    ):
        assert figure in done.stdout, done.stdout

    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m simulator.bench.rollout")
    assert result["devices"] == 50 and result["wave_sizes"] == [10, 10, 10, 10, 10]
    (run,) = result["rounds"]
    assert 0 < run["ours_applied_s"] <= run["ours_s"]
    assert run["hub_cpu_s"] > 0 and run["cpu_ms_per_device"] > 0
    waves = run["waves"]
    assert [w["size"] for w in waves] == [10] * 5
    assert all(w["baseline_s"] > 0 for w in waves)
    assert run["baseline_s"] == pytest.approx(sum(w["baseline_s"] for w in waves), abs=1e-3)
    # The waves went out one after the other: each started when the one before was done.
    for before, after in itertools.pairwise(waves):
        assert before["started_s"] <= before["done_s"] <= after["started_s"] + 1e-3
    assert waves[-1]["done_s"] <= run["ours_s"] + 0.5  # the hub's clock against ours
    assert result["ratio_ours_over_baseline"] > 0
    # Version 1 at once, then version 2 in waves: two generations, each applied by all.
    assert result["fleet_counters"]["applied"] == {"1": 50, "2": 50}
    assert result["fleet_counters"]["rejected"] == {}

    assert '"hub stopped"' in (workdir / "hub.log").read_text()
    assert (workdir / "broker" / "persistence" / "mosquitto.db").exists()
    assert processes_naming(str(workdir)) == []


def test_rollout_bench_refuses_a_fleet_too_small_for_five_waves(tmp_path: Path) -> None:
    done = run_bench(
        "rollout", ["--devices", "4", "--json", str(tmp_path / "never.json")], timeout_s=60
    )
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert "devices must be at least 5" in done.stderr
    assert not (tmp_path / "never.json").exists()
