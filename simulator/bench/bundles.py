"""Bundle benchmarks: verification against ``sha256sum``, MQTT transfer against raw publish.

Run::

    .venv/bin/python -m simulator.bench.bundles --verify-mib 20 200 --transfer-mib 50 --repeats 3

Two measurements, each against a baseline taken in the same run on the same machine:

- **verify**: a signed bundle of N MiB (random payload) is verified by
  :func:`firmware_bundles.archive.verify` in a fresh child process (signatures,
  expiry, then the payload streamed through SHA-256), against ``sha256sum`` of
  the same payload as a separate file (and ``openssl dgst -sha256``, which
  uses the CPU's SHA instructions as Python's ``hashlib`` does). Both files
  are read once first, so both hash from the page cache. The child resets its
  peak-RSS mark, then reports its own time and ``ru_maxrss`` before and after
  the call: the growth is what verification costs, whatever the bundle's size.
- **transfer**: a real broker, a real hub (``driftless hub serve``) holding an
  uploaded N MiB bundle, and a real agent (``driftless agent run --root``)
  told to run it. "ours" is the agent's own figure for the download (first
  request to the verified file in its cache, from its ``bundle fetched`` log
  line); the end-to-end time (desired PUT to ``applied`` at the hub, unpack
  included) is reported beside it. The baseline publishes the same file's
  bytes in chunks of the same size, QoS 1, from a paho client to a paho
  subscriber in another process on the same broker: the time from the first
  publish to the last byte received.

Rules: every child (broker, hub, agents, subscriber) is stopped on every exit
path; results go to ``bench-results/bundles.json`` with the command that made them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import MosquittoBroker, wait_for_port
from devtools.procs import AgentChild, HubChild
from firmware_bundles import archive
from firmware_bundles.devfleet import DevFleet
from firmware_bundles.keys import sign_document
from firmware_bundles.model import (
    Manifest,
    PayloadInfo,
    RunSpec,
    Targets,
)
from simulator.bench.common import (
    command_line,
    cpu_seconds,
    host_info,
    median,
    ratio,
    write_results,
)

MiB = 1024 * 1024
DAY = 86_400
DEFAULT_CHUNK_KIB = (64, 256)  # the agent's default request size, and a larger one


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which."""


# ---------------------------------------------------------------- keys and bundles


def raw_bundle(out: Path, payload_out: Path, keys: DevFleet, payload_bytes: int) -> None:
    """A signed bundle with a random payload (not an archive: verify never unpacks).

    The payload is also written alone to ``payload_out`` for ``sha256sum``.
    """
    digest = hashlib.sha256()
    with open(payload_out, "wb") as handle:
        left = payload_bytes
        while left:
            piece = os.urandom(min(left, MiB))
            digest.update(piece)
            handle.write(piece)
            left -= len(piece)
    now = int(time.time())
    manifest = Manifest(
        name="bench",
        version="1.0.0",
        security_version=1,
        kind="app",
        targets=Targets(architectures=["any"]),
        run=RunSpec(command=["bin/app"]),
        payload=PayloadInfo(sha256=digest.hexdigest(), size=payload_bytes),
        created=now - 60,
        expires=now + 30 * DAY,
    )
    envelope = sign_document(manifest, [keys.release_key])
    with open(out, "wb") as handle, open(payload_out, "rb") as source:
        handle.write(struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope)))
        handle.write(envelope)
        while chunk := source.read(MiB):
            handle.write(chunk)


def app_bundle(out: Path, keys: DevFleet, payload_bytes: int) -> Path:
    """A real, installable bundle (a tar.gz of random data), built and signed."""
    src = out.with_suffix(".src")
    (src / "bin").mkdir(parents=True, exist_ok=True)
    (src / "bin" / "app").write_text("#!/bin/sh\nexit 0\n")
    with open(src / "data.bin", "wb") as handle:
        left = payload_bytes
        while left:
            piece = os.urandom(min(left, MiB))
            handle.write(piece)
            left -= len(piece)
    now = int(time.time())
    archive.build(
        src,
        name="bench",
        version="1.0.0",
        security_version=1,
        kind="app",
        architectures=["any"],
        created=now - 60,
        expires=now + 30 * DAY,
        out=out,
        run=RunSpec(command=["bin/app"]),
    )
    archive.sign(out, keys.release_key)
    return out


def read_through(path: Path) -> None:
    """Read a file once so that the measured runs hash from the page cache."""
    with open(path, "rb") as handle:
        while handle.read(8 * MiB):
            pass


# ---------------------------------------------------------------- verify


def verify_child(bundle: Path, root: Path) -> dict[str, float]:
    """In this (fresh) process: verify once; time and peak RSS (``ru_maxrss``) around it.

    The kernel's high-water mark is first reset to the current RSS
    (``/proc/self/clear_refs``), so ``ru_maxrss`` after minus before is the
    peak growth caused by the verification alone, not hidden by import peaks.
    """
    from firmware_bundles.trust import TrustedRoot

    trusted = TrustedRoot.from_bytes(root.read_bytes())
    try:  # reset the high-water mark to the current RSS, so imports do not hide the growth
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    archive.verify(bundle, trusted, time.time())
    elapsed = time.perf_counter() - start
    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "verify_s": elapsed,
        "rss_before_mib": before_kib / 1024,
        "rss_peak_mib": after_kib / 1024,
        "rss_growth_mib": (after_kib - before_kib) / 1024,
        "peak_reset": reset,
    }


def run_verify_child(bundle: Path, root: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "simulator.bench.bundles", "--child-verify", str(bundle), str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"verify child failed: {done.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def hash_tool_s(argv: list[str]) -> float:
    """Wall time of one run of an external hashing tool."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} failed: {done.stderr.strip()}")
    return elapsed


def bench_verify(work: Path, keys: DevFleet, size_mib: int, repeats: int) -> dict[str, Any]:
    bundle, payload = work / f"verify-{size_mib}.bundle", work / f"verify-{size_mib}.payload"
    raw_bundle(bundle, payload, keys, size_mib * MiB)
    read_through(bundle)
    read_through(payload)
    baseline: list[float] = []
    openssl: list[float] = []
    ours: list[dict[str, float]] = []
    for _ in range(repeats):
        baseline.append(hash_tool_s(["sha256sum", str(payload)]))
        openssl.append(hash_tool_s(["openssl", "dgst", "-sha256", str(payload)]))
        ours.append(run_verify_child(bundle, keys.root_path))
    bundle.unlink()
    payload.unlink()
    verify_s = [run["verify_s"] for run in ours]
    growth = [run["rss_growth_mib"] for run in ours]
    return {
        "size_mib": size_mib,
        "sha256sum_s": baseline,
        "verify_s": verify_s,
        "rss_growth_mib": growth,
        "rss_before_mib": [run["rss_before_mib"] for run in ours],
        "openssl_s": openssl,
        "median_sha256sum_s": median(baseline),
        "median_openssl_s": median(openssl),
        "median_verify_s": median(verify_s),
        "ratio": ratio(median(verify_s), median(baseline)),
        "ratio_to_openssl": ratio(median(verify_s), median(openssl)),
        "max_rss_growth_mib": max(growth),
    }


# ---------------------------------------------------------------- transfer


def raw_subscriber(port: int, topic_name: str, expected_bytes: int) -> None:
    """Child: subscribe, say ``ready``, and once every byte arrived print the clock (JSON)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    state = {"bytes": 0, "first": 0.0, "last": 0.0}
    finished = threading.Event()
    ready = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        if not state["bytes"]:
            state["first"] = now
        state["bytes"] += len(message.payload)
        if state["bytes"] >= expected_bytes:
            state["last"] = now
            finished.set()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id="bench-raw-sub", protocol=mqtt.MQTTv5
    )
    client.on_message = on_message
    client.on_subscribe = lambda *_a: ready.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic_name, qos=1)
    if not ready.wait(10):
        raise SystemExit("no SUBACK")
    print("ready", flush=True)
    if not finished.wait(600):
        raise SystemExit("not every byte arrived")
    print(json.dumps(state), flush=True)
    client.disconnect()
    client.loop_stop()


def raw_publish_run(port: int, data_path: Path, chunk_bytes: int) -> dict[str, float]:
    """Publish ``data_path`` in ``chunk_bytes`` messages, QoS 1, until the subscriber has it all."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    size = data_path.stat().st_size
    topic_name = "bench/raw/data"
    child = subprocess.Popen(
        [
            sys.executable, "-m", "simulator.bench.bundles",
            "--child-subscribe", str(port), topic_name, str(size),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise BenchError("raw subscriber did not start")
        publisher = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-raw-pub", protocol=mqtt.MQTTv5
        )
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        try:
            start = time.monotonic()
            infos = []
            with open(data_path, "rb") as handle:
                while chunk := handle.read(chunk_bytes):
                    infos.append(publisher.publish(topic_name, chunk, qos=1))
            for info in infos:
                info.wait_for_publish(timeout=300)
            line = child.stdout.readline()
        finally:
            publisher.disconnect()
            publisher.loop_stop()
        if not line:
            raise BenchError("raw subscriber ended without a result")
        got = json.loads(line)
        elapsed = got["last"] - start
        return {"seconds": elapsed, "mib_per_s": size / MiB / elapsed}
    finally:
        child.wait(timeout=30)


@dataclass
class TransferRig:
    """Broker, hub and an uploaded bundle; agents come and go per run."""

    work: Path
    keys: DevFleet
    broker: MosquittoBroker
    hub: HubChild
    api: httpx.Client
    bundle: Path
    sha256: str

    def agent_run(self, index: int, chunk_bytes: int) -> dict[str, Any]:
        device = f"bench-{index}"
        self.api.post("/devices", json={"id": device}).raise_for_status()
        agent = AgentChild(self.work, device, self.broker.url, root=self.keys.root_path)
        # The transfer is measured, not the workload: its bin/app is filler, never run.
        agent.argv += ["--fetch-chunk-bytes", str(chunk_bytes), "--no-supervise"]
        agent.start()
        try:
            wait(lambda: self.api.get(f"/devices/{device}").json()["online"], 30, "agent online")
            config = {"workloads": [{"name": "bench", "bundle": self.sha256}]}
            pids = (
                self.hub.proc.pid if self.hub.proc else None,
                agent.proc.pid if agent.proc else None,
                self.broker.pid,
            )
            cpu_before = [cpu_seconds(pid) for pid in pids]
            start = time.monotonic()
            response = self.api.put(f"/devices/{device}/desired", json={"config": config})
            response.raise_for_status()
            generation = response.json()["desired_generation"]

            def finished() -> dict[str, Any] | None:
                status: dict[str, Any] = self.api.get(f"/devices/{device}").json()["status"]
                done = status.get("phase") in ("applied", "failed", "rolled_back")
                return status if status.get("generation") == generation and done else None

            status = wait(finished, 600, "transfer applied", interval_s=0.1)
            end_to_end = time.monotonic() - start
            cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            if status["phase"] != "applied":
                raise BenchError(f"the agent refused the bundle: {status['error']}")
            fetched = next(
                json.loads(line) for line in agent.log().splitlines() if '"bundle fetched"' in line
            )
            peak = agent_peak_rss_mib(agent)
        finally:
            agent.kill()
        return {
            "seconds": fetched["elapsed_s"],
            "mib_per_s": fetched["bytes"] / MiB / fetched["elapsed_s"],
            "end_to_end_s": end_to_end,
            "requests": fetched["requests"],
            "agent_peak_rss_mib": peak,
            "cpu_s": {"hub": cpu[0], "agent": cpu[1], "broker": cpu[2]},
        }


def agent_peak_rss_mib(agent: AgentChild) -> float:
    if agent.proc is None:
        return 0.0
    try:
        for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def bench_transfer(
    work: Path, keys: DevFleet, size_mib: int, repeats: int, chunk_kib: Sequence[int]
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(work / "broker")
    broker.start()
    hub = HubChild(
        work / "hub", broker.url, trust_root=keys.root_path, signing_key=keys.hub_key_path
    )
    try:
        hub.start()
        wait_for_port("127.0.0.1", hub.api_port, timeout_s=30)
        api = httpx.Client(base_url=hub.base_url + "/api/v1", headers=hub.headers, timeout=120)
        wait(lambda: api.get("/hub/stats").json()["bundles"]["mqtt_connected"], 30, "chunk server")
        bundle = app_bundle(work / "transfer.bundle", keys, size_mib * MiB)
        response = api.post(
            "/bundles",
            content=bundle.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status_code != 201:
            raise BenchError(f"upload refused: {response.status_code} {response.text[:300]}")
        rig = TransferRig(work, keys, broker, hub, api, bundle, response.json()["sha256"])
        read_through(bundle)
        runs: list[dict[str, Any]] = []
        index = 0
        for kib in chunk_kib:
            raw: list[dict[str, float]] = []
            ours: list[dict[str, Any]] = []
            for _ in range(repeats):  # alternate, so both see the same machine
                raw.append(raw_publish_run(broker.port, bundle, kib * 1024))
                ours.append(rig.agent_run(index, kib * 1024))
                index += 1
            raw_rate = [run["mib_per_s"] for run in raw]
            our_rate = [run["mib_per_s"] for run in ours]
            runs.append(
                {
                    "chunk_kib": kib,
                    "raw": raw,
                    "ours": ours,
                    "median_raw_mib_per_s": median(raw_rate),
                    "median_ours_mib_per_s": median(our_rate),
                    "median_end_to_end_s": median([run["end_to_end_s"] for run in ours]),
                    "ratio_ours_to_raw": ratio(median(our_rate), median(raw_rate)),
                }
            )
        api.close()
    finally:
        hub.terminate()
        broker.stop()
    return {"size_mib": round(bundle.stat().st_size / MiB, 2), "window": 8, "runs": runs}


# ---------------------------------------------------------------- report


def format_report(verify: list[dict[str, Any]], transfer: dict[str, Any] | None) -> str:
    lines = ["verify a signed bundle vs hashing its payload (medians, page cache warm)"]
    lines.append(
        f"{'size':>8} {'sha256sum':>10} {'openssl':>9} {'verify':>9} {'/sha256sum':>11} "
        f"{'/openssl':>9} {'peak RSS growth':>16}"
    )
    for row in verify:
        lines.append(
            f"{row['size_mib']:>5} MiB {row['median_sha256sum_s']:>9.3f}s "
            f"{row['median_openssl_s']:>8.3f}s {row['median_verify_s']:>8.3f}s "
            f"{row['ratio']:>10.2f}x {row['ratio_to_openssl']:>8.2f}x "
            f"{row['max_rss_growth_mib']:>12.2f} MiB"
        )
    if transfer is not None:
        lines.append("")
        lines.append(
            f"transfer {transfer['size_mib']} MiB to one agent over MQTT (window "
            f"{transfer['window']}) vs raw QoS 1 publish of the same bytes in messages of "
            "the same size"
        )
        for run in transfer["runs"]:
            raw = " ".join(f"{r['mib_per_s']:6.1f}" for r in run["raw"])
            ours = " ".join(f"{r['mib_per_s']:6.1f}" for r in run["ours"])
            lines.append(
                f"{run['chunk_kib']:>4} KiB chunks  raw MiB/s: {raw}  ours MiB/s: {ours}  "
                f"medians {run['median_raw_mib_per_s']:.1f} / {run['median_ours_mib_per_s']:.1f}"
                f", ratio {run['ratio_ours_to_raw']:.2f}; desired PUT to applied "
                f"{run['median_end_to_end_s']:.2f} s"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.bundles", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--verify-mib", type=int, nargs="*", default=[20, 200])
    parser.add_argument("--transfer-mib", type=int, default=50, help="0 skips the transfer")
    parser.add_argument(
        "--transfer-chunk-kib", type=int, nargs="+", default=list(DEFAULT_CHUNK_KIB)
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-results") / "bundles.json")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary one")
    parser.add_argument(
        "--child-verify", nargs=2, metavar=("BUNDLE", "ROOT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--child-subscribe", nargs=3, metavar=("PORT", "TOPIC", "BYTES"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_verify:
        print(json.dumps(verify_child(Path(args.child_verify[0]), Path(args.child_verify[1]))))
        return 0
    if args.child_subscribe:
        port, topic_name, size = args.child_subscribe
        raw_subscriber(int(port), topic_name, int(size))
        return 0
    if args.repeats < 1:
        print("bundles: --repeats must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-bundles-", dir=args.workdir) as tmp:
        work = Path(tmp)
        keys = DevFleet(work / "keys")
        try:
            verify = [bench_verify(work, keys, size, args.repeats) for size in args.verify_mib]
            transfer = (
                bench_transfer(
                    work / "transfer",
                    keys,
                    args.transfer_mib,
                    args.repeats,
                    args.transfer_chunk_kib,
                )
                if args.transfer_mib > 0
                else None
            )
        except (BenchError, OSError, httpx.HTTPError) as exc:
            print(f"bundles: failed: {exc}", file=sys.stderr)
            return 1
    print(format_report(verify, transfer))
    document = {
        "command": command_line("simulator.bench.bundles", argv),
        "host": host_info(),
        "verify": verify,
        "transfer": transfer,
    }
    write_results(args.json, document)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
