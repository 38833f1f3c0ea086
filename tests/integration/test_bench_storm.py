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
        # the fleet settles in ~1 s; the echo and the bare round (offline 2.5 s) need ~4 more
        *("--first-storm-s", "8", "--offline-s", "2.5"),
        *("--deadline-s", "30", "--json", str(out), "--workdir", str(workdir)),
    ]
    done = run_bench("storm", argv, timeout_s=120)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "ratio storm/bare reconnect (median)" in done.stdout
    assert "ratio storm/echo (median)" in done.stdout

    result = json.loads(out.read_text())
    (storm,) = result["storms"]
    assert storm["echo_s"] > 0 and storm["put_before_return_s"] > 0
    # The bare reconnect round ran: every client was cut, came back within the window
    # (2.5 s + up to 1 s after the cut) and received the message queued while it was away.
    assert storm["bare_received"] == 30
    assert 0 < storm["bare_connected_s"] <= storm["bare_s"] < 4.0  # 1 s window, and slack
    assert storm["bare_published_before_return_s"] > 0 and storm["bare_wills_after_cut_s"] > 0
    assert storm["bare_clients_cpu_s"] > 0
    assert result["ratio_storm_over_bare"] == pytest.approx(
        storm["storm_s"] / storm["bare_s"], rel=1e-2
    )
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
    port = (workdir / "broker" / "mosquitto.conf").read_text().split("listener ")[1].split()[0]
    assert (
        processes_naming(f"simulator.bench.reconnect clients --host 127.0.0.1 --port {port}") == []
    )
