"""A device's desired-state handling written from ``docs/protocol.md`` alone.

It imports nothing of Driftless (no ``edge_agent``, ``protocols`` or
``firmware_bundles``): only the standard library and ``cryptography`` for
Ed25519, as a third party would. It follows the document's sections "The fleet
root", "What a device with a root does with a payload" (the scanner for the
signed bytes included) and "Generations (device side)", and nothing else.
``tests/unit/test_protocol_doc.py`` feeds it and the reference agent's core the
same payloads: where they disagree, the document does not say what the code does.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_PAYLOAD_BYTES = 262_144  # "Transport"
MAX_SIGNATURES = 32  # "The envelope"
MAX_ALLOWANCE_S = 86_400  # "The fleet root"
BIG = 2**63 - 1
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX128 = re.compile(r"[0-9a-f]{128}")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ROLES = ("root", "release", "hub")


class Refused(Exception):
    """A payload the device rejects, with the document's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- JSON, strictly


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise Refused("malformed")  # "No object anywhere in the payload may hold a member twice"
    return dict(pairs)


def parse(data: bytes, *, repeats: bool = True) -> Any:
    """RFC 8259 JSON (no NaN or Infinity); ValueError if it is not JSON."""
    hook = None if repeats else _refuse_repeats
    return json.loads(data.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=hook)


# ---------------------------------------------------------------- the scanner


def _skip_space(data: bytes, at: int) -> int:
    while at < len(data) and data[at] in b" \t\r\n":
        at += 1
    return at


def _string_end(data: bytes, at: int) -> int:
    """``data[at]`` opens a string: the index after the quote that closes it."""
    at += 1
    while data[at] != 0x22:  # '"'
        at += 2 if data[at] == 0x5C else 1  # a backslash escapes the next character
    return at + 1


def _value_end(data: bytes, at: int) -> int:
    """The index after the JSON value starting at ``at`` (braces in strings do not count)."""
    if data[at] == 0x22:
        return _string_end(data, at)
    if data[at] in b"{[":
        depth = 0
        while True:
            if data[at] == 0x22:
                at = _string_end(data, at)
                continue
            if data[at] in b"{[":
                depth += 1
            elif data[at] in b"}]":
                depth -= 1
                if depth == 0:
                    return at + 1
            at += 1
    while at < len(data) and data[at] not in b",}] \t\r\n":
        at += 1
    return at


def member_bytes(data: bytes, wanted: str) -> bytes:
    """The exact bytes of the top-level member ``wanted`` of valid JSON object ``data``."""
    at = _skip_space(data, 0) + 1  # the object's '{'
    while True:
        at = _skip_space(data, at)
        name_end = _string_end(data, at)
        name = json.loads(data[at:name_end])  # names compare after unescaping
        at = _skip_space(data, name_end) + 1  # the ':'
        start = _skip_space(data, at)
        end = _value_end(data, start)
        if name == wanted:
            return data[start:end]
        at = _skip_space(data, end) + 1  # the ',' (the member is there: the caller checked)


# ---------------------------------------------------------------- signatures and the root


def _verify(public_hex: str, sig_hex: str, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(sig_hex), data
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_envelope(envelope: Any) -> list[dict[str, str]]:
    """ "The envelope": exactly two members, their shapes; returns the signatures."""
    if not isinstance(envelope, dict) or set(envelope) != {"signatures", "signed"}:
        raise Refused("malformed")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) > MAX_SIGNATURES:
        raise Refused("malformed")
    for signature in signatures:
        if (
            not isinstance(signature, dict)
            or set(signature) != {"keyid", "sig"}
            or not isinstance(signature["keyid"], str)
            or not HEX64.fullmatch(signature["keyid"])
            or not isinstance(signature["sig"], str)
            or not HEX128.fullmatch(signature["sig"])
        ):
            raise Refused("malformed")
    if not isinstance(envelope["signed"], dict):
        raise Refused("malformed")
    return signatures


def _threshold_met(signed: bytes, signatures: list[dict[str, str]], root: Any, role: str) -> bool:
    """ "Signatures": distinct key ids listed for ``role`` with valid signatures."""
    info = root["roles"].get(role)
    if info is None:
        return False
    counted: set[str] = set()
    for signature in signatures:
        keyid = signature["keyid"]
        if (
            keyid in info["keyids"]
            and keyid not in counted
            and _verify(root["keys"][keyid]["public"], signature["sig"], signed)
        ):
            counted.add(keyid)
    return len(counted) >= info["threshold"]


def _has_fraction(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_fraction(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_fraction(v) for v in value)
    return False


def _canonical(value: Any) -> bytes:
    """``docs/bundles.md``, "Canonical form" (Python's encoder, with these options, is it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _is_int(value: Any, low: int, high: int = BIG) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def load_root(data: bytes) -> dict[str, Any]:
    """ "The fleet root": format, key ids, roles, then its own root threshold. ValueError if bad."""
    try:
        envelope = parse(data, repeats=False)
        signatures = _check_envelope(envelope)
    except (Refused, ValueError) as exc:
        raise ValueError("not a root envelope") from exc
    signed = member_bytes(data, "signed")
    root = envelope["signed"]
    if _has_fraction(root) or _canonical(root) != signed:
        raise ValueError("the root is not canonical JSON")
    fields = {"_type", "expires", "keys", "roles", "spec_version", "version"}
    if set(root) != fields or root["_type"] != "root" or root["spec_version"] != 1:
        raise ValueError("not root metadata")
    if not _is_int(root["version"], 1) or not _is_int(root["expires"], 0):
        raise ValueError("bad version or expires")
    for keyid, key in root["keys"].items():
        if set(key) != {"keytype", "public"} or key["keytype"] != "ed25519":
            raise ValueError("bad key")
        if not HEX64.fullmatch(key["public"]):
            raise ValueError("bad public key")
        if hashlib.sha256(bytes.fromhex(key["public"])).hexdigest() != keyid:
            raise ValueError("a key id is not the SHA-256 of its key")
    if "root" not in root["roles"]:
        raise ValueError("no root role")
    for name, role in root["roles"].items():
        keyids = role["keyids"]
        if name not in ROLES or set(role) != {"keyids", "threshold"}:
            raise ValueError("bad role")
        if len(set(keyids)) != len(keyids) or not set(keyids) <= set(root["keys"]):
            raise ValueError("bad role keys")
        if not _is_int(role["threshold"], 1, len(keyids)):
            raise ValueError("bad threshold")
    if not _threshold_met(signed, signatures, root, "root"):
        raise ValueError("not signed by its own root threshold")
    return dict(root)


# ---------------------------------------------------------------- the Desired message


def _decode_desired(data: bytes) -> dict[str, Any]:
    """Step 7: the signed bytes as a ``Desired`` message ("Envelope", the field table)."""
    try:
        message = parse(data)
    except ValueError:
        raise Refused("malformed") from None
    if not isinstance(message, dict):
        raise Refused("malformed")
    if message.get("v") != 1:  # 1.0 and true pass here and fail below
        raise Refused("unsupported_version")
    if message.get("kind") != "desired":
        raise Refused("wrong_kind")
    device_id, config = message.get("device_id"), message.get("config")
    issued_at = message.get("issued_at")
    if (
        not _is_int(message["v"], 1, 1)
        or not isinstance(device_id, str)
        or not DEVICE_ID.fullmatch(device_id)
        or not _is_int(message.get("generation"), 1)
        or not isinstance(config, dict)
        or isinstance(issued_at, bool)
        or not isinstance(issued_at, int | float)
        or issued_at < 0
    ):
        raise Refused("invalid_fields")
    return message


# ---------------------------------------------------------------- the device


@dataclass
class DocDevice:
    """One device: its id, its root and what it finished."""

    device_id: str
    root: dict[str, Any]
    allowance_s: int = 300
    applied_generation: int = 0
    failed_generation: int = 0
    last_error: str | None = None

    def open(self, payload: bytes, now: float) -> dict[str, Any] | None:
        """Steps 1-8: the ``Desired`` message, None for an empty payload; raises Refused."""
        if not payload:
            return None
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise Refused("oversized")
        try:
            probe = parse(payload)
        except ValueError:
            probe = None
        if not isinstance(probe, dict) or probe.get("signatures") is None:
            raise Refused("unsigned")
        if now - self.allowance_s >= self.root["expires"]:
            raise Refused("expired")
        envelope = parse(payload, repeats=False)  # Refused("malformed") on a repeat
        signatures = _check_envelope(envelope)
        signed = member_bytes(payload, "signed")
        if not _threshold_met(signed, signatures, self.root, "hub"):
            raise Refused("bad_signature")
        message = _decode_desired(signed)
        if message["device_id"] != self.device_id:
            raise Refused("device_mismatch")
        return message

    def receive(self, payload: bytes, now: float) -> tuple[str, Any]:
        """One payload: ("apply", generation), ("reject", reason), ("ignore", None) or
        ("answer", the ``reported`` fields the document prescribes)."""
        try:
            message = self.open(payload, now)
        except Refused as refused:
            return "reject", refused.reason
        if message is None:
            return "ignore", None
        generation = message["generation"]
        finished = max(self.applied_generation, self.failed_generation)
        if generation > finished:
            return "apply", generation
        if generation == finished:
            return "ignore", None
        failed = self.failed_generation > self.applied_generation
        return "answer", {
            "phase": "failed" if failed else "applied",
            "generation": finished,
            "error": self.last_error if failed else None,
            "applied_generation": self.applied_generation,
            "failed_generation": self.failed_generation,
        }
