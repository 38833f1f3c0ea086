"""The supervising runtime with real signed bundles and real child processes.

The core's side is played by a recorder of the events the runtime feeds; the
steps are called as the driver's step thread calls them.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.settings import BundleSettings, SupervisorSettings
from edge_agent.supervisor.runtime import SupervisingRuntime
from firmware_bundles import archive
from firmware_bundles.model import AliveCheck, Backoff, HttpCheck, RunLimits, RunSpec
from protocols import Desired
from tests.support import wait_until
from tests.unit.test_bundles_support import DAY, Fleet

SERVER = """\
import http.server, json, os, sys
port = int(sys.argv[1]); healthy = sys.argv[2] == "ok"
config = open(os.environ["DRIFTLESS_CONFIG"]).read() if "DRIFTLESS_CONFIG" in os.environ else ""
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ.get("DRIFTLESS_VERSION", "") + " " + config).encode()
        self.send_response(200 if healthy or self.path != "/health" else 503)
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
print("serving", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
CRASH = "import sys; print('boom', flush=True); sys.exit(3)\n"
STUBBORN = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\nwhile True: time.sleep(1)\n"
)
HOG = "x = bytearray(400 * 1024 * 1024)\nprint('allocated', flush=True)\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str = "/") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


class Device:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fleet = Fleet()
        self.data = tmp / "data"
        self.events: list[Any] = []
        self.built = 0
        self.runtime = self.new_runtime()

    def new_runtime(self) -> SupervisingRuntime:
        now = int(time.time())
        return SupervisingRuntime(
            self.data,
            settings=BundleSettings(clock_skew_s=0),
            supervisor=SupervisorSettings(restart_floor_s=0.05, step_timeout_s=10),
            trusted_root=self.fleet.trusted(expires=now + 365 * DAY),
            agent_version="0.1.0",
            tag="t" + hashlib.sha256(str(self.tmp).encode()).hexdigest()[:8],
        )

    def bundle(self, name: str, version: str, script: str, run: RunSpec) -> str:
        self.built += 1
        src = self.tmp / f"src{self.built}"
        (src / "bin").mkdir(parents=True)
        app = src / "bin" / "app"
        app.write_text(f"#!{sys.executable}\n{script}")
        app.chmod(0o755)
        out = self.tmp / f"b{self.built}.bundle"
        now = int(time.time())
        archive.build(
            src,
            name=name,
            version=version,
            security_version=1,
            kind="app",
            architectures=["any"],
            created=now - 60,
            expires=now + DAY,
            out=out,
            run=run,
        )
        for key in self.fleet.release_keys:
            archive.sign(out, key)
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        cache = self.data / "bundles"
        cache.mkdir(parents=True, exist_ok=True)
        os.replace(out, cache / f"{sha}.bundle")
        return sha

    def apply(self, generation: int, *workloads: dict[str, Any]) -> list[str]:
        """Install, switch and start every workload; returns the names started."""
        desired = Desired(
            device_id="d1",
            generation=generation,
            config={"workloads": list(workloads)},
            issued_at=1.0,
        )
        self.runtime.install(desired)
        self.runtime.switch(desired)
        names = [w["name"] for w in workloads]
        for name in names:
            self.runtime.start_workload(generation, name)
        self.runtime.wait_for_health(generation, tuple(names))
        return names

    def wait_event(self, kind: type, name: str, timeout_s: float = 10) -> Any:
        return wait_until(
            lambda: next((e for e in self.events if isinstance(e, kind) and e.name == name), None),
            timeout_s=timeout_s,
            what=f"{kind.__name__} for {name}",
        )

    def pids(self) -> dict[str, int]:
        return {i: r.pid for i, r in self.runtime.table.running().items()}


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    dev = Device(tmp_path)
    dev.runtime.resume(dev.events.append)
    yield dev
    for instance in list(dev.runtime.table.running()):
        dev.runtime.table.stop(instance, grace_s=0.5)
    dev.runtime.close()


def web_run(port: int, health: str, **extra: Any) -> RunSpec:
    return RunSpec(
        command=["bin/app", str(port), health],
        checks=[HttpCheck(port=port, path="/health", interval_ms=100, timeout_ms=500, failures=2)],
        min_healthy_ms=300,
        health_deadline_s=3,
        stop_timeout_s=2,
        **extra,
    )


def test_a_health_check_that_never_passes_rolls_back_while_the_old_version_serves(
    device: Device,
) -> None:
    port = free_port()
    good = device.bundle("web", "1.0.0", SERVER, web_run(port, "ok"))
    device.apply(1, {"name": "web", "bundle": good})
    device.wait_event(HealthPassed, "web")
    device.runtime.commit(1)
    bad_port = free_port()  # hand-over: old and new run side by side
    bad = device.bundle("web", "2.0.0", SERVER, web_run(bad_port, "sick", update="start-then-stop"))
    device.events.clear()
    device.apply(2, {"name": "web", "bundle": bad})
    failed = device.wait_event(HealthFailed, "web")
    assert "not healthy within 3 s" in failed.reason
    assert get(port).startswith("1.0.0")  # the old version answers throughout
    detail = device.runtime.roll_back(2, 1)
    assert detail is not None and "web log:" in detail
    assert get(port).startswith("1.0.0")
    assert os.readlink(device.data / "workloads" / "web" / "current") == "1.0.0"
    assert [r.instance for r in device.runtime.table.running().values()] == ["web.g1"]


def test_a_crash_loop_backs_off_and_ends_failed(device: Device) -> None:
    run = RunSpec(
        command=["bin/app"],
        min_healthy_ms=0,
        backoff=Backoff(attempts=2, delay_ms=50, max_delay_ms=200, jitter_pct=0),
    )
    sha = device.bundle("crashy", "1.0.0", CRASH, run)
    device.apply(1, {"name": "crashy", "bundle": sha})
    wait_until(
        lambda: [e for e in device.events if isinstance(e, WorkloadExited) and not e.restarting],
        timeout_s=10,
        what="crashy gives up",
    )
    exits = [e for e in device.events if isinstance(e, WorkloadExited)]
    assert [(e.exit_code, e.restarting) for e in exits] == [(3, True), (3, True), (3, False)]
    assert exits[1].now - exits[0].now >= 0.05
    assert device.runtime.table.running() == {}
    assert "boom" in "\n".join(device.runtime.table.log_tail("crashy"))


def test_a_config_only_change_restarts_without_reinstalling(device: Device) -> None:
    port = free_port()
    sha = device.bundle("web", "1.0.0", SERVER, web_run(port, "ok"))
    device.apply(1, {"name": "web", "bundle": sha, "config": {"greeting": "hi"}})
    device.wait_event(HealthPassed, "web")
    device.runtime.commit(1)
    before = device.pids()["web.g1"]
    version_dir = device.data / "workloads" / "web" / "1.0.0"
    inode = version_dir.stat().st_ino
    device.events.clear()
    device.apply(2, {"name": "web", "bundle": sha, "config": {"greeting": "hello"}})
    device.wait_event(HealthPassed, "web")
    device.runtime.commit(2)
    assert version_dir.stat().st_ino == inode  # the same version directory
    assert device.pids()["web.g2"] != before and "web.g1" not in device.pids()
    assert get(port) == '1.0.0 {"greeting":"hello"}'


def test_sigterm_ignored_is_killed_after_the_grace_and_removal_leaves_nothing(
    device: Device,
) -> None:
    run = RunSpec(command=["bin/app"], min_healthy_ms=100, stop_timeout_s=1)
    sha = device.bundle("stubborn", "1.0.0", STUBBORN, run)
    device.apply(1, {"name": "stubborn", "bundle": sha})
    device.wait_event(HealthPassed, "stubborn")
    device.runtime.commit(1)
    pid = device.pids()["stubborn.g1"]
    started = time.monotonic()
    device.runtime.stop_workload(2, "stubborn")
    assert 0.9 <= time.monotonic() - started < 3
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    device.runtime.commit(2)
    assert not (device.data / "workloads" / "stubborn").exists()
    assert not device.runtime.table.log_path("stubborn").parent.exists()


def test_a_memory_limit_is_enforced_and_the_exit_reported(device: Device) -> None:
    run = RunSpec(
        command=["bin/app"],
        restart="never",
        min_healthy_ms=0,
        limits=RunLimits(memory_bytes=200 * 1024 * 1024),
    )
    sha = device.bundle("hog", "1.0.0", HOG, run)
    device.apply(1, {"name": "hog", "bundle": sha})
    exited = device.wait_event(WorkloadExited, "hog")
    assert exited.exit_code == 1 and not exited.restarting
    assert "MemoryError" in "\n".join(device.runtime.table.log_tail("hog"))


def test_an_agent_restart_adopts_and_never_runs_two_copies(device: Device) -> None:
    port = free_port()
    sha = device.bundle("web", "1.0.0", SERVER, web_run(port, "ok"))
    device.apply(1, {"name": "web", "bundle": sha})
    device.wait_event(HealthPassed, "web")
    device.runtime.commit(1)
    pid = device.pids()["web.g1"]
    # mid-switch to a new version when the agent "dies" (its runtime is abandoned)
    port2 = free_port()
    new = device.bundle("web", "2.0.0", SERVER, web_run(port2, "ok"))
    device.apply(2, {"name": "web", "bundle": new})
    device.runtime.close()
    device.runtime = device.new_runtime()
    device.events.clear()
    specs = device.runtime.resume(device.events.append)
    assert [s.name for s in specs] == ["web"]
    running = device.runtime.table.running()
    assert len(running) == 1  # exactly one copy: the applied generation's, restarted
    assert os.readlink(device.data / "workloads" / "web" / "current") == "1.0.0"
    device.wait_event(HealthPassed, "web")
    assert get(port).startswith("1.0.0")
    # a clean restart adopts the running process instead of starting another
    (instance,) = running
    adopted_pid = running[instance].pid
    device.runtime.close()
    device.runtime = device.new_runtime()
    device.runtime.resume(device.events.append)
    assert {i: r.pid for i, r in device.runtime.table.running().items()} == {instance: adopted_pid}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the version that ran before the interrupted switch was replaced


def _thread_cpu_s(name: str) -> float:
    """CPU seconds (user + system) of this process's thread called ``name``."""
    import threading

    (thread,) = [t for t in threading.enumerate() if t.name == name]
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_supervisor_sleeps_while_nothing_is_due(device: Device) -> None:
    """Idle means idle: with a healthy workload and no probe due, the supervisor's thread
    waits instead of spinning (it once cleared its wake-up before the tick that set it
    again, and took 22 % of a core at idle)."""
    sha = device.bundle(
        "quiet",
        "1.0.0",
        "import time\nwhile True: time.sleep(60)\n",
        RunSpec(command=["bin/app"], checks=[AliveCheck(for_ms=100)], min_healthy_ms=100),
    )
    device.apply(1, {"name": "quiet", "bundle": sha})
    device.wait_event(HealthPassed, "quiet")
    device.runtime.commit(1)
    before = _thread_cpu_s("supervisor")
    time.sleep(2.0)  # the measured window itself: nothing is due in it
    used = _thread_cpu_s("supervisor") - before
    assert used < 0.1, f"the supervisor's thread used {used:.2f} s of CPU in 2 s of idle"
