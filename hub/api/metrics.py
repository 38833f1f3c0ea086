"""HTTP side of the metrics: the request-counting middleware and ``GET /metrics``.

Rules:
- Every HTTP request is counted once, by method, route template and status, and timed
  from its arrival to the end of its answer (:class:`MetricsMiddleware`). The route is
  the template the router matched (``/api/v1/devices/{device_id}``), never the raw
  path, so device ids never become label values; a request no API route matched (a
  404, the ``/docs`` pages) counts as route ``other``, and a method outside the usual
  few as ``other``.
- ``GET /metrics`` (outside ``/api/v1`` and outside the OpenAPI schema: it is for
  Prometheus, not API clients) needs a valid API token of any role, as a Prometheus
  scrape config sends it (``authorization: {credentials: ...}``); 401 otherwise.
- The scrape copies the event loop's counters on the loop, then renders (and queries
  the database) in a worker thread (:mod:`hub.metrics`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import fastapi.routing
from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.api.deps import ContextDep
from hub.auth.guard import authenticated
from hub.metrics import CONTENT_TYPE, HubMetrics

OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

router = APIRouter()


def route_templates(routes: Sequence[BaseRoute]) -> dict[int, str]:
    """``id()`` of each route object that routing puts in ``scope["route"]`` -> its full
    path template (prefixes of the routers it was included with).

    FastAPI with route contexts keeps the original route (its path without the
    including routers' prefixes) and knows the full path only in its context; older
    FastAPI copies included routes, and the copy carries the full path.
    """
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:
        return {id(r): str(r.path_format) for r in routes if hasattr(r, "path_format")}
    return {id(c.original_route): c.path_format for c in contexts(routes) if c.path_format}


class MetricsMiddleware:
    """Pure ASGI (bodies stream through untouched): count and time every HTTP request."""

    def __init__(self, app: ASGIApp, *, metrics: HubMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: dict[int, str] | None = None  # built at the first request
        self._observers: dict[tuple[str, str, str], Callable[[float], None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self._observe(scope, status, time.perf_counter() - started)

    def _observe(self, scope: Scope, status: int, duration_s: float) -> None:
        method = scope["method"] if scope["method"] in _METHODS else OTHER
        key = (method, self._route(scope), str(status))
        observer = self._observers.get(key)
        if observer is None:
            observer = self._observers[key] = self.metrics.api_request_observer(*key)
        observer(duration_s)

    def _route(self, scope: Scope) -> str:
        route: Any = scope.get("route")
        if route is None:
            return OTHER
        if self._templates is None:
            self._templates = route_templates(scope["app"].routes)
        template = self._templates.get(id(route))
        if template is None:  # a route added after the first request
            template = self._templates[id(route)] = str(getattr(route, "path_format", OTHER))
        return template


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(authenticated)])
async def metrics(context: ContextDep) -> Response:
    """The hub's metrics in the Prometheus text format; any API token (viewer and up)."""
    hub_metrics, link = context.metrics, context.link
    runs_link = context.settings.run_link  # an API-only process has no link counters to show
    snapshot = hub_metrics.snapshot(
        link.stats if runs_link else None, link.chunk_stats if runs_link else None
    )
    body = await run_in_threadpool(hub_metrics.render, snapshot)
    return Response(body, media_type=CONTENT_TYPE)
