"""The API docs render in a real browser that can reach nothing but loopback.

An edge hub often sits on an air-gapped network; FastAPI's default ``/docs`` loads
Swagger UI from a public CDN and is blank there. Chromium (headless, Debian's
package) runs with every host name but 127.0.0.1 made unresolvable, loads the
hub's ``/docs`` and ``/redoc``, and the rendered DOM must hold the API's
operations. The control: the same browser on FastAPI's default (CDN) page renders
nothing, so the check can tell the two apart.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.openapi.docs import get_swagger_ui_html

from devtools.broker import free_port
from tests.support import HubProcess

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran, in a browser reaching only 127.0.0.1."""
    assert CHROMIUM is not None, "chromium is missing: scripts/bootstrap.sh --test installs it"
    result = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic", f"--user-data-dir={profile}",
            # Nothing resolves but loopback: a script from a CDN cannot load.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000", "--dump-dom", url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    process = HubProcess(tmp_path / "hub", f"mqtt://127.0.0.1:{free_port()}")  # no broker needed
    process.start(wait_mqtt=False)
    try:
        yield process
    finally:
        process.close()


def test_swagger_ui_and_redoc_render_with_no_network_beyond_loopback(
    hub: HubProcess, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{hub.api_port}"
    swagger = render(f"{base}/docs", tmp_path / "profile-1")
    assert 'class="swagger-ui' in swagger and "opblock" in swagger, swagger[-2000:]
    assert "/api/v1/devices/{device_id}/desired" in swagger
    redoc = render(f"{base}/redoc", tmp_path / "profile-2")
    assert "/api/v1/devices/{device_id}/desired" in redoc, redoc[-2000:]


def test_the_check_tells_a_cdn_page_from_a_served_one(tmp_path: Path) -> None:
    """FastAPI's default page (scripts from the CDN) stays blank in the same browser."""
    site = tmp_path / "site"
    site.mkdir()
    page = get_swagger_ui_html(openapi_url="/openapi.json", title="CDN docs")
    (site / "index.html").write_bytes(page.body)
    (site / "openapi.json").write_text('{"openapi": "3.1.0", "info": {}, "paths": {"/x": {}}}')
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dom = render(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "profile")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert "cdn.jsdelivr.net" in dom  # the page asked for the CDN...
    assert "opblock" not in dom  # ...and nothing rendered
