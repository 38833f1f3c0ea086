"""``/tokens`` and ``/audit``: API tokens and the audit log (admin only).

Rule: a token's secret appears once, in the answer to its creation; it is never
stored or shown again.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import ConfigDict
from pydantic import Field as PydanticField
from sqlmodel import SQLModel

from hub.api.deps import NowDep, SessionDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth import store
from hub.auth.guard import require
from hub.auth.models import AuditEntry, Role
from hub.auth.store import TOKEN_NAME_PATTERN
from hub.settings import API_MAX_OFFSET, API_MAX_PAGE_SIZE

router = APIRouter(
    tags=["admin"],
    dependencies=[Depends(require(Role.admin))],
    route_class=HubRoute,
    responses=responses(403),
)
TokenName = Annotated[
    str, PydanticField(max_length=64, json_schema_extra={"pattern": f"^{TOKEN_NAME_PATTERN}$"})
]

RoleName = Literal["viewer", "operator", "admin"]  # the names of hub.auth.models.Role


class TokenCreate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    name: TokenName
    role: RoleName


class TokenCreated(SQLModel):
    name: str
    role: str
    token: str


class TokenPublic(SQLModel):
    name: str
    role: str
    revoked: bool


class AuditPage(SQLModel):
    items: list[AuditEntry]
    total: int
    limit: int
    offset: int


@router.post(
    "/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses=responses(409),
)
def create_token(body: TokenCreate, session: SessionDep, now: NowDep) -> TokenCreated:
    try:
        secret = store.create_token(session, name=body.name, role=Role[body.role], now=now)
    except store.TokenNameTaken:
        raise HTTPException(status.HTTP_409_CONFLICT, f"token {body.name!r} exists") from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return TokenCreated(name=body.name, role=body.role, token=secret)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(session: SessionDep) -> list[TokenPublic]:
    return [
        TokenPublic(name=t.name, role=t.role, revoked=t.revoked_at is not None)
        for t in store.list_tokens(session)
    ]


@router.delete("/tokens/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=responses(404))
def revoke_token(
    name: Annotated[str, Path(max_length=64, pattern=f"^{TOKEN_NAME_PATTERN}$")],
    session: SessionDep,
    now: NowDep,
) -> Response:
    try:
        store.revoke_token(session, name=name, now=now)
    except store.TokenNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token named {name!r}") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/audit", response_model=AuditPage)
def read_audit(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=API_MAX_PAGE_SIZE)] = 100,
    offset: Annotated[int, Query(ge=0, le=API_MAX_OFFSET)] = 0,
) -> AuditPage:
    rows, total = store.audit_page(session, limit=limit, offset=offset)
    return AuditPage(items=list(rows), total=total, limit=limit, offset=offset)
