"""Driftless processes as real children: the hub and agents for the demo, benchmarks and tests.

Rules:
- A child runs ``python -m driftless.cli …`` in its own session, its output in a log file.
- ``terminate`` is SIGTERM then, after a deadline, SIGKILL; ``kill`` is SIGKILL, as a crash.
- Nothing here waits without a deadline.
- A hub child mints an ``admin`` API token in its database before it starts
  (``.token``, ``.headers``); the secret lives only in this object.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from devtools.broker import free_port


class DriftlessChild:
    """One ``driftless`` subcommand as a child process."""

    def __init__(self, args: list[str], log_path: Path, *, log_level: str = "info") -> None:
        self.argv = [sys.executable, "-m", "driftless.cli", "--log-level", log_level, *args]
        self.log_path = log_path
        self.env: dict[str, str] = {}  # added to this process's environment for the child
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running():
            raise RuntimeError(f"{self.argv} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> int | None:
        """The exit status, or None while running (or never started)."""
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout_s``; returns the exit status."""
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


class HubChild(DriftlessChild):
    """``driftless hub serve`` on a loopback port (a free one unless given)."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        *,
        api_port: int | None = None,
        log_level: str = "info",
        token_name: str = "driftless",
        trust_root: Path | None = None,
        signing_key: Path | None = None,
    ) -> None:
        """``trust_root`` and ``signing_key`` become ``--trust-root`` and ``--signing-key``."""
        self.api_port = api_port or free_port()
        self.db_path = workdir / "hub.db"
        self.token_name = token_name
        self._token: str | None = None
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        super().__init__(
            [
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
                *(["--trust-root", str(trust_root)] if trust_root else []),
                *(["--signing-key", str(signing_key)] if signing_key else []),
            ],
            workdir / "hub.log",
            log_level=log_level,
        )

    @property
    def token(self) -> str:
        """An admin API token for this hub's database, minted on first use.

        Minted with ``hub.admin_cli`` into ``db_path`` (the file and its tables are
        created if need be), named ``<token_name>-<random>`` so that several
        children may share one database. Raises TokenNameTaken or ValueError.
        """
        if self._token is None:
            from hub.admin_cli import mint_token
            from hub.auth.models import Role

            self._token = mint_token(
                db_url=f"sqlite:///{self.db_path}",
                name=f"{self.token_name}-{secrets.token_hex(4)}",
                role=Role.admin,
            )
        return self._token

    @property
    def headers(self) -> dict[str, str]:
        """``Authorization: Bearer <token>`` for every API call but ``/health``."""
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> None:
        _ = self.token  # minted before the hub opens the database
        super().start()

    def lost_port_race(self) -> bool:
        """True when the hub exited because its port was taken after we picked it."""
        return self.exited() is not None and "address already in use" in self.log()

    def move_to_free_port(self) -> None:
        """Pick another free port (after :meth:`lost_port_race`); only while stopped."""
        if self.running():
            raise RuntimeError("stop the hub before moving it to another port")
        port = free_port()
        index = self.argv.index("--port") + 1
        self.argv[index] = str(port)
        self.api_port = port
        self.base_url = f"http://127.0.0.1:{port}"


class AgentChild(DriftlessChild):
    """``driftless agent run`` for one device, data in ``workdir/agent-<id>``."""

    def __init__(
        self,
        workdir: Path,
        device_id: str,
        broker_url: str,
        *,
        root: Path | None = None,
        enrolled: bool = False,
        log_level: str = "info",
    ) -> None:
        """``enrolled``: the data directory holds an enrollment (certificate, CA, root)."""
        self.device_id = device_id
        self.data_dir = workdir / f"agent-{device_id}"
        # Without the fleet's root the agent cannot verify anything: say so explicitly.
        if root is not None:
            trust = ["--root", str(root)]
        elif enrolled:
            trust = []  # the agent finds the root (and its certificate) in its data dir
        else:
            trust = ["--insecure-unsigned"]
        super().__init__(
            [
                "agent",
                "run",
                "--device-id",
                device_id,
                "--broker",
                broker_url,
                "--data-dir",
                str(self.data_dir),
                *trust,
            ],
            workdir / f"agent-{device_id}.log",
            log_level=log_level,
        )
