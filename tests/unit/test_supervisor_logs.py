"""Workload logs: rotation, tails, and a chatty real child that never outgrows its bound."""

from __future__ import annotations

import os
import time
from pathlib import Path

from edge_agent.supervisor import logs
from tests.unit.supervisor_support import Exits, python_launch, table_in, wait_for


def _log(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "web" / logs.CURRENT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_log_under_its_size_is_not_rotated(tmp_path: Path) -> None:
    path = _log(tmp_path, b"x" * 100)
    assert not logs.rotate(path, max_bytes=100, keep=2)
    assert not logs.rotate(tmp_path / "missing.log", max_bytes=1, keep=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["current.log"]


def test_rotation_copies_the_last_bytes_truncates_and_keeps_the_newest_copies(
    tmp_path: Path,
) -> None:
    path = _log(tmp_path, b"")
    for round_ in range(4):
        path.write_bytes(f"round {round_}\n".encode() * 20)
        assert logs.rotate(path, max_bytes=50, keep=2)
        assert path.stat().st_size == 0
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["current.log", "current.log.1", "current.log.2"]
    assert logs.rotated(path, 1).read_bytes() == b"round 3\n" * 6  # the whole lines in 50 B
    assert logs.rotated(path, 2).read_bytes().endswith(b"round 2\n")


def test_keep_zero_only_truncates(tmp_path: Path) -> None:
    path = _log(tmp_path, b"a" * 10)
    assert logs.rotate(path, max_bytes=5, keep=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["current.log"]


def test_an_appending_writer_goes_on_at_the_start_after_a_rotation(tmp_path: Path) -> None:
    path = _log(tmp_path, b"")
    fd = logs.open_for_child(path)
    try:
        os.write(fd, b"old line\n" * 10)
        assert logs.rotate(path, max_bytes=10, keep=1)
        os.write(fd, b"new line\n")
        assert path.read_bytes() == b"new line\n"  # no hole of zeros before it
    finally:
        os.close(fd)


def test_tail_returns_the_last_lines_within_the_byte_bound(tmp_path: Path) -> None:
    path = _log(tmp_path, b"".join(f"line {i}\n".encode() for i in range(1000)))
    assert logs.tail(path, lines=3) == ["line 997", "line 998", "line 999"]
    short = logs.tail(path, lines=100, max_bytes=30)
    assert short == ["line 997", "line 998", "line 999"]  # "ne 996" cut off: dropped
    assert logs.tail(tmp_path / "nothing.log") == []


def test_tail_reads_into_the_newest_rotated_copy_and_replaces_bad_bytes(tmp_path: Path) -> None:
    path = _log(tmp_path, b"first\nsecond\n")
    logs.rotate(path, max_bytes=10, keep=1)
    assert logs.rotated(path, 1).read_bytes() == b"second\n"  # from a line start
    path.write_bytes(b"third \xff\xfe\n")
    assert logs.tail(path, lines=3) == ["second", "third \ufffd\ufffd"]


def test_a_chatty_workload_never_outgrows_its_bound(tmp_path: Path) -> None:
    max_bytes, keep = 16 * 1024, 3
    code = (
        "import time\nline = 'x' * 1000\n"
        "for i in range(600):\n    print(i, line)\n    time.sleep(0.002)\n"
    )
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch(code, tmp_path, log_max_bytes=max_bytes, log_keep=keep))
        directory = table.log_path("web").parent
        slack = 64 * 1024  # what it writes between two rotations, 20 ms apart here
        largest = 0
        while exits.empty():
            table.rotate_logs()
            largest = max(largest, logs.directory_bytes(directory))
            assert largest <= (keep + 1) * max_bytes + slack
            time.sleep(0.02)  # the runtime's rotation period, shortened
        assert exits.next().exit_code == 0
        table.rotate_logs()
        names = sorted(p.name for p in directory.iterdir())
        assert names == ["current.log", "current.log.1", "current.log.2", "current.log.3"]
        wait_for(lambda: table.log_tail("web", lines=1) != [])
        assert table.log_tail("web", lines=1)[0].startswith("599 ")
        assert largest > max_bytes  # it really was chatty enough to rotate
