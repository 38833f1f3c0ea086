"""Helpers for tests that call the hub's API in-process (no tests here).

Every ``/api/v1`` route but ``/health`` and the bundle file download needs a
bearer token: ``api_client`` is a test client that sends a fresh admin token,
``mint`` makes a token of any role in the app's own database.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import FastAPI
from fastapi.testclient import TestClient

from hub.auth import store
from hub.auth.models import Role
from hub.db import new_session

API_BASE_URL = "http://hub/api/v1/"


def mint(app: FastAPI, role: Role, name: str | None = None) -> str:
    """A new token in ``app``'s database (named after the role unless ``name``); its secret."""
    with new_session(app.state.context.engine) as session:
        return store.create_token(
            session, name=name or f"test-{role.name}", role=role, now=datetime.now(UTC)
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_client(app: FastAPI, role: Role = Role.admin) -> TestClient:
    """A test client on ``/api/v1/`` sending a token of ``role``; enter it with ``with``."""
    return TestClient(app, base_url=API_BASE_URL, headers=bearer(mint(app, role)))
