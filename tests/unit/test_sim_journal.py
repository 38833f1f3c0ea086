"""The simulated devices' disks: journals survive kills, torn lines, compaction and re-splits."""

from __future__ import annotations

from pathlib import Path

from edge_agent.core import AgentState, HistoryEntry
from simulator.journal import Journal, journal_path, read_journal, redistribute, write_states


def state(epoch: int, session: int, applied: int = 0) -> AgentState:
    return AgentState(
        applied_generation=applied,
        boot_epoch=epoch,
        session=session,
        history=(HistoryEntry(applied, True, 1.5),) if applied else (),
    )


def test_a_missing_journal_is_empty(tmp_path: Path) -> None:
    assert read_journal(tmp_path / "none.jsonl") == ({}, 0)


def test_saves_are_on_disk_at_once_and_the_last_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    journal = Journal(path)
    journal.save("a", state(100, 1))
    journal.save("b", state(100, 1))
    journal.save("a", state(100, 2, applied=3))
    # Read by someone else without closing: what a SIGKILL would leave behind.
    states, bad = read_journal(path)
    assert bad == 0
    assert states == {"a": state(100, 2, applied=3), "b": state(100, 1)}
    journal.close()


def test_a_torn_last_line_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    write_states(path, {"a": state(100, 1), "b": state(100, 4)})
    with path.open("ab") as handle:
        handle.write(b'{"d":"a","s":{"applied_gen')  # killed mid-write
    states, bad = read_journal(path)
    assert bad == 1 and states == {"a": state(100, 1), "b": state(100, 4)}
    journal = Journal(path)  # starting again compacts the damage away
    assert journal.states == states and journal.unreadable == 1
    journal.close()
    assert read_journal(path) == (states, 0)
    assert len(path.read_bytes().splitlines()) == 2


def test_the_journal_compacts_itself_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    journal = Journal(path, compact_factor=2, min_lines=10)
    for i in range(1000):
        journal.save(f"d{i % 5}", state(100, i))
    journal.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) <= 10 + 1
    states, bad = read_journal(path)
    assert bad == 0 and states == {f"d{k}": state(100, 995 + k) for k in range(5)}


def test_a_closed_journal_keeps_states_in_memory_only(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    journal = Journal(path)
    journal.close()
    journal.save("a", state(1, 1))
    assert journal.states == {"a": state(1, 1)} and read_journal(path)[0] == {}


def test_redistribute_merges_by_newest_session_and_splits_by_slice(tmp_path: Path) -> None:
    # A run with 3 workers left these; the next run has 2 slices and a new device.
    write_states(journal_path(tmp_path, 0), {"a": state(100, 5), "b": state(100, 1)})
    write_states(journal_path(tmp_path, 1), {"c": state(100, 2), "a": state(90, 9)})
    write_states(journal_path(tmp_path, 2), {"x": state(100, 1)})  # another prefix
    paths = redistribute(tmp_path, [["a", "b"], ["c", "d"]])
    assert paths == [journal_path(tmp_path, 0), journal_path(tmp_path, 1)]
    assert read_journal(paths[0])[0] == {"a": state(100, 5), "b": state(100, 1)}
    assert read_journal(paths[1])[0] == {"c": state(100, 2)}
    assert not journal_path(tmp_path, 2).exists()
    assert read_journal(tmp_path / "others.jsonl")[0] == {"x": state(100, 1)}
    # ... and a later run with the other prefix gets its device back.
    (again,) = redistribute(tmp_path, [["x", "a"]])
    assert read_journal(again)[0] == {"x": state(100, 1), "a": state(100, 5)}
