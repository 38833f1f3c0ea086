"""Run the hub (API + MQTT link) in this process until SIGTERM or SIGINT.

Rules:
- Returns 0 after a signal-initiated, clean shutdown; 1 if the server could not
  start (port taken, start-up failure); 2 when the configuration is refused
  (an unreadable root, a signing key the root does not authorise).
- Logging is whatever the caller configured on the root logger (JSON in
  ``driftless``); uvicorn's loggers propagate to it (``log_config=None``).
- A broker that is down at start is not an error: the API comes up and the link retries.
- Once the app is built, everything made so far (modules, routes, the schema's
  metadata: about 140,000 objects that live as long as the process) is frozen out
  of the cyclic collector's reach (:func:`freeze_startup_heap`), so a full
  collection walks only what the hub made since. Without it every full collection
  walked the whole start-up heap again: ~80-110 ms each, and one often fell inside
  a fleet-wide change's transaction, before the first document went out
  (docs/benchmarks.md, "After the seams").
"""

from __future__ import annotations

import gc
import logging
import signal
from types import FrameType

import uvicorn

from hub.app import create_app
from hub.settings import HubSettings

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def freeze_startup_heap() -> int:
    """Collect once, then move every tracked object to the permanent generation.

    Why: those objects live until the process ends, and a full collection would
    otherwise walk all of them each time it runs, as a pause on whatever the hub is
    doing then. Only for the hub's own process (a test building many apps in one
    process must not freeze them). Returns how many objects are frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def serve(settings: HubSettings) -> int:
    try:
        app = create_app(settings)
    except ValueError as exc:  # a bad root, key or directory: say which, do not start
        log.error("hub cannot start", extra={"error": str(exc)})
        return 2
    frozen = freeze_startup_heap()
    log.debug("start-up heap frozen", extra={"objects": frozen})
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=settings.api_access_log,
            lifespan="on",
            timeout_graceful_shutdown=5,
            ssl_certfile=settings.api_tls_cert_path,
            ssl_keyfile=settings.api_tls_key_path,
        )
    )
    received: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        # uvicorn installs its own handlers while serving and re-raises the signal
        # once it has shut down; this handler absorbs that so we can return 0.
        received.append(signum)
        server.should_exit = True

    previous = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    scheme = "https" if settings.api_tls_cert_path else "http"
    api_url = f"{scheme}://{settings.api_host}:{settings.api_port}"
    log.info("hub starting", extra={"api": api_url, "broker": settings.broker_url})
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        log.error("hub failed to start", extra={"code": exc.code})
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        log.error("hub failed to start")
        return 1
    log.info("hub stopped", extra={"signal": received[0] if received else None})
    return 0
