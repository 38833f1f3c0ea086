"""What mutual TLS and enrollment cost the simulated fleet: the same fleet plain, then enrolled.

``python -m simulator.bench.tls --devices 1000`` runs, on loopback, each mode
with a fresh Mosquitto and hub of its own:

- PLAIN: the plain listener, devices registered through ``POST /devices/batch``.
- TLS: a mutual-TLS Mosquitto with the device ACL and a CRL (``hub.broker_config``),
  a hub over mTLS; the devices registered the same way, then enrolled as
  ``driftless sim run --enroll`` enrolls them (``simulator.enroll.enroll_fleet``:
  a key and CSR each, one claim token, ``POST /enroll``, at most
  ``--enroll-concurrency`` in flight), then checked again for reuse (what a
  rerun pays); every device connects with its own certificate.

In both modes the workers (``simulator.workers``, ``--workers`` of them) start
together and the bench measures: from the launch until every device is
connected; the CPU seconds the broker and the workers spent until then; the
resident memory of the workers (total, and above what they held before their
fleets started) and of the broker, per device, once all are connected; then
one fleet-wide desired change until the hub shows every device in sync.

Rules:
- Loopback only; every wait has a deadline (``--deadline-s``).
- The broker, the hub and the workers are stopped on every exit path.
- The hub does not sign documents in either mode, so the difference is TLS
  (and enrollment) alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import BrokerError, MosquittoBroker, hub_broker_args
from hub.broker_config import hub_identities, write_secure_files
from hub.identity import CertificateAuthority
from simulator.bench.common import (
    BenchError,
    HubChild,
    add_run_arguments,
    cpu_seconds,
    host_info,
    poll,
    register_batch,
    rss_mib,
    run_bench_main,
    start_hub,
    workdir,
)
from simulator.bench.storm import pool_until
from simulator.enroll import DeviceIdentities, EnrollError, enroll_fleet
from simulator.fleet import device_ids
from simulator.profiles import BUILTIN
from simulator.workers import WorkerPool, WorkerSpec, split

PREFIX = "tlsb"
LABELS = {"sim": PREFIX}
MODES = ("plain", "tls")


@dataclass(frozen=True)
class TlsBenchConfig:
    devices: int
    workers: int = 2
    enroll_concurrency: int = 8
    max_concurrent_connects: int = 64  # per worker
    deadline_s: float = 300.0
    modes: tuple[str, ...] = MODES
    hub_log_level: str = "warning"
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1 or self.workers < 1 or self.enroll_concurrency < 1:
            raise ValueError("devices, workers and enroll_concurrency must be at least 1")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"modes must be among {MODES}")


@dataclass
class ModeResult:
    mode: str
    register_s: float = 0.0
    enrollment: dict[str, Any] = field(default_factory=dict)  # EnrollmentResult.as_dict()
    reuse_check_s: float | None = None  # a second round: every identity reused
    connected_s: float = 0.0  # worker launch -> every device connected
    broker_cpu_s: float = 0.0  # until every device connected
    workers_cpu_s: float = 0.0  # ditto (interpreter start and imports included)
    workers_rss_mib: float = 0.0  # once connected
    workers_rss_before_fleet_mib: float = 0.0
    broker_rss_mib: float = 0.0  # once connected
    broker_rss_idle_mib: float = 0.0  # with only the hub connected
    converge_s: float = 0.0  # PUT /fleet/desired -> every device in sync on the hub
    connect_failures: int = 0

    def per_device(self, devices: int) -> dict[str, float]:
        kib = 1024 / devices
        return {
            "workers_rss_kib": round(self.workers_rss_mib * kib, 1),
            "workers_marginal_kib": round(
                (self.workers_rss_mib - self.workers_rss_before_fleet_mib) * kib, 1
            ),
            "broker_kib": round((self.broker_rss_mib - self.broker_rss_idle_mib) * kib, 1),
            "broker_cpu_ms": round(self.broker_cpu_s * 1000 / devices, 3),
            "workers_cpu_ms": round(self.workers_cpu_s * 1000 / devices, 3),
        }


@dataclass
class TlsBenchResult:
    config: TlsBenchConfig
    modes: list[ModeResult] = field(default_factory=list)

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "tls",
            "command": command,
            "devices": self.config.devices,
            "workers": self.config.workers,
            "config": config,
            "host": host_info(),
            "modes": {
                m.mode: {**asdict(m), "per_device": m.per_device(self.config.devices)}
                for m in self.modes
            },
        }


def format_table(result: TlsBenchResult) -> str:
    """Pure: the table printed at the end."""
    n = result.config.devices
    lines = [
        f"tls: {n} devices in {result.config.workers} workers, loopback",
        f"{'':36}" + "".join(f"{m.mode:>12}" for m in result.modes),
    ]

    def row(label: str, values: Sequence[str]) -> None:
        lines.append(f"{label:36}" + "".join(f"{v:>12}" for v in values))

    def enrolled(m: ModeResult, key: str) -> str:
        value = m.enrollment.get(key)
        return "-" if value is None else str(value)

    row("enrollment s (all devices)", [enrolled(m, "enroll_s") for m in result.modes])
    row("enrollments per s", [enrolled(m, "per_s") for m in result.modes])
    row(
        "POST /enroll p50 ms",
        [str((m.enrollment.get("request_ms") or {}).get("p50", "-")) for m in result.modes],
    )
    row(
        "rerun: reuse check s",
        ["-" if m.reuse_check_s is None else f"{m.reuse_check_s:.2f}" for m in result.modes],
    )
    row("all connected after s", [f"{m.connected_s:.2f}" for m in result.modes])
    per = [m.per_device(n) for m in result.modes]
    row("broker CPU ms per device (connect)", [f"{p['broker_cpu_ms']:.2f}" for p in per])
    row("workers CPU ms per device (connect)", [f"{p['workers_cpu_ms']:.2f}" for p in per])
    row("workers RSS KiB per device", [f"{p['workers_rss_kib']:.1f}" for p in per])
    row("  marginal KiB per device", [f"{p['workers_marginal_kib']:.1f}" for p in per])
    row("broker KiB per connection", [f"{p['broker_kib']:.1f}" for p in per])
    row("one change converged s", [f"{m.converge_s:.2f}" for m in result.modes])
    row("connect failures", [str(m.connect_failures) for m in result.modes])
    return "\n".join(lines)


async def _summary(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/fleet/summary")
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


async def run_mode(mode: str, cfg: TlsBenchConfig, work: Path, ids: Sequence[str]) -> ModeResult:
    """One mode from a fresh broker and hub; raises BenchError or BrokerError."""
    result = ModeResult(mode=mode)
    clock = time.monotonic
    async with contextlib.AsyncExitStack() as stack:
        hub_dir = work / "hub"
        hub_dir.mkdir(parents=True, exist_ok=True)
        files = None
        if mode == "tls":
            now = dt.datetime.now(dt.UTC)
            ca = CertificateAuthority.load_or_create(hub_dir / "identity", now=now)
            files = write_secure_files(
                ca,
                work / "broker-tls",
                hub_identities=hub_identities("driftless-hub"),
                revoked=[],
                now=now,
            )
        broker = MosquittoBroker(work / "broker", tls=files)
        stack.callback(broker.kill)
        broker.start()

        def make_hub() -> HubChild:
            hub = HubChild(hub_dir, broker.url, log_level=cfg.hub_log_level)
            if files is not None:
                hub.argv += hub_broker_args(broker, hub_dir / "identity")
            return hub

        hub, api = await start_hub(stack, make_hub, timeout_s=cfg.deadline_s)
        result.broker_rss_idle_mib = rss_mib(broker.pid)
        t = clock()
        await register_batch(api, ids, LABELS)
        result.register_s = clock() - t

        identities = DeviceIdentities(work / "identities")
        if mode == "tls":
            device_api = await stack.enter_async_context(
                httpx.AsyncClient(base_url=hub.base_url + "/api/v1", timeout=60.0)
            )
            try:
                first = await enroll_fleet(
                    api,
                    device_api,
                    ids,
                    identities,
                    labels=LABELS,
                    now=dt.datetime.now(dt.UTC),
                    concurrency=cfg.enroll_concurrency,
                )
                again = await enroll_fleet(
                    api, device_api, ids, identities, labels=LABELS, now=dt.datetime.now(dt.UTC)
                )
            except EnrollError as exc:
                raise BenchError(f"enrollment: {exc}") from None
            if first.enrolled != len(ids) or again.reused != len(ids):
                raise BenchError(f"enrolled {first.enrolled}, then reused {again.reused}")
            result.enrollment = first.as_dict()
            result.reuse_check_s = round(again.check_s, 3)

        specs = [
            WorkerSpec(
                index=i,
                prefix=PREFIX,
                count=cfg.devices,
                start=part.start,
                stop=part.stop,
                broker_url=broker.url,
                seed=0,
                profile=BUILTIN["stable"],
                epoch=time.time(),
                parent_pid=os.getpid(),
                snapshot_interval_s=0.2,
                max_concurrent_connects=cfg.max_concurrent_connects,
                log_level="warning",
                identity_dir=str(identities.directory) if mode == "tls" else None,
            )
            for i, part in enumerate(split(cfg.devices, cfg.workers))
        ]
        pool = WorkerPool(specs, log_dir=work / "workers", respawn=False)
        stack.push_async_callback(pool.stop)
        broker_cpu0 = cpu_seconds(broker.pid)
        t = clock()
        await pool.start()
        await pool_until(
            pool,
            lambda c: c.get("connected", 0) >= cfg.devices,
            timeout_s=cfg.deadline_s,
            what=f"{cfg.devices} devices connected ({mode})",
        )
        result.connected_s = clock() - t
        result.broker_cpu_s = cpu_seconds(broker.pid) - broker_cpu0
        result.workers_cpu_s = sum(cpu_seconds(pid) for pid in pool.pids())
        await pool.wait_changed(1.0)  # a snapshot taken with every device connected
        rss, base = pool.rss()
        result.workers_rss_mib = rss / 2**20
        result.workers_rss_before_fleet_mib = base / 2**20
        result.broker_rss_mib = rss_mib(broker.pid)

        t = clock()
        response = await api.put(
            "/fleet/desired",
            json={"selector": {"labels": LABELS}, "config": {"bench": "tls", "mode": mode}},
        )
        if response.status_code != 200:
            raise BenchError(f"PUT /fleet/desired: HTTP {response.status_code} {response.text}")
        await poll(
            lambda: _summary(api),
            lambda s: s.get("in_sync") == cfg.devices and s.get("total") == cfg.devices,
            timeout_s=cfg.deadline_s,
            interval_s=0.05,
            what=f"every device in sync ({mode})",
        )
        result.converge_s = clock() - t
        result.connect_failures = int(pool.counters().get("connect_failures", 0))
    return result


async def run_bench(cfg: TlsBenchConfig) -> TlsBenchResult:
    result = TlsBenchResult(config=cfg)
    ids = device_ids(cfg.devices, PREFIX)
    with workdir(cfg.workdir, "driftless-tls-") as work:
        for mode in cfg.modes:
            result.modes.append(await run_mode(mode, cfg, work / mode, ids))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.tls", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--enroll-concurrency", type=int, default=8)
    parser.add_argument("--max-concurrent-connects", type=int, default=64, help="per worker")
    parser.add_argument("--modes", default="plain,tls", help="plain, tls or both (default)")
    add_run_arguments(parser, result="tls-N.json", deadline_s=300.0, hub_log_level="warning")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "tls",
        argv,
        build=lambda: TlsBenchConfig(
            devices=args.devices,
            workers=args.workers,
            enroll_concurrency=args.enroll_concurrency,
            max_concurrent_connects=args.max_concurrent_connects,
            deadline_s=args.deadline_s,
            modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
            hub_log_level=args.hub_log_level,
            workdir=args.workdir,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: f"tls-{cfg.devices}.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, BrokerError),
        stopped="brokers, hubs and workers",
    )


if __name__ == "__main__":
    sys.exit(main())
