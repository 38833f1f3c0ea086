"""The data-access layer on a real SQLite file: transactions, generations, batch ingest."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.db import init_db, make_engine, new_session
from hub.devices import store
from hub.devices.errors import ConfigTooLarge, DeviceExists, DeviceNotFound
from hub.enrollment.models import DeviceCertificate
from protocols import Birth, Reported, Status

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    instance = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=10_000)
    init_db(instance)
    yield instance
    instance.dispose()


def register(engine: Engine, *ids: str) -> None:
    for device_id in ids:
        with new_session(engine) as s:
            store.register_device(s, device_id=device_id, labels={}, now=NOW)


def set_desired(engine: Engine, device_id: str, **config: object) -> int:
    with new_session(engine) as s:
        row = store.set_desired(
            s, device_id=device_id, config=config, now=NOW, max_config_bytes=1000
        )
        return row.desired_generation


def test_sqlite_runs_in_wal_mode(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_domain_errors(engine: Engine) -> None:
    register(engine, "a")
    with new_session(engine) as s, pytest.raises(DeviceExists):
        store.register_device(s, device_id="a", labels={}, now=NOW)
    with new_session(engine) as s, pytest.raises(DeviceNotFound):
        store.set_desired(s, device_id="b", config={}, now=NOW, max_config_bytes=10)
    with new_session(engine) as s, pytest.raises(ConfigTooLarge):
        store.set_desired(s, device_id="a", config={"x": "y" * 10}, now=NOW, max_config_bytes=10)
    with new_session(engine) as s, pytest.raises(DeviceNotFound):
        store.decommission_device(s, device_id="b", now=NOW)
    with new_session(engine) as s, pytest.raises(DeviceNotFound):
        store.purge_device(s, device_id="b", now=NOW, require_cut_off=False)


def test_timestamps_come_back_aware_utc(engine: Engine) -> None:
    register(engine, "a")
    set_desired(engine, "a", k=1)
    with new_session(engine) as s:
        row = store.get_device(s, device_id="a")
    assert row.created_at == NOW and row.created_at.tzinfo is not None
    assert row.desired_updated_at == NOW
    with new_session(engine) as s:
        (doc,) = store.desired_documents(s, device_ids=["a"]).values()
    assert doc is not None and doc.issued_at == NOW.timestamp() and doc.generation == 1


def test_concurrent_changes_never_share_a_generation(engine: Engine) -> None:
    """Invariant 1 under contention: N writers, N distinct generations, no lost update."""
    register(engine, "a")
    seen: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for i in range(25):
                generation = set_desired(engine, "a", writer=n, i=i)
                with lock:
                    seen.append(generation)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(seen) == list(range(1, 101))
    with new_session(engine) as s:
        assert store.get_device(s, device_id="a").desired_generation == 100


def test_apply_messages_is_one_batch_with_outcomes_in_order(engine: Engine) -> None:
    register(engine, "a", "b")
    set_desired(engine, "a", v=1)
    set_desired(engine, "a", v=2)  # a wants generation 2
    batch = [
        Birth(device_id="a", session=1, boot_epoch=1, seq=0, applied_generation=1,
              agent_version="1", ts=1),
        Reported(device_id="a", boot_epoch=1, seq=1, phase="applied", generation=2,
                 applied_generation=2, ts=2),
        Reported(device_id="a", boot_epoch=1, seq=1, phase="applied", generation=2,
                 applied_generation=2, ts=2),
        Status(device_id="b", online=True, session=0, ts=1),
        Status(device_id="ghost", online=True, session=0, ts=1),
        Birth(device_id="a", session=0, boot_epoch=9, seq=9, applied_generation=0,
              agent_version="old", ts=1),
    ]  # fmt: skip
    with new_session(engine) as s:
        result = store.apply_messages(s, batch, now=NOW)
    assert result.outcomes == [
        "applied",
        "applied",
        "stale_report",
        "applied",
        "unknown_device",
        "stale_birth",
    ]
    assert result.republish == ["a"]  # its birth announced generation 1 < 2
    with new_session(engine) as s:
        a = store.get_device(s, device_id="a")
        b = store.get_device(s, device_id="b")
    assert (a.reported_generation, a.session, a.online, a.agent_version) == (2, 1, True, "1")
    assert (a.last_report_epoch, a.last_report_seq) == (1, 1)
    assert (b.online, b.session, b.last_seen) == (True, 0, NOW)
    with new_session(engine) as s:
        assert store.out_of_sync_ids(s) == []


def test_out_of_sync_and_documents_for_decommissioned_and_purged_devices(engine: Engine) -> None:
    register(engine, "a", "b", "c", "d")
    for device_id in ("a", "c", "d"):
        set_desired(engine, device_id, v=1)
    with new_session(engine) as s:
        assert store.out_of_sync_ids(s) == ["a", "c", "d"]
    with new_session(engine) as s:
        store.decommission_device(s, device_id="c", now=NOW)
        store.decommission_device(s, device_id="d", now=NOW)
        store.purge_device(s, device_id="d", now=NOW, require_cut_off=False)
    with new_session(engine) as s:
        assert store.out_of_sync_ids(s) == ["a"]  # a decommissioned device is owed nothing
        docs = store.desired_documents(s, device_ids=["a", "b", "c", "d"])
    assert docs["a"] is not None and docs["a"].config == {"v": 1}
    assert docs["b"] is None  # nothing desired yet: nothing to deliver
    assert docs["c"] is None  # decommissioned: clear the retained copy
    assert docs["d"] is None  # purged: likewise


def test_failed_summary(engine: Engine) -> None:
    register(engine, "a", "b")
    set_desired(engine, "a", v=1)
    failed = Reported(
        device_id="a", boot_epoch=1, seq=1, phase="failed", generation=1,
        applied_generation=0, failed_generation=1, error="exit 3", ts=1,
    )  # fmt: skip
    with new_session(engine) as s:
        store.apply_messages(s, [failed], now=NOW)
    with new_session(engine) as s:
        summary = store.fleet_summary(s)
    assert (summary.total, summary.failed, summary.in_sync, summary.out_of_sync) == (2, 1, 1, 1)


def test_summary_counts_every_column_in_one_pass(engine: Engine) -> None:
    """Generations, online, failed, in and out of sync; decommissioned devices apart."""
    register(engine, "a", "b", "c", "d", "e")
    for device_id in ("a", "b", "c", "d"):
        set_desired(engine, device_id, v=1)
    set_desired(engine, "b", v=2)
    failed = Reported(
        device_id="c", boot_epoch=1, seq=1, phase="failed", generation=1,
        applied_generation=0, failed_generation=1, error="exit 3", ts=1,
    )  # fmt: skip
    applied = Reported(
        device_id="a", boot_epoch=1, seq=1, phase="applied", generation=1,
        applied_generation=1, ts=1,
    )  # fmt: skip
    online = [Status(device_id=d, online=True, session=1, ts=1) for d in ("a", "d")]
    with new_session(engine) as s:
        store.apply_messages(s, [failed, applied, *online], now=NOW)
    with new_session(engine) as s:
        store.decommission_device(s, device_id="d", now=NOW)
    with new_session(engine) as s:
        summary = store.fleet_summary(s)
    assert summary == store.Summary(
        total=4,  # a, b, c, e
        online=2,  # a, and c: a report says it is there (d is decommissioned)
        in_sync=2,  # a applied 1; e has nothing desired
        out_of_sync=2,  # b (wants 2), c (failed 1)
        failed=1,
        by_generation={0: 1, 1: 2, 2: 1},
        decommissioned=1,
    )


def test_the_change_feed_gives_each_transaction_one_mark_and_only_what_is_newer(
    engine: Engine,
) -> None:
    """What a link polls when API-only processes commit changes (hub serve --no-link)."""
    now = datetime.now(UTC)
    with new_session(engine) as s:
        store.register_devices(s, devices=[("a", {}), ("b", {}), ("c", {})], now=now)
        start = store.desired_seq_now(s)
        store.set_desired(s, device_id="a", config={"v": 1}, now=now, max_config_bytes=10_000)
        changes, mark = store.desired_changes_since(s, seq=start, limit=100)
        assert changes == [("a", 1)] and mark == start + 1
        store.set_desired_for_selector(
            s, labels=None, config={"v": 2}, now=now, max_config_bytes=10_000
        )
        fleet, fleet_mark = store.desired_changes_since(s, seq=mark, limit=100)
        assert sorted(fleet) == [("a", 2), ("b", 1), ("c", 1)] and fleet_mark == mark + 1
        assert store.desired_changes_since(s, seq=fleet_mark, limit=100) == ([], fleet_mark)
        # Registering or reporting is not a desired change.
        store.register_devices(s, devices=[("d", {})], now=now)
        assert store.desired_changes_since(s, seq=fleet_mark, limit=100)[0] == []


def test_decommission_and_purge_are_in_the_change_feed_and_a_mark_is_never_reused(
    engine: Engine,
) -> None:
    """A link following the feed must hear of a decommission (to clear the retained
    document and cut the device off) and of a purge, and purging the device with the
    newest mark must not hand that mark out again: a poller already past it would
    skip the next change for good."""
    register(engine, "a", "b")
    set_desired(engine, "a", v=1)
    set_desired(engine, "b", v=1)
    with new_session(engine) as s:
        mark = store.desired_seq_now(s)
        store.decommission_device(s, device_id="b", now=NOW)  # b takes the newest mark
    with new_session(engine) as s:
        changes, mark = store.desired_changes_since(s, seq=mark, limit=100)
        assert changes == [("b", 2)]  # a new generation: the cleared document
        store.purge_device(s, device_id="b", now=NOW, require_cut_off=False)
    with new_session(engine) as s:
        changes, mark = store.desired_changes_since(s, seq=mark, limit=100)
        assert changes == [("b", None)]
    set_desired(engine, "a", v=2)
    with new_session(engine) as s:
        changes, newest = store.desired_changes_since(s, seq=mark, limit=100)
        assert changes == [("a", 2)] and newest == mark + 1
        assert store.desired_seq_now(s) == newest


def test_a_birth_naming_a_revoked_certificate_is_refused_and_a_current_one_counts(
    engine: Engine,
) -> None:
    """The store looks up what a birth's ``cert_serial`` is on record for that device."""
    register(engine, "a")
    with new_session(engine) as s:
        s.add(DeviceCertificate(serial="ab", device_id="a", not_after=NOW, issued_at=NOW))
        s.add(
            DeviceCertificate(
                serial="cd", device_id="a", not_after=NOW, issued_at=NOW, revoked_at=NOW
            )
        )
        s.add(DeviceCertificate(serial="ef", device_id="other", not_after=NOW, issued_at=NOW))
        s.commit()

    def birth(session: int, serial: str | None) -> Birth:
        return Birth(
            device_id="a", session=session, boot_epoch=session, seq=0, applied_generation=0,
            agent_version="t", cert_serial=serial, ts=1,
        )  # fmt: skip

    with new_session(engine) as s:
        result = store.apply_messages(s, [birth(1, "cd"), birth(2, "ab")], now=NOW)
    assert result.outcomes == ["revoked_certificate", "applied"]
    with new_session(engine) as s:
        row = store.get_device(s, device_id="a")
        row.awaiting_birth = True  # as after a re-enrollment
        s.add(row)
        s.commit()
    with new_session(engine) as s:  # another device's serial or none: not this unit's
        result = store.apply_messages(s, [birth(3, "ef"), birth(4, None)], now=NOW)
    assert result.outcomes == ["awaiting_birth", "awaiting_birth"]
