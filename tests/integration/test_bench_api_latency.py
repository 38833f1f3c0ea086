"""The API latency benchmark end to end at a tiny size, so the script cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_sim_bench import processes_naming
from tests.support import run_bench

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api_process", [False, True], ids=["one-process", "api-process"])
def test_api_latency_bench_measures_every_phase_and_cleans_up(
    tmp_path: Path, api_process: bool
) -> None:
    out = tmp_path / "api.json"
    workdir = tmp_path / "work"
    argv = [
        *(["--api-process"] if api_process else []),
        *("--devices", "300", "--requests", "10", "--repeats", "1"),
        *("--steady-rate", "200", "--saturating-messages", "6000"),
        *("--deadline-s", "30", "--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("api_latency", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "saturated" in done.stdout

    result = json.loads(out.read_text())
    assert [r["phase"] for r in result["runs"]] == ["idle", "steady", "saturated"]
    for run in result["runs"]:
        for endpoint in ("list", "get"):
            latencies = run["endpoints"][endpoint]
            assert latencies["n"] == 10
            assert 0 < latencies["p50_ms"] <= latencies["p99_ms"] <= latencies["max_ms"]
    idle, steady, saturated = result["runs"]
    assert idle["reports_per_s"] == 0
    assert steady["reports_per_s"] > 0 and saturated["reports_per_s"] > 0
    assert result["hub_stats"]["rejected"] == {}
    assert '"hub stopped"' in (workdir / "hub.log").read_text()
    if api_process:  # a second, API-only hub ran beside the link's and stopped cleanly
        api_log = (workdir / "hub-api.log").read_text()
        assert '"hub stopped"' in api_log and "mqtt connected" not in api_log
        assert "API from an API-only process" in done.stdout
    assert processes_naming(str(workdir)) == []
