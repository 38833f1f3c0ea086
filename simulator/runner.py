"""``driftless sim run``: register N devices, run them in worker processes, show and summarise.

The run: take the state-directory lock; register the devices through
``POST /api/v1/devices/batch`` (idempotent, so a second run reuses them); start
the workers (``simulator.workers``); then once per ``interval_s`` read the
workers' counters and ``GET /api/v1/fleet/summary`` and print one progress
line, while a task pushes a new fleet-wide desired configuration every
``change_every_s`` with ``PUT /api/v1/fleet/desired``. After ``duration_s``
(or on SIGINT/SIGTERM) it optionally *settles* (ends every fault, waits up to
``settle_s`` until every device is in sync or has failed the newest
generation), stops the workers in order and prints the summary.

Rules:
- Only the hub's public API is used. Devices carry the label ``sim=<prefix>``
  and every desired change targets that selector, so other devices on the hub
  are never touched. The summary's ``in_sync`` is hub-wide (the live line says
  ``sync`` against the hub's total); the final figures count only this run's
  devices (``GET /devices?label=sim=<prefix>``, paged). Every call carries
  ``--token`` (``Authorization: Bearer``); registering needs the admin role.
- ``--root`` is checked before anything starts (an unreadable or unverifiable
  root is status 2) and handed to every worker, so devices fetch and verify
  the bundles their desired state references.
- ``--enroll`` provisions the devices as real ones are (``simulator.enroll``),
  after registration and before the workers start: a key and CSR per device,
  one claim token, ``POST /enroll``; identities are kept in
  ``STATE_DIR/identities`` and reused by later runs and respawned workers. The
  devices then connect to an ``mqtts://`` broker with their own certificates,
  and without ``--root`` they trust the fleet root the enrollment returned, as
  ``driftless agent run`` does. ``--enroll`` needs ``mqtts://`` and ``mqtts://``
  needs ``--enroll``.
- Every loop is bounded: ticks by ``duration_s`` or a signal, settling by
  ``settle_s``, registration by ceil(N / chunk) requests, listings by
  ceil(N / 1000) + 1 pages, every HTTP call by a timeout. A hub that does not
  answer a tick is shown as ``?`` and counted, and never stops the run.
- A first SIGINT/SIGTERM stops in order and still writes the summary (exit 0);
  a second one SIGKILLs the workers.
- Exit status: 0 done; 1 the run did not do its job (settling missed its
  deadline, a slice of devices was lost for good); 2 it could not start
  (bad arguments, hub unreachable, registration refused, state dir in use).
- ``--json PATH`` is rewritten atomically every tick (``"state": "running"``,
  with the worker pids) and at the end (``"finished"``), so scripts can follow a
  run and read its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from simulator.journal import redistribute
from simulator.profiles import Profile
from simulator.workers import WorkerPool, WorkerSpec, rss_bytes, split

MAX_BATCH_DEVICES = 10_000  # the API's limit per POST /devices/batch
MAX_BATCH_BODY_BYTES = 900_000  # under the API's 1 MiB request limit
PAGE_SIZE = 1000  # the API's largest page
LABEL_KEY = "sim"


class RunError(RuntimeError):
    """The run could not start or could not talk to the hub (exit status 2)."""


@dataclass(frozen=True)
class RunConfig:
    """One ``driftless sim run``; limits carry their unit in the name."""

    devices: int
    broker_url: str
    hub_url: str
    profile: Profile
    seed: int = 0
    workers: int = 1
    duration_s: float | None = None  # None: until SIGINT/SIGTERM
    change_every_s: float | None = None
    settle_s: float = 0.0
    json_path: Path | None = None
    prefix: str = "sim"
    state_dir: Path = Path(".driftless/sim")
    respawn: bool = True
    max_respawns: int = 5
    respawn_delay_s: float = 1.0
    max_concurrent_connects: int = 64
    interval_s: float = 1.0
    http_timeout_s: float = 60.0
    stop_timeout_s: float = 30.0
    log_level: str = "info"
    root: Path | None = None  # the fleet's root.json, handed to every worker
    token: str | None = field(default=None, repr=False)  # the hub's API token (a secret)
    enroll: bool = False  # provision through POST /enroll, connect with mutual TLS
    enroll_concurrency: int = 8  # enrollments in flight

    def __post_init__(self) -> None:
        from plumbing.net import parse_broker_url

        tls = parse_broker_url(self.broker_url).tls
        if self.enroll and not tls:
            raise ValueError(
                "--enroll: enrolled devices connect with mutual TLS; the broker must be mqtts://"
            )
        if tls and not self.enroll:
            raise ValueError(
                "an mqtts:// broker needs --enroll (the simulated devices need certificates)"
            )
        if self.enroll_concurrency < 1:
            raise ValueError("enroll_concurrency must be at least 1")
        if self.devices < 1:
            raise ValueError("--devices must be at least 1")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        for name in ("duration_s", "change_every_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.settle_s < 0 or self.interval_s <= 0:
            raise ValueError("--settle-s must not be negative; the interval must be positive")
        if self.max_respawns < 0:
            raise ValueError("--max-respawns must not be negative")

    @property
    def api_url(self) -> str:
        base = self.hub_url.rstrip("/")
        return base if base.endswith("/api/v1") else base + "/api/v1"

    @property
    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_KEY: self.prefix}

    @property
    def identity_dir(self) -> Path:
        """Where ``--enroll`` keeps the devices' keys and certificates."""
        return self.state_dir / "identities"


# ---------------------------------------------------------------- pure parts


def batch_size(prefix: str, count: int) -> int:
    """Pure: devices per POST /devices/batch, within the API's count and body limits."""
    width = max(5, len(str(max(count - 1, 0))))
    per_device = len(json.dumps({"id": f"{prefix}-{'0' * width}", "labels": {LABEL_KEY: prefix}}))
    budget = MAX_BATCH_BODY_BYTES - 64  # the envelope around the list
    return max(1, min(MAX_BATCH_DEVICES, budget // (per_device + 2)))


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def change_config(index: int, profile: str, seed: int) -> dict[str, Any]:
    """Pure: the desired configuration of the run's ``index``-th change."""
    return {"sim": {"change": index, "profile": profile, "seed": seed}}


@dataclass
class Change:
    index: int
    at_s: float  # since the run started (workers launched)
    put_s: float = 0.0  # how long the PUT took
    updated: int = 0
    generation: int = 0  # the newest generation it assigned
    min_generation: int = 0  # the oldest (devices re-keyed by the hub may differ)
    converged_s: float | None = None  # PUT sent -> every device in sync or failed it
    failed: int = 0  # devices that failed it, when it converged
    superseded: bool = False  # the next change came before this one converged
    error: str | None = None


@dataclass(frozen=True)
class Tick:
    """What one progress line shows."""

    elapsed_s: float
    devices: int
    connected: int
    hub: dict[str, Any] | None  # GET /fleet/summary, None if the hub did not answer
    generations: dict[int, int]
    applied: int
    failed: int
    disconnects: int
    rejected: int
    offline_now: int
    workers_alive: int
    workers: int
    pids: tuple[int, ...]


def _top_generations(generations: dict[int, int], limit: int = 3) -> str:
    ranked = sorted(generations.items(), key=lambda kv: (-kv[1], -kv[0]))[:limit]
    text = " ".join(f"{g}:{n}" for g, n in ranked) or "-"
    if len(generations) > limit:
        text += " …"
    return text


def format_tick(tick: Tick) -> str:
    """Pure: one compact progress line."""
    if tick.hub is None:
        sync = "sync ?"
    else:
        sync = f"sync {tick.hub.get('in_sync', 0)}/{tick.hub.get('total', 0)}"
    pids = ",".join(str(p) for p in tick.pids)
    return (
        f"{tick.elapsed_s:7.1f}s conn {tick.connected}/{tick.devices} {sync} "
        f"gen {_top_generations(tick.generations)} "
        f"apply {tick.applied} ok {tick.failed} failed disc {tick.disconnects} "
        f"off {tick.offline_now} rej {tick.rejected} "
        f"workers {tick.workers_alive}/{tick.workers} [{pids}]"
    )


def _rate(total: int, devices: int) -> str:
    return f"{total / devices:.1f}" if devices else "-"


def format_summary(summary: dict[str, Any]) -> str:
    """Pure: the table printed at the end of a run."""
    n = summary["devices"]
    final = summary.get("final") or {}
    mem = summary["memory"]
    msgs = summary["messages"]
    lines = [
        f"driftless sim: {n} devices, profile {summary['profile']['name']}, "
        f"seed {summary['seed']}, {summary['workers']['count']} workers, "
        f"{summary['duration_s']:.1f} s ({summary['stopped_by']})",
    ]
    enrollment = summary.get("enrollment")
    if enrollment:
        lines.append(
            f"{'enrolled / reused':30}"
            f"{str(enrollment['enrolled']) + ' / ' + str(enrollment['reused']):>14}"
            f"{enrollment['enroll_s']:>13.1f}s"
        )
    lines += [
        f"{'':30}{'total':>14}{'per device':>14}",
        f"{'connects':30}{summary['connects']:>14}{_rate(summary['connects'], n):>14}",
        f"{'disconnects (lost links)':30}{summary['disconnects']:>14}"
        f"{_rate(summary['disconnects'], n):>14}",
        f"{'network drops (profile)':30}{summary['network_drops']:>14}"
        f"{_rate(summary['network_drops'], n):>14}",
        f"{'applies ok':30}{summary['applies']['ok']:>14}{_rate(summary['applies']['ok'], n):>14}",
        f"{'applies failed':30}{summary['failures']:>14}{_rate(summary['failures'], n):>14}",
        f"{'messages in':30}{msgs['in']:>14}{_rate(msgs['in'], n):>14}",
        f"{'messages out':30}{msgs['out']:>14}{_rate(msgs['out'], n):>14}",
        f"{'rejected':30}{summary['rejected']:>14}",
    ]
    bundles = summary.get("bundles") or {}
    if bundles.get("jobs"):
        lines += [
            f"{'bundle fetches ok / failed':30}"
            f"{str(bundles['jobs_ok']) + ' / ' + str(bundles['jobs_failed']):>14}",
            f"{'bundle bytes accepted':30}{bundles['bytes_accepted']:>14}",
            f"{'bundle bytes received':30}{bundles['frame_bytes']:>14}",
            f"{'transfer link drops / resumes':30}"
            f"{str(bundles['link_drops']) + ' / ' + str(bundles['resumes']):>14}",
        ]
    workloads = summary.get("workloads") or {}
    if any(workloads.values()):
        lines += [
            f"{'workload health passed / failed':30}"
            f"{str(workloads['healthy']) + ' / ' + str(workloads['unhealthy']):>14}",
            f"{'workload restarts / gave up':30}"
            f"{str(workloads['restarts']) + ' / ' + str(workloads['gave_up']):>14}",
        ]
    if summary.get("connected_s") is not None:
        lines.append(f"{'all connected after':30}{summary['connected_s']:>13.1f}s")
    for change in summary["changes"]:
        took = change["converged_s"]
        label = f"change {change['index']} converged after"
        if took is not None:
            failed = f"  ({change['failed']} failed it)" if change["failed"] else ""
            lines.append(f"{label:30}{took:>13.1f}s{failed}")
        else:
            why = "superseded" if change.get("superseded") else "-"
            lines.append(f"{label:30}{why:>14}")
    if final:
        lines.append(
            f"{'final in sync':30}{final['in_sync']:>14}"
            f"{'/' + str(n) + ' (' + str(final['failed_newest']) + ' failed newest)':>14}"
        )
    if summary.get("settled_s") is not None:
        lines.append(f"{'settled after':30}{summary['settled_s']:>13.1f}s")
    if summary.get("stop_s") is not None:
        lines.append(f"{'workers stopped in':30}{summary['stop_s']:>13.1f}s")
    per = mem["per_device_bytes"] / 1024
    marginal = mem["per_device_marginal_bytes"] / 1024
    lines.append(
        f"{'memory (workers RSS)':30}{mem['workers_rss_bytes'] / 2**20:>10.1f} MiB"
        f"{per:>10.1f} KiB  (marginal {marginal:.1f} KiB/device)"
    )
    lines.append("worker  pid      devices  restarts  rss MiB  pids")
    for w in summary["workers"]["each"]:
        lines.append(
            f"{w['index']:<8}{w['pid'] or '-':<9}{w['devices']:<9}{w['restarts']:<10}"
            f"{w['rss_bytes'] / 2**20:<9.1f}{','.join(str(p) for p in w['pids'])}"
        )
    for error in summary.get("errors", []):
        lines.append(f"error: {error}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the live view


class LiveView:
    """Progress lines on a stream: overwritten in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._dirty = False

    def progress(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self._dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def event(self, line: str) -> None:
        """A line that stays (a worker died, a change was pushed)."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self._dirty = False
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._dirty:
            self.stream.write("\n")
            self.stream.flush()
        self._dirty = False


# ---------------------------------------------------------------- the hub


_AUTH_HINTS = {
    401: " (pass the hub's API token: --token or DRIFTLESS_TOKEN)",
    403: " (registering devices needs an admin token)",
}


async def register(
    api: httpx.AsyncClient, ids: Sequence[str], labels: dict[str, str], *, chunk: int
) -> tuple[int, int]:
    """Register (or find) every device; returns (created, existing). Raises RunError."""
    created = existing = 0
    for part in chunks(ids, chunk):
        body = {"devices": [{"id": d, "labels": labels} for d in part]}
        try:
            response = await api.post("/devices/batch", json=body)
        except httpx.HTTPError as exc:
            raise RunError(f"POST /devices/batch: {exc!r}") from None
        if response.status_code != 200:
            hint = _AUTH_HINTS.get(response.status_code, "")
            raise RunError(
                f"POST /devices/batch: HTTP {response.status_code} {response.text[:300]}{hint}"
            )
        result = response.json()
        created += len(result["created"])
        existing += len(result["existing"])
    return created, existing


async def hub_summary(api: httpx.AsyncClient) -> dict[str, Any] | None:
    """GET /fleet/summary, or None when the hub does not answer properly."""
    try:
        response = await api.get("/fleet/summary")
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def our_devices(api: httpx.AsyncClient, cfg: RunConfig) -> dict[str, int]:
    """Exact counts over this run's devices (paged listing by label). Raises httpx.HTTPError."""
    counts = {"total": 0, "in_sync": 0, "failed_newest": 0, "online": 0, "settled": 0}
    label = f"{LABEL_KEY}={cfg.prefix}"
    for page in range(math.ceil(cfg.devices / PAGE_SIZE) + 1):
        response = await api.get(
            "/devices", params={"label": label, "limit": PAGE_SIZE, "offset": page * PAGE_SIZE}
        )
        response.raise_for_status()
        items = response.json()["items"]
        for device in items:
            counts["total"] += 1
            in_sync = bool(device["in_sync"])
            failed = device["failed_generation"] >= device["desired_generation"] > 0
            counts["in_sync"] += in_sync
            counts["failed_newest"] += failed and not in_sync
            counts["settled"] += in_sync or failed
            counts["online"] += bool(device["online"])
        if len(items) < PAGE_SIZE:
            break
    return counts


# ---------------------------------------------------------------- the run


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir/lock`` for the run; raises RunError if another run holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"another driftless sim run is using {state_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class Run:
    """The state of one run while it goes; :meth:`summary` turns it into the result."""

    cfg: RunConfig
    view: LiveView
    pool: WorkerPool | None = None
    started: float = 0.0  # monotonic, when the workers were launched
    registration: dict[str, Any] = field(default_factory=dict)
    enrollment: dict[str, Any] | None = None  # simulator.enroll.EnrollmentResult, --enroll
    changes: list[Change] = field(default_factory=list)
    connected_s: float | None = None
    settled_s: float | None = None
    stop_s: float | None = None  # how long the orderly stop of the workers took
    final: dict[str, int] | None = None
    stopped_by: str = "duration"
    hub: dict[str, Any] | None = None
    hub_misses: int = 0
    errors: list[str] = field(default_factory=list)
    deaths_seen: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def tick(self) -> Tick:
        assert self.pool is not None
        c = self.pool.counters()
        return Tick(
            elapsed_s=self.elapsed(),
            devices=self.cfg.devices,
            connected=int(c.get("connected", 0)),
            hub=self.hub,
            generations=self.pool.generations(),
            applied=sum(c.get("applied", {}).values()),
            failed=sum(c.get("failed", {}).values()),
            disconnects=int(c.get("connections_lost", 0)),
            rejected=sum(c.get("rejected", {}).values()),
            offline_now=int(c.get("offline_now", 0)),
            workers_alive=self.pool.alive(),
            workers=len(self.pool.workers),
            pids=tuple(self.pool.pids()),
        )

    def summary(self, state: str) -> dict[str, Any]:
        cfg = self.cfg
        c = self.pool.counters() if self.pool else {}
        workers = [w.figures() for w in self.pool.workers] if self.pool else []
        rss, rss_base = self.pool.rss() if self.pool else (0, 0)
        return {
            "state": state,
            "devices": cfg.devices,
            "prefix": cfg.prefix,
            "profile": cfg.profile.as_dict(),
            "seed": cfg.seed,
            "broker": cfg.broker_url,
            "hub": cfg.hub_url,
            "duration_s": round(self.elapsed(), 3),
            "stopped_by": self.stopped_by,
            "registration": self.registration,
            "enrollment": self.enrollment,
            "tls": cfg.enroll,
            "connected_s": self.connected_s,
            "connected": int(c.get("connected", 0)),
            "connects": int(c.get("connects", 0)),
            "connect_failures": int(c.get("connect_failures", 0)),
            "disconnects": int(c.get("connections_lost", 0)),
            "network_drops": int(c.get("network_drops", 0)),
            "severed": int(c.get("severed", 0)),
            "applies": {
                "ok": sum(c.get("applied", {}).values()),
                "failed": sum(c.get("failed", {}).values()),
                "ok_by_generation": c.get("applied", {}),
                "failed_by_generation": c.get("failed", {}),
            },
            "failures": sum(c.get("failed", {}).values()),
            "rejected": sum(c.get("rejected", {}).values()),
            "rejected_by_reason": c.get("rejected", {}),
            "messages": {
                "in": int(c.get("messages_in", 0)),
                "out": int(c.get("messages_out", 0)),
                "bytes_in": int(c.get("bytes_in", 0)),
                "bytes_out": int(c.get("bytes_out", 0)),
            },
            "reports": {
                "sent": int(c.get("reports_sent", 0)),
                "deferred": int(c.get("reports_deferred", 0)),
            },
            "bundles": c.get("bundles", {}),
            "workloads": c.get("workloads", {}),
            "changes": [asdict(ch) for ch in self.changes],
            "hub_summary": self.hub,
            "hub_misses": self.hub_misses,
            "final": self.final,
            "settled_s": self.settled_s,
            "stop_s": self.stop_s,
            "generations": {str(g): n for g, n in sorted(self.pool.generations().items())}
            if self.pool
            else {},
            "workers": {
                "count": len(workers),
                "alive": self.pool.alive() if self.pool else 0,
                "pids": self.pool.pids() if self.pool else [],
                "restarts": sum(w["restarts"] for w in workers),
                "deaths": sum(len(w["deaths"]) for w in workers),
                "each": workers,
            },
            "memory": {
                "workers_rss_bytes": rss,
                "workers_rss_before_fleet_bytes": rss_base,
                "per_device_bytes": round(rss / cfg.devices),
                "per_device_marginal_bytes": round(max(0, rss - rss_base) / cfg.devices),
                "parent_rss_bytes": rss_bytes(),
                "measured": "each worker's RSS in its newest snapshot while running",
            },
            "errors": [*self.errors, *(self.pool.errors() if self.pool else [])],
        }

    def publish(self, state: str) -> dict[str, Any]:
        summary = self.summary(state)
        if self.cfg.json_path is not None:
            write_json(self.cfg.json_path, summary)
        return summary


class _Signals:
    """First SIGINT/SIGTERM: stop in order; second: kill."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.kill = asyncio.Event()
        self.name: str | None = None

    def __call__(self, signum: signal.Signals) -> None:
        if self.stop.is_set():
            self.kill.set()
        self.name = self.name or signum.name
        self.stop.set()


async def _sleep_or(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``event`` is set first; True if it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, seconds))
    return event.is_set()


async def _push_changes(run: Run, api: httpx.AsyncClient, stop: asyncio.Event) -> None:
    cfg = run.cfg
    assert cfg.change_every_s is not None
    for index in itertools.count(1):
        due = run.started + index * cfg.change_every_s
        if await _sleep_or(stop, due - time.monotonic()):
            return
        for earlier in run.changes:
            if earlier.converged_s is None and earlier.error is None:
                earlier.superseded = True
        change = Change(index=index, at_s=run.elapsed())
        body = {
            "selector": {"labels": cfg.labels},
            "config": change_config(index, cfg.profile.name, cfg.seed),
        }
        sent = time.monotonic()
        try:
            response = await api.put("/fleet/desired", json=body)
            change.put_s = time.monotonic() - sent
            if response.status_code != 200:
                change.error = f"HTTP {response.status_code} {response.text[:200]}"
            else:
                result = response.json()
                change.updated = int(result["updated"])
                generations = [int(d["generation"]) for d in result["devices"]]
                change.generation = max(generations, default=0)
                change.min_generation = min(generations, default=0)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            change.error = repr(exc)
        run.changes.append(change)
        run.view.event(
            f"change {index} at {change.at_s:.1f}s: "
            + (
                f"failed: {change.error}"
                if change.error
                else f"{change.updated} devices, generation {change.generation}"
            )
        )


async def _tick(run: Run, api: httpx.AsyncClient) -> None:
    """Read the hub and the workers, note milestones, show a line, publish the JSON."""
    assert run.pool is not None
    run.hub = await hub_summary(api)
    if run.hub is None:
        run.hub_misses += 1
    tick = run.tick()
    if run.connected_s is None and tick.connected >= run.cfg.devices:
        run.connected_s = round(tick.elapsed_s, 3)
        run.view.event(f"all {run.cfg.devices} devices connected after {run.connected_s:.1f}s")
    await _measure_change(run, api)
    deaths = [(w, d) for w in run.pool.workers for d in w.deaths]
    for worker, death in deaths[run.deaths_seen :]:
        run.view.event(
            f"worker {worker.index} (pid {death['pid']}) died with status "
            f"{death['returncode']}" + ("; restarting it" if worker.respawn_at else "")
        )
    run.deaths_seen = len(deaths)
    for index in await run.pool.supervise():
        worker = run.pool.workers[index]
        run.view.event(f"worker {index} restarted as pid {worker.pid}")
    run.view.progress(format_tick(tick))
    run.publish("running")


async def _measure_change(run: Run, api: httpx.AsyncClient) -> None:
    """Note when the newest change has converged: every device in sync or failed it.

    Cheap necessary conditions first (the hub's counts, the workers' generations);
    the exact check lists this run's devices, so it runs only near the end.
    """
    assert run.pool is not None
    pending = [c for c in run.changes if c.converged_s is None and c.error is None]
    if not pending or pending[-1].superseded:
        return
    change, n, hub = pending[-1], run.cfg.devices, run.hub or {}
    if int(hub.get("in_sync", 0)) + int(hub.get("failed", 0)) < n:
        return
    failed = 0
    if not (hub.get("total") == n and hub.get("in_sync") == n):
        reached = sum(c for g, c in run.pool.generations().items() if g >= change.min_generation)
        failures = run.pool.counters().get("failed", {})
        reached += sum(c for g, c in failures.items() if int(g) >= change.min_generation)
        if reached < n:
            return
        try:
            counts = await our_devices(api, run.cfg)
        except (httpx.HTTPError, ValueError, KeyError):
            return
        if counts["settled"] < n:
            return
        failed = counts["failed_newest"]
    _converged(run, change, failed)


def _converged(run: Run, change: Change, failed: int) -> None:
    change.converged_s = round(run.elapsed() - change.at_s, 3)
    change.failed = failed
    run.view.event(
        f"change {change.index} converged after {change.converged_s:.1f}s"
        + (f" ({failed} devices failed it)" if failed else "")
    )


async def _settle(run: Run, api: httpx.AsyncClient, stop: asyncio.Event) -> None:
    """End every fault and wait until every device is in sync or failed the newest generation."""
    assert run.pool is not None
    cfg = run.cfg
    await run.pool.send("heal")
    start = time.monotonic()
    run.view.event(f"settling: faults off, waiting up to {cfg.settle_s:.0f}s for every device")
    deadline = start + cfg.settle_s
    while time.monotonic() < deadline and not stop.is_set():
        await _tick(run, api)
        hub = run.hub or {}
        maybe = int(hub.get("in_sync", 0)) + int(hub.get("failed", 0)) >= cfg.devices
        if maybe:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                run.final = await our_devices(api, cfg)
                if run.final["settled"] >= cfg.devices:
                    run.settled_s = round(time.monotonic() - start, 3)
                    newest = run.changes[-1] if run.changes else None
                    if newest is not None and newest.converged_s is None and not newest.error:
                        _converged(run, newest, run.final["failed_newest"])
                    run.view.event(f"settled after {run.settled_s:.1f}s")
                    return
        await _sleep_or(stop, cfg.interval_s)


async def run_async(cfg: RunConfig, view: LiveView) -> tuple[int, dict[str, Any]]:
    """The whole run; returns (exit status, summary). Raises RunError before workers start."""
    run = Run(cfg=cfg, view=view)
    loop = asyncio.get_running_loop()
    signals = _Signals()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signals, signum)
    try:
        return await _run(run, signals)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        view.close()


async def _run(run: Run, signals: _Signals) -> tuple[int, dict[str, Any]]:
    from simulator.fleet import device_ids

    cfg = run.cfg
    if cfg.root is not None:  # refused here (status 2) rather than by every worker
        _check_root(cfg.root)
    root = cfg.root
    ids = device_ids(cfg.devices, cfg.prefix)
    ranges = split(cfg.devices, cfg.workers)
    async with httpx.AsyncClient(
        base_url=cfg.api_url, headers=cfg.api_headers, timeout=cfg.http_timeout_s
    ) as api:
        t = time.monotonic()
        created, existing = await register(
            api, ids, cfg.labels, chunk=batch_size(cfg.prefix, cfg.devices)
        )
        run.registration = {
            "created": created,
            "existing": existing,
            "s": round(time.monotonic() - t, 3),
        }
        view_line = f"registered {created} new, {existing} existing devices"
        run.view.event(f"{view_line} in {run.registration['s']:.1f}s")
        if cfg.enroll:
            await _enroll(run, api, ids)
            enrolled_root = cfg.identity_dir / "root.json"
            if root is None and enrolled_root.exists():  # as agent run with an enrolled dir
                _check_root(enrolled_root)
                root = enrolled_root
        journals = redistribute(cfg.state_dir, [ids[r.start : r.stop] for r in ranges])
        log_dir = cfg.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for index in range(len(ranges)):
            (log_dir / f"worker-{index}.log").write_bytes(b"")
        epoch = time.time()
        specs = [
            WorkerSpec(
                index=i,
                prefix=cfg.prefix,
                count=cfg.devices,
                start=r.start,
                stop=r.stop,
                broker_url=cfg.broker_url,
                seed=cfg.seed,
                profile=cfg.profile,
                epoch=epoch,
                parent_pid=os.getpid(),
                journal=str(journals[i]),
                snapshot_interval_s=cfg.interval_s,
                max_concurrent_connects=cfg.max_concurrent_connects,
                log_level=cfg.log_level,
                root=str(root.resolve()) if root is not None else None,
                identity_dir=str(cfg.identity_dir.resolve()) if cfg.enroll else None,
            )
            for i, r in enumerate(ranges)
        ]
        pool = WorkerPool(
            specs,
            log_dir=log_dir,
            respawn=cfg.respawn,
            max_respawns=cfg.max_respawns,
            respawn_delay_s=cfg.respawn_delay_s,
            stop_timeout_s=cfg.stop_timeout_s,
        )
        run.pool = pool
        run.started = time.monotonic()
        changer: asyncio.Task[None] | None = None
        stop_changes = asyncio.Event()
        try:
            await pool.start()
            if cfg.change_every_s is not None:
                changer = asyncio.create_task(_push_changes(run, api, stop_changes))
            end = run.started + cfg.duration_s if cfg.duration_s is not None else math.inf
            while time.monotonic() < end and not signals.stop.is_set():
                await _tick(run, api)
                if pool.errors() and pool.alive() == 0:
                    run.stopped_by = "workers failed"
                    break
                await _sleep_or(signals.stop, min(cfg.interval_s, end - time.monotonic()))
            if signals.name:
                run.stopped_by = signals.name
            stop_changes.set()
            if changer is not None:
                await changer
                changer = None
            if cfg.settle_s > 0 and not signals.stop.is_set() and pool.alive():
                await _settle(run, api, signals.stop)
            if signals.name:
                run.stopped_by = signals.name
            if run.final is None:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    run.final = await our_devices(api, cfg)
        finally:
            stop_changes.set()
            if changer is not None:
                changer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await changer
            stopping_at = time.monotonic()
            await _stop_pool(pool, signals)
            run.stop_s = round(time.monotonic() - stopping_at, 3)
    lost = [w.index for w in pool.workers if w.deaths and not w.finished]
    status = 0
    if cfg.settle_s > 0 and run.settled_s is None and not signals.stop.is_set():
        run.errors.append(f"not settled within {cfg.settle_s}s: {run.final}")
        status = 1
    if lost:
        run.errors.append(f"worker slices lost for good: {lost}")
        status = 1
    if pool.errors() and status == 0:
        status = 1
    return status, run.publish("finished")


def _check_root(path: Path) -> None:
    """Refuse (RunError, status 2) a root the workers could not use, before they start."""
    from edge_agent.root import load_trusted_root

    try:
        load_trusted_root(path)
    except ValueError as exc:
        raise RunError(str(exc)) from None


async def _enroll(run: Run, api: httpx.AsyncClient, ids: Sequence[str]) -> None:
    """``--enroll``: give every device a usable identity (simulator.enroll). Raises RunError."""
    import datetime as dt

    from simulator.enroll import DeviceIdentities, EnrollError, enroll_fleet

    cfg = run.cfg
    async with httpx.AsyncClient(  # as a device: no API token on the open route
        base_url=cfg.api_url, timeout=cfg.http_timeout_s
    ) as device_api:
        try:
            result = await enroll_fleet(
                api,
                device_api,
                ids,
                DeviceIdentities(cfg.identity_dir),
                labels=cfg.labels,
                now=dt.datetime.now(dt.UTC),
                concurrency=cfg.enroll_concurrency,
            )
        except (EnrollError, OSError) as exc:  # OSError: the identity directory itself
            raise RunError(f"enrollment: {exc}") from None
    run.enrollment = result.as_dict()
    run.view.event(
        f"enrolled {result.enrolled} devices in {result.enroll_s:.1f}s, "
        f"reused {result.reused} identities ({cfg.identity_dir})"
    )


async def _stop_pool(pool: WorkerPool, signals: _Signals) -> None:
    stopping = asyncio.create_task(pool.stop())
    killing = asyncio.create_task(signals.kill.wait())
    done, _ = await asyncio.wait({stopping, killing}, return_when=asyncio.FIRST_COMPLETED)
    killing.cancel()
    if stopping not in done:
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        await pool.stop(kill=True)


def run_sim(cfg: RunConfig, *, stream: TextIO | None = None, out: TextIO | None = None) -> int:
    """``driftless sim run``: the run in the foreground; returns the exit status."""
    view = LiveView(stream or sys.stderr)
    out = out or sys.stdout
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request: noise here
    try:
        with state_lock(cfg.state_dir):
            status, summary = asyncio.run(run_async(cfg, view))
    except RunError as exc:
        print(f"driftless sim run: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=out)
    if cfg.json_path is not None:
        print(f"summary written to {cfg.json_path}", file=out)
    return status
