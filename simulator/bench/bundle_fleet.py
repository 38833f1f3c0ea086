"""Bundle fleet benchmark: N simulated devices given a new bundle at once on the flaky profile.

Run::

    .venv/bin/python -m simulator.bench.bundle_fleet --devices 1000 --payload-kib 1024 --repeats 3

It starts its own Mosquitto and hub (``--trust-root``) on loopback, makes a
fleet root with one root and one release key, registers N devices and runs
them in worker processes (``simulator.workers``: the real agent core and the
real bundle fetch core per device, ``--root`` given). Each round has two
phases, each with a bundle of its own (a fresh random payload of the same
size, signed and uploaded, so every phase really transfers):

- BASELINE, ``stable``: the same N devices with no offline windows.
- OURS, ``flaky``: the same N devices on the ``flaky`` network (each device
  online Exp(mean 30 s), offline Exp(mean 3 s), on its own), so transfers are
  cut and resume.

A phase starts a worker pool with that profile (device states continue from
the previous phase through the workers' journals), waits until every device
has connected once, then sends one ``PUT /api/v1/fleet/desired`` whose config
is ``{"workloads": [{"name": "bench", "bundle": "<sha256>"}]}`` and times it
until ``GET /api/v1/fleet/summary`` shows all N in sync. Per phase: that
time, the hub's ``bundles.bytes_served`` (and requests, chunks) over N and
over the bundle file's size, and the devices' own transfer counters (links
lost mid-transfer, resumes, bytes held when they resumed, duplicates).

Why this baseline: the figure that matters is bytes served per device over
the bundle's size, which must stay ~1.0 when transfers resume. The stable
phase is the same protocol, machine, fleet and bundle size with no
disconnects: its ratio is the floor (1.0 unless requests time out under
load) and its time is the transfer cost alone, so "flaky minus stable" is
exactly what disconnects and resumption cost in bytes, and "flaky / stable"
what they cost in time. A raw QoS 1 push of the same bytes to N subscribers
would have a ratio of 1 by construction and could not show a resend.

Rules:
- Loopback only. Every wait has a deadline (``deadline_s``); every count is N.
- Broker, hub and workers are stopped on every exit path (and on SIGTERM).
- Apply failures are off by default (``--apply-failure-rate``; the ``flaky``
  profile's own is 1%) so that "all applied" is a fixed end: the scenario
  measures transfers, and a failed fetch is reported as an error.
- The payload is random bytes, not an archive: the simulated applier does not
  unpack, and the hub and the devices verify signatures and hashes only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from devtools.broker import BrokerError, MosquittoBroker
from firmware_bundles import archive
from firmware_bundles.devfleet import DevFleet
from firmware_bundles.keys import sign_document
from firmware_bundles.model import (
    Manifest,
    PayloadInfo,
    RunSpec,
    Targets,
)
from protocols.bundles import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
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
from simulator.fleet import SIM_WINDOW_CHUNKS, device_ids
from simulator.journal import redistribute
from simulator.profiles import BUILTIN, ApplySpec, Profile
from simulator.workers import WorkerPool, WorkerSpec, split

MiB = 1024 * 1024
DAY = 86_400
PREFIX = "bfleet"
LABELS = {"bench": "bundle-fleet"}
PHASES = ("stable", "flaky")  # baseline first, then ours, every round


@dataclass(frozen=True)
class BenchConfig:
    """One run; limits carry their unit in the name."""

    devices: int = 1000
    payload_bytes: int = MiB
    repeats: int = 3
    workers: int = 2
    seed: int = 0
    flaky: str = "flaky"  # the profile of the OURS phase (a built-in or a profile file)
    apply_failure_rate: float = 0.0
    fetch_window_chunks: int = SIM_WINDOW_CHUNKS
    fetch_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    deadline_s: float = 600.0
    poll_interval_s: float = 0.1
    max_concurrent_connects: int = 64
    hub_log_level: str = "warning"
    workdir: Path | None = None  # None: a temporary directory, removed afterwards

    def __post_init__(self) -> None:
        if self.devices < 1 or self.repeats < 1 or self.workers < 1:
            raise ValueError("devices, repeats and workers must be at least 1")
        if self.payload_bytes < 1:
            raise ValueError("the payload must be at least one byte")
        if self.fetch_window_chunks < 1 or not 1 <= self.fetch_chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"need a window >= 1 and a chunk of 1..{MAX_CHUNK_BYTES} bytes")
        if not 0.0 <= self.apply_failure_rate <= 1.0:
            raise ValueError("apply_failure_rate must be within [0, 1]")
        if self.deadline_s <= 0 or self.poll_interval_s <= 0:
            raise ValueError("deadline_s and poll_interval_s must be positive")

    def profile(self, phase: str, flaky: Profile) -> Profile:
        """Pure: the phase's profile, its apply failures set to ``apply_failure_rate``."""
        base = BUILTIN["stable"] if phase == "stable" else flaky
        apply = ApplySpec(
            time_s=base.apply.time_s,
            jitter_s=base.apply.jitter_s,
            failure_rate=self.apply_failure_rate,
        )
        return msgspec.structs.replace(base, apply=apply)


# ---------------------------------------------------------------- keys and bundles


def signed_bundle(
    out: Path, keys: DevFleet, payload_bytes: int, *, version: str
) -> tuple[int, str]:
    """Write a signed bundle of ``payload_bytes`` random bytes; returns (file size, SHA-256).

    The payload is not an archive (nothing in this benchmark unpacks it).
    """
    payload_digest = hashlib.sha256()
    pieces: list[bytes] = []
    left = payload_bytes
    while left:
        piece = os.urandom(min(left, MiB))
        payload_digest.update(piece)
        pieces.append(piece)
        left -= len(piece)
    now = int(time.time())
    manifest = Manifest(
        name="bench",
        version=version,
        security_version=1,
        kind="app",
        targets=Targets(architectures=["any"]),
        run=RunSpec(command=["bin/app"]),
        payload=PayloadInfo(sha256=payload_digest.hexdigest(), size=payload_bytes),
        created=now - 60,
        expires=now + 30 * DAY,
    )
    envelope = sign_document(manifest, [keys.release_key])
    header = struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope))
    file_digest = hashlib.sha256(header + envelope)
    with open(out, "wb") as handle:
        handle.write(header + envelope)
        for piece in pieces:
            file_digest.update(piece)
            handle.write(piece)
    return out.stat().st_size, file_digest.hexdigest()


async def upload(api: httpx.AsyncClient, path: Path, sha: str) -> None:
    """POST the bundle file to the hub; raises BenchError unless it is stored as ``sha``."""
    response = await api.post(
        "/bundles",
        content=await asyncio.to_thread(path.read_bytes),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120.0,
    )
    if response.status_code != 201 or response.json().get("sha256") != sha:
        raise BenchError(f"upload refused: HTTP {response.status_code} {response.text[:300]}")


# ---------------------------------------------------------------- one phase


@dataclass
class Phase:
    """What one phase measured."""

    round: int
    profile: str
    devices_count: int
    bundle_bytes: int
    applied_s: float  # PUT sent -> the hub shows every device in sync
    bytes_served: int  # hub, during the phase
    requests: int  # hub: bundle requests received
    chunks_served: int
    hub_dropped: dict[str, int]
    hub_errors_sent: dict[str, int]
    devices: dict[str, Any]  # the workers' bundle counters
    disconnects: int  # sessions lost during the phase (all causes)
    network_drops: int  # offline windows begun during the phase
    hub_cpu_s: float
    broker_cpu_s: float
    workers_rss_bytes: int

    @property
    def served_per_device_ratio(self) -> float:
        """Pure: bytes served per device over the bundle file's size (1.0: each byte once)."""
        return self.bytes_served / self.devices_count / self.bundle_bytes

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["served_per_device_ratio"] = round(self.served_per_device_ratio, 4)
        return out


def _delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in sorted(keys)}


async def pool_until(
    pool: WorkerPool,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float,
    what: str,
) -> None:
    """Wait (woken by worker snapshots) until ``predicate(counters)``; raises BenchError."""
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


async def fleet_summary(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/fleet/summary")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


async def put_workload(api: httpx.AsyncClient, sha: str, n: int) -> None:
    """One fleet-wide desired state running bundle ``sha``; raises BenchError."""
    body = {
        "selector": {"labels": LABELS},
        "config": {"workloads": [{"name": "bench", "bundle": sha}]},
    }
    response = await api.put("/fleet/desired", json=body)
    if response.status_code != 200 or response.json().get("updated") != n:
        raise BenchError(f"PUT /fleet/desired: HTTP {response.status_code} {response.text[:300]}")


async def hub_quiet(api: httpx.AsyncClient, *, timeout_s: float) -> dict[str, Any]:
    """Hub stats once its chunk server has nothing queued and served nothing for 0.5 s."""
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = await hub_stats(api)
        bundles = stats["bundles"]
        if bundles["queued"] == 0 and last and bundles["bytes_served"] == last["bytes_served"]:
            return stats
        last = bundles
        await asyncio.sleep(0.5)
    raise BenchError(f"the hub's chunk server was still busy after {timeout_s}s: {last}")


async def run_phase(
    *,
    cfg: BenchConfig,
    round_no: int,
    phase: str,
    profile: Profile,
    work: Path,
    broker: MosquittoBroker,
    hub: HubChild,
    api: httpx.AsyncClient,
    keys: DevFleet,
) -> Phase:
    """Upload a fresh bundle, run the fleet on ``profile``, push it, measure. Raises BenchError."""
    path = work / f"bundle-{round_no}-{phase}.bundle"
    version = f"1.{round_no}.{PHASES.index(phase)}"
    size, sha = await asyncio.to_thread(
        signed_bundle, path, keys, cfg.payload_bytes, version=version
    )
    await upload(api, path, sha)
    path.unlink()
    ids = device_ids(cfg.devices, PREFIX)
    ranges = split(cfg.devices, cfg.workers)
    journals = redistribute(work / "states", [ids[r.start : r.stop] for r in ranges])
    epoch = time.time()
    specs = [
        WorkerSpec(
            index=i,
            prefix=PREFIX,
            count=cfg.devices,
            start=r.start,
            stop=r.stop,
            broker_url=broker.url,
            seed=cfg.seed + round_no,
            profile=profile,
            epoch=epoch,
            parent_pid=os.getpid(),
            journal=str(journals[i]),
            snapshot_interval_s=0.25,
            max_concurrent_connects=cfg.max_concurrent_connects,
            log_level="warning",
            root=str(keys.root_path),
            fetch_chunk_bytes=cfg.fetch_chunk_bytes,
            fetch_window_chunks=cfg.fetch_window_chunks,
        )
        for i, r in enumerate(ranges)
    ]
    pool = WorkerPool(specs, log_dir=work / f"workers-{round_no}-{phase}", respawn=False)
    try:
        await pool.start()
        await pool_until(
            pool,
            lambda c: c.get("ever_connected", 0) >= cfg.devices,
            timeout_s=cfg.deadline_s,
            what=f"{cfg.devices} devices connected once",
        )
        stats0 = (await hub_stats(api))["bundles"]
        fleet0 = pool.counters()
        cpu0 = (cpu_seconds(hub.pid), cpu_seconds(broker.pid))
        start = time.monotonic()
        await put_workload(api, sha, cfg.devices)
        summary = await poll(
            lambda: fleet_summary(api),
            lambda s: s["in_sync"] == cfg.devices or s["in_sync"] + s["failed"] >= cfg.devices,
            timeout_s=cfg.deadline_s,
            interval_s=cfg.poll_interval_s,
            what=f"round {round_no} {phase}: {cfg.devices} devices in sync",
        )
        applied_s = time.monotonic() - start
        if summary["in_sync"] != cfg.devices:
            errors = pool.counters().get("bundles", {}).get("errors", {})
            raise BenchError(
                f"round {round_no} {phase}: {summary['failed']} devices failed "
                f"(fetch errors {errors}): {summary}"
            )
        stats1 = (await hub_quiet(api, timeout_s=cfg.deadline_s))["bundles"]
        cpu1 = (cpu_seconds(hub.pid), cpu_seconds(broker.pid))
        await pool.wait_changed(0.5)  # one more snapshot with the last counters
        fleet1 = pool.counters()
        rss, _base = pool.rss()
    finally:
        await pool.stop()
    return Phase(
        round=round_no,
        profile=phase,
        devices_count=cfg.devices,
        bundle_bytes=size,
        applied_s=applied_s,
        bytes_served=stats1["bytes_served"] - stats0["bytes_served"],
        requests=stats1["requests"] - stats0["requests"],
        chunks_served=stats1["chunks_served"] - stats0["chunks_served"],
        hub_dropped=_delta(stats1["dropped"], stats0["dropped"]),
        hub_errors_sent=_delta(stats1["errors_sent"], stats0["errors_sent"]),
        devices=fleet1.get("bundles", {}),
        disconnects=int(fleet1.get("connections_lost", 0)) - int(fleet0.get("connections_lost", 0)),
        network_drops=int(fleet1.get("network_drops", 0)) - int(fleet0.get("network_drops", 0)),
        hub_cpu_s=cpu1[0] - cpu0[0],
        broker_cpu_s=cpu1[1] - cpu0[1],
        workers_rss_bytes=rss,
    )


# ---------------------------------------------------------------- the run


@dataclass
class BenchResult:
    config: BenchConfig
    setup_s: dict[str, float] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)

    def of(self, profile: str) -> list[Phase]:
        return [p for p in self.phases if p.profile == profile]

    def medians(self) -> dict[str, dict[str, float]]:
        """Pure: per phase kind, the medians of time, served ratio and requests per device."""
        out: dict[str, dict[str, float]] = {}
        for kind in PHASES:
            runs = self.of(kind)
            n = self.config.devices
            out[kind] = {
                "applied_s": median([p.applied_s for p in runs]),
                "served_per_device_ratio": median([p.served_per_device_ratio for p in runs]),
                "requests_per_device": median([p.requests / n for p in runs]),
                "transfer_link_drops": median([p.devices.get("link_drops", 0) for p in runs]),
                "resumes": median([p.devices.get("resumes", 0) for p in runs]),
            }
        return out

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        m = self.medians()
        return {
            "benchmark": "bundle_fleet",
            "command": command,
            "devices": self.config.devices,
            "payload_bytes": self.config.payload_bytes,
            "config": config,
            "host": host_info(),
            "setup_s": {k: round(v, 3) for k, v in self.setup_s.items()},
            "phases": [p.as_json() for p in self.phases],
            "median": m,
            "ratio_flaky_over_stable_time": round(
                ratio(m["flaky"]["applied_s"], m["stable"]["applied_s"]), 3
            ),
        }


def format_table(result: BenchResult) -> str:
    """Pure: the human-readable table printed at the end of a run."""
    cfg = result.config
    n = cfg.devices
    size = result.phases[0].bundle_bytes if result.phases else 0
    lines = [
        f"bundle_fleet: {n} devices, {size / MiB:.2f} MiB bundle, {cfg.repeats} rounds, "
        f"{cfg.workers} workers, window {cfg.fetch_window_chunks} x "
        f"{cfg.fetch_chunk_bytes // 1024} KiB, loopback",
        f"{'phase':<8}{'round':>6}{'applied s':>11}{'served/dev/size':>17}{'req/dev':>9}"
        f"{'link drops':>12}{'resumes':>9}{'held MiB':>10}{'dup KiB':>9}{'disc':>7}"
        f"{'RSS KiB/dev':>13}",
    ]
    for p in result.phases:
        d = p.devices
        lines.append(
            f"{p.profile:<8}{p.round:>6}{p.applied_s:>11.2f}{p.served_per_device_ratio:>17.4f}"
            f"{p.requests / n:>9.1f}{d.get('link_drops', 0):>12}{d.get('resumes', 0):>9}"
            f"{d.get('resumed_bytes', 0) / MiB:>10.1f}{d.get('duplicate_bytes', 0) / 1024:>9.0f}"
            f"{p.disconnects:>7}{p.workers_rss_bytes / n / 1024:>13.0f}"
        )
    m = result.medians()
    for kind in PHASES:
        lines.append(
            f"median {kind}: applied after {m[kind]['applied_s']:.2f} s, served/device/size "
            f"{m[kind]['served_per_device_ratio']:.4f}"
        )
    lines.append(
        f"ratio flaky/stable time (medians): "
        f"{ratio(m['flaky']['applied_s'], m['stable']['applied_s']):.2f}x"
    )
    return "\n".join(lines)


async def run_bench(cfg: BenchConfig, flaky: Profile) -> BenchResult:
    """The whole benchmark; raises BenchError or BrokerError."""
    ids = device_ids(cfg.devices, PREFIX)
    result = BenchResult(config=cfg)
    clock = time.perf_counter
    with workdir(cfg.workdir, "driftless-bundle-fleet-") as work:
        keys = DevFleet(work / "keys")
        async with contextlib.AsyncExitStack() as stack:
            t = clock()
            broker = MosquittoBroker(work / "broker")
            stack.callback(broker.stop)
            broker.start()

            def make_hub() -> HubChild:
                return HubChild(
                    work,
                    broker.url,
                    log_level=cfg.hub_log_level,
                    trust_root=keys.root_path,
                    signing_key=keys.hub_key_path,
                )

            hub, api = await start_hub(stack, make_hub, timeout_s=cfg.deadline_s)
            await poll(
                lambda: hub_stats(api),
                lambda s: bool(s["bundles"]["mqtt_connected"]),
                timeout_s=cfg.deadline_s,
                interval_s=0.05,
                what="the hub's chunk server",
            )
            result.setup_s["broker_and_hub"] = clock() - t
            t = clock()
            await register_batch(api, ids, LABELS)
            result.setup_s["register"] = clock() - t
            for round_no in range(1, cfg.repeats + 1):
                for phase in PHASES:
                    result.phases.append(
                        await run_phase(
                            cfg=cfg,
                            round_no=round_no,
                            phase=phase,
                            profile=cfg.profile(phase, flaky),
                            work=work,
                            broker=broker,
                            hub=hub,
                            api=api,
                            keys=keys,
                        )
                    )
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.bundle_fleet", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--payload-kib", type=int, default=1024, help="bundle payload size")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of stable + flaky")
    parser.add_argument("--workers", type=int, default=2, help="simulator worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flaky-profile", default="flaky", help="the OURS phase's profile (name or file)"
    )
    parser.add_argument("--apply-failure-rate", type=float, default=0.0)
    parser.add_argument(
        "--fetch-window",
        type=int,
        default=SIM_WINDOW_CHUNKS,
        help="requests in flight per device (the agent's default is 8)",
    )
    parser.add_argument("--fetch-chunk-kib", type=int, default=DEFAULT_CHUNK_BYTES // 1024)
    parser.add_argument("--max-concurrent-connects", type=int, default=64, help="per worker")
    add_run_arguments(
        parser, result="bundle-fleet-N.json", deadline_s=600.0, hub_log_level="warning"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from simulator.profiles import ProfileError, load_profile

    return run_bench_main(
        "bundle_fleet",
        argv,
        build=lambda: (
            BenchConfig(
                devices=args.devices,
                payload_bytes=args.payload_kib * 1024,
                repeats=args.repeats,
                workers=args.workers,
                seed=args.seed,
                flaky=args.flaky_profile,
                apply_failure_rate=args.apply_failure_rate,
                fetch_window_chunks=args.fetch_window,
                fetch_chunk_bytes=args.fetch_chunk_kib * 1024,
                deadline_s=args.deadline_s,
                max_concurrent_connects=args.max_concurrent_connects,
                hub_log_level=args.hub_log_level,
                workdir=args.workdir,
            ),
            load_profile(args.flaky_profile),
        ),
        bench=lambda built: run_bench(*built),
        table=format_table,
        result_file=lambda built: f"bundle-fleet-{built[0].devices}.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, BrokerError, httpx.HTTPError, OSError),
        stopped="broker, hub and workers",
        bad_config=(ValueError, ProfileError),
    )


if __name__ == "__main__":
    sys.exit(main())
