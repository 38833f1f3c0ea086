"""Agent footprint: the edge agent's memory and idle CPU as devices run it.

``python -m simulator.bench.footprint --agents 3 --idle-s 30`` starts its own
Mosquitto with mutual TLS, the device ACL and a CRL from a fresh fleet CA, and a
throw-away fleet root; enrolls ``--agents`` data directories the way
``driftless agent enroll`` leaves them (key, certificate, CA, root); runs each
as devices do (``python -m driftless.cli agent run``, ``mqtts://``, the root
from its data directory) until it is connected and idle, then measures over
``--idle-s``:

- resident memory (``VmRSS``), proportional set size (``Pss``: shared pages
  split between the agents) and unique set size (private pages) from
  ``/proc/<pid>/smaps_rollup``;
- CPU seconds at idle, as a share of one core;
- the modules the agent loaded (one more agent run under ``PYTHONPROFILEIMPORTTIME``,
  grouped by top-level package, with each one's cumulative import time).

The baselines, measured in the same run: Python processes that only import what
an MQTT client over TLS needs (the bare interpreter; ``paho.mqtt.client``, which
brings ``ssl``; plus ``cryptography``'s Ed25519, for verifying signed documents),
idling the same way. The ratio agent / floor is the headline.

Rules: loopback only; every wait has a deadline; broker and agents are stopped on
exit, on error and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import datetime as dt
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.broker import BrokerError, MosquittoBroker
from devtools.procs import AgentChild
from edge_agent.enroll import Identity
from edge_agent.root import remember_verified
from firmware_bundles.devfleet import DevFleet
from hub.broker_config import hub_identities, write_secure_files
from hub.identity import CertificateAuthority, write_new_private
from simulator.bench.common import (
    BenchError,
    add_run_arguments,
    cpu_seconds,
    host_info,
    median,
    ratio,
    run_bench_main,
    workdir,
)
from simulator.bench.footprint_apply import ApplyResult, run_apply_phase

MiB = 1024 * 1024
# What an MQTT client over TLS that verifies signed documents cannot do without.
FLOORS: tuple[tuple[str, str], ...] = (
    ("python", "pass"),
    ("python + paho (ssl)", "import paho.mqtt.client"),
    (
        "python + paho + Ed25519",
        "import paho.mqtt.client\nfrom cryptography.hazmat.primitives.asymmetric import ed25519",
    ),
)


@dataclass(frozen=True)
class FootprintConfig:
    agents: int = 3
    idle_s: float = 60.0
    deadline_s: float = 60.0
    workdir: Path | None = None
    apply: bool = True  # the hub phase (footprint_apply): a document, three workloads, a bundle
    bundle_mib: int = 200  # the large bundle's payload; 0 leaves that step out

    def __post_init__(self) -> None:
        if self.agents < 1 or self.idle_s <= 0 or self.deadline_s <= 0 or self.bundle_mib < 0:
            raise ValueError(
                "agents must be at least 1, idle_s and deadline_s positive, bundle_mib >= 0"
            )


@dataclass(frozen=True)
class Memory:
    rss_mib: float
    pss_mib: float
    uss_mib: float


@dataclass
class FootprintResult:
    config: FootprintConfig
    agents: list[Memory] = field(default_factory=list)
    idle_cpu_share: list[float] = field(default_factory=list)  # of one core, per agent
    floors: dict[str, Memory] = field(default_factory=dict)
    modules: dict[str, float] = field(default_factory=dict)  # top-level package -> import ms
    module_count: int = 0
    applied: ApplyResult | None = None

    def medians(self) -> dict[str, float]:
        return {
            "rss_mib": median([m.rss_mib for m in self.agents]),
            "pss_mib": median([m.pss_mib for m in self.agents]),
            "uss_mib": median([m.uss_mib for m in self.agents]),
            "idle_cpu_percent": 100 * median(self.idle_cpu_share),
        }

    def floor(self) -> Memory:
        return self.floors[FLOORS[-1][0]]

    def as_json(self, command: str) -> dict[str, Any]:
        config = asdict(self.config)
        config["workdir"] = str(config["workdir"]) if config["workdir"] else None
        return {
            "benchmark": "footprint",
            "command": command,
            "config": config,
            "host": host_info(),
            "agents": [asdict(m) for m in self.agents],
            "idle_cpu_share": self.idle_cpu_share,
            "floors": {name: asdict(m) for name, m in self.floors.items()},
            "median": {k: round(v, 3) for k, v in self.medians().items()},
            "ratio_rss_over_floor": round(
                ratio(self.medians()["rss_mib"], self.floor().rss_mib), 3
            ),
            "modules_import_ms": self.modules,
            "module_count": self.module_count,
            "bytecode": "precompiled",
            "apply": self.applied.as_dict() if self.applied is not None else None,
        }


def memory_of(pid: int) -> Memory:
    """Pure over /proc: a live process's RSS, PSS and USS in MiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * 1024  # kB
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return Memory(
        rss_mib=round(fields["Rss"] / MiB, 2),
        pss_mib=round(fields["Pss"] / MiB, 2),
        uss_mib=round(uss / MiB, 2),
    )


def imported_packages(log: str) -> tuple[dict[str, float], int]:
    """Pure: ``PYTHONPROFILEIMPORTTIME`` lines -> (top-level package -> cumulative ms, count).

    A package's figure is the largest cumulative time among its modules (the time its
    first import took, submodules included).
    """
    packages: dict[str, float] = defaultdict(float)
    count = 0
    for line in log.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not cumulative.isdigit():
            continue  # the header line
        count += 1
        top = name.strip().split(".")[0]
        packages[top] = max(packages[top], int(cumulative) / 1000)
    return dict(sorted(packages.items(), key=lambda item: -item[1])), count


def enroll_locally(
    ca: CertificateAuthority, data_dir: Path, device_id: str, *, broker_url: str, root: Path
) -> None:
    """Leave ``data_dir`` as ``driftless agent enroll`` would (here the CA is at hand)."""
    identity = Identity(data_dir)
    key_pem, issued = ca.issue_keypair(device_id, server=False, now=dt.datetime.now(dt.UTC))
    write_new_private(identity.key, key_pem)
    identity.cert.write_bytes(issued.pem)
    identity.ca.write_bytes(ca.cert_pem)
    identity.root.write_bytes(root.read_bytes())
    remember_verified(identity.root, root.read_bytes())  # as enrollment does, having checked it
    identity.record.write_text(json.dumps({"device_id": device_id, "broker_url": broker_url}))


async def wait_connected(agent: AgentChild, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while '"event": "connected"' not in agent.log():
        if agent.exited() is not None:
            raise BenchError(f"{agent.device_id} exited: {agent.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{agent.device_id} not connected after {deadline_s}s")
        await asyncio.sleep(0.1)


async def measure_floor(code: str, idle_s: float) -> Memory:
    """A Python process that imports ``code`` and idles; its memory after a moment."""
    script = f"{code}\nimport time\nprint('ready', flush=True)\ntime.sleep(600)"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise BenchError(f"floor process for {code!r} did not start: {line!r}")
        await asyncio.sleep(min(idle_s, 2.0))
        return memory_of(proc.pid)
    finally:
        proc.kill()
        await proc.wait()


def compile_packages() -> None:
    """Write our packages' bytecode first, as an install does: a device runs from ``.pyc``
    files, and a process that compiles from source holds the compiler's memory too
    (~1.5 MiB here; ``PYTHONDONTWRITEBYTECODE`` on a development machine does that)."""
    root = Path(__file__).resolve().parents[2]
    for package in ("driftless", "edge_agent", "protocols", "plumbing", "firmware_bundles"):
        compileall.compile_dir(root / package, quiet=1)


async def run_bench(cfg: FootprintConfig) -> FootprintResult:
    """The whole benchmark; raises BenchError or BrokerError."""
    result = FootprintResult(config=cfg)
    compile_packages()
    with workdir(cfg.workdir, "driftless-footprint-") as work:
        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.load_or_create(work / "identity", now=now)
        files = write_secure_files(
            ca, work / "broker-tls", hub_identities=hub_identities("driftless-hub"),
            revoked=[], now=now,
        )  # fmt: skip
        fleet = DevFleet(work / "fleet")
        with contextlib.ExitStack() as stack:
            broker = MosquittoBroker(work / "broker", tls=files)
            stack.callback(broker.stop)
            broker.start()
            agents = []
            for n in range(cfg.agents + 1):  # the last one only lists what it imports
                device_id = f"footprint-{n:02d}"
                agent = AgentChild(work, device_id, broker.url, enrolled=True)
                enroll_locally(ca, agent.data_dir, device_id, broker_url=broker.url,
                               root=fleet.root_path)  # fmt: skip
                stack.callback(agent.terminate)
                agents.append(agent)
            measured, lister = agents[:-1], agents[-1]
            lister.env["PYTHONPROFILEIMPORTTIME"] = "1"
            for agent in measured:
                agent.start()
            for agent in measured:
                await wait_connected(agent, cfg.deadline_s)
            await asyncio.sleep(2.0)  # past the post-connect work (birth, first report)
            pids = [agent.proc.pid for agent in measured if agent.proc is not None]
            cpu0 = [cpu_seconds(pid) for pid in pids]
            started = time.monotonic()
            await asyncio.sleep(cfg.idle_s)
            elapsed = time.monotonic() - started
            result.idle_cpu_share = [
                round((cpu_seconds(pid) - before) / elapsed, 5)
                for pid, before in zip(pids, cpu0, strict=True)
            ]
            result.agents = [memory_of(pid) for pid in pids]
            async with contextlib.AsyncExitStack() as hub_stack:
                # Closed after the agents stop: the workloads they leave running go last.
                if cfg.apply:
                    result.applied = await run_apply_phase(
                        hub_stack, work=work, broker=broker, fleet=fleet,
                        device=measured[0].device_id, pid=pids[0], bundle_mib=cfg.bundle_mib,
                        deadline_s=cfg.deadline_s,
                    )  # fmt: skip
                for agent in measured:
                    agent.terminate()
            lister.start()
            await wait_connected(lister, cfg.deadline_s)
            await asyncio.sleep(2.0)
            lister.terminate()
            result.modules, result.module_count = imported_packages(lister.log())
        for name, code in FLOORS:
            result.floors[name] = await measure_floor(code, cfg.idle_s)
    return result


def format_table(result: FootprintResult) -> str:
    """Pure: the table printed at the end of a run."""
    m, floor = result.medians(), result.floor()
    lines = [
        f"footprint: {result.config.agents} idle agents over mutual TLS with --root, "
        f"{result.config.idle_s:g} s idle, loopback",
        f"{'(MiB)':<34}{'RSS':>8}{'PSS':>8}{'USS':>8}",
        f"{'agent (median)':<34}{m['rss_mib']:>8.1f}{m['pss_mib']:>8.1f}{m['uss_mib']:>8.1f}",
    ]
    for name, mem in result.floors.items():
        lines.append(
            f"{'floor: ' + name:<34}{mem.rss_mib:>8.1f}{mem.pss_mib:>8.1f}{mem.uss_mib:>8.1f}"
        )
    lines.append(f"idle CPU: {m['idle_cpu_percent']:.3f} % of one core (median)")
    lines.append(f"ratio agent RSS / floor RSS: {ratio(m['rss_mib'], floor.rss_mib):.2f}x")
    top = ", ".join(f"{k} {v:.0f} ms" for k, v in list(result.modules.items())[:12])
    lines.append(f"modules: {result.module_count} imported; slowest packages: {top}")
    if (a := result.applied) is not None:
        lines += [
            f"agent RSS after a signed document: {a.rss_after_document_mib:.1f} MiB; "
            f"with three workloads: {a.rss_three_workloads_mib:.1f} MiB",
            f"three workloads: desired -> all healthy {a.apply_s:.2f} s; their own start "
            f"(process start -> listening) median {median(a.workload_start_s):.2f} s; "
            f"min_healthy {a.min_healthy_ms} ms; first spawn {a.first_spawn_after_put_s:.2f} s "
            f"and last ready {a.last_ready_after_put_s:.2f} s after the PUT",
        ]
        if a.install_s:
            lines.append(
                f"{a.bundle_mib:.0f} MiB bundle: installed and healthy in {a.install_s:.1f} s; "
                f"agent RSS peak {a.install_peak_rss_mib:.1f} MiB (VmHWM {a.install_hwm_mib:.1f}),"
                f" after {a.rss_after_install_mib:.1f} MiB"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.footprint", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=60.0, help="the idle window (CPU, RSS)")
    parser.add_argument(
        "--no-apply", action="store_true", help="leave out the hub phase (document, workloads)"
    )
    parser.add_argument("--bundle-mib", type=int, default=200, help="0: no large bundle")
    add_run_arguments(parser, result="footprint.json", deadline_s=60.0, hub_log_level="warning")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_bench_main(
        "footprint",
        argv,
        build=lambda: FootprintConfig(
            agents=args.agents,
            idle_s=args.idle_s,
            deadline_s=args.deadline_s,
            apply=not args.no_apply,
            bundle_mib=args.bundle_mib,
            workdir=args.workdir,
        ),
        bench=run_bench,
        table=format_table,
        result_file=lambda cfg: "footprint.json",
        json_path=args.json,
        log_level=args.log_level,
        failures=(BenchError, BrokerError, OSError),
        stopped="the broker and the agents",
    )


if __name__ == "__main__":
    sys.exit(main())
