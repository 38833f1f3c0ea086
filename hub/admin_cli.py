"""``driftless hub token …`` and ``hub migrate``: what is done where the hub's database is.

Rules: a token's secret is printed once, on stdout, and never stored; the first
admin token can only come from here (the API needs a token to make tokens).
``hub migrate`` brings the database to the newest schema revision, as the hub
does at start (``hub.db.migrate``).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from hub.auth import store
from hub.auth.models import Role
from hub.db import current_revision, head_revision, init_db, make_engine, migrate, new_session


def mint_token(*, db_url: str, name: str, role: Role) -> str:
    """Create a token in the DB at ``db_url`` (tables created if missing); return its secret.

    For callers that hand the secret on themselves (``devtools.procs``, the demo).
    Raises store.TokenNameTaken, or ValueError for a bad name.
    """
    engine = make_engine(db_url, busy_timeout_ms=5000)
    try:
        init_db(engine)
        with new_session(engine) as session:
            return store.create_token(session, name=name, role=role, now=datetime.now(UTC))
    finally:
        engine.dispose()


def create_token(*, db_url: str, name: str, role: str) -> int:
    """Create a token in the DB at ``db_url`` and print its secret; returns an exit status."""
    try:
        wanted = Role[role]
    except KeyError:
        print(f"error: role must be one of {', '.join(r.name for r in Role)}", file=sys.stderr)
        return 2
    try:
        secret = mint_token(db_url=db_url, name=name, role=wanted)
    except store.TokenNameTaken:
        print(f"error: a token named {name!r} exists", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{wanted.name} token {name!r} created; its secret, shown only once:", file=sys.stderr)
    print(secret)
    return 0


def migrate_db(*, db_url: str, revision: str) -> int:
    """Migrate the DB at ``db_url`` to ``revision``; says from where to where. Exit status."""
    engine = make_engine(db_url, busy_timeout_ms=30_000)
    try:
        before = current_revision(engine)
        after = migrate(engine, revision=revision)
    except Exception as exc:  # the database's own error, whatever the engine
        print(f"error: migration failed, the database is where it was: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(
        f"database at revision {after} (was {before or 'not migrated'}; newest {head_revision()})"
    )
    return 0
