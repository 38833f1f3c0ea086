"""Bare reconnect storm: the storm benchmark's baseline, N plain MQTT clients in child processes.

The devices' side of a storm without the agent: each client is a
:class:`simulator.link.DeviceLink` (aiomqtt, MQTT 5, ``clean_start=False`` with a
session expiry, a retained QoS 1 Will), as a simulated device's connection is.
``python -m simulator.bench.reconnect clients --port P --count N --start A
--stop B ...`` runs clients ``A..B-1`` of N (``simulator.workers.split``, as the
storm splits its devices) and obeys one JSON command per line on stdin,
answering one JSON line per event on stdout (``simulator.bench.mqttload``'s
protocol, so :class:`~simulator.bench.mqttload.LoadChild` is the handle):

- ``ready``: once started.
- ``{"cmd": "arm", "round": k}``: connect every client (its Will names round
  k; the first session subscribes to the client's own topic at QoS 1), then
  ``armed``. Connections are not timed.
- ``{"cmd": "storm", "round": k, "cut_at": T}``: at wall-clock T every
  connection is cut without DISCONNECT (the broker publishes the Wills); client
  j's network returns at ``T + storm_offline_s(spec, seed, device j, k - 1)``,
  the same draw as device j's in the storm's schedule (``--schedule-prefix``
  names the devices); it reconnects (persistent session: it must be present)
  and waits for the one message the parent queued for it while it was away;
  then ``done`` with the wall-clock time of the last CONNACK and of the last
  message, and the CPU this process used from the cut on.
- ``{"cmd": "rest"}``: every client disconnects cleanly (its session and
  subscription stay, its Will is dropped), then ``rested``: nothing of the
  baseline is connected, or wakes up, while the storm it is compared with runs.

:class:`BareReconnects` is the parent's side: it starts one child per storm
worker, publishes the queued messages once the broker has published every
client's Will (as the storm's change waits for the hub to see every device
offline), and times a round as the storm is timed: from the first network
return (``T + offline_s``) until every client has its message.

Rules:
- Every wait has a deadline (``--deadline-s``); a child ends at EOF on stdin
  (its parent is gone), on ``stop`` and on SIGTERM, closing its clients first.
- Loopback only: the broker address comes from the parent, which started it.
- A child runs as a storm worker does: the same collector thresholds
  (``simulator.fleet.GC_THRESHOLDS``), the same raised RLIMIT_NOFILE, and
  ``DeviceLink`` connects without binding first (``simulator.link``).
- A client reconnects as a device does: at most ``--max-concurrent-connects``
  connection attempts per process at once, a failed attempt retried after the
  device's jittered backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import msgspec

from plumbing.net import Backoff
from simulator.bench.common import BenchError, cpu_seconds
from simulator.bench.mqttload import LoadChild
from simulator.link import DeviceLink, LinkError, LinkSettings
from simulator.profiles import StormSpec, device_rng, storm_offline_s
from simulator.workers import rss_bytes, split

CLIENT_PREFIX = "bare"  # client ids: simulator.fleet.device_ids(count, CLIENT_PREFIX)
ROOT = "bench/storm-bare"  # client j: ROOT/<id>/in (its queued message), ROOT/<id>/will
CUT_LEAD_S = 0.5  # the cut is scheduled this far ahead, so every child has the command
REST_TIMEOUT_S = 5.0  # closing every client at the end of a round or at exit


class BareError(RuntimeError):
    """A bare client could not do its part (a session the broker lost, a deadline)."""


# ---------------------------------------------------------------- pure helpers


def in_topic(client_id: str) -> str:
    return f"{ROOT}/{client_id}/in"


def will_topic(client_id: str) -> str:
    return f"{ROOT}/{client_id}/will"


def will_payload(client_id: str, round_no: int) -> bytes:
    """Pure: the client's Will for a round, about the size of a device's (85 bytes)."""
    return json.dumps(
        {"kind": "status", "v": 1, "client": client_id, "online": False, "round": round_no},
        separators=(",", ":"),
    ).encode()


def will_round(payload: bytes) -> int | None:
    """Pure: the round a Will names; None for anything else."""
    try:
        value = json.loads(payload).get("round")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def queued_payload(round_no: int, size: int) -> bytes:
    """Pure: the message queued for every client in a round, ``size`` bytes (at least its tag)."""
    tag = round_tag(round_no)
    return tag + b"x" * max(0, size - len(tag))


def round_tag(round_no: int) -> bytes:
    return f"bare-round-{round_no}:".encode()


def offline_times(
    spec: StormSpec, seed: int, schedule_ids: Sequence[str], round_no: int
) -> list[float]:
    """Pure: seconds from round ``round_no``'s cut (1-based) to each client's return.

    Client j returns when device ``schedule_ids[j]`` does in storm ``round_no`` of
    the storm schedule ``spec`` (:func:`simulator.profiles.storm_offline_s`).
    """
    return [storm_offline_s(spec, seed, d, round_no - 1) for d in schedule_ids]


# ---------------------------------------------------------------- the child


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


@dataclass
class _Counts:
    connect_failures: int = 0
    links_lost: int = 0  # a reconnected link that dropped before its message
    stray: int = 0  # messages that were not the round's


async def _sleep_until(wall_s: float) -> None:
    delay = wall_s - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


class _BareClient:
    """One client id, its topics, its backoff and its current link."""

    def __init__(
        self, client_id: str, settings: LinkSettings, *, seed: int, gate: asyncio.Semaphore
    ) -> None:
        self.client_id = client_id
        self.topic = in_topic(client_id)
        self.settings = settings
        self.backoff = Backoff(min_s=0.2, max_s=30.0, rng=device_rng(seed, client_id, "backoff"))
        self.gate = gate
        self.link: DeviceLink | None = None
        self.subscribed = False

    async def connect(self, round_no: int, counts: _Counts) -> float:
        """Connect (retrying after the backoff); the wall-clock time of the CONNACK.

        Raises BareError when the broker no longer has the client's session.
        """
        while True:
            link = DeviceLink(
                self.client_id,
                self.settings,
                will_topic=will_topic(self.client_id),
                will_payload=will_payload(self.client_id, round_no),
            )
            try:
                async with self.gate:
                    present = await link.open()
                self.link = link
                connected_at = time.time()
                if not present and self.subscribed:
                    raise BareError(f"{self.client_id}: the broker lost the session")
                if not present:
                    if not await link.subscribe(self.topic, qos=1):
                        raise BareError(f"{self.client_id}: subscription refused")
                    self.subscribed = True
            except LinkError:
                counts.connect_failures += 1
                await link.close()
                if self.link is link:
                    self.link = None
                await asyncio.sleep(self.backoff.next_delay_s())
                continue
            self.backoff.reset()
            return connected_at

    async def storm(self, round_no: int, back_at: float, counts: _Counts) -> tuple[float, float]:
        """Wait for the cut, stay away until ``back_at``, reconnect, take the queued message.

        Returns the wall-clock times of the CONNACK and of the message.
        """
        old = self.link
        if old is None or not old.is_open:
            raise BareError(f"{self.client_id}: not connected before the cut")
        with contextlib.suppress(LinkError):
            while True:  # as a device's session does: read until the link drops
                await old.receive()
                counts.stray += 1
        await old.close()
        self.link = None
        await _sleep_until(back_at)
        tag = round_tag(round_no)
        while True:
            connected_at = await self.connect(round_no, counts)
            link = self.link
            assert link is not None
            try:
                while True:
                    message = await link.receive()
                    if message.topic == self.topic and message.payload.startswith(tag):
                        return connected_at, time.time()
                    counts.stray += 1
            except LinkError:
                counts.links_lost += 1
                await link.close()
                self.link = None
                await asyncio.sleep(self.backoff.next_delay_s())

    async def rest(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            await link.close()


class _Clients:
    """Every client of this child, and what a command does to all of them."""

    def __init__(self, args: argparse.Namespace) -> None:
        from simulator.fleet import device_ids

        ids = device_ids(args.count, args.prefix)[args.start : args.stop]
        self.schedule_ids = device_ids(args.count, args.schedule_prefix)[args.start : args.stop]
        self.spec = msgspec.json.decode(args.storm, type=StormSpec)
        self.seed = args.seed
        self.deadline_s = args.deadline_s
        settings = LinkSettings(host=args.host, port=args.port)
        gate = asyncio.Semaphore(args.max_concurrent_connects)
        self.clients = [_BareClient(i, settings, seed=args.seed, gate=gate) for i in ids]

    async def _all(self, what: str, work: Sequence[Awaitable[Any]]) -> list[Any]:
        tasks = [asyncio.ensure_future(w) for w in work]
        try:
            return await asyncio.wait_for(asyncio.gather(*tasks), self.deadline_s)
        except TimeoutError:
            done = sum(t.done() for t in tasks)
            raise BareError(
                f"{what}: {done}/{len(tasks)} clients done after {self.deadline_s}s"
            ) from None
        finally:
            for task in tasks:
                task.cancel()

    async def arm(self, round_no: int) -> None:
        await self.rest()  # a client still connected would be taken over by its own new link
        counts = _Counts()
        await self._all("arm", [c.connect(round_no, counts) for c in self.clients])
        _emit("armed", round=round_no, clients=len(self.clients), **vars(counts))

    async def storm(self, round_no: int, cut_at: float) -> None:
        counts = _Counts()
        offline = offline_times(self.spec, self.seed, self.schedule_ids, round_no)
        runs = [
            asyncio.ensure_future(c.storm(round_no, cut_at + s, counts))
            for c, s in zip(self.clients, offline, strict=True)
        ]
        await _sleep_until(cut_at)
        cpu0 = time.process_time()
        for client in self.clients:  # as the fleet's fault schedule does, in one tick
            if client.link is not None:
                client.link.sever()
        times = await self._all(f"round {round_no}", runs)
        _emit(
            "done",
            round=round_no,
            received=len(times),
            t_last_connected=max((t[0] for t in times), default=0.0),
            t_last_received=max((t[1] for t in times), default=0.0),
            cpu_s=time.process_time() - cpu0,
            rss_bytes=rss_bytes(),
            **vars(counts),
        )

    async def rest(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.rest() for c in self.clients)), REST_TIMEOUT_S
            )


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _serve(args: argparse.Namespace) -> int:
    from simulator.fleet import (
        FD_HEADROOM,
        FleetError,
        raise_nofile_limit,
        tune_gc_for_many_devices,
    )

    tune_gc_for_many_devices()  # as the storm's workers do
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, me.cancel)
    try:
        raise_nofile_limit(args.stop - args.start + FD_HEADROOM)
    except FleetError as exc:
        _emit("error", detail=str(exc))
        return 2
    clients = _Clients(args)
    commands = await _stdin_lines()
    _emit("ready", clients=len(clients.clients))
    try:
        while True:
            line = await commands.readline()
            if not line:  # the parent is gone
                return 0
            try:
                command = json.loads(line)
            except ValueError:
                continue
            match command.get("cmd"):
                case "arm":
                    await clients.arm(int(command["round"]))
                case "storm":
                    await clients.storm(int(command["round"]), float(command["cut_at"]))
                case "rest":
                    await clients.rest()
                    _emit("rested", round=command.get("round"))
                case "stop":
                    return 0
    except asyncio.CancelledError:  # SIGTERM
        return 0
    except BareError as exc:
        _emit("error", detail=str(exc))
        return 1
    finally:
        await clients.rest()


# ---------------------------------------------------------------- the parent's side


@dataclass(frozen=True)
class BareRound:
    """One bare round, in seconds; "the return" is the first network return (cut + offline_s)."""

    bare_s: float  # the return -> every client has its queued message
    connected_s: float  # the return -> every client connected again (the last CONNACK)
    received: int  # clients that received their queued message
    wills_after_cut_s: float  # the cut -> the broker had published every Will
    published_before_return_s: float  # how long before the return every message was queued
    clients_cpu_s: float  # the children's CPU from the cut until each had every message
    broker_cpu_s: float  # Mosquitto's CPU from just before the cut until the last message
    connect_failures: int
    links_lost: int


class BareReconnects:
    """Children holding N bare clients, a publisher that queues their messages and hears their
    Wills; ``async with BareReconnects(...) as bare: await bare.measure(k)``.

    The children start (and stay, idle, between rounds) on entering; they and the
    publisher are stopped on leaving, whatever happened.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        count: int,
        workers: int,
        seed: int,
        storm: StormSpec,
        schedule_prefix: str,
        payload_bytes: int,
        inflight: int,
        max_concurrent_connects: int,
        deadline_s: float,
        broker_pid: int | None,
    ) -> None:
        self.host, self.port = host, port
        self.count = count
        self.workers = workers
        self.seed = seed
        self.storm = storm
        self.schedule_prefix = schedule_prefix
        self.payload_bytes = payload_bytes
        self.inflight = inflight
        self.max_concurrent_connects = max_concurrent_connects
        self.deadline_s = deadline_s
        self.broker_pid = broker_pid
        self.children: list[LoadChild] = []
        self._stack = contextlib.AsyncExitStack()
        self._pub: aiomqtt.Client | None = None
        self._round = 0
        self._wills = 0
        self._all_wills = asyncio.Event()

    async def __aenter__(self) -> BareReconnects:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        pub = aiomqtt.Client(
            self.host,
            self.port,
            identifier="bench-bare-publisher",
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=self.inflight,
        )
        pub.pending_calls_threshold = 10 * self.count  # no warning per burst
        await self._stack.enter_async_context(pub)
        await pub.subscribe(will_topic("+"), qos=1)
        collector = asyncio.ensure_future(self._collect_wills(pub))
        self._stack.push_async_callback(_cancel, collector)
        self._pub = pub
        storm = msgspec.json.encode(self.storm).decode()
        for index, part in enumerate(split(self.count, self.workers)):
            child = LoadChild(
                "clients",
                [
                    *("--host", self.host, "--port", str(self.port)),
                    *("--count", str(self.count), "--start", str(part.start)),
                    *("--stop", str(part.stop), "--seed", str(self.seed)),
                    *("--schedule-prefix", self.schedule_prefix, "--storm", storm),
                    *("--max-concurrent-connects", str(self.max_concurrent_connects)),
                    *("--deadline-s", str(self.deadline_s)),
                ],
                name=f"bare clients {index}",
                module="simulator.bench.reconnect",
            )
            self._stack.push_async_callback(child.stop)
            await child.start()
            self.children.append(child)
        for child in self.children:
            await child.wait_event("ready", timeout_s=self.deadline_s)

    async def _collect_wills(self, pub: aiomqtt.Client) -> None:
        async for message in pub.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if will_round(payload) == self._round:
                self._wills += 1
                if self._wills == self.count:
                    self._all_wills.set()

    async def _everyone(self, event: str, round_no: int, what: str) -> list[dict[str, Any]]:
        """Wait until every child has said ``event`` for ``round_no``; their lines."""

        def said(child: LoadChild) -> bool:
            line = child.last(event)
            return line is not None and line.get("round") == round_no

        for child in self.children:
            await child.wait_for(said, timeout_s=self.deadline_s, what=what)
        lines = [child.last(event) for child in self.children]
        return [line for line in lines if line is not None]

    def rss_bytes(self) -> int:
        """The children's resident memory when they last finished a round (0 before any)."""
        lines = [child.last("done") for child in self.children]
        return sum(int(line.get("rss_bytes", 0)) for line in lines if line is not None)

    async def _tell(self, command: dict[str, Any]) -> None:
        for child in self.children:
            await child.send(command)

    async def measure(self, round_no: int) -> BareRound:
        """One bare storm (``round_no`` from 1, as the storms it precedes); raises LoadError
        when a child fails and BenchError when the queue is not ready before the return."""
        pub = self._pub
        assert pub is not None, "use 'async with BareReconnects(...)'"
        await self._tell({"cmd": "arm", "round": round_no})
        await self._everyone("armed", round_no, f"round {round_no}: bare clients connected")
        self._round, self._wills = round_no, 0
        self._all_wills.clear()
        cut_at = time.time() + CUT_LEAD_S
        back = cut_at + self.storm.offline_s
        broker_cpu0 = cpu_seconds(self.broker_pid)
        await self._tell({"cmd": "storm", "round": round_no, "cut_at": cut_at})
        try:
            await asyncio.wait_for(self._all_wills.wait(), self.deadline_s)
        except TimeoutError:
            raise BenchError(
                f"bare round {round_no}: {self._wills}/{self.count} Wills after {self.deadline_s}s"
            ) from None
        wills_at = time.time()
        payload = queued_payload(round_no, self.payload_bytes)
        gate = asyncio.Semaphore(self.inflight)

        async def queue(client_id: str) -> None:
            async with gate:
                await pub.publish(in_topic(client_id), payload, qos=1)

        from simulator.fleet import device_ids

        await asyncio.wait_for(
            asyncio.gather(*(queue(i) for i in device_ids(self.count, CLIENT_PREFIX))),
            self.deadline_s,
        )
        published_at = time.time()
        if published_at >= back:
            raise BenchError(
                f"bare round {round_no}: the messages were queued {published_at - back:.2f}s "
                "after the networks came back; raise --offline-s"
            )
        done = await self._everyone("done", round_no, f"round {round_no}: bare messages received")
        broker_cpu = cpu_seconds(self.broker_pid) - broker_cpu0
        await self._tell({"cmd": "rest", "round": round_no})
        await self._everyone("rested", round_no, f"round {round_no}: bare clients disconnected")
        return BareRound(
            bare_s=max(float(d["t_last_received"]) for d in done) - back,
            connected_s=max(float(d["t_last_connected"]) for d in done) - back,
            received=sum(int(d["received"]) for d in done),
            wills_after_cut_s=wills_at - cut_at,
            published_before_return_s=back - published_at,
            clients_cpu_s=sum(float(d["cpu_s"]) for d in done),
            broker_cpu_s=broker_cpu,
            connect_failures=sum(int(d["connect_failures"]) for d in done),
            links_lost=sum(int(d["links_lost"]) for d in done),
        )


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await task


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.reconnect", description=__doc__.splitlines()[0]
    )
    parser.add_argument("role", choices=("clients",))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True, help="clients in all the children")
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--stop", type=int, required=True)
    parser.add_argument("--prefix", default=CLIENT_PREFIX, help="ids: device_ids(count, prefix)")
    parser.add_argument("--schedule-prefix", default="storm", help="whose storm draws to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storm", required=True, help="the StormSpec, as JSON")
    parser.add_argument("--max-concurrent-connects", type=int, default=64)
    parser.add_argument("--deadline-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    if not 0 <= args.start < args.stop <= args.count or args.deadline_s <= 0:
        parser.error("need 0 <= start < stop <= count and a positive deadline")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, in order
    try:
        return asyncio.run(_serve(args))
    except Exception as exc:  # reported to the parent, which decides
        _emit("error", detail=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
