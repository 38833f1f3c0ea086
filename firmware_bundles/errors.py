"""Every error the bundle system raises, in two trees split by blame.

Rules:
- :class:`BundleError` means *the data is bad*: a signature, a version, an
  expiry, a hash, a size, a format or an archive entry failed a check. The
  caller drops these bytes and never retries them as they are; fetching them
  again from the same source will fail the same way.
- :class:`LocalError` means *the data may be fine but we could not use it*:
  a key file is missing, unreadable or behind the wrong passphrase, a source
  directory cannot be packed, an output already exists. The operator fixes the
  environment and retries.
- Transport failures (a dropped connection, a short read from the network) are
  not raised here: they are the I/O layer's own errors (``OSError``) and mean
  "retry later".
- Every message is one line that names what failed and, where it helps, the
  numbers involved (``"release: 1 valid signature of 2 required"``).
"""

from __future__ import annotations


class BundleError(Exception):
    """Signed data, a bundle file or a payload failed verification: give up on these bytes."""


class FormatError(BundleError):
    """Bytes that do not parse as what they claim to be, or break the canonical form."""


class BadSignatureError(BundleError):
    """Signatures do not prove that the right keys signed these exact bytes."""


class ThresholdNotMetError(BadSignatureError):
    """Fewer distinct authorised keys produced valid signatures than the role's threshold."""


class ExpiredMetadataError(BundleError):
    """Signed metadata (root, manifest) whose ``expires`` lies in the past."""


class RollbackError(BundleError):
    """A version that would move a device backwards (security version, root version)."""


class BadVersionNumberError(RollbackError):
    """A new root whose version is not exactly the trusted version plus one."""


class HashMismatchError(BundleError):
    """Payload bytes whose SHA-256 differs from the signed manifest's."""


class SizeMismatchError(BundleError):
    """Payload bytes fewer or more than the signed manifest declares."""


class UnsafeArchiveError(BundleError):
    """A payload archive entry that could escape, or harm, the extraction target."""


class ArchiveLimitError(UnsafeArchiveError):
    """A payload archive that expands past a file-count or byte limit (a decompression bomb)."""


class LocalError(Exception):
    """The environment, configuration or operator input is wrong: fix it locally and retry."""


class KeyFileError(LocalError):
    """A private key file that is missing, malformed, of the wrong type or too open."""


class PassphraseError(KeyFileError):
    """A private key file that needs a passphrase and got none, or got the wrong one."""


class SourceError(LocalError):
    """A source directory that cannot be packed into a bundle (special files, outward links)."""
