"""Relabelling a device while device reports are being written (``hub/devices/routes.py``).

The labels routes read the labels, then plan the fleet and write in the same
transaction. A device report the ingest worker commits in between must make the
relabel wait for the write lock, never fail it with "database is locked" (a read
snapshot cannot be upgraded to a write once another writer committed; found by
tests/integration/test_orchestration.py's stack, PATCH answered 500).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.devices import routes
from hub.settings import HubSettings
from tests.unit.auth_support import api_client


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "hub.db"


@pytest.fixture
def client(db: Path) -> Iterator[TestClient]:
    settings = HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{db}")
    with api_client(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "body"), [("PUT", {"labels": {"env": "prod"}}), ("PATCH", {"env": "prod"})]
)
def test_a_relabel_waits_for_a_report_written_meanwhile_instead_of_failing(
    client: TestClient, db: Path, monkeypatch: pytest.MonkeyPatch, method: str, body: Any
) -> None:
    for device_id in ("d1", "d2"):
        assert client.post("devices", json={"id": device_id, "labels": {"env": "dev"}}).is_success
    other = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 10})
    report_errors: list[Exception] = []

    def report() -> None:  # what the ingest worker does for d2, on its own connection
        try:
            with other.begin() as connection:
                connection.exec_driver_sql(
                    "UPDATE device SET reported_generation = 7 WHERE id = 'd2'"
                )
        except sqlalchemy.exc.OperationalError as exc:
            report_errors.append(exc)

    writer = threading.Thread(target=report)
    read = routes.store.device_row

    def read_while_a_report_arrives(session: Any, *, device_id: str) -> Any:
        row = read(session, device_id=device_id)
        if not writer.is_alive() and writer.ident is None:
            writer.start()
            writer.join(0.5)  # committed meanwhile, or (holding the write lock) waiting
        return row

    monkeypatch.setattr(routes.store, "device_row", read_while_a_report_arrives)
    answer = client.request(method, "devices/d1/labels", json=body)
    writer.join(10)
    other.dispose()
    assert answer.status_code == 200, answer.text
    assert answer.json()["labels"] == {"env": "prod"}
    assert report_errors == [] and not writer.is_alive()
    assert client.get("devices/d2").json()["reported_generation"] == 7
