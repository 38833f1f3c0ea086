"""FastAPI side of authentication: bearer-token dependency, role checks, audit middleware.

Every refusal (401, 403) is counted by reason in the app's metrics
(``driftless_api_auth_failures_total``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.api.deps import SessionDep, context_of
from hub.auth import store
from hub.auth.models import AuditEntry, Role
from hub.context import Clock
from hub.db import new_session
from hub.metrics import AuthFailure

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name and role."""

    name: str
    role: Role


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


# Reads the header and puts the bearer scheme in the OpenAPI schema (the docs' Authorize
# button); it refuses nothing itself, so every refusal below is ours and says why.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiToken",
    description="An API token: `driftless hub token create` or `POST /api/v1/tokens`.",
)


def _bearer_secret(request: Request) -> str:
    """The token in ``Authorization: Bearer <token>``; 401 (counted) when there is none."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        context_of(request).metrics.auth_failed(AuthFailure.MISSING_TOKEN)
        raise _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return secret


def _principal(request: Request, session: Session, secret: str) -> Principal:
    """The token's holder; 401 (counted) for an unknown or revoked token."""
    row = store.authenticate(session, secret=secret)
    # End this read: the route shares the session, and a write route's begin_write must
    # open its own (immediate) transaction, not upgrade a stale read snapshot.
    session.rollback()
    if row is None:
        context_of(request).metrics.auth_failed(AuthFailure.INVALID_TOKEN)
        raise _unauthorized("unknown or revoked token")
    return Principal(row.name, Role[row.role])


async def authenticate_first(request: Request) -> None:
    """Check the token before anything reads the body (:class:`hub.api.route.HubRoute`);
    leaves the principal for :func:`authenticated` and the audit middleware. 401 when
    the token is missing, unknown or revoked."""
    secret = _bearer_secret(request)

    def lookup() -> Principal:
        with new_session(context_of(request).engine) as session:
            return _principal(request, session, secret)

    request.state.principal = await anyio.to_thread.run_sync(lookup)


def authenticated(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Resolve ``Authorization: Bearer <token>``; 401 when missing, unknown or revoked.

    ``credentials`` is unused but puts the bearer scheme in the OpenAPI schema. Under
    :class:`hub.api.route.HubRoute` the token was checked before the body was read.
    """
    checked = getattr(request.state, "principal", None)
    if isinstance(checked, Principal):
        return checked
    principal = _principal(request, session, _bearer_secret(request))
    request.state.principal = principal  # read by the audit middleware
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticated)]


def require(role: Role) -> Callable[[Principal, Request], Principal]:
    """A dependency that lets through ``role`` and above; 403 otherwise."""

    def check(principal: PrincipalDep, request: Request) -> Principal:
        if principal.role < role:
            context_of(request).metrics.auth_failed(AuthFailure.INSUFFICIENT_ROLE)
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"{role.name} role required; token {principal.name!r} is {principal.role.name}",
            )
        return principal

    return check


class AuditMiddleware:
    """Pure ASGI (bodies stream through untouched): log every mutating API request."""

    def __init__(self, app: ASGIApp, *, engine: Engine, clock: Clock, prefix: str) -> None:
        self.app = app
        self.engine = engine
        self.clock = clock
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not scope["path"].startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        outcome = {"status": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            principal: Any = scope.get("state", {}).get("principal")
            client = scope.get("client")
            entry = AuditEntry(
                at=self.clock(),
                actor=principal.name if principal else "anonymous",
                role=principal.role.name if principal else None,
                method=scope["method"],
                path=scope["path"][:512],
                status=outcome["status"],
                client=f"{client[0]}:{client[1]}" if client else None,
            )
            await anyio.to_thread.run_sync(self._write, entry)

    def _write(self, entry: AuditEntry) -> None:
        with new_session(self.engine) as session:
            store.record(session, entry=entry)
