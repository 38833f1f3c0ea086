"""The convergence benchmark end to end with 20 devices, so the bench cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_converge_bench_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "converge-20.json"
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "20", "--repeats", "1", "--deadline-s", "20"),
        *("--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("converge", argv, timeout_s=60)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio ours/baseline (median)" in done.stdout

    result = json.loads(out.read_text())
    assert result["devices"] == 20 and len(result["rounds"]) == 1
    (run,) = result["rounds"]
    assert 0 < run["ours_put_s"] <= run["ours_s"]
    assert 0 < run["ours_delivered_s"] <= run["ours_reported_s"]
    assert run["baseline_s"] > 0
    assert result["ratio_ours_over_baseline"] > 0
    assert result["fleet_counters"]["applied"] == {"1": 20}
    assert result["fleet_counters"]["rejected"] == {}
    assert result["hub_stats"]["received"]["reported"] == 20
    assert 200 <= result["payload_bytes"] <= 300

    # Both children were stopped, not killed: the hub logged its clean exit, and
    # Mosquitto wrote its persistence file, which it does on SIGTERM (not on SIGKILL).
    assert '"hub stopped"' in (workdir / "hub.log").read_text()
    assert (workdir / "broker" / "persistence" / "mosquitto.db").exists()


def processes_naming(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


def test_converge_bench_that_misses_a_deadline_fails_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """Applies take 5 s, the deadline is 3 s: the run fails, and the hub and broker go too."""
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "5", "--repeats", "1", "--deadline-s", "3", "--apply-time-s", "5"),
        *("--json", str(tmp_path / "never.json"), "--workdir", str(workdir)),
    ]
    done = run_bench("converge", argv, timeout_s=60)
    assert done.returncode == 1, f"{done.stdout}\n{done.stderr}"
    assert "timed out" in done.stderr
    assert not (tmp_path / "never.json").exists()
    assert processes_naming(str(workdir)) == []


def test_a_bench_past_its_test_deadline_is_interrupted_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """Applies take 30 s; the test gives the run 8 s. Killing the bench alone would leave
    its broker and hub running (they have sessions of their own): it is interrupted."""
    workdir = tmp_path / "work"
    argv = [
        *("--devices", "5", "--repeats", "1", "--deadline-s", "60", "--apply-time-s", "30"),
        *("--json", str(tmp_path / "never.json"), "--workdir", str(workdir)),
    ]
    with pytest.raises(AssertionError, match="still running after 8s; interrupted"):
        run_bench("converge", argv, timeout_s=8)
    assert (workdir / "hub.log").exists(), "interrupted before the hub started"
    assert processes_naming(str(workdir)) == []
    assert not (tmp_path / "never.json").exists()
