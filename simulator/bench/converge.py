"""Convergence benchmark: one fleet-wide desired change, against a bare MQTT round trip.

``python -m simulator.bench.converge --devices 1000`` starts its own Mosquitto
and hub on loopback, registers N devices through the API, runs N simulated
devices (the real agent core) and then, R times each, on the same broker:

- BASELINE: a bare aiomqtt publisher sends N QoS 1 messages the size of a
  desired document to per-device topics; a bare echo client (wildcard
  subscription) republishes each to an echo topic; the time is from the first
  publish until the publisher has all N echoes.
- OURS: one ``PUT /api/v1/fleet/desired`` (or, with ``--via deployment``, one
  ``PUT /api/v1/deployments/bench`` of a ``fleet`` deployment whose selector
  matches every device, its one workload changed each round: issue 14); the time
  is from sending it until
  ``GET /api/v1/fleet/summary`` (polled every ``poll_interval_s``) shows
  ``in_sync == total``. Milestones beside it, on the same clock: the PUT
  returned; every device had received its document (hub publish + broker); the
  broker had acknowledged every device's report (what follows is hub ingest).

Rules:
- Loopback only. Every wait has a deadline (``deadline_s``); every count is N.
- The broker and the hub are stopped at exit, on error and on SIGINT/SIGTERM.
- The baseline's echo client runs in the same process as the fleet, as the
  devices do, so both sides pay the same process layout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import httpx

from devtools.broker import BrokerError, MosquittoBroker
from firmware_bundles.devfleet import DevFleet
from protocols import Desired, encode
from simulator.bench.common import (
    BenchError,
    HubChild,
    add_run_arguments,
    poll,
    register_batch,
    run_bench_main,
    start_hub,
)
from simulator.fleet import Fleet, FleetConfig, FleetError, FleetTimeout, device_ids

__all__ = ["BenchError", "HubChild", "poll"]  # imported from here by older callers and tests

LABELS = {"bench": "converge"}
SELECTOR = "bench=converge"  # LABELS as a deployment's selector: every device
DEPLOYMENT = "bench"
Via = Literal["fleet", "deployment"]
BASELINE_ROOT = "bench/baseline"
DOCUMENT_BYTES = 256  # target size of the desired document and of the baseline payload


@dataclass(frozen=True)
class BenchConfig:
    devices: int
    repeats: int = 3
    deadline_s: float = 120.0
    poll_interval_s: float = 0.02
    baseline_inflight: int = 100
    max_concurrent_connects: int = 64
    apply_time_s: float = 0.0
    seed: int = 0
    hub_log_level: str = "info"
    workdir: Path | None = None  # None: a temporary directory, removed afterwards
    # The hub signs every document (hub key) and every device verifies it (fleet root).
    signed: bool = False
    # How the change is made: the fleet's own document, or a fleet deployment (issue 14).
    via: Via = "fleet"

    def __post_init__(self) -> None:
        if self.devices < 1 or self.repeats < 1:
            raise ValueError("devices and repeats must be at least 1")
        if self.via not in ("fleet", "deployment"):
            raise ValueError(f"via must be 'fleet' or 'deployment', not {self.via!r}")
        if self.deadline_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("deadline_s and poll_interval_s must be positive")


@dataclass(frozen=True)
class Round:
    index: int
    baseline_s: float
    ours_s: float
    ours_put_s: float  # the PUT's response arrived
    ours_delivered_s: float  # every device had received its new document
    ours_reported_s: float  # the broker had acknowledged every device's report


@dataclass
class BenchResult:
    config: BenchConfig
    payload_bytes: int
    setup_s: dict[str, float] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    fleet_counters: dict[str, Any] = field(default_factory=dict)
    hub_stats: dict[str, Any] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        """Pure: the median of each timing over the rounds."""
        names = ("baseline_s", "ours_s", "ours_put_s", "ours_delivered_s", "ours_reported_s")
        return {n: statistics.median(getattr(r, n) for r in self.rounds) for n in names}

    def ratio(self) -> float:
        """Pure: median ours / median baseline."""
        m = self.medians()
        return m["ours_s"] / m["baseline_s"] if m["baseline_s"] > 0 else float("inf")

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "converge",
            "via": self.config.via,
            "command": command,
            "devices": self.config.devices,
            "repeats": self.config.repeats,
            "payload_bytes": self.payload_bytes,
            "config": config,
            "host": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "rounds": [asdict(r) for r in self.rounds],
            "median": {k: round(v, 4) for k, v in self.medians().items()},
            "ratio_ours_over_baseline": round(self.ratio(), 3),
            "fleet_counters": self.fleet_counters,
            "hub_stats": self.hub_stats,
        }


def format_table(result: BenchResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    rows = [
        ("baseline: bare MQTT echo", "baseline_s"),
        ("ours: PUT returned", "ours_put_s"),
        ("ours: documents delivered", "ours_delivered_s"),
        ("ours: devices reported", "ours_reported_s"),
        ("ours: summary in sync", "ours_s"),
    ]
    head = f"{'(seconds)':<28}" + "".join(f"{'run ' + str(r.index):>9}" for r in result.rounds)
    lines = [
        f"converge: {cfg.devices} devices, {cfg.repeats} repeats, "
        f"{result.payload_bytes}-byte documents, "
        f"{'signed and verified' if cfg.signed else 'unsigned'}, loopback, "
        + (
            "via PUT /fleet/desired"
            if cfg.via == "fleet"
            else f"via PUT /deployments/{DEPLOYMENT} (fleet, selector {SELECTOR!r})"
        ),
        head + f"{'median':>9}",
    ]
    medians = result.medians()
    for label, name in rows:
        cells = "".join(f"{getattr(r, name):>9.3f}" for r in result.rounds)
        lines.append(f"{label:<28}{cells}{medians[name]:>9.3f}")
    lines.append(f"ratio ours/baseline (median): {result.ratio():.2f}x")
    return "\n".join(lines)


def bench_config(
    round_no: int, device_id: str, target_bytes: int = DOCUMENT_BYTES
) -> dict[str, Any]:
    """Pure: the desired config for a round, padded so the whole document is ~target_bytes."""
    config: dict[str, Any] = {"bench": "converge", "round": round_no, "pad": ""}
    size = len(_document(device_id, config))
    config["pad"] = "x" * max(0, target_bytes - size)
    return config


def deployment_workload(
    round_no: int, device_id: str, target_bytes: int = DOCUMENT_BYTES
) -> dict[str, Any]:
    """Pure: the bench deployment's one workload for a round, padded so that the document
    it makes on a device is ~target_bytes (the same size as ``bench_config``'s)."""
    entry: dict[str, Any] = {"name": "bench", "config": {"round": round_no, "pad": ""}}
    size = len(_document(device_id, {"workloads": [entry]}))
    entry["config"]["pad"] = "x" * max(0, target_bytes - size)
    return entry


def _document(device_id: str, config: dict[str, Any]) -> bytes:
    return encode(
        Desired(device_id=device_id, generation=1_000, config=config, issued_at=time.time())
    )


# ---------------------------------------------------------------- waiting


async def fleet_summary(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/fleet/summary")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


# ---------------------------------------------------------------- baseline


class Baseline:
    """publisher -> broker -> echo client -> broker -> publisher, N messages, bare aiomqtt."""

    def __init__(
        self, host: str, port: int, ids: Sequence[str], *, payload_bytes: int, inflight: int
    ) -> None:
        self.host, self.port = host, port
        self.in_topics = [f"{BASELINE_ROOT}/{i}/in" for i in ids]
        self.payload_bytes = payload_bytes
        self.inflight = inflight
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tag = b""
        self._received = 0
        self._expected = len(self.in_topics)
        self._all_back = asyncio.Event()
        self._pub: aiomqtt.Client | None = None

    def _client(self, identifier: str) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=self.inflight,
        )
        client.pending_calls_threshold = 10 * len(self.in_topics)  # no warning per burst
        return client

    async def __aenter__(self) -> Baseline:
        echo = await self._stack.enter_async_context(self._client("bench-baseline-echo"))
        pub = await self._stack.enter_async_context(self._client("bench-baseline-pub"))
        self._stack.push_async_callback(self._cancel_tasks)
        await echo.subscribe(f"{BASELINE_ROOT}/+/in", qos=1)
        await pub.subscribe(f"{BASELINE_ROOT}/+/echo", qos=1)
        self._spawn(self._echo(echo))
        self._spawn(self._collect(pub))
        self._pub = pub
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _echo(self, echo: aiomqtt.Client) -> None:
        async for message in echo.messages:
            out = message.topic.value[: -len("/in")] + "/echo"
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self._spawn(echo.publish(out, payload, qos=1))

    async def _collect(self, pub: aiomqtt.Client) -> None:
        async for message in pub.messages:
            payload = message.payload
            if isinstance(payload, bytes) and payload.startswith(self._tag):
                self._received += 1
                if self._received == self._expected:
                    self._all_back.set()

    async def measure(self, round_no: int, *, timeout_s: float, part: slice | None = None) -> float:
        """Seconds from the first publish until all N echoes are back; raises BenchError.

        ``part`` sends to a slice of the devices' topics only (a rollout's wave); every
        call needs its own ``round_no`` (echoes of another round are not counted).
        """
        assert self._pub is not None, "use 'async with Baseline(...)'"
        pub = self._pub
        topics = self.in_topics if part is None else self.in_topics[part]
        if not topics:
            raise BenchError(f"baseline: no devices in {part}")
        self._tag = f"round-{round_no}:".encode()
        payload = self._tag + b"x" * max(0, self.payload_bytes - len(self._tag))
        self._received = 0
        self._expected = len(topics)
        self._all_back.clear()
        gate = asyncio.Semaphore(self.inflight)

        async def send(name: str) -> None:
            async with gate:
                await pub.publish(name, payload, qos=1)

        start = time.perf_counter()
        sends = asyncio.gather(*(send(name) for name in topics))
        try:
            await asyncio.wait_for(self._all_back.wait(), timeout_s)
        except TimeoutError:
            sends.cancel()
            raise BenchError(
                f"baseline: {self._received}/{len(topics)} echoes after {timeout_s}s"
            ) from None
        elapsed = time.perf_counter() - start
        await asyncio.wait_for(sends, timeout_s)
        return elapsed


# ---------------------------------------------------------------- ours


async def measure_ours(
    api: httpx.AsyncClient,
    fleet: Fleet,
    round_no: int,
    *,
    cfg: BenchConfig,
    document: dict[str, Any],
) -> Round:
    """One fleet-wide PUT, timed to the summary showing every device in sync.

    Milestones on the way (same clock, from before the PUT): the PUT's response
    (which may come after the rest, see below), every device has received its new
    document (hub publish + broker), and the broker has acknowledged every device's
    report (the rest is hub ingest).
    """
    total = len(fleet)
    before = fleet.counters.snapshot()
    start = time.perf_counter()

    async def milestone(name: str, counter: str) -> float:
        await fleet.wait_until(
            lambda c: getattr(c, counter) >= before[counter] + total,
            timeout_s=cfg.deadline_s,
            what=f"round {round_no}: {total} {name}",
        )
        return time.perf_counter() - start

    async def change() -> float:
        """The PUT; seconds until its answer (checked: every device changed)."""
        if cfg.via == "deployment":
            path = f"/deployments/{DEPLOYMENT}"
            body: dict[str, Any] = {"spec": {"selector": SELECTOR, "workloads": [document]}}
        else:
            path = "/fleet/desired"
            body = {"selector": {"labels": LABELS}, "config": document}
        response = await api.put(path, json=body)
        answered_s = time.perf_counter() - start
        changed = None
        if response.status_code == 200:
            answer = response.json()
            changed = (
                answer["preview"]["summary"]["changed"]
                if cfg.via == "deployment"
                else answer.get("updated")
            )
        if changed != total:
            raise BenchError(f"PUT {path}: HTTP {response.status_code} {response.text[:300]}")
        return answered_s

    delivered = asyncio.create_task(milestone("documents received", "desired_received"))
    reported = asyncio.create_task(milestone("reports acknowledged", "reports_sent"))
    put = asyncio.create_task(change())
    try:
        # Poll from the PUT's answer or from every device having its new document,
        # whichever comes first: from either on, in_sync == total means the new
        # generation (a device gets a document only after the hub committed it). A
        # deployment's answer carries the preview (~450 bytes per changed device), read by
        # this process, whose event loop also runs the fleet: while the documents
        # arrive, reading it can take longer than the devices take to apply them.
        done, _ = await asyncio.wait({put, delivered}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # raises BenchError or the HTTP error
        summary = await poll(
            lambda: fleet_summary(api),
            lambda s: s["total"] == total and s["in_sync"] == total,
            timeout_s=cfg.deadline_s,
            interval_s=cfg.poll_interval_s,
            what=f"round {round_no}: in_sync == {total}",
        )
        in_sync_s = time.perf_counter() - start
        put_s = await put
        delivered_s, reported_s = await delivered, await reported
    finally:
        for task in (put, delivered, reported):
            task.cancel()
    if summary["failed"]:
        raise BenchError(f"round {round_no}: {summary['failed']} devices failed: {summary}")
    return Round(
        index=round_no,
        baseline_s=float("nan"),
        ours_s=in_sync_s,
        ours_put_s=put_s,
        ours_delivered_s=delivered_s,
        ours_reported_s=reported_s,
    )


# ---------------------------------------------------------------- the run


@contextlib.contextmanager
def _workdir(configured: Path | None) -> Iterator[Path]:
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        yield configured.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="driftless-bench-") as tmp:
        yield Path(tmp)


async def run_bench(cfg: BenchConfig) -> BenchResult:
    """The whole benchmark; raises BenchError (or FleetError/FleetTimeout/BrokerError)."""
    ids = device_ids(cfg.devices)

    def change(round_no: int) -> dict[str, Any]:
        if cfg.via == "deployment":
            return deployment_workload(round_no, ids[0])
        return bench_config(round_no, ids[0])

    first = change(1)
    payload_bytes = len(
        _document(ids[0], {"workloads": [first]} if cfg.via == "deployment" else first)
    )
    result = BenchResult(config=cfg, payload_bytes=payload_bytes)
    clock = time.perf_counter
    with _workdir(cfg.workdir) as workdir:
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(workdir / "broker")
            stack.callback(broker.stop)
            broker.start()
            result.setup_s["broker_start"] = clock() - t

            trust = DevFleet(workdir / "fleet") if cfg.signed else None
            t = clock()
            _hub, api = await start_hub(
                stack,
                lambda: HubChild(
                    workdir,
                    broker.url,
                    log_level=cfg.hub_log_level,
                    trust_root=trust.root_path if trust else None,
                    signing_key=trust.hub_key_path if trust else None,
                ),
                timeout_s=cfg.deadline_s,
            )
            result.setup_s["hub_ready"] = clock() - t

            t = clock()
            await asyncio.wait_for(register_batch(api, ids, LABELS), cfg.deadline_s)
            result.setup_s["register"] = clock() - t

            t = clock()
            fleet = Fleet(
                FleetConfig(
                    broker_url=broker.url,
                    device_ids=ids,
                    seed=cfg.seed,
                    apply_time_s=cfg.apply_time_s,
                    max_concurrent_connects=cfg.max_concurrent_connects,
                    root_path=trust.root_path if trust else None,
                )
            )
            await stack.enter_async_context(fleet)
            await fleet.wait_connected(timeout_s=cfg.deadline_s)
            result.setup_s["fleet_connected"] = clock() - t
            await poll(
                lambda: fleet_summary(api),
                lambda s: s["online"] == cfg.devices and s["in_sync"] == cfg.devices,
                timeout_s=cfg.deadline_s,
                interval_s=cfg.poll_interval_s,
                what=f"hub shows {cfg.devices} devices online and in sync",
            )
            result.setup_s["hub_online"] = clock() - t

            baseline = await stack.enter_async_context(
                Baseline(
                    broker.host,
                    broker.port,
                    ids,
                    payload_bytes=payload_bytes,
                    inflight=cfg.baseline_inflight,
                )
            )
            for index in range(1, cfg.repeats + 1):
                baseline_s = await baseline.measure(index, timeout_s=cfg.deadline_s)
                ours = await measure_ours(api, fleet, index, cfg=cfg, document=change(index))
                result.rounds.append(replace(ours, baseline_s=baseline_s))
            result.fleet_counters = fleet.counters.snapshot()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                result.hub_stats = (await api.get("/hub/stats")).json()
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.converge", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-interval-s", type=float, default=0.02)
    parser.add_argument("--apply-time-s", type=float, default=0.0)
    parser.add_argument("--max-concurrent-connects", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--signed",
        action="store_true",
        help="the hub signs every document and every device verifies it (a fresh fleet root)",
    )
    parser.add_argument(
        "--via",
        choices=("fleet", "deployment"),
        default="fleet",
        help="the change: PUT /fleet/desired, or PUT /deployments/bench (a fleet deployment)",
    )
    add_run_arguments(
        parser,
        result="converge-N.json (deploy-N.json with --via deployment)",
        deadline_s=120.0,
        hub_log_level="info",
    )
    return parser.parse_args(argv)


def result_file(cfg: BenchConfig) -> str:
    """Pure: the default result file (deployment runs are kept apart from the report's
    ``converge-*.json``)."""
    signed = "-signed" if cfg.signed else ""
    if cfg.via == "deployment":
        return f"deploy-{cfg.devices}{signed}.json"
    return f"converge-{cfg.devices}{signed}.json"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "converge",
        argv,
        build=lambda: BenchConfig(
            devices=args.devices,
            repeats=args.repeats,
            deadline_s=args.deadline_s,
            poll_interval_s=args.poll_interval_s,
            max_concurrent_connects=args.max_concurrent_connects,
            apply_time_s=args.apply_time_s,
            seed=args.seed,
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
            signed=args.signed,
            via=args.via,
        ),
        bench=run_bench,
        table=format_table,
        result_file=result_file,
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, FleetError, FleetTimeout, BrokerError),
        stopped="broker and hub",
    )


if __name__ == "__main__":
    sys.exit(main())
