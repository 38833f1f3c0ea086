"""Helpers for the hub bundle-store tests (no tests here).

``BundleHub`` is a hub app on a fresh SQLite file and bundle directory, with a
fleet root on disk, a clock fixed at ``NOW``, and a factory for real bundles
(built and signed with ``firmware_bundles``). ``asgi_upload`` drives the app
directly with a body fed chunk by chunk, for the tests that must see exactly
how much of a body the hub reads (the test client buffers request bodies).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from devtools.broker import free_port
from firmware_bundles import archive
from firmware_bundles.keys import SigningKey, sign_document
from firmware_bundles.model import Manifest, PayloadInfo, RunSpec, Targets
from hub.app import create_app
from hub.auth.models import Role
from hub.settings import HubSettings
from tests.unit.auth_support import api_client, bearer, mint
from tests.unit.test_bundles_support import DAY, NOW, Fleet

__all__ = [
    "DAY",
    "NOW",
    "AsgiResult",
    "BundleHub",
    "asgi_upload",
    "bundle_hub",
    "file_chunks",
    "flip_byte",
    "sha256_of",
    "upload",
]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@dataclass
class BundleHub:
    """A hub app with a fleet root, a fixed clock and a bundle factory."""

    tmp_path: Path
    settings: HubSettings
    fleet: Fleet
    now: float = NOW
    _built: int = field(default=0)
    app: FastAPI = field(init=False)

    @property
    def bundles_dir(self) -> Path:
        return self.settings.bundle_directory()

    def clock(self) -> datetime:
        return datetime.fromtimestamp(self.now, UTC)

    def bundle(
        self,
        *,
        name: str = "thermostat",
        version: str = "1.0.0",
        security_version: int = 1,
        created: int = NOW - DAY,
        expires: int = NOW + 30 * DAY,
        signers: list[SigningKey] | None = None,
        payload_bytes: int = 20_000,
    ) -> Path:
        """A real bundle file, signed by the fleet's release keys unless ``signers`` says."""
        self._built += 1
        src = self.tmp_path / f"src-{self._built}"
        (src / "bin").mkdir(parents=True)
        (src / "bin" / "app").write_bytes(b"#!/bin/sh\nexec sleep 1000\n")
        (src / "data.bin").write_bytes(os.urandom(payload_bytes))
        out = self.tmp_path / "out" / f"{name}-{version}-{self._built}.bundle"
        out.parent.mkdir(exist_ok=True)
        archive.build(
            src,
            name=name,
            version=version,
            security_version=security_version,
            kind="app",
            architectures=["any"],
            created=created,
            expires=expires,
            out=out,
            run=RunSpec(command=["bin/app"]),
        )
        for key in self.fleet.release_keys if signers is None else signers:
            archive.sign(out, key)
        return out

    def big_bundle(self, payload_bytes: int) -> Path:
        """A signed bundle with ``payload_bytes`` of random payload, written in 1 MiB pieces.

        The payload is not a tar.gz (the hub never unpacks); nothing is held in memory.
        """
        self._built += 1
        payload = self.tmp_path / f"payload-{self._built}"
        digest = hashlib.sha256()
        with open(payload, "wb") as handle:
            left = payload_bytes
            while left:
                piece = os.urandom(min(left, 1 << 20))
                digest.update(piece)
                handle.write(piece)
                left -= len(piece)
        manifest = Manifest(
            name="big",
            version="1.0.0",
            security_version=1,
            kind="app",
            targets=Targets(architectures=["any"]),
            run=RunSpec(command=["bin/app"]),
            payload=PayloadInfo(sha256=digest.hexdigest(), size=payload_bytes),
            created=NOW - DAY,
            expires=NOW + 30 * DAY,
        )
        envelope = sign_document(manifest, self.fleet.release_keys)
        out = self.tmp_path / "out" / f"big-{self._built}.bundle"
        out.parent.mkdir(exist_ok=True)
        with open(out, "wb") as handle, open(payload, "rb") as source:
            handle.write(
                struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope))
            )
            handle.write(envelope)
            while chunk := source.read(1 << 20):
                handle.write(chunk)
        payload.unlink()
        return out

    def leftovers(self) -> list[str]:
        """Every name in the bundle directory (stored bundles and temporary files alike)."""
        return sorted(p.name for p in self.bundles_dir.iterdir())


@contextmanager
def bundle_hub(
    tmp_path: Path, *, with_root: bool = True, **overrides: Any
) -> Iterator[tuple[BundleHub, TestClient]]:
    """A ``BundleHub`` and a test client on ``/api/v1/``; the app is disposed of afterwards."""
    fleet = Fleet()
    root_path = tmp_path / "fleet" / "root.json"
    root_path.parent.mkdir()
    root_path.write_bytes(fleet.signed_root(fleet.root()))
    fields: dict[str, Any] = {
        "broker_url": f"mqtt://127.0.0.1:{free_port()}",
        "db_url": f"sqlite:///{tmp_path / 'db' / 'hub.db'}",
        "trust_root_path": root_path if with_root else None,
        "max_bundle_bytes": 64 * 1024 * 1024,
        "bundle_io_chunk_bytes": 256 * 1024,
        "page_size_default": 20,
        "page_size_max": 50,
    }
    fields.update(overrides)
    settings = HubSettings(**fields)
    hub = BundleHub(tmp_path=tmp_path, settings=settings, fleet=fleet)
    hub.app = create_app(settings, clock=hub.clock)
    with api_client(hub.app) as client:
        yield hub, client


def upload(client: TestClient, path: Path) -> httpx.Response:
    response: httpx.Response = client.post(
        "bundles",
        content=path.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    return response


@dataclass
class AsgiResult:
    status: int
    headers: dict[str, str]
    body: bytes
    chunks_read: int


async def asgi_upload(
    app: FastAPI,
    chunks: Iterable[bytes],
    *,
    content_length: int | None = None,
    disconnect: bool = False,
    on_chunk: Callable[[int], None] | None = None,
) -> AsgiResult:
    """POST /api/v1/bundles straight into the ASGI app, one body message per chunk.

    With ``disconnect`` the client goes away after the last chunk instead of
    finishing the body. ``chunks_read`` counts the chunks the app asked for.
    """
    iterator = iter(chunks)
    state = {"read": 0, "done": False}
    token = mint(app, Role.operator, f"asgi-upload-{secrets.token_hex(4)}")
    headers = [
        (b"host", b"hub"),
        (b"content-type", b"application/octet-stream"),
        (b"authorization", bearer(token)["Authorization"].encode()),
    ]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    else:
        headers.append((b"transfer-encoding", b"chunked"))
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/bundles",
        "raw_path": b"/api/v1/bundles",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("hub", 80),
        "state": {},
    }

    async def receive() -> dict[str, Any]:
        if state["done"]:
            return {"type": "http.disconnect"}
        try:
            chunk = next(iterator)
        except StopIteration:
            state["done"] = True
            if disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        state["read"] += 1
        if on_chunk is not None:
            on_chunk(state["read"])
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return AsgiResult(
        status=start["status"],
        headers={k.decode(): v.decode() for k, v in start["headers"]},
        body=body,
        chunks_read=int(state["read"]),
    )


def file_chunks(path: Path, size: int = 64 * 1024) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk
