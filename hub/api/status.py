"""``/health`` and ``/hub/stats``: the hub process itself.

Rules:
- These handlers are ``async`` on purpose: they run on the event loop thread,
  the only thread that touches the link's and the chunk server's counters.
- ``/health`` is on ``open_router`` (no token: process supervisors and readiness
  probes call it); ``/hub/stats`` needs a token like every other route.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from sqlmodel import SQLModel

from hub.api.deps import LinkDep
from hub.api.route import HubRoute, OpenRoute

router = APIRouter(tags=["hub"], route_class=HubRoute)
open_router = APIRouter(tags=["hub"], route_class=OpenRoute)


class Health(SQLModel):
    status: Literal["ok"]
    mqtt_connected: bool


@open_router.get("/health", response_model=Health)
async def health(link: LinkDep) -> Health:
    return Health(status="ok", mqtt_connected=link.connected)


@router.get("/hub/stats")
async def hub_stats(link: LinkDep) -> dict[str, Any]:
    """Counters of the MQTT link: received per channel, rejected per reason, stale per kind,
    desired published, connection state and reconnects; under ``bundles``, those of the
    bundle chunk server (requests, chunks and bytes served, errors sent, rejected, dropped)."""
    return {**link.stats.as_dict(), "bundles": link.chunk_stats.as_dict()}
