"""The bundle store end to end: operator CLI keys and bundles, a real ``driftless hub serve``.

The operator makes a root and a release key and builds and signs a bundle with
the ``driftless`` CLI; the hub runs as a child process with ``--trust-root``
(no broker: the link retries in the background, the API does not care). An
HTTP client uploads with a streamed body, then downloads in two ranges as a
device resuming after a disconnect would. Uploads of 20 and 200 MiB show the hub's
peak resident memory barely moves (``VmHWM``, reset before the upload).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.broker import free_port, wait_for_port
from devtools.procs import HubChild
from firmware_bundles import archive
from firmware_bundles.keys import load_private_key, sign_document
from firmware_bundles.model import Manifest, PayloadInfo, RunSpec, Targets

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def driftless(*argv: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "driftless.cli", *map(str, argv)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def big_bundle(out: Path, keyfile: Path, payload_bytes: int) -> None:
    """A signed bundle with a random payload (the hub never unpacks), built in 1 MiB pieces."""
    digest = hashlib.sha256()
    payload = out.with_suffix(".payload")
    with open(payload, "wb") as handle:
        for _ in range(payload_bytes // MiB):
            piece = os.urandom(MiB)
            digest.update(piece)
            handle.write(piece)
    now = int(time.time())
    manifest = Manifest(
        name="big",
        version="1.0.0",
        security_version=1,
        kind="app",
        targets=Targets(architectures=["any"]),
        run=RunSpec(command=["bin/app"]),
        payload=PayloadInfo(sha256=digest.hexdigest(), size=payload_bytes // MiB * MiB),
        created=now - 60,
        expires=now + 86_400,
    )
    envelope = sign_document(manifest, [load_private_key(keyfile)])
    with open(out, "wb") as handle, open(payload, "rb") as source:
        handle.write(struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope)))
        handle.write(envelope)
        while chunk := source.read(MiB):
            handle.write(chunk)
    payload.unlink()


def chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(64 * 1024):
            yield chunk


@pytest.fixture
def operator(tmp_path: Path) -> tuple[Path, Path]:
    """A key directory with a root and a release key: (root.json, release key file)."""
    keys = tmp_path / "keys"
    release = tmp_path / "release.pem"
    driftless("keys", "init-root", "--dir", keys)
    driftless("keys", "add", "--dir", keys, "--role", "release", "--out", release)
    return keys / "root.json", release


@pytest.fixture
def hub(tmp_path: Path, operator: tuple[Path, Path]) -> Iterator[tuple[HubChild, httpx.Client]]:
    child = HubChild(tmp_path / "hub", f"mqtt://127.0.0.1:{free_port()}")
    child.argv += ["--trust-root", str(operator[0])]
    child.start()
    try:
        wait_for_port("127.0.0.1", child.api_port, timeout_s=30)
        with httpx.Client(
            base_url=child.base_url + "/api/v1", headers=child.headers, timeout=60
        ) as client:
            yield child, client
    finally:
        child.terminate()


def test_operator_flow_upload_and_resumed_download(
    tmp_path: Path, operator: tuple[Path, Path], hub: tuple[HubChild, httpx.Client]
) -> None:
    child, client = hub
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "app").write_text("#!/bin/sh\nexec sleep 1000\n")
    (src / "data").write_bytes(os.urandom(500_000))
    bundle = tmp_path / "app.bundle"
    driftless("bundle", "build", src, "--name", "app", "--version", "2.0", "--command", "bin/app",
              "--out", bundle)  # fmt: skip
    unsigned = client.post("/bundles", content=bundle.read_bytes())
    assert unsigned.status_code == 422
    assert "ThresholdNotMetError" in unsigned.json()["detail"]
    driftless("bundle", "sign", bundle, "--key", operator[1])

    response = client.post("/bundles", content=chunks(bundle))  # chunked, streamed
    assert response.status_code == 201, response.text
    sha = response.json()["sha256"]
    assert sha == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert client.post("/bundles", content=chunks(bundle)).status_code == 200
    stored = child.db_path.parent / "bundles" / f"{sha}.bundle"
    assert stored.read_bytes() == bundle.read_bytes()

    first = client.get(f"/bundles/{sha}/file", headers={"Range": "bytes=0-99999"})
    assert first.status_code == 206
    rest = client.get(
        f"/bundles/{sha}/file", headers={"Range": "bytes=100000-", "If-Range": f'"{sha}"'}
    )
    assert rest.status_code == 206
    assert hashlib.sha256(first.content + rest.content).hexdigest() == sha


@pytest.mark.parametrize("size_mib", [20, 200])
def test_upload_keeps_the_hubs_peak_memory_flat(
    tmp_path: Path,
    operator: tuple[Path, Path],
    hub: tuple[HubChild, httpx.Client],
    size_mib: int,
) -> None:
    """Peak RSS growth is the same small figure for 20 and 200 MiB (run with -s to see it)."""
    child, client = hub
    assert child.proc is not None
    bundle = tmp_path / "big.bundle"
    big_bundle(bundle, operator[1], size_mib * MiB)
    assert client.get("/bundles").status_code == 200  # warm: every route imported
    Path(f"/proc/{child.proc.pid}/clear_refs").write_text("5")  # reset VmHWM to VmRSS
    before = status_kib(child.proc.pid, "VmHWM")
    start = time.monotonic()
    response = client.post("/bundles", content=chunks(bundle))
    elapsed = time.monotonic() - start
    assert response.status_code == 201, response.text
    growth_mib = (status_kib(child.proc.pid, "VmHWM") - before) / 1024
    print(f"\n{size_mib} MiB upload: {elapsed:.2f} s, hub peak RSS growth {growth_mib:.1f} MiB")
    assert growth_mib < 16, f"hub peak RSS grew by {growth_mib:.1f} MiB for {size_mib} MiB"
