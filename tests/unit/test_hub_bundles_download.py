"""GET /bundles/{sha256}/file: whole, by byte range, and resumed from a partial file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.unit.hub_bundles_support import bundle_hub, upload


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[TestClient, str, bytes]]:
    """A client, the SHA-256 of one stored bundle, and the bundle's bytes."""
    with bundle_hub(tmp_path) as (hub, client):
        path = hub.bundle(payload_bytes=200_000)
        response = upload(client, path)
        assert response.status_code == 201
        yield client, response.json()["sha256"], path.read_bytes()


def test_whole_file(stored: tuple[TestClient, str, bytes]) -> None:
    client, sha, data = stored
    response = client.get(f"bundles/{sha}/file")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["etag"] == f'"{sha}"'
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-type"] == "application/octet-stream"
    assert "thermostat-1.0.0.bundle" in response.headers["content-disposition"]
    assert hashlib.sha256(response.content).hexdigest() == sha


def test_download_needs_no_token_but_the_bundle_record_does(
    stored: tuple[TestClient, str, bytes],
) -> None:
    """Agents fetch with no API token (docs/security.md, "Open routes")."""
    client, sha, data = stored
    client.headers.pop("Authorization")
    assert client.get(f"bundles/{sha}/file", headers={"Range": "bytes=0-24"}).content == data[:25]
    assert client.head(f"bundles/{sha}/file").status_code == 200
    assert client.get(f"bundles/{sha}").status_code == 401
    assert client.delete(f"bundles/{sha}").status_code == 401


def test_head_gives_size_and_etag_without_body(stored: tuple[TestClient, str, bytes]) -> None:
    client, sha, data = stored
    response = client.head(f"bundles/{sha}/file")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["etag"] == f'"{sha}"'


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        pytest.param("bytes=0-99", 0, 99, id="first-100"),
        pytest.param("bytes=100-", 100, None, id="from-100"),
        pytest.param("bytes=-25", -25, None, id="last-25"),
        pytest.param("bytes=5-5", 5, 5, id="one-byte"),
        pytest.param("bytes=10-999999999", 10, None, id="end-past-eof"),
    ],
)
def test_single_range(
    stored: tuple[TestClient, str, bytes], header: str, start: int, end: int | None
) -> None:
    client, sha, data = stored
    first = start % len(data)
    last = len(data) - 1 if end is None else end
    response = client.get(f"bundles/{sha}/file", headers={"Range": header})
    assert response.status_code == 206
    assert response.content == data[first : last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
    assert response.headers["content-length"] == str(last - first + 1)
    assert response.headers["etag"] == f'"{sha}"'


@pytest.mark.parametrize(
    "header",
    [pytest.param("bytes={size}-", id="at-eof"), pytest.param("bytes={big}-", id="past-eof")],
)
def test_unsatisfiable_range_is_416(stored: tuple[TestClient, str, bytes], header: str) -> None:
    client, sha, data = stored
    value = header.format(size=len(data), big=len(data) + 1000)
    response = client.get(f"bundles/{sha}/file", headers={"Range": value})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(data)}"


def test_resume_from_a_partial_file_reconstructs_it_exactly(
    stored: tuple[TestClient, str, bytes], tmp_path: Path
) -> None:
    """What a device does after a disconnect: keep what it has, ask for the rest."""
    client, sha, data = stored
    partial = tmp_path / "download.part"
    partial.write_bytes(data[:77_777])  # the connection dropped here
    have = partial.stat().st_size
    response = client.get(
        f"bundles/{sha}/file", headers={"Range": f"bytes={have}-", "If-Range": f'"{sha}"'}
    )
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {have}-{len(data) - 1}/{len(data)}"
    with open(partial, "ab") as handle:
        handle.write(response.content)
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == sha


def test_if_range_with_another_etag_sends_the_whole_file(
    stored: tuple[TestClient, str, bytes],
) -> None:
    client, sha, data = stored
    response = client.get(
        f"bundles/{sha}/file", headers={"Range": "bytes=100-", "If-Range": '"' + "0" * 64 + '"'}
    )
    assert response.status_code == 200
    assert response.content == data
