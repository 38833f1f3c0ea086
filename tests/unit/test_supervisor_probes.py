"""Health probes against real servers and processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.supervisor.probes import ProbeResult, command_probe, http_probe
from tests.unit.supervisor_support import exists, wait_for


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = {"/ok": 200, "/moved": 302, "/down": 503, "/missing": 404}.get(self.path, 500)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.mark.parametrize(
    ("path", "result"),
    [
        pytest.param("/ok", ProbeResult(True, "status 200"), id="200"),
        pytest.param("/moved", ProbeResult(True, "status 302"), id="302"),
        pytest.param("/down", ProbeResult(False, "status 503"), id="503"),
        pytest.param("/missing", ProbeResult(False, "status 404"), id="404"),
    ],
)
def test_http_status_decides(server: int, path: str, result: ProbeResult) -> None:
    assert http_probe(server, path, timeout_s=2) == result


def test_a_refused_connection_is_not_ok() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: connections are refused
        result = http_probe(port, timeout_s=2)
    assert result == ProbeResult(False, f"connection refused on 127.0.0.1:{port}")


def test_a_server_that_never_answers_times_out_on_time() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts; nobody ever reads or writes
        began = time.monotonic()
        result = http_probe(listener.getsockname()[1], timeout_s=0.3)
        took = time.monotonic() - began
    assert result == ProbeResult(False, "timed out after 0.3 s")
    assert 0.3 <= took < 1.0


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        pytest.param(b"", "no response (connection closed)", id="closed"),
        pytest.param(
            b"SSH-2.0-OpenSSH\r\n", "not an HTTP response: 'SSH-2.0-OpenSSH'", id="not-http"
        ),
    ],
)
def test_a_reply_that_is_not_http_is_not_ok(reply: bytes, detail: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(reply)

        thread = threading.Thread(target=answer)
        thread.start()
        result = http_probe(listener.getsockname()[1], timeout_s=2)
        thread.join()
    assert result == ProbeResult(False, detail)


def test_bad_probe_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="port must be"):
        http_probe(0, timeout_s=1)
    with pytest.raises(ValueError, match="path must start with /"):
        http_probe(80, "health\r\nX: y", timeout_s=1)
    with pytest.raises(ValueError, match="needs a command"):
        command_probe([], cwd=Path("/"), env={}, timeout_s=1)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def test_a_command_that_exits_0_is_ok(tmp_path: Path) -> None:
    assert command_probe(["true"], cwd=tmp_path, env=_env(), timeout_s=5) == ProbeResult(
        True, "exit 0"
    )


def test_a_failing_command_is_not_ok_with_its_last_line(tmp_path: Path) -> None:
    result = command_probe(
        [sys.executable, "-c", "print('checking'); print('db unreachable'); raise SystemExit(2)"],
        cwd=tmp_path,
        env=_env(),
        timeout_s=5,
    )
    assert result == ProbeResult(False, "exit 2: db unreachable")


def test_a_command_that_cannot_run_is_not_ok(tmp_path: Path) -> None:
    result = command_probe(["./nope"], cwd=tmp_path, env=_env(), timeout_s=5)
    assert not result.ok and result.detail.startswith("cannot run ./nope")


def test_a_command_probe_that_hangs_is_killed_with_its_whole_group(tmp_path: Path) -> None:
    script = "sleep 30 & echo $! > child.pid; wait"
    began = time.monotonic()
    result = command_probe(["sh", "-c", script], cwd=tmp_path, env=_env(), timeout_s=0.5)
    assert result == ProbeResult(False, "timed out after 0.5 s")
    assert time.monotonic() - began < 2
    child = int((tmp_path / "child.pid").read_text())
    wait_for(lambda: not _alive(child), what="the probe's child killed")


def _alive(pid: int) -> bool:
    if not exists(pid):
        return False
    state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    return state != b"Z"


def test_probes_import_no_http_library() -> None:
    code = (
        "import sys, edge_agent.supervisor.probes\n"
        "print(sorted(m for m in ('http.client', 'urllib.request', 'email') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
