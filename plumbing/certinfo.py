"""The three fields of an X.509 certificate an idle agent reads: serial, not before, not after.

Why this exists: a connected agent names its certificate's serial in every
birth and looks at its validity once a minute to renew in time. Loading
``cryptography`` for that costs ~8 MB resident on every device for as long as
the agent runs (``docs/benchmarks.md``, "Agent footprint"); ``ssl`` reads a
certificate only through a private test function, and ``asn1crypto`` would add
~3 MB and a dependency. So this reads those fields from DER itself. Pure.

Rules:
- Only what RFC 5280 fixes at the front of ``TBSCertificate`` is read:
  ``[0] version`` (optional), ``serialNumber``, ``signature``, ``issuer``,
  ``validity``; nothing after it, and nothing here is a trust decision (the
  certificate is the device's own, already taken; TLS and ``cryptography``
  check certificates where it matters).
- DER only: definite lengths in the shortest form, at most four length bytes,
  every element inside its parent; times in ``UTCTime`` (``YYMMDDHHMMSSZ``,
  years 1950-2049) or ``GeneralizedTime`` (``YYYYMMDDHHMMSSZ``), both in UTC.
- Anything else raises ValueError saying where and what.
"""

from __future__ import annotations

import binascii
import datetime as dt
from dataclasses import dataclass

PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
PEM_END = b"-----END CERTIFICATE-----"
SEQUENCE, INTEGER, UTC_TIME, GENERALIZED_TIME, VERSION = 0x30, 0x02, 0x17, 0x18, 0xA0


@dataclass(frozen=True)
class CertificateInfo:
    """What an agent needs of its own certificate while idle."""

    serial: int
    not_before: float  # unix seconds
    not_after: float

    @property
    def serial_hex(self) -> str:
        """The serial as the hub records it (lowercase hex, no leading zeros)."""
        return format(self.serial, "x")


def read_pem_certificate(pem: bytes) -> CertificateInfo:
    """Pure: serial and validity of the first certificate in ``pem``; raises ValueError."""
    begin = pem.find(PEM_BEGIN)
    end = pem.find(PEM_END, begin + 1)
    if begin < 0 or end < 0:
        raise ValueError("not a PEM certificate: no BEGIN/END CERTIFICATE lines")
    try:
        der = binascii.a2b_base64(pem[begin + len(PEM_BEGIN) : end])
    except binascii.Error as exc:
        raise ValueError(f"not a PEM certificate: bad base64 ({exc})") from None
    return read_der_certificate(der)


def read_der_certificate(der: bytes) -> CertificateInfo:
    """Pure: serial and validity of the DER certificate ``der``; raises ValueError."""
    tag, start, end = _element(der, 0, len(der))
    if tag != SEQUENCE or end != len(der):
        raise ValueError("not a DER certificate: expected one SEQUENCE spanning it all")
    tag, pos, tbs_end = _element(der, start, end)
    if tag != SEQUENCE:
        raise ValueError(f"TBSCertificate: expected SEQUENCE at byte {start}, found tag {tag:#x}")
    tag, body, after = _element(der, pos, tbs_end)
    if tag == VERSION:
        tag, body, after = _element(der, after, tbs_end)
    if tag != INTEGER or after == body:
        raise ValueError(f"serialNumber: expected INTEGER, found tag {tag:#x}")
    serial = int.from_bytes(der[body:after], "big", signed=True)
    for name in ("signature", "issuer"):
        tag, _, after = _element(der, after, tbs_end)
        if tag != SEQUENCE:
            raise ValueError(f"{name}: expected SEQUENCE, found tag {tag:#x}")
    tag, pos, validity_end = _element(der, after, tbs_end)
    if tag != SEQUENCE:
        raise ValueError(f"validity: expected SEQUENCE, found tag {tag:#x}")
    times = []
    for name in ("notBefore", "notAfter"):
        tag, body, pos = _element(der, pos, validity_end)
        times.append(_time(name, tag, der[body:pos]))
    return CertificateInfo(serial=serial, not_before=times[0], not_after=times[1])


def _element(der: bytes, pos: int, limit: int) -> tuple[int, int, int]:
    """Pure: (tag, body start, body end) of the element at ``pos``, inside ``limit``."""
    if pos + 2 > limit:
        raise ValueError(f"truncated DER: an element at byte {pos} runs past its parent")
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError(f"bad DER length at byte {pos - 1}: {count} length bytes")
        if pos + count > limit:
            raise ValueError(f"truncated DER: the length at byte {pos - 1} runs past its parent")
        length = int.from_bytes(der[pos : pos + count], "big")
        if length < 0x80 or der[pos] == 0:
            raise ValueError(f"bad DER length at byte {pos - 1}: not in its shortest form")
        pos += count
    if pos + length > limit:
        raise ValueError(f"truncated DER: an element at byte {pos} runs past its parent")
    return tag, pos, pos + length


def _time(name: str, tag: int, raw: bytes) -> float:
    """Pure: an RFC 5280 UTCTime or GeneralizedTime as unix seconds; raises ValueError."""
    text = raw.decode("ascii", "replace")
    digits = {UTC_TIME: 12, GENERALIZED_TIME: 14}.get(tag)
    if digits is None:
        raise ValueError(f"{name}: expected UTCTime or GeneralizedTime, found tag {tag:#x}")
    if len(text) != digits + 1 or not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError(f"{name}: {text!r} is not a DER time in UTC")
    if tag == UTC_TIME:
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    month, day, hour, minute, second = (int(text[i : i + 2]) for i in range(4, 14, 2))
    try:
        when = dt.datetime(int(text[:4]), month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a valid date") from None
    return when.timestamp()
