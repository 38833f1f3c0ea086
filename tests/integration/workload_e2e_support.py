"""Helpers for the workload runtime's end-to-end tests (no tests here).

A real agent process on a real Mosquitto (mutual TLS), real signed bundles
whose program is a small Python script, a raw chunk server or the real hub
serving them, and a hub stand-in that records every birth and report through
a persistent MQTT session (so nothing published while it is away, during a
broker outage, is lost to the test).

Rules:
- Processes are counted by the marker the runtime puts in every workload's
  environment (``DRIFTLESS_WORKLOAD``) together with this agent's lock
  directory (``DRIFTLESS_LOCK_DIR``): two agents on one machine never count
  each other's workloads.
- Workloads outlive the agent on purpose; :meth:`Rig.close` kills every
  process group that carries this rig's markers, so a test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_bundles import archive
from firmware_bundles.model import HttpCheck, RunSpec
from protocols import Birth, Channel, Desired, Reported, decode, encode, topic
from protocols.signed import seal
from tests.integration.bundle_support import DAY, Keys, ScriptedChunkServer, now
from tests.pki import TestBroker
from tests.support import AgentProcess, wait_until

# One program for every workload: an HTTP server on argv[1] answering its version,
# pid, start time and configuration, or (without a port) a loop that exits 3 once CRASH_FLAG
# exists. With ``hold`` in its configuration it takes its own update lock at start
# with the documented file API: a temporary in DRIFTLESS_LOCK_DIR renamed over
# <workload>.lock. With ``child`` it leaves a child running in its group.
APP = """\
import http.server, json, os, subprocess, sys, time
started = time.time()
config_path = os.environ.get("DRIFTLESS_CONFIG")
config = json.load(open(config_path)) if config_path else {}
if config.get("hold"):
    directory = os.environ["DRIFTLESS_LOCK_DIR"]
    name = os.environ["DRIFTLESS_WORKLOAD"]
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "." + name + ".lock.tmp")
    with open(tmp, "w") as handle:
        json.dump({"holder": config["hold"], "lease_s": config.get("lease_s", 600)}, handle)
    os.replace(tmp, os.path.join(directory, name + ".lock"))
if config.get("child"):
    subprocess.Popen(["sleep", "300"])
print("up", os.environ["DRIFTLESS_VERSION"], os.getpid(), flush=True)
if len(sys.argv) < 2:
    flag = os.environ.get("CRASH_FLAG", "")
    while True:
        if flag and os.path.exists(flag):
            print("crashing", flush=True)
            sys.exit(3)
        time.sleep(0.05)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": os.environ["DRIFTLESS_VERSION"], "pid": os.getpid(),
                           "config": config, "started": started}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

AGENT_ARGS = ("--restart-floor-s", "0.1", "--health-timeout-s", "20")
"""Short waits for the tests: restarts 0.1 s apart at the least, a rollout's backstop."""


def web_run(port: int, *, min_healthy_ms: int = 300, **extra: Any) -> RunSpec:
    """An HTTP workload on ``port``: healthy once ``/`` answered for ``min_healthy_ms``."""
    return RunSpec(
        command=["bin/app", str(port)],
        checks=[HttpCheck(port=port, path="/", interval_ms=100, timeout_ms=500, failures=2)],
        min_healthy_ms=min_healthy_ms,
        health_deadline_s=8,
        stop_timeout_s=2,
        **extra,
    )


def get(port: int, path: str = "/") -> dict[str, Any]:
    """What the workload on ``port`` says about itself."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        answer: dict[str, Any] = json.loads(conn.getresponse().read())
        return answer
    finally:
        conn.close()


# ---------------------------------------------------------------- processes by marker


def _environ(pid: str) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None  # gone, or not ours
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def tagged(predicate: Callable[[dict[str, str]], bool]) -> dict[int, dict[str, str]]:
    """Live processes (zombies have no environment) whose environment satisfies ``predicate``."""
    found: dict[int, dict[str, str]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        env = _environ(pid)
        if env and predicate(env):
            found[int(pid)] = env
    return found


def kill_groups(pids: Iterable[int]) -> None:
    """SIGKILL each process's group (a workload leads its own session)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class CopyCounter:
    """Samples a workload's copies every few milliseconds in a thread: the most ever seen."""

    def __init__(self, count: Callable[[], int], interval_s: float = 0.02) -> None:
        self._count = count
        self._interval_s = interval_s
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, self._count())
            self.samples += 1
            self._stop.wait(self._interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.most


# ---------------------------------------------------------------- a network partition


class Partition:
    """A TCP relay to the broker that can stop carrying bytes without closing anything.

    That is what a partition looks like from the device: its socket stays open,
    writes still succeed (into the kernel's buffers), nothing comes back, and
    only the MQTT keepalive notices. New connections meanwhile are accepted but
    never reach the broker (their handshake times out). :meth:`heal` drops the
    connections the partition killed and carries new ones again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._mutex = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._mutex:
                self._sockets.append(client)
            if self._cut.is_set():
                continue  # held: no route to the broker
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._mutex:
                self._sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closing.is_set():
                if self._cut.is_set():
                    time.sleep(0.02)  # bytes wait in the kernel's buffers
                    continue
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # closed by heal() (select on fd -1: ValueError)
            pass
        for end in (src, dst):
            with contextlib.suppress(OSError):
                end.close()

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        with self._mutex:
            dead, self._sockets = self._sockets, []
        for sock in dead:
            with contextlib.suppress(OSError):
                sock.close()
        self._cut.clear()

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        self.heal()


# ---------------------------------------------------------------- the hub stand-in


class SessionPeer:
    """Records the device's births and reports through a persistent MQTT 5 session.

    The broker queues what arrives while it is disconnected (a broker stopped
    cleanly saves the session), and it resubscribes at every connect, so the
    recording has everything the device published, possibly twice (QoS 1).
    """

    def __init__(self, broker: TestBroker, device_id: str, *, role: str = "e2e-hub") -> None:
        client_id, context = broker.peer_tls(role)
        self.topics = [topic(device_id, Channel.BIRTH), topic(device_id, Channel.REPORTED)]
        self.messages: list[tuple[str, bytes]] = []
        self._mutex = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(context)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1", broker.port, keepalive=5, clean_start=False, properties=props
        )
        self.client.loop_start()
        assert self._subscribed.wait(10), "the recording peer never subscribed"

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        client.subscribe([(name, 1) for name in self.topics])

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._mutex:
            self.messages.append((message.topic, bytes(message.payload)))

    def births(self) -> list[Birth]:
        with self._mutex:
            return [decode(p, Birth) for t, p in self.messages if t.endswith("/birth")]

    def reports(self) -> list[Reported]:
        with self._mutex:
            return [decode(p, Reported) for t, p in self.messages if t.endswith("/reported")]

    def in_order(self) -> list[Birth | Reported]:
        """Births and reports as they arrived."""
        with self._mutex:
            found: list[Birth | Reported] = []
            for name, payload in self.messages:
                kind = Birth if name.endswith("/birth") else Reported
                found.append(decode(payload, kind))
            return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- one device under test


class Rig:
    """One device: keys, a real agent process, its bundles and a recording hub stand-in.

    Bundles are served by a :class:`ScriptedChunkServer` unless ``chunks`` is False
    (a real hub serves them then); desired documents are signed with the fleet's
    hub key and published retained, as the hub does.
    """

    def __init__(
        self,
        tmp: Path,
        broker: TestBroker,
        device_id: str,
        *,
        chunks: bool = True,
        peer: bool = True,
        agent_args: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.device_id = device_id
        self.keys = Keys(tmp / "keys")
        self.built = 0
        self.server = ScriptedChunkServer(broker, {}) if chunks else None
        self.peer = SessionPeer(broker, device_id) if peer else None
        self.publisher: SessionPeer | None = None
        self.agent = AgentProcess(tmp, device_id, broker, root=self.keys.root_path,
                                  extra=(*AGENT_ARGS, *agent_args))  # fmt: skip
        self.lock_dir = str(self.agent.data_dir / "locks")

    # -- bundles and documents

    def bundle(self, name: str, version: str, run: RunSpec) -> Path:
        """A real signed ``app`` bundle running :data:`APP`, served by the chunk server."""
        self.built += 1
        src = self.tmp / f"src{self.built}"
        (src / "bin").mkdir(parents=True)
        app = src / "bin" / "app"
        app.write_text(f"#!{sys.executable}\n{APP}")
        app.chmod(0o755)
        out = self.tmp / f"{name}-{version}-{self.built}.bundle"
        archive.build(
            src,
            name=name,
            version=version,
            security_version=1,
            kind="app",
            architectures=["any"],
            created=now() - 60,
            expires=now() + DAY,
            out=out,
            run=run,
        )
        for key in self.keys.fleet.release_keys:
            archive.sign(out, key)
        if self.server is not None:
            self.server.files[sha256(out)] = out.read_bytes()
        return out

    def desire(self, generation: int, workloads: list[dict[str, Any]], **extra: Any) -> None:
        """Publish a desired document signed with the hub's key, retained, as the hub does."""
        assert self.server is not None, "a rig without a chunk server gets its documents from a hub"
        config = {"workloads": workloads, **extra}
        document = Desired(
            device_id=self.device_id, generation=generation, config=config, issued_at=time.time()
        )
        sealed = seal(encode(document), self.keys.fleet.hub_keys)
        info = self.server.peer.client.publish(
            topic(self.device_id, Channel.DESIRED), sealed, qos=1, retain=True
        )
        info.wait_for_publish(timeout=5)
        assert info.is_published(), "desired document not acknowledged by the broker"

    # -- what the device says

    def finished(self, generation: int, *, timeout_s: float = 30) -> Reported:
        """The first report that generation ``generation`` ended (applied, failed, rolled back)."""
        assert self.peer is not None
        peer = self.peer
        return wait_until(
            lambda: next(
                (r for r in peer.reports() if r.generation == generation and _outcome(r)), None
            ),
            timeout_s=timeout_s,
            what=f"generation {generation} finished",
        )

    def wait_birth(self, count: int, *, timeout_s: float = 20) -> Birth:
        assert self.peer is not None
        peer = self.peer
        births = wait_until(
            lambda: len(peer.births()) >= count and peer.births(),
            timeout_s=timeout_s,
            what=f"birth number {count}",
        )
        return births[count - 1]

    # -- processes

    def copies(self, workload: str) -> dict[int, dict[str, str]]:
        """This agent's live processes of ``workload``, by the runtime's marker."""
        return tagged(
            lambda env: (
                env.get("DRIFTLESS_WORKLOAD") == workload
                and env.get("DRIFTLESS_LOCK_DIR") == self.lock_dir
            )
        )

    def close(self) -> None:
        self.agent.kill()
        kill_groups(tagged(lambda env: env.get("DRIFTLESS_LOCK_DIR") == self.lock_dir))
        kill_groups(tagged(lambda env: env.get("E2E_RIG") == str(self.tmp)))  # one-shot jobs
        if self.peer is not None:
            self.peer.close()
        if self.server is not None:
            self.server.close()


def _outcome(report: Reported) -> bool:
    """A report of a finished generation. Reports carry the generation the device is at,
    so the first one naming a generation with a final phase is that rollout's own."""
    return report.phase in ("applied", "failed", "rolled_back")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
