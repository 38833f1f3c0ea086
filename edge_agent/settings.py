"""The agent's settings: frozen objects, limits with their unit in the name.

Rules:
- Built once by whoever starts the agent (``driftless agent run``) and passed
  down; nothing here reads the environment or the disk.
- Light to import (no cryptography): an agent that never sees a bundle does not
  pay for the verification stack.
- Construction validates: a non-positive limit, a chunk that would not fit a
  frame or a keepalive outside its range raises ValueError at start-up, not in
  the middle of a transfer or at the first connect.
- :class:`MqttSettings` holds the connection timings ``docs/protocol.md``
  ("Liveness and timing") states; the transport and the driver read them here.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from firmware_bundles.limits import DEFAULT_LIMITS
from protocols.bundles import DEFAULT_CHUNK_BYTES, DEFAULT_WINDOW_CHUNKS, MAX_CHUNK_BYTES

MiB = 1024 * 1024


def default_architecture() -> str:
    """This machine's architecture as manifests spell it (``x86_64``, ``aarch64`` …)."""
    return platform.machine().lower().replace("-", "_") or "unknown"


KEEPALIVE_MIN_S = 5
KEEPALIVE_MAX_S = 3600
HEARTBEAT_MIN_S = 1.0  # the protocol's bounds on Birth.heartbeat_s
HEARTBEAT_MAX_S = 86400.0


@dataclass(frozen=True)
class MqttSettings:
    """How the agent holds its broker connection.

    ``keepalive_s`` is the MQTT keepalive sent in CONNECT: the broker closes a
    silent connection, and publishes the device's Last Will, after 1.5 times it;
    the agent pings after ``keepalive_s`` without traffic and gives up on the
    connection after as long again without an answer. Below a cellular
    network's NAT idle timeout it keeps the mapping open; shorter also means a
    dead device shows offline sooner, for more pings.
    """

    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    """MQTT 5 Session Expiry Interval: how long the broker queues for an absent device."""
    connect_timeout_s: float = 5.0
    """TCP connect plus TLS handshake of one attempt."""
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0
    """Reconnect backoff: doubles from ``reconnect_min_s`` to this cap, with equal jitter."""
    heartbeat_s: float = 30.0
    """A state report this often while connected (the hub's liveness and soak evidence);
    announced in the birth. Within ``HEARTBEAT_MIN_S``..``HEARTBEAT_MAX_S``."""

    def __post_init__(self) -> None:
        keepalive = self.keepalive_s
        if (
            isinstance(keepalive, bool)
            or not isinstance(keepalive, int)
            or not KEEPALIVE_MIN_S <= keepalive <= KEEPALIVE_MAX_S
        ):
            raise ValueError(
                f"keepalive must be a whole number of seconds within "
                f"{KEEPALIVE_MIN_S}..{KEEPALIVE_MAX_S}, got {keepalive!r}"
            )
        for name in ("session_expiry_s", "connect_timeout_s", "reconnect_min_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        heartbeat = self.heartbeat_s
        if isinstance(heartbeat, bool) or not HEARTBEAT_MIN_S <= heartbeat <= HEARTBEAT_MAX_S:
            raise ValueError(
                f"heartbeat_s must be within {HEARTBEAT_MIN_S:g}..{HEARTBEAT_MAX_S:g} s, "
                f"got {heartbeat!r}"
            )


@dataclass(frozen=True)
class FetchConfig:
    """How one transfer (:class:`edge_agent.bundle_transfer.BundleFetch`) asks for bytes."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window_chunks: int = DEFAULT_WINDOW_CHUNKS
    request_timeout_s: float = 10.0
    request_timeout_max_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be within 1..{MAX_CHUNK_BYTES}")
        if self.window_chunks < 1:
            raise ValueError("window_chunks must be at least 1")
        if not 0 < self.request_timeout_s <= self.request_timeout_max_s:
            raise ValueError("need 0 < request_timeout_s <= request_timeout_max_s")


@dataclass(frozen=True)
class BundleSettings:
    """Where bundles come from, what the device trusts, and how much it keeps."""

    root_path: Path | None = None
    """The fleet's root.json; None: a desired state that references bundles fails."""
    hub_url: str | None = None
    """``http(s)://HOST:PORT`` of the hub; set: bundles come by HTTP range requests."""
    cache_max_bytes: int = 2048 * MiB
    """Budget for cached bundle files and partial downloads together."""
    max_bundle_bytes: int = 1024 * MiB
    """Largest bundle file this device downloads."""
    mqtt: FetchConfig = field(default_factory=FetchConfig)
    """Chunk size, window and timeouts of MQTT transfers."""
    http: FetchConfig = field(
        default_factory=lambda: FetchConfig(chunk_bytes=MAX_CHUNK_BYTES, window_chunks=2)
    )
    """Range size and requests queued of HTTP transfers (sent one at a time)."""
    http_timeout_s: float = 30.0
    """Socket timeout of one HTTP range request."""
    clock_skew_s: int = DEFAULT_LIMITS.default_clock_skew_s
    """Allowance for this device's clock running ahead when checking expiry: metadata is
    taken until its ``expires`` plus this many seconds, by the device's clock."""
    architecture: str = field(default_factory=default_architecture)
    frame_queue_max: int = 64
    """Chunk frames waiting for the fetch thread; more are dropped (and asked for again)."""

    def __post_init__(self) -> None:
        for name in ("cache_max_bytes", "max_bundle_bytes", "http_timeout_s", "frame_queue_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.clock_skew_s <= DEFAULT_LIMITS.max_clock_skew_s:
            raise ValueError(f"clock_skew_s must be within 0..{DEFAULT_LIMITS.max_clock_skew_s}")
        if self.frame_queue_max < 2 * self.mqtt.window_chunks:
            raise ValueError("frame_queue_max must hold at least two windows of chunks")
        if self.hub_url is not None and not self.hub_url.startswith(("http://", "https://")):
            raise ValueError(f"hub URL {self.hub_url!r} must start with http:// or https://")


@dataclass(frozen=True)
class SupervisorSettings:
    """How the agent supervises workloads (``docs/runtime.md``); times in seconds.

    The manifest and the desired entry say what each workload wants; these are
    the device's bounds around every step.
    """

    enabled: bool = True
    """Run workloads under the supervisor (False: install and switch only, as before)."""
    restart_floor_s: float = 1.0
    """No restart comes sooner than this after an exit, whatever the backoff says."""
    health_timeout_s: float = 300.0
    """The rollout's own deadline for every started workload to be healthy (a backstop
    behind each workload's ``health_deadline_s``)."""
    step_timeout_s: float = 120.0
    """Longest wait inside one step: the previous versions healthy again after a rollback."""
    lock_wait_max_s: float = 3600.0
    """Longest a stop or switch waits for an update lock (a lease ends sooner)."""
    lock_poll_s: float = 1.0
    log_rotate_s: float = 10.0
    """How often logs over their bound are rotated."""
    log_tail_lines: int = 10
    log_tail_bytes: int = 1024
    """The log tail a rollback report carries, per workload."""

    def __post_init__(self) -> None:
        for name in (
            "restart_floor_s",
            "health_timeout_s",
            "step_timeout_s",
            "lock_wait_max_s",
            "lock_poll_s",
            "log_rotate_s",
            "log_tail_lines",
            "log_tail_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
