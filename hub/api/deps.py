"""Route dependencies as type aliases (FastAPI full-stack-template style).

Rule: everything a route needs comes from ``request.app.state``, filled by
:func:`hub.app.create_app`; nothing here is a module-level singleton.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from hub.db import new_session
from hub.link import BrokerLink
from hub.metrics import HubMetrics
from hub.settings import HubSettings


def get_session(request: Request) -> Iterator[Session]:
    with new_session(request.app.state.engine) as session:
        yield session


def get_settings(request: Request) -> HubSettings:
    settings: HubSettings = request.app.state.settings
    return settings


def get_link(request: Request) -> BrokerLink:
    link: BrokerLink = request.app.state.link
    return link


def get_metrics(request: Request) -> HubMetrics:
    metrics: HubMetrics = request.app.state.metrics
    return metrics


def utcnow() -> datetime:
    return datetime.now(UTC)


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[HubSettings, Depends(get_settings)]
LinkDep = Annotated[BrokerLink, Depends(get_link)]
MetricsDep = Annotated[HubMetrics, Depends(get_metrics)]
NowDep = Annotated[datetime, Depends(utcnow)]
