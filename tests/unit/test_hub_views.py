"""The API's fast read path answers exactly what the public models would."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from hub.db import init_db, make_engine, new_session
from hub.devices import store, views
from hub.devices.models import Device, DevicePage, DevicePublic

NOW = datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=UTC)
INVENTORY = {
    "arch": "aarch64",
    "os": "Linux 6.1.0",
    "cpu_count": 4,
    "mem_total_bytes": 2 * 1024**3,
    "mem_free_bytes": 10**9,
    "disk_total_bytes": 16 * 1024**3,
    "disk_free_bytes": 8 * 1024**3,
}


def populated(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=5000)
    init_db(engine)
    with new_session(engine) as session:
        session.add(Device(id="a-fresh", labels={}, created_at=NOW))
        session.add(
            Device(
                id="b-busy",
                labels={"site": "lab", "ünï": "cödé"},
                created_at=NOW,
                desired_generation=7,
                desired_config={"rate": 0.5, "nested": {"list": [1, "two", None]}},
                desired_updated_at=NOW + timedelta(seconds=1),
                reported_generation=6,
                failed_generation=7,
                report_phase="failed",
                report_error='boom: "quoted" \n newline',
                report_generation=7,
                last_report_epoch=1795946001,
                last_report_seq=42,
                session=12,
                online=True,
                last_seen=NOW + timedelta(seconds=2),
                agent_version="0.1.0",
                inventory={**INVENTORY, "future_field": "ignored"},
            )
        )
        session.add(
            Device(id="c-odd", labels={}, created_at=NOW, report_phase="weird", inventory=None)
        )
        session.commit()
    return engine


def test_a_page_is_byte_for_byte_the_models_json(tmp_path: Path) -> None:
    engine = populated(tmp_path)
    with new_session(engine) as session:
        rows, total = store.device_page(session, limit=10, offset=0)
        orm_rows, orm_total = store.list_devices(session, limit=10, offset=0)
        fast = json.loads(views.device_page(rows, total=total, limit=10, offset=0).body)
        model = DevicePage(
            items=[DevicePublic.from_row(r) for r in orm_rows],
            total=orm_total,
            limit=10,
            offset=0,
        ).model_dump(mode="json")
    assert fast == model
    assert [d["id"] for d in fast["items"]] == ["a-fresh", "b-busy", "c-odd"]
    busy = fast["items"][1]
    # the optional fields a birth from before them (firmware slot, cgroups) lacks are null
    optional = {"firmware_slot": None, "firmware_version": None, "cgroups": None}
    assert busy["inventory"] == {**INVENTORY, **optional}
    assert busy["status"]["phase"] == "failed"
    assert busy["last_seen"] == "2026-11-29T10:00:02.123456Z"


def test_one_device_and_label_filters_agree_with_the_models(tmp_path: Path) -> None:
    engine = populated(tmp_path)
    with new_session(engine) as session:
        fast = json.loads(
            views.json_response(views.device(store.device_row(session, device_id="b-busy"))).body
        )
        model = DevicePublic.from_row(store.get_device(session, device_id="b-busy"))
        assert fast == model.model_dump(mode="json")
        rows, total = store.device_page(session, limit=5, offset=0, labels={"site": "lab"})
        assert ([r["id"] for r in rows], total) == (["b-busy"], 1)
