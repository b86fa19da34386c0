"""HTTP limits in process: body sizes (declared, chunked, invalid) and the request timeout."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import weakref
from typing import Any

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from pipelines.serving.http_limits import BodySizeLimit, ReleasingTimeoutMiddleware


async def _echo(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def _call(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes]:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "headers": headers}
    asyncio.run(BodySizeLimit(_echo, max_bytes=10)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    status, body = _call([(b"content-length", b"11")], [b"x" * 11])
    assert status == 413 and "10 byte limit" in json.loads(body)["error"]


def test_bodies_within_the_limit_pass_unchanged() -> None:
    assert _call([(b"content-length", b"10")], [b"x" * 10]) == (200, b"x" * 10)
    assert _call([], [b"abc", b"def"]) == (200, b"abcdef")  # chunked, replayed
    assert _call([(b"content-length", b"nonsense")], [b"abc"]) == (200, b"abc")


def test_chunked_body_growing_past_the_limit_is_refused() -> None:
    status, body = _call([], [b"x" * 6, b"y" * 6])
    assert status == 413 and "chunked" in json.loads(body)["error"]


_REQUEST: contextvars.ContextVar[object] = contextvars.ContextVar("request")


class _Request:
    """Stands for a request's object graph (its tracing span, request objects)."""


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _after_requests(middleware: type, n: int = 50) -> tuple[int, int]:
    """Run ``n`` requests through ``middleware`` on one loop, then collect garbage:
    (finished requests still reachable, timers still live on the loop)."""
    refs: list[weakref.ref[_Request]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def one(wrapped: Any) -> None:
        request = _Request()
        refs.append(weakref.ref(request))
        _REQUEST.set(request)  # as the tracing middleware sets the current span
        await wrapped({"type": "http", "path": "/predict", "headers": []}, receive, send)

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        wrapped = middleware(_answer, timeout=10.0)
        for _ in range(n):
            await loop.create_task(one(wrapped), context=contextvars.Context())
        await asyncio.sleep(0)  # the last task's wake-up of this one has run
        gc.collect()
        live = sum(1 for h in loop._scheduled if not h.cancelled())  # type: ignore[attr-defined]
        return sum(1 for r in refs if r() is not None), live

    return asyncio.run(main())


@pytest.mark.parametrize("middleware", [TimeoutMiddleware, ReleasingTimeoutMiddleware])
def test_a_finished_request_is_not_kept_by_its_timeout_timer(middleware: type) -> None:
    """BentoML 1.4's TimeoutMiddleware leaves each request's 10 s timer armed, holding the
    request's context: at 200 req/s ~2,000 finished requests stay reachable and every full
    garbage collection scans them (50-110 ms pauses). The service installs the releasing
    one; if BentoML fixes its own, the first case fails and the replacement can go."""
    reachable, live_timers = _after_requests(middleware)
    if middleware is TimeoutMiddleware:
        assert (reachable, live_timers) == (50, 50)
    else:
        assert (reachable, live_timers) == (0, 0)


def test_the_releasing_timeout_still_answers_504_in_time() -> None:
    sent: list[dict[str, Any]] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(5)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ReleasingTimeoutMiddleware(slow, timeout=0.05)({"type": "http"}, receive, send)
        return loop.time() - started

    assert asyncio.run(main()) < 1.0
    assert sent[0]["status"] == 504
    assert b"0.05 seconds" in sent[1]["body"]


def test_the_service_installs_the_releasing_timeout() -> None:
    """BentoML builds its middleware list from ``traffic.TimeoutMiddleware`` at start-up."""
    from bentoml._internal.server.http import traffic

    from pipelines.serving.http_limits import install_request_timer_release

    original = traffic.TimeoutMiddleware
    try:
        install_request_timer_release()
        assert traffic.TimeoutMiddleware is ReleasingTimeoutMiddleware
    finally:
        traffic.TimeoutMiddleware = original  # type: ignore[misc]


@pytest.mark.parametrize("traced", [False, True])
def test_scoring_routes_are_left_out_of_tracing_unless_asked(traced: bool) -> None:
    """BentoML's OpenTelemetry middleware, built as BentoML builds it from the service's
    ``tracing`` config, with every span sampled: no span for a scoring call by default
    (``CTR_TRACE_SCORING=1`` traces them); other routes keep theirs."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util.http import ExcludeList

    from pipelines.serving.http_limits import tracing_config

    config = tracing_config({"CTR_TRACE_SCORING": "1"} if traced else {})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = OpenTelemetryMiddleware(
        _echo, excluded_urls=ExcludeList(config.get("excluded_urls", [])), tracer_provider=provider
    )

    def spans_of(path: str, query: bytes = b"") -> int:
        exporter.clear()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http", "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 5000),
            "headers": [(b"host", b"127.0.0.1:3000")],
        }  # fmt: skip
        asyncio.run(app(scope, receive, send))
        return len(exporter.get_finished_spans())

    scoring = [spans_of("/predict"), spans_of("/predict_batch"), spans_of("/rank", b"x=1")]
    assert all(n > 0 for n in scoring) if traced else scoring == [0, 0, 0]
    for other in ("/metadata", "/admin/reload", "/predictions", "/readyz"):
        assert spans_of(other) > 0, other


def test_bentomls_access_log_is_on_only_when_asked() -> None:
    from pipelines.serving.http_limits import logging_config

    assert logging_config({}) == {"access": {"enabled": False}}
    assert logging_config({"CTR_ACCESS_LOG": "1"}) == {"access": {"enabled": True}}


@pytest.mark.parametrize("protocol", ["HeaderTimeoutHttpToolsProtocol", "HeaderTimeoutH11Protocol"])
def test_both_http_parsers_cut_a_slow_head_and_keep_serving(protocol: str) -> None:
    """uvicorn with either protocol (httptools when installed, h11 otherwise): a head that
    trickles in gets 408 at the limit; a connection kept alive between requests is not cut;
    ``install_header_timeout`` picks httptools for BentoML's ``http="auto"``."""
    import socket
    import threading
    import time

    import uvicorn
    import uvicorn.config

    from pipelines.serving import http_limits
    from tests.support.loadtest import free_port

    saved = (http_limits._HeaderTimer.header_timeout, dict(uvicorn.config.HTTP_PROTOCOLS))
    http_limits.install_header_timeout(0.5)
    assert uvicorn.config.HTTP_PROTOCOLS["auto"].endswith(":HeaderTimeoutHttpToolsProtocol")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=getattr(http_limits, protocol), log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as kept:
            kept.sendall(request)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle between requests, past the head limit: still open
            kept.sendall(request)
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            started = time.monotonic()
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            while time.monotonic() - started < 4 and not answer:
                slow.sendall(b"X-Slow: 1\r\n")
                slow.settimeout(0.2)
                try:
                    answer = slow.recv(4096)
                except TimeoutError:
                    continue
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert time.monotonic() - started < 2.0
    finally:
        server.should_exit = True
        thread.join(10)
        http_limits._HeaderTimer.header_timeout = saved[0]
        uvicorn.config.HTTP_PROTOCOLS.update(saved[1])
