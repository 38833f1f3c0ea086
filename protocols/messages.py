"""Versioned wire messages (protocol version 1).

Rules:
- Every message carries ``v`` (the protocol version) and ``kind`` (its type tag);
  a message is valid only on the channel of its kind.
- Generations are per-device integers that only grow; 0 means "nothing yet".
- Reports are ordered by ``(boot_epoch, seq)``: ``boot_epoch`` grows on every
  agent start and is kept on disk, ``seq`` grows within one boot.
- A birth and the Last Will set at the same connect carry the same ``session``
  (Sparkplug B's bdSeq), so a Will from an older session can be recognised.
- Unknown extra fields are ignored so that minor additions stay compatible; a
  change that breaks old peers bumps ``PROTOCOL_VERSION`` and the topic root.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from protocols.topics import DEVICE_ID_PATTERN

PROTOCOL_VERSION = 1

DeviceId = Annotated[str, msgspec.Meta(pattern=f"^{DEVICE_ID_PATTERN}$")]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Timestamp = Annotated[float, msgspec.Meta(ge=0)]
ErrorText = Annotated[str, msgspec.Meta(max_length=2048)]
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
ProofText = Annotated[str, msgspec.Meta(max_length=256, pattern="^[A-Za-z0-9+/=]+$")]
CertSerial = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{1,40}$")]  # X.509: 20 bytes at most

# "staged": a HELD document (config ``hold: true``) is fetched and installed, not switched.
HOLD_KEY = "hold"
"""A desired config's top-level member that HOLDS the document (only the JSON value
``true``): the device fetches and installs, does not switch, and reports ``staged``."""
JOBS_KEY = "jobs"
"""A desired config's top-level member that carries one-shot jobs."""

Phase = Literal["applied", "applying", "failed", "rolled_back", "staged"]
HeartbeatInterval = Annotated[float, msgspec.Meta(ge=1, le=86400)]
WorkloadState = Literal[
    "pending",
    "downloading",
    "installing",
    "starting",
    "healthy",
    "unhealthy",
    "failed",
    "rolled_back",
    "stopped",
    "removed",
]
WorkloadName = Annotated[str, msgspec.Meta(pattern="^[a-z0-9][a-z0-9._-]{0,63}$")]
MAX_REPORTED_WORKLOADS = 256
"""Most workloads one report lists."""


class _Base(msgspec.Struct, kw_only=True, frozen=True, tag_field="kind"):
    v: int = PROTOCOL_VERSION
    device_id: DeviceId


class Desired(_Base, kw_only=True, frozen=True, tag="desired"):
    """The whole configuration a device should run (never a delta)."""

    generation: Positive
    config: dict[str, Any]
    issued_at: Timestamp


class Inventory(msgspec.Struct, kw_only=True, frozen=True):
    """What the device is and has left: for placement, fleet views and support.

    Sizes are bytes; ``mem_free_bytes`` is memory available to new processes
    (``MemAvailable``), ``disk_*`` the file system holding the agent's data.
    """

    arch: ShortText
    os: ShortText
    cpu_count: NonNegative
    mem_total_bytes: NonNegative
    mem_free_bytes: NonNegative
    disk_total_bytes: NonNegative
    disk_free_bytes: NonNegative
    # Firmware A/B: the slot that runs and its firmware version; None on a device without
    # firmware slots (and the version None while the running slot holds no firmware).
    firmware_slot: ShortText | None = None
    firmware_version: ShortText | None = None
    # Whether the runtime can set cgroup v2 limits (memory, CPU) for workloads: "v2", or
    # why not (rlimits are set either way); None from a device that does not say.
    cgroups: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class Birth(_Base, kw_only=True, frozen=True, tag="birth"):
    """Sent on every connect: who I am, what I have applied, which session this is."""

    session: NonNegative
    boot_epoch: NonNegative
    seq: NonNegative
    applied_generation: NonNegative
    failed_generation: NonNegative = 0
    agent_version: ShortText
    # Collected at each connect; None from a device that does not report it.
    inventory: Inventory | None = None
    # The serial (lowercase hex) of the certificate this connection was made with, under
    # mutual TLS: the hub refuses a birth from a revoked certificate's session.
    cert_serial: CertSerial | None = None
    # Events the device's outbox dropped (oldest first, while offline) since it was made.
    events_dropped: NonNegative = 0
    # How often (seconds) the device sends a state report while connected (its heartbeat);
    # None from a device that does not say (the hub then assumes its own default).
    heartbeat_s: HeartbeatInterval | None = None
    ts: Timestamp


class Status(_Base, kw_only=True, frozen=True, tag="status"):
    """Retained online flag; the Last Will carries ``online=False`` for the same session."""

    online: bool
    session: NonNegative
    ts: Timestamp


class WorkloadStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One workload as the device sees it: its state, restarts and last exit."""

    name: WorkloadName
    state: WorkloadState
    restarts: NonNegative = 0
    last_exit_code: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)] | None = None
    last_exit_at: Timestamp | None = None


WorkloadList = Annotated[list[WorkloadStatus], msgspec.Meta(max_length=MAX_REPORTED_WORKLOADS)]

# -- update locks and one-shot jobs (issue 13, items 4 and 8)

MAX_REPORTED_LOCKS = 256
"""Most update locks one report lists."""
MAX_REPORTED_JOBS = 64
"""Most job states one report lists."""
MAX_JOB_LOG_TAIL = 4096
"""Longest log tail a job's report carries (characters, the end of its output)."""
HolderText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
JobId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
JobState = Literal["running", "succeeded", "failed", "timed_out"]


class LockStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One workload's update lock as the device sees it: who holds it and until when.

    ``until`` is the device's clock (unix seconds) at which the lease ends, after
    the device's cap; ``overridden``: a signed override from the hub lifts it now.
    """

    workload: WorkloadName
    holder: HolderText
    until: Timestamp
    overridden: bool = False


class JobStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One one-shot job's state: running with its progress, or its result."""

    id: JobId
    state: JobState
    progress: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    message: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    exit_code: Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)] | None = None
    log_tail: Annotated[str, msgspec.Meta(max_length=MAX_JOB_LOG_TAIL)] | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None


LockList = Annotated[list[LockStatus], msgspec.Meta(max_length=MAX_REPORTED_LOCKS)]
JobList = Annotated[list[JobStatus], msgspec.Meta(max_length=MAX_REPORTED_JOBS)]


class Reported(_Base, kw_only=True, frozen=True, tag="reported"):
    """The device's actual state after an apply started, finished, failed or rolled back."""

    boot_epoch: NonNegative
    seq: NonNegative
    phase: Phase
    generation: NonNegative
    applied_generation: NonNegative
    failed_generation: NonNegative = 0
    error: ErrorText | None = None
    # Per-workload states; None (absent) from a device that does not report them.
    workloads: WorkloadList | None = None
    # Update locks held now (an empty list: none); None from a device that does not report them.
    locks: LockList | None = None
    # One-shot jobs whose state changed (an event per change); None: none in this report.
    jobs: JobList | None = None
    ts: Timestamp


PemText = Annotated[str, msgspec.Meta(min_length=1, max_length=8192)]


class CertRequest(_Base, kw_only=True, frozen=True, tag="cert_req"):
    """Renewal: a CSR for a new key made on the device, sent over its own connection.

    The broker's ACL lets only the device itself publish here, and the request also
    proves possession of the device's current key: ``certificate_pem`` is the
    certificate it holds now and ``proof`` (base64) its key's signature over
    :func:`renewal_proof_bytes` (ECDSA P-256 with SHA-256, DER; or Ed25519). The hub
    refuses a request without them, so arriving on the device's topic is not enough.
    """

    request_id: Positive
    csr_pem: PemText
    certificate_pem: PemText | None = None
    proof: ProofText | None = None
    ts: Timestamp


def renewal_proof_bytes(device_id: str, request_id: int, csr_pem: str) -> bytes:
    """Pure: the bytes a renewal's ``proof`` signs: a fixed label, the device id, the
    request id (decimal) and the CSR exactly as sent, joined by newlines."""
    return "\n".join(("driftless-cert-renewal-v1", device_id, str(request_id), csr_pem)).encode()


class CertIssued(_Base, kw_only=True, frozen=True, tag="cert"):
    """The hub's answer to one CertRequest: a certificate, or why not."""

    request_id: Positive
    certificate_pem: PemText | None = None
    error: ErrorText | None = None
    # With an error that passes by itself (too soon): ask again after this long.
    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    ts: Timestamp


Message = Desired | Birth | Status | Reported | CertRequest | CertIssued
