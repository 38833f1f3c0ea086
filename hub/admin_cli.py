"""``driftless hub token …``: API tokens made where the hub's database is.

Rule: the secret is printed once, on stdout, and never stored; the first admin
token can only come from here (the API needs a token to make tokens).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from hub.auth import store
from hub.auth.models import Role
from hub.db import init_db, make_engine, new_session


def create_token(*, db_url: str, name: str, role: str) -> int:
    """Create a token in the DB at ``db_url`` and print its secret; returns an exit status."""
    try:
        wanted = Role[role]
    except KeyError:
        print(f"error: role must be one of {', '.join(r.name for r in Role)}", file=sys.stderr)
        return 2
    engine = make_engine(db_url, busy_timeout_ms=5000)
    try:
        init_db(engine)
        with new_session(engine) as session:
            secret = store.create_token(session, name=name, role=wanted, now=datetime.now(UTC))
    except store.TokenNameTaken:
        print(f"error: a token named {name!r} exists", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(secret)
    return 0
