"""One error shape for every refusal: RFC 9457 problem details (``application/problem+json``).

Rules:
- Every 4xx and 5xx the API gives is a :class:`Problem`: ``status``, ``title`` (the
  status phrase), ``detail`` (what is wrong, for a human), ``type`` (``about:blank``:
  the status says it all), and for a body or parameter that does not match the
  schema, ``errors``: where (``loc``) and why (``msg``, ``type``) for each.
- A refusal never echoes the input back: a bad request may carry secrets (an
  enrollment token) or bytes that cannot be encoded (a lone UTF-16 surrogate), and
  an echo is how a client makes the hub write tracebacks into its log.
- The schema declares it: :data:`PROBLEM_RESPONSES` (and :func:`responses`) give
  routes their 4xx answers with this model, so a client generated from the
  OpenAPI schema parses every error.
- An unexpected exception is a 500 problem with nothing of the exception in it;
  the traceback goes to the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class FieldProblem(BaseModel):
    """One place where a request does not match the schema."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error answer."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = None


_WHY = {
    400: "the request cannot be read",
    401: "no valid API token (Authorization: Bearer <token>)",
    403: "the token's role is not enough, or the credential in the body is refused",
    404: "no such resource",
    405: "method not allowed on this path",
    409: "conflicts with the current state of the resource",
    413: "the body is larger than allowed",
    422: "the request does not match the schema, or breaks a rule the answer names",
    503: "the hub is not configured for this (the answer says what is missing)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring these status codes as :class:`Problem` answers."""
    return {
        code: {
            "model": Problem,
            "description": _WHY.get(code, HTTPStatus(code).phrase),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


# What every route can answer: a request that does not match its schema, and (guarded
# routes add 401) nothing else by default.
PROBLEM_RESPONSES = responses(422)


def _clean(text: object) -> str:
    """Text safe to encode as UTF-8: lone surrogates become U+FFFD, nothing is echoed long."""
    value = str(text)[:500]
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def problem(
    status: int,
    detail: str,
    *,
    errors: Sequence[FieldProblem] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The problem response for ``status``."""
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=_clean(detail),
        errors=list(errors) if errors is not None else None,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _allowed_methods(request: Request) -> str | None:
    """Every method the API's schema lists for this path (Starlette's 405 names only the
    first route that matched the path, so a path with a GET and a DELETE route said GET)."""
    table: list[tuple[re.Pattern[str], str]] | None = getattr(request.app.state, "allow", None)
    if table is None:
        table = []
        for template, item in request.app.openapi().get("paths", {}).items():
            pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            methods = ", ".join(sorted(m.upper() for m in item if m in _METHODS))
            table.append((re.compile(pattern + "$"), methods))
        request.app.state.allow = table
    path = request.url.path
    return next((methods for pattern, methods in table if pattern.match(path)), None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed is not None:
            headers["Allow"] = allowed
    return problem(exc.status_code, detail, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldProblem(
            loc=[item if isinstance(item, int) else _clean(item) for item in error.get("loc", ())],
            msg=_clean(error.get("msg", "")),
            type=_clean(error.get("type", "")),
        )
        for error in exc.errors()
    ]
    first = errors[0] if errors else None
    where = ".".join(str(part) for part in first.loc) if first else "request"
    detail = f"{where}: {first.msg}" if first else "the request does not match the schema"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem(422, detail, errors=errors)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "request failed", exc_info=exc, extra={"method": request.method, "path": request.url.path}
    )
    return problem(500, "internal error; the hub's log has the details")


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as a problem."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
