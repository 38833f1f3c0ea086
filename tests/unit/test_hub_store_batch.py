"""Batch ingest in SQL Core: what a batch writes, row by row, equals applying the rules in order.

``store.apply_messages`` reads tracking columns, runs ``hub.devices.rules`` in memory and
writes back only the columns that changed (one executemany per set of columns).
These tests pin the cases where that shortcut could differ from the ORM version
it replaced: several messages for one device, re-keying mid-batch, rows that
change different columns, and rows that change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.db import init_db, make_engine, new_session
from hub.devices import store
from protocols import Birth, Reported, Status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    instance = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=10_000)
    init_db(instance)
    with new_session(instance) as s:
        store.register_devices(s, devices=[("a", {}), ("b", {}), ("c", {})], now=NOW)
    yield instance
    instance.dispose()


def report(device_id: str, seq: int, applied: int, *, failed: int = 0) -> Reported:
    phase = "failed" if failed > applied else "applied"
    return Reported(
        device_id=device_id, boot_epoch=1, seq=seq, phase=phase,
        generation=max(applied, failed), applied_generation=applied,
        failed_generation=failed, error="boom" if phase == "failed" else None, ts=1,
    )  # fmt: skip


def test_a_report_past_the_hub_rekeys_and_later_messages_see_the_new_generation(
    engine: Engine,
) -> None:
    with new_session(engine) as s:
        store.set_desired(s, device_id="a", config={"v": 1}, now=NOW, max_config_bytes=1000)
    later = NOW + timedelta(seconds=5)
    batch = [
        report("a", 1, applied=7),  # the device is ahead of the hub's generation 1
        report("a", 2, applied=7),  # still behind the re-issued generation 8: no new rekey
        report("b", 1, applied=0),
    ]
    with new_session(engine) as s:
        result = store.apply_messages(s, batch, now=later)
    assert result.outcomes == ["applied", "applied", "applied"]
    assert result.republish == ["a"]
    with new_session(engine) as s:
        a = store.get_device(s, device_id="a")
    assert (a.desired_generation, a.desired_config, a.desired_updated_at) == (8, {"v": 1}, later)
    assert (a.reported_generation, a.last_report_seq, a.last_seen) == (7, 2, later)


def test_rows_changing_different_columns_in_one_batch_are_all_written(engine: Engine) -> None:
    first = [
        Birth(device_id="a", session=3, boot_epoch=1, seq=0, applied_generation=0,
              agent_version="1.0", ts=1),
        report("b", 1, applied=0, failed=2),
        Status(device_id="c", online=True, session=1, ts=1),
    ]  # fmt: skip
    with new_session(engine) as s:
        assert store.apply_messages(s, first, now=NOW).outcomes == ["applied"] * 3
    second = [
        report("a", 1, applied=0),  # only seq and last_seen change
        Status(device_id="c", online=False, session=1, ts=2),  # online and last_seen
        report("b", 1, applied=0, failed=2),  # stale duplicate: nothing written
    ]
    later = NOW + timedelta(seconds=1)
    with new_session(engine) as s:
        outcomes = store.apply_messages(s, second, now=later).outcomes
    assert outcomes == ["applied", "applied", "stale_report"]
    with new_session(engine) as s:
        a, b, c = (store.get_device(s, device_id=i) for i in "abc")
    assert (a.session, a.online, a.agent_version, a.last_report_seq, a.last_seen) == (
        3, True, "1.0", 1, later,
    )  # fmt: skip
    assert (b.report_phase, b.failed_generation, b.report_error, b.last_seen) == (
        "failed", 2, "boom", NOW,
    )  # fmt: skip
    assert (c.online, c.session, c.last_seen) == (False, 1, later)


def test_a_batch_of_only_stale_or_unknown_messages_writes_nothing(engine: Engine) -> None:
    with new_session(engine) as s:
        store.apply_messages(s, [report("a", 5, applied=0)], now=NOW)
    later = NOW + timedelta(seconds=1)
    with new_session(engine) as s:
        result = store.apply_messages(
            s, [report("a", 5, applied=0), report("ghost", 1, applied=0)], now=later
        )
    assert result.outcomes == ["stale_report", "unknown_device"]
    with new_session(engine) as s:
        assert store.get_device(s, device_id="a").last_seen == NOW
