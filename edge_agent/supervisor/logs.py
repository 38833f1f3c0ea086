"""Workload log files: where they are, how the child writes them, size-bounded rotation, tail.

Rules:
- A workload's stdout and stderr go straight into ``logs/<workload>/current.log``,
  opened ``O_APPEND`` and handed to the child as its fds 1 and 2. No pipe through
  the agent: a workload survives an agent restart without SIGPIPE and costs the
  agent nothing per line. Two instances of one workload (a hand-over) append to
  the same file.
- Rotation is copy-then-truncate (the writer keeps its fd): when ``current.log`` is
  over ``max_bytes``, ``.k`` moves to ``.k+1`` (the oldest past ``keep`` is deleted),
  the last ``max_bytes`` of ``current.log`` (from the first line start in them)
  are copied to ``current.log.1`` (the newest) and ``current.log`` is truncated
  to zero. ``O_APPEND`` makes the writer's next line land at offset 0, never
  past a hole. So the directory holds at most
  ``(keep + 1) * max_bytes`` plus what the workload wrote since the last rotation.
  Lines written between the copy and the truncate are lost (logrotate's
  ``copytruncate`` has the same window): the price of never signalling the workload.
- :func:`tail` reads a bounded number of bytes (never the whole file) and decodes
  with ``errors="replace"``: a workload may write anything.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CURRENT = "current.log"
COPY_CHUNK = 1 << 16


def log_dir(logs_root: Path, workload: str) -> Path:
    """Pure: the directory of one workload's logs."""
    return logs_root / workload


def open_for_child(path: Path) -> int:
    """Create the log's directory and open it for appending; returns an fd the caller closes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def rotated(path: Path, index: int) -> Path:
    """Pure: the ``index``-th rotated copy (1 is the newest)."""
    return path.with_name(f"{path.name}.{index}")


def rotate(path: Path, *, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` if it is over ``max_bytes``; returns whether it did. Raises OSError.

    ``keep`` = 0 only truncates (the log's last bytes are then gone).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    with contextlib.suppress(FileNotFoundError):
        rotated(path, keep + 1).unlink()  # a keep lowered since the last rotation
    if keep > 0:
        with contextlib.suppress(FileNotFoundError):
            rotated(path, keep).unlink()
        for index in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(rotated(path, index), rotated(path, index + 1))
        _copy_tail(path, rotated(path, 1), max_bytes)
    with open(path, "r+b") as handle:
        handle.truncate(0)
    return True


def tail(path: Path, lines: int = 20, max_bytes: int = 4096) -> list[str]:
    """The last ``lines`` lines of the log, from at most its last ``max_bytes``.

    Just after a rotation ``current.log`` is nearly empty, so the newest rotated copy
    is read before it. A first line cut by the byte bound is dropped. Never raises
    for a missing log (empty list).
    """
    if lines <= 0 or max_bytes <= 0:
        return []
    data, cut = _last_bytes(path, max_bytes)
    if len(data) < max_bytes:
        older, cut = _last_bytes(rotated(path, 1), max_bytes - len(data))
        data = older + data
    text = data.decode("utf-8", errors="replace")
    found = text.splitlines()
    if cut and found and not text.startswith("\n"):
        found = found[1:]  # begins mid-line
    return found[-lines:]


def directory_bytes(directory: Path) -> int:
    """The total size of the files in one directory (0 if it is missing)."""
    try:
        return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())
    except FileNotFoundError:
        return 0


def _last_bytes(path: Path, limit: int) -> tuple[bytes, bool]:
    """At most the last ``limit`` bytes, and whether the file has more before them."""
    if limit <= 0:
        return b"", True
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - limit)
            handle.seek(start)
            return handle.read(limit), start > 0
    except FileNotFoundError:
        return b"", False


def _copy_tail(source: Path, target: Path, max_bytes: int) -> None:
    """Copy at most the last ``max_bytes`` of ``source``, from a line start where there is one."""
    tmp = target.with_name(f".{target.name}.tmp")
    with open(source, "rb") as reader, open(tmp, "wb") as writer:
        size = reader.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        reader.seek(start)
        left = max_bytes
        first = True
        while left > 0:
            chunk = reader.read(min(COPY_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            if first and start > 0:
                newline = chunk.find(b"\n")
                chunk = chunk[newline + 1 :] if newline >= 0 else chunk
            first = False
            writer.write(chunk)
    os.chmod(tmp, 0o640)
    os.replace(tmp, target)
