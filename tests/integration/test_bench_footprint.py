"""The footprint benchmark runs as it measures (small: one agent, a short idle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_footprint_bench_measures_an_enrolled_agent_and_its_floors(tmp_path: Path) -> None:
    out = tmp_path / "footprint.json"
    argv = ["--agents", "1", "--idle-s", "1", "--json", str(out), "--workdir", str(tmp_path / "w")]
    done = run_bench("footprint", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    result = json.loads(out.read_text())
    (agent,) = result["agents"]
    floors = result["floors"]
    # An agent over mutual TLS holds at least what its floor does, and not absurdly more.
    assert floors["python"]["rss_mib"] < floors["python + paho + Ed25519"]["rss_mib"]
    assert floors["python + paho + Ed25519"]["rss_mib"] < agent["rss_mib"] < 200
    assert 0 < agent["uss_mib"] <= agent["pss_mib"] <= agent["rss_mib"]
    assert {"paho", "ssl", "cryptography", "edge_agent"} <= set(result["modules_import_ms"])
    assert result["module_count"] > 100
    assert 0 <= result["idle_cpu_share"][0] < 0.5
