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


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the limit."""


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
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send, f"{declared:,} bytes")
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, f"more than {self.max_bytes:,} bytes (chunked)")
