"""Database engine for the hub (SQLite by default).

Rules:
- One engine per app, built by :func:`make_engine`; never at import time.
- SQLite runs in WAL mode with ``busy_timeout`` and ``synchronous=NORMAL``.
- Transactions are real: pysqlite's implicit transaction handling is switched off
  and every transaction starts with an explicit ``BEGIN``, so reads inside a
  transaction see one snapshot. A session that will write calls
  :func:`begin_write` first, which starts ``BEGIN IMMEDIATE`` (the write lock is
  taken up front and waits ``busy_timeout`` instead of failing on upgrade).
  Read-modify-write sequences such as "generation + 1" are therefore atomic.
- The schema is Alembic's (``hub/migrations``): :func:`migrate` brings any
  database to the newest revision, and is the only thing that creates tables.
  The hub migrates at start (embedded SQLite included); ``driftless hub
  migrate`` does it on its own, before starting replicas for instance.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, event
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine

_WRITE_OPTION = "driftless_write"


class UTCDateTime(TypeDecorator[datetime]):
    """The column type of every timestamp: store naive UTC (portable), hand back aware
    UTC; refuse naive input."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def epoch(value: datetime | None) -> float | None:
    """An aware datetime as unix seconds (the pure planners' time), None kept."""
    return value.timestamp() if value is not None else None


def from_epoch(value: float | None) -> datetime | None:
    """Unix seconds (a planner's time) as an aware UTC datetime for a column, None kept."""
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def make_engine(db_url: str, *, busy_timeout_ms: int) -> Engine:
    """Build the engine; for a SQLite file, create its parent directory first."""
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(db_url, pool_pre_ping=True)
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(db_url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The revision a database made by ``create_all`` (before migrations existed) is at.
_LEGACY_BEFORE_DECOMMISSION = "0001"
_LEGACY_WITH_DECOMMISSION = "0002"


def register_tables() -> None:
    """Import every model module, so ``SQLModel.metadata`` holds every table."""
    import hub.auth.models
    import hub.bundles.models
    import hub.deployments.models
    import hub.devices.models
    import hub.enrollment.models
    import hub.jobs.models
    import hub.rollouts.models
    import hub.schedules.models  # noqa: F401


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest revision in ``hub/migrations``."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine, *, revision: str = "head") -> str:
    """Bring the database to ``revision`` (default: the newest) and return where it is.

    An empty database gets every revision. One that ``create_all`` made before
    migrations existed (tables, no ``alembic_version``) is first stamped with the
    revision its columns show, so nothing is created twice and no row is touched.
    Raises whatever the database raises; a failed revision leaves it where it was
    (each runs in one transaction).
    """
    from alembic import command
    from sqlalchemy import inspect

    register_tables()
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        inspector = inspect(connection)
        tables = set(inspector.get_table_names())
        if "alembic_version" not in tables and "device" in tables:
            columns = {column["name"] for column in inspector.get_columns("device")}
            legacy = (
                _LEGACY_WITH_DECOMMISSION
                if "decommissioned_at" in columns
                else _LEGACY_BEFORE_DECOMMISSION
            )
            command.stamp(config, legacy)
        command.upgrade(config, revision)
    now = current_revision(engine)
    assert now is not None
    return now


def init_db(engine: Engine) -> None:
    """The database at the newest revision (:func:`migrate`)."""
    migrate(engine)


def new_session(engine: Engine) -> Session:
    """A session whose objects stay readable after commit (no reload per attribute)."""
    return Session(engine, expire_on_commit=False)


def begin_write(session: Session) -> None:
    """Start the session's transaction as a write transaction.

    On SQLite this is ``BEGIN IMMEDIATE``; elsewhere the option is ignored and row
    locks (``SELECT ... FOR UPDATE``) do the job. If the session already has a
    transaction open, that one is kept: it is still serialisable, it may just fail
    with "database is locked" under contention instead of waiting.
    """
    if not session.in_transaction():
        session.connection(execution_options={_WRITE_OPTION: True})
