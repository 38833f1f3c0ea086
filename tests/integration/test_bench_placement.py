"""Issue 14's benchmarks at tiny sizes, so the scripts cannot silently rot: placement
(re-planning a fleet against reading its rows) and a fleet deployment's convergence."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from hub.db import head_revision
from simulator.bench.placement import deployment_specs
from tests.integration.test_sim_bench import processes_naming
from tests.support import run_bench

pytestmark = pytest.mark.integration

PHASES = ("read_s", "plan_s", "noop_run_s", "change_run_s")


def test_placement_bench_plans_a_fleet_on_a_real_hub_database(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "300", "--repeats", "2"),
        *("--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("placement", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio (read + plan) / read (medians)" in done.stdout

    result = json.loads(out.read_text())
    assert result["devices"] == 300 and result["deployments"] == 20
    assert result["command"].startswith("python -m simulator.bench.placement")
    rounds = result["rounds"]
    assert len(rounds) == 2
    for phase in PHASES:
        assert all(r[phase] > 0 for r in rounds)
        assert all(r[phase.replace("_s", "_cpu_s")] > 0 for r in rounds)
        assert result["median"][phase] > 0
    # Both rounds flip the same deployment (v1 -> v2, then back): the same devices change.
    assert rounds[0]["changed_devices"] == rounds[1]["changed_devices"] > 0
    assert result["ratio_read_plus_plan_over_read"] > 1

    fleet = result["fleet"]
    replicas = sum(s.get("replicas", 0) for s in deployment_specs().values())
    assert fleet["instances"] == replicas
    assert 0 < fleet["instances_placed"] <= replicas
    assert fleet["unplaceable"] > 0 and fleet["assignments"] > 0
    assert fleet["changed_at_rest"] == 0  # planning a fleet at rest changes nothing

    # The database is the hub's own (migrated to the newest revision), kept in --workdir.
    with sqlite3.connect(workdir / "hub.db") as db:
        assert db.execute("select version_num from alembic_version").fetchone() == (
            head_revision(),
        )
        assert db.execute("select count(*) from device").fetchone() == (300,)
        assert db.execute("select count(*) from deployment").fetchone() == (20,)


def test_placement_bench_refuses_an_empty_fleet(tmp_path: Path) -> None:
    done = run_bench(
        "placement", ["--devices", "0", "--json", str(tmp_path / "never.json")], timeout_s=60
    )
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert "devices and repeats must be at least 1" in done.stderr
    assert not (tmp_path / "never.json").exists()


def test_converge_bench_via_a_fleet_deployment_runs_end_to_end_and_cleans_up(
    tmp_path: Path,
) -> None:
    out = tmp_path / "deploy-20.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "20", "--repeats", "2", "--via", "deployment", "--deadline-s", "30"),
        *("--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("converge", argv, timeout_s=90)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "via PUT /deployments/bench" in done.stdout
    assert "ratio ours/baseline (median)" in done.stdout

    result = json.loads(out.read_text())
    assert result["via"] == "deployment" and result["devices"] == 20
    assert all(
        r["ours_put_s"] > 0 and r["ours_s"] > 0 and r["baseline_s"] > 0 for r in result["rounds"]
    )
    # Round 1 created the deployment, round 2 changed it: two generations, each applied
    # by every device, none refused.
    assert result["fleet_counters"]["applied"] == {"1": 20, "2": 20}
    assert result["fleet_counters"]["rejected"] == {}
    assert 200 <= result["payload_bytes"] <= 300

    assert '"hub stopped"' in (workdir / "hub.log").read_text()
    assert processes_naming(str(workdir)) == []


def test_converge_bench_refuses_an_unknown_way_to_change(tmp_path: Path) -> None:
    done = run_bench("converge", ["--devices", "5", "--via", "mqtt"], timeout_s=60)
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert "invalid choice: 'mqtt'" in done.stderr
