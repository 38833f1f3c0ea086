"""Build the hub application: engine, MQTT link and FastAPI app from one settings object.

Rules:
- :func:`create_app` is the only place these are created; importing creates nothing.
- The link starts and stops with the app's lifespan; the API works while the
  broker is unreachable (the link keeps retrying in the background).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hub.api.main import build_api_router
from hub.db import init_db, make_engine
from hub.link import BrokerLink
from hub.settings import HubSettings


def create_app(settings: HubSettings) -> FastAPI:
    engine = make_engine(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    init_db(engine)
    link = BrokerLink(broker=settings.broker(), engine=engine, settings=settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        link.start()
        try:
            yield
        finally:
            await link.stop()
            engine.dispose()

    app = FastAPI(
        title="Driftless hub",
        version="0.1.0",
        description="Admin API of the Driftless device-fleet orchestrator.",
        lifespan=lifespan,
        max_body_size=settings.max_request_body_bytes,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.link = link
    app.include_router(build_api_router())
    return app
