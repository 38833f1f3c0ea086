"""Health probes as I/O: an HTTP GET on a local port, a command. Blocking; each has a hard timeout.

The runtime calls these from a worker thread and feeds the verdicts to the pure
health rules; what "healthy" means (passed continuously for ``min_healthy_time``)
is decided there, not here.

Rules:
- Every probe ends by its timeout, whatever the workload does: the HTTP probe
  bounds the connect and every read by one deadline; a command probe runs in its
  own session (process group), and a timeout SIGKILLs the whole group, so a probe
  that forked leaves nothing behind.
- HTTP: a status 2xx or 3xx is ok; any other status is not, with the status in
  ``detail``; a refused connection, a reset, a timeout or a reply that is not HTTP
  are not ok either. One request, ``Connection: close``, only the status line read.
- Written on a raw socket, not ``urllib`` (~32 ms and ~20 modules to import,
  ``http.client`` and ``email`` among them) nor ``http.client`` (~20 ms): ``socket``
  is already loaded by the MQTT transport.
- Command: exit 0 is ok; another exit status, a signal, a command that cannot be
  started or a timeout are not, with the last line of its output in ``detail``.
- Never raises for what the probed side does; bad arguments raise ValueError.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_STATUS_LINE = 1024
DETAIL_OUTPUT_BYTES = 200


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict; ``detail`` says why not (``status 503``, ``refused``, ...)."""

    ok: bool
    detail: str


def http_probe(
    port: int, path: str = "/", *, timeout_s: float, host: str = "127.0.0.1"
) -> ProbeResult:
    """GET ``http://host:port/path`` and judge its status line, all within ``timeout_s``."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1..65535, got {port}")
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise ValueError(f"path must start with / and hold no spaces or line breaks: {path!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: driftless-probe\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(request)
            line = _status_line(sock, deadline)
    except ConnectionRefusedError:
        return ProbeResult(False, f"connection refused on {host}:{port}")
    except TimeoutError:
        return ProbeResult(False, f"timed out after {timeout_s:g} s")
    except OSError as exc:
        return ProbeResult(False, f"connection failed: {exc.strerror or exc}")
    return _judge(line)


def _status_line(sock: socket.socket, deadline: float) -> bytes:
    buffer = b""
    while b"\r\n" not in buffer and len(buffer) < MAX_STATUS_LINE:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(MAX_STATUS_LINE)
        if not chunk:
            break
        buffer += chunk
    return buffer.split(b"\r\n", 1)[0]


def _judge(line: bytes) -> ProbeResult:
    if not line:
        return ProbeResult(False, "no response (connection closed)")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        shown = line[:60].decode("ascii", errors="replace")
        return ProbeResult(False, f"not an HTTP response: {shown!r}")
    status = int(parts[1])
    return ProbeResult(200 <= status < 400, f"status {status}")


def command_probe(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], timeout_s: float
) -> ProbeResult:
    """Run ``argv`` in its own process group; ok if it exits 0 within ``timeout_s``."""
    if not argv:
        raise ValueError("a command probe needs a command")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    try:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ProbeResult(False, f"cannot run {argv[0]}: {exc.strerror or exc}")
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid)
        try:
            process.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipe
            process.kill()
            process.wait()
        return ProbeResult(False, f"timed out after {timeout_s:g} s")
    code = process.returncode
    if code == 0:
        return ProbeResult(True, "exit 0")
    last = _last_line(output)
    why = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return ProbeResult(False, f"{why}: {last}" if last else why)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _last_line(output: bytes | None) -> str:
    if not output:
        return ""
    lines = output[-DETAIL_OUTPUT_BYTES:].decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""
