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
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection, make_url
from sqlmodel import Session, SQLModel, create_engine

from hub import models  # noqa: F401  (registers the tables on SQLModel.metadata)

_WRITE_OPTION = "driftless_write"


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


def init_db(engine: Engine) -> None:
    """Create missing tables (no migrations yet)."""
    SQLModel.metadata.create_all(engine)


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
