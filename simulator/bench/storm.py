"""Reconnect-storm benchmark: every device drops at once, desired state changes, all return.

``python -m simulator.bench.storm --devices 5000`` starts its own Mosquitto and
hub (``driftless hub serve``, SQLite) on loopback, registers N devices, and runs
them as real agent cores in W worker processes (``simulator.workers``, the
simulator's own ``storm`` fault schedule). Once every device is connected and in
sync, R times, at a scheduled instant:

1. every device's TCP connection is cut without DISCONNECT (the broker sends the
   Wills) and its network stays away ``offline_s``;
2. once the hub shows every device offline, one ``PUT /api/v1/fleet/desired``
   changes the desired state of all of them (it must return before the networks
   come back, or the round does not count);
3. every device's network returns within ``reconnect_window_s`` (1 s) and it
   reconnects (persistent session, birth, the newest document, apply, report).

**Storm time** is from the first network return until ``GET /fleet/summary``
shows every device online and in sync (polled every ``poll_interval_s``);
milestones on the same clock: every device connected (the workers' counters,
which arrive every 0.2 s, so this one can trail the others by that much), every
device online on the hub (the first of the same polls to show it: one poller,
since each poll is a pass over the hub's devices, counted in the hub's CPU).

Two baselines, measured in the same run on the same broker right before each
storm (the echo, then the bare round; neither overlaps the storm):

- **bare reconnect** (the headline ratio), :class:`simulator.bench.reconnect.BareReconnects`:
  N plain MQTT clients on the devices' own connection class
  (``simulator.link.DeviceLink``: aiomqtt, persistent session, a Will), in as
  many processes as the storm's workers, cut at once without DISCONNECT, each
  back after the same per-device offline time as its device in this storm, each
  receiving one QoS 1 message of a document's size queued for it once the
  broker had published every Will; timed from the first network return until
  every client has its message. The clients connect for each round and
  disconnect cleanly after it, so none is connected during a storm.
- **echo**, :class:`simulator.bench.converge.Baseline`: N QoS 1 messages the size
  of a desired document published to per-device topics and echoed back by one
  bare aiomqtt client, until all N echoes are back (cheap, and comparable with
  runs from before the bare reconnect baseline).

Also recorded per storm: CPU seconds (``/proc/<pid>/stat``) of the hub, the
devices' workers and the broker from just before the cut to "in sync" (and of
the bare clients and the broker in the bare round), and messages per device on
the hub (``/hub/stats``: received and published) and on the devices (the
workers' counters: in and out).

Rules:
- Loopback only; every wait has a deadline; every storm is scheduled up front
  (a pure schedule shared by all workers, ``simulator.profiles``).
- Broker, hub, workers and bare clients are stopped at exit, on error and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import BrokerError, MosquittoBroker
from simulator.bench.common import (
    BenchError,
    HubChild,
    add_run_arguments,
    cpu_seconds,
    host_info,
    hub_stats,
    median,
    poll,
    ratio,
    register_batch,
    run_bench_main,
    start_hub,
    workdir,
)
from simulator.bench.converge import DOCUMENT_BYTES, Baseline, bench_config, fleet_summary
from simulator.bench.mqttload import LoadError
from simulator.bench.reconnect import BareReconnects
from simulator.fleet import device_ids
from simulator.profiles import ApplySpec, Profile, StormSpec
from simulator.workers import WorkerPool, WorkerSpec, split

PREFIX = "storm"
LABELS = {"bench": "storm"}


@dataclass(frozen=True)
class StormConfig:
    devices: int = 5000
    workers: int = 2
    repeats: int = 3
    first_storm_s: float = 0.0  # 0: 30 s + 20 ms per device after the workers start
    storm_every_s: float = 0.0  # 0: 40 s + 12 ms per device
    offline_s: float = 6.0
    reconnect_window_s: float = 1.0
    deadline_s: float = 240.0
    poll_interval_s: float = 0.1
    baseline_inflight: int = 100
    max_concurrent_connects: int = 64  # per worker
    seed: int = 0
    hub_log_level: str = "info"
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1 or self.workers < 1 or self.repeats < 1:
            raise ValueError("devices, workers and repeats must be at least 1")
        if self.offline_s <= 0 or self.reconnect_window_s < 0 or self.deadline_s <= 0:
            raise ValueError("offline_s and deadline_s must be positive")

    @property
    def first_at_s(self) -> float:
        return self.first_storm_s or 30.0 + 0.02 * self.devices

    @property
    def every_s(self) -> float:
        return self.storm_every_s or 40.0 + 0.012 * self.devices

    def storm_times(self) -> tuple[float, ...]:
        """Pure: seconds after the epoch at which each storm cuts every connection."""
        return tuple(self.first_at_s + k * self.every_s for k in range(self.repeats))

    def profile(self) -> Profile:
        """Pure: the built-in ``storm`` profile's applies, with this run's schedule."""
        return Profile(
            name="bench-storm",
            description="simulator.bench.storm: scheduled storms, quick applies",
            apply=ApplySpec(time_s=0.05, jitter_s=0.05, failure_rate=0.0),
            storm=StormSpec(
                at_s=self.storm_times(),
                offline_s=self.offline_s,
                reconnect_window_s=self.reconnect_window_s,
            ),
        )


@dataclass(frozen=True)
class Storm:
    index: int
    echo_s: float  # the bare publish/echo of N documents (converge.Baseline)
    # The bare reconnect round before this storm (simulator.bench.reconnect.BareRound):
    bare_s: float  # its first network return -> every bare client has its queued message
    bare_connected_s: float  # its first network return -> every bare client connected
    bare_received: int  # bare clients that received their queued message
    bare_wills_after_cut_s: float
    bare_published_before_return_s: float
    bare_clients_cpu_s: float  # the bare clients' processes, from the cut
    bare_broker_cpu_s: float
    bare_connect_failures: int
    # The storm:
    storm_s: float  # first network return -> every device online and in sync on the hub
    connected_s: float  # first network return -> every device connected (workers)
    online_s: float  # first network return -> the hub shows every device online
    all_offline_after_cut_s: float  # the cut -> the hub shows every device offline
    put_before_return_s: float  # how long before the first return the PUT had returned
    hub_cpu_s: float  # CPU seconds from just before the cut until "in sync", as the next two
    workers_cpu_s: float  # the storm's worker processes (the simulated devices)
    broker_cpu_s: float
    hub_received_per_device: float
    hub_published_per_device: float
    device_in_per_device: float
    device_out_per_device: float
    connect_failures: int


@dataclass
class StormResult:
    config: StormConfig
    payload_bytes: int = 0
    setup_s: dict[str, float] = field(default_factory=dict)
    storms: list[Storm] = field(default_factory=list)
    hub_stats: dict[str, Any] = field(default_factory=dict)
    fleet_counters: dict[str, Any] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)  # resident memory at the end

    def medians(self) -> dict[str, float]:
        names = [n for n in Storm.__dataclass_fields__ if n != "index"]
        return {n: median([float(getattr(s, n)) for s in self.storms]) for n in names}

    def ratio(self) -> float:
        """Pure: median storm / median bare reconnect round (the headline)."""
        m = self.medians()
        return ratio(m["storm_s"], m["bare_s"])

    def ratio_echo(self) -> float:
        """Pure: median storm / median bare publish/echo (comparable to runs before the
        bare reconnect baseline existed)."""
        m = self.medians()
        return ratio(m["storm_s"], m["echo_s"])

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "storm",
            "command": command,
            "devices": self.config.devices,
            "workers": self.config.workers,
            "repeats": self.config.repeats,
            "payload_bytes": self.payload_bytes,
            "config": config,
            "storm_times_s": list(self.config.storm_times()),
            "host": host_info(),
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "storms": [asdict(s) for s in self.storms],
            "median": {k: round(v, 4) for k, v in self.medians().items()},
            "ratio_storm_over_bare": round(self.ratio(), 3),
            "ratio_storm_over_echo": round(self.ratio_echo(), 3),
            "hub_stats": self.hub_stats,
            "fleet_counters": self.fleet_counters,
            "rss_mib": {k: round(v, 1) for k, v in self.rss_mib.items()},
        }


ROWS = (
    ("echo: bare MQTT publish/echo", "echo_s", "{:.3f}"),
    ("bare reconnect: all connected", "bare_connected_s", "{:.3f}"),
    ("bare reconnect: all received", "bare_s", "{:.3f}"),
    ("ours: all connected", "connected_s", "{:.3f}"),
    ("ours: hub shows all online", "online_s", "{:.3f}"),
    ("ours: hub shows all in sync", "storm_s", "{:.3f}"),
    ("bare: clients CPU seconds", "bare_clients_cpu_s", "{:.2f}"),
    ("bare: broker CPU seconds", "bare_broker_cpu_s", "{:.2f}"),
    ("ours: workers CPU seconds", "workers_cpu_s", "{:.2f}"),
    ("ours: broker CPU seconds", "broker_cpu_s", "{:.2f}"),
    ("ours: hub CPU seconds", "hub_cpu_s", "{:.2f}"),
    ("hub msgs/device in", "hub_received_per_device", "{:.2f}"),
    ("hub msgs/device out", "hub_published_per_device", "{:.2f}"),
    ("device msgs in", "device_in_per_device", "{:.2f}"),
    ("device msgs out", "device_out_per_device", "{:.2f}"),
)


def format_table(result: StormResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    lines = [
        f"storm: {cfg.devices} devices in {cfg.workers} workers, {cfg.repeats} storms, offline "
        f"{cfg.offline_s:g} s, all back within {cfg.reconnect_window_s:g} s, loopback",
        f"{'(seconds from the first return)':<32}"
        + "".join(f"{'storm ' + str(s.index):>10}" for s in result.storms)
        + f"{'median':>10}",
    ]
    medians = result.medians()
    for label, name, fmt in ROWS:
        cells = "".join(f"{fmt.format(getattr(s, name)):>10}" for s in result.storms)
        lines.append(f"{label:<32}{cells}{fmt.format(medians[name]):>10}")
    lines.append(f"ratio storm/bare reconnect (median): {result.ratio():.2f}x")
    lines.append(f"ratio storm/echo (median): {result.ratio_echo():.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring


async def wait_wall(until: float, *, what: str, limit_s: float) -> None:
    """Sleep until wall-clock ``until``; raises BenchError if that is more than limit_s away."""
    delay = until - time.time()
    if delay > limit_s:
        raise BenchError(f"{what} is {delay:.0f}s away, past the deadline")
    if delay > 0:
        await asyncio.sleep(delay)


async def pool_until(
    pool: WorkerPool,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float,
    what: str,
) -> float:
    """Wait (woken by worker snapshots) until ``predicate(counters)``; returns time.time().

    Raises BenchError at the deadline or if a worker reports an error or dies.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate(pool.counters()):
        if pool.errors():
            raise BenchError("; ".join(pool.errors()))
        if pool.alive() < len(pool.workers):
            raise BenchError(f"a worker died while waiting for {what}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"timed out after {timeout_s}s waiting for {what}")
        await pool.wait_changed(min(remaining, 0.5))
    return time.time()


async def summary_until(
    api: httpx.AsyncClient,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    cfg: StormConfig,
    what: str,
) -> float:
    """Poll the fleet summary until ``predicate``; returns the wall-clock time it held."""
    await poll(
        lambda: fleet_summary(api),
        predicate,
        timeout_s=cfg.deadline_s,
        interval_s=cfg.poll_interval_s,
        what=what,
    )
    return time.time()


async def online_then_in_sync(
    api: httpx.AsyncClient, n: int, *, cfg: StormConfig, what: str
) -> tuple[float, float]:
    """Poll the fleet summary until all ``n`` are online and in sync; returns the wall-clock
    times at which one poll first showed all online, and all online and in sync.

    One poller for both milestones: every poll costs the hub a pass over its devices,
    and that CPU is counted in the storm's.
    """
    seen_online: list[float] = []

    def in_sync(summary: dict[str, Any]) -> bool:
        if not seen_online and summary["online"] == n:
            seen_online.append(time.time())
        return bool(summary["online"] == n and summary["in_sync"] == n)

    t_sync = await summary_until(api, in_sync, cfg=cfg, what=what)
    return (seen_online[0] if seen_online else t_sync), t_sync


async def put_desired(api: httpx.AsyncClient, n: int, round_no: int, ids: Sequence[str]) -> None:
    """One fleet-wide change of every benchmark device; raises BenchError."""
    response = await api.put(
        "/fleet/desired",
        json={"selector": {"labels": LABELS}, "config": bench_config(round_no, ids[0])},
    )
    if response.status_code != 200 or response.json().get("updated") != n:
        raise BenchError(f"PUT /fleet/desired: HTTP {response.status_code} {response.text[:300]}")


def workers_cpu(pool: WorkerPool) -> dict[str, float]:
    """CPU seconds of each living storm worker, keyed ``worker-<pid>``."""
    return {f"worker-{pid}": cpu_seconds(pid) for pid in pool.pids()}


async def run_storm(
    index: int,
    *,
    cfg: StormConfig,
    epoch: float,
    at_s: float,
    api: httpx.AsyncClient,
    hub: HubChild,
    pool: WorkerPool,
    broker: MosquittoBroker,
    echo: Baseline,
    bare: BareReconnects,
    ids: Sequence[str],
) -> Storm:
    n = cfg.devices
    cut = epoch + at_s
    back = cut + cfg.offline_s  # the first network may return now; the last within the window
    echo_s = await echo.measure(index, timeout_s=cfg.deadline_s)
    bare_round = await bare.measure(index)
    if bare_round.received != n:
        raise BenchError(f"bare round {index}: {bare_round.received}/{n} messages received")
    if time.time() > cut - 1.0:
        raise BenchError(
            f"storm {index}: the fleet was not settled before the storm; "
            "raise --storm-every-s / --first-storm-s"
        )
    await wait_wall(cut - 0.5, what=f"storm {index}", limit_s=cfg.deadline_s + cfg.every_s)
    stats0, fleet0 = await hub_stats(api), pool.counters()
    cpu0 = {"hub": cpu_seconds(hub.pid), "broker": cpu_seconds(broker.pid), **workers_cpu(pool)}
    t_offline = await summary_until(
        api, lambda s: s["online"] == 0, cfg=cfg, what=f"storm {index}: hub shows all offline"
    )
    await put_desired(api, n, 100 + index, ids)
    put_done = time.time()
    if put_done >= back:
        raise BenchError(
            f"storm {index}: the change returned {put_done - back:.2f}s after the networks "
            "came back; raise --offline-s"
        )

    async def connected() -> float:
        return await pool_until(
            pool,
            lambda c: c.get("connected", 0) >= n and c.get("connects", 0) >= fleet0["connects"] + n,
            timeout_s=cfg.deadline_s,
            what=f"storm {index}: {n} reconnected",
        )

    t_connected_task = asyncio.create_task(connected())
    try:
        t_online, t_sync = await online_then_in_sync(
            api, n, cfg=cfg, what=f"storm {index}: hub shows all online and in sync"
        )
        t_connected = await t_connected_task
    finally:
        t_connected_task.cancel()
    cpu1 = {"hub": cpu_seconds(hub.pid), "broker": cpu_seconds(broker.pid), **workers_cpu(pool)}
    workers_cpu_s = sum(v - cpu0.get(k, v) for k, v in cpu1.items() if k.startswith("worker"))
    stats1, fleet1 = await hub_stats(api), pool.counters()
    received = stats1["received"].get("total", 0) - stats0["received"].get("total", 0)
    published = stats1["desired_published"] - stats0["desired_published"]
    return Storm(
        index=index,
        echo_s=echo_s,
        bare_s=bare_round.bare_s,
        bare_connected_s=bare_round.connected_s,
        bare_received=bare_round.received,
        bare_wills_after_cut_s=bare_round.wills_after_cut_s,
        bare_published_before_return_s=bare_round.published_before_return_s,
        bare_clients_cpu_s=bare_round.clients_cpu_s,
        bare_broker_cpu_s=bare_round.broker_cpu_s,
        bare_connect_failures=bare_round.connect_failures + bare_round.links_lost,
        storm_s=t_sync - back,
        connected_s=t_connected - back,
        online_s=t_online - back,
        all_offline_after_cut_s=t_offline - cut,
        put_before_return_s=back - put_done,
        hub_cpu_s=cpu1["hub"] - cpu0["hub"],
        workers_cpu_s=workers_cpu_s,
        broker_cpu_s=cpu1["broker"] - cpu0["broker"],
        hub_received_per_device=received / n,
        hub_published_per_device=published / n,
        device_in_per_device=(fleet1["messages_in"] - fleet0["messages_in"]) / n,
        device_out_per_device=(fleet1["messages_out"] - fleet0["messages_out"]) / n,
        connect_failures=fleet1["connect_failures"] - fleet0["connect_failures"],
    )


async def run_bench(cfg: StormConfig) -> StormResult:
    """The whole benchmark; raises BenchError or BrokerError."""
    ids = device_ids(cfg.devices, PREFIX)
    result = StormResult(config=cfg)
    clock = time.perf_counter
    with workdir(cfg.workdir, "driftless-storm-") as work:
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(work / "broker")
            stack.callback(broker.stop)
            broker.start()
            hub, api = await start_hub(
                stack,
                lambda: HubChild(work, broker.url, log_level=cfg.hub_log_level),
                timeout_s=cfg.deadline_s,
            )
            result.setup_s["broker_and_hub"] = clock() - t
            t = clock()
            await register_batch(api, ids, LABELS)
            result.setup_s["register"] = clock() - t

            t = clock()
            epoch = time.time()
            specs = [
                WorkerSpec(
                    index=i,
                    prefix=PREFIX,
                    count=cfg.devices,
                    start=part.start,
                    stop=part.stop,
                    broker_url=broker.url,
                    seed=cfg.seed,
                    profile=cfg.profile(),
                    epoch=epoch,
                    parent_pid=os.getpid(),
                    snapshot_interval_s=0.2,
                    max_concurrent_connects=cfg.max_concurrent_connects,
                    log_level="warning",
                )
                for i, part in enumerate(split(cfg.devices, cfg.workers))
            ]
            pool = WorkerPool(specs, log_dir=work / "workers", respawn=False)
            stack.push_async_callback(pool.stop)
            await pool.start()
            first_cut = epoch + cfg.first_at_s
            await pool_until(
                pool,
                lambda c: c.get("connected", 0) >= cfg.devices,
                timeout_s=min(cfg.deadline_s, max(1.0, first_cut - time.time())),
                what=f"{cfg.devices} devices connected before the first storm",
            )
            result.setup_s["fleet_connected"] = clock() - t
            await put_desired(api, cfg.devices, 1, ids)
            await summary_until(
                api,
                lambda s: s["online"] == cfg.devices and s["in_sync"] == cfg.devices,
                cfg=cfg,
                what="the fleet online and in sync before the first storm",
            )
            result.setup_s["fleet_in_sync"] = clock() - t

            payload_bytes = DOCUMENT_BYTES  # the size of a desired document
            result.payload_bytes = payload_bytes
            echo = await stack.enter_async_context(
                Baseline(
                    broker.host,
                    broker.port,
                    ids,
                    payload_bytes=payload_bytes,
                    inflight=cfg.baseline_inflight,
                )
            )
            storm_spec = cfg.profile().storm
            assert storm_spec is not None
            bare = await stack.enter_async_context(
                BareReconnects(
                    host=broker.host,
                    port=broker.port,
                    count=cfg.devices,
                    workers=cfg.workers,
                    seed=cfg.seed,
                    storm=storm_spec,
                    schedule_prefix=PREFIX,
                    payload_bytes=payload_bytes,
                    inflight=cfg.baseline_inflight,
                    max_concurrent_connects=cfg.max_concurrent_connects,
                    deadline_s=cfg.deadline_s,
                    broker_pid=broker.pid,
                )
            )
            for index, at_s in enumerate(cfg.storm_times(), start=1):
                result.storms.append(
                    await run_storm(
                        index,
                        cfg=cfg,
                        epoch=epoch,
                        at_s=at_s,
                        api=api,
                        hub=hub,
                        pool=pool,
                        broker=broker,
                        echo=echo,
                        bare=bare,
                        ids=ids,
                    )
                )
            result.fleet_counters = pool.counters()
            workers_rss, workers_rss_base = pool.rss()
            result.rss_mib = {
                "workers": workers_rss / 2**20,
                "workers_before_fleet": workers_rss_base / 2**20,
                "bare_clients": bare.rss_bytes() / 2**20,
            }
            with contextlib.suppress(httpx.HTTPError, ValueError):
                result.hub_stats = await hub_stats(api)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.storm", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="storms")
    parser.add_argument("--first-storm-s", type=float, default=0.0, help="0: 30 s + 20 ms/device")
    parser.add_argument("--storm-every-s", type=float, default=0.0, help="0: 40 s + 12 ms/device")
    parser.add_argument("--offline-s", type=float, default=6.0)
    parser.add_argument("--reconnect-window-s", type=float, default=1.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.1)
    parser.add_argument("--max-concurrent-connects", type=int, default=64, help="per worker")
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser, result="storm-N.json", deadline_s=240.0, hub_log_level="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "storm",
        argv,
        build=lambda: StormConfig(
            devices=args.devices,
            workers=args.workers,
            repeats=args.repeats,
            first_storm_s=args.first_storm_s,
            storm_every_s=args.storm_every_s,
            offline_s=args.offline_s,
            reconnect_window_s=args.reconnect_window_s,
            deadline_s=args.deadline_s,
            poll_interval_s=args.poll_interval_s,
            max_concurrent_connects=args.max_concurrent_connects,
            seed=args.seed,
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: f"storm-{cfg.devices}.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, BrokerError, LoadError),
        stopped="broker, hub, workers and bare clients",
    )


if __name__ == "__main__":
    sys.exit(main())
