"""The route classes of the hub API: the token first, then strict JSON.

Rules:
- Every route is :class:`HubRoute` unless it is one of the open routes, declared
  on a router with ``route_class=OpenRoute`` (the list is in ``hub/api/main.py``).
  A :class:`HubRoute` checks the bearer token *before* it reads the body: an
  anonymous client gets its 401 without making the hub read and parse up to
  ``max_request_body_bytes``. FastAPI solves dependencies only after parsing the
  body; this wrapper runs first and leaves the principal where
  :func:`hub.auth.guard.authenticated` (still on the guarded router, and in the
  schema) finds it. A route declared on the wrong router fails safe either way.
- Bodies are decoded as strict JSON (msgspec): ``NaN``, ``Infinity``, numbers out
  of range, invalid UTF-8 and lone UTF-16 surrogates (``"\\ud800"``) are refused
  with 422, so nothing downstream (the size check, the token hash, the database)
  meets a value it cannot encode, and no operator's number is silently stored as
  ``null``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

from hub.auth.guard import authenticate_first

_decoder = msgspec.json.Decoder()

_NOT_JSON = (
    "the body is not valid JSON ({error}); note that NaN and Infinity are not JSON "
    "numbers, and strings must be valid Unicode (no lone UTF-16 surrogates such as \\ud800)"
)


class StrictJsonRequest(Request):
    """A request whose ``json()`` is strict JSON; 422 (problem details) otherwise."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = _decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, _NOT_JSON.format(error=exc)
                ) from None
        return self._json


class OpenRoute(APIRoute):
    """An open route (no token): strict JSON bodies."""

    checks_token = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks_token = self.checks_token

        async def route_handler(request: Request) -> Response:
            strict = StrictJsonRequest(request.scope, request.receive)
            if checks_token:
                await authenticate_first(strict)
            return await handler(strict)

        return route_handler


class HubRoute(OpenRoute):
    """A guarded route: the token before the body, then strict JSON."""

    checks_token = True
