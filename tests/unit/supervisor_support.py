"""Helpers for the supervisor's process tests: a table that cleans up after itself, deadlines."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edge_agent.supervisor.processes import MARKER, Exited, Launch, ProcessTable

PY = sys.executable


def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what or predicate}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def exists(pid: int) -> bool:
    """Whether ``pid`` exists at all (a zombie counts)."""
    return Path(f"/proc/{pid}").exists()


class Exits:
    """The on_exit callback: a queue the test waits on."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Exited] = queue.Queue()

    def __call__(self, exited: Exited) -> None:
        self.queue.put(exited)

    def next(self, timeout_s: float = 5.0) -> Exited:
        return self.queue.get(timeout=timeout_s)

    def empty(self) -> bool:
        return self.queue.empty()


def python_launch(
    code: str, tmp_path: Path, *, instance: str = "web.g1", workload: str = "web", **kwargs: object
) -> Launch:
    return Launch(
        workload=workload,
        instance=instance,
        argv=(PY, "-u", "-c", code),
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", os.defpath)},
        **kwargs,  # type: ignore[arg-type]
    )


def kill_marked(tag: str) -> None:
    """SIGKILL every process that carries ``tag``'s marker (the fixtures' last resort)."""
    prefix = f"{MARKER}={tag}:".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(
                item.startswith(prefix)
                for item in Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            ):
                os.kill(int(name), signal.SIGKILL)


@contextlib.contextmanager
def table_in(state_dir: Path, exits: Exits, **kwargs: object) -> Iterator[ProcessTable]:
    """A table whose processes are all gone when the block ends."""
    table = ProcessTable(state_dir, on_exit=exits, orphan_scan_s=0.1, **kwargs)  # type: ignore[arg-type]
    try:
        yield table
    finally:
        for instance in list(table.running()):
            table.stop(instance, grace_s=0)
        table.close()
        kill_marked(table.tag)
        reap_children()


def reap_children() -> None:
    """Reap our exited children that nobody waits for (orphans reparented to the test)."""
    for _ in range(100):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
