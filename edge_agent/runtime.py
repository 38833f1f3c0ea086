"""Appliers: what "apply a desired document" does on this device.

Rule: an applier is idempotent (applying the same generation twice is harmless)
and atomic (a crash leaves the old or the new result). It raises ApplyError
with a reason the operator can act on; the core turns that into a ``failed`` report.

Today's applier writes the configuration; the workload runtime plugs in here later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import msgspec

from edge_agent.store import atomic_write_bytes
from protocols import Desired


class ApplyError(Exception):
    """The desired state could not be applied on this device."""


class Applier(Protocol):
    def apply(self, desired: Desired) -> None:
        """Make ``desired`` the device's running state; raise ApplyError on failure."""


class ConfigFileApplier:
    """Writes ``config.json`` (generation + configuration) atomically into the data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "config.json"

    def apply(self, desired: Desired) -> None:
        document = {
            "generation": desired.generation,
            "issued_at": desired.issued_at,
            "config": desired.config,
        }
        try:
            atomic_write_bytes(self.path, msgspec.json.format(msgspec.json.encode(document)))
        except OSError as exc:
            raise ApplyError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
