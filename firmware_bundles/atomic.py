"""Atomic, durable file replacement: how this package, the agent and the hub replace files.

Rules:
- Data goes to a temporary file in the target's directory (same filesystem),
  is flushed and fsynced, then ``os.replace``-d over the target, and the
  directory is fsynced: a crash, even a power cut, leaves the old file or the
  new, never a mix, and a rename that returned is not undone.
- On any error the temporary file is removed and the target is untouched.
- Temporary names start with ``.`` and end with ``.tmp``, and are unique, so
  concurrent writers of one target never share one.
- ``durable=False`` (atomic for readers, nothing fsynced) is for files derived
  from a truth kept elsewhere and rewritten at start, and only with a reason
  in the caller's docstring.
- Standard library only: the agent imports this on every start (``edge_agent.store``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(target: Path, mode: int = 0o644, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A temporary file beside ``target`` that replaces it only if the block succeeds.

    ``durable=False`` skips both fsyncs: readers still see the old file or the
    new, but a power cut may lose the new one (or, on some filesystems, leave it
    empty). Only for files rebuilt from elsewhere after a restart.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_write_bytes(
    target: Path, data: bytes, mode: int = 0o644, *, durable: bool = True
) -> None:
    """Replace ``target`` with ``data`` atomically (and durably unless told not to, see
    :func:`atomic_output`); raises OSError."""
    with atomic_output(target, mode, durable=durable) as handle:
        handle.write(data)
