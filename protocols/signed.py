"""Signed desired-state documents: the hub seals them, the device opens them.

Rules (the normative text is ``docs/protocol.md``, "Signed desired documents"):
- A payload on a device's ``desired`` topic is either a bare ``Desired``
  message (unsigned: a hub started without a signing key) or the envelope
  ``{"signatures":[{"keyid":…,"sig":…}],"signed":<the Desired message>}``, the
  same envelope as bundle metadata (``docs/bundles.md``).
- Signatures are Ed25519 by keys of the fleet root's ``hub`` role, over the
  *exact bytes* of the ``signed`` member, and a threshold of distinct
  authorised keys must verify (:func:`firmware_bundles.trust.verify_signed_bytes`).
  The bytes are never re-encoded, so no canonical form is needed and configs
  may hold fractions.
- An envelope holds ``signatures`` and ``signed`` once each, and no object in
  it (the signed message included) holds a member twice
  (:func:`firmware_bundles.model.decode_envelope`): otherwise ``malformed``.
- The signed bytes are the whole message, ``kind`` and ``device_id`` included:
  a signature cannot be moved to another device's topic (the agent checks the
  id after opening) nor read as another kind of document.
- With a trusted root, only an envelope that verifies is opened; an unsigned
  payload is ``unsigned``, a failed threshold ``bad_signature``, an expired
  root ``expired``. Without one (an agent started with ``--insecure-unsigned``,
  a simulator without ``--root``) both forms are taken unverified.
- Replay of an older signed document is harmless: the agent applies only a
  generation newer than any it applied (architecture rule 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from protocols.codec import MAX_PAYLOAD_BYTES
from protocols.errors import ProtocolError, Reason

if TYPE_CHECKING:
    from firmware_bundles.keys import SigningKey
    from firmware_bundles.trust import TrustedRoot


class _Probe(msgspec.Struct):
    signatures: object = None
    signed: msgspec.Raw = msgspec.Raw(b"")


_probe = msgspec.json.Decoder(_Probe)


def seal(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """Pure: ``message`` (an encoded ``Desired``) in an envelope signed by each of ``keys``.

    Raises ProtocolError(OVERSIZED) when the envelope would not fit one message.
    """
    from firmware_bundles.keys import sign_bytes

    sealed = sign_bytes(message, keys)
    if len(sealed) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            Reason.OVERSIZED,
            f"signed document of {len(sealed)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit",
        )
    return sealed


def _envelope(payload: bytes) -> _Probe | None:
    """The envelope's parts, or None when ``payload`` is not an envelope."""
    try:
        probe = _probe.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return probe if probe.signatures is not None else None


def is_sealed(payload: bytes) -> bool:
    """Pure: whether ``payload`` is an envelope (it has ``signatures``), not a bare message."""
    return _envelope(payload) is not None


def open_sealed(
    payload: bytes, trusted_root: TrustedRoot | None, *, now: float, clock_skew_s: int
) -> bytes:
    """Pure: the message bytes inside ``payload``, verified when a root is given.

    Raises ProtocolError: ``oversized``, ``unsigned``, ``bad_signature``,
    ``expired`` or ``malformed``. The caller decodes the returned bytes as a
    ``Desired`` and checks its device id.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            Reason.OVERSIZED, f"{len(payload)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    envelope = _envelope(payload)
    if trusted_root is None:
        if envelope is None:
            return payload
        signed = bytes(envelope.signed)
        if not signed.startswith(b"{"):
            raise ProtocolError(Reason.MALFORMED, "envelope without a signed JSON object")
        return signed
    if envelope is None:
        raise ProtocolError(
            Reason.UNSIGNED, "unsigned document; this device accepts only hub-signed ones"
        )
    from firmware_bundles.errors import ExpiredMetadataError, FormatError, ThresholdNotMetError
    from firmware_bundles.limits import Limits
    from firmware_bundles.trust import verify_signed_bytes

    try:
        verified = verify_signed_bytes(
            payload,
            trusted_root,
            now=now,
            role="hub",
            clock_skew_s=clock_skew_s,
            limits=Limits(max_metadata_bytes=MAX_PAYLOAD_BYTES),
        )
    except ThresholdNotMetError as exc:
        raise ProtocolError(Reason.BAD_SIGNATURE, str(exc)) from None
    except ExpiredMetadataError as exc:
        raise ProtocolError(Reason.EXPIRED, str(exc)) from None
    except FormatError as exc:
        raise ProtocolError(Reason.MALFORMED, str(exc)) from None
    return verified.signed_bytes
