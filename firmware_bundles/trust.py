"""Trust decisions over signed metadata: thresholds, root rotation, expiry, rollback.

Pure: no file or network I/O, no clock; ``now`` (unix seconds) is a parameter.
Rules, in the order they are applied:

1. The envelope is split into raw ``signed`` bytes and signatures; nothing in
   ``signed`` is read yet.
2. Signatures are checked over those exact bytes (:func:`verify_role`): only
   keys the trusted root authorises for the role count, each key once however
   often it signs, an invalid signature counts for nothing; fewer than the
   role's threshold raises :class:`ThresholdNotMetError`.
3. Only then are the bytes parsed, and they must be canonical and complete
   (:func:`firmware_bundles.model.decode_signed`).
4. Expiry: metadata is expired when ``now - clock_skew_s >= expires``. The
   allowance is for a device clock that runs ahead (fast): such a clock would
   see metadata expire early, so it is taken until ``expires + clock_skew_s``.
   It is bounded by ``Limits.max_clock_skew_s``.
5. A new root must have version exactly ``trusted + 1`` and be signed by a
   threshold of the *old* root's root keys and of its *own* root keys. In a
   chain of new roots only the last must be unexpired (as in TUF), and the
   chain is taken whole or not at all.
6. A bundle whose security version is lower than one installed under the same
   name is a rollback; an equal one is not.
7. Nothing verifies against an expired trusted root: a device whose root has
   expired needs a newer root first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from firmware_bundles import canonical
from firmware_bundles.errors import (
    BadVersionNumberError,
    ExpiredMetadataError,
    FormatError,
    RollbackError,
    ThresholdNotMetError,
)
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.model import (
    Manifest,
    RoleName,
    RootMetadata,
    Signature,
    decode_envelope,
    decode_signed,
)


def verify_role(
    signed_bytes: bytes, signatures: Sequence[Signature], root: RootMetadata, role: RoleName
) -> frozenset[str]:
    """Pure: the key ids that validly signed ``signed_bytes`` for ``role`` under ``root``.

    Raises ThresholdNotMetError when their number is below the role's threshold
    (or the root has no such role). Returns as soon as the threshold is met.
    """
    from firmware_bundles.keys import verify_signature  # cryptography: only to verify

    info = root.roles.get(role)
    if info is None:
        raise ThresholdNotMetError(f"root version {root.version} authorises no {role} keys")
    authorised = set(info.keyids)
    valid: set[str] = set()
    invalid = outside = repeated = 0
    for signature in signatures:
        if signature.keyid not in authorised:
            outside += 1
            continue
        if signature.keyid in valid:
            repeated += 1
            continue
        if verify_signature(root.keys[signature.keyid], signature.sig, signed_bytes):
            valid.add(signature.keyid)
            if len(valid) >= info.threshold:
                return frozenset(valid)
        else:
            invalid += 1
    raise ThresholdNotMetError(
        f"{role}: {len(valid)} valid signature(s) from distinct authorised keys, "
        f"{info.threshold} required (root version {root.version}; {invalid} invalid, "
        f"{outside} by keys not authorised for {role}, {repeated} repeated)"
    )


def check_expiry(what: str, expires: int, now: float, clock_skew_s: int, limits: Limits) -> None:
    """Pure: raise ExpiredMetadataError if ``expires`` has passed at ``now`` minus the allowance.

    Raises ValueError if the allowance is negative or above ``limits.max_clock_skew_s``.
    """
    if not 0 <= clock_skew_s <= limits.max_clock_skew_s:
        raise ValueError(
            f"clock skew allowance {clock_skew_s} s is outside 0..{limits.max_clock_skew_s} s"
        )
    if now - clock_skew_s >= expires:
        raise ExpiredMetadataError(
            f"{what} expired at {expires} (now {int(now)}, allowance {clock_skew_s} s)"
        )


def verify_successor(
    current: RootMetadata, new_envelope: bytes, *, limits: Limits = DEFAULT_LIMITS
) -> tuple[RootMetadata, bytes]:
    """Pure: check ``new_envelope`` as the root that follows ``current``, ignoring expiry.

    Returns the new root and its canonical signed bytes. Raises FormatError,
    ThresholdNotMetError (old or new root keys) or BadVersionNumberError.
    """
    envelope = decode_envelope(new_envelope, limits=limits)
    signed = bytes(envelope.signed)
    try:
        verify_role(signed, envelope.signatures, current, "root")
    except ThresholdNotMetError as exc:
        raise ThresholdNotMetError(f"not signed by the trusted root keys: {exc}") from None
    new = decode_signed(signed, RootMetadata)
    if new.version != current.version + 1:
        raise BadVersionNumberError(
            f"root version {new.version} is not the successor of trusted version {current.version}"
        )
    try:
        verify_role(signed, envelope.signatures, new, "root")
    except ThresholdNotMetError as exc:
        raise ThresholdNotMetError(f"not signed by its own root keys: {exc}") from None
    return new, signed


@dataclass(frozen=True, slots=True)
class VerifiedDocument:
    """A signed document whose signatures met the role's threshold.

    ``signed_bytes`` are the exact canonical bytes that were signed; decode
    them with the document's own model.
    """

    signed_bytes: bytes
    keyids: frozenset[str]


class TrustedRoot:
    """The root metadata a device or operator trusts, and its updates.

    Holds the root and the envelope bytes it came in, so the I/O layer can
    persist exactly what was verified, after verification.
    """

    __slots__ = ("_envelope", "_limits", "_root")

    def __init__(self, root: RootMetadata, envelope: bytes, limits: Limits) -> None:
        self._root = root
        self._envelope = envelope
        self._limits = limits

    @classmethod
    def from_bytes(cls, envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> TrustedRoot:
        """Pure: trust a provisioned root (it must be signed by its own root threshold).

        The root is taken on trust (it came with provisioning), so its expiry
        is not checked here; every verification against it checks it.
        Raises FormatError or ThresholdNotMetError.
        """
        parsed = decode_envelope(envelope, limits=limits)
        signed = bytes(parsed.signed)
        # Bootstrapping: the keys to check with are inside the document itself.
        # Parsing first is safe here because these bytes are trusted by provisioning;
        # the self-signature only guards against corruption and half-made roots.
        root = decode_signed(signed, RootMetadata)
        verify_role(signed, parsed.signatures, root, "root")
        return cls(root, envelope, limits)

    @property
    def root(self) -> RootMetadata:
        return self._root

    @property
    def version(self) -> int:
        return self._root.version

    @property
    def envelope(self) -> bytes:
        """The envelope bytes of the trusted root, exactly as verified."""
        return self._envelope

    def check_not_expired(self, now: float, clock_skew_s: int | None = None) -> None:
        """Pure: raise ExpiredMetadataError if the trusted root has expired at ``now``."""
        skew = self._limits.default_clock_skew_s if clock_skew_s is None else clock_skew_s
        check_expiry(f"root version {self.version}", self._root.expires, now, skew, self._limits)

    def update(self, new_envelope: bytes, now: float, clock_skew_s: int | None = None) -> None:
        """Pure: accept one successor root; the same as a chain of one."""
        self.update_chain([new_envelope], now, clock_skew_s)

    def update_chain(
        self, envelopes: Sequence[bytes], now: float, clock_skew_s: int | None = None
    ) -> None:
        """Pure: walk successor roots in version order and trust the last one.

        Each must be version ``previous + 1``, signed by the previous root's
        root threshold and its own. Intermediate roots may have expired; the
        last must not. On any error nothing changes. Raises FormatError,
        ThresholdNotMetError, BadVersionNumberError or ExpiredMetadataError.
        """
        if len(envelopes) > self._limits.max_root_chain:
            raise ValueError(
                f"{len(envelopes)} roots exceed the chain limit {self._limits.max_root_chain}"
            )
        if not envelopes:
            return
        root = self._root
        for envelope in envelopes:
            root, _ = verify_successor(root, envelope, limits=self._limits)
        skew = self._limits.default_clock_skew_s if clock_skew_s is None else clock_skew_s
        check_expiry(f"root version {root.version}", root.expires, now, skew, self._limits)
        self._root = root
        self._envelope = envelopes[-1]


def verify_manifest(
    signed_manifest: bytes,
    trusted_root: TrustedRoot,
    now: float,
    clock_skew_s: int | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """Pure: the manifest in ``signed_manifest`` if a release threshold signed it and it is fresh.

    Order: trusted root unexpired, signatures over the raw bytes, canonical
    parse, declared payload size within ``limits.max_payload_bytes``, manifest
    expiry (with the bounded clock-skew allowance). Raises
    ExpiredMetadataError, FormatError or ThresholdNotMetError.
    """
    skew = limits.default_clock_skew_s if clock_skew_s is None else clock_skew_s
    trusted_root.check_not_expired(now, skew)
    envelope = decode_envelope(signed_manifest, limits=limits)
    signed = bytes(envelope.signed)
    verify_role(signed, envelope.signatures, trusted_root.root, "release")
    manifest = decode_signed(signed, Manifest)
    if manifest.payload.size > limits.max_payload_bytes:
        raise FormatError(
            f"manifest declares a payload of {manifest.payload.size} bytes, over the "
            f"{limits.max_payload_bytes}-byte limit"
        )
    check_expiry(
        f"manifest {manifest.name} {manifest.version}", manifest.expires, now, skew, limits
    )
    return manifest


def verify_document(
    signed_envelope: bytes,
    trusted_root: TrustedRoot,
    *,
    now: float,
    role: RoleName = "hub",
    clock_skew_s: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedDocument:
    """Pure: check a generic signed document (by default one the hub signed).

    The signed part must be canonical JSON and signed by a threshold of
    ``role``'s keys; the trusted root must not have expired. The document's
    own fields (freshness, generation) are the caller's to check after
    decoding ``signed_bytes``. Raises ExpiredMetadataError, FormatError or
    ThresholdNotMetError.
    """
    verified = verify_signed_bytes(
        signed_envelope,
        trusted_root,
        now=now,
        role=role,
        clock_skew_s=clock_skew_s,
        limits=limits,
    )
    canonical.check(verified.signed_bytes)
    return verified


def verify_signed_bytes(
    signed_envelope: bytes,
    trusted_root: TrustedRoot,
    *,
    now: float,
    role: RoleName = "hub",
    clock_skew_s: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedDocument:
    """Pure: like :func:`verify_document`, but the signed part need not be canonical.

    For wire messages whose exact bytes are signed and never re-encoded (a
    desired-state document may hold fractions, which the canonical form
    forbids): signatures cover the raw bytes, so no canonical form is needed
    to verify them. The signed part must still be a JSON object.
    """
    trusted_root.check_not_expired(now, clock_skew_s)
    envelope = decode_envelope(signed_envelope, limits=limits)
    signed = bytes(envelope.signed)
    keyids = verify_role(signed, envelope.signatures, trusted_root.root, role)
    return VerifiedDocument(signed_bytes=signed, keyids=keyids)


def check_rollback(manifest: Manifest, installed_security_versions: Mapping[str, int]) -> None:
    """Pure: raise RollbackError if ``manifest`` is older in security than what is installed.

    ``installed_security_versions`` maps a bundle name to the highest security
    version ever installed under it; a name never installed accepts anything.
    """
    installed = installed_security_versions.get(manifest.name)
    if installed is not None and manifest.security_version < installed:
        raise RollbackError(
            f"bundle {manifest.name} {manifest.version} has security version "
            f"{manifest.security_version}, lower than installed {installed}"
        )
