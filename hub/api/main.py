"""The ``/api/v1`` router that gathers every resource router.

Each resource's routes live in its feature package (``hub/<feature>/routes.py``);
this module only assembles them, with the app-wide ones of ``hub/api/``.

Rules:
- Cross-cutting route dependencies are added once, on the guarded router's
  ``dependencies``, never per route: every route needs a valid bearer token
  (401 otherwise), which is the ``viewer`` role. A route that needs more names
  its least role with :func:`hub.auth.guard.require` (403 otherwise).
- Only three routes are open, on ``open_router``: ``GET /health`` (supervisors and
  probes), the bundle file download (agents have no API token; bundles are
  verified on the device) and ``POST /enroll`` (the enrollment token in its body
  is the credential). Nothing else may be added there without a line in
  docs/security.md saying why.
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from hub.api import status
from hub.api.problems import PROBLEM_JSON, PROBLEM_RESPONSES, responses
from hub.auth import routes as auth
from hub.auth.guard import authenticated
from hub.bundles import routes as bundles
from hub.deployments import routes as deployments
from hub.devices import routes as devices
from hub.enrollment import routes as enrollment
from hub.jobs import routes as jobs
from hub.rollouts import routes as rollouts
from hub.schedules import routes as windows

API_PREFIX = "/api/v1"


def build_api_router() -> APIRouter:
    guarded = APIRouter(dependencies=[Depends(authenticated)], responses=responses(401))
    guarded.include_router(devices.router)
    guarded.include_router(devices.fleet_router)
    guarded.include_router(deployments.router)
    guarded.include_router(deployments.events_router)
    guarded.include_router(rollouts.router)
    guarded.include_router(rollouts.list_router)
    guarded.include_router(jobs.router)
    guarded.include_router(status.router)
    guarded.include_router(bundles.router)
    guarded.include_router(auth.router)
    guarded.include_router(enrollment.router)
    guarded.include_router(enrollment.reader_router)
    guarded.include_router(windows.router)
    open_router = APIRouter()
    open_router.include_router(status.open_router)
    open_router.include_router(bundles.files_router)
    open_router.include_router(enrollment.open_router)
    api_router = APIRouter(prefix=API_PREFIX, responses=PROBLEM_RESPONSES)
    api_router.include_router(guarded)
    api_router.include_router(open_router)
    return api_router


def finish_openapi(app: FastAPI) -> dict[str, Any]:
    """The schema, with what FastAPI cannot say by itself: error answers are
    ``application/problem+json``, and a route serving several methods has one
    operation id per method (clients generated from it need them unique)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
    for warning in caught:  # FastAPI's duplicate-id warning is checked below, once fixed
        if not str(warning.message).startswith("Duplicate Operation ID"):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    for methods in schema.get("paths", {}).values():
        seen: set[str] = set()
        for method, operation in methods.items():
            operation_id = operation.get("operationId")
            if operation_id in seen:
                operation["operationId"] = f"{operation_id}_{method}"
            elif operation_id is not None:
                seen.add(operation_id)
            for code, answer in operation.get("responses", {}).items():
                content = answer.get("content", {})
                if code[0] in "45" and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    ids = [
        operation["operationId"]
        for methods in schema.get("paths", {}).values()
        for operation in methods.values()
        if "operationId" in operation
    ]
    for twice in sorted({i for i in ids if ids.count(i) > 1}):
        warnings.warn(f"Duplicate Operation ID {twice} on different paths", stacklevel=2)
    app.openapi_schema = schema
    return schema
