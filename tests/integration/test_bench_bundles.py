"""The bundle benchmark end to end at small sizes, so it cannot silently rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_bench

pytestmark = pytest.mark.integration


def test_bundle_bench_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bundles.json"
    workdir = tmp_path / "work"
    workdir.mkdir()
    argv = [
        *("--verify-mib", "2", "--transfer-mib", "2", "--transfer-chunk-kib", "64"),
        *("--repeats", "1", "--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("bundles", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "peak RSS growth" in done.stdout and "ratio" in done.stdout
    result = json.loads(out.read_text())
    (verify,) = result["verify"]
    assert verify["size_mib"] == 2 and verify["median_verify_s"] > 0
    assert verify["max_rss_growth_mib"] < 16
    (run,) = result["transfer"]["runs"]
    assert run["chunk_kib"] == 64 and run["median_ours_mib_per_s"] > 0
    assert run["median_raw_mib_per_s"] > 0 and run["ratio_ours_to_raw"] > 0
    assert list(workdir.iterdir()) == []  # the temporary tree is gone
