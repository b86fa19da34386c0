"""Open-loop load at a fixed mean rate: Poisson arrivals, raw HTTP/1.1 on keep-alive sockets.

Each request is scheduled in advance and its latency counts from the scheduled time, so a
slow server cannot slow the sender down (no coordinated omission) and arrivals are not
synchronized in bursts (``hey`` paces each worker with its own ticker, all started
together). Raw asyncio streams cost a few tens of microseconds per request, so the
generator stays far from saturation on the same machine. Run it as its own process:

    python benchmarks/_openloop.py URL PATH BODIES RATE SECONDS [--seed N] > out.json

``BODIES`` holds one JSON body per line, sent in turn. Prints one JSON document: the
latencies (ms, by scheduled send time), statuses and the achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

_REQUEST_ID = re.compile(rb'"request_id":\s*"([^"]+)"')


class _Pool:
    """Idle keep-alive connections; a new one when none is idle (at most ``limit``)."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(limit)

    async def get(
        self, fresh: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A connection and whether it was reused; connections the server closed are dropped."""
        while self.idle and not fresh:
            reader, writer = self.idle.pop()
            if not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool, bytes]:
    """Send one request, read the whole answer: (status, connection reusable, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, not close, body


async def run(
    url: str, path: str, bodies: list[bytes], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nhost: "
        + f"{host}:{port}".encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(b)).encode()
        + b"\r\n\r\n"
        + b
        for b in bodies
    ]
    rng = random.Random(seed)
    due, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        due.append(t)
    pool = _Pool(host, port, 512)
    latency = [0.0] * len(due)
    status: list[str] = [""] * len(due)
    ids: list[bytes] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    started_unix = time.time() + 0.2  # the wall-clock time of due_s 0

    async def one(k: int) -> None:
        async with pool.slots:
            writer = None
            try:
                reader, writer, reused = await pool.get()
                try:
                    code, reuse, body = await asyncio.wait_for(
                        _exchange(reader, writer, requests[k % len(requests)]), 60
                    )
                except (ConnectionError, asyncio.IncompleteReadError) as e:
                    # a kept-alive connection the server closed meanwhile (its idle timeout):
                    # nothing was answered on it, so the request goes once more on a new one
                    if not reused or (isinstance(e, asyncio.IncompleteReadError) and e.partial):
                        raise
                    writer.close()
                    reader, writer, _ = await pool.get(fresh=True)
                    code, reuse, body = await asyncio.wait_for(
                        _exchange(reader, writer, requests[k % len(requests)]), 60
                    )
                status[k] = str(code)
                if code == 200:  # the request ids answered, for the request-log accounting
                    ids.extend(_REQUEST_ID.findall(body))
                if reuse:
                    pool.idle.append((reader, writer))
                else:
                    writer.close()
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                status[k] = type(e).__name__
                if writer is not None:
                    writer.close()
        latency[k] = (loop.time() - (start + due[k])) * 1000.0

    # One task per request, created at its due time; only the unfinished ones are awaited.
    # Creating all tasks up front, or gathering all of them at the end, costs the loop about
    # 10 us per request at once (about 0.3 s for 30k requests): it delayed the first or the
    # last requests of a long run.
    pending: set[asyncio.Task[None]] = set()
    for k in range(len(due)):
        wait = start + due[k] - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        task = asyncio.create_task(one(k))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    for _, writer in pool.idle:
        writer.close()
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": len(due),
        "achieved_rate": round(len(due) / seconds, 1),
        "latency_ms": [round(x, 3) for x in latency],
        "due_s": [round(x, 4) for x in due],
        "started_unix": round(started_unix, 4),
        "status": status,
        "request_ids": [i.decode() for i in ids],
    }


def answered(result: dict[str, Any]) -> list[float]:
    """Latencies (ms) of the requests of one run that were answered 200."""
    return [x for x, s in zip(result["latency_ms"], result["status"], strict=True) if s == "200"]


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Counts and percentiles (ms) of the answered requests of one run."""
    import numpy as np

    from tests.support.loadtest import percentiles

    ok = np.array(answered(result))
    out: dict[str, Any] = {
        "sent": result["sent"],
        "target_rate": result["rate"],
        "achieved_rate": result["achieved_rate"],
        "answered_200": int(len(ok)),
        "errors": result["sent"] - int(len(ok)),
        "statuses": {s: result["status"].count(s) for s in sorted(set(result["status"]))},
    }
    return {**out, **percentiles(ok)}


def open_loop(
    url: str, path: str, bodies: Path, rate: float, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Run the generator in its own process; its summary (and the raw result)."""
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            __file__,
            url,
            path,
            str(bodies),
            str(rate),
            str(seconds),
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    return {**summary(result), "raw": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("path")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("rate", type=float)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    started = time.process_time()
    result = asyncio.run(run(args.url, args.path, bodies, args.rate, args.seconds, args.seed))
    result["generator_cpu_s"] = round(time.process_time() - started, 2)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
