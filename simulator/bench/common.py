"""Plumbing shared by the benchmarks: hub workers, CPU accounting, registration, results.

Rules:
- Children (broker, hubs, load clients) are stopped by whoever started them, on
  every exit path; helpers here only start, observe and stop.
- CPU time is read from ``/proc/<pid>/stat`` (utime + stime of that process,
  threads included), in seconds.
- A hub is started by the benchmark itself and its API is called with the
  admin token the hub child minted (``HubChild.headers``), so no ``--token``.
- Result files are JSON with the exact command that produced them, so
  ``simulator.bench.report`` can put the command beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from devtools import procs
from devtools.broker import wait_for_port
from plumbing import logs

T = TypeVar("T")
H = TypeVar("H", bound="HubChild")
C = TypeVar("C")


class Result(Protocol):
    """What every benchmark's run returns: it can write itself as the JSON result."""

    def as_json(self, command: str) -> Mapping[str, Any]: ...


R = TypeVar("R", bound=Result)

RESULTS_DIR = Path("bench-results")
HUB_START_FLOOR_S = 60.0
BATCH_REGISTER_MAX = 10_000  # hub.devices.models.MAX_BATCH_DEVICES
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run to the end (a part failed or a deadline passed)."""


async def poll(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    timeout_s: float,
    interval_s: float,
    what: str,
) -> T:
    """Call ``fetch`` every ``interval_s`` until ``done(value)``; raises BenchError at deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: object = None
    while True:
        try:
            value = await fetch()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if done(value):
                return value
            last = value
        if loop.time() >= deadline:
            raise BenchError(f"timed out after {timeout_s}s waiting for {what}; last={last!r}")
        await asyncio.sleep(interval_s)


class HubChild(procs.HubChild):
    """``driftless hub serve`` as a child process, with an async readiness wait."""

    async def wait_ready(self, api: httpx.AsyncClient, *, timeout_s: float) -> None:
        """Wait until the API answers and the hub's MQTT link is up; raises BenchError."""
        start = time.monotonic()
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", self.api_port, timeout_s=timeout_s)
        except TimeoutError:
            raise BenchError(f"hub API did not listen: {self.log_tail()}") from None

        async def health() -> dict[str, Any]:
            if self.exited() is not None:
                raise BenchError(f"hub exited with {self.exited()}: {self.log_tail()}")
            response = await api.get("/health")
            response.raise_for_status()
            return response.json()  # type: ignore[no-any-return]

        remaining = max(0.1, timeout_s - (time.monotonic() - start))
        await poll(
            health,
            lambda h: bool(h.get("mqtt_connected")),
            timeout_s=remaining,
            interval_s=0.05,
            what="the hub's MQTT link",
        )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        self.terminate(timeout_s)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log()[-chars:]


class HubWorker(HubChild):
    """One ``driftless hub serve`` process; several may share one SQLite file.

    Each worker has its own MQTT client id (its own persistent session) and API
    port; workers split device messages through the ``$share/hub/…`` subscriptions.
    Each mints its own admin token into the shared file (any of them works on all).
    """

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        *,
        name: str,
        db_path: Path,
        log_level: str = "info",
    ) -> None:
        super().__init__(workdir, broker_url, log_level=log_level)
        self.name = name
        self.db_path = db_path
        self.argv[self.argv.index("--db") + 1] = f"sqlite:///{db_path}"
        self.argv += ["--client-id", f"driftless-hub-{name}"]
        self.log_path = workdir / f"hub-{name}.log"


async def start_hub(
    stack: contextlib.AsyncExitStack,
    make: Callable[[], H],
    *,
    timeout_s: float,
    attempts: int = 3,
) -> tuple[H, httpx.AsyncClient]:
    """Start a hub from ``make()`` and wait until it is ready; stopped when ``stack`` closes.

    A free port can be taken by another process between ``free_port`` and the
    hub's bind (other runs share the machine): a hub that failed to bind is
    started again on a new port, up to ``attempts`` times. Raises BenchError.

    Start-up waits at least ``HUB_START_FLOOR_S``: a run's deadline bounds the
    steps it measures, and a short one (a test asking for a missed deadline)
    must not fail on a Python process starting slowly on a loaded machine.
    """
    timeout_s = max(timeout_s, HUB_START_FLOOR_S)
    for attempt in range(1, attempts + 1):
        hub = make()
        stack.callback(hub.stop)
        hub.start()
        api = await stack.enter_async_context(
            httpx.AsyncClient(base_url=hub.base_url + "/api/v1", headers=hub.headers, timeout=30.0)
        )
        try:
            await hub.wait_ready(api, timeout_s=timeout_s)
        except BenchError:
            if attempt == attempts or "address already in use" not in hub.log():
                raise
            hub.stop()
            continue
        return hub, api
    raise AssertionError("unreachable")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a live process; 0.0 if it is gone or unknown."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def rss_mib(pid: int | None) -> float:
    """Resident memory of a live process in MiB; 0.0 if it is gone or unknown."""
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def register_batch(
    api: httpx.AsyncClient, ids: Sequence[str], labels: Mapping[str, str]
) -> int:
    """Register ``ids`` through ``POST /devices/batch`` (idempotent); returns how many were new.

    Raises BenchError on a refusal.
    """
    created = 0
    for start in range(0, len(ids), BATCH_REGISTER_MAX):
        chunk = ids[start : start + BATCH_REGISTER_MAX]
        response = await api.post(
            "/devices/batch",
            json={"devices": [{"id": i, "labels": dict(labels)} for i in chunk]},
        )
        if response.status_code != 200:
            raise BenchError(
                f"POST /devices/batch: HTTP {response.status_code} {response.text[:300]}"
            )
        created += len(response.json()["created"])
    return created


async def hub_stats(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/hub/stats")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def processed_reports(stats: Mapping[str, Any]) -> int:
    """Pure: reports a hub has finished with (committed as applied, or found stale)."""
    return int(stats.get("applied", 0)) + int(stats.get("stale", {}).get("stale_report", 0))


@contextlib.contextmanager
def workdir(configured: Path | None, prefix: str) -> Iterator[Path]:
    """The given directory (kept), or a temporary one removed afterwards."""
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        yield configured.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def median(values: Sequence[float]) -> float:
    """Pure: the median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    """Pure: ``numerator / denominator``, infinity for a zero denominator."""
    return numerator / denominator if denominator > 0 else float("inf")


def host_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run (what ``report`` prints beside the figures)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_results(path: Path, document: Mapping[str, Any]) -> None:
    """Write a result file, stamped with the local date and time it was recorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {**document, "recorded_at": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(stamped, indent=2) + "\n")


def add_run_arguments(
    parser: argparse.ArgumentParser, *, result: str, deadline_s: float, hub_log_level: str
) -> None:
    """Add the options every ``run_bench_main`` benchmark takes, with its own defaults.

    ``--json`` (``result`` names the default file for its help), ``--deadline-s``,
    ``--hub-log-level``, ``--workdir`` and ``--log-level``.
    """
    parser.add_argument("--json", type=Path, default=None, help=f"default {RESULTS_DIR}/{result}")
    parser.add_argument("--deadline-s", type=float, default=deadline_s, help="limit on every wait")
    parser.add_argument("--hub-log-level", default=hub_log_level)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    parser.add_argument("--log-level", default="warning")


async def _cancelled_on_sigterm(bench: Callable[[C], Coroutine[Any, Any, R]], cfg: C) -> R:
    """``await bench(cfg)`` with SIGTERM or SIGINT cancelling this task (so clean-up runs).

    Raises KeyboardInterrupt when a signal came, even if the run then returned: Python
    3.11's ``asyncio.wait_for`` can lose a cancellation that arrives as the awaited call
    finishes, and an interrupted run must never record results.
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert task is not None
    signalled: list[int] = []

    def stop(signum: int) -> None:
        signalled.append(signum)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    try:
        result = await bench(cfg)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if signalled:
        raise KeyboardInterrupt
    return result


def run_bench_main(
    name: str,
    argv: Sequence[str] | None,
    *,
    build: Callable[[], C],
    bench: Callable[[C], Coroutine[Any, Any, R]],
    table: Callable[[R], str],
    result_file: Callable[[C], str],
    json_path: Path | None,
    log_level: str,
    failures: tuple[type[BaseException], ...],
    stopped: str,
    bad_config: tuple[type[BaseException], ...] = (ValueError,),
) -> int:
    """The shell every ``simulator.bench.<name>`` main shares: build, run, print, record.

    Logging goes to the console at ``log_level``. While ``bench`` runs, SIGTERM and
    SIGINT cancel it, so its own clean-up stops what it started; a run that saw either
    records nothing.
    Exit status 2 for a configuration ``build`` refuses (``bad_config``), 1 when
    the run raises one of ``failures``, 130 when interrupted (``stopped`` says
    what was stopped on the way out), 0 after the table is printed and the JSON
    (with the command that reproduces it) written to ``json_path`` or
    ``bench-results/<result_file(cfg)>``.
    """
    logs.configure(log_level, fmt="console")
    try:
        cfg = build()
    except bad_config as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_cancelled_on_sigterm(bench, cfg))
    except failures as exc:
        print(f"{name}: failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted; {stopped} stopped", file=sys.stderr)
        return 130
    print(table(result))
    path = json_path or RESULTS_DIR / result_file(cfg)
    write_results(path, result.as_json(command_line(f"simulator.bench.{name}", argv)))
    print(f"results written to {path}")
    return 0
