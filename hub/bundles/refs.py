"""How a desired config references bundles. Pure: no I/O.

The convention (``docs/bundles.md``, "Referencing bundles from desired state")::

    {"workloads": [{"name": "thermostat", "bundle": "<sha256 of the bundle file>", ...}, ...]}

Rules:
- Only ``config["workloads"][i]["bundle"]`` is a reference; the same hex
  string anywhere else in the config is not.
- A reference is the lowercase hex SHA-256 of the whole bundle file, the key
  of the hub's store. Comparison lowercases, so a mistyped upper-case
  reference still protects its bundle from deletion.
- Anything not shaped that way (no ``workloads``, not a list, an entry that is
  not an object, a ``bundle`` that is not a string) references nothing: the
  config is otherwise free-form JSON.
- The rule itself lives in :mod:`protocols.bundles`, because the agent decides
  what to fetch (and what its cache may evict) by the very same rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocols.bundles import (
    BUNDLE_KEY,
    SHA256_PATTERN,
    WORKLOADS_KEY,
    bundle_references,
    is_sha256,
)

__all__ = [
    "BUNDLE_KEY",
    "SHA256_PATTERN",
    "WORKLOADS_KEY",
    "bundle_references",
    "is_sha256",
    "references",
]


def references(config: Mapping[str, Any], sha256: str) -> bool:
    """Pure: whether ``config`` references the bundle ``sha256``."""
    return sha256.lower() in bundle_references(config)
