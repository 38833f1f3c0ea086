"""The README's main job must keep working: run the demo's scenes once, for real.

The workload scene is checked by its outcome, not only that it ran: every device's
web 1.0 healthy and answering on its own port, web 2.0 rolled back on every device
while 1.0 answered every request, the reported reason with the log tail, and no
workload left running (nor its port answering) once the demo ends, Ctrl-C included.
The rollout scene (simulated devices) is checked the same way: the live view shows the
canary failing and the abort, the touched devices' documents equal their previous ones,
the good change waits for the promote and then succeeds everywhere, and the hub's
rows agree. The orchestration scene is checked by its printout (labels, both previews before
their changes, each device's merged document with the layer of every workload, the
instance leaving the switched-off device and staying away after its return) and by
the hub's database the demo leaves behind (where the instance is, who contributed
what), so the printout cannot claim a state the hub does not hold.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devtools.broker import free_port
from tests.support import wait_until

pytestmark = pytest.mark.integration


def test_demo_runs_its_scenes_and_stops_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "driftless.cli",
            "--log-format",
            "console",
            "demo",
            "--once",
            "--devices",
            "3",
            "--api-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "API on http://127.0.0.1:" in out
    assert out.count("admin API token for this session, shown once: ") == 1
    assert "generations demo-03 applied, from its own disk: [1, 4]" in out
    assert "mutual TLS, per-device ACL, CRL" in out
    assert "3 devices enrolled with one claim token" in out
    assert out.count("converged in") == 8
    assert "demo-01 refused it (not signed by the fleet's hub key)" in out
    # The broker itself closed the decommissioned device's open connection.
    assert "closed its open connection (the agent heard: Administrative action)" in out
    ports = check_workload_scene(out, ["demo-01", "demo-02"])
    check_orchestration_scene(out, tmp_path / "d" / "hub.db")
    check_rollout_scene(out, tmp_path / "d" / "hub.db")
    assert processes_under(tmp_path) == [], "the demo left processes running"
    assert not any(answers(port) for port in ports), "a workload still answers"


def check_workload_scene(out: str, devices: list[str]) -> list[int]:
    """The scene's outcome from its printout (the API's states, the curls); returns the ports."""
    scene = out[out.index("a real workload: web 1.0") :]
    deployed, during = scene.split("web 2.0's command adds", 1)
    attempt, restored = during.split("desired state back to web 1.0", 1)
    ports = []
    for device in devices:
        row = re.search(
            rf"^ +{device} +g\d+ +applied +web healthy restarts=0 +:(\d+) -> (.*)$", deployed, re.M
        )
        assert row is not None, f"{device}: web 1.0 not healthy after the deploy\n{deployed}"
        ports.append(int(row.group(1)))
        assert row.group(2) == f"web 1.0 on {device}: hello from the demo"
        meanwhile = re.search(rf"{device} answered (\d+) requests meanwhile, (.*)$", attempt, re.M)
        assert meanwhile is not None, attempt
        assert int(meanwhile.group(1)) >= 1
        assert meanwhile.group(2) == f"every one 'web 1.0 on {device}: hello from the demo'"
        after = re.search(
            rf"^ +{device} +g\d+ +rolled_back +web rolled_back .* -> (.*)$", attempt, re.M
        )
        assert after is not None, f"{device}: web 2.0 not reported rolled back\n{attempt}"
        assert after.group(1) == f"web 1.0 on {device}: hello from the demo"
        assert re.search(
            rf"^ +{device} +g\d+ +applied +web healthy .* -> web 1\.0 ", restored, re.M
        ), restored
    assert len(set(ports)) == len(devices), "each device has its own port"
    assert "rolled back by itself on every device after" in attempt
    reason = "\n".join(line for line in attempt.splitlines() if line.startswith("    | "))
    assert "workload web exited with code 1" in reason
    assert "error: the configuration has no 'database_url'; refusing to start" in reason
    return ports


def check_orchestration_scene(out: str, db: Path) -> None:
    """Scene 7 on demo-01 (site=a) and demo-02 (site=b, the canary), from the printout and
    from the hub's database once the demo has stopped."""
    scene = out[out.index("scene 7   orchestration") : out.index("scene 8   ")]
    layered, placed = scene.split("a placed deployment: recorder", 1)
    assert "labels: demo-01 site=a; demo-02 canary=yes site=b" in layered
    fleet, canary = layered.split("deployment/telemetry-canary: preview", 1)
    # Each preview comes before its change, and the change did what it showed.
    assert fleet.index("deployment/telemetry: preview (dry run") < fleet.index("applied: ")
    added = (
        r"~ 2 devices: demo-01, demo-02\n +\+ telemetry +bundle \w+… +\(from deployment:telemetry\)"
    )
    assert re.search(added, fleet), fleet
    assert "applied: 2 devices change, 0 unchanged, 0 unplaceable; exactly what the " in fleet
    replaced = (
        r"~ 1 device: demo-02\n +~ telemetry +\(from deployment:telemetry-canary\)\n"
        r" +config: .*\"interval_s\":10} -> .*\"interval_s\":1}"
    )
    assert re.search(replaced, canary), canary
    assert "applied: 1 device change, 1 unchanged, 0 unplaceable; exactly what the " in canary
    first = re.search(r"the planner put it on (demo-0\d)", placed)
    moved = re.search(r"after it went offline the instance moved to (demo-0\d)", placed)
    assert first and moved, placed
    first_id, second_id = first.group(1), moved.group(1)
    assert first_id != second_id
    merged = placed.split("each device's merged document:", 1)[1].split("switched off", 1)[0]
    sources = {"demo-01": "telemetry", "demo-02": "telemetry-canary"}
    for device, source in sources.items():
        block = merged.split(f"    {device} ", 1)[1].split("\n    demo-", 1)[0]
        assert re.search(rf"telemetry +from deployment:{source} +healthy", block), block
        assert re.search(r"web +from device +healthy", block), block
        recorder = re.search(r"recorder +from deployment:recorder +healthy", block)
        assert (recorder is not None) == (device == first_id), block
    assert f"{first_id} -> {second_id}: lost" in placed
    assert f"{first_id} comes back" in placed
    assert f"with {first_id} back: the instance stays on {second_id}" in placed
    final = placed.split("the instance stays on", 1)[1]
    final_block = final.split(f"    {first_id} ", 1)[1].split("\n    demo-", 1)[0]
    assert "recorder" not in final_block, final_block
    assert re.search(r"recorder +from deployment:recorder +healthy", final), final
    history = final.split("'s history", 1)[1]
    kinds = re.findall(r"^ +\d\d:\d\d:\d\d +(\w+) ", history, re.M)
    assert "placed" in kinds and kinds.index("placed") < kinds.index("moved"), history
    assert kinds[-1] == "applied", history
    # What the hub holds after the demo: the instance where the printout left it.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        instances = conn.execute(
            "SELECT device_id, original_device_id, attempts FROM deployment_instance "
            "WHERE deployment = 'recorder'"
        ).fetchall()
        rows = dict(conn.execute("SELECT id, contributions FROM device").fetchall())
    assert instances == [(second_id, first_id, 1)]
    for device, source in sources.items():
        expected = {"telemetry": f"deployment:{source}", "web": "device"}
        if device == second_id:
            expected["recorder"] = "deployment:recorder"
        assert json.loads(rows[device]) == expected, device


def check_rollout_scene(out: str, db: Path) -> None:
    """Scene 8 on 24 simulated devices: a canary that fails its soak aborts and restores by
    itself; a good change waits for a promote, then reaches every device."""
    scene = out[out.index("scene 8   staged rollouts on 24 simulated devices") :]
    assert "24 devices demo-sim-00000 … demo-sim-00023 online" in scene
    assert "deployment/web-sim (selector sim=demo-sim) at web 1.0: all 24 in sync" in scene
    bad, good = scene.split("change to web 1.2 (the fix)", 1)
    watched = [line[6:] for line in bad.splitlines() if line.startswith("    | ")]
    running = r"deployment/web-sim rollout \d+: running, wave 1 of 2: 0 succeeded, 2 in flight"
    assert any(re.match(running, line) for line in watched), watched  # the canary's hand-out
    assert re.search(r"rollout \d+ aborted: failure threshold 1 crossed", watched[-1]), watched
    assert "aborted by itself" in bad
    failed = re.findall(r"^ +(demo-sim-\d+) +failed +(.*)$", bad, re.M)
    assert failed and all(why == "crash during soak" for _, why in failed), bad
    touched = re.findall(
        r"^ +(demo-sim-\d+) +g(\d+) -> g(\d+) +same document: yes +in sync +web healthy$", bad, re.M
    )
    assert 1 <= len(touched) <= 2 and all(int(b) > int(a) for _, a, b in touched), bad
    assert {d for d, _ in failed} <= {d for d, _, _ in touched}
    assert f"{len(touched)} touched devices each got a new generation" in bad
    assert f"the other {24 - len(touched)} devices were never handed web 1.1" in bad
    # The good change: the operator promotes only once the watch showed the canary passed.
    assert good.index("waiting for promote (") < good.index("the operator promotes")
    assert re.search(r"rollout \d+ promoted; now running", good), good
    assert re.search(r"^    \| deployment/web-sim rollout \d+ succeeded$", good, re.M), good
    assert "24 of 24 devices on web 1.2, 24 with web healthy" in good
    # What the hub holds: the abort and the success, every device on 1.2.
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rollouts = conn.execute(
            "SELECT id, state FROM rollout WHERE deployment = 'web-sim' ORDER BY id"
        ).fetchall()
        [(version,)] = conn.execute(
            "SELECT b.version FROM deployment d JOIN bundle b "
            "ON b.sha256 = json_extract(d.spec, '$.workloads[0].bundle') WHERE d.name = 'web-sim'"
        ).fetchall()
        outcomes = dict(
            conn.execute(
                "SELECT state, count(*) FROM rollout_device WHERE rollout_id = ? GROUP BY state",
                (rollouts[-1][0],),
            ).fetchall()
        )
    assert [state for _, state in rollouts] == ["aborted", "succeeded"]
    assert version == "1.2" and outcomes == {"succeeded": 24}


def answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def processes_under(path: Path) -> list[str]:
    """Processes whose command line names ``path`` or that run in a directory under it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(path) in argv or cwd.startswith(str(path)):
            found.append(f"{proc.name}: {argv} (in {cwd})")
    return found


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Stopped while its workload runs, the demo stops the workload too (workloads outlive
    their agent on purpose). Also: the token the demo prints works against its hub."""
    out = tmp_path / "out.txt"
    port = free_port()
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "driftless.cli",
                "--log-format",
                "console",
                "demo",
                "--devices",
                "1",
                "--api-port",
                str(port),
                "--data-dir",
                str(tmp_path / "d"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "scene 3" in out.read_text(), timeout_s=60, what="the demo running")
        token = out.read_text().split("shown once: ", 1)[1].split()[0]
        url = f"http://127.0.0.1:{port}/api/v1/fleet/summary"
        assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()["total"] == 1
        assert httpx.get(url).status_code == 401
        row = wait_until(
            lambda: re.search(r"web healthy restarts=0 +:(\d+) -> web 1\.0", out.read_text()),
            timeout_s=90,
            what="web 1.0 deployed",
        )
        web_port = int(row.group(1))
        assert answers(web_port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert "stopped" in out.read_text()
    assert processes_under(tmp_path) == [], "Ctrl-C left processes running"
    assert not answers(web_port), "Ctrl-C left the workload answering"


def test_the_plain_listener_is_there_when_asked_for(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "driftless.cli", "--log-format", "console", "demo", "--once",
            "--plain", "--devices", "1", "--api-port", str(free_port()),
            "--data-dir", str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mqtt://127.0.0.1:" in result.stdout and "plain MQTT (--plain)" in result.stdout
    assert "demo-01 refused it (not signed by the fleet's hub key)" in result.stdout
    assert "enrolled" not in result.stdout
    assert "orchestration needs two devices (a canary and the rest): skipped" in result.stdout
    assert "staged rollouts on simulated devices: skipped with --plain" in result.stdout
    # The only error is the one the workload scene quotes from web 2.0's log.
    assert not re.search(r"^\S*(error|failed)", result.stdout, re.M | re.I), result.stdout
    check_workload_scene(result.stdout, ["demo-01"])
    assert processes_under(tmp_path) == [], "the demo left processes running"
