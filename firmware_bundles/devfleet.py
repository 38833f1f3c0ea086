"""A throw-away fleet trust directory for demos, tests and benchmarks.

Rule: never for production. All keys sit unencrypted in one directory, and one
root key signs alone; a real fleet keeps its root keys offline
(``driftless keys init-root``, ``docs/bundles.md``). What this makes is the
same on disk as what the CLI makes: ``root.json`` with the roles ``root``,
``release`` and ``hub`` (threshold 1 each, valid for a year) and the
``root.key``, ``release.key`` and ``hub.key`` PEM files (mode 0600) that sign
roots, bundles and desired documents.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from firmware_bundles.keys import (
    SigningKey,
    load_private_key,
    sign_document,
    write_private_key,
)
from firmware_bundles.model import RoleInfo, RootMetadata

YEAR_S = 365 * 24 * 3600


@dataclass
class DevFleet:
    """Keys for each role and the signed root, written under ``directory`` on creation."""

    directory: Path
    root_key: SigningKey = field(default_factory=SigningKey.generate)
    release_key: SigningKey = field(default_factory=SigningKey.generate)
    hub_key: SigningKey = field(default_factory=SigningKey.generate)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = (self.root_key, self.release_key, self.hub_key)
        root = RootMetadata(
            version=1,
            expires=int(time.time()) + YEAR_S,
            keys={key.keyid: key.key_info() for key in keys},
            roles={
                "root": RoleInfo(keyids=[self.root_key.keyid], threshold=1),
                "release": RoleInfo(keyids=[self.release_key.keyid], threshold=1),
                "hub": RoleInfo(keyids=[self.hub_key.keyid], threshold=1),
            },
        )
        self.root_path.write_bytes(sign_document(root, [self.root_key]))
        write_private_key(self.directory / "root.key", self.root_key)
        write_private_key(self.release_key_path, self.release_key)
        write_private_key(self.hub_key_path, self.hub_key)

    @classmethod
    def open_or_create(cls, directory: Path) -> DevFleet:
        """The fleet already in ``directory`` (keys reloaded, root kept), else a new one."""
        if not (directory / "root.json").exists():
            return cls(directory)
        fleet = object.__new__(cls)
        fleet.directory = directory
        fleet.root_key = load_private_key(directory / "root.key")
        fleet.release_key = load_private_key(directory / "release.key")
        fleet.hub_key = load_private_key(directory / "hub.key")
        return fleet

    @property
    def root_path(self) -> Path:
        return self.directory / "root.json"

    @property
    def release_key_path(self) -> Path:
        return self.directory / "release.key"

    @property
    def hub_key_path(self) -> Path:
        return self.directory / "hub.key"
