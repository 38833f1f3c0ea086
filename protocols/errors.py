"""One typed error for everything a peer can get wrong on the wire.

Rule: a ProtocolError always means *the remote sent bad data*; callers count it,
log it and carry on. It never means a local bug or a transport failure.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a message was rejected; stable strings, used as metric labels."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELDS = "invalid_fields"
    WRONG_KIND = "wrong_kind"
    BAD_TOPIC = "bad_topic"
    BAD_DEVICE_ID = "bad_device_id"
    DEVICE_MISMATCH = "device_mismatch"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"


class ProtocolError(ValueError):
    """A message or topic that breaks the wire contract."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
