"""The service's outer middleware and log hygiene in process: token before body, strict JSON
content type, bounded 400 answers, one rate-limited line per refusal, slow bodies."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from pipelines.serving.http_limits import BodySizeLimit
from pipelines.serving.security import Guard, RefusalLog, quiet_bentoml_client_errors

TOKEN = "security-test-token-123456"


def _app(status: int = 200, body: bytes = b"{}") -> Any:
    read: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            read.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app.read = read  # type: ignore[attr-defined]
    return app


def _call(
    app: Any,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
    method: str = "POST",
    **guard: Any,
) -> tuple[int, bytes]:
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    hdrs = [(k.encode(), v.encode()) for k, v in headers.items()]
    if body:
        hdrs.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": hdrs}
    middleware = Guard(app, "CTR_TEST_TOKEN", max_body_bytes=1 << 20, **guard)
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


JSON = {"content-type": "application/json"}


def test_admin_token_is_checked_before_the_body_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTR_TEST_TOKEN", TOKEN)
    app = _app()
    body = json.dumps({"events": [{"x": 1}] * 1000}).encode()
    assert _call(app, "/admin/ingest", JSON, body)[0] == 401
    assert _call(app, "/admin/ingest", {**JSON, "authorization": "Bearer nope"}, body)[0] == 403
    assert app.read == []  # refused before anything was read or parsed
    ok = {**JSON, "authorization": f"Bearer {TOKEN}"}
    assert _call(app, "/admin/ingest", ok, body)[0] == 200
    # /metrics needs the token unless configured public
    assert _call(app, "/metrics", {}, method="GET")[0] == 401
    assert _call(app, "/metrics", {}, method="GET", public_metrics=True)[0] == 200
    assert _call(app, "/healthz", {}, method="GET")[0] == 200


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
def test_a_body_that_is_not_declared_json_gets_415(ctype: str) -> None:
    app = _app()
    body = b'{"user": "u1", "item": "i1", "surface": "feed", "device": "mobile"}'
    headers = {"content-type": ctype} if ctype else {}
    status, answer = _call(app, "/predict", headers, body)
    assert status == 415 and "application/json" in json.loads(answer)["error"]
    assert app.read == []
    assert (
        _call(app, "/predict", {"content-type": "application/json; charset=utf-8"}, body)[0] == 200
    )
    assert _call(app, "/metadata", {})[0] == 200  # no body: nothing to declare


def test_a_400_answer_lists_at_most_20_errors_and_logs_one_short_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    detail = [{"loc": ["requests", i, "user"], "msg": "Field required"} for i in range(20000)]
    huge = json.dumps({"error": "20000 validation errors for X", "detail": detail}).encode()
    caplog.set_level(logging.WARNING, "ctr.security")
    status, answer = _call(_app(400, huge), "/predict_batch", JSON, b'{"requests": [{}]}')
    data = json.loads(answer)
    assert status == 400 and len(data["detail"]) == 20 and "19980 more" in data["detail_truncated"]
    assert len(answer) < 3000 < len(huge)
    lines = [r.getMessage() for r in caplog.records if r.name == "ctr.security"]
    assert len(lines) == 1 and len(lines[0]) < 400 and "requests.0.user" in lines[0]
    assert '{"requests"' not in lines[0]  # never the body


def test_refusal_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "ctr.security")
    log = RefusalLog(per_second=5)
    for _ in range(1000):
        log.refused("POST", "/predict", 400, "bad")
    assert log.logged <= 6 and log.suppressed >= 990
    assert len([r for r in caplog.records if r.name == "ctr.security"]) == log.logged


def test_bentoml_tracebacks_for_client_errors_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    quiet_bentoml_client_errors()
    target = logging.getLogger("bentoml._internal.server.http_app")

    class Row(BaseModel):
        user: str

    try:
        Row.model_validate({})
    except ValidationError:
        target.error("Exception on %s [%s]", "/predict", "POST", exc_info=True)
    try:
        raise RuntimeError("a real server error")
    except RuntimeError:
        target.error("Exception on %s [%s]", "/predict", "POST", exc_info=True)
    kept = [r for r in caplog.records if r.name == target.name]
    assert len(kept) == 1 and "real server error" in str(kept[0].exc_info[1])


def test_a_body_that_trickles_in_gets_408() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [(b"content-length", b"100")],
    }
    asyncio.run(BodySizeLimit(_app(), 1000, timeout=0.5)(scope, receive, send))
    assert sent[0]["status"] == 408


@pytest.mark.parametrize("headers", [[], [(b"content-length", b"100")]], ids=["get", "post"])
def test_a_client_gone_before_its_body_does_not_hold_the_worker(headers: list[Any]) -> None:
    """A client that disconnects before the body is read (a readiness probe that timed out
    while the worker loaded, a load generator stopping) ends the request at once. Without an
    answer, BentoML's own TimeoutMiddleware (outermost, real) kept the request task for its
    10 s traffic timeout, and uvicorn waited for that task before a worker could exit."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    method = "POST" if headers else "GET"
    scope = {"type": "http", "method": method, "path": "/readyz", "headers": headers}
    if headers:
        headers.append((b"content-type", b"application/json"))
    app = TimeoutMiddleware(Guard(_app(), "CTR_TEST_TOKEN", 1 << 20, body_timeout=30), 10.0)

    async def call() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(app(scope, receive, send), 5.0)
        return loop.time() - started

    took = asyncio.run(call())
    assert took < 0.5, took
    assert sent[0]["status"] == 499  # nginx's "client closed request"; nothing reaches the wire
