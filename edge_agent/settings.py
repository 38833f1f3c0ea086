"""The agent's bundle settings: one frozen object, limits with their unit in the name.

Rules:
- Built once by whoever starts the agent (``driftless agent run``) and passed
  down; nothing here reads the environment or the disk.
- Light to import (no cryptography): an agent that never sees a bundle does not
  pay for the verification stack.
- Construction validates: a non-positive limit or a chunk that would not fit a
  frame raises ValueError at start-up, not in the middle of a transfer.
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


@dataclass(frozen=True)
class FetchConfig:
    """How one transfer (:class:`edge_agent.fetch.BundleFetch`) asks for bytes."""

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
