"""Rollout benchmark: a deployment change in five waves, against bare publish/echo rounds.

``python -m simulator.bench.rollout --devices 5000 --repeats 3`` starts its own
Mosquitto and hub (``--rollout-interval-s``, default 0.2 s: while a rollout is active
its controller looks at least this often) on loopback, registers N devices through the
API, runs N simulated devices (the real agent core, config-only documents: no
supervised workloads, so the figure is about orchestration), puts a fleet deployment
``bench`` at version 1 everywhere at once, and then, R times each, on the same broker:

- BASELINE: five back-to-back rounds of a bare aiomqtt publish/echo
  (:class:`simulator.bench.converge.Baseline`), each to the devices of one wave (the
  same sizes, from the planner's own :func:`~hub.controllers.rollout.plan.build_waves`),
  QoS 1 messages the size of the document; the time is the sum of the five rounds.
- OURS: one ``PUT /api/v1/deployments/bench`` that changes the workload's config and
  carries ``rollout: {strategy: waves, waves: [20%, 20%, 20%, 20%]}`` (five waves, no
  soak, no pause); the time is from sending it until every device has applied the new
  document (the fleet's counters, in this process) and ``GET
  /deployments/bench/rollout`` (polled from then on, every ``poll_interval_s``) shows
  the rollout ``succeeded``.
- Per wave, from the hub's ``rollout_device`` rows (read from its SQLite file after
  the rollout, read-only): the first hand-out and the last outcome, as offsets from
  the PUT. An outcome is recorded by the controller's look that saw the report, and
  the next wave is handed out by that same look.
- The hub's CPU seconds from the PUT to ``succeeded`` (``/proc/<pid>/stat``), and
  that per device rolled out, in milliseconds.

Rules:
- Loopback only. Every wait has a deadline (``deadline_s``); every count is N.
- The broker and the hub are stopped at exit, on error and on SIGINT/SIGTERM.
- Nothing polls the hub while the waves go out (the view reads every device of the
  rollout): the hub's CPU is the rollout's, plus the devices' heartbeats
  (``heartbeat_s``, the agent's default 30 s; 0 turns them off).
- A rollout that ends other than ``succeeded`` (aborted, paused) fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import BrokerError, MosquittoBroker
from hub.controllers.rollout.plan import build_waves
from hub.controllers.rollout.policy import parse_policy
from simulator.bench.common import (
    BenchError,
    HubChild,
    add_run_arguments,
    cpu_seconds,
    host_info,
    median,
    poll,
    ratio,
    register_batch,
    run_bench_main,
    start_hub,
    workdir,
)
from simulator.bench.converge import Baseline, _document, deployment_workload, fleet_summary
from simulator.fleet import Fleet, FleetConfig, FleetError, FleetTimeout, device_ids

LABELS = {"bench": "rollout"}
SELECTOR = "bench=rollout"  # LABELS as a deployment's selector: every device
DEPLOYMENT = "bench"
POLICY: dict[str, Any] = {"strategy": "waves", "waves": ["20%", "20%", "20%", "20%"]}
"""Four waves of 20% and the rest (20%) in a fifth; no soak, no pause, no limits."""
TERMINAL = ("succeeded", "aborted", "superseded")


@dataclass(frozen=True)
class BenchConfig:
    devices: int = 5000
    repeats: int = 3
    deadline_s: float = 300.0
    rollout_interval_s: float = 0.2
    poll_interval_s: float = 0.05
    heartbeat_s: float = 30.0  # the devices' heartbeat interval; 0: none
    baseline_inflight: int = 100
    max_concurrent_connects: int = 64
    seed: int = 0
    hub_log_level: str = "info"
    workdir: Path | None = None  # None: a temporary directory, removed afterwards

    def __post_init__(self) -> None:
        if self.devices < 5 or self.repeats < 1:
            raise ValueError("devices must be at least 5 (five waves) and repeats at least 1")
        if self.deadline_s <= 0 or self.poll_interval_s <= 0 or self.rollout_interval_s <= 0:
            raise ValueError("deadline_s, poll_interval_s and rollout_interval_s must be positive")
        if self.heartbeat_s and not 1.0 <= self.heartbeat_s <= 86400.0:
            raise ValueError(f"heartbeat_s {self.heartbeat_s} is not 0 or within [1, 86400] s")


@dataclass(frozen=True)
class Wave:
    index: int
    size: int
    started_s: float  # first hand-out, seconds after the PUT was sent
    done_s: float  # last outcome recorded, seconds after the PUT was sent
    baseline_s: float  # the bare publish/echo round of the same devices

    @property
    def took_s(self) -> float:
        return self.done_s - self.started_s


@dataclass(frozen=True)
class Round:
    index: int
    baseline_s: float  # the five publish/echo rounds, back to back
    ours_s: float  # PUT sent -> every device applied and the rollout succeeded
    ours_put_s: float  # the PUT's answer arrived
    ours_applied_s: float  # every device had applied the new document (fleet counters)
    hub_cpu_s: float  # the hub's CPU seconds from the PUT to succeeded
    waves: tuple[Wave, ...]

    @property
    def cpu_ms_per_device(self) -> float:
        total = sum(w.size for w in self.waves)
        return 1000.0 * self.hub_cpu_s / total if total else float("nan")


ROUND_FIGURES = ("baseline_s", "ours_s", "ours_put_s", "ours_applied_s", "hub_cpu_s")


@dataclass
class BenchResult:
    config: BenchConfig
    payload_bytes: int
    wave_sizes: tuple[int, ...]
    setup_s: dict[str, float] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    fleet_counters: dict[str, Any] = field(default_factory=dict)
    hub_stats: dict[str, Any] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        """Pure: the median of each timing over the rounds (and CPU per device)."""
        out = {n: median([getattr(r, n) for r in self.rounds]) for n in ROUND_FIGURES}
        out["cpu_ms_per_device"] = median([r.cpu_ms_per_device for r in self.rounds])
        return out

    def wave_medians(self) -> list[dict[str, float]]:
        """Pure: per wave, the median of its figures over the rounds."""
        return [
            {
                "took_s": median([r.waves[i].took_s for r in self.rounds]),
                "started_s": median([r.waves[i].started_s for r in self.rounds]),
                "done_s": median([r.waves[i].done_s for r in self.rounds]),
                "baseline_s": median([r.waves[i].baseline_s for r in self.rounds]),
            }
            for i in range(len(self.wave_sizes))
        ]

    def ratio(self) -> float:
        """Pure: median ours / median baseline."""
        m = self.medians()
        return ratio(m["ours_s"], m["baseline_s"])

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "rollout",
            "command": command,
            "devices": self.config.devices,
            "repeats": self.config.repeats,
            "policy": POLICY,
            "wave_sizes": list(self.wave_sizes),
            "payload_bytes": self.payload_bytes,
            "config": config,
            "host": host_info(),
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "rounds": [
                {
                    **{n: round(getattr(r, n), 4) for n in ROUND_FIGURES},
                    "index": r.index,
                    "cpu_ms_per_device": round(r.cpu_ms_per_device, 4),
                    "ratio_ours_over_baseline": round(ratio(r.ours_s, r.baseline_s), 3),
                    "waves": [{**asdict(w), "took_s": round(w.took_s, 4)} for w in r.waves],
                }
                for r in self.rounds
            ],
            "median": {k: round(v, 4) for k, v in self.medians().items()},
            "median_waves": [{k: round(v, 4) for k, v in w.items()} for w in self.wave_medians()],
            "ratio_ours_over_baseline": round(self.ratio(), 3),
            "fleet_counters": self.fleet_counters,
            "hub_stats": self.hub_stats,
        }


def format_table(result: BenchResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    runs = "".join(f"{'run ' + str(r.index):>9}" for r in result.rounds)
    medians = result.medians()
    lines = [
        f"rollout: {cfg.devices} devices in {len(result.wave_sizes)} waves "
        f"({', '.join(map(str, result.wave_sizes))}), no soak, {cfg.repeats} repeats, "
        f"{result.payload_bytes}-byte documents, rollout interval {cfg.rollout_interval_s:g}s, "
        f"heartbeats {f'every {cfg.heartbeat_s:g}s' if cfg.heartbeat_s else 'off'}, loopback",
        f"{'(seconds)':<34}{runs}{'median':>9}",
    ]
    rows = [
        ("baseline: 5 bare echo rounds", "baseline_s"),
        ("ours: PUT returned", "ours_put_s"),
        ("ours: every device applied", "ours_applied_s"),
        ("ours: rollout succeeded", "ours_s"),
        ("hub CPU seconds (PUT->succeeded)", "hub_cpu_s"),
    ]
    for label, name in rows:
        cells = "".join(f"{getattr(r, name):>9.3f}" for r in result.rounds)
        lines.append(f"{label:<34}{cells}{medians[name]:>9.3f}")
    cells = "".join(f"{r.cpu_ms_per_device:>9.3f}" for r in result.rounds)
    lines.append(f"{'hub CPU ms per device':<34}{cells}{medians['cpu_ms_per_device']:>9.3f}")
    lines.append("per wave (medians, seconds): size, started, done, took, bare echo")
    for index, (size, wave) in enumerate(
        zip(result.wave_sizes, result.wave_medians(), strict=True)
    ):
        lines.append(
            f"  wave {index}: {size:>6} {wave['started_s']:>8.3f} {wave['done_s']:>8.3f} "
            f"{wave['took_s']:>8.3f} {wave['baseline_s']:>8.3f}"
        )
    cells = " ".join(f"{ratio(r.ours_s, r.baseline_s):.2f}x" for r in result.rounds)
    lines.append(f"ratio ours/baseline per round: {cells}")
    lines.append(f"ratio ours/baseline (median): {result.ratio():.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- the hub's rows


def _epoch(value: str | None) -> float:
    """Pure: a stored timestamp (naive UTC text) as epoch seconds."""
    if value is None:
        raise BenchError("a rollout device without a hand-out or an outcome")
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


def wave_times(db_path: Path, rollout_id: int, since: float) -> list[tuple[int, float, float]]:
    """Per wave of the rollout: (devices, first hand-out, last outcome), as seconds after
    ``since`` (epoch), from the hub's SQLite file opened read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)) as db:
        rows = db.execute(
            "SELECT wave, count(*), min(handed_out_at), max(outcome_at) FROM rollout_device "
            "WHERE rollout_id = ? GROUP BY wave ORDER BY wave",
            (rollout_id,),
        ).fetchall()
    return [(n, _epoch(first) - since, _epoch(last) - since) for _wave, n, first, last in rows]


# ---------------------------------------------------------------- one change


async def put_deployment(
    api: httpx.AsyncClient, workload: dict[str, Any], rollout: dict[str, Any] | None
) -> dict[str, Any]:
    """``PUT /deployments/bench``; raises BenchError unless the hub took it."""
    spec: dict[str, Any] = {"selector": SELECTOR, "workloads": [workload]}
    if rollout is not None:
        spec["rollout"] = rollout
    response = await api.put(f"/deployments/{DEPLOYMENT}", json={"spec": spec})
    if response.status_code not in (200, 201):
        raise BenchError(
            f"PUT /deployments/{DEPLOYMENT}: HTTP {response.status_code} {response.text[:300]}"
        )
    return response.json()  # type: ignore[no-any-return]


async def rollout_view(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get(f"/deployments/{DEPLOYMENT}/rollout")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def _applied(fleet: Fleet) -> int:
    """Applies the whole fleet has done so far (any generation)."""
    return sum(fleet.counters.applied.values())


async def measure_ours(
    api: httpx.AsyncClient,
    fleet: Fleet,
    hub: HubChild,
    round_no: int,
    *,
    cfg: BenchConfig,
    workload: dict[str, Any],
    version: int,
) -> tuple[Round, int, float]:
    """One change rolled out in waves, timed to every device applied and ``succeeded``.

    Returns the round (without the baseline and the waves), the rollout's id and the
    epoch second the PUT was sent.
    """
    total = len(fleet)
    before = _applied(fleet)
    cpu_before = cpu_seconds(hub.pid)
    sent_at = time.time()
    start = time.perf_counter()

    async def change() -> float:
        await put_deployment(api, workload, POLICY)
        return time.perf_counter() - start

    put = asyncio.create_task(change())
    try:
        await fleet.wait_until(
            lambda _c: _applied(fleet) >= before + total,
            timeout_s=cfg.deadline_s,
            what=f"round {round_no}: {total} devices applied the change",
        )
        applied_s = time.perf_counter() - start
        put_s = await asyncio.wait_for(put, cfg.deadline_s)
        view = await poll(
            lambda: rollout_view(api),
            lambda v: v["to_version"] == version and v["state"] in TERMINAL,
            timeout_s=cfg.deadline_s,
            interval_s=cfg.poll_interval_s,
            what=f"round {round_no}: rollout of version {version} at an end",
        )
        succeeded_s = time.perf_counter() - start
        cpu = cpu_seconds(hub.pid) - cpu_before
    finally:
        put.cancel()
    if view["state"] != "succeeded" or view["counts"]["succeeded"] != total:
        raise BenchError(
            f"round {round_no}: rollout {view['state']} ({view['reason']}): {view['counts']}"
        )
    ours = Round(
        index=round_no,
        baseline_s=float("nan"),
        ours_s=succeeded_s,
        ours_put_s=put_s,
        ours_applied_s=applied_s,
        hub_cpu_s=cpu,
        waves=(),
    )
    return ours, int(view["id"]), sent_at


# ---------------------------------------------------------------- the run


async def run_bench(cfg: BenchConfig) -> BenchResult:
    """The whole benchmark; raises BenchError (or FleetError/FleetTimeout/BrokerError)."""
    ids = device_ids(cfg.devices)
    # The rollout's waves are fixed by the hub in a hashed order; their sizes are the
    # planner's, so the baseline's rounds are the same sizes (its devices: slices).
    sizes = tuple(len(w) for w in build_waves(parse_policy(POLICY), ids))
    parts, at = [], 0
    for size in sizes:
        parts.append(slice(at, at + size))
        at += size
    payload_bytes = len(_document(ids[0], {"workloads": [deployment_workload(1, ids[0])]}))
    result = BenchResult(config=cfg, payload_bytes=payload_bytes, wave_sizes=sizes)
    clock = time.perf_counter
    with workdir(cfg.workdir, "driftless-bench-rollout-") as work:
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(work / "broker")
            stack.callback(broker.stop)
            broker.start()
            result.setup_s["broker_start"] = clock() - t

            def make_hub() -> HubChild:
                hub = HubChild(work, broker.url, log_level=cfg.hub_log_level)
                hub.argv += ["--rollout-interval-s", str(cfg.rollout_interval_s)]
                return hub

            t = clock()
            hub, api = await start_hub(stack, make_hub, timeout_s=cfg.deadline_s)
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
                    max_concurrent_connects=cfg.max_concurrent_connects,
                    heartbeat_s=cfg.heartbeat_s or None,
                )
            )
            await stack.enter_async_context(fleet)
            await fleet.wait_connected(timeout_s=cfg.deadline_s)
            result.setup_s["fleet_connected"] = clock() - t

            # Version 1 everywhere at once (no rollout member), the fleet at rest.
            t = clock()
            await put_deployment(api, deployment_workload(1, ids[0]), None)
            await poll(
                lambda: fleet_summary(api),
                lambda s: s["online"] == cfg.devices and s["in_sync"] == cfg.devices,
                timeout_s=cfg.deadline_s,
                interval_s=max(cfg.poll_interval_s, 0.2),
                what=f"hub shows {cfg.devices} devices online and in sync at version 1",
            )
            result.setup_s["version_1_everywhere"] = clock() - t

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
                echoes = [
                    await baseline.measure(index * 10 + wave, timeout_s=cfg.deadline_s, part=part)
                    for wave, part in enumerate(parts)
                ]
                ours, rollout_id, sent_at = await measure_ours(
                    api,
                    fleet,
                    hub,
                    index,
                    cfg=cfg,
                    workload=deployment_workload(index + 1, ids[0]),
                    version=index + 1,
                )
                rows = await asyncio.to_thread(wave_times, hub.db_path, rollout_id, sent_at)
                if [n for n, _, _ in rows] != list(sizes):
                    raise BenchError(f"round {index}: waves {rows}, expected sizes {sizes}")
                waves = tuple(
                    Wave(index=i, size=n, started_s=first, done_s=last, baseline_s=echo)
                    for i, ((n, first, last), echo) in enumerate(zip(rows, echoes, strict=True))
                )
                result.rounds.append(replace(ours, baseline_s=sum(echoes), waves=waves))
            result.fleet_counters = fleet.counters.snapshot()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                result.hub_stats = (await api.get("/hub/stats")).json()
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.rollout", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rollout-interval-s",
        type=float,
        default=0.2,
        help="the hub's --rollout-interval-s: its controller looks this often while active",
    )
    parser.add_argument("--poll-interval-s", type=float, default=0.05)
    parser.add_argument(
        "--heartbeat-s", type=float, default=30.0, help="the devices' heartbeats; 0: none"
    )
    parser.add_argument("--max-concurrent-connects", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser, result="rollout-N.json", deadline_s=300.0, hub_log_level="info")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "rollout",
        argv,
        build=lambda: BenchConfig(
            devices=args.devices,
            repeats=args.repeats,
            deadline_s=args.deadline_s,
            rollout_interval_s=args.rollout_interval_s,
            poll_interval_s=args.poll_interval_s,
            heartbeat_s=args.heartbeat_s,
            max_concurrent_connects=args.max_concurrent_connects,
            seed=args.seed,
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: f"rollout-{cfg.devices}.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, FleetError, FleetTimeout, BrokerError),
        stopped="broker and hub",
    )


if __name__ == "__main__":
    sys.exit(main())
