"""Hub ingest benchmark: device reports per second committed into the hub's database.

``python -m simulator.bench.ingest --devices 1000 --messages 50000`` starts its
own Mosquitto and hub (``driftless hub serve``, SQLite) on loopback, registers N
devices (``POST /api/v1/devices/batch``), and then measures, R times each, the
same stream of M valid ``Reported`` messages (QoS 1, ~200 bytes, round-robin
over the N devices, each device's ``(boot_epoch, seq)`` increasing) sent by a
paho publisher in its own process (:mod:`simulator.bench.mqttload`):

- ``broker``: a minimal paho subscriber counts them (the broker's rate with
  minimal clients; for reference only);
- ``bare``: a bare aiomqtt subscriber counts them, subscribed like the hub
  (``$share`` group, MQTT 5, the hub's Receive Maximum): the ceiling of the
  client library the hub is built on, **the baseline**;
- ``hub``: the hub ingests them; done when its counters (committed as applied,
  or found stale) account for all M, polled every ``poll_interval_s``; the DB is
  then checked to hold each device's last report.

Then a second hub worker starts (own client id, same DB, the ``$share/hub/…``
subscription splits the stream) and the same is measured as ``bare_x2`` (two
bare subscribers in one ``$share`` group: what two consumers get on this
machine) and ``hub_x2``.

Two modes, because the machine has two cores:

- ``live``: the consumer runs while the publisher publishes; the rate is M over
  the time from the first publish to the last message consumed. Publisher,
  broker and consumer share the cores, as in production on one small host.
- ``drain``: the consumer is paused (SIGSTOP) while the publisher fills the
  broker's queue, then resumed (SIGCONT); the rate is M over the time from the
  resume to the last message consumed, so the publisher's CPU is out of the way.

Rules:
- Loopback only; every wait has a deadline; every load is M messages.
- Broker, hubs and load clients are stopped at exit, on error and on SIGTERM.
- Medians over the repeats; ratios between medians measured in the same run.
- Baseline topics (``bench/ingest/devices/…``) have the same length as device
  topics, so every consumer receives identical message sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from devtools.broker import BrokerError, MosquittoBroker
from simulator.bench.common import (
    BenchError,
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
from simulator.bench.mqttload import BASELINE_ROOT, REPORT_ROOT, LoadChild, LoadError, last_seq
from simulator.fleet import device_ids

Mode = Literal["live", "drain"]
KINDS = ("broker", "bare", "hub", "bare_x2", "hub_x2")
LABELS = {"bench": "ingest"}
PREFIX = "ing"


@dataclass(frozen=True)
class IngestConfig:
    devices: int = 1000
    messages: int = 50_000
    repeats: int = 3
    mode: Mode = "live"
    two_workers: bool = True
    deadline_s: float = 180.0
    poll_interval_s: float = 0.05  # each poll costs the hub an HTTP request
    publisher_inflight: int = 100
    hub_log_level: str = "info"
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1 or self.messages < self.devices or self.repeats < 1:
            raise ValueError("need devices >= 1, messages >= devices and repeats >= 1")
        if self.deadline_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("deadline_s and poll_interval_s must be positive")
        if self.mode not in ("live", "drain"):
            raise ValueError(f"mode must be live or drain, got {self.mode!r}")

    @property
    def reports_per_device(self) -> int:
        return -(-self.messages // self.devices)


@dataclass(frozen=True)
class Measurement:
    kind: str
    index: int
    messages: int
    seconds: float  # from the start (first publish, or resume) to the last message consumed
    publisher_msgs_per_s: float  # the publisher's own pace (until the broker acked all)
    consumer_cpu_s: float  # the consumer processes (hubs or bare subscribers)
    broker_cpu_s: float
    stale: int = 0  # hub only: reports the hub found older than one it had (two workers)
    batches: int = 0  # hub only: ingest transactions

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class IngestResult:
    config: IngestConfig
    payload_bytes: int = 0
    setup_s: dict[str, float] = field(default_factory=dict)
    rounds: list[Measurement] = field(default_factory=list)
    hub_stats: list[dict[str, Any]] = field(default_factory=list)

    def rates(self, kind: str) -> list[float]:
        return [m.msgs_per_s for m in self.rounds if m.kind == kind]

    def medians(self) -> dict[str, float]:
        """Pure: median messages per second of each kind measured."""
        return {k: median(self.rates(k)) for k in KINDS if self.rates(k)}

    def ratios(self) -> dict[str, float]:
        """Pure: the ratios the goals are stated in (medians over medians)."""
        m = self.medians()
        out = {"hub_over_bare": ratio(m.get("hub", 0.0), m.get("bare", 0.0))}
        if "hub_x2" in m:
            out["hub_x2_over_hub"] = ratio(m["hub_x2"], m.get("hub", 0.0))
            out["hub_x2_over_bare"] = ratio(m["hub_x2"], m.get("bare", 0.0))
        if "bare_x2" in m:
            out["bare_x2_over_bare"] = ratio(m["bare_x2"], m.get("bare", 0.0))
        return out

    def cpu_us_per_message(self) -> dict[str, float]:
        """Pure: median consumer CPU microseconds per message, per kind."""
        out: dict[str, float] = {}
        for kind in KINDS:
            values = [1e6 * m.consumer_cpu_s / m.messages for m in self.rounds if m.kind == kind]
            if values:
                out[kind] = median(values)
        return out

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "ingest",
            "command": command,
            "mode": self.config.mode,
            "devices": self.config.devices,
            "messages": self.config.messages,
            "repeats": self.config.repeats,
            "payload_bytes": self.payload_bytes,
            "config": config,
            "host": host_info(),
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "rounds": [{**asdict(m), "msgs_per_s": round(m.msgs_per_s, 1)} for m in self.rounds],
            "median_msgs_per_s": {k: round(v, 1) for k, v in self.medians().items()},
            "ratios": {k: round(v, 3) for k, v in self.ratios().items()},
            "cpu_us_per_message": {k: round(v, 1) for k, v in self.cpu_us_per_message().items()},
            "hub_stats": self.hub_stats,
        }


LABELS_OF_KIND = {
    "broker": "broker: paho -> paho (reference)",
    "bare": "baseline: bare aiomqtt subscriber",
    "hub": "ours: hub, one worker",
    "bare_x2": "two bare aiomqtt subscribers",
    "hub_x2": "ours: hub, two workers",
}


def format_table(result: IngestResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    indices = sorted({m.index for m in result.rounds})
    lines = [
        f"ingest ({cfg.mode}): {cfg.messages} reports over {cfg.devices} devices, "
        f"{result.payload_bytes}-byte payloads, {cfg.repeats} repeats, loopback",
        f"{'(messages/s)':<36}"
        + "".join(f"{'run ' + str(i):>9}" for i in indices)
        + f"{'median':>9}{'cpu us/msg':>11}",
    ]
    medians, cpu = result.medians(), result.cpu_us_per_message()
    for kind in KINDS:
        by_index = {m.index: m.msgs_per_s for m in result.rounds if m.kind == kind}
        if not by_index:
            continue
        cells = "".join(f"{by_index[i]:>9.0f}" if i in by_index else f"{'-':>9}" for i in indices)
        lines.append(f"{LABELS_OF_KIND[kind]:<36}{cells}{medians[kind]:>9.0f}{cpu[kind]:>11.0f}")
    for name, value in result.ratios().items():
        lines.append(f"ratio {name.replace('_over_', ' / ')} (medians): {value:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring


class Bench:
    """The parts of one run and the rounds measured on them."""

    def __init__(self, cfg: IngestConfig, broker: MosquittoBroker) -> None:
        self.cfg = cfg
        self.broker = broker
        self.ids = device_ids(cfg.devices, PREFIX)
        self.hubs: list[tuple[HubWorker, httpx.AsyncClient]] = []
        self.next_seq = 1  # every hub round continues each device's sequence

    def _publisher(self, root: str, seq_start: int) -> LoadChild:
        cfg = self.cfg
        return LoadChild(
            "publish",
            [
                *("--port", str(self.broker.port), "--root", root),
                *("--devices", str(cfg.devices), "--prefix", PREFIX),
                *("--messages", str(cfg.messages), "--seq-start", str(seq_start)),
                *("--inflight", str(cfg.publisher_inflight), "--v311"),
                *("--deadline-s", str(cfg.deadline_s)),
            ],
        )

    async def _publish(
        self, publisher: LoadChild, paused: Sequence[int]
    ) -> tuple[float, float, int]:
        """Run the publisher; in drain mode resume ``paused`` once all are queued.

        Returns ``(t0, publisher_rate, payload_bytes)``: t0 is when the consumer's
        clock starts (first publish in live mode, the resume in drain mode).
        """
        cfg = self.cfg
        await publisher.start()
        ready = await publisher.wait_event("ready", timeout_s=cfg.deadline_s)
        start = float((await publisher.wait_event("start", timeout_s=cfg.deadline_s))["t"])
        t0 = start
        if cfg.mode == "drain":
            done = await publisher.wait_event("done", timeout_s=cfg.deadline_s)
            t0 = time.monotonic()
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        else:
            done = await publisher.wait_event("done", timeout_s=cfg.deadline_s)
        publisher_rate = cfg.messages / max(1e-9, float(done["t"]) - start)
        return t0, publisher_rate, int(ready["payload_bytes"])

    async def measure_bare(self, kind: str, index: int) -> tuple[Measurement, int]:
        """``broker``, ``bare`` or ``bare_x2``; returns the measurement and the payload size."""
        cfg = self.cfg
        role, count, share = {
            "broker": ("sub-paho", 1, ""),
            "bare": ("sub-aiomqtt", 1, "bench"),
            "bare_x2": ("sub-aiomqtt", 2, "bench"),
        }[kind]
        subs = [
            LoadChild(
                role,
                [
                    *("--port", str(self.broker.port), "--root", BASELINE_ROOT),
                    *(("--share", share) if share else ()),
                    *("--deadline-s", str(cfg.deadline_s)),
                ],
                name=f"{kind}-{n}",
            )
            for n in range(count)
        ]
        publisher = self._publisher(BASELINE_ROOT, 1)
        try:
            for sub in subs:
                await sub.start()
            for sub in subs:
                await sub.wait_event("ready", timeout_s=cfg.deadline_s)
            pids = [sub.pid for sub in subs if sub.pid is not None]
            cpu0, broker0 = sum(map(cpu_seconds, pids)), cpu_seconds(self.broker.pid)
            paused = self._pause(pids)
            t0, pub_rate, payload_bytes = await self._publish(publisher, paused)

            def total() -> int:
                return sum(sub.progress()[0] for sub in subs)

            for sub in subs:  # each child's lines wake only its own waiter
                await sub.wait_for(
                    lambda _c: total() >= cfg.messages,
                    timeout_s=cfg.deadline_s,
                    what=f"{cfg.messages} messages",
                )
            t_end = max(sub.progress()[1] for sub in subs)
            cpu = sum(map(cpu_seconds, pids)) - cpu0
            broker_cpu = cpu_seconds(self.broker.pid) - broker0
        finally:
            for child in (publisher, *subs):
                await child.stop()
        if total() != cfg.messages:
            raise BenchError(f"{kind}: {total()} messages consumed, {cfg.messages} sent")
        seconds = t_end - t0
        return Measurement(kind, index, cfg.messages, seconds, pub_rate, cpu, broker_cpu), (
            payload_bytes
        )

    def _pause(self, pids: Sequence[int]) -> list[int]:
        if self.cfg.mode != "drain":
            return []
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return list(pids)

    async def start_hub(self, stack: contextlib.AsyncExitStack, workdir_: Path, name: str) -> None:
        def make() -> HubWorker:
            return HubWorker(
                workdir_,
                self.broker.url,
                name=name,
                db_path=workdir_ / "hub.db",
                log_level=self.cfg.hub_log_level,
            )

        hub, api = await start_hub(stack, make, timeout_s=self.cfg.deadline_s)
        stack.callback(self._resume, hub)  # never leave a paused hub behind
        self.hubs.append((hub, api))

    @staticmethod
    def _resume(hub: HubWorker) -> None:
        if hub.pid is not None and hub.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(hub.pid, signal.SIGCONT)

    async def _processed(self) -> tuple[int, int, int]:
        """Sum over the hubs: (processed reports, stale reports, ingest batches)."""
        stats = await asyncio.gather(*(hub_stats(api) for _, api in self.hubs))
        return (
            sum(processed_reports(s) for s in stats),
            sum(int(s.get("stale", {}).get("stale_report", 0)) for s in stats),
            sum(int(s.get("ingest_batches", 0)) for s in stats),
        )

    async def measure_hub(self, kind: str, index: int) -> Measurement:
        cfg = self.cfg
        seq_start = self.next_seq
        self.next_seq += cfg.reports_per_device
        before, stale0, batches0 = await self._processed()
        pids = [hub.pid for hub, _ in self.hubs if hub.pid is not None]
        cpu0, broker0 = sum(map(cpu_seconds, pids)), cpu_seconds(self.broker.pid)
        publisher = self._publisher(REPORT_ROOT, seq_start)
        try:
            paused = self._pause(pids)
            try:
                t0, pub_rate, _ = await self._publish(publisher, paused)
            finally:
                for pid in paused:  # resumed already, unless the publisher failed
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            done, stale, batches = await poll(
                self._processed,
                lambda p: p[0] >= before + cfg.messages,
                timeout_s=cfg.deadline_s,
                interval_s=cfg.poll_interval_s,
                what=f"{kind}: hub processed {cfg.messages} reports",
            )
            t_end = time.monotonic()
            cpu = sum(map(cpu_seconds, pids)) - cpu0
            broker_cpu = cpu_seconds(self.broker.pid) - broker0
        finally:
            await publisher.stop()
        if done != before + cfg.messages:
            raise BenchError(f"{kind}: hub processed {done - before} reports, {cfg.messages} sent")
        await self.check_db(seq_start)
        return Measurement(
            kind,
            index,
            cfg.messages,
            t_end - t0,
            pub_rate,
            cpu,
            broker_cpu,
            stale=stale - stale0,
            batches=batches - batches0,
        )

    async def check_db(self, seq_start: int) -> None:
        """Every device's row holds the seq of its last report; raises BenchError."""
        cfg = self.cfg
        expected = last_seq(messages=cfg.messages, devices=cfg.devices, seq_start=seq_start)
        _, api = self.hubs[0]
        seen: dict[str, int] = {}
        for offset in range(0, cfg.devices, 1000):
            response = await api.get("/devices", params={"limit": 1000, "offset": offset})
            response.raise_for_status()
            for item in response.json()["items"]:
                seen[item["id"]] = int(item["last_report_seq"])
        wrong = [
            (self.ids[i], seen.get(self.ids[i]), seq)
            for i, seq in expected.items()
            if seen.get(self.ids[i]) != seq
        ]
        if wrong:
            raise BenchError(f"{len(wrong)} devices lack their last report, e.g. {wrong[:3]}")


async def run_bench(cfg: IngestConfig) -> IngestResult:
    """The whole benchmark; raises BenchError, LoadError or BrokerError."""
    result = IngestResult(config=cfg)
    clock = time.perf_counter
    with workdir(cfg.workdir, "driftless-ingest-") as work:
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(work / "broker")
            stack.callback(broker.stop)
            broker.start()
            bench = Bench(cfg, broker)
            await bench.start_hub(stack, work, "a")
            result.setup_s["broker_and_hub"] = clock() - t
            t = clock()
            _, api = bench.hubs[0]
            await register_batch(api, bench.ids, LABELS)
            result.setup_s["register"] = clock() - t

            for index in range(1, cfg.repeats + 1):
                for kind in ("broker", "bare"):
                    measured, result.payload_bytes = await bench.measure_bare(kind, index)
                    result.rounds.append(measured)
                result.rounds.append(await bench.measure_hub("hub", index))
            if cfg.two_workers:
                t = clock()
                await bench.start_hub(stack, work, "b")
                result.setup_s["second_hub"] = clock() - t
                for index in range(1, cfg.repeats + 1):
                    measured, _ = await bench.measure_bare("bare_x2", index)
                    result.rounds.append(measured)
                    result.rounds.append(await bench.measure_hub("hub_x2", index))
            for _, hub_api in bench.hubs:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    result.hub_stats.append(await hub_stats(hub_api))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.ingest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("live", "drain"), default="live")
    parser.add_argument("--one-worker", action="store_true", help="skip the two-worker rounds")
    parser.add_argument("--poll-interval-s", type=float, default=0.05)
    add_run_arguments(parser, result="ingest-MODE.json", deadline_s=180.0, hub_log_level="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "ingest",
        argv,
        build=lambda: IngestConfig(
            devices=args.devices,
            messages=args.messages,
            repeats=args.repeats,
            mode=args.mode,
            two_workers=not args.one_worker,
            deadline_s=args.deadline_s,
            poll_interval_s=args.poll_interval_s,
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: f"ingest-{cfg.mode}.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, LoadError, BrokerError),
        stopped="broker, hubs and clients",
    )


if __name__ == "__main__":
    sys.exit(main())
