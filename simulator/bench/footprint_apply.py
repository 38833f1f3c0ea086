"""The footprint benchmark's apply phase: one enrolled agent under a real hub over mutual TLS.

Measured on the agent that idled (:mod:`simulator.bench.footprint`), in order:

1. **After a signed document**: the hub signs a desired document with no
   bundles; once it is applied the agent has verified a signature, so
   ``cryptography`` is loaded. Its RSS then.
2. **Three workloads supervised**: three signed bundles, each a small Python
   HTTP service that records when its process started (``/proc`` start ticks
   against ``CLOCK_BOOTTIME``, 10 ms resolution) and when it listened, with an
   ``http`` check and ``min_healthy_ms``. The time from the desired PUT to
   the hub seeing the generation applied (all healthy, committed) is put
   beside the workloads' own start time (process start to listening) and the
   health rule's floor (``min_healthy_ms``), from the same run. The agent's RSS
   with the three running.
3. **A large bundle installed**: a signed bundle of ``bundle_mib`` MiB (random
   payload beside the same service) added as a fourth workload; the agent's
   RSS is sampled every 20 ms from the PUT until applied, and its peak
   (``VmHWM``) read after.

Rules: every wait has a deadline; the hub, and the workloads (which outlive
their agent by design), are stopped with the benchmark's stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import MosquittoBroker, free_port, hub_broker_args
from firmware_bundles import archive
from firmware_bundles.devfleet import DevFleet
from firmware_bundles.model import AliveCheck, HttpCheck, RunSpec
from simulator.bench.common import BenchError, HubChild, median, poll, start_hub

MiB = 1024 * 1024
DAY = 86_400
MIN_HEALTHY_MS = 1000
STARTUP_S = 0.3  # the service's own work before it listens

SERVICE = """#!/usr/bin/env python3
# A bench workload: records when its process started and when it listened, then answers GET.
import http.server, json, os, time

def process_start_epoch():
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    started_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_boot)

started = process_start_epoch()
time.sleep(float(os.environ["STARTUP_S"]))
handler = http.server.BaseHTTPRequestHandler
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), handler)
server.RequestHandlerClass.do_GET = lambda self: (self.send_response(200), self.end_headers())
server.RequestHandlerClass.log_message = lambda *args: None
ready = time.time()
with open(os.environ["BENCH_OUT"], "w") as out:
    json.dump({"started": started, "ready": ready, "pid": os.getpid()}, out)
server.serve_forever()
"""


@dataclass
class ApplyResult:
    rss_after_document_mib: float = 0.0
    rss_three_workloads_mib: float = 0.0
    apply_s: float = 0.0  # desired PUT to applied (all healthy), three workloads
    workload_start_s: list[float] = field(default_factory=list)  # own: process start to listening
    first_spawn_after_put_s: float = 0.0
    last_ready_after_put_s: float = 0.0
    min_healthy_ms: int = MIN_HEALTHY_MS
    bundle_mib: float = 0.0
    install_s: float = 0.0
    install_peak_rss_mib: float = 0.0  # sampled every 20 ms during the install
    install_hwm_mib: float = 0.0  # VmHWM: the process's peak since it started
    rss_after_install_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        out["workload_start_s"] = [round(v, 3) for v in self.workload_start_s]
        out["median_workload_start_s"] = round(median(self.workload_start_s), 3)
        return out


def proc_status_mib(pid: int, name: str) -> float:
    """Pure over /proc: one ``VmRSS``/``VmHWM`` line of ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no {name}")


def stop_workloads(outs: Path) -> None:
    """SIGKILL every workload that recorded its pid under ``outs`` (and its group)."""
    for record in outs.glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads(record.read_text())["pid"])
            os.kill(pid, signal.SIGKILL)


def service_bundle(out: Path, fleet: DevFleet, *, name: str, port: int, payload_mib: int) -> Path:
    """A signed bundle running :data:`SERVICE` on ``port`` (plus ``payload_mib`` random MiB)."""
    src = out.with_suffix(".src")
    (src / "bin").mkdir(parents=True, exist_ok=True)
    app = src / "bin" / "app"
    app.write_text(SERVICE)
    app.chmod(0o755)
    if payload_mib:
        with open(src / "data.bin", "wb") as handle:
            for _ in range(payload_mib):
                handle.write(os.urandom(MiB))
    now = int(time.time())
    run = RunSpec(
        command=["bin/app"],
        env={"PORT": str(port), "STARTUP_S": str(STARTUP_S)},
        checks=[HttpCheck(port=port, path="/", interval_ms=100, timeout_ms=500), AliveCheck()],
        min_healthy_ms=MIN_HEALTHY_MS,
        health_deadline_s=120,
        stop_timeout_s=5,
    )
    archive.build(
        src, name=name, version="1.0.0", security_version=1, kind="app",
        architectures=["any"], created=now - 60, expires=now + DAY, out=out, run=run,
    )  # fmt: skip
    archive.sign(out, fleet.release_key)
    return out


async def upload(api: httpx.AsyncClient, bundle: Path) -> str:
    response = await api.post(
        "/bundles",
        content=await asyncio.to_thread(bundle.read_bytes),
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    if response.status_code != 201:
        raise BenchError(f"bundle upload refused: {response.status_code} {response.text[:300]}")
    return str(response.json()["sha256"])


async def apply(
    api: httpx.AsyncClient, device: str, config: dict[str, Any], deadline_s: float
) -> float:
    """PUT ``config`` and wait until the hub reports it applied; returns the seconds taken."""
    started = time.monotonic()
    response = await api.put(f"/devices/{device}/desired", json={"config": config})
    if response.status_code != 200:
        raise BenchError(f"PUT desired: {response.status_code} {response.text[:300]}")
    generation = response.json()["desired_generation"]

    async def status() -> dict[str, Any]:
        got: dict[str, Any] = (await api.get(f"/devices/{device}")).json().get("status") or {}
        return got

    def done(status: dict[str, Any]) -> bool:
        if status.get("generation") != generation:
            return False
        if status.get("phase") in ("failed", "rolled_back"):
            raise BenchError(f"generation {generation} {status['phase']}: {status.get('error')}")
        return status.get("phase") == "applied"

    await poll(status, done, timeout_s=deadline_s, interval_s=0.02, what=f"gen {generation}")
    return time.monotonic() - started


async def run_apply_phase(
    stack: contextlib.AsyncExitStack,
    *,
    work: Path,
    broker: MosquittoBroker,
    fleet: DevFleet,
    device: str,
    pid: int,
    bundle_mib: int,
    deadline_s: float,
) -> ApplyResult:
    """Phases 1-3 above on the running agent ``pid``; raises BenchError."""
    result = ApplyResult(bundle_mib=float(bundle_mib))
    hub_dir = work / "hub"

    def make_hub() -> HubChild:
        hub = HubChild(
            hub_dir, broker.url, trust_root=fleet.root_path, signing_key=fleet.hub_key_path,
            log_level="warning",
        )  # fmt: skip
        hub.argv += hub_broker_args(broker, work / "identity")
        return hub

    _, api = await start_hub(stack, make_hub, timeout_s=deadline_s)
    response = await api.post("/devices", json={"id": device})
    if response.status_code not in (200, 201):
        raise BenchError(f"register {device}: {response.status_code} {response.text[:300]}")

    await apply(api, device, {"bench": "a signed document"}, deadline_s)
    await asyncio.sleep(1.0)
    result.rss_after_document_mib = proc_status_mib(pid, "VmRSS")

    outs = work / "workload-out"
    outs.mkdir(exist_ok=True)
    # Workloads outlive their agent by design (autonomy): the bench ends them itself.
    stack.callback(stop_workloads, outs)
    workloads = []
    for n in range(3):
        bundle = await asyncio.to_thread(
            service_bundle, work / f"w{n}.bundle", fleet, name=f"w{n}", port=free_port(),
            payload_mib=0,
        )  # fmt: skip
        out = outs / f"w{n}.json"
        workloads.append({"name": f"w{n}", "bundle": await upload(api, bundle),
                          "env": {"BENCH_OUT": str(out)}})  # fmt: skip
    put_at = time.time()
    result.apply_s = await apply(api, device, {"workloads": workloads}, deadline_s)
    seen = [json.loads((outs / f"w{n}.json").read_text()) for n in range(3)]
    result.workload_start_s = [s["ready"] - s["started"] for s in seen]
    result.first_spawn_after_put_s = min(s["started"] for s in seen) - put_at
    result.last_ready_after_put_s = max(s["ready"] for s in seen) - put_at
    await asyncio.sleep(1.0)
    result.rss_three_workloads_mib = proc_status_mib(pid, "VmRSS")

    if bundle_mib > 0:
        big = await asyncio.to_thread(
            service_bundle, work / "big.bundle", fleet, name="big", port=free_port(),
            payload_mib=bundle_mib,
        )  # fmt: skip
        result.bundle_mib = round(big.stat().st_size / MiB, 1)
        entry = {"name": "big", "bundle": await upload(api, big),
                 "env": {"BENCH_OUT": str(outs / "big.json")}}  # fmt: skip
        peak = [proc_status_mib(pid, "VmRSS")]

        async def sample() -> None:
            while True:
                peak.append(proc_status_mib(pid, "VmRSS"))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        try:
            result.install_s = await apply(api, device, {"workloads": [*workloads, entry]},
                                           max(deadline_s, 600))  # fmt: skip
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        result.install_peak_rss_mib = max(peak)
        result.install_hwm_mib = proc_status_mib(pid, "VmHWM")
        await asyncio.sleep(1.0)
        result.rss_after_install_mib = proc_status_mib(pid, "VmRSS")
    return result
