"""The body-size middleware in process: declared, chunked and invalid lengths."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pipelines.serving.http_limits import BodySizeLimit


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
