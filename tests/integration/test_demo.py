"""The README's main job must keep working: run the demo's scenes once, for real."""

from __future__ import annotations

import signal
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
            "2",
            "--api-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    assert "API on http://127.0.0.1:" in out
    assert out.count("admin API token for this session, shown once: ") == 1
    assert "generations demo-02 applied, from its own disk: [1, 4]" in out
    assert "mutual TLS, per-device ACL, CRL" in out
    assert "2 devices enrolled with one claim token" in out
    assert out.count("converged in") == 5
    assert "demo-01 refused it (not signed by the fleet's hub key)" in out
    # The broker itself closed the decommissioned device's open connection.
    assert "closed its open connection (the agent heard: Administrative action)" in out
    assert processes_mentioning(str(tmp_path)) == [], "the demo left processes running"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Also: the token the demo prints works against its hub while it runs."""
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    assert "stopped" in out.read_text()
    assert processes_mentioning(str(tmp_path)) == [], "Ctrl-C left processes running"


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
    assert "enrolled" not in result.stdout and "error" not in result.stdout
    assert processes_mentioning(str(tmp_path)) == [], "the demo left processes running"
