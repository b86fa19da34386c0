"""A real HTTP server on a free loopback port, in a thread, that records what it receives.

Stands in for the alert webhook and for the service's admin kill switch (which
lives in the serving code); it speaks plain HTTP over a socket, so the monitors'
HTTP clients run exactly as in production.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    """What the server got and how it should answer."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200
    token: str | None = None  # when set, a wrong/missing bearer token gets 401/403

    def bodies(self, path: str | None = None) -> list[Any]:
        return [r.body for r in self.requests if path is None or r.path == path]


@contextmanager
def http_receiver(status: int = 200, token: str | None = None) -> Iterator[Receiver]:
    """Serve on 127.0.0.1:<free port> until the block ends."""
    lock = threading.Lock()
    receiver = Receiver(url="", status=status, token=token)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length", 0))
            raw = self.rfile.read(length) if length else b""
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            with lock:
                receiver.requests.append(
                    Received(
                        "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                    )
                )
            code = receiver.status
            if receiver.token is not None:
                auth = self.headers.get("authorization", "")
                if not auth.startswith("Bearer "):
                    code = 401
                elif auth.removeprefix("Bearer ") != receiver.token:
                    code = 403
            payload = json.dumps({"ok": code < 300, "candidate_share": 0.0}).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
