"""Build the hub application: engine, MQTT link and FastAPI app from one settings object.

Rules:
- :func:`create_app` is the only place these are created; importing creates nothing.
- The bundle table is registered before tables are created; the bundle
  directory is created (and crash leftovers swept) and a configured fleet root
  is checked here, so a bad one stops the start.
- Every mutating ``/api/v1`` request goes through the audit middleware, which
  records it once it has finished (refusals included); the token and audit
  tables are registered with the routes that use them, before tables are created.
- The link and the bundle chunk server (its own MQTT connection) start and stop
  with the app's lifespan; the API works while the broker is unreachable (both
  keep retrying in the background).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hub.api.main import API_PREFIX, build_api_router
from hub.auth.api import AuditMiddleware
from hub.bundles import models as _bundle_models  # noqa: F401  (registers the bundle table)
from hub.bundles.chunks import ChunkServer
from hub.bundles.errors import NoFleetRoot
from hub.bundles.files import BundleFiles
from hub.bundles.root import FleetRoot
from hub.db import init_db, make_engine
from hub.link import BrokerLink
from hub.settings import HubSettings


def create_app(settings: HubSettings) -> FastAPI:
    engine = make_engine(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    init_db(engine)
    link = BrokerLink(broker=settings.broker(), engine=engine, settings=settings)
    bundle_files = BundleFiles(settings.bundle_directory())
    bundle_files.prepare(now=time.time(), stale_after_s=settings.bundle_upload_stale_s)
    chunk_server = ChunkServer(broker=settings.broker(), settings=settings, files=bundle_files)
    fleet_root = FleetRoot(settings.trust_root_path)
    if settings.trust_root_path is not None:
        try:
            fleet_root.load()  # a configured root that cannot be read stops the start
        except NoFleetRoot as exc:
            raise ValueError(str(exc)) from None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        link.start()
        chunk_server.start()
        try:
            yield
        finally:
            await chunk_server.stop()
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
    app.state.bundle_files = bundle_files
    app.state.chunk_server = chunk_server
    app.state.fleet_root = fleet_root
    app.include_router(build_api_router())
    app.add_middleware(AuditMiddleware, engine=engine, prefix=API_PREFIX)
    return app
