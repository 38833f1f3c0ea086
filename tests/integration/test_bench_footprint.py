"""The footprint benchmark runs as it measures (small: one agent, a short idle, a 1 MiB bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_footprint_bench_measures_an_enrolled_agent_and_its_floors(tmp_path: Path) -> None:
    out = tmp_path / "footprint.json"
    argv = ["--agents", "1", "--idle-s", "1", "--bundle-mib", "1", "--json", str(out)]
    done = run_bench("footprint", [*argv, "--workdir", str(tmp_path / "w")], timeout_s=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    result = json.loads(out.read_text())
    (agent,) = result["agents"]
    floors = result["floors"]
    # Idle over mutual TLS: at least the TLS client's floor, and cryptography not loaded.
    assert floors["python"]["rss_mib"] < floors["python + paho (ssl)"]["rss_mib"]
    assert floors["python + paho (ssl)"]["rss_mib"] < agent["rss_mib"] < 200
    assert 0 < agent["uss_mib"] <= agent["pss_mib"] <= agent["rss_mib"]
    assert {"paho", "ssl", "edge_agent"} <= set(result["modules_import_ms"])
    assert "cryptography" not in result["modules_import_ms"]
    assert result["module_count"] > 100
    assert 0 <= result["idle_cpu_share"][0] < 0.5
    applied = result["apply"]
    # A verified document loads cryptography: the agent grows, and says so in the figures.
    assert applied["rss_after_document_mib"] > agent["rss_mib"]
    assert len(applied["workload_start_s"]) == 3
    # Healthy takes at least the workloads' own start plus min_healthy, after their spawn.
    floor_s = applied["min_healthy_ms"] / 1000 + applied["median_workload_start_s"]
    assert floor_s < applied["apply_s"] < 120
    assert 0 < applied["first_spawn_after_put_s"] < applied["last_ready_after_put_s"]
    assert applied["bundle_mib"] >= 1 and applied["install_s"] > 0
    assert applied["install_hwm_mib"] >= applied["install_peak_rss_mib"] > 0
