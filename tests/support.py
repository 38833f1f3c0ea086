"""Test plumbing: the real hub and agent processes (devtools.procs), deadlines instead of sleeps.

Rule: every helper here waits for an observable event with a deadline and says
what it was waiting for when the deadline passes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families

from devtools.broker import wait_for_port
from devtools.procs import AgentChild, HubChild
from tests.pki import TestBroker

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


class Scrape:
    """A ``/metrics`` answer parsed with prometheus_client's parser of the text format."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; AssertionError naming what there is."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples:
            seen = sorted(k for k in self.samples if k[0] == name)
            raise AssertionError(f"no sample {name}{labels}; samples of that name: {seen}")
        return self.samples[key]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))


def run_bench(
    module: str, argv: Sequence[str], *, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """``python -m simulator.bench.<module> argv``; past ``timeout_s`` it is interrupted.

    SIGINT, not SIGKILL: a benchmark stops its broker, hub and agents on the way out
    (they run in sessions of their own, so killing the benchmark alone leaves them
    running). Raises AssertionError at the deadline, with what it printed.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", f"simulator.bench.{module}", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(
            f"simulator.bench.{module} still running after {timeout_s}s; interrupted "
            f"(exit {proc.returncode})\n{out[-3000:]}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class HubProcess(HubChild):
    """The hub as a real child process, with an httpx client for its API (as admin).

    Given a :class:`TestBroker`, it shares the broker's fleet CA (mutual TLS).
    """

    def __init__(
        self, workdir: Path, broker: TestBroker | str, *, manage_broker: bool = False
    ) -> None:
        """``manage_broker``: the hub keeps the broker's CRL and ACL (``TestBroker.hub_args``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        url = broker if isinstance(broker, str) else broker.url
        super().__init__(workdir, url, log_level="debug", token_name="tests")
        if not isinstance(broker, str):
            self.argv += broker.hub_args(manage=manage_broker)
        self.api = self.client()

    def client(self, token: str | None = None) -> httpx.Client:
        """A client for ``/api/v1`` with ``token`` (default: the admin token); close it."""
        headers = self.headers if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.base_url + "/api/v1", headers=headers, timeout=10.0)

    def start(self, *, wait_mqtt: bool = True) -> None:
        for _attempt in range(3):  # a free port can be taken before the hub binds it
            super().start()
            wait_until(
                lambda: self.exited() is not None or port_open(self.api_port),
                timeout_s=30,
                what="hub listening or exited",
            )
            if not self.lost_port_race():
                break
            self.move_to_free_port()
            self.api.close()
            self.api = self.client()
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


class AgentProcess(AgentChild):
    """``driftless agent run`` for one device with its own data directory.

    ``root`` and ``hub_url`` become ``--root`` and ``--hub-url``; ``extra`` is
    appended as it is (e.g. ``["--fetch-window", "2"]``). Given a secure
    :class:`TestBroker`, the data directory is enrolled first (its own
    certificate from the broker's fleet CA); without ``root`` the agent runs
    ``--insecure-unsigned``.
    """

    def __init__(
        self,
        workdir: Path,
        device_id: str,
        broker: TestBroker | str,
        *,
        root: Path | None = None,
        enrolled: bool = False,
        hub_url: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        url = broker if isinstance(broker, str) else broker.url
        pki = None if isinstance(broker, str) else broker.pki
        super().__init__(
            workdir, device_id, url, root=root, enrolled=enrolled or pki is not None,
            log_level="debug",
        )  # fmt: skip
        if pki is not None:
            pki.enroll_agent(self.data_dir, device_id, broker_url=url, root=root)
            if root is None:
                self.argv.append("--insecure-unsigned")
        if hub_url is not None:
            self.argv += ["--hub-url", hub_url]
        self.argv += list(extra)


def kill_workloads_under(root: Path) -> list[int]:
    """SIGKILL the process group of every supervised workload (it carries the runtime's
    ``DRIFTLESS_INSTANCE`` marker) whose working directory is under ``root``; returns
    their pids. Nothing else is signalled."""
    killed: list[int] = []
    prefix = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue  # gone, or not ours to read
        if b"DRIFTLESS_INSTANCE=" not in environ or not cwd.startswith(prefix):
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            killed.append(pid)
    return killed
