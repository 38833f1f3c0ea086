"""The Driftless wire contract: topics, message models, codec and limits.

Rules:
- No I/O here: hub, agent and simulator all import this package.
- No pydantic, sqlmodel or fastapi: every device pays for what this imports.
- Every decode failure raises :class:`ProtocolError` with a machine-readable reason.
"""

from protocols.codec import MAX_PAYLOAD_BYTES, decode, encode
from protocols.errors import ProtocolError, Reason
from protocols.messages import (
    PROTOCOL_VERSION,
    Birth,
    Desired,
    Message,
    Reported,
    Status,
)
from protocols.topics import (
    DEVICE_ID_PATTERN,
    Channel,
    is_valid_device_id,
    parse_topic,
    topic,
    validate_device_id,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "Birth",
    "Channel",
    "Desired",
    "Message",
    "ProtocolError",
    "Reason",
    "Reported",
    "Status",
    "decode",
    "encode",
    "is_valid_device_id",
    "parse_topic",
    "topic",
    "validate_device_id",
]
