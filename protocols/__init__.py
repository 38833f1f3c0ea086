"""The Driftless wire contract: topics, message models, codec and limits.

Rules:
- No I/O here: hub, agent and simulator all import this package.
- No pydantic, sqlmodel or fastapi: every device pays for what this imports.
- Every decode failure raises :class:`ProtocolError` with a machine-readable reason.
"""

from protocols.bundles import (
    MAX_CHUNK_BYTES,
    BundleRequest,
    ChunkData,
    ChunkError,
    ChunkErrorCode,
    Frame,
    bundle_references,
    decode_frame,
    encode_chunk,
    encode_chunk_error,
    is_sha256,
)
from protocols.codec import MAX_PAYLOAD_BYTES, MESSAGE_TYPES, decode, encode
from protocols.errors import ProtocolError, Reason
from protocols.messages import (
    HOLD_KEY,
    JOBS_KEY,
    PROTOCOL_VERSION,
    Birth,
    CertIssued,
    CertRequest,
    Desired,
    Inventory,
    JobStatus,
    LockStatus,
    Message,
    Reported,
    Status,
    WorkloadStatus,
    renewal_proof_bytes,
)
from protocols.topics import (
    DEVICE_ID_PATTERN,
    Channel,
    Direction,
    is_valid_device_id,
    parse_topic,
    topic,
    validate_device_id,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "HOLD_KEY",
    "JOBS_KEY",
    "MAX_CHUNK_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Birth",
    "BundleRequest",
    "CertIssued",
    "CertRequest",
    "Channel",
    "ChunkData",
    "ChunkError",
    "ChunkErrorCode",
    "Desired",
    "Direction",
    "Frame",
    "Inventory",
    "JobStatus",
    "LockStatus",
    "Message",
    "ProtocolError",
    "Reason",
    "Reported",
    "Status",
    "WorkloadStatus",
    "bundle_references",
    "decode",
    "decode_frame",
    "encode",
    "encode_chunk",
    "encode_chunk_error",
    "is_sha256",
    "is_valid_device_id",
    "parse_topic",
    "renewal_proof_bytes",
    "topic",
    "validate_device_id",
]
