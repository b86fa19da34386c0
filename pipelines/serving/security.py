"""What public callers of the service may see and send.

Details: docs/serving.md.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
from typing import Any

from pipelines.serving.http_limits import (
    CLIENT_CLOSED,
    ASGIApp,
    BodySizeLimit,
    Message,
    Receive,
    Scope,
    Send,
    send_json,
)

logger = logging.getLogger("ctr.security")
MAX_ERROR_DETAILS = 20
PUBLIC_GET = ("/", "/docs", "/docs.json", "/healthz", "/livez", "/readyz")

# An absolute path (POSIX) inside a message: everything up to the last component goes.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s'\"/<>:,;()\[\]]+/)+([^\s'\"/<>:,;()\[\]]*)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last component (``.../model.joblib``)."""
    return _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}", text)


def check_bearer(authorization: str, token_env: str) -> tuple[int, str] | None:
    """None when ``authorization`` carries the token held in ``token_env``, else (status, error).

    Compared in constant time (``hmac.compare_digest``).
    """
    token = os.environ.get(token_env, "")
    if not token:
        return 403, (
            f"admin endpoints are disabled: set {token_env} in the service environment "
            "to enable them"
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return 401, "missing bearer token: send 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return 403, "invalid admin token"
    return None


class RefusalLog:
    """One log line per refused request, at most ``per_second`` a second; the rest counted
    and reported in the next line that is written."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.suppressed = 0
        self.logged = 0
        self._allowance = per_second
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def refused(self, method: str, path: str, status: int, what: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._allowance = min(
                self.per_second, self._allowance + (now - self._last) * self.per_second
            )
            self._last = now
            if self._allowance < 1.0:
                self.suppressed += 1
                return
            self._allowance -= 1.0
            suppressed, self.suppressed = self.suppressed, 0
            self.logged += 1
        more = f" (+{suppressed} refused requests not logged)" if suppressed else ""
        logger.warning("refused %s %s %d: %s%s", method, path[:100], status, what[:200], more)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length:
        return length.strip() != "0"
    return bool(_header(scope, b"transfer-encoding"))


def _summary(body: bytes) -> tuple[bytes, str]:
    """A 400 body cut to ``MAX_ERROR_DETAILS`` field errors, and a one-line description."""
    try:
        data = json.loads(body)
    except ValueError:
        return body, "bad request"
    if not isinstance(data, dict):
        return body, "bad request"
    what = str(data.get("error", "bad request"))
    detail = data.get("detail")
    if isinstance(detail, list) and detail:
        first = detail[0] if isinstance(detail[0], dict) else {}
        loc = ".".join(str(p) for p in first.get("loc", []))[:80]
        what = f"{what.splitlines()[0]} (first: {loc}: {str(first.get('msg', ''))[:80]})"
        if len(detail) > MAX_ERROR_DETAILS:
            data["detail"] = detail[:MAX_ERROR_DETAILS]
            data["detail_truncated"] = f"{len(detail) - MAX_ERROR_DETAILS} more errors not shown"
            body = json.dumps(data).encode()
    return body, what


class Guard:
    """The service's outer ASGI middleware; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        token_env: str,
        max_body_bytes: int,
        body_timeout: float | None = None,
        public_metrics: bool = False,
        refused_log_per_second: float = 5.0,
    ) -> None:
        self.app = BodySizeLimit(app, max_body_bytes, body_timeout)
        self.token_env = token_env
        self.public_metrics = public_metrics
        self.log = RefusalLog(refused_log_per_second)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        if path.startswith("/admin/") or (path == "/metrics" and not self.public_metrics):
            refused = check_bearer(_header(scope, b"authorization"), self.token_env)
            if refused is not None:
                self.log.refused(method, path, refused[0], refused[1])
                await send_json(send, refused[0], {"error": refused[1]})
                return
        if method == "POST" and _has_body(scope):
            ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
            if ctype != "application/json":
                error = (
                    f"content-type must be application/json, got {ctype[:60] or 'none'!r}; "
                    "send the body as JSON"
                )
                self.log.refused(method, path, 415, error)
                await send_json(send, 415, {"error": error})
                return

        held: Message | None = None
        chunks: list[bytes] = []

        async def guarded_send(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status == 400:
                    held = message  # wait for the body: cut it, log one line
                    return
                if 400 < status < 500 and status != CLIENT_CLOSED:
                    self.log.refused(method, path, status, "client error")
                await send(message)
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body, what = _summary(b"".join(chunks))
            self.log.refused(method, path, 400, what)
            headers = [(k, v) for k, v in held.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, guarded_send)


class _DropClientErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        if type(exc).__name__ == "ValidationError":
            return False
        code = getattr(getattr(exc, "error_code", None), "value", 500)
        return not (isinstance(code, int) and code < 500)


def quiet_bentoml_client_errors() -> None:
    """Drop BentoML's traceback records for 4xx answers (``Guard`` logs one line each)."""
    target = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _DropClientErrorTracebacks) for f in target.filters):
        target.addFilter(_DropClientErrorTracebacks())


def public_metadata(full: dict[str, Any]) -> dict[str, Any]:
    """``/metadata`` for a caller without the admin token: which release and models answer,
    nothing about the host, the code, the params or the store."""
    release = full.get("release") or {}
    return {
        "release_id": release.get("release_id"),
        "service_name": release.get("service_name"),
        "routing": (full.get("routing") or {}).get("mode"),
        "tiers": {
            role: {"version": tier.get("version"), "loaded": tier.get("loaded")}
            for role, tier in (full.get("tiers") or {}).items()
        },
        "baseline_loaded": full.get("baseline_loaded"),
        "detail": "send the admin bearer token for the full metadata",
    }
