"""Attacks on the trust logic: forged, thin, stale, replayed and rolled-back metadata."""

from __future__ import annotations

import msgspec
import pytest

from firmware_bundles import canonical
from firmware_bundles.errors import (
    BadSignatureError,
    BadVersionNumberError,
    ExpiredMetadataError,
    FormatError,
    RollbackError,
    ThresholdNotMetError,
)
from firmware_bundles.keys import SigningKey, add_signatures, sign_document
from firmware_bundles.limits import Limits
from firmware_bundles.model import PayloadInfo, Signature, encode_envelope
from firmware_bundles.trust import (
    TrustedRoot,
    check_rollback,
    verify_document,
    verify_manifest,
    verify_role,
)
from tests.unit.test_bundles_support import DAY, NOW, Fleet, make_manifest, new_keys

# --- manifests: signatures --------------------------------------------------------------


def test_manifest_signed_by_a_release_key_verifies() -> None:
    fleet = Fleet()
    manifest = verify_manifest(fleet.signed_manifest(), fleet.trusted(), NOW)
    assert manifest == make_manifest()


def test_flipped_byte_in_signed_manifest_is_refused() -> None:
    fleet = Fleet()
    data = bytearray(fleet.signed_manifest())
    at = data.index(b'"thermostat"') + 1
    data[at] ^= 0x01  # "thermostat" -> "uhermostat": still valid JSON, different bytes
    with pytest.raises(ThresholdNotMetError, match="1 invalid"):
        verify_manifest(bytes(data), fleet.trusted(), NOW)


def test_manifest_signed_by_an_unknown_key_is_refused() -> None:
    fleet = Fleet()
    stranger = SigningKey.generate()
    with pytest.raises(ThresholdNotMetError, match="not authorised for release"):
        verify_manifest(fleet.signed_manifest(signers=[stranger]), fleet.trusted(), NOW)


def test_manifest_signed_by_a_hub_key_is_refused() -> None:
    fleet = Fleet()
    with pytest.raises(ThresholdNotMetError, match="not authorised for release"):
        verify_manifest(fleet.signed_manifest(signers=fleet.hub_keys), fleet.trusted(), NOW)


def test_manifest_signed_by_a_root_key_is_refused() -> None:
    fleet = Fleet()
    with pytest.raises(ThresholdNotMetError):
        verify_manifest(fleet.signed_manifest(signers=fleet.root_keys), fleet.trusted(), NOW)


def test_unsigned_manifest_is_refused() -> None:
    fleet = Fleet()
    with pytest.raises(ThresholdNotMetError, match="0 valid"):
        verify_manifest(fleet.signed_manifest(signers=[]), fleet.trusted(), NOW)


def test_two_of_three_with_one_signature_is_refused() -> None:
    fleet = Fleet(release_keys=new_keys(3), release_threshold=2)
    signed = fleet.signed_manifest(signers=fleet.release_keys[:1])
    with pytest.raises(ThresholdNotMetError, match=r"1 valid signature.*2 required"):
        verify_manifest(signed, fleet.trusted(), NOW)


def test_two_of_three_with_two_signatures_verifies() -> None:
    fleet = Fleet(release_keys=new_keys(3), release_threshold=2)
    signed = fleet.signed_manifest(signers=fleet.release_keys[1:])
    assert verify_manifest(signed, fleet.trusted(), NOW).name == "thermostat"


def test_one_key_signing_twice_counts_once() -> None:
    fleet = Fleet(release_keys=new_keys(3), release_threshold=2)
    signed_bytes = canonical.encode(make_manifest())
    twice = fleet.release_keys[0].sign(signed_bytes)
    # encode_envelope keeps one signature per key id, so splice the duplicate in by hand.
    envelope = msgspec.json.encode(
        {"signatures": [twice, twice], "signed": msgspec.Raw(signed_bytes)}
    )
    with pytest.raises(ThresholdNotMetError, match="1 repeated"):
        verify_manifest(envelope, fleet.trusted(), NOW)


def test_invalid_signature_does_not_count() -> None:
    fleet = Fleet(release_keys=new_keys(2), release_threshold=2)
    signed_bytes = canonical.encode(make_manifest())
    good = fleet.release_keys[0].sign(signed_bytes)
    forged = Signature(keyid=fleet.release_keys[1].keyid, sig="00" * 64)
    envelope = encode_envelope(signed_bytes, [good, forged])
    with pytest.raises(ThresholdNotMetError, match="1 invalid"):
        verify_manifest(envelope, fleet.trusted(), NOW)


def test_signature_over_other_bytes_does_not_count() -> None:
    fleet = Fleet()
    key = fleet.release_keys[0]
    signed_bytes = canonical.encode(make_manifest())
    replayed = key.sign(canonical.encode(make_manifest(version="1.0.0")))
    with pytest.raises(ThresholdNotMetError):
        verify_manifest(encode_envelope(signed_bytes, [replayed]), fleet.trusted(), NOW)


def test_signature_errors_share_one_catchable_base() -> None:
    assert issubclass(ThresholdNotMetError, BadSignatureError)


def test_verify_role_stops_counting_at_the_threshold() -> None:
    fleet = Fleet(release_keys=new_keys(3), release_threshold=2)
    signed_bytes = canonical.encode(make_manifest())
    signatures = [key.sign(signed_bytes) for key in fleet.release_keys]
    valid = verify_role(signed_bytes, signatures, fleet.root(), "release")
    assert len(valid) == 2


# --- manifests: format ------------------------------------------------------------------


def test_signed_but_non_canonical_manifest_is_refused() -> None:
    fleet = Fleet()
    pretty = msgspec.json.format(canonical.encode(make_manifest()), indent=2)
    signature = fleet.release_keys[0].sign(pretty)
    envelope = msgspec.json.encode({"signatures": [signature], "signed": msgspec.Raw(pretty)})
    with pytest.raises(FormatError, match="canonical"):
        verify_manifest(envelope, fleet.trusted(), NOW)


def test_signed_manifest_with_a_float_time_is_refused() -> None:
    fleet = Fleet()
    tree = canonical.check(canonical.encode(make_manifest()))
    signed_bytes = canonical.encode(tree).replace(
        f'"expires":{tree["expires"]}'.encode(), f'"expires":{tree["expires"]}.5'.encode()
    )
    envelope = encode_envelope(signed_bytes, [fleet.release_keys[0].sign(signed_bytes)])
    with pytest.raises(FormatError, match="not an integer"):
        verify_manifest(envelope, fleet.trusted(), NOW)


def test_root_metadata_passed_off_as_a_manifest_is_refused() -> None:
    # A key trusted for both root and release signs a root; it must not pass as a manifest.
    shared = SigningKey.generate()
    fleet = Fleet(root_keys=[shared], release_keys=[shared])
    with pytest.raises(FormatError, match="_type"):
        verify_manifest(fleet.signed_root(fleet.root()), fleet.trusted(), NOW)


def test_oversized_envelope_is_refused_before_parsing() -> None:
    fleet = Fleet()
    with pytest.raises(FormatError, match="exceeds"):
        verify_manifest(b"{" + b" " * 70_000 + b"}", fleet.trusted(), NOW, limits=Limits())


def test_envelope_with_too_many_signatures_is_refused() -> None:
    fleet = Fleet()
    signed_bytes = canonical.encode(make_manifest())
    signature = fleet.release_keys[0].sign(signed_bytes)
    envelope = msgspec.json.encode(
        {"signatures": [signature] * 33, "signed": msgspec.Raw(signed_bytes)}
    )
    with pytest.raises(FormatError, match="33 signatures"):
        verify_manifest(envelope, fleet.trusted(), NOW)


def test_manifest_declaring_a_payload_over_the_device_limit_is_refused() -> None:
    fleet = Fleet()
    huge = make_manifest(payload=PayloadInfo(sha256="ab" * 32, size=5 * 2**30))
    with pytest.raises(FormatError, match="over the 1048576-byte limit"):
        verify_manifest(
            fleet.signed_manifest(huge),
            fleet.trusted(),
            NOW,
            limits=Limits(max_payload_bytes=2**20),
        )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"signatures":[]}', id="no-signed-part"),
        pytest.param(b'{"signatures":[],"signed":[1]}', id="signed-part-not-object"),
        pytest.param(b'{"signatures":[{"keyid":"x","sig":"y"}],"signed":{}}', id="bad-hex"),
        pytest.param(b'{"signatures":[],"signed":{},"signed":{}}', id="signed-twice"),
        pytest.param(b'{"signatures":[],"signatures":[],"signed":{}}', id="signatures-twice"),
    ],
)
def test_malformed_envelopes_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        verify_manifest(data, Fleet().trusted(), NOW)


# --- expiry -----------------------------------------------------------------------------


def test_expired_manifest_is_refused() -> None:
    fleet = Fleet()
    signed = fleet.signed_manifest(make_manifest(expires=NOW - 3600))
    with pytest.raises(ExpiredMetadataError, match=r"manifest thermostat 1\.4\.2 expired"):
        verify_manifest(signed, fleet.trusted(), NOW, clock_skew_s=300)


def test_manifest_expiring_exactly_now_is_expired() -> None:
    fleet = Fleet()
    signed = fleet.signed_manifest(make_manifest(expires=NOW))
    with pytest.raises(ExpiredMetadataError):
        verify_manifest(signed, fleet.trusted(), NOW, clock_skew_s=0)


def test_manifest_just_expired_is_accepted_within_the_clock_skew_allowance() -> None:
    fleet = Fleet()
    signed = fleet.signed_manifest(make_manifest(expires=NOW - 200))
    assert verify_manifest(signed, fleet.trusted(), NOW, clock_skew_s=300).name == "thermostat"


def test_manifest_expired_past_the_clock_skew_allowance_is_refused() -> None:
    fleet = Fleet()
    signed = fleet.signed_manifest(make_manifest(expires=NOW - 301))
    with pytest.raises(ExpiredMetadataError):
        verify_manifest(signed, fleet.trusted(), NOW, clock_skew_s=300)


@pytest.mark.parametrize("skew", [-1, 24 * 3600 + 1], ids=["negative", "past-the-bound"])
def test_clock_skew_allowance_is_bounded(skew: int) -> None:
    fleet = Fleet()
    with pytest.raises(ValueError, match="clock skew"):
        verify_manifest(fleet.signed_manifest(), fleet.trusted(), NOW, clock_skew_s=skew)


def test_manifest_checked_against_an_expired_root_is_refused() -> None:
    fleet = Fleet()
    trusted = fleet.trusted(expires=NOW - DAY)
    with pytest.raises(ExpiredMetadataError, match="root version 1 expired"):
        verify_manifest(fleet.signed_manifest(), trusted, NOW)


# --- root: provisioning and rotation ----------------------------------------------------


def test_provisioned_root_without_its_own_threshold_is_refused() -> None:
    fleet = Fleet(root_keys=new_keys(3), root_threshold=2)
    with pytest.raises(ThresholdNotMetError, match="root"):
        TrustedRoot.from_bytes(fleet.signed_root(fleet.root(), fleet.root_keys[:1]))


def test_root_update_to_the_next_version_is_accepted() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    new = fleet.signed_root(fleet.root(version=2))
    trusted.update(new, NOW)
    assert trusted.version == 2
    assert trusted.envelope == new


def test_root_rotation_signed_by_old_and_new_thresholds_is_accepted() -> None:
    fleet = Fleet(root_keys=new_keys(3), root_threshold=2)
    trusted = fleet.trusted()
    successors = new_keys(3)
    rotated = fleet.root(version=2, root_keys=successors, root_threshold=2)
    trusted.update(fleet.signed_root(rotated, [*fleet.root_keys[:2], *successors[:2]]), NOW)
    assert set(trusted.root.roles["root"].keyids) == {key.keyid for key in successors}


def test_root_rotation_not_signed_by_the_old_threshold_is_refused() -> None:
    fleet = Fleet(root_keys=new_keys(3), root_threshold=2)
    trusted = fleet.trusted()
    attacker_keys = new_keys(2)
    rotated = fleet.root(version=2, root_keys=attacker_keys, root_threshold=2)
    # One stolen old key plus the attacker's own: the new root vouches for itself only.
    signed = fleet.signed_root(rotated, [fleet.root_keys[0], *attacker_keys])
    with pytest.raises(ThresholdNotMetError, match="trusted root keys"):
        trusted.update(signed, NOW)
    assert trusted.version == 1


def test_root_rotation_not_signed_by_the_new_threshold_is_refused() -> None:
    fleet = Fleet(root_keys=new_keys(2), root_threshold=2)
    trusted = fleet.trusted()
    successors = new_keys(2)
    rotated = fleet.root(version=2, root_keys=successors, root_threshold=2)
    signed = fleet.signed_root(rotated, [*fleet.root_keys, successors[0]])
    with pytest.raises(ThresholdNotMetError, match="its own root keys"):
        trusted.update(signed, NOW)
    assert trusted.version == 1


def test_root_version_skipping_is_refused() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    with pytest.raises(BadVersionNumberError, match="root version 3 is not the successor"):
        trusted.update(fleet.signed_root(fleet.root(version=3)), NOW)
    assert trusted.version == 1


@pytest.mark.parametrize("version", [1, 2], ids=["replay-same", "rollback-older"])
def test_root_version_replay_is_refused(version: int) -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    trusted.update(fleet.signed_root(fleet.root(version=2)), NOW)
    trusted.update(fleet.signed_root(fleet.root(version=3)), NOW)
    with pytest.raises(RollbackError):
        trusted.update(fleet.signed_root(fleet.root(version=version)), NOW)
    assert trusted.version == 3


def test_expired_new_root_is_refused() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    with pytest.raises(ExpiredMetadataError, match="root version 2 expired"):
        trusted.update(fleet.signed_root(fleet.root(version=2, expires=NOW - DAY)), NOW)
    assert trusted.version == 1


def test_root_chain_tolerates_an_expired_intermediate_root() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    chain = [
        fleet.signed_root(fleet.root(version=2, expires=NOW - 30 * DAY)),
        fleet.signed_root(fleet.root(version=3)),
    ]
    trusted.update_chain(chain, NOW)
    assert trusted.version == 3


def test_root_chain_with_a_bad_link_changes_nothing() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    stranger = new_keys(1)
    chain = [
        fleet.signed_root(fleet.root(version=2)),
        fleet.signed_root(fleet.root(version=3), stranger),
    ]
    with pytest.raises(ThresholdNotMetError):
        trusted.update_chain(chain, NOW)
    assert trusted.version == 1


def test_rotated_out_root_keys_can_no_longer_sign_a_root() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    old_keys = fleet.root_keys
    successors = new_keys(1)
    rotated = fleet.root(version=2, root_keys=successors)
    trusted.update(fleet.signed_root(rotated, [*old_keys, *successors]), NOW)
    forged = fleet.root(version=3, root_keys=old_keys)
    with pytest.raises(ThresholdNotMetError):
        trusted.update(fleet.signed_root(forged, old_keys), NOW)


def test_release_key_removed_by_a_new_root_can_no_longer_sign() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    compromised = fleet.release_keys
    replacement = new_keys(1)
    trusted.update(fleet.signed_root(fleet.root(version=2, release_keys=replacement)), NOW)
    with pytest.raises(ThresholdNotMetError):
        verify_manifest(fleet.signed_manifest(signers=compromised), trusted, NOW)
    assert verify_manifest(fleet.signed_manifest(signers=replacement), trusted, NOW)


def test_new_root_threshold_above_its_key_count_is_refused() -> None:
    fleet = Fleet()
    trusted = fleet.trusted()
    tree = canonical.check(canonical.encode(fleet.root(version=2)))
    tree["roles"]["root"]["threshold"] = 2  # one key: a root no one could ever rotate again
    signed_bytes = canonical.encode(tree)
    envelope = encode_envelope(signed_bytes, [fleet.root_keys[0].sign(signed_bytes)])
    with pytest.raises(FormatError, match="threshold 2 exceeds"):
        trusted.update(envelope, NOW)


# --- rollback ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "refused"),
    [
        pytest.param({}, False, id="never-installed"),
        pytest.param({"other-app": 9}, False, id="other-name-higher"),
        pytest.param({"thermostat": 2}, False, id="upgrade"),
        pytest.param({"thermostat": 3}, False, id="equal-security-version"),
        pytest.param({"thermostat": 4}, True, id="rollback-lower-security-version"),
    ],
)
def test_security_version_rollback(installed: dict[str, int], refused: bool) -> None:
    manifest = make_manifest(security_version=3)
    if refused:
        with pytest.raises(RollbackError, match="security version 3, lower than installed 4"):
            check_rollback(manifest, installed)
    else:
        check_rollback(manifest, installed)


# --- hub documents ----------------------------------------------------------------------


def test_hub_document_verifies_and_returns_the_signed_bytes() -> None:
    fleet = Fleet()
    document = {"device_id": "dev-1", "generation": 7, "config": {"interval_s": 5}}
    verified = verify_document(sign_document(document, fleet.hub_keys), fleet.trusted(), now=NOW)
    assert msgspec.json.decode(verified.signed_bytes) == document
    assert verified.keyids == {fleet.hub_keys[0].keyid}


def test_document_signed_by_a_release_key_is_not_a_hub_document() -> None:
    fleet = Fleet()
    signed = sign_document({"generation": 7}, fleet.release_keys)
    with pytest.raises(ThresholdNotMetError, match="not authorised for hub"):
        verify_document(signed, fleet.trusted(), now=NOW)


def test_hub_document_against_an_expired_root_is_refused() -> None:
    fleet = Fleet()
    signed = sign_document({"generation": 7}, fleet.hub_keys)
    with pytest.raises(ExpiredMetadataError):
        verify_document(signed, fleet.trusted(expires=NOW - DAY), now=NOW)


def test_add_signatures_reaches_a_threshold_in_two_steps() -> None:
    fleet = Fleet(hub_keys=new_keys(2), hub_threshold=2)
    once = sign_document({"generation": 1}, fleet.hub_keys[:1])
    with pytest.raises(ThresholdNotMetError):
        verify_document(once, fleet.trusted(), now=NOW)
    twice = add_signatures(once, fleet.hub_keys[1:])
    assert verify_document(twice, fleet.trusted(), now=NOW).keyids == {
        key.keyid for key in fleet.hub_keys
    }
