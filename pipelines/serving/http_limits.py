"""Request size and time limits for the HTTP service (ASGI middleware, uvicorn protocol).

Details: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
CLIENT_CLOSED = 499  # nginx's "client closed request": counted, never sent


async def send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    """A complete JSON response that closes the connection."""
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` (413) or slower than ``timeout`` (408)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout  # seconds for the whole body to arrive; None: no limit

    async def _refuse(self, send: Send, size: str) -> None:
        await send_json(
            send,
            413,
            {
                "error": f"request body of {size} is over the {self.max_bytes:,} byte limit "
                "(serving.max_body_mb); send fewer rows per batch call",
                "max_body_bytes": self.max_bytes,
            },
        )

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
            if self.timeout is None or declared <= 0:
                await self.app(scope, receive, send)
                return
        # Read the body here, up to the limit and within the timeout, then replay it.
        # Raising from inside the app's receive would surface as a 500 from BentoML.
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    left = max(deadline - time.monotonic(), 0.0)
                    message = await asyncio.wait_for(receive(), timeout=left)
            except TimeoutError:
                await send_json(
                    send,
                    408,
                    {
                        "error": f"request body not received within {self.timeout:g} s "
                        "(serving.body_timeout_seconds)"
                    },
                )
                return
            if message["type"] != "http.request":
                # The client went away. Answer all the same (uvicorn drops a response to a
                # disconnected client): an app that returns without answering holds
                # BentoML's TimeoutMiddleware, and with it the worker's shutdown, for its
                # whole traffic timeout.
                await send_json(send, CLIENT_CLOSED, {"error": "client closed the request"})
                return
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


class _HeaderTimer:
    """A timer for the request head (``header_timeout``), for a uvicorn HTTP protocol.

    It runs from the connection's start, and again whenever bytes of a new request
    arrive, until the parser has the whole head; idle keep-alive connections are closed
    by uvicorn's own keep-alive timeout.
    """

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_pending(self) -> bool:
        raise NotImplementedError

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self._head_pending() or self.transport.is_closing():
            return
        body = b'{"error": "request headers not received in time (serving.header_timeout_seconds)"}'
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()


class HeaderTimeoutH11Protocol(_HeaderTimer, H11Protocol):
    """uvicorn's h11 protocol (pure Python) with the head timer: where httptools is not
    installed."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _head_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE


def _httptools_protocol() -> type | None:
    """uvicorn's httptools protocol (a C parser) with the head timer, if httptools is here."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HeaderTimeoutHttpToolsProtocol(_HeaderTimer, HttpToolsProtocol):
        _in_head = True  # from the connection's start, and from each request's first byte

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _head_pending(self) -> bool:
            return self._in_head

    return HeaderTimeoutHttpToolsProtocol


HeaderTimeoutHttpToolsProtocol = _httptools_protocol()


def install_header_timeout(seconds: float) -> None:
    """Make uvicorn, as BentoML's workers start it, use the head timer: on httptools' C
    parser when it is installed (the bento's requirements ship it), else on h11.

    BentoML builds the uvicorn config itself with ``http="auto"``; uvicorn resolves
    the protocol from ``uvicorn.config.HTTP_PROTOCOLS`` when the server starts, after
    the service module (which calls this) is imported.
    """
    import uvicorn.config

    _HeaderTimer.header_timeout = seconds
    h11_target = f"{__name__}:HeaderTimeoutH11Protocol"
    fast = HeaderTimeoutHttpToolsProtocol is not None
    uvicorn.config.HTTP_PROTOCOLS["auto"] = (
        f"{__name__}:HeaderTimeoutHttpToolsProtocol" if fast else h11_target
    )
    uvicorn.config.HTTP_PROTOCOLS["h11"] = h11_target


# The scoring routes as OpenTelemetry's ExcludeList matches them: a regex searched in the
# full request URL (scheme, host and path, with any query).
SCORING_URLS = r"^[a-z]+://[^/]+/(predict|predict_batch|predict_columns|rank)/?(\?.*)?$"


def tracing_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """BentoML's ``tracing`` service config: the scoring routes are left out of tracing
    unless ``CTR_TRACE_SCORING=1``. Their spans (a server span and one per ASGI message)
    cost about a third of the event loop's time per call, and BentoML samples none unless
    tracing is configured (docs/serving.md, "Tail latency"); every call is in the request log.
    """
    return {} if environ.get("CTR_TRACE_SCORING") == "1" else {"excluded_urls": [SCORING_URLS]}


def logging_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """BentoML's ``logging`` service config: its access log (an INFO line of about 350 bytes
    per request on stdout, unrotated) only with ``CTR_ACCESS_LOG=1``. The request log holds
    every answered row with its id, and refusals and admin changes are logged by the
    service itself; at 120k requests/s the access log alone would be ~40 MB/s."""
    return {"access": {"enabled": environ.get("CTR_ACCESS_LOG") == "1"}}


def install_request_timer_release() -> None:
    """Make BentoML's per-request timeout timer let go of the request when it ends.

    BentoML 1.4's ``TimeoutMiddleware`` arms a ``traffic.timeout`` timer per request
    and never cancels it: for 10 s every finished request stays reachable from the
    event loop's timer heap (the timer holds the request's context, with its tracing
    spans and request objects). At 200 req/s that is ~2,000 request graphs, ~100k
    objects the full garbage collections scan: 50-110 ms pauses. The replacement is
    the same middleware with the timer cancelled when the request ends and armed in
    an empty context. BentoML builds its middleware list from ``traffic`` when the
    app starts, after the service module (which calls this) is imported.
    """
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = ReleasingTimeoutMiddleware  # type: ignore[misc]


def _bentoml_timeout_middleware() -> type:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    return TimeoutMiddleware


class ReleasingTimeoutMiddleware(_bentoml_timeout_middleware()):  # type: ignore[misc]
    """BentoML's ``TimeoutMiddleware`` (504 after ``timeout``), its timer cancelled at the end."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(
            self.timeout, self._set_timer_out, waiter, context=contextvars.Context()
        )

        async def _send(message: Message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                await send_json(
                    send,
                    504,
                    {"error": f"Not able to process the request in {self.timeout} seconds"},
                )
        else:
            await fut
        finally:
            timer.cancel()
        return None
