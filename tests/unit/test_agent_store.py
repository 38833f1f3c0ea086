"""Atomic state on disk: old or new, never torn."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_agent.core import AgentState, HistoryEntry
from edge_agent.runtime import ApplyError, ConfigFileApplier
from edge_agent.store import StateStore, atomic_write_bytes, remove_stale_temporaries
from protocols import Desired


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = AgentState(
        3, 4, "boom", 99, 7, (HistoryEntry(3, True, 1.5), HistoryEntry(4, False, 2.0))
    )
    store.save(state)
    assert store.load() == state


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "new").load() == AgentState()


def test_failed_replace_leaves_old_file_and_no_temporaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b'{"old": true}')

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b'{"new": true}')
    monkeypatch.undo()
    assert target.read_bytes() == b'{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_leftover_temporaries_are_removed_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / ".state.json.abc.tmp").write_bytes(b'{"half')
    StateStore(tmp_path).load()  # a reader must not delete a writer's temp file
    assert list(tmp_path.glob(".*.tmp"))
    assert remove_stale_temporaries(tmp_path) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_state_is_moved_aside_not_lost(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"\x00garbage")
    assert StateStore(tmp_path).load() == AgentState()
    assert (tmp_path / "state.corrupt").read_bytes() == b"\x00garbage"


def test_config_applier_writes_generation_and_config(tmp_path: Path) -> None:
    applier = ConfigFileApplier(tmp_path)
    applier.apply(Desired(device_id="d", generation=2, config={"k": [1]}, issued_at=5.0))
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "generation": 2,
        "issued_at": 5.0,
        "config": {"k": [1]},
    }


def test_config_applier_reports_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ApplyError, match="cannot write"):
        ConfigFileApplier(blocker).apply(
            Desired(device_id="d", generation=1, config={}, issued_at=0)
        )
