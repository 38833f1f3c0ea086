"""Placement at scale: re-planning a fleet against reading the rows the planner reads.

``python -m simulator.bench.placement --devices 10000 --repeats 5`` makes a real
SQLite hub database with the hub's own code (``hub.db.make_engine`` and
``migrate``), inserts N devices (varied labels, inventories, agent versions, online
and offline, some with a document of their own) and 20 deployments (fleet and
placed; selectors, constraints, resources, spread, distinct, affinities) directly,
lets :func:`hub.deployments.reconcile.run` place them once and marks every device as
having applied its document (a fleet at rest). Then, ``--repeats`` times, in turn:

- **read**: in one transaction, the rows a reconcile run reads
  (:func:`hub.deployments.reconcile.read_deployments` and ``read_fleet``:
  deployments, devices, instances);
- **plan**: the planning and the merge for every device on those rows
  (:func:`hub.deployments.reconcile.decide`: the planner, then every device's document
  composed and compared), no I/O;
- **no-op run**: the whole ``reconcile.run`` with nothing changed (read, plan, merge,
  and a commit that finds nothing to write): what the placement controller does each
  time its fingerprint of the fleet changes;
- **change run**: the whole ``reconcile.run`` with one fleet deployment's workload
  changed (every matching device's document rewritten, committed).

The goal (issue 14): planning adds at most the read time again, (read + plan) / read
<= 2. Medians over the repeats; the ratio is of medians. Each phase is timed on the
wall clock and in CPU seconds of this process (one thread, so the two agree unless
the machine is shared); the result file has both.

Rules:
- Every run plans at the same ``now``, so the no-op run is one; the change run
  alternates between two versions of the deployment, so every run is a real change.
- Devices are made from ``--seed`` alone: the same options give the same database.
- Nothing here starts a process; the database lives in a temporary directory (or
  ``--workdir``, kept).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, Table, insert, update
from sqlmodel import Session

from hub.bundles.models import Bundle
from hub.db import make_engine, migrate, new_session
from hub.deployments import reconcile
from hub.deployments.models import Deployment
from hub.devices.models import Device
from simulator.bench.common import (
    RESULTS_DIR,
    BenchError,
    command_line,
    host_info,
    median,
    ratio,
    workdir,
    write_results,
)

T = TypeVar("T")

MIB = 1024 * 1024
GIB = 1024 * MIB
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
MAX_CONFIG_BYTES = 64 * 1024
CHANGED = "monitoring"  # the deployment the change run edits
_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
_DEPLOYMENTS: Table = Deployment.__table__  # type: ignore[attr-defined]
_BUNDLES: Table = Bundle.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class BenchConfig:
    devices: int = 10_000
    repeats: int = 5
    seed: int = 0
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.devices < 1 or self.repeats < 1:
            raise ValueError("devices and repeats must be at least 1")


@dataclass(frozen=True)
class Round:
    index: int
    read_s: float
    plan_s: float
    noop_run_s: float
    change_run_s: float
    changed_devices: int  # documents the change run rewrote
    # The same phases in CPU seconds of this process (less sensitive to a shared machine).
    read_cpu_s: float = 0.0
    plan_cpu_s: float = 0.0
    noop_run_cpu_s: float = 0.0
    change_run_cpu_s: float = 0.0


PHASES = ("read_s", "plan_s", "noop_run_s", "change_run_s")
CPU_PHASES = ("read_cpu_s", "plan_cpu_s", "noop_run_cpu_s", "change_run_cpu_s")


@dataclass
class BenchResult:
    config: BenchConfig
    deployments: int = 0
    setup_s: dict[str, float] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)

    def medians(self) -> dict[str, float]:
        """Pure: the median of each phase (wall and CPU) over the rounds."""
        return {
            name: median([getattr(r, name) for r in self.rounds]) for name in (*PHASES, *CPU_PHASES)
        }

    def ratio(self, cpu: bool = False) -> float:
        """Pure: (read + plan) / read, of the medians (the goal: at most 2)."""
        m = self.medians()
        read_s, plan_s = (m["read_cpu_s"], m["plan_cpu_s"]) if cpu else (m["read_s"], m["plan_s"])
        return ratio(read_s + plan_s, read_s)

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "placement",
            "command": command,
            "devices": self.config.devices,
            "deployments": self.deployments,
            "repeats": self.config.repeats,
            "config": config,
            "host": host_info(),
            "load": self.load,
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "fleet": self.fleet,
            "rounds": [asdict(r) for r in self.rounds],
            "median": {k: round(v, 4) for k, v in self.medians().items()},
            "ratio_read_plus_plan_over_read": round(self.ratio(), 3),
            "ratio_read_plus_plan_over_read_cpu": round(self.ratio(cpu=True), 3),
        }


# ---------------------------------------------------------------- the fleet


def _sha(name: str) -> str:
    """Pure: a stand-in bundle digest (64 hex digits) for ``name``."""
    return f"{zlib.crc32(name.encode()):08x}" * 8


def _workload(name: str, version: int = 1, **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "bundle": _sha(f"{name}-{version}"),
        "config": {"version": version, **config},
        "env": {"LOG_LEVEL": "info"},
        "restart": {"policy": "on-failure", "max_restarts": 5},
    }


def deployment_specs(version: int = 1) -> dict[str, dict[str, Any]]:
    """Pure: the 20 deployments (10 fleet, 10 placed); ``version`` is the changed one's."""
    return {
        # fleet: every matching device, layered by priority
        "base-agent": {
            "selector": "",
            "workloads": [_workload("log-shipper"), _workload("node-exporter")],
            "resources": {"memory_bytes": 16 * MIB, "disk_bytes": 64 * MIB},
        },
        CHANGED: {
            "selector": "env=prod",
            "priority": 10,
            "workloads": [_workload("node-exporter", version, scrape_s=15)],
        },
        "eu-compliance": {
            "selector": "region in (eu)",
            "priority": 20,
            "workloads": [_workload("log-shipper", 2, redact=True), _workload("gdpr-audit")],
        },
        "gpu-driver": {
            "selector": "gpu",
            "workloads": [_workload("cuda-runtime")],
            "constraints": [{"attribute": "arch", "op": "in", "values": ["x86_64"]}],
            "resources": {"memory_bytes": 256 * MIB, "disk_bytes": GIB},
        },
        "edge-cache": {
            "selector": "env=prod,tier in (gold,silver)",
            "workloads": [_workload("cache")],
            "constraints": [
                {"attribute": "mem_total_bytes", "op": ">=", "value": 2 * GIB},
                {"attribute": "disk_total_bytes", "op": ">=", "value": 16 * GIB},
            ],
            "resources": {"memory_bytes": 512 * MIB, "disk_bytes": 8 * GIB},
        },
        "legacy-shim": {
            "selector": "legacy",
            "priority": 5,
            "workloads": [_workload("compat")],
            "constraints": [{"attribute": "agent_version", "op": "<", "value": "0.5.0"}],
        },
        "staging-canary": {
            "selector": "env=staging",
            "priority": 50,
            "workloads": [_workload("node-exporter", 3), _workload("log-shipper", 3)],
        },
        "arm-tuning": {
            "selector": "",
            "workloads": [_workload("governor")],
            "constraints": [{"attribute": "arch", "op": "in", "values": ["aarch64", "armv7l"]}],
        },
        "agent-floor": {
            "selector": "env!=dev",
            "workloads": [_workload("health-probe")],
            "constraints": [{"attribute": "agent_version", "op": ">=", "value": "0.4.0"}],
        },
        "site-beacon": {
            "selector": "site,!legacy",
            "workloads": [_workload("beacon")],
            "constraints": [{"attribute": "inventory.firmware_slot", "op": "exists"}],
        },
        # placed: N instances
        "db-primary": {
            "selector": "env=prod",
            "kind": "placed",
            "replicas": 40,
            "priority": 100,
            "workloads": [_workload("postgres")],
            "constraints": [{"attribute": "cpu_count", "op": ">=", "value": 4}],
            "resources": {"memory_bytes": GIB, "disk_bytes": 10 * GIB},
            "spread": {"attribute": "label.region"},
            "distinct": ["label.site"],
            "affinities": [{"attribute": "label.tier", "op": "=", "value": "gold", "weight": 50}],
        },
        "mqtt-bridge": {
            "selector": "env=prod",
            "kind": "placed",
            "replicas": 120,
            "workloads": [_workload("bridge")],
            "spread": {"attribute": "label.site"},
        },
        "ml-infer": {
            "selector": "gpu",
            "kind": "placed",
            "replicas": 300,
            "priority": 30,
            "workloads": [_workload("inference")],
            "constraints": [{"attribute": "arch", "op": "=", "value": "x86_64"}],
            "resources": {"memory_bytes": 2 * GIB},
        },
        "video-analytics": {
            "selector": "env=prod",
            "kind": "placed",
            "replicas": 500,
            "workloads": [_workload("video")],
            "spread": {"attribute": "label.region", "targets": {"eu": 50, "us": 30, "ap": 20}},
            "affinities": [{"attribute": "label.zone", "op": "=", "value": "z1", "weight": 30}],
            "resources": {"memory_bytes": 256 * MIB},
        },
        "collector": {
            "selector": "",
            "kind": "placed",
            "replicas": 1000,
            "workloads": [_workload("collector")],
            "affinities": [
                {"attribute": "label.tier", "op": "=", "value": "gold", "weight": 20},
                {"attribute": "label.tier", "op": "=", "value": "bronze", "weight": -20},
            ],
        },
        "ota-mirror": {
            "selector": "",
            "kind": "placed",
            "replicas": 40,
            "workloads": [_workload("mirror")],
            "constraints": [{"attribute": "disk_total_bytes", "op": ">=", "value": 32 * GIB}],
            "distinct": ["label.site"],
            "resources": {"disk_bytes": 20 * GIB},
        },
        "staging-test": {
            "selector": "env=staging",
            "kind": "placed",
            "replicas": 200,
            "workloads": [_workload("test-runner")],
            "lost_after_s": 60,
        },
        "eu-gateway": {
            "selector": "region=eu",
            "kind": "placed",
            "replicas": 80,
            "workloads": [_workload("gateway")],
            "spread": {"attribute": "label.zone"},
        },
        "batch-jobs": {
            "selector": "env in (prod,staging)",
            "kind": "placed",
            "replicas": 2000,
            "priority": -10,
            "workloads": [_workload("batch")],
            "constraints": [{"attribute": "cpu_count", "op": ">=", "value": 2}],
            "resources": {"memory_bytes": 128 * MIB},
        },
        "canary-probe": {
            "selector": "tier=gold",
            "kind": "placed",
            "replicas": 10,
            "workloads": [_workload("probe")],
            "distinct": ["label.region"],  # three regions: seven stay unplaced, with reasons
        },
    }


def device_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Pure: ``count`` device rows, varied and repeatable from ``seed``."""
    rng = random.Random(seed)
    now = NOW
    rows = []
    for n in range(count):
        region = rng.choices(("eu", "us", "ap"), (5, 3, 2))[0]
        labels = {
            "env": rng.choices(("prod", "staging", "dev"), (60, 25, 15))[0],
            "region": region,
            "site": f"{region}-{rng.randrange(20):02d}",
            "zone": f"z{rng.randrange(1, 4)}",
            "tier": rng.choice(("gold", "silver", "bronze")),
            "model": rng.choice(("rpi4", "nuc11", "jetson", "ipc-510")),
        }
        if rng.random() < 0.1:
            labels["gpu"] = "yes"
        if rng.random() < 0.05:
            labels["legacy"] = "yes"
        inventory = None
        if rng.random() < 0.95:
            mem = rng.choice((512 * MIB, GIB, 2 * GIB, 4 * GIB, 8 * GIB))
            disk = rng.choice((4 * GIB, 8 * GIB, 16 * GIB, 32 * GIB, 64 * GIB))
            inventory = {
                "arch": rng.choices(("x86_64", "aarch64", "armv7l"), (5, 4, 1))[0],
                "os": "linux",
                "cpu_count": rng.choice((1, 2, 4, 8)),
                "mem_total_bytes": mem,
                "mem_free_bytes": mem // 2,
                "disk_total_bytes": disk,
                "disk_free_bytes": disk // 3,
                "firmware_slot": rng.choice(("a", "b", None)),
                "firmware_version": "2026.11",
                "cgroups": "v2",
            }
        online = rng.random() < 0.92
        # Online for minutes to a day, or offline for seconds to two hours.
        changed = now - timedelta(
            seconds=rng.uniform(60, 86_400) if online else rng.uniform(1, 7200)
        )
        own = rng.random() < 0.2
        manual = (
            {"sample_rate_hz": 10, "workloads": [_workload("own-app", rng.randrange(1, 4))]}
            if own
            else {}
        )
        rows.append(
            {
                "id": f"dev-{n:05d}",
                "labels": labels,
                "created_at": now - timedelta(days=30),
                "desired_generation": 1 if own else 0,
                "desired_config": manual,
                "manual_config": manual,
                "assignments": [],
                "contributions": {},
                "desired_seq": 0,
                "reported_generation": 1 if own else 0,
                "online": online,
                "online_changed_at": changed,
                "last_seen": now if online else changed,
                "agent_version": rng.choice(("0.3.2", "0.4.0", "0.4.1", "0.5.0")),
                "inventory": inventory,
            }
        )
    return rows


def make_database(engine: Engine, cfg: BenchConfig) -> int:
    """The hub's schema, the devices, the bundles and the deployments; returns how many
    deployments."""
    migrate(engine)
    specs = deployment_specs()
    digests = {
        w["bundle"]
        for s in (specs, deployment_specs(2))
        for d in s.values()
        for w in d["workloads"]
    }
    digests |= {_workload("own-app", v)["bundle"] for v in (1, 2, 3)}
    with engine.begin() as connection:
        connection.execute(insert(_DEVICES), device_rows(cfg.devices, cfg.seed))
        connection.execute(
            insert(_BUNDLES),
            [
                {
                    "sha256": digest,
                    "name": "bench",
                    "version": "1",
                    "security_version": 0,
                    "kind": "app",
                    "size": 1,
                    "payload_sha256": digest,
                    "payload_size": 1,
                    "payload_offset": 0,
                    "created": 0,
                    "expires": 0,
                    "signer_keyids": [],
                    "manifest": {},
                    "uploaded_at": NOW,
                }
                for digest in sorted(digests)
            ],
        )
        connection.execute(
            insert(_DEPLOYMENTS),
            [
                {"name": n, "spec": s, "version": 1, "created_at": NOW, "updated_at": NOW}
                for n, s in specs.items()
            ],
        )
    return len(specs)


def settle(engine: Engine) -> dict[str, Any]:
    """Place everything once and mark every device as having applied its document, then
    plan again (the outcomes go to the event history): a fleet at rest. Returns counts."""
    with new_session(engine) as session:
        first = run_once(session)
    with engine.begin() as connection:
        connection.execute(
            update(_DEVICES).values(reported_generation=_DEVICES.c.desired_generation)
        )
    with new_session(engine) as session:
        run_once(session)
    with new_session(engine) as session:
        rest = run_once(session)
    placed = sum(1 for i in rest.plan.instances if i.device_id is not None)
    return {
        "documents_first_plan": len(first.bumped),
        "assignments": sum(len(v) for v in rest.plan.assignments.values()),
        "instances": len(rest.plan.instances),
        "instances_placed": placed,
        "unplaceable": sum(len(v) for v in rest.plan.unplaceable.values()),
        "changed_at_rest": len(rest.bumped),
    }


def run_once(session: Session, put: dict[str, dict[str, Any]] | None = None) -> reconcile.Outcome:
    return reconcile.run(session, now=NOW, max_config_bytes=MAX_CONFIG_BYTES, put=put)


# ---------------------------------------------------------------- the phases


def timed(work: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = work()
    return time.perf_counter() - start, value


def timed_both(work: Callable[[], T]) -> tuple[float, float, T]:
    """Wall seconds, CPU seconds of this process, and the value."""
    start, cpu = time.perf_counter(), time.process_time()
    value = work()
    return time.perf_counter() - start, time.process_time() - cpu, value


def read(engine: Engine) -> tuple[dict[str, Any], reconcile.FleetRows]:
    """The rows a run reads (deployments, devices, instances), in one transaction."""
    with engine.connect() as connection, connection.begin():
        return reconcile.read_deployments(connection), reconcile.read_fleet(connection)


def plan_all(
    stored: dict[str, tuple[dict[str, Any], int, datetime]], fleet: reconcile.FleetRows
) -> reconcile.Decision:
    """The planning and the merge of a run, on rows already read."""
    specs_json = {name: spec for name, (spec, _, _) in stored.items()}
    specs = {name: reconcile.spec_of(name, spec) for name, spec in sorted(specs_json.items())}
    return reconcile.decide(
        fleet, specs=specs, specs_json=specs_json, now=NOW, max_config_bytes=MAX_CONFIG_BYTES
    )


def measure_round(engine: Engine, index: int) -> Round:
    """One of each phase, in order, on the same database; raises BenchError if the no-op
    run changes a document or the change run changes none."""
    read_s, read_cpu, rows = timed_both(lambda: read(engine))
    plan_s, plan_cpu, decision = timed_both(lambda: plan_all(*rows))
    if decision.documents:
        raise BenchError(f"planning at rest changed {len(decision.documents)} documents")
    with new_session(engine) as session:
        noop_s, noop_cpu, noop = timed_both(lambda: run_once(session))
    if noop.bumped:
        raise BenchError(f"the no-op run changed {len(noop.bumped)} documents")
    spec = deployment_specs(version=2 if index % 2 else 1)[CHANGED]
    with new_session(engine) as session:
        change_s, change_cpu, changed = timed_both(lambda: run_once(session, put={CHANGED: spec}))
    if not changed.bumped:
        raise BenchError("the change run changed no document")
    return Round(
        index,
        read_s,
        plan_s,
        noop_s,
        change_s,
        len(changed.bumped),
        read_cpu,
        plan_cpu,
        noop_cpu,
        change_cpu,
    )


def run_bench(cfg: BenchConfig) -> BenchResult:
    result = BenchResult(config=cfg)
    result.load["before"] = list(os.getloadavg())
    with workdir(cfg.workdir, "driftless-placement-") as directory:
        path = directory / "hub.db"
        path.unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{path}", busy_timeout_ms=30_000)
        try:
            t, result.deployments = timed(lambda: make_database(engine, cfg))
            result.setup_s["database"] = t
            t, result.fleet = timed(lambda: settle(engine))
            result.setup_s["settle"] = t
            for index in range(1, cfg.repeats + 1):
                result.rounds.append(measure_round(engine, index))
        finally:
            engine.dispose()
    result.load["after"] = list(os.getloadavg())
    return result


def format_table(result: BenchResult) -> str:
    """Pure: the table printed at the end of a run."""
    cfg = result.config
    rows = [
        ("read: the rows the planner reads", "read_s"),
        ("plan: planner + merge, every device", "plan_s"),
        ("reconcile.run, nothing changed", "noop_run_s"),
        ("reconcile.run, one deployment changed", "change_run_s"),
    ]
    head = f"{'(seconds)':<40}" + "".join(f"{'run ' + str(r.index):>9}" for r in result.rounds)
    lines = [
        f"placement: {cfg.devices} devices, {result.deployments} deployments, "
        f"{cfg.repeats} repeats, SQLite",
        head + f"{'median':>9}",
    ]
    medians = result.medians()
    for label, name in rows:
        cells = "".join(f"{getattr(r, name):>9.3f}" for r in result.rounds)
        lines.append(f"{label:<40}{cells}{medians[name]:>9.3f}")
    for label, name in rows:
        cpu = name.replace("_s", "_cpu_s")
        cells = "".join(f"{getattr(r, cpu):>9.3f}" for r in result.rounds)
        lines.append(f"{'CPU ' + label.split(':')[0].split(',')[0]:<40}{cells}{medians[cpu]:>9.3f}")
    changed = median([r.changed_devices for r in result.rounds])
    lines.append(f"documents the change run rewrote (median): {changed:.0f}")
    lines.append(f"fleet at rest: {result.fleet}")
    lines.append(
        f"load average before/after: {result.load.get('before', [0])[0]:.2f} / "
        f"{result.load.get('after', [0])[0]:.2f}"
    )
    lines.append(
        f"ratio (read + plan) / read (medians): {result.ratio():.2f}x wall, "
        f"{result.ratio(cpu=True):.2f}x CPU (goal: at most 2x)"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.placement", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=None, help=f"default {RESULTS_DIR}/placement-N.json"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = BenchConfig(
            devices=args.devices, repeats=args.repeats, seed=args.seed, workdir=args.workdir
        )
    except ValueError as exc:
        print(f"placement: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_bench(cfg)
    except BenchError as exc:
        print(f"placement: failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    path = args.json or RESULTS_DIR / f"placement-{cfg.devices}.json"
    write_results(path, result.as_json(command_line("simulator.bench.placement", argv)))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
