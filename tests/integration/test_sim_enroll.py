"""``driftless sim run --enroll``: simulated devices provisioned as real ones, on mutual TLS.

Real processes: a mutual-TLS Mosquitto with the device ACL and a CRL, a hub
over mTLS that signs desired documents, and the simulator with worker
processes. Each device enrolls with its own key and CSR, then connects with its
own certificate; the ACL lets a device read only its own desired topic, so a
fleet that converges shows every device used its own identity.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.enroll import DeviceIdentities
from simulator.fleet import device_ids
from tests.integration.test_sim_bench import processes_naming
from tests.integration.test_sim_run import assert_nothing_left, finish, read
from tests.secure_stack import SecureStack, secure_stack
from tests.support import run_bench, wait_until

pytestmark = pytest.mark.integration

DEVICES = 6
PREFIX = "tls"


def run_sim(
    tmp_path: Path, stack: SecureStack, name: str, *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """``driftless sim run --enroll`` in the background; its JSON summary's path."""
    summary = tmp_path / f"{name}.json"
    argv = [
        *(sys.executable, "-m", "driftless.cli", "--log-level", "info", "sim", "run", "--enroll"),
        *("--broker", stack.broker.url, "--hub", stack.hub.base_url, "--token", stack.hub.token),
        *("--devices", str(DEVICES), "--workers", "2", "--prefix", PREFIX, "--profile", "stable"),
        *("--json", str(summary), "--state-dir", str(tmp_path / "state"), *args),
    ]
    with (tmp_path / "sim.out").open("wb") as out, (tmp_path / "sim.err").open("wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    return proc, summary


def test_an_enrolled_fleet_converges_over_mutual_tls_and_a_rerun_reuses_its_identities(
    tmp_path: Path,
) -> None:
    ids = device_ids(DEVICES, PREFIX)
    identities = DeviceIdentities(tmp_path / "state" / "identities")
    with secure_stack(tmp_path) as stack:
        hub = stack.hub
        proc, path = run_sim(
            tmp_path, stack, "first",
            *("--duration-s", "5", "--change-every-s", "2", "--settle-s", "30"),
        )  # fmt: skip
        status = finish(proc, tmp_path, timeout_s=90)
        err = (tmp_path / "sim.err").read_text()
        assert status == 0, f"{(tmp_path / 'sim.out').read_text()}\n{err}"
        first = read(path)
        assert first is not None and first["tls"] is True
        assert_nothing_left(proc, first)
        enrollment = first["enrollment"]
        assert (enrollment["enrolled"], enrollment["reused"]) == (DEVICES, 0)
        assert enrollment["reasons"] == {"no_key": DEVICES}
        assert enrollment["broker_url"] == stack.broker.url and enrollment["root"] is True
        assert f"enrolled {DEVICES} devices in" in err

        # The keys stayed here; the certificates came from the hub's CA; the root too.
        assert identities.ca.read_bytes() == stack.ca.cert_pem
        assert stack.fleet is not None
        assert identities.root.read_bytes() == stack.fleet.root_path.read_bytes()
        keys = {d: identities.key(d).read_bytes() for d in ids}
        certs = {d: identities.cert(d).read_bytes() for d in ids}
        assert all(identities.key(d).stat().st_mode & 0o077 == 0 for d in ids)

        # Converged on signed documents over mTLS (the devices hold the enrolled root).
        final = first["final"]
        assert final["total"] == DEVICES and final["in_sync"] == DEVICES
        assert first["changes"] and first["changes"][-1]["converged_s"] is not None
        assert first["rejected"] == 0 and first["connect_failures"] == 0
        newest = first["changes"][-1]["generation"]
        for device_id in ids:
            row = hub.device(device_id)
            assert row["labels"] == {"sim": PREFIX}
            assert row["reported_generation"] == newest and row["session"] >= 1

        # A rerun reuses every identity, and a worker killed mid-run comes back with them.
        proc, path = run_sim(
            tmp_path, stack, "second",
            *("--duration-s", "8", "--change-every-s", "2", "--settle-s", "30"),
        )  # fmt: skip
        try:
            running = wait_until(
                lambda: (s := read(path)) and s["connected"] == DEVICES and s,
                timeout_s=30,
                what="the rerun's devices connected",
            )
            victim = running["workers"]["each"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda: (
                    (s := read(path))
                    and s["workers"]["each"][0]["restarts"] == 1
                    and s["connected"] == DEVICES
                ),
                timeout_s=20,
                what="the killed worker respawned and its devices reconnected over mTLS",
            )
        finally:
            status = finish(proc, tmp_path, timeout_s=90)
        err = (tmp_path / "sim.err").read_text()
        assert status == 0, f"{(tmp_path / 'sim.out').read_text()}\n{err}"
        second = read(path)
        assert second is not None
        assert_nothing_left(proc, second)
        assert (second["enrollment"]["enrolled"], second["enrollment"]["reused"]) == (0, DEVICES)
        assert {d: identities.key(d).read_bytes() for d in ids} == keys
        assert {d: identities.cert(d).read_bytes() for d in ids} == certs
        assert second["final"]["in_sync"] == DEVICES and second["settled_s"] is not None
        assert second["workers"]["restarts"] == 1
        assert hub.stats()["rejected"] == {}


def test_the_tls_bench_runs_both_modes_end_to_end_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    out, work = tmp_path / "tls-8.json", tmp_path / "work"
    argv = ["--devices", "8", "--deadline-s", "60", "--json", str(out), "--workdir", str(work)]
    done = run_bench("tls", argv, timeout_s=180)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "all connected after s" in done.stdout
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"plain", "tls"}
    assert modes["plain"]["enrollment"] == {} and modes["tls"]["enrollment"]["enrolled"] == 8
    for mode in modes.values():
        assert mode["connected_s"] > 0 and mode["converge_s"] > 0
        assert mode["connect_failures"] == 0 and mode["workers_rss_mib"] > 0
    assert modes["tls"]["broker_cpu_s"] > 0
    assert processes_naming(str(work)) == []
