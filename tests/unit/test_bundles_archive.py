"""The bundle file on disk: built, signed, verified, tampered with, truncated, unpacked."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from firmware_bundles import archive
from firmware_bundles.errors import (
    ExpiredMetadataError,
    FormatError,
    HashMismatchError,
    SizeMismatchError,
    SourceError,
    ThresholdNotMetError,
)
from firmware_bundles.keys import SigningKey
from firmware_bundles.model import Manifest, PayloadInfo, RunSpec
from firmware_bundles.trust import TrustedRoot
from tests.unit.test_bundles_support import DAY, NOW, Fleet

RUN = RunSpec(command=["bin/thermostat"])


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "thermostat").write_bytes(b"#!/bin/sh\nexec sleep 1000\n")
    (src / "bin" / "thermostat").chmod(0o755)
    (src / "share").mkdir()
    (src / "share" / "model.bin").write_bytes(os.urandom(300_000))
    (src / "current").symlink_to("bin/thermostat")
    return src


def build(source: Path, out: Path, **overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "thermostat",
        "version": "1.4.2",
        "security_version": 3,
        "kind": "app",
        "architectures": ["aarch64"],
        "created": NOW - DAY,
        "expires": NOW + 30 * DAY,
        "run": RUN,
    }
    fields.update(overrides)
    return archive.build(source, out=out, **fields)  # type: ignore[arg-type]


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


@pytest.fixture
def trusted(fleet: Fleet) -> TrustedRoot:
    return fleet.trusted()


@pytest.fixture
def signed_bundle(tmp_path: Path, source: Path, fleet: Fleet) -> Path:
    path = tmp_path / "thermostat.bundle"
    build(source, path)
    archive.sign(path, fleet.release_keys[0])
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the happy path and the file layout ------------------------------------------------


def test_built_signed_bundle_verifies(signed_bundle: Path, trusted: TrustedRoot) -> None:
    manifest = archive.verify(signed_bundle, trusted, NOW)
    assert (manifest.name, manifest.version, manifest.security_version) == (
        "thermostat",
        "1.4.2",
        3,
    )


def test_file_layout_is_header_manifest_payload(signed_bundle: Path) -> None:
    data = signed_bundle.read_bytes()
    assert data[:17] == b"DRIFTLESS-BUNDLE\n"
    version, length = struct.unpack(">II", data[17:25])
    info = archive.inspect(signed_bundle)
    assert (version, length, info.payload_offset) == (1, info.manifest_bytes, 25 + length)
    payload = data[25 + length :]
    assert len(payload) == info.manifest.payload.size
    assert hashlib.sha256(payload).hexdigest() == info.manifest.payload.sha256
    assert payload[:2] == b"\x1f\x8b"  # gzip


def test_build_is_reproducible(tmp_path: Path, source: Path) -> None:
    first = build(source, tmp_path / "a.bundle")
    os.utime(source / "share" / "model.bin", (0, 12345))  # times do not enter the payload
    second = build(source, tmp_path / "b.bundle")
    assert first.payload == second.payload


def test_signing_twice_with_one_key_keeps_one_signature(signed_bundle: Path, fleet: Fleet) -> None:
    archive.sign(signed_bundle, fleet.release_keys[0])
    assert archive.inspect(signed_bundle).keyids == [fleet.release_keys[0].keyid]


def test_signing_leaves_no_temporary_files(signed_bundle: Path) -> None:
    assert [p.name for p in signed_bundle.parent.iterdir() if p.name.startswith(".")] == []


def test_verified_bundle_unpacks(tmp_path: Path, signed_bundle: Path, trusted: TrustedRoot) -> None:
    manifest = archive.verify(signed_bundle, trusted, NOW)
    target = tmp_path / "installs" / "thermostat-1.4.2"
    target.parent.mkdir()
    archive.unpack(signed_bundle, manifest, target)
    assert (target / "bin" / "thermostat").read_bytes().startswith(b"#!/bin/sh")
    assert (target / "current").resolve() == (target / "bin" / "thermostat").resolve()


# --- attacks on the file ----------------------------------------------------------------


def test_flipped_byte_in_payload_is_refused(signed_bundle: Path, trusted: TrustedRoot) -> None:
    flip_byte(signed_bundle, signed_bundle.stat().st_size - 100)
    with pytest.raises(HashMismatchError, match="SHA-256"):
        archive.verify(signed_bundle, trusted, NOW)


def test_flipped_byte_in_manifest_is_refused(signed_bundle: Path, trusted: TrustedRoot) -> None:
    data = signed_bundle.read_bytes()
    flip_byte(signed_bundle, data.index(b'"security_version":3') + len('"security_version":'))
    with pytest.raises(ThresholdNotMetError, match="1 invalid"):
        archive.verify(signed_bundle, trusted, NOW)


def test_flipped_byte_in_payload_hash_is_caught_by_the_signature(
    signed_bundle: Path, trusted: TrustedRoot
) -> None:
    # An attacker who swaps the payload must also change the hash: that breaks the signature.
    data = signed_bundle.read_bytes()
    flip_byte(signed_bundle, data.index(b'"sha256":"') + len('"sha256":"'))
    with pytest.raises(ThresholdNotMetError):
        archive.verify(signed_bundle, trusted, NOW)


def test_truncated_payload_is_refused(signed_bundle: Path, trusted: TrustedRoot) -> None:
    os.truncate(signed_bundle, signed_bundle.stat().st_size - 1)
    with pytest.raises(SizeMismatchError, match="truncated"):
        archive.verify(signed_bundle, trusted, NOW)


def test_bytes_appended_after_payload_are_refused(
    signed_bundle: Path, trusted: TrustedRoot
) -> None:
    with open(signed_bundle, "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(SizeMismatchError, match="past its declared size"):
        archive.verify(signed_bundle, trusted, NOW)


def test_unsigned_bundle_is_refused(tmp_path: Path, source: Path, trusted: TrustedRoot) -> None:
    path = tmp_path / "unsigned.bundle"
    build(source, path)
    with pytest.raises(ThresholdNotMetError, match="0 valid"):
        archive.verify(path, trusted, NOW)


def test_bundle_signed_by_an_unauthorised_key_is_refused(
    tmp_path: Path, source: Path, trusted: TrustedRoot
) -> None:
    path = tmp_path / "rogue.bundle"
    build(source, path)
    archive.sign(path, SigningKey.generate())
    with pytest.raises(ThresholdNotMetError, match="not authorised for release"):
        archive.verify(path, trusted, NOW)


def test_expired_bundle_is_refused(
    tmp_path: Path, source: Path, fleet: Fleet, trusted: TrustedRoot
) -> None:
    path = tmp_path / "old.bundle"
    build(source, path, created=NOW - 90 * DAY, expires=NOW - DAY)
    archive.sign(path, fleet.release_keys[0])
    with pytest.raises(ExpiredMetadataError):
        archive.verify(path, trusted, NOW)


def test_payload_is_not_read_when_signatures_fail(signed_bundle: Path, fleet: Fleet) -> None:
    # Verification order: a stranger's root makes the manifest fail before any payload byte.
    stranger = Fleet().trusted()
    os.truncate(signed_bundle, archive.inspect(signed_bundle).payload_offset)
    with pytest.raises(ThresholdNotMetError):
        archive.verify(signed_bundle, stranger, NOW)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        pytest.param(lambda d: b"DRIFTLESS-BUNDLF\n" + d[17:], "bad magic", id="bad-magic"),
        pytest.param(
            lambda d: d[:17] + struct.pack(">I", 2) + d[21:],
            "format version 2",
            id="unknown-format-version",
        ),
        pytest.param(
            lambda d: d[:21] + struct.pack(">I", 2**31) + d[25:],
            "exceeds",
            id="huge-manifest-length",
        ),
        pytest.param(lambda d: d[:20], "truncated in the header", id="truncated-header"),
        pytest.param(lambda d: d[:100], "truncated in the manifest", id="truncated-manifest"),
        pytest.param(lambda d: b"", "truncated in the header", id="empty-file"),
    ],
)
def test_malformed_bundle_headers_are_refused(
    signed_bundle: Path, trusted: TrustedRoot, mutate: object, match: str
) -> None:
    signed_bundle.write_bytes(mutate(signed_bundle.read_bytes()))  # type: ignore[operator]
    with pytest.raises(FormatError, match=match):
        archive.verify(signed_bundle, trusted, NOW)


def test_signing_a_bundle_with_a_swapped_payload_is_refused_and_changes_nothing(
    signed_bundle: Path,
) -> None:
    flip_byte(signed_bundle, signed_bundle.stat().st_size - 1)
    before = signed_bundle.read_bytes()
    with pytest.raises(HashMismatchError):
        archive.sign(signed_bundle, SigningKey.generate())
    assert signed_bundle.read_bytes() == before
    assert [p.name for p in signed_bundle.parent.iterdir() if p.name.startswith(".")] == []


def test_payload_changed_after_verification_installs_nothing(
    tmp_path: Path, signed_bundle: Path, trusted: TrustedRoot
) -> None:
    manifest = archive.verify(signed_bundle, trusted, NOW)
    flip_byte(signed_bundle, signed_bundle.stat().st_size - 100)
    target = tmp_path / "installs" / "thermostat-1.4.2"
    target.parent.mkdir()
    with pytest.raises(HashMismatchError):
        archive.unpack(signed_bundle, manifest, target)
    assert list(target.parent.iterdir()) == []


def test_truncated_payload_after_verification_installs_nothing(
    tmp_path: Path, signed_bundle: Path, trusted: TrustedRoot
) -> None:
    manifest = archive.verify(signed_bundle, trusted, NOW)
    # Cut off only the gzip trailer's last byte: tar content is complete, the hash is not.
    os.truncate(signed_bundle, signed_bundle.stat().st_size - 1)
    target = tmp_path / "installs" / "thermostat-1.4.2"
    target.parent.mkdir()
    with pytest.raises(SizeMismatchError, match="truncated"):
        archive.unpack(signed_bundle, manifest, target)
    assert list(target.parent.iterdir()) == []


# --- the streaming verifier -------------------------------------------------------------


def payload_info(data: bytes) -> PayloadInfo:
    return PayloadInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_streaming_verifier_accepts_any_chunking() -> None:
    data = os.urandom(10_000)
    verifier = archive.PayloadVerifier(payload_info(data))
    for start in range(0, len(data), 777):
        verifier.feed(data[start : start + 777])
    verifier.finish()
    assert verifier.received == len(data) and verifier.remaining == 0


def test_streaming_verifier_refuses_bytes_past_the_declared_size_at_once() -> None:
    data = os.urandom(1000)
    verifier = archive.PayloadVerifier(payload_info(data))
    verifier.feed(data[:600])
    with pytest.raises(SizeMismatchError, match="past its declared size of 1000"):
        verifier.feed(data[600:] + b"!")  # one byte too many, refused before hashing
    assert verifier.received == 600


def test_streaming_verifier_refuses_a_short_payload() -> None:
    data = os.urandom(1000)
    verifier = archive.PayloadVerifier(payload_info(data))
    verifier.feed(data[:999])
    with pytest.raises(SizeMismatchError, match="999 of 1000"):
        verifier.finish()


def test_streaming_verifier_refuses_a_different_payload_of_the_right_size() -> None:
    verifier = archive.PayloadVerifier(payload_info(b"a" * 100))
    verifier.feed(b"b" * 100)
    with pytest.raises(HashMismatchError):
        verifier.finish()
    with pytest.raises(HashMismatchError):  # asking again does not turn it into a pass
        verifier.finish()


# --- building ---------------------------------------------------------------------------


def test_source_symlink_pointing_outside_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "etc").symlink_to("/etc")
    with pytest.raises(SourceError, match="must be relative"):
        build(source, tmp_path / "x.bundle")
    assert not (tmp_path / "x.bundle").exists()


def test_source_fifo_is_refused(tmp_path: Path, source: Path) -> None:
    os.mkfifo(source / "pipe")
    with pytest.raises(SourceError, match="FIFO"):
        build(source, tmp_path / "x.bundle")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param({"name": "Thermostat App"}, "name", id="bad-name"),
        pytest.param({"security_version": -1}, "security_version", id="negative-security"),
        pytest.param({"run": None}, "run specification", id="app-without-run"),
        pytest.param({"expires": NOW - 2 * DAY}, "expires", id="expires-before-created"),
        pytest.param({"architectures": []}, "architectures", id="no-architecture"),
    ],
)
def test_invalid_manifest_fields_are_refused_before_packing(
    tmp_path: Path, source: Path, overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build(source, tmp_path / "x.bundle", **overrides)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_output_inside_the_source_tree_is_refused(source: Path) -> None:
    # The bundle (and its temporary payload) would otherwise pack itself while growing.
    with pytest.raises(ValueError, match="inside the source directory"):
        build(source, source / "share" / "self.bundle")
    assert sorted(p.name for p in (source / "share").iterdir()) == ["model.bin"]


def test_payload_over_the_size_limit_is_refused(tmp_path: Path, source: Path) -> None:
    from firmware_bundles.limits import Limits

    with pytest.raises(SourceError, match="limit"):
        archive.build(
            source,
            out=tmp_path / "x.bundle",
            name="thermostat",
            version="1",
            security_version=0,
            kind="firmware",
            architectures=["aarch64"],
            created=NOW,
            expires=NOW + DAY,
            limits=Limits(max_payload_bytes=1000),
        )
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
