"""The canonical encoding of signed metadata: the exact bytes that signatures cover.

Pure: no I/O. The rules (the normative text is ``docs/bundles.md``, section
"Canonical form"):

- JSON (RFC 8259) encoded as UTF-8, with no byte-order mark and no whitespace
  outside strings.
- Objects: members sorted by key, comparing keys by Unicode code point (the
  same order as comparing their UTF-8 bytes); keys are strings; no duplicates.
- Arrays: elements in their given order.
- Strings: ``"`` and ``\\`` are escaped as ``\\"`` and ``\\\\``; U+0008, U+0009,
  U+000A, U+000C and U+000D as ``\\b``, ``\\t``, ``\\n``, ``\\f``, ``\\r``; every
  other code point below U+0020 as ``\\u00xx`` with lowercase hex; every other
  code point (U+007F and non-ASCII included) as its raw UTF-8 bytes.
  Surrogate code points (unpaired surrogates) are refused.
- Numbers: integers only, in decimal without leading zeros or ``+``, ``-`` only
  for negatives, within ±(2^53 - 1). No fractions, exponents, ``-0``, NaN or
  infinities: times are integer unix seconds.
- ``true``, ``false``, ``null`` as written.

:func:`encode` builds the form; :func:`check` refuses any bytes that are not
exactly it, so "parse then re-encode" is the identity on everything we accept.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import msgspec

from firmware_bundles.errors import FormatError

MAX_SAFE_INTEGER = 2**53 - 1
_PASS_THROUGH = (
    bytes,
    bytearray,
    memoryview,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
)
MAX_DEPTH = 32

_SHORT_ESCAPES = {
    0x22: '\\"',
    0x5C: "\\\\",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0C: "\\f",
    0x0D: "\\r",
}
_ESCAPES: dict[int, str] = {code: f"\\u{code:04x}" for code in range(0x20)}
_ESCAPES.update(_SHORT_ESCAPES)


def _encode_string(value: str, out: list[str]) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("string holds an unpaired surrogate code point") from None
    out.append('"')
    out.append(value.translate(_ESCAPES))
    out.append('"')


def _encode_value(value: Any, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FormatError(f"nesting deeper than {MAX_DEPTH} levels")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise FormatError(f"integer {value} is outside ±(2^53 - 1)")
        out.append(str(int(value)))
    elif isinstance(value, float):
        raise FormatError(f"number {value!r} is not an integer; signed metadata uses integers only")
    elif isinstance(value, str):
        _encode_string(value, out)
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode_value(item, out, depth + 1)
        out.append("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise FormatError(f"object key {key!r} is not a string")
        out.append("{")
        for index, key in enumerate(sorted(value)):
            if index:
                out.append(",")
            _encode_string(key, out)
            out.append(":")
            _encode_value(value[key], out, depth + 1)
        out.append("}")
    else:
        raise FormatError(f"value of type {type(value).__name__} has no canonical JSON form")


def encode(value: Any) -> bytes:
    """Pure: the canonical bytes of ``value`` (a msgspec Struct or JSON-like builtins).

    Structs are converted with ``msgspec.to_builtins``, so every field is
    spelled out, defaults included; bytes, times, decimals and UUIDs are
    refused rather than silently turned into strings. Raises FormatError for anything the
    canonical form cannot hold (floats, huge integers, surrogates, deep nesting).
    """
    builtins = msgspec.to_builtins(value, builtin_types=_PASS_THROUGH)
    out: list[str] = []
    _encode_value(builtins, out, 0)
    return "".join(out).encode("utf-8")


def check(data: bytes) -> Any:
    """Pure: parse ``data`` and return its value if ``data`` is exactly canonical.

    Raises FormatError naming the first reason it is not: not JSON, a float,
    or a different spelling (whitespace, key order, escapes, duplicate keys).
    """
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise FormatError(f"signed part is not valid JSON: {exc}") from None
    if encode(value) != data:
        raise FormatError(
            "signed part is not in canonical form (sorted keys, no whitespace, "
            "minimal escapes, no duplicate keys)"
        )
    return value
