"""The signed-metadata formats: root metadata, the bundle manifest, the envelope.

Pure: no I/O. Rules:
- Every signed object carries ``_type`` (``"root"`` or ``"manifest"``) and
  ``spec_version``; a signature over one type can never be read as another.
- Decoding is strict: unknown fields, wrong types and out-of-range values are
  refused (:class:`FormatError`), so nothing a signer wrote goes unread.
- All times are integer unix seconds; all hashes, keys and signatures are
  lowercase hex.
- A key id is the SHA-256 (hex) of the raw 32-byte Ed25519 public key; root
  metadata whose key ids do not match their keys is refused.
- The envelope is ``{"signatures": [...], "signed": {...}}``. Its ``signed``
  part is kept as the raw bytes that were received (:class:`Envelope`), because
  signatures are checked over those exact bytes before any field is read.
- No object in an envelope, the ``signed`` part included, may hold a member
  twice: with two ``signed`` members one reader could check the signatures over
  one copy while another reads the other, so an envelope is never ambiguous.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from firmware_bundles import canonical
from firmware_bundles.errors import FormatError
from firmware_bundles.limits import DEFAULT_LIMITS, Limits

SPEC_VERSION: Final = 1
ANY_ARCHITECTURE = "any"

Hex64 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
SigHex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{128}$")]
UnixSeconds = Annotated[int, msgspec.Meta(ge=0, le=canonical.MAX_SAFE_INTEGER)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=canonical.MAX_SAFE_INTEGER)]
Positive = Annotated[int, msgspec.Meta(ge=1, le=canonical.MAX_SAFE_INTEGER)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)]
Name = Annotated[str, msgspec.Meta(pattern="^[a-z0-9][a-z0-9._-]{0,63}$")]
Version = Annotated[str, msgspec.Meta(pattern="^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]
Architecture = Annotated[str, msgspec.Meta(pattern="^[a-z0-9_]{1,32}$")]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]
EnvName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
RelPath = Annotated[str, msgspec.Meta(pattern=r"^(\.|[^/\x00]+(/[^/\x00]+)*)$", max_length=1024)]

Kind = Literal["app", "firmware"]
RoleName = Literal["root", "release", "hub"]
ROLES: tuple[RoleName, ...] = ("root", "release", "hub")


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class HealthCheck(_Strict, frozen=True, kw_only=True):
    """An exec probe the workload runtime runs: exit status 0 means healthy."""

    command: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=64)]
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5
    retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    start_period_s: Seconds = 0


Millis = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600 * 1000)]
IntervalMs = Annotated[int, msgspec.Meta(ge=50, le=3600 * 1000)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
UrlPath = Annotated[str, msgspec.Meta(pattern="^/[!-~]*$", max_length=1024)]
SignalName = Literal["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL"]
ReloadSignal = Literal["SIGHUP", "SIGUSR1", "SIGUSR2"]
UpdateStrategy = Literal["stop-then-start", "start-then-stop"]
Limit = Annotated[int, msgspec.Meta(ge=1, le=canonical.MAX_SAFE_INTEGER)] | None


class AliveCheck(_Strict, frozen=True, kw_only=True, tag_field="type", tag="alive"):
    """Passes once the process has been running for ``for_ms``."""

    for_ms: Millis = 0


class HttpCheck(_Strict, frozen=True, kw_only=True, tag_field="type", tag="http"):
    """``GET http://127.0.0.1:<port><path>``: a 2xx or 3xx answer within ``timeout_ms`` passes."""

    port: Port
    path: UrlPath = "/"
    interval_ms: IntervalMs = 2000
    timeout_ms: IntervalMs = 1000
    failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    """Consecutive failures that make a healthy workload unhealthy."""


class CommandCheck(_Strict, frozen=True, kw_only=True, tag_field="type", tag="command"):
    """A command run in the workload's directory and environment: exit status 0 passes."""

    command: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=64)]
    interval_ms: IntervalMs = 5000
    timeout_ms: IntervalMs = 2000
    failures: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3


Check = AliveCheck | HttpCheck | CommandCheck


class Backoff(_Strict, frozen=True, kw_only=True):
    """Restart limits: at most ``attempts`` restarts within ``interval_s``; delays double
    from ``delay_ms`` up to ``max_delay_ms``, spread by ``jitter_pct`` percent either way."""

    attempts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)] = 600
    delay_ms: Annotated[int, msgspec.Meta(ge=1, le=3600 * 1000)] = 1000
    max_delay_ms: Annotated[int, msgspec.Meta(ge=1, le=3600 * 1000)] = 300_000
    jitter_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 25

    def __post_init__(self) -> None:
        if self.max_delay_ms < self.delay_ms:
            raise ValueError("backoff.max_delay_ms must be >= delay_ms")


class RunLimits(_Strict, frozen=True, kw_only=True):
    """Resource ceilings; ``null``: no limit. The desired entry may lower them, never raise."""

    memory_bytes: Limit = None
    cpu_seconds: Limit = None
    open_files: Limit = None
    cgroup_memory_bytes: Limit = None
    cgroup_cpu_millicores: Limit = None


class LogBounds(_Strict, frozen=True, kw_only=True):
    """The workload's captured output: rotated past ``max_bytes``, ``keep`` old files."""

    max_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 1 << 20
    keep: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3


class RunSpec(_Strict, frozen=True, kw_only=True):
    """How the workload runtime starts an ``app`` bundle (``docs/runtime.md``).

    ``command[0]`` and ``working_dir`` are relative to the unpacked bundle root
    (or a bare program name looked up on ``PATH``); ``health_deadline_s`` is how
    long the runtime waits for the workload to turn healthy before rolling back.
    ``health`` is the first spelling of a command check and stays valid; new
    manifests list their checks in ``checks``. The fields after
    ``stop_timeout_s`` came with the supervising runtime; a manifest signed
    before may leave them out (:data:`RUN_FIELDS_ADDED`).
    """

    command: Annotated[list[Arg], msgspec.Meta(min_length=1, max_length=256)]
    env: dict[EnvName, Arg] = {}
    working_dir: RelPath = "."
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    health: HealthCheck | None = None
    health_deadline_s: Seconds = 60
    stop_timeout_s: Seconds = 10
    checks: Annotated[list[Check], msgspec.Meta(max_length=16)] = []
    min_healthy_ms: Millis = 10_000
    backoff: Backoff = Backoff()
    stop_signal: SignalName = "SIGTERM"
    reload_signal: ReloadSignal | None = None
    limits: RunLimits = RunLimits()
    logs: LogBounds = LogBounds()
    update: UpdateStrategy = "stop-then-start"
    handover_timeout_s: Seconds = 30


RUN_FIELDS_ADDED: Final = (
    "checks",
    "min_healthy_ms",
    "backoff",
    "stop_signal",
    "reload_signal",
    "limits",
    "logs",
    "update",
    "handover_timeout_s",
)
"""The ``run`` fields a manifest signed before the supervising runtime may leave out.

Exactly these, at the top of ``run``: every other field must still be spelled
out, and signers always write these too."""


class Targets(_Strict, frozen=True, kw_only=True):
    """Which devices may install a bundle; ``"any"`` in ``architectures`` matches all."""

    architectures: Annotated[list[Architecture], msgspec.Meta(min_length=1, max_length=32)]
    min_agent_version: Version = "0"


class PayloadInfo(_Strict, frozen=True, kw_only=True):
    """SHA-256 (hex) and exact size in bytes of the payload (a tar.gz)."""

    sha256: Hex64
    size: NonNegative


class Manifest(_Strict, frozen=True, kw_only=True, tag_field="_type", tag="manifest"):
    """What a release key vouches for: one bundle's identity, constraints and payload."""

    spec_version: Literal[1] = 1
    name: Name
    version: Version
    security_version: NonNegative
    kind: Kind
    targets: Targets
    run: RunSpec | None = None
    payload: PayloadInfo
    created: UnixSeconds
    expires: UnixSeconds

    def __post_init__(self) -> None:
        if self.expires <= self.created:
            raise ValueError("expires must be later than created")
        if self.kind == "app" and self.run is None:
            raise ValueError("an app bundle needs a run specification")


class KeyInfo(_Strict, frozen=True, kw_only=True):
    """A public key: ``keytype`` is always ``"ed25519"``, ``public`` the raw key in hex."""

    keytype: Literal["ed25519"]
    public: Hex64


class RoleInfo(_Strict, frozen=True, kw_only=True):
    """The keys a role accepts and how many of them must sign."""

    keyids: Annotated[list[Hex64], msgspec.Meta(min_length=1, max_length=64)]
    threshold: Annotated[int, msgspec.Meta(ge=1, le=64)]

    def __post_init__(self) -> None:
        if len(set(self.keyids)) != len(self.keyids):
            raise ValueError("keyids lists a key twice")
        if self.threshold > len(self.keyids):
            raise ValueError(f"threshold {self.threshold} exceeds its {len(self.keyids)} keys")


class RootMetadata(_Strict, frozen=True, kw_only=True, tag_field="_type", tag="root"):
    """The fleet's trust anchor: keys, and which of them may sign for each role.

    The ``root`` role is required; ``release`` (bundle manifests) and ``hub``
    (desired-state documents) may be absent until their first key is added.
    """

    spec_version: Literal[1] = 1
    version: Positive
    expires: UnixSeconds
    keys: dict[Hex64, KeyInfo]
    roles: dict[RoleName, RoleInfo]

    def __post_init__(self) -> None:
        for keyid, info in self.keys.items():
            if key_id(bytes.fromhex(info.public)) != keyid:
                raise ValueError(f"key id {keyid[:16]}… is not the SHA-256 of its public key")
        if "root" not in self.roles:
            raise ValueError("root metadata has no root role")
        for role, role_info in self.roles.items():
            for keyid in role_info.keyids:
                if keyid not in self.keys:
                    raise ValueError(f"role {role} names unknown key {keyid[:16]}…")


class Signature(_Strict, frozen=True, kw_only=True):
    """One Ed25519 signature (hex) over the canonical signed bytes."""

    keyid: Hex64
    sig: SigHex


class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A signed document as received: the ``signed`` part is the raw, unparsed bytes."""

    signatures: list[Signature]
    signed: msgspec.Raw


def key_id(public_raw: bytes) -> str:
    """Pure: the key id of a raw 32-byte Ed25519 public key (SHA-256, lowercase hex)."""
    return hashlib.sha256(public_raw).hexdigest()


def encode_envelope(signed_bytes: bytes, signatures: list[Signature]) -> bytes:
    """Pure: the envelope bytes for canonical ``signed_bytes`` and its signatures.

    Signatures are written sorted by key id, one per key id, so the whole
    envelope is itself canonical JSON.
    """
    unique = {signature.keyid: signature for signature in signatures}
    ordered = [unique[keyid] for keyid in sorted(unique)]
    return b'{"signatures":' + canonical.encode(ordered) + b',"signed":' + signed_bytes + b"}"


def _refuse_repeated_members(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise FormatError(f"member {name[:40]!r} appears twice in one object of the envelope")
        seen.add(name)


def decode_envelope(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Pure: split an envelope into its raw signed bytes and signatures; raises FormatError.

    The size is checked before parsing; the ``signed`` part is not interpreted,
    but no object anywhere in the envelope may hold a member twice (a second
    ``signed`` would make "the signed bytes" depend on the reader).
    """
    if len(data) > limits.max_metadata_bytes:
        raise FormatError(
            f"signed document of {len(data)} bytes exceeds the "
            f"{limits.max_metadata_bytes}-byte limit"
        )
    try:
        envelope = msgspec.json.decode(data, type=Envelope)
    except msgspec.ValidationError as exc:
        raise FormatError(f"envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise FormatError(f"envelope is not valid JSON: {exc}") from None
    if len(envelope.signatures) > limits.max_signatures:
        raise FormatError(
            f"envelope carries {len(envelope.signatures)} signatures; "
            f"the limit is {limits.max_signatures}"
        )
    if not bytes(envelope.signed).startswith(b"{"):
        raise FormatError("the signed part of an envelope must be a canonical JSON object")
    try:  # msgspec keeps the last of two equal members; find them with the stdlib's parser
        json.loads(data, object_pairs_hook=_refuse_repeated_members)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"envelope is not valid JSON: {exc}") from None
    return envelope


S = TypeVar("S", RootMetadata, Manifest)

_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    RootMetadata: msgspec.json.Decoder(RootMetadata),
    Manifest: msgspec.json.Decoder(Manifest),
}


def decode_signed(signed_bytes: bytes, cls: type[S]) -> S:
    """Pure: read canonical signed bytes as ``cls``; raises FormatError.

    Refuses bytes that are not canonical, that lack ``_type`` or name another
    type, that break a field rule, or that leave out a field (even one with a
    default): re-encoding the result must give back exactly ``signed_bytes``.
    Call this only on bytes whose signatures have been checked, or to display
    unverified content that is labelled as such.
    """
    tree = canonical.check(signed_bytes)
    tag = cls.__struct_config__.tag
    if not isinstance(tree, dict) or tree.get("_type") != tag:
        got = tree.get("_type") if isinstance(tree, dict) else type(tree).__name__
        raise FormatError(f"signed document has _type {got!r} where {tag!r} was expected")
    try:
        value: S = _decoders[cls].decode(signed_bytes)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FormatError(f"{tag}: {exc}") from None
    if _spelled_out(value, tree) != signed_bytes:
        raise FormatError(f"{tag} does not spell out every field; signers must write all of them")
    return value


def _spelled_out(value: Any, tree: dict[str, Any]) -> bytes:
    """The canonical bytes ``value`` had when signed: a manifest's ``run`` may lack exactly
    the fields of :data:`RUN_FIELDS_ADDED` (signed before they existed)."""
    if not isinstance(value, Manifest) or not isinstance(tree.get("run"), dict):
        return canonical.encode(value)
    builtins = msgspec.to_builtins(value)
    run, signed_run = builtins["run"], tree["run"]
    for name in RUN_FIELDS_ADDED:
        if name not in signed_run:
            run.pop(name, None)
    return canonical.encode(builtins)


def matches_architecture(targets: Targets, architecture: str) -> bool:
    """Pure: whether a device of ``architecture`` may install a bundle with ``targets``."""
    return ANY_ARCHITECTURE in targets.architectures or architecture in targets.architectures
