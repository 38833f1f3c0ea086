"""Private key files: created 0600 and never overwritten, passphrases checked, ids derived."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_bundles.errors import KeyFileError, PassphraseError
from firmware_bundles.keys import SigningKey, load_private_key, write_private_key


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable, to prove we do not rely on it."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_key_id_is_sha256_of_raw_public_key() -> None:
    key = SigningKey.generate()
    assert key.keyid == hashlib.sha256(bytes.fromhex(key.public_hex)).hexdigest()
    assert len(bytes.fromhex(key.public_hex)) == 32


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("passphrase", [None, b"correct horse"], ids=["plain", "encrypted"])
def test_key_file_is_created_mode_0600(tmp_path: Path, passphrase: bytes | None) -> None:
    path = tmp_path / "release.pem"
    write_private_key(path, SigningKey.generate(), passphrase)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    first = SigningKey.generate()
    write_private_key(path, first)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        write_private_key(path, SigningKey.generate())
    assert path.read_bytes() == before


def test_key_file_written_through_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "release.pem").symlink_to(victim)
    with pytest.raises(KeyFileError):
        write_private_key(tmp_path / "release.pem", SigningKey.generate())
    assert victim.read_bytes() == b"keep me"


def test_encrypted_key_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    key = SigningKey.generate()
    write_private_key(path, key, b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    loaded = load_private_key(path, b"correct horse")
    assert loaded.keyid == key.keyid
    assert loaded.sign(b"x") == key.sign(b"x")


def test_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    write_private_key(path, SigningKey.generate(), b"correct horse")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        load_private_key(path, b"battery staple")


def test_encrypted_key_without_passphrase_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    write_private_key(path, SigningKey.generate(), b"correct horse")
    with pytest.raises(PassphraseError, match="no passphrase"):
        load_private_key(path)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    write_private_key(path, SigningKey.generate())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0644"):
        load_private_key(path)


def test_key_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_private_key(path)


def test_key_file_holding_another_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ecdsa.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(KeyFileError, match="not Ed25519"):
        load_private_key(path)


def test_missing_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        load_private_key(tmp_path / "absent.pem")
