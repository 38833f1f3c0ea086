"""Plumbing shared by the benchmarks: hub workers, CPU accounting, registration, results.

Rules:
- Children (broker, hubs, load clients) are stopped by whoever started them, on
  every exit path; helpers here only start, observe and stop.
- CPU time is read from ``/proc/<pid>/stat`` (utime + stime of that process,
  threads included), in seconds.
- Result files are JSON with the exact command that produced them, so
  ``simulator.bench.report`` can put the command beside the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from simulator.bench.converge import BenchError, HubChild

RESULTS_DIR = Path("bench-results")
BATCH_REGISTER_MAX = 10_000  # hub.models.MAX_BATCH_DEVICES
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class HubWorker(HubChild):
    """One ``driftless hub serve`` process; several may share one SQLite file.

    Each worker has its own MQTT client id (its own persistent session) and API
    port; workers split device messages through the ``$share/hub/…`` subscriptions.
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

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
