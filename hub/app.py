"""Build the hub application: engine, MQTT link and FastAPI app from one settings object.

Rules:
- :func:`create_app` is the only place these are created; importing creates nothing.
  What it builds is kept in one frozen :class:`hub.context.HubContext`
  (``app.state.context``), which routes reach through :mod:`hub.api.deps`.
- One clock (``clock``, aware UTC; the system's unless a test gives its own) is
  "now" for the routes, the link, the audit log and every start-up step.
- The bundle table is registered before tables are created; the bundle
  directory is created (and crash leftovers swept) and a configured fleet root
  is checked here, so a bad one stops the start; so are the hub's signing keys,
  which must meet the root's ``hub`` threshold when a root is configured.
- Every mutating ``/api/v1`` request goes through the audit middleware, which
  records it once it has finished (refusals included); the token and audit
  tables are registered with the routes that use them, before tables are created.
- One metrics registry per app (:class:`hub.metrics.HubMetrics`), served at
  ``GET /metrics`` (any API token); every HTTP request is counted and timed by the
  metrics middleware, inside the audit middleware.
- The link (:class:`hub.mqtt.link.BrokerLink`: its session, and the chunk
  server's own session) starts and stops with the app's lifespan; the API works
  while the broker is unreachable (both sessions keep retrying in the background).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from hub.api import metrics as metrics_api
from hub.api import problems
from hub.api.main import API_PREFIX, build_api_router, finish_openapi
from hub.auth.guard import AuditMiddleware
from hub.broker_config import hub_identities
from hub.bundles import models as _bundle_models  # noqa: F401  (registers the bundle table)
from hub.bundles.errors import NoFleetRoot
from hub.bundles.files import BundleFiles
from hub.bundles.root import FleetRoot
from hub.context import Clock, HubContext, system_clock
from hub.db import init_db, make_engine, new_session
from hub.devices.desired import DesiredState
from hub.enrollment.revocation import publish_crl
from hub.identity import CertificateAuthority, IdentityError, client_identity
from hub.metrics import HubMetrics
from hub.mqtt.link import BrokerLink
from hub.settings import HubSettings
from hub.signing import DocumentSigner

log = logging.getLogger(__name__)


def _signer(settings: HubSettings) -> DocumentSigner | None:
    if not settings.signing_key_paths:
        log.warning(
            "no hub signing key: desired documents go out unsigned; devices that hold "
            "the fleet root refuse them (hub serve --signing-key KEY)"
        )
        return None
    signer = DocumentSigner.load(settings.signing_key_paths)
    log.info("desired documents are signed", extra={"keyids": [k[:16] for k in signer.keyids]})
    return signer


def _certificate_authority(settings: HubSettings, clock: Clock) -> CertificateAuthority | None:
    """The fleet CA, created on first start; None (enrollment off) without a directory."""
    try:
        directory = settings.identity_directory()
    except ValueError:
        log.warning("no identity directory: device enrollment is off (hub serve --identity-dir)")
        return None
    try:
        return CertificateAuthority.load_or_create(directory, now=clock())
    except (IdentityError, OSError) as exc:
        raise ValueError(f"fleet CA in {directory}: {exc}") from None


def _broker_tls(
    settings: HubSettings, ca: CertificateAuthority | None, clock: Clock
) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """TLS contexts of the link and the chunk server (each its own certificate name);
    none for an API-only process, which never connects."""
    if not settings.run_link or not settings.broker().tls:
        return None, None
    cafile = settings.broker_tls_ca_path or (ca.cert_path if ca is not None else None)

    def context(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        if settings.broker_tls_cert_path is not None and settings.broker_tls_key_path is not None:
            ctx.load_cert_chain(settings.broker_tls_cert_path, settings.broker_tls_key_path)
        elif ca is not None:
            directory = settings.identity_directory() / "clients"
            cert, key = client_identity(ca, directory, name, now=clock())
            ctx.load_cert_chain(cert, key)
        return ctx

    try:
        link_name, chunks_name = hub_identities(settings.mqtt_client_id)
        return context(link_name), context(chunks_name)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS to the broker: {exc}") from None


def create_app(settings: HubSettings, *, clock: Clock = system_clock) -> FastAPI:
    """The hub's app; ``clock`` is the one source of "now" (aware UTC) for all of it."""
    engine = make_engine(settings.db_url, busy_timeout_ms=settings.db_busy_timeout_ms)
    init_db(engine)
    signer = _signer(settings)
    ca = _certificate_authority(settings, clock)
    link_tls, chunks_tls = _broker_tls(settings, ca, clock)
    metrics = HubMetrics(engine=engine)
    bundle_files = BundleFiles(settings.bundle_directory())
    # File ages are the filesystem's: compared with its mtimes, not with the hub's clock.
    bundle_files.prepare(now=time.time(), stale_after_s=settings.bundle_upload_stale_s)
    link = BrokerLink(
        broker=settings.broker(),
        engine=engine,
        settings=settings,
        clock=clock,
        metrics=metrics,
        bundle_files=bundle_files,
        signer=signer,
        ca=ca,
        tls_context=link_tls,
        chunks_tls_context=chunks_tls,
    )
    fleet_root = FleetRoot(settings.trust_root_path)
    if settings.trust_root_path is not None:
        try:
            trusted = fleet_root.load()  # a configured root that cannot be read stops the start
        except NoFleetRoot as exc:
            raise ValueError(str(exc)) from None
        if signer is not None:
            signer.check_against(trusted.root)
    if ca is not None and settings.broker_crl_path is not None:
        with new_session(engine) as session:  # the broker must never run on a stale CRL
            publish_crl(session, ca, settings, now=clock())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if not settings.run_link:  # API only: another hub process runs the link
            try:
                yield
            finally:
                engine.dispose()
            return
        link.start()
        try:
            yield
        finally:
            await link.stop()
            engine.dispose()

    # /docs and /redoc load their scripts from the hub itself, not a CDN: a hub on an
    # air-gapped network (common at the edge) still shows them. No validator badge either
    # (Swagger UI would fetch it from validator.swagger.io).
    app = FastAPIOffline(
        title="Driftless hub",
        version="0.1.0",
        description="Admin API of the Driftless device-fleet orchestrator.",
        lifespan=lifespan,
        max_body_size=settings.max_request_body_bytes,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.context = HubContext(
        settings=settings,
        engine=engine,
        clock=clock,
        metrics=metrics,
        link=link,
        delivery=link,
        desired=DesiredState(settings=settings, delivery=link),
        ca=ca,
        fleet_root=fleet_root,
        bundle_files=bundle_files,
    )
    problems.install(app)
    app.include_router(build_api_router())
    app.include_router(metrics_api.router)
    app.openapi = lambda: finish_openapi(app)  # type: ignore[method-assign]
    # Inside the audit middleware: a request's time ends with its answer, before the
    # audit row is written.
    app.add_middleware(metrics_api.MetricsMiddleware, metrics=metrics)
    app.add_middleware(AuditMiddleware, engine=engine, clock=clock, prefix=API_PREFIX)
    return app
