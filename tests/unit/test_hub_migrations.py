"""Schema migrations (Alembic): what they create is what the models say, and old data survives.

- Upgrading an empty database to head gives exactly the models' tables, columns,
  types and indexes: a model changed without a revision fails here.
- A database made by the hub before migrations existed (``tests/fixtures/
  hub-db-1f12664.sql``: devices, a deleted device, a signed bundle, API and
  enrollment tokens, an issued certificate, an audit log) is recognised, stamped
  and upgraded with every row intact, and a hub serves it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

from devtools.broker import free_port
from hub.app import create_app
from hub.auth.models import Role
from hub.db import current_revision, head_revision, make_engine, migrate, register_tables
from hub.settings import HubSettings
from tests.unit.auth_support import API_BASE_URL, bearer, mint

# Added by revisions 0002 (decommissioning) and 0003 (workload states, outbox drops).
NEW_COLUMNS = (
    "decommissioned_at", "cut_off_at", "awaiting_birth", "workloads", "events_dropped",
    "locks", "jobs",  # revision 0004 (update locks, one-shot jobs)
    "manual_config", "assignments", "contributions", "events_generation",
    "online_changed_at",  # revision 0005 (deployments)
    "heartbeat_s", "healthy_since", "healthy_reports", "unhealthy_at",
    "staged_generation",  # revision 0006 (rollouts, liveness, soak)
)  # fmt: skip
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hub-db-1f12664.sql"
TABLES = (
    "device", "device_deletion", "bundle", "enrollment_token", "device_certificate",
    "api_token", "audit_log",
)  # fmt: skip


def engine_at(path: Path) -> Engine:
    return make_engine(f"sqlite:///{path}", busy_timeout_ms=5000)


def rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the old schema, in a stable order, old columns only."""
    with sqlite3.connect(path) as db:
        out = {}
        for table in TABLES:
            columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
            old = [c for c in columns if c not in NEW_COLUMNS]
            out[table] = sorted(
                db.execute(f"SELECT {', '.join(old)} FROM {table}").fetchall(), key=repr
            )
        return out


def from_fixture(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.executescript(FIXTURE.read_text())
    return path


def test_upgrading_an_empty_database_gives_exactly_the_models_schema(tmp_path: Path) -> None:
    engine = engine_at(tmp_path / "hub.db")
    assert migrate(engine) == head_revision()
    register_tables()
    with engine.connect() as connection:
        diff = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}),
            SQLModel.metadata,
        )
    assert diff == [], f"the models differ from the migrations: add a revision\n{diff}"


def test_a_database_from_before_migrations_upgrades_with_every_row_intact(tmp_path: Path) -> None:
    path = from_fixture(tmp_path / "hub.db")
    before = rows(path)
    assert sum(len(r) for r in before.values()) == 23  # what the fixture holds
    engine = engine_at(path)
    assert current_revision(engine) is None  # made by create_all: no alembic_version
    assert migrate(engine) == head_revision()
    assert rows(path) == before
    with engine.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("device")}
        fresh = connection.execute(
            text("SELECT decommissioned_at, cut_off_at, awaiting_birth FROM device")
        ).fetchall()
    assert {"decommissioned_at", "cut_off_at", "awaiting_birth"} <= columns
    assert set(fresh) == {(None, None, 0)}  # every device active, none waiting
    with engine.connect() as connection:
        layered = connection.execute(
            text("SELECT desired_config, manual_config, assignments FROM device")
        ).fetchall()
    # Revision 0005: each device's own document is its base layer, nothing is assigned.
    assert layered and all(d == m and a == "[]" for d, m, a in layered)
    assert migrate(engine) == head_revision()  # again: nothing to do
    assert rows(path) == before


def test_a_hub_serves_an_upgraded_database(tmp_path: Path) -> None:
    path = from_fixture(tmp_path / "hub.db")
    app = create_app(
        HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{path}")
    )
    token = mint(app, Role.admin, name="migration-test")  # the fixture has a test-admin
    with TestClient(app, base_url=API_BASE_URL, headers=bearer(token)) as client:
        listed = client.get("devices").json()
        assert [d["id"] for d in listed["items"]] == ["pump-0", "pump-1", "pump-9"]
        pump_1 = client.get("devices/pump-1").json()
        assert pump_1["desired_generation"] == 2 and pump_1["desired_config"] == {"rate": 8}
        assert pump_1["state"] == "active"
        assert client.get("devices/pump-9").json()["labels"] == {"site": "lab"}  # enrolled
        assert client.get("bundles").json()["total"] == 1
        assert {t["name"] for t in client.get("tokens").json()} >= {"ops"}
        assert client.get("audit").json()["total"] >= 13
        assert client.delete("devices/pump-1").status_code == 204  # the new columns work


def test_a_database_create_all_made_after_issue_10_is_stamped_not_recreated(
    tmp_path: Path,
) -> None:
    """The hub between issue 10 and migrations made the device table with issue 10's
    columns and no alembic_version: the schema of revision 0002, unstamped."""
    engine = engine_at(tmp_path / "hub.db")
    migrate(engine, revision="0002")
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))  # as create_all left it
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO device (id, labels, created_at, desired_generation, desired_config,"
                " desired_seq, reported_generation, failed_generation, report_generation,"
                " last_report_epoch, last_report_seq, session, online, awaiting_birth) VALUES"
                " ('d1', '{}', '2026-12-06 00:00:00', 3, '{}', 1, 3, 0, 3, -1, -1, 1, 0, 0)"
            )
        )
    assert migrate(engine) == head_revision()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT desired_generation FROM device")).scalar() == 3


def test_downgrade_to_the_first_revision_and_back_keeps_the_rows(tmp_path: Path) -> None:
    path = from_fixture(tmp_path / "hub.db")
    before = rows(path)
    engine = engine_at(path)
    migrate(engine)
    from alembic import command

    from hub.db import _alembic_config

    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert current_revision(engine) == "0001"
    assert rows(path) == before
    assert migrate(engine) == head_revision()
    assert rows(path) == before


@pytest.mark.parametrize("table", TABLES)
def test_the_fixture_has_rows_in_every_table(table: str, tmp_path: Path) -> None:
    """The upgrade test is only as good as its data: every table holds something."""
    assert rows(from_fixture(tmp_path / "hub.db"))[table]


def test_driftless_hub_migrate_upgrades_and_says_from_where(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = from_fixture(tmp_path / "hub.db")
    before = rows(path)
    result = subprocess.run(
        [sys.executable, "-m", "driftless.cli", "hub", "migrate", "--db", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"database at revision {head_revision()} (was not migrated" in result.stdout
    assert rows(path) == before
