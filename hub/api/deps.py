"""Route dependencies as type aliases (FastAPI full-stack-template style).

Rules:
- Everything a route needs comes from the app's :class:`hub.context.HubContext`,
  built by :func:`hub.app.create_app`; :func:`context_of` is the only code that
  reads ``request.app.state``. Nothing here is a module-level singleton.
- "Now" is the context's clock (:data:`NowDep`, or :data:`ClockDep` for a route
  that reads the time more than once); tests replace it in ``create_app``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from hub.bundles.files import BundleFiles
from hub.bundles.root import FleetRoot
from hub.context import Clock, HubContext, LinkStatus
from hub.db import new_session
from hub.devices.desired import DesiredState
from hub.metrics import HubMetrics
from hub.settings import HubSettings


def context_of(request: Request) -> HubContext:
    """The app's context (also for middleware and route classes, which get no dependencies)."""
    context: HubContext = request.app.state.context
    return context


ContextDep = Annotated[HubContext, Depends(context_of)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with new_session(context.engine) as session:
        yield session


def get_settings(context: ContextDep) -> HubSettings:
    return context.settings


def get_metrics(context: ContextDep) -> HubMetrics:
    return context.metrics


def get_link(context: ContextDep) -> LinkStatus:
    return context.link


def get_desired(context: ContextDep) -> DesiredState:
    return context.desired


def get_clock(context: ContextDep) -> Clock:
    return context.clock


def get_now(context: ContextDep) -> datetime:
    return context.now()


def get_bundle_files(context: ContextDep) -> BundleFiles:
    return context.bundle_files


def get_fleet_root(context: ContextDep) -> FleetRoot:
    return context.fleet_root


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[HubSettings, Depends(get_settings)]
MetricsDep = Annotated[HubMetrics, Depends(get_metrics)]
LinkDep = Annotated[LinkStatus, Depends(get_link)]
DesiredDep = Annotated[DesiredState, Depends(get_desired)]
ClockDep = Annotated[Clock, Depends(get_clock)]
NowDep = Annotated[datetime, Depends(get_now)]
BundleFilesDep = Annotated[BundleFiles, Depends(get_bundle_files)]
FleetRootDep = Annotated[FleetRoot, Depends(get_fleet_root)]
