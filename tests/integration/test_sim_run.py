"""``driftless sim run`` end to end: real Mosquitto, real hub, worker processes, signals, kills.

The broker is the secure one (mutual TLS, the device ACL): every run is ``--enroll``,
so the simulator provisions its devices through the hub's enrollment API (the hub
shares the broker's fleet CA) and each device connects with its own certificate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.fleet import device_ids
from simulator.inventory import DeviceInventory
from simulator.profiles import BUILTIN, offline_windows
from simulator.workers import split
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration


def sim_run(
    tmp_path: Path, broker: TestBroker, hub: HubProcess, *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    summary = tmp_path / "summary.json"
    argv = [
        *(sys.executable, "-m", "driftless.cli", "--log-level", "info", "sim", "run", "--enroll"),
        *("--broker", broker.url, "--hub", hub.base_url, "--json", str(summary)),
        *("--state-dir", str(tmp_path / "state"), *args),
    ]
    env = {**os.environ, "DRIFTLESS_TOKEN": hub.token}  # --token's default
    with (tmp_path / "sim.out").open("wb") as out, (tmp_path / "sim.err").open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            env=env,
        )
    return proc, summary


def read(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def finish(proc: subprocess.Popen[bytes], tmp_path: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise AssertionError(
            f"sim run did not finish in {timeout_s}s:\n{(tmp_path / 'sim.err').read_text()}"
        ) from None


def processes_in_group(pgid: int) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{entry.name}: {stat[:80]}")
    return found


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def assert_nothing_left(proc: subprocess.Popen[bytes], summary: dict[str, Any]) -> None:
    assert processes_in_group(proc.pid) == []
    for worker in summary["workers"]["each"]:
        for pid in worker["pids"]:
            assert not is_running(pid), f"worker pid {pid} still runs"


def test_fifty_flaky_devices_in_two_workers_converge_and_exit_cleanly(
    tmp_path: Path, broker: TestBroker, hub: HubProcess
) -> None:
    duration_s, seed = 7.0, 4
    proc, path = sim_run(
        tmp_path,
        broker,
        hub,
        *("--devices", "50", "--workers", "2", "--profile", "flaky", "--seed", str(seed)),
        *("--duration-s", str(duration_s), "--change-every-s", "3", "--settle-s", "20"),
    )
    status = finish(proc, tmp_path, timeout_s=60)
    err = (tmp_path / "sim.err").read_text()
    out = (tmp_path / "sim.out").read_text()
    assert status == 0, f"{out}\n{err}"
    summary = read(path)
    assert summary is not None and summary["state"] == "finished"
    assert_nothing_left(proc, summary)
    assert summary["tls"] is True and summary["enrollment"]["enrolled"] == 50

    # Registered through the batch API, two changes pushed, every device settled on the newest.
    assert summary["registration"]["created"] == 50
    changes = summary["changes"]
    assert [c["index"] for c in changes] == [1, 2] and all(c["error"] is None for c in changes)
    assert all(c["updated"] == 50 for c in changes)
    assert changes[-1]["converged_s"] is not None and not changes[-1]["superseded"]
    assert changes[-1]["failed"] == summary["final"]["failed_newest"]
    final = summary["final"]
    assert final["total"] == 50 and final["settled"] == 50
    assert final["in_sync"] + final["failed_newest"] == 50
    assert summary["settled_s"] is not None and summary["stopped_by"] == "duration"
    newest = changes[-1]["generation"]
    for device_id in device_ids(50)[::7]:
        row = hub.device(device_id)
        assert row["desired_generation"] == newest
        assert row["in_sync"] or row["failed_generation"] == newest
        # Each simulated device reported its (seeded) hardware in its birth.
        expected = DeviceInventory(seed, device_id).reading()
        inventory = row["inventory"]
        assert (inventory["arch"], inventory["mem_total_bytes"]) == (
            expected.arch,
            expected.mem_total_bytes,
        )
        assert 0 < inventory["disk_free_bytes"] < inventory["disk_total_bytes"]

    # The flaky schedule ran as the seed says: windows that began before the end were taken.
    windows = [
        w
        for d in device_ids(50)
        for w in _until(offline_windows(BUILTIN["flaky"], seed, d), duration_s + 5)
    ]
    began_early = sum(w.start_s < duration_s - 1.5 for w in windows)
    began_at_all = sum(w.start_s < duration_s + 3 for w in windows)
    assert began_early > 0
    assert began_early <= summary["network_drops"] <= began_at_all
    assert summary["disconnects"] >= summary["severed"] > 0

    # The figures the summary promises are there.
    assert summary["connects"] >= 50 and summary["messages"]["in"] > 0
    assert summary["messages"]["out"] > summary["connects"]
    assert summary["applies"]["ok"] >= 50 and summary["memory"]["per_device_bytes"] > 0
    workers = summary["workers"]
    assert workers["count"] == 2 and workers["restarts"] == 0
    assert [w["devices"] for w in workers["each"]] == [25, 25]
    assert "driftless sim: 50 devices, profile flaky, seed 4, 2 workers" in out
    progress = [line for line in err.splitlines() if " conn " in line]
    assert progress and "workers 2/2" in progress[-1]


def _until(windows: Iterator[Any], horizon_s: float) -> Iterator[Any]:
    for window in windows:
        if window.start_s >= horizon_s:
            return
        yield window


def test_a_killed_worker_is_restarted_and_its_devices_carry_on(
    tmp_path: Path, broker: TestBroker, hub: HubProcess
) -> None:
    devices = 40
    proc, path = sim_run(
        tmp_path,
        broker,
        hub,
        *("--devices", str(devices), "--workers", "2", "--profile", "stable"),
        *("--duration-s", "10", "--change-every-s", "2", "--settle-s", "20"),
    )
    try:
        running = wait_until(
            lambda: (s := read(path)) and s["connected"] == devices and s["changes"] and s,
            timeout_s=20,
            what="every device connected and a change pushed",
        )
        victim = running["workers"]["each"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        restarted = wait_until(
            lambda: (
                (s := read(path))
                and s["workers"]["each"][0]["restarts"] == 1
                and s["workers"]["alive"] == 2
                and s["connected"] == devices
                and s
            ),
            timeout_s=15,
            what="the worker restarted and its devices reconnected",
        )
        new_pid = restarted["workers"]["each"][0]["pid"]
        assert new_pid != victim["pid"]
        assert str(new_pid) in " ".join(str(p) for p in restarted["workers"]["pids"])
    finally:
        status = finish(proc, tmp_path, timeout_s=60)
    err = (tmp_path / "sim.err").read_text()
    assert status == 0, f"{(tmp_path / 'sim.out').read_text()}\n{err}"
    summary = read(path)
    assert summary is not None
    assert_nothing_left(proc, summary)
    assert f"worker 0 (pid {victim['pid']}) died with status -9; restarting it" in err

    w0 = summary["workers"]["each"][0]
    assert w0["restarts"] == 1 and w0["pids"] == [victim["pid"], new_pid]
    assert w0["deaths"][0]["returncode"] == -signal.SIGKILL
    assert summary["final"]["in_sync"] == devices and summary["settled_s"] is not None
    assert all(c["converged_s"] is not None for c in summary["changes"] if not c["superseded"])
    assert any(c["converged_s"] is not None for c in summary["changes"])
    # The restarted devices kept their "disks": their sessions went on growing, so the hub
    # accepted their births (a session number that went back would be ignored).
    first_slice = device_ids(devices)[split(devices, 2)[0].start : split(devices, 2)[0].stop]
    for device_id in first_slice[::5]:
        row = hub.device(device_id)
        assert row["session"] >= 2 and row["in_sync"], row


def test_sigterm_stops_a_run_without_a_duration_in_order(
    tmp_path: Path, broker: TestBroker, hub: HubProcess
) -> None:
    proc, path = sim_run(
        tmp_path, broker, hub, *("--devices", "10", "--workers", "2", "--profile", "storm")
    )
    try:
        wait_until(
            lambda: (s := read(path)) and s["connected"] == 10,
            timeout_s=20,
            what="every device connected",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        status = finish(proc, tmp_path, timeout_s=30)
    summary = read(path)
    assert status == 0 and summary is not None
    assert (summary["state"], summary["stopped_by"]) == ("finished", "SIGTERM")
    assert summary["connected"] == 0 and summary["disconnects"] == 0  # orderly goodbyes
    assert_nothing_left(proc, summary)
    # Every device said offline itself before its DISCONNECT (not through a Will).
    assert all(not hub.device(d)["online"] for d in device_ids(10))


def test_workers_do_not_outlive_a_killed_parent(
    tmp_path: Path, broker: TestBroker, hub: HubProcess
) -> None:
    proc, path = sim_run(
        tmp_path, broker, hub, *("--devices", "10", "--workers", "2", "--profile", "stable")
    )
    try:
        running = wait_until(
            lambda: (s := read(path)) and s["connected"] == 10 and s,
            timeout_s=20,
            what="every device connected",
        )
    finally:
        proc.kill()  # the parent alone, as the OOM killer would
        proc.wait(timeout=10)
    pids = running["workers"]["pids"]
    assert len(pids) == 2
    wait_until(
        lambda: not any(is_running(pid) for pid in pids),
        timeout_s=20,
        what=f"workers {pids} to notice their parent died and stop",
    )
    assert processes_in_group(proc.pid) == []
