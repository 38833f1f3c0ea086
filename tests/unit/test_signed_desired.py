"""Signed desired documents: the hub's seal, the agent core's check (invariant 9).

Each bad case is named: unsigned, a flipped byte, a key outside the hub role,
a threshold not met (one signature, or one key signing twice), a signature
moved to another device, an expired root, a malformed envelope, a member
written twice (two ``signed`` parts: which one is "the signed bytes"?), oversized.
"""

from __future__ import annotations

import json

import pytest

from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Connected,
    Connecting,
    DesiredPayload,
    Ignored,
    Rejected,
    Subscribed,
    Switch,
)
from firmware_bundles.keys import SigningKey
from hub.signing import DocumentSigner
from protocols import MAX_PAYLOAD_BYTES, Desired, ProtocolError, Reason, encode
from protocols.signed import is_sealed, open_sealed, seal
from tests.unit.test_bundles_support import DAY, NOW, Fleet, new_keys

FLEET = Fleet()


def message(generation: int = 1, device: str = "d1", **config: object) -> bytes:
    doc = Desired(device_id=device, generation=generation, config=dict(config), issued_at=1.5)
    return encode(doc)


def core_with(fleet: Fleet | None, **root: object) -> AgentCore:
    trusted = fleet.trusted(**root) if fleet is not None else None
    core = AgentCore("d1", AgentState(), "test", trusted_root=trusted, clock_skew_s=0)
    for event in (Booted(NOW), Connecting(NOW), Connected(NOW, False), Subscribed(NOW)):
        core.handle(event)
    return core


def feed(core: AgentCore, payload: bytes) -> list[object]:
    return list(core.handle(DesiredPayload(payload, float(NOW))))


def rejected(actions: list[object]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Rejected)]


def applied(actions: list[object]) -> list[int]:
    return [a.desired.generation for a in actions if isinstance(a, Switch)]


def test_a_sealed_document_opens_to_exactly_the_bytes_the_hub_signed() -> None:
    raw = message(threshold=0.75)  # fractions: the signed bytes are never re-encoded
    sealed = seal(raw, FLEET.hub_keys)
    assert is_sealed(sealed) and not is_sealed(raw)
    assert open_sealed(sealed, FLEET.trusted(), now=NOW, clock_skew_s=0) == raw


def test_a_device_with_a_root_applies_a_hub_signed_document() -> None:
    core = core_with(FLEET)
    actions = feed(core, seal(message(1, x=1.5), FLEET.hub_keys))
    assert applied(actions) == [1] and not rejected(actions)


def _flip_config_byte(sealed: bytes) -> bytes:
    at = sealed.index(b'"x":1') + 4
    return sealed[:at] + b"2" + sealed[at + 1 :]


def _outsider(raw: bytes) -> bytes:
    return seal(raw, FLEET.release_keys)  # authorised, but for bundles, not desired state


def _twice(raw: bytes) -> bytes:
    # Two signatures by the same key (encode_envelope would dedupe: build it by hand).
    key = TWO_OF_THREE.hub_keys[0]
    one = json.loads(seal(raw, [key]))["signatures"][0]
    return b'{"signatures":' + json.dumps([one, one]).encode() + b',"signed":' + raw + b"}"


TWO_OF_THREE = Fleet(hub_keys=new_keys(3), hub_threshold=2)


def _signatures(raw: bytes) -> bytes:
    return json.dumps(json.loads(seal(raw, FLEET.hub_keys))["signatures"]).encode()


def _signed_twice(raw: bytes, *, forged_first: bool) -> bytes:
    """A valid envelope for ``raw`` with a second, unsigned ``signed`` member (generation 9)."""
    forged = message(9, x=666)
    first, second = (forged, raw) if forged_first else (raw, forged)
    signatures = _signatures(raw)
    return b'{"signatures":' + signatures + b',"signed":' + first + b',"signed":' + second + b"}"


def _member_twice_inside(raw: bytes) -> bytes:
    """Signed by the hub key, but the signed message names two generations."""
    return seal(raw[:-1] + b',"generation":9}', FLEET.hub_keys)


def _signatures_twice(raw: bytes) -> bytes:
    sealed = seal(raw, FLEET.hub_keys)
    return b'{"signatures":[],' + sealed[1:]


@pytest.mark.parametrize(
    ("fleet", "make", "reason"),
    [
        pytest.param(FLEET, lambda raw: raw, "unsigned", id="unsigned"),
        pytest.param(
            FLEET,
            lambda raw: _flip_config_byte(seal(raw, FLEET.hub_keys)),
            "bad_signature",
            id="flipped-byte",
        ),
        pytest.param(FLEET, _outsider, "bad_signature", id="key-outside-the-hub-role"),
        pytest.param(
            FLEET,
            lambda raw: seal(raw, [SigningKey.generate()]),
            "bad_signature",
            id="unknown-key",
        ),
        pytest.param(
            TWO_OF_THREE,
            lambda raw: seal(raw, TWO_OF_THREE.hub_keys[:1]),
            "bad_signature",
            id="one-of-two-required",
        ),
        pytest.param(TWO_OF_THREE, _twice, "bad_signature", id="one-key-signing-twice"),
        pytest.param(
            FLEET,
            lambda raw: b'{"signatures":"no","signed":' + raw + b"}",
            "malformed",
            id="malformed-envelope",
        ),
        pytest.param(
            FLEET,
            lambda raw: _signed_twice(raw, forged_first=False),
            "malformed",
            id="signed-twice-forged-last",
        ),
        pytest.param(
            FLEET,
            lambda raw: _signed_twice(raw, forged_first=True),
            "malformed",
            id="signed-twice-forged-first",
        ),
        pytest.param(FLEET, _signatures_twice, "malformed", id="signatures-twice"),
        pytest.param(FLEET, _member_twice_inside, "malformed", id="member-twice-inside-signed"),
        pytest.param(FLEET, lambda raw: b"not json at all", "unsigned", id="not-json"),
        pytest.param(FLEET, lambda raw: b"[1, 2]", "unsigned", id="json-but-not-an-object"),
    ],
)
def test_a_document_that_does_not_verify_is_rejected_and_changes_nothing(
    fleet: Fleet, make: object, reason: str
) -> None:
    core = core_with(fleet)
    before = core.state
    actions = feed(core, make(message(1, x=1)))  # type: ignore[operator]
    assert rejected(actions) == [reason]
    assert not applied(actions) and core.state == before and core.waiting is None


def test_two_of_three_hub_keys_meet_the_threshold() -> None:
    core = core_with(TWO_OF_THREE)
    assert applied(feed(core, seal(message(1), TWO_OF_THREE.hub_keys[1:]))) == [1]


def test_a_signature_moved_to_another_devices_topic_is_refused() -> None:
    """The device id is inside the signed bytes: a valid document for d2 is not d1's."""
    core = core_with(FLEET)
    actions = feed(core, seal(message(1, device="d2"), FLEET.hub_keys))
    assert rejected(actions) == [Reason.DEVICE_MISMATCH.value] and not applied(actions)


def test_an_expired_root_verifies_nothing() -> None:
    core = core_with(FLEET, expires=NOW - DAY)
    actions = feed(core, seal(message(1), FLEET.hub_keys))
    assert rejected(actions) == ["expired"] and not applied(actions)


def test_a_replayed_older_signed_document_is_ignored() -> None:
    core = core_with(FLEET)
    feed(core, seal(message(2), FLEET.hub_keys))
    actions = feed(core, seal(message(1), FLEET.hub_keys))
    assert not applied(actions) and not rejected(actions)
    assert any(isinstance(a, Ignored) for a in actions)


def test_an_oversized_payload_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ProtocolError) as caught:
        open_sealed(b"{" * (MAX_PAYLOAD_BYTES + 1), FLEET.trusted(), now=NOW, clock_skew_s=0)
    assert caught.value.reason is Reason.OVERSIZED


def test_without_a_root_both_forms_are_taken_unverified() -> None:
    """``--insecure-unsigned``: what an agent without the fleet's root does."""
    core = core_with(None)
    assert applied(feed(core, message(1))) == [1]
    core = core_with(None)
    assert applied(feed(core, seal(message(1), [SigningKey.generate()]))) == [1]


# ---------------------------------------------------------------- the hub's signer


def test_the_signer_refuses_keys_the_root_does_not_authorise_for_hub() -> None:
    root = FLEET.root()
    DocumentSigner(FLEET.hub_keys).check_against(root)  # the right key passes
    with pytest.raises(ValueError, match="meet 0 of the root's hub threshold 1"):
        DocumentSigner(FLEET.release_keys).check_against(root)
    with pytest.raises(ValueError, match="meet 1 of the root's hub threshold 2"):
        DocumentSigner(TWO_OF_THREE.hub_keys[:1]).check_against(TWO_OF_THREE.root())
    with pytest.raises(ValueError, match="twice"):
        DocumentSigner([FLEET.hub_keys[0], FLEET.hub_keys[0]])


def test_a_sealed_document_too_large_for_one_message_is_refused() -> None:
    big = message(1, blob="x" * (MAX_PAYLOAD_BYTES - 200))
    with pytest.raises(ProtocolError) as caught:
        seal(big, FLEET.hub_keys)
    assert caught.value.reason is Reason.OVERSIZED
