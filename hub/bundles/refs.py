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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

WORKLOADS_KEY: Final = "workloads"
BUNDLE_KEY: Final = "bundle"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
_SHA256 = re.compile(SHA256_PATTERN)


def is_sha256(value: str) -> bool:
    """Pure: whether ``value`` is 64 lowercase hex digits."""
    return _SHA256.fullmatch(value) is not None


def bundle_references(config: Mapping[str, Any]) -> frozenset[str]:
    """Pure: the bundle SHA-256s (lowercased) that ``config`` references."""
    workloads = config.get(WORKLOADS_KEY)
    if not isinstance(workloads, list):
        return frozenset()
    found: set[str] = set()
    for workload in workloads:
        if isinstance(workload, dict):
            bundle = workload.get(BUNDLE_KEY)
            if isinstance(bundle, str):
                found.add(bundle.lower())
    return frozenset(found)


def references(config: Mapping[str, Any], sha256: str) -> bool:
    """Pure: whether ``config`` references the bundle ``sha256``."""
    return sha256.lower() in bundle_references(config)
