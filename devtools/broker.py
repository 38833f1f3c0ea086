"""Start and stop a real Mosquitto for development, the demo and the tests.

Rules:
- Loopback only, a free port, MQTT 5 capable, persistence on, its own data directory.
- Queue limits are set on purpose: Mosquitto's default of 1,000 queued messages
  per client silently drops the rest, and the hub's session must hold a backlog
  (reports from a whole fleet) while the hub restarts.
- ``stop()`` lets Mosquitto save its persistence file; ``kill()`` is SIGKILL and
  loses whatever was not saved, as a crash would.
- Mosquitto must not start with SIGTERM or SIGINT blocked: a child inherits the
  blocked-signal mask (not the handlers: exec resets those), and a Mosquitto
  started under such a mask never sees SIGTERM, is SIGKILLed after the grace
  period and loses its persistence. ``start()`` refuses to, with BrokerError;
  launchers catch signals with handlers instead of blocking them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hub.broker_config import (
    NoDynsecPlugin,
    TlsFiles,
    find_dynsec_plugin,
    render_tls_listener,
)

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """Mosquitto is missing, would not start, or would not stop."""


def find_mosquitto() -> str:
    """Return the path of the mosquitto binary; raises BrokerError when absent."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "mosquitto not found: install the Debian package 'mosquitto' "
        "(scripts/bootstrap.sh does this when run as root)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a port nobody holds right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout_s: float) -> None:
    """Block until a TCP connect to ``host:port`` succeeds; raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout_s}s"
                ) from None
            time.sleep(0.02)


_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


@dataclass(frozen=True)
class BrokerLimits:
    """Queue and size limits written into the generated config."""

    max_queued_messages: int = 200_000
    max_inflight_messages: int = 100
    max_packet_bytes: int = 1024 * 1024
    autosave_interval_s: int = 30


class MosquittoBroker:
    """One Mosquitto process with a generated config in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        limits: BrokerLimits | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.limits = limits or BrokerLimits()
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def pid_path(self) -> Path:
        """Mosquitto writes its pid here: the hub signals it after writing a new CRL."""
        return self.data_dir / "mosquitto.pid"

    @property
    def persistence_dir(self) -> Path:
        return self.data_dir / "persistence"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _listener_lines(self) -> list[str]:
        if self.tls is None:
            return [f"listener {self.port} {self.host}", "allow_anonymous true"]
        try:
            plugin = find_dynsec_plugin()
        except NoDynsecPlugin as exc:
            raise BrokerError(str(exc)) from None
        return render_tls_listener(self.port, self.host, self.tls, dynsec_plugin=plugin)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its config, ACL and CRL without dropping sessions."""
        if not self.running():
            raise BrokerError("broker is not running")
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)

    def write_config(self) -> Path:
        self.persistence_dir.mkdir(parents=True, exist_ok=True)
        lim = self.limits
        self.config_path.write_text(
            "\n".join(
                [
                    "# generated by driftless; edits are overwritten",
                    "per_listener_settings false",
                    "user root" if os.geteuid() == 0 else "",
                    *self._listener_lines(),
                    "persistence true",
                    f"persistence_location {self.persistence_dir}/",
                    f"autosave_interval {lim.autosave_interval_s}",
                    f"max_queued_messages {lim.max_queued_messages}",
                    "max_queued_bytes 0",
                    f"max_inflight_messages {lim.max_inflight_messages}",
                    f"max_packet_size {lim.max_packet_bytes}",
                    # Small QoS 1 messages and their PUBACKs otherwise wait on Nagle's algorithm.
                    "set_tcp_nodelay true",
                    "persistent_client_expiration 1d",
                    f"pid_file {self.pid_path}",
                    f"log_dest file {self.log_path}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "connection_messages false",
                    "",
                ]
            )
        )
        return self.config_path

    def start(self, *, timeout_s: float = 10.0) -> None:
        """Start Mosquitto and wait until it accepts connections."""
        if self.running():
            return
        blocked = _STOP_SIGNALS & signal.pthread_sigmask(signal.SIG_BLOCK, set())
        if blocked:
            names = ", ".join(sorted(signal.Signals(s).name for s in blocked))
            raise BrokerError(
                f"{names} blocked in this thread: Mosquitto would inherit the mask and never "
                "stop on SIGTERM (catch the signals with a handler instead)"
            )
        binary = find_mosquitto()
        self.write_config()
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, timeout_s=timeout_s)
        except TimeoutError:
            self._proc.kill()
            _, err = self._proc.communicate(timeout=5)
            log = self.log_path.read_text() if self.log_path.exists() else ""
            self._proc = None
            raise BrokerError(
                f"mosquitto did not listen on {self.host}:{self.port}: "
                f"{err.decode(errors='replace')[-500:]} {log[-500:]}"
            ) from None
        if self._proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with {self._proc.returncode} at start")

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout_s)
        self._close()

    def kill(self) -> None:
        """SIGKILL: like a crash, everything not yet saved is lost."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._close()

    def wipe_persistence(self) -> None:
        """Forget retained messages and sessions, as a broker on a new disk would."""
        if self.running():
            raise BrokerError("stop the broker before wiping its persistence")
        shutil.rmtree(self.persistence_dir, ignore_errors=True)

    def _close(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            with contextlib.suppress(OSError):
                self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_secure_broker(
    *,
    identity_dir: Path,
    out_dir: Path,
    host: str,
    port: int,
    hub_client_id: str,
    db_url: str | None,
) -> MosquittoBroker:
    """``driftless broker config``: a mutual-TLS Mosquitto config from the fleet CA.

    Loads (or creates) the CA in ``identity_dir`` (the hub's), writes the server
    certificate, the CRL and the ACL (from the hub's DB when ``db_url`` is given,
    so revocations made so far are in them) and ``mosquitto.conf`` under
    ``out_dir``; returns the broker object that ``start()`` would run.
    """
    import datetime as dt

    from hub.broker_config import hub_identities, write_secure_files
    from hub.identity import CertificateAuthority

    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.load_or_create(identity_dir, now=now)
    revoked: list[tuple[int, dt.datetime]] = []
    cut_off: list[str] = []
    if db_url is not None:
        from hub.db import init_db, make_engine, new_session
        from hub.enrollment import store

        engine = make_engine(db_url, busy_timeout_ms=5000)
        try:
            init_db(engine)
            with new_session(engine) as session:
                revoked, cut_off = store.revoked(session), store.cut_off_devices(session)
        finally:
            engine.dispose()
    files = write_secure_files(
        ca,
        out_dir / "tls",
        hub_identities=hub_identities(hub_client_id),
        revoked=revoked,
        now=now,
        cut_off=cut_off,
    )
    broker = MosquittoBroker(out_dir, host=host, port=port, tls=files)
    broker.write_config()
    return broker


def hub_broker_args(
    broker: MosquittoBroker,
    identity_dir: Path,
    *,
    url: str | None = None,
    acl_admins: Sequence[str] = (),
) -> list[str]:
    """The ``hub serve`` flags for a mutual-TLS ``broker`` beside the hub.

    The broker's URL (``url`` when devices reach it by another name), the fleet CA,
    and the CRL, ACL and pid file the hub keeps and reloads the broker by;
    ``acl_admins`` are more names with the hub's broker rights.
    """
    if broker.tls is None:
        raise BrokerError("a plain broker has no CRL or ACL for the hub to keep")
    url = url or broker.url
    args = [
        "--broker", url, "--identity-dir", str(identity_dir), "--public-broker-url", url,
        "--broker-crl", str(broker.tls.crl), "--broker-acl", str(broker.tls.acl),
        "--broker-pid-file", str(broker.pid_path),
    ]  # fmt: skip
    for name in acl_admins:
        args += ["--broker-acl-admin", name]
    return args
