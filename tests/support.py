"""Test plumbing: real child processes (hub, agent), deadlines instead of sleeps.

Rule: every helper here waits for an observable event with a deadline and says
what it was waiting for when the deadline passes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from hub.devbroker import free_port, wait_for_port

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout_s: float = 20.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = predicate()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last={last!r}")
        time.sleep(interval_s)


class ChildProcess:
    """A real child process with its output in a log file; killed at teardown."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        log.close()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def driftless_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "driftless.cli", "--log-level", "debug", *args]


class HubProcess(ChildProcess):
    """``driftless hub serve`` on a free port, with an httpx client for its API."""

    def __init__(self, workdir: Path, broker_url: str, token: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.db_path = workdir / "hub.db"
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        super().__init__(
            driftless_argv(
                "hub",
                "serve",
                "--broker",
                broker_url,
                "--db",
                f"sqlite:///{self.db_path}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
            ),
            workdir / "hub.log",
        )
        self.api = httpx.Client(base_url=self.base_url + "/api/v1", timeout=10.0)

    def start(self, *, wait_mqtt: bool = True) -> None:
        super().start()
        try:
            wait_for_port("127.0.0.1", self.api_port, timeout_s=30)
            if wait_mqtt:
                wait_until(
                    lambda: self.api.get("/health").json().get("mqtt_connected"),
                    timeout_s=20,
                    what="hub MQTT link",
                )
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"hub did not come up: {exc}\n{self.log()[-3000:]}") from exc

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.api.get(f"/devices/{device_id}")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.api.get("/hub/stats").json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.terminate()
        self.api.close()


class AgentProcess(ChildProcess):
    """``driftless agent run`` for one device with its own data directory."""

    def __init__(self, workdir: Path, device_id: str, broker_url: str) -> None:
        self.device_id = device_id
        self.data_dir = workdir / f"agent-{device_id}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            driftless_argv(
                "agent",
                "run",
                "--device-id",
                device_id,
                "--broker",
                broker_url,
                "--data-dir",
                str(self.data_dir),
            ),
            workdir / f"agent-{device_id}.log",
        )
