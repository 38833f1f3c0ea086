"""The ``/api/v1`` router that gathers every resource router.

Rule: cross-cutting route dependencies (authentication, later) are added once,
on ``api_router``'s ``dependencies``, never per route.
"""

from __future__ import annotations

from fastapi import APIRouter

from hub.api.routes import bundles, devices, fleet, hub

API_PREFIX = "/api/v1"


def build_api_router() -> APIRouter:
    api_router = APIRouter(prefix=API_PREFIX, dependencies=[])
    api_router.include_router(devices.router)
    api_router.include_router(fleet.router)
    api_router.include_router(hub.router)
    api_router.include_router(bundles.router)
    return api_router
