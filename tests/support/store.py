"""Helpers for the online-store serving tests and benchmarks: a real redis-server, steady traffic.

``RedisServer`` starts ``redis-server`` on a loopback port, by default with an
append-only file, so a stop and restart keeps the data (as a production Redis with
persistence would); ``persistent=False`` keeps everything in memory (faster).
``Traffic`` sends /predict calls back to back from a thread and records every answer,
so an outage can be measured from the client's side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.loadtest import free_port


class RedisServer:
    """A redis-server on 127.0.0.1 that can be stopped and restarted on the same port and data."""

    def __init__(self, folder: Path, persistent: bool = True) -> None:
        binary = shutil.which("redis-server")
        assert binary, (
            "redis-server is not installed; run .ci/run or `apt-get install redis-server`"
        )
        self.binary = binary
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *(
                    ["--appendonly", "yes", "--appendfsync", "always"]
                    if self.persistent
                    else ["--appendonly", "no"]
                ),
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port)
        try:
            for _ in range(200):
                try:
                    client.ping()
                    return
                except redis.exceptions.BusyLoadingError:
                    time.sleep(0.05)
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise AssertionError(f"redis-server on port {self.port} did not answer in 10 s")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None


@dataclass
class Answer:
    at: float  # monotonic time the answer arrived
    status: int
    degraded_reason: str | None
    route: str | None


@dataclass
class Traffic:
    """Back-to-back /predict calls with one body from a thread; every answer recorded."""

    url: str
    body: dict[str, Any]
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        content = json.dumps(self.body).encode()
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/predict", content=content, headers=headers)
                except httpx.TransportError:
                    self.answers.append(Answer(time.monotonic(), 0, "transport error", None))
                    continue
                data = r.json() if r.status_code == 200 else {}
                self.answers.append(
                    Answer(
                        time.monotonic(),
                        r.status_code,
                        data.get("degraded_reason"),
                        data.get("route"),
                    )
                )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def wait_recovered(self, since: float, timeout: float = 30.0) -> bool:
        """Wait for an answer after ``since`` served from the store (not degraded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(a.at > since and a.status == 200 and not _store_down(a) for a in self.answers):
                return True
            time.sleep(0.05)
        return False


def _store_down(a: Answer) -> bool:
    return a.degraded_reason is not None and "online store unavailable" in a.degraded_reason


def outage_summary(answers: list[Answer], cut: float, restored: float) -> dict[str, Any]:
    """What clients saw around one outage: statuses, routes, how long answers were degraded."""
    window = [a for a in answers if a.at >= cut]
    down = [a for a in window if _store_down(a)]
    after = [a for a in window if a.at > restored and not _store_down(a)]
    first_ok = after[0].at if after else None
    return {
        "outage_seconds": round(restored - cut, 3),
        "requests": len(window),
        "non_200": sum(a.status != 200 for a in window),
        "degraded_requests": len(down),
        "degraded_seconds": round(down[-1].at - down[0].at, 3) if down else 0.0,
        "first_degraded_after_cut_ms": round((down[0].at - cut) * 1000, 1) if down else None,
        "recovered_after_restore_ms": None
        if first_ok is None
        else round((first_ok - restored) * 1000, 1),
        "routes_while_degraded": sorted({str(a.route) for a in down}),
    }
