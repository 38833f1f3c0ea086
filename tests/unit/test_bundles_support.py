"""Helpers for the bundle tests (no tests here): a fleet of real keys, roots and manifests.

``Fleet`` plays the operator: it holds root, release and hub keys and signs
root versions and manifests the way ``keydir`` and ``archive`` do, so each test
can tamper with one thing and check that exactly that is refused.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

from firmware_bundles.keys import SigningKey, sign_document
from firmware_bundles.model import (
    Manifest,
    PayloadInfo,
    RoleInfo,
    RootMetadata,
    RunSpec,
    Targets,
)
from firmware_bundles.trust import TrustedRoot

NOW = 1_750_000_000
DAY = 24 * 3600


def new_keys(count: int) -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(count)]


@dataclass
class Fleet:
    """Keys and thresholds for one fleet; builds and signs its metadata."""

    root_keys: list[SigningKey] = field(default_factory=lambda: new_keys(1))
    release_keys: list[SigningKey] = field(default_factory=lambda: new_keys(1))
    hub_keys: list[SigningKey] = field(default_factory=lambda: new_keys(1))
    root_threshold: int = 1
    release_threshold: int = 1
    hub_threshold: int = 1

    def root(
        self,
        version: int = 1,
        expires: int = NOW + 365 * DAY,
        root_keys: list[SigningKey] | None = None,
        root_threshold: int | None = None,
        release_keys: list[SigningKey] | None = None,
    ) -> RootMetadata:
        root_keys = self.root_keys if root_keys is None else root_keys
        release_keys = self.release_keys if release_keys is None else release_keys
        every = [*root_keys, *release_keys, *self.hub_keys]

        def role(keys: list[SigningKey], threshold: int) -> RoleInfo:
            return RoleInfo(keyids=sorted(key.keyid for key in keys), threshold=threshold)

        return RootMetadata(
            version=version,
            expires=expires,
            keys={key.keyid: key.key_info() for key in every},
            roles={
                "root": role(root_keys, root_threshold or self.root_threshold),
                "release": role(release_keys, self.release_threshold),
                "hub": role(self.hub_keys, self.hub_threshold),
            },
        )

    def signed_root(self, root: RootMetadata, signers: list[SigningKey] | None = None) -> bytes:
        return sign_document(root, self.root_keys if signers is None else signers)

    def trusted(self, **overrides: object) -> TrustedRoot:
        return TrustedRoot.from_bytes(self.signed_root(self.root(**overrides)))  # type: ignore[arg-type]

    def signed_manifest(
        self, manifest: Manifest | None = None, signers: list[SigningKey] | None = None
    ) -> bytes:
        return sign_document(
            manifest or make_manifest(), self.release_keys if signers is None else signers
        )


def make_manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "thermostat",
        "version": "1.4.2",
        "security_version": 3,
        "kind": "app",
        "targets": Targets(architectures=["aarch64"], min_agent_version="0.1.0"),
        "run": RunSpec(command=["bin/thermostat", "--port", "8081"], env={"MODE": "eco"}),
        "payload": PayloadInfo(sha256="ab" * 32, size=1234),
        "created": NOW - DAY,
        "expires": NOW + 30 * DAY,
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def tar_gz(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar.gz holding ``members`` exactly as given (for hostile archives)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=fmt) as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return raw.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    return info
