"""The ingest benchmark end to end at a tiny size, so the script cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_sim_bench import processes_naming
from tests.support import run_bench

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["drain", "live"])
def test_ingest_bench_runs_every_kind_and_cleans_up(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "ingest.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "20", "--messages", "300", "--repeats", "1", "--mode", mode),
        *("--deadline-s", "30", "--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("ingest", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio hub / bare (medians)" in done.stdout

    result = json.loads(out.read_text())
    assert result["mode"] == mode and result["messages"] == 300
    assert set(result["median_msgs_per_s"]) == {"broker", "bare", "hub", "bare_x2", "hub_x2"}
    assert all(rate > 0 for rate in result["median_msgs_per_s"].values())
    assert set(result["ratios"]) >= {"hub_over_bare", "hub_x2_over_hub"}
    # Two hub workers: every report went into the one DB, through one of them.
    received = [s["received"].get("reported", 0) for s in result["hub_stats"]]
    assert len(received) == 2 and sum(received) == 600 and min(received) > 0
    assert result["command"].startswith("python -m simulator.bench.ingest")

    assert all('"hub stopped"' in p.read_text() for p in workdir.glob("hub-*.log"))
    assert processes_naming(str(workdir)) == []
