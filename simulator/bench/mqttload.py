"""Load clients for the benchmarks, each run as its own child process.

``python -m simulator.bench.mqttload ROLE ...`` where ROLE is:

- ``publish``: a paho-mqtt publisher that sends M valid ``protocols.Reported``
  messages, QoS 1, round-robin over N device ids (``{root}/{id}/reported``),
  each device's ``(boot_epoch, seq)`` increasing. At most ``--inflight``
  messages wait for their PUBACK; ``--rate`` (messages per second, 0 = flat
  out) paces it. Payloads are encoded before the clock starts.
- ``sub-aiomqtt``: a bare aiomqtt subscriber (MQTT 5, the hub's Receive
  Maximum, optionally a ``$share`` group like the hub's) that only counts.
- ``sub-paho``: a minimal paho-mqtt subscriber that only counts (the broker's
  raw rate, for reference).

Each child speaks one JSON object per line on stdout: ``ready`` once it can
work, then ``start``/``done`` (publisher) or ``progress`` lines with the count
and the ``time.monotonic()`` of the last message (subscribers, at most every
``--report-every-s``). ``time.monotonic()`` is CLOCK_MONOTONIC, one clock for
every process on the machine, so the parent can subtract the publisher's start
from a subscriber's last message.

Rules:
- Every child ends by itself: when its work is done (publisher), at its
  ``--deadline-s``, on SIGTERM, or when its stdin closes (the parent died).
- Loopback only: the broker address comes from the parent, which starts its own.
- :class:`LoadChild` is the parent's handle: start, read lines with a deadline,
  stop (SIGTERM, then SIGKILL). Nothing waits without a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REPORT_ROOT = "driftless/v1/devices"  # what the hub subscribes to
BASELINE_ROOT = "bench/ingest/devices"  # same length, so every message has the same size


class LoadError(RuntimeError):
    """A load child failed, exited early or missed a deadline."""


# ---------------------------------------------------------------- pure helpers


def report_payloads(
    device_ids: Sequence[str], *, messages: int, seq_start: int, boot_epoch: int
) -> list[tuple[str, bytes]]:
    """Pure: ``(device_id, payload)`` in publishing order: seq-major, round-robin over devices.

    Message ``i`` goes to ``device_ids[i % N]`` with ``seq = seq_start + i // N``, so
    each device's reports increase and the last one per device has the highest seq.
    """
    from protocols import Reported, encode

    out: list[tuple[str, bytes]] = []
    count = len(device_ids)
    for i in range(messages):
        device_id = device_ids[i % count]
        seq = seq_start + i // count
        report = Reported(
            device_id=device_id,
            boot_epoch=boot_epoch,
            seq=seq,
            phase="applied",
            generation=0,
            applied_generation=0,
            ts=1.8e9 + i,
        )
        out.append((device_id, encode(report)))
    return out


def last_seq(*, messages: int, devices: int, seq_start: int) -> dict[int, int]:
    """Pure: device index -> the seq of its last report (devices that got none are absent)."""
    out: dict[int, int] = {}
    for index in range(min(messages, devices)):
        per_device = (messages - index + devices - 1) // devices
        out[index] = seq_start + per_device - 1
    return out


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _exit_when_stdin_closes() -> None:
    """A daemon thread: when the parent goes away (stdin EOF), leave at once."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # the raw descriptor: no buffered-reader lock at exit
                pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="stdin-watch").start()


# ---------------------------------------------------------------- publisher (paho)


def run_publisher(args: argparse.Namespace) -> int:
    """One thread drives paho (no network thread): publish up to the window, read acks, repeat.

    Without ``loop_start`` paho writes each publish straight to the socket, and
    no GIL hand-over between two threads paces the acknowledgements.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from simulator.fleet import device_ids

    ids = device_ids(args.devices, args.prefix)
    encoded = report_payloads(
        ids, messages=args.messages, seq_start=args.seq_start, boot_epoch=args.boot_epoch
    )
    topics = [f"{args.root}/{device_id}/reported" for device_id, _ in encoded]
    deadline = time.monotonic() + args.deadline_s
    state = {"connected": False, "acked": 0}

    def on_connect(*_a: Any) -> None:
        state["connected"] = True

    def on_publish(*_a: Any) -> None:
        state["acked"] += 1

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{os.getpid()}",
        protocol=mqtt.MQTTv311 if args.v311 else mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(args.inflight)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(args.host, args.port, keepalive=60)
    try:
        while not state["connected"]:
            if time.monotonic() >= deadline:
                _emit("error", detail="publisher: no CONNACK")
                return 1
            client.loop(timeout=0.05)
        _emit("ready", messages=args.messages, payload_bytes=len(encoded[0][1]))
        start = time.monotonic()
        _emit("start", t=start)
        interval = 1.0 / args.rate if args.rate > 0 else 0.0
        total, sent, t_sent = args.messages, 0, start
        while state["acked"] < total:
            now = time.monotonic()
            if now >= deadline:
                _emit(
                    "error", detail=f"publisher: {state['acked']}/{total} acknowledged at deadline"
                )
                return 1
            allowed = total if not interval else min(total, int((now - start) / interval) + 1)
            while sent < allowed and sent - state["acked"] < args.inflight:
                client.publish(topics[sent], encoded[sent][1], qos=1)
                sent += 1
                if sent == total:
                    t_sent = time.monotonic()
            wait_s = 0.05 if sent - state["acked"] >= args.inflight or sent == total else 0.0
            if interval and sent < total and sent - state["acked"] < args.inflight:
                wait_s = max(0.0, min(0.05, start + sent * interval - time.monotonic()))
            client.loop(timeout=wait_s)
        _emit("done", t=time.monotonic(), t_sent=t_sent, published=total)
        return 0
    finally:
        client.disconnect()
        client.loop(timeout=0.1)


# ---------------------------------------------------------------- subscribers


class _Counter:
    """Messages seen and the monotonic time of the last one; shared with a network thread."""

    def __init__(self) -> None:
        self.count = 0
        self.t_last = 0.0
        self.lock = threading.Lock()

    def hit(self) -> None:
        with self.lock:
            self.count += 1
            self.t_last = time.monotonic()

    def read(self) -> tuple[int, float]:
        with self.lock:
            return self.count, self.t_last


def _report_until_done(counter: _Counter, args: argparse.Namespace, stop: threading.Event) -> int:
    """Print progress (when it changed) until ``--expect`` is reached, a stop or the deadline."""
    deadline = time.monotonic() + args.deadline_s
    shown = -1
    while True:
        count, t_last = counter.read()
        if count != shown:
            _emit("progress", count=count, t_last=t_last)
            shown = count
        if args.expect and count >= args.expect:
            return 0
        if stop.is_set():
            return 0
        if time.monotonic() >= deadline:
            _emit("error", detail=f"subscriber: {count} messages at the deadline")
            return 1
        stop.wait(args.report_every_s)


def _subscription(args: argparse.Namespace) -> str:
    plain = f"{args.root}/+/reported"
    return f"$share/{args.share}/{plain}" if args.share else plain


def run_sub_paho(args: argparse.Namespace, stop: threading.Event) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    counter = _Counter()
    subscribed = threading.Event()

    def on_connect(client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(_subscription(args), qos=1)

    def on_subscribe(*_a: Any) -> None:
        subscribed.set()

    def on_message(*_a: Any) -> None:
        counter.hit()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-sub-paho-{os.getpid()}",
        protocol=mqtt.MQTTv5,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.ReceiveMaximum = args.receive_max
    client.connect(args.host, args.port, keepalive=60, properties=properties)
    client.loop_start()
    try:
        if not subscribed.wait(args.deadline_s):
            _emit("error", detail="paho subscriber: no SUBACK")
            return 1
        _emit("ready")
        return _report_until_done(counter, args, stop)
    finally:
        client.disconnect()
        client.loop_stop()


def run_sub_aiomqtt(args: argparse.Namespace, stop: threading.Event) -> int:
    counter = _Counter()

    async def main() -> int:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.ReceiveMaximum = args.receive_max
        client = aiomqtt.Client(
            args.host,
            args.port,
            identifier=f"bench-sub-aiomqtt-{os.getpid()}",
            protocol=aiomqtt.ProtocolVersion.V5,
            properties=properties,
        )
        async with client:
            await client.subscribe(_subscription(args), qos=1)
            _emit("ready")
            loop = asyncio.get_running_loop()
            reporter = loop.run_in_executor(None, _report_until_done, counter, args, stop)
            reader = asyncio.ensure_future(_count(client, counter))
            try:
                code: int = await reporter
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
            return code

    async def _count(client: Any, counter: _Counter) -> None:
        async for _message in client.messages:
            counter.hit()

    return asyncio.run(main())


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.mqttload", description=__doc__.splitlines()[0]
    )
    parser.add_argument("role", choices=("publish", "sub-aiomqtt", "sub-paho"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", default=REPORT_ROOT)
    parser.add_argument("--deadline-s", type=float, default=120.0)
    # publisher
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seq-start", type=int, default=1)
    parser.add_argument("--boot-epoch", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--v311", action="store_true")
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = flat out")
    # subscribers
    parser.add_argument("--share", default="", help="$share group; empty = plain subscription")
    parser.add_argument("--receive-max", type=int, default=1000)
    parser.add_argument("--expect", type=int, default=0, help="stop after this many; 0 = never")
    parser.add_argument("--report-every-s", type=float, default=0.02)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.devices < 1 or args.inflight < 1 or args.deadline_s <= 0:
        parser.error("messages, devices, inflight and deadline-s must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _exit_when_stdin_closes()
    try:
        if args.role == "publish":
            return run_publisher(args)
        if args.role == "sub-paho":
            return run_sub_paho(args, stop)
        return run_sub_aiomqtt(args, stop)
    except Exception as exc:  # reported to the parent, which decides
        _emit("error", detail=f"{type(exc).__name__}: {exc}")
        return 1


# ---------------------------------------------------------------- the parent's handle


class LoadChild:
    """One ``mqttload`` child (or another ``module`` that speaks the same JSON lines):
    start it, read its lines with deadlines, send it commands, stop it."""

    def __init__(
        self,
        role: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        module: str = "simulator.bench.mqttload",
    ) -> None:
        self.role = role
        self.name = name or role
        self.argv = [sys.executable, "-m", module, role, *argv]
        self.lines: list[dict[str, Any]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stderr = b""

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read(), name=f"load:{self.name}")

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))
                self._changed.set()
        if self._proc.stderr is not None:
            self._stderr = await self._proc.stderr.read()
        self._changed.set()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Write one JSON line to the child's stdin; raises LoadError if it is gone."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise LoadError(f"{self.name}: not running")
        try:
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            await proc.stdin.drain()
        except (OSError, RuntimeError) as exc:
            raise LoadError(f"{self.name}: cannot send a command: {exc}") from exc

    def last(self, event: str) -> dict[str, Any] | None:
        """The newest line of kind ``event``, if any."""
        return next((line for line in reversed(self.lines) if line["event"] == event), None)

    async def wait_for(
        self, predicate: Callable[[LoadChild], bool], *, timeout_s: float, what: str
    ) -> None:
        """Wait until ``predicate(self)``; raises LoadError on an error line, exit or deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self):
            error = self.last("error")
            if error is not None:
                raise LoadError(f"{self.name}: {error.get('detail')}")
            if self._reader is not None and self._reader.done():
                code = self._proc.returncode if self._proc else None
                tail = self._stderr.decode(errors="replace")[-1500:]
                raise LoadError(f"{self.name} exited ({code}) before {what}: {tail}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise LoadError(f"{self.name}: timed out after {timeout_s}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def wait_event(self, event: str, *, timeout_s: float) -> dict[str, Any]:
        await self.wait_for(lambda c: c.last(event) is not None, timeout_s=timeout_s, what=event)
        found = self.last(event)
        assert found is not None
        return found

    def progress(self) -> tuple[int, float]:
        """Subscriber: (count, monotonic time of the last message) from the newest line."""
        line = self.last("progress")
        return (0, 0.0) if line is None else (int(line["count"]), float(line["t_last"]))

    async def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout_s``; idempotent; returns the exit status."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), timeout_s)
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._reader, timeout_s)
        if proc.stdin is not None:
            proc.stdin.close()
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
