"""API latency benchmark: listing and reading devices with 10,000 registered, idle and busy.

``python -m simulator.bench.api_latency --devices 10000`` starts its own
Mosquitto and hub (``driftless hub serve``, SQLite) on loopback, registers N
devices (``POST /api/v1/devices/batch``) and then, R times, measures the same
bounded request schedule in three phases:

- ``idle``: nothing else happens (**the baseline**);
- ``steady``: a paho publisher (:mod:`simulator.bench.mqttload`) sends valid
  reports for all N devices at ``steady_rate`` per second (10,000 devices
  reporting every 10 s is 1,000/s);
- ``saturated``: the publisher sends flat out, faster than the hub ingests, so
  the hub's ingest runs at its limit for the whole measurement.

The schedule, from one httpx client, one request at a time (keep-alive):
``requests`` pairs of ``GET /api/v1/devices?limit=100&offset=K`` (K a random
multiple of 100) and ``GET /api/v1/devices/{id}`` (a random id), seeded. The
latency is the client's wall time per request. Each phase reports the median
and the 99th percentile per endpoint, how many reports per second the hub
committed meanwhile, and whether its ingest was busy for the whole window (it
still had reports to process when the last request returned).

Rules:
- Loopback only; every wait has a deadline; every load and schedule is bounded.
- Broker, hub and publisher are stopped at exit, on error and on SIGTERM.
- After a busy phase the publisher is stopped and the hub drains its backlog
  before the next phase starts, so an idle phase is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import BrokerError, MosquittoBroker, wait_for_port
from simulator.bench.common import (
    BenchError,
    HubChild,
    HubWorker,
    add_run_arguments,
    cpu_seconds,
    host_info,
    hub_stats,
    median,
    poll,
    processed_reports,
    ratio,
    register_batch,
    run_bench_main,
    start_hub,
    workdir,
)
from simulator.bench.mqttload import REPORT_ROOT, LoadChild, LoadError
from simulator.fleet import device_ids

PHASES = ("idle", "steady", "saturated")
ENDPOINTS = ("list", "get")
LABELS = {"bench": "api"}
PREFIX = "api"
PAGE = 100


@dataclass(frozen=True)
class ApiConfig:
    devices: int = 10_000
    requests: int = 500  # per endpoint and phase
    repeats: int = 3
    steady_rate: float = 1000.0  # reports per second in the steady phase
    saturating_messages: int = 150_000  # the flat-out publisher's whole load: outlasts the window
    deadline_s: float = 180.0
    seed: int = 0
    hub_log_level: str = "info"
    workdir: Path | None = None
    # Serve the requests from a second, API-only hub process on the same database
    # (``hub serve --no-link``), away from the process that ingests.
    api_process: bool = False

    def __post_init__(self) -> None:
        if self.devices < PAGE or self.requests < 1 or self.repeats < 1:
            raise ValueError(f"need devices >= {PAGE}, requests >= 1 and repeats >= 1")
        if self.steady_rate <= 0 or self.saturating_messages < self.devices:
            raise ValueError("steady_rate must be positive, saturating_messages >= devices")
        if self.deadline_s <= 0:
            raise ValueError("deadline_s must be positive")


def percentile(values: Sequence[float], q: float) -> float:
    """Pure: the ``q`` quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latencies:
    """One endpoint in one phase: seconds per request."""

    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latencies:
        return cls(
            n=len(seconds),
            p50_ms=1000 * percentile(seconds, 0.5),
            p99_ms=1000 * percentile(seconds, 0.99),
            max_ms=1000 * max(seconds, default=float("nan")),
        )


@dataclass(frozen=True)
class PhaseRun:
    phase: str
    index: int
    endpoints: dict[str, Latencies]
    window_s: float
    reports_per_s: float  # the hub's committed reports per second during the window
    busy_throughout: bool  # the hub still had reports to ingest at the window's end
    hub_cpu_s: float


@dataclass
class ApiResult:
    config: ApiConfig
    setup_s: dict[str, float] = field(default_factory=dict)
    runs: list[PhaseRun] = field(default_factory=list)
    hub_stats: dict[str, Any] = field(default_factory=dict)

    def medians(self) -> dict[str, dict[str, dict[str, float]]]:
        """Pure: phase -> endpoint -> median over the repeats of p50 and p99 (ms)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for phase in PHASES:
            runs = [r for r in self.runs if r.phase == phase]
            if not runs:
                continue
            out[phase] = {
                endpoint: {
                    "p50_ms": median([r.endpoints[endpoint].p50_ms for r in runs]),
                    "p99_ms": median([r.endpoints[endpoint].p99_ms for r in runs]),
                }
                for endpoint in ENDPOINTS
            }
            out[phase]["load"] = {
                "reports_per_s": median([r.reports_per_s for r in runs]),
                "busy_throughout": float(all(r.busy_throughout for r in runs)),
            }
        return out

    def ratios(self) -> dict[str, float]:
        """Pure: busy p99 over idle p99, per phase and endpoint (medians over medians)."""
        m = self.medians()
        out: dict[str, float] = {}
        for phase in PHASES[1:]:
            for endpoint in ENDPOINTS:
                if phase in m and "idle" in m:
                    out[f"{phase}_{endpoint}_p99_over_idle"] = ratio(
                        m[phase][endpoint]["p99_ms"], m["idle"][endpoint]["p99_ms"]
                    )
        return out

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "api_latency",
            "command": command,
            "devices": self.config.devices,
            "requests": self.config.requests,
            "repeats": self.config.repeats,
            "config": config,
            "host": host_info(),
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "runs": [asdict(r) for r in self.runs],
            "median": self.medians(),
            "ratios": {k: round(v, 3) for k, v in self.ratios().items()},
            "hub_stats": self.hub_stats,
        }


def format_table(result: ApiResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    lines = [
        f"api_latency: {cfg.devices} devices, {cfg.requests} requests per endpoint and phase, "
        f"{cfg.repeats} repeats, one client, loopback"
        + (", API from an API-only process" if cfg.api_process else ""),
        f"{'(ms, median of repeats)':<26}{'list p50':>10}{'list p99':>10}"
        f"{'get p50':>10}{'get p99':>10}{'reports/s':>11}  busy",
    ]
    for phase, row in result.medians().items():
        lines.append(
            f"{phase:<26}{row['list']['p50_ms']:>10.1f}{row['list']['p99_ms']:>10.1f}"
            f"{row['get']['p50_ms']:>10.1f}{row['get']['p99_ms']:>10.1f}"
            f"{row['load']['reports_per_s']:>11.0f}  "
            + ("yes" if row["load"]["busy_throughout"] else "no")
        )
    for name, value in result.ratios().items():
        lines.append(f"ratio {name.replace('_over_', ' / ').replace('_', ' ')}: {value:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring


class Bench:
    def __init__(self, cfg: ApiConfig, broker: MosquittoBroker) -> None:
        self.cfg = cfg
        self.broker = broker
        self.ids = device_ids(cfg.devices, PREFIX)
        self.rng = random.Random(cfg.seed)
        self.next_seq = 1
        self.hub: HubChild | None = None
        self.api: httpx.AsyncClient | None = None
        self.query: httpx.AsyncClient | None = None  # where the timed requests go

    async def processed(self) -> int:
        assert self.api is not None
        return processed_reports(await hub_stats(self.api))

    async def schedule(self) -> dict[str, list[float]]:
        """The bounded request schedule; raises BenchError on an unexpected status."""
        api = self.query or self.api
        assert api is not None
        cfg = self.cfg
        pages = cfg.devices // PAGE
        took: dict[str, list[float]] = {endpoint: [] for endpoint in ENDPOINTS}
        for _ in range(cfg.requests):
            requests = [
                ("list", "/devices", {"limit": PAGE, "offset": PAGE * self.rng.randrange(pages)}),
                ("get", f"/devices/{self.rng.choice(self.ids)}", None),
            ]
            for endpoint, path, params in requests:
                start = time.perf_counter()
                response = await api.get(path, params=params)
                took[endpoint].append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise BenchError(f"GET {path}: HTTP {response.status_code}")
        return took

    def publisher(self, messages: int, rate: float) -> LoadChild:
        cfg = self.cfg
        seq_start = self.next_seq
        self.next_seq += -(-messages // cfg.devices)
        return LoadChild(
            "publish",
            [
                *("--port", str(self.broker.port), "--root", REPORT_ROOT),
                *("--devices", str(cfg.devices), "--prefix", PREFIX),
                *("--messages", str(messages), "--seq-start", str(seq_start)),
                *("--rate", str(rate), "--v311", "--deadline-s", str(cfg.deadline_s)),
            ],
        )

    async def drain(self) -> None:
        """Wait until the hub's processed count stops moving (its backlog is done)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.deadline_s
        last = await self.processed()
        while True:
            await asyncio.sleep(1.0)
            now = await self.processed()
            if now == last:
                return
            if loop.time() > deadline:
                raise BenchError(f"the hub was still ingesting after {self.cfg.deadline_s}s")
            last = now

    async def phase(self, phase: str, index: int) -> PhaseRun:
        cfg = self.cfg
        assert self.hub is not None
        publisher: LoadChild | None = None
        if phase == "steady":
            # enough for the window at this rate, with room: the publisher is stopped after it
            publisher = self.publisher(
                int(cfg.steady_rate * (60 + cfg.requests * 0.1)), cfg.steady_rate
            )
        elif phase == "saturated":
            publisher = self.publisher(cfg.saturating_messages, 0.0)
        try:
            if publisher is not None:
                start = await self.processed()
                await publisher.start()
                await publisher.wait_event("start", timeout_s=cfg.deadline_s)
                await poll(  # the hub's ingest is under way
                    self.processed,
                    lambda n: n >= start + min(500, cfg.devices),
                    timeout_s=cfg.deadline_s,
                    interval_s=0.05,
                    what=f"{phase}: the hub ingesting",
                )
            before, cpu0, t0 = await self.processed(), cpu_seconds(self.hub.pid), time.monotonic()
            took = await self.schedule()
            window = time.monotonic() - t0
            after, cpu = await self.processed(), cpu_seconds(self.hub.pid) - cpu0
            busy = publisher is not None and await self._still_ingesting(after)
        finally:
            if publisher is not None:
                await publisher.stop()
        if publisher is not None:
            await self.drain()
        return PhaseRun(
            phase=phase,
            index=index,
            endpoints={e: Latencies.of(took[e]) for e in ENDPOINTS},
            window_s=window,
            reports_per_s=(after - before) / window if window > 0 else 0.0,
            busy_throughout=busy,
            hub_cpu_s=cpu,
        )

    async def _still_ingesting(self, seen: int) -> bool:
        await asyncio.sleep(0.2)
        return await self.processed() > seen


async def run_bench(cfg: ApiConfig) -> ApiResult:
    """The whole benchmark; raises BenchError, LoadError or BrokerError."""
    result = ApiResult(config=cfg)
    clock = time.perf_counter
    with workdir(cfg.workdir, "driftless-api-") as work:
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(work / "broker")
            stack.callback(broker.stop)
            broker.start()
            bench = Bench(cfg, broker)
            bench.hub, bench.api = await start_hub(
                stack,
                lambda: HubChild(work, broker.url, log_level=cfg.hub_log_level),
                timeout_s=cfg.deadline_s,
            )
            if cfg.api_process:
                bench.query = await start_api_process(stack, work, broker.url, bench.hub, cfg)
            result.setup_s["broker_and_hub"] = clock() - t
            t = clock()
            await register_batch(bench.api, bench.ids, LABELS)
            result.setup_s["register"] = clock() - t
            await bench.schedule()  # warm-up: connection, caches, page cache
            for index in range(1, cfg.repeats + 1):
                for phase in PHASES:
                    result.runs.append(await bench.phase(phase, index))
            with contextlib.suppress(httpx.HTTPError, ValueError):
                result.hub_stats = await hub_stats(bench.api)
    return result


async def start_api_process(
    stack: contextlib.AsyncExitStack, work: Path, broker_url: str, hub: HubChild, cfg: ApiConfig
) -> httpx.AsyncClient:
    """An API-only hub (``--no-link``) on ``hub``'s database; its client."""
    api_hub = HubWorker(
        work, broker_url, name="api", db_path=hub.db_path, log_level=cfg.hub_log_level
    )
    api_hub.argv += ["--no-link"]
    stack.callback(api_hub.stop)
    api_hub.start()
    client = await stack.enter_async_context(
        httpx.AsyncClient(base_url=api_hub.base_url + "/api/v1", headers=api_hub.headers)
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", api_hub.api_port, timeout_s=30)
    except TimeoutError:
        raise BenchError(f"API-only hub did not listen: {api_hub.log_tail()}") from None
    return client


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.api_latency", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500, help="per endpoint and phase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steady-rate", type=float, default=1000.0, help="reports per second")
    parser.add_argument("--saturating-messages", type=int, default=150_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-process",
        action="store_true",
        help="time an API-only hub process (hub serve --no-link) on the same database",
    )
    add_run_arguments(parser, result="api-N.json", deadline_s=180.0, hub_log_level="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "api_latency",
        argv,
        build=lambda: ApiConfig(
            devices=args.devices,
            requests=args.requests,
            repeats=args.repeats,
            steady_rate=args.steady_rate,
            saturating_messages=args.saturating_messages,
            deadline_s=args.deadline_s,
            seed=args.seed,
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
            api_process=args.api_process,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: (
            f"api-{cfg.devices}{'-api-process' if cfg.api_process else ''}.json"
        ),
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, LoadError, BrokerError),
        stopped="broker, hub and publisher",
    )


if __name__ == "__main__":
    sys.exit(main())
