"""Every size, count and time limit of the bundle system, in one object.

Rules:
- Units are in the names (``_bytes``, ``_s``); nothing else in the package
  spells a limit as a literal.
- Limits are enforced while reading, before memory is spent: a signed-metadata
  document longer than ``max_metadata_bytes`` is refused before it is parsed,
  a payload byte past the declared size is refused as it arrives, an archive is
  measured as it expands.
- ``max_clock_skew_s`` bounds the allowance a caller may grant for a device's
  clock running ahead (metadata is taken until ``expires`` plus the allowance,
  by the device's clock): an allowance above it is a programming error
  (``ValueError``), not a way to accept old metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits used by parsing, verification, building and extraction."""

    max_metadata_bytes: int = 64 * 1024
    """Largest signed-metadata document (root or manifest envelope) we parse."""
    max_signatures: int = 32
    """Most signatures one envelope may carry (each costs a verification)."""
    max_root_chain: int = 64
    """Most root versions walked in one update."""
    max_payload_bytes: int = 4 * GiB
    """Largest payload (compressed archive) a manifest may declare."""
    chunk_bytes: int = 1 * MiB
    """Read size when streaming a payload."""
    max_extract_files: int = 20_000
    """Most archive entries (files, directories, links) one payload may unpack."""
    max_extract_bytes: int = 8 * GiB
    """Most bytes of file content one payload may unpack."""
    max_tar_stream_bytes: int = 9 * GiB
    """Most bytes of decompressed tar stream read (headers, padding and content together)."""
    max_tar_header_bytes: int = 64 * 1024
    """Largest extended header (pax, GNU long name) read into memory."""
    max_path_bytes: int = 1024
    """Longest entry name or symlink target in an archive."""
    default_clock_skew_s: int = 300
    """Allowance for a device clock that runs ahead, when the caller gives none."""
    max_clock_skew_s: int = 24 * 3600
    """Largest allowance a caller may grant."""


DEFAULT_LIMITS = Limits()
