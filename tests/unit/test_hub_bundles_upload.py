"""POST /bundles: a signed bundle is stored; every bad upload is refused and leaves nothing.

Each refusal test names the attack or accident, checks the status and the one-line
reason, and checks that the bundle directory and the table are empty afterwards.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from firmware_bundles import archive
from firmware_bundles.keys import SigningKey
from hub.bundles.refs import is_sha256
from tests.unit.hub_bundles_support import (
    DAY,
    NOW,
    BundleHub,
    asgi_upload,
    bundle_hub,
    file_chunks,
    flip_byte,
    sha256_of,
    upload,
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[BundleHub, TestClient]]:
    with bundle_hub(tmp_path) as pair:
        yield pair


def assert_nothing_stored(hub: BundleHub, client: TestClient) -> None:
    assert hub.leftovers() == []
    assert client.get("bundles").json()["total"] == 0


# --- accepted ------------------------------------------------------------------------


def test_signed_bundle_is_stored_by_file_sha256(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle(name="thermostat", version="1.4.2", security_version=3)
    response = upload(client, path)
    assert response.status_code == 201, response.text
    body = response.json()
    sha = sha256_of(path)
    info = archive.inspect(path)
    assert body["sha256"] == sha
    assert response.headers["location"] == f"/api/v1/bundles/{sha}"
    assert (body["name"], body["version"], body["security_version"], body["kind"]) == (
        "thermostat",
        "1.4.2",
        3,
        "app",
    )
    assert body["size"] == path.stat().st_size
    assert body["payload_sha256"] == info.manifest.payload.sha256
    assert body["payload_size"] == info.manifest.payload.size
    assert body["payload_offset"] == info.payload_offset
    assert (body["created"], body["expires"]) == (NOW - DAY, NOW + 30 * DAY)
    assert body["signer_keyids"] == [hub.fleet.release_keys[0].keyid]
    assert body["manifest"]["_type"] == "manifest"
    assert body["manifest"]["payload"]["sha256"] == info.manifest.payload.sha256
    assert body["uploaded_at"].startswith("2025-06-15T")  # the hub's clock: NOW
    assert hub.leftovers() == [f"{sha}.bundle"]
    assert (hub.bundles_dir / f"{sha}.bundle").read_bytes() == path.read_bytes()


def test_same_bundle_twice_is_idempotent(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle()
    first = upload(client, path)
    hub.now = NOW + 60
    second = upload(client, path)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()  # the existing record, uploaded_at unchanged
    assert client.get("bundles").json()["total"] == 1
    assert hub.leftovers() == [f"{first.json()['sha256']}.bundle"]


def test_reupload_restores_a_lost_file(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle()
    sha = upload(client, path).json()["sha256"]
    (hub.bundles_dir / f"{sha}.bundle").unlink()
    assert client.get(f"bundles/{sha}/file").status_code == 500
    assert upload(client, path).status_code == 200
    assert client.get(f"bundles/{sha}/file").content == path.read_bytes()


def test_same_payload_signed_again_is_a_second_bundle(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle()
    first = upload(client, path).json()
    second_key = SigningKey.generate()
    hub.fleet.release_keys.append(second_key)
    hub.settings.trust_root_path.write_bytes(  # type: ignore[union-attr]
        hub.fleet.signed_root(hub.fleet.root(version=1))
    )
    archive.sign(path, second_key)  # same manifest and payload, one more signature
    second = upload(client, path)
    assert second.status_code == 201, second.text
    assert second.json()["payload_sha256"] == first["payload_sha256"]
    assert second.json()["sha256"] != first["sha256"]
    assert is_sha256(second.json()["sha256"])


def test_upload_larger_than_the_app_wide_body_limit_is_accepted(
    env: tuple[BundleHub, TestClient],
) -> None:
    hub, client = env
    path = hub.bundle(payload_bytes=3 * 1024 * 1024)  # > max_request_body_bytes (1 MiB)
    assert upload(client, path).status_code == 201


# --- refused: bad data (422), nothing left behind ------------------------------------


def refused(client: TestClient, data: bytes) -> str:
    response = client.post("bundles", content=data)
    assert response.status_code == 422, response.text
    detail: str = response.json()["detail"]
    assert detail.startswith("bundle refused: ")
    assert "\n" not in detail
    return detail


def test_unsigned_bundle_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle(signers=[])
    assert "ThresholdNotMetError: release: 0 valid" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_flipped_payload_byte_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle()
    flip_byte(path, path.stat().st_size - 100)
    assert "HashMismatchError" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_flipped_manifest_byte_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle(version="1.0.0")
    data = path.read_bytes()
    offset = data.index(b'"version":"1.0.0"') + len(b'"version":"1.0.')
    flip_byte(path, offset)  # "1.0.0" -> "1.0.1": still valid JSON, no longer what was signed
    assert b'"version":"1.0.1"' in path.read_bytes()
    assert "ThresholdNotMetError: release: 0 valid" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_signature_by_an_unauthorised_key_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle(signers=[SigningKey.generate()])
    assert "1 by keys not authorised for release" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_signature_by_the_hub_key_is_not_a_release_signature(
    env: tuple[BundleHub, TestClient],
) -> None:
    hub, client = env
    path = hub.bundle(signers=hub.fleet.hub_keys)
    assert "not authorised for release" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_expired_manifest_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    path = hub.bundle(created=NOW - 10 * DAY, expires=NOW - DAY)
    assert "ExpiredMetadataError" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_manifest_expiring_later_is_refused_once_the_clock_passes_it(
    env: tuple[BundleHub, TestClient],
) -> None:
    hub, client = env
    path = hub.bundle(expires=NOW + DAY)
    hub.now = NOW + DAY  # the hub's clock grants no skew by default
    assert "ExpiredMetadataError" in refused(client, path.read_bytes())
    assert_nothing_stored(hub, client)


def test_truncated_bundle_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    data = hub.bundle().read_bytes()
    assert "SizeMismatchError: payload truncated" in refused(client, data[:-1])
    assert_nothing_stored(hub, client)


def test_bundle_cut_inside_its_manifest_is_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    data = hub.bundle().read_bytes()
    assert "FormatError: bundle truncated in the manifest" in refused(client, data[:100])
    assert_nothing_stored(hub, client)


def test_trailing_bytes_are_refused(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    data = hub.bundle().read_bytes()
    assert "SizeMismatchError" in refused(client, data + b"x")
    assert_nothing_stored(hub, client)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 200, id="zip-file"),
        pytest.param(b"DRIFTLESS-BUNDLE\n\x00\x00\x00\x02" + b"\x00" * 8, id="format-version-2"),
    ],
)
def test_not_a_bundle_is_refused(env: tuple[BundleHub, TestClient], data: bytes) -> None:
    hub, client = env
    assert "FormatError" in refused(client, data)
    assert_nothing_stored(hub, client)


# --- refused: limits and configuration ---------------------------------------------------


def test_declared_length_over_the_limit_is_413_before_reading(tmp_path: Path) -> None:
    with bundle_hub(tmp_path, max_bundle_bytes=100_000) as (hub, client):
        response = client.post("bundles", content=b"x" * 100_001)
        assert response.status_code == 413
        assert "100000-byte limit (max_bundle_bytes)" in response.json()["detail"]
        assert_nothing_stored(hub, client)


async def test_streamed_upload_is_413_as_soon_as_it_passes_the_limit(tmp_path: Path) -> None:
    with bundle_hub(tmp_path, max_bundle_bytes=1_000_000) as (hub, client):
        chunks = (b"x" * 65_536 for _ in range(100))  # 6.5 MB offered, no Content-Length
        result = await asgi_upload(hub.app, chunks)
        assert result.status == 413, result.body
        assert result.chunks_read == 16  # 16 * 65,536 > 1,000,000: refused at that chunk
        assert_nothing_stored(hub, client)


async def test_client_disconnecting_mid_upload_leaves_nothing(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        path = hub.bundle(payload_bytes=300_000)
        chunks = list(file_chunks(path, 65_536))[:3]
        result = await asgi_upload(hub.app, chunks, disconnect=True)
        assert result.chunks_read == 3
        assert result.status == 400
        assert_nothing_stored(hub, client)


def test_without_a_fleet_root_uploads_are_503(tmp_path: Path) -> None:
    with bundle_hub(tmp_path, with_root=False) as (hub, client):
        response = upload(client, hub.bundle())
        assert response.status_code == 503
        assert response.json()["detail"].startswith("no fleet root configured")
        assert_nothing_stored(hub, client)


def test_expired_fleet_root_is_503_not_the_bundles_fault(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        hub.settings.trust_root_path.write_bytes(  # type: ignore[union-attr]
            hub.fleet.signed_root(hub.fleet.root(expires=NOW - DAY))
        )
        response = upload(client, hub.bundle())
        assert response.status_code == 503
        assert "expired" in response.json()["detail"]
        assert_nothing_stored(hub, client)


def test_fleet_root_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        new_release = SigningKey.generate()
        path = hub.bundle(signers=[new_release])
        assert upload(client, path).status_code == 422
        hub.fleet.release_keys.append(new_release)  # 'driftless keys add --role release'
        hub.settings.trust_root_path.write_bytes(  # type: ignore[union-attr]
            hub.fleet.signed_root(hub.fleet.root(version=2))
        )
        assert upload(client, path).status_code == 201


def test_corrupt_fleet_root_file_is_503(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        hub.settings.trust_root_path.write_bytes(b"{}")  # type: ignore[union-attr]
        response = upload(client, hub.bundle())
        assert response.status_code == 503
        assert "is invalid: FormatError" in response.json()["detail"]


def test_hub_with_an_unusable_fleet_root_does_not_start(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match="is unreadable"),
        bundle_hub(tmp_path, trust_root_path=tmp_path / "missing.json"),
    ):
        pass


# --- streaming: memory stays flat ----------------------------------------------------


async def test_50_mb_upload_streams_in_constant_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body is never read whole: Request.body() is forbidden, and Python's peak
    allocation while 50 MB pass through the hub stays a few MiB (the write buffer
    is bundle_io_chunk_bytes = 256 KiB, verification reads 1 MiB at a time)."""

    async def forbidden(self: object) -> bytes:
        raise AssertionError("the upload route must not call request.body()")

    monkeypatch.setattr("starlette.requests.Request.body", forbidden)
    with bundle_hub(tmp_path) as (hub, _client):
        path = hub.big_bundle(50 * 1024 * 1024)
        size = path.stat().st_size
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            result = await asgi_upload(hub.app, file_chunks(path), content_length=size)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.status == 201, result.body
        assert peak < 8 * 1024 * 1024, f"peak Python allocation {peak} bytes"
        assert hub.leftovers() == [f"{sha256_of(path)}.bundle"]
