"""The demo's workload: a tiny HTTP service that a signed bundle carries to the devices.

Standard library only; run by the device's supervisor as ``python3 service.py``.

Rules:
- Listens on 127.0.0.1:``$PORT``: the desired entry's ``env`` gives each device
  its own port, so one bundle serves a whole fleet on one machine.
- ``GET /`` answers ``web <version> on <device>: <greeting>`` (the version from
  ``DRIFTLESS_VERSION``, set by the runtime; ``DEVICE`` from the entry's env;
  the greeting from the config file at ``$DRIFTLESS_CONFIG``); ``GET /health``
  answers 200 ``ok``; anything else 404.
- The socket has ``SO_REUSEPORT``, so in a hand-over (``update:
  start-then-stop``) the new version can listen beside the old one; the kernel
  then spreads connections between them, which is why the manifest's ``alive``
  check, not the HTTP one, is what proves the new version itself runs.
- ``--require KEY``: refuse to start (exit 1) unless the config holds KEY.
  Release 2.0's command line adds ``--require database_url``, which the fleet's
  configuration does not have: the demo's broken rollout.
- ``--check``: the manifest's command check (its port comes from the
  environment, so one manifest fits every device): ``GET /health`` on ``$PORT``,
  exit 0 on 200, else 1 with the reason on stderr.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import sys


def config() -> dict[str, object]:
    path = os.environ.get("DRIFTLESS_CONFIG")
    if not path:
        return {}
    with open(path, encoding="utf-8") as file:
        loaded = json.load(file)
    return loaded if isinstance(loaded, dict) else {}


def check(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.5)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except OSError as exc:
        print(f"health: no answer on :{port}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if status != 200:
        print(f"health: :{port} answered {status}", file=sys.stderr)
        return 1
    return 0


class Server(http.server.HTTPServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def serve(port: int, settings: dict[str, object]) -> None:
    version = os.environ.get("DRIFTLESS_VERSION", "?")
    device = os.environ.get("DEVICE", "?")
    greeting = str(settings.get("greeting", "hello"))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/":
                status, body = 200, f"web {version} on {device}: {greeting}\n"
            elif self.path == "/health":
                status, body = 200, "ok\n"
            else:
                status, body = 404, "not found\n"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would fill the log the failure reports quote

    server = Server(("127.0.0.1", port), Handler)
    print(f"web {version} serving on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    port = int(os.environ.get("PORT", "8080"))
    if argv[:1] == ["--check"]:
        return check(port)
    settings = config()
    if argv[:1] == ["--require"] and len(argv) > 1 and argv[1] not in settings:
        print(f"error: the configuration has no {argv[1]!r}; refusing to start", flush=True)
        return 1
    serve(port, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
