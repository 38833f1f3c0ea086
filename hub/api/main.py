"""The ``/api/v1`` router that gathers every resource router.

Rules:
- Cross-cutting route dependencies are added once, on the guarded router's
  ``dependencies``, never per route: every route needs a valid bearer token
  (401 otherwise), which is the ``viewer`` role. A route that needs more names
  its least role with :func:`hub.auth.api.require` (403 otherwise).
- Only three routes are open, on ``open_router``: ``GET /health`` (supervisors and
  probes), the bundle file download (agents have no API token; bundles are
  verified on the device) and ``POST /enroll`` (the enrollment token in its body
  is the credential). Nothing else may be added there without a line in
  docs/security.md saying why.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from hub.api.routes import admin, bundles, devices, fleet, hub
from hub.auth.api import authenticated
from hub.enrollment import api as enrollment

API_PREFIX = "/api/v1"


def build_api_router() -> APIRouter:
    guarded = APIRouter(dependencies=[Depends(authenticated)])
    guarded.include_router(devices.router)
    guarded.include_router(fleet.router)
    guarded.include_router(hub.router)
    guarded.include_router(bundles.router)
    guarded.include_router(admin.router)
    guarded.include_router(enrollment.router)
    guarded.include_router(enrollment.reader_router)
    open_router = APIRouter()
    open_router.include_router(hub.open_router)
    open_router.include_router(bundles.files_router)
    open_router.include_router(enrollment.open_router)
    api_router = APIRouter(prefix=API_PREFIX)
    api_router.include_router(guarded)
    api_router.include_router(open_router)
    return api_router
