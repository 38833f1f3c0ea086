"""Helpers for the bundle-transfer integration tests (no tests here).

Real keys and real signed bundles (``firmware_bundles``), a real hub process
with a fleet root, and a scripted chunk server (a raw MQTT peer) for the bad
inputs a real hub would never serve.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from firmware_bundles import archive
from firmware_bundles.keys import SigningKey, write_private_key
from firmware_bundles.model import AliveCheck, Backoff, HttpCheck, RunSpec
from protocols import (
    BundleRequest,
    Channel,
    ChunkErrorCode,
    decode,
    encode_chunk,
    encode_chunk_error,
    parse_topic,
    topic,
)
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import HubProcess, wait_until
from tests.unit.test_bundles_support import DAY, Fleet

MiB = 1024 * 1024


def now() -> int:
    return int(time.time())


@dataclass
class Keys:
    """A fleet's keys and its root.json on disk, valid for a year from now."""

    directory: Path
    fleet: Fleet = field(default_factory=Fleet)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root_path.write_bytes(
            self.fleet.signed_root(self.fleet.root(expires=now() + 365 * DAY))
        )
        write_private_key(self.hub_key_path, self.fleet.hub_keys[0])

    @property
    def root_path(self) -> Path:
        return self.directory / "root.json"

    @property
    def hub_key_path(self) -> Path:
        """The hub role's key: the hub signs desired documents with it."""
        return self.directory / "hub.key"


def build_bundle(
    out: Path,
    keys: Keys,
    *,
    name: str = "thermo",
    version: str = "1.0.0",
    security_version: int = 1,
    payload_bytes: int = 200_000,
    created: int | None = None,
    expires: int | None = None,
    signers: list[SigningKey] | None = None,
) -> Path:
    """A real, signed bundle whose payload holds ``payload_bytes`` of random data."""
    src = out.with_suffix(".src")
    (src / "bin").mkdir(parents=True)
    app = src / "bin" / "app"
    # A workload the supervising agent can run: says who it is, then stays up.
    app.write_text(f"#!/bin/sh\necho {name} {version}\nexec sleep 3600\n")
    app.chmod(0o755)
    with open(src / "data.bin", "wb") as handle:
        left = payload_bytes
        while left:
            piece = os.urandom(min(left, MiB))
            handle.write(piece)
            left -= len(piece)
    archive.build(
        src,
        name=name,
        version=version,
        security_version=security_version,
        kind="app",
        architectures=["any"],
        created=created if created is not None else now() - 60,
        expires=expires if expires is not None else now() + 30 * DAY,
        out=out,
        run=RunSpec(command=["bin/app"], checks=[AliveCheck(for_ms=100)], min_healthy_ms=100),
    )
    for key in keys.fleet.release_keys if signers is None else signers:
        archive.sign(out, key)
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def head_end(path: Path) -> int:
    """Where the payload starts: header plus signed manifest."""
    return archive.inspect(path).payload_offset


def upload(hub: HubProcess, path: Path) -> str:
    response = hub.api.post(
        "/bundles",
        content=path.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    sha: str = response.json()["sha256"]
    return sha


def register(hub: HubProcess, device_id: str) -> None:
    hub.api.post("/devices", json={"id": device_id}).raise_for_status()


def set_workloads(hub: HubProcess, device_id: str, **slots: str) -> int:
    config = {"workloads": [{"name": name, "bundle": sha} for name, sha in slots.items()]}
    response = hub.api.put(f"/devices/{device_id}/desired", json={"config": config})
    response.raise_for_status()
    generation: int = response.json()["desired_generation"]
    return generation


def wait_phase(
    hub: HubProcess, device_id: str, generation: int, *, timeout_s: float = 60
) -> dict[str, Any]:
    """Wait until the device reported ``generation`` applied or failed; returns its status."""

    def done() -> dict[str, Any] | None:
        status: dict[str, Any] = hub.device(device_id)["status"]
        if status.get("generation") == generation and status.get("phase") in ("applied", "failed"):
            return status
        return None

    return wait_until(
        done, timeout_s=timeout_s, what=f"{device_id} finished generation {generation}"
    )


def bundle_stats(hub: HubProcess) -> dict[str, Any]:
    stats: dict[str, Any] = hub.stats()["bundles"]
    return stats


def hub_with_root(workdir: Path, broker: TestBroker, keys: Keys) -> HubProcess:
    """A hub that accepts the fleet's bundles and signs desired documents with its hub key."""
    hub = HubProcess(workdir, broker)
    hub.argv += ["--trust-root", str(keys.root_path), "--signing-key", str(keys.hub_key_path)]
    hub.start()
    wait_until(lambda: bundle_stats(hub)["mqtt_connected"], what="hub chunk server connected")
    return hub


def hub_file(hub: HubProcess, sha: str) -> Path:
    return hub.db_path.parent / "bundles" / f"{sha}.bundle"


Answer = Callable[[BundleRequest, bytes], list[bytes]]


def exact_answer(request: BundleRequest, data: bytes) -> list[bytes]:
    if request.offset >= len(data):
        return [
            encode_chunk_error(
                request.bundle, request.offset, request.length, ChunkErrorCode.BAD_RANGE, "end"
            )
        ]
    piece = data[request.offset : request.offset + request.length]
    return [encode_chunk(request.bundle, request.offset, piece)]


class ScriptedChunkServer:
    """A raw MQTT peer that answers bundle requests from files, through ``answer``.

    It records every request; ``answer`` may return frames at the wrong offset,
    nothing, or anything else a broken or hostile hub might send.
    """

    def __init__(
        self, broker: TestBroker, files: dict[str, bytes], answer: Answer = exact_answer
    ) -> None:
        self.files = files
        self.answer = answer
        self.requests: list[BundleRequest] = []
        self._lock = threading.Lock()
        self.peer = RawPeer(broker, role="scripted-chunk-server")
        self.peer.client.on_message = self._on_message
        self.peer.subscribe("driftless/v1/devices/+/bundle_req")

    def _on_message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device_id, channel = parse_topic(message.topic)
        assert channel is Channel.BUNDLE_REQ
        request = decode(bytes(message.payload), BundleRequest)
        with self._lock:
            self.requests.append(request)
        data = self.files.get(request.bundle)
        if data is None:
            frames = [
                encode_chunk_error(
                    request.bundle, request.offset, request.length,
                    ChunkErrorCode.UNKNOWN_BUNDLE, "not here",
                )
            ]  # fmt: skip
        else:
            frames = self.answer(request, data)
        for frame in frames:
            client.publish(topic(device_id, Channel.BUNDLE_DATA), frame, qos=1)

    def seen(self) -> list[BundleRequest]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self.peer.close()


def web_bundle(
    directory: Path,
    keys: Keys,
    version: str,
    *,
    min_healthy_ms: int = 300,
    health_deadline_s: float = 1,
    restart_delay_ms: int = 1000,
) -> Path:
    """A real signed ``web`` bundle whose manifest asks for an HTTP health check (the
    simulated fleets' supervised workload)."""
    src = directory / f"web-{version}.src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "web").write_text(f"#!/bin/sh\necho web {version}\n")
    out = directory / f"web-{version}.bundle"
    archive.build(
        src,
        name="web",
        version=version,
        security_version=1,
        kind="app",
        architectures=["any"],
        created=now() - 60,
        expires=now() + 30 * DAY,
        out=out,
        run=RunSpec(
            command=["bin/web"],
            checks=[HttpCheck(port=8080, path="/health", interval_ms=100, failures=1)],
            min_healthy_ms=min_healthy_ms,
            health_deadline_s=health_deadline_s,
            backoff=Backoff(delay_ms=restart_delay_ms),
        ),
    )
    for key in keys.fleet.release_keys:
        archive.sign(out, key)
    return out
