"""Request body size limit for the HTTP service (an ASGI middleware).

BentoML reads and parses any body it is sent; a 20 MB body would be parsed in
full before pydantic refuses it, costing memory and CPU of the worker that every
other client shares. This middleware answers **413** with a JSON error before the
body is parsed: at once when ``Content-Length`` is over the limit, and while
reading when a chunked body grows past it. The limit comes from
``serving.max_body_mb`` (params.yaml, carried in the release policy).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413 and a JSON explanation."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: str) -> bytes:
        return json.dumps(
            {
                "error": f"request body of {size} is over the {self.max_bytes:,} byte limit "
                "(serving.max_body_mb); send fewer rows per /predict_batch call",
                "max_body_bytes": self.max_bytes,
            }
        ).encode()

    async def _refuse(self, send: Send, size: str) -> None:
        body = self._error(size)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                await self._refuse(send, f"{declared:,} bytes")
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read the body here, up to the limit, then replay it.
        # Raising from inside the app's receive would surface as a 500 from BentoML.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes:,} bytes (chunked)")
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
