"""Load, soak and fault measurement against a real ``bentoml serve`` over loopback HTTP.

Shared by ``benchmarks/soak.py``, ``benchmarks/serving_faults.py`` and the short
versions in ``tests/test_serving_reliability.py``, so the way requests are sent
and results are counted is written once:

* ``Served`` starts ``bentoml serve`` of a bento (one BLAS thread per worker,
  loopback, on a free port; started again when a port it picked was taken meanwhile),
  waits for ``/readyz``, lists its worker processes, samples their
  resident memory and stops it cleanly (SIGTERM: the request log is flushed);
* ``fixed_rate`` sends requests at a fixed rate for a fixed time (an open loop:
  latency counts from the scheduled send time, so client-side queueing is not
  hidden) and records every outcome: HTTP status or transport error, latency,
  the ``request_id`` the service answered with;
* ``summarize`` and ``timeline`` turn outcomes into the published figures
  (sent, answered, 5xx, transport errors, percentiles, per-second errors, the
  time until answers were all good again after a fault);
* ``log_accounting`` compares the answered request ids with the request log.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.simulation.launcher import Served, free_port  # noqa: F401  (shared)


@dataclass
class Outcome:
    """One request: when it was due (s from the start), what came back, how long it took."""

    due: float
    status: int | str  # HTTP status, or the transport error's class name
    latency: float  # seconds from the scheduled send time
    request_ids: list[str] = field(default_factory=list)
    route: str | None = None
    reason: str | None = None  # degraded_reason of the first answer


def workload_frame(raw_dir: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` requests from the snapshot's last day, timed within its last hour (fresh features)."""
    events = pd.read_parquet(
        raw_dir / "events.parquet", columns=["user_id", "item_id", "surface", "device", "ts"]
    )
    last = events["ts"].max()
    recent = events[events["ts"] > last - pd.Timedelta(days=1)]
    rng = np.random.default_rng(seed)
    rows = recent.iloc[rng.integers(0, len(recent), n)].reset_index(drop=True)
    rows["ts"] = last - pd.to_timedelta(rng.uniform(0, 3600, n), unit="s")
    return rows


def workload(raw_dir: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``workload_frame`` as /predict bodies."""
    rows = workload_frame(raw_dir, n, seed)
    return [
        {"user": u, "item": i, "surface": s, "device": d, "timestamp": t.isoformat()}
        for u, i, s, d, t in zip(
            rows.user_id, rows.item_id, rows.surface, rows.device, rows.ts, strict=True
        )
    ]


class MemorySampler:
    """Samples ``Served.rss_mb`` every ``interval`` seconds on a thread: (t, MiB) pairs."""

    def __init__(self, served: Served, interval: float = 1.0) -> None:
        self.served = served
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self.served.rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> dict[str, Any]:
        """First, peak and last RSS, and the growth over the second half of the run."""
        mib = [m for _, m in self.samples]
        if not mib:
            return {}
        half = mib[len(mib) // 2 :]
        return {
            "samples": len(mib),
            "first_mib": round(mib[0], 1),
            "peak_mib": round(max(mib), 1),
            "last_mib": round(mib[-1], 1),
            "second_half_growth_mib": round(half[-1] - half[0], 1),
        }


def fixed_rate(
    url: str,
    bodies: Sequence[bytes],
    rate: float,
    seconds: float,
    path: str = "/predict",
    events: dict[float, Callable[[], None]] | None = None,
    timeout: float = 30.0,
) -> list[Outcome]:
    """Send ``rate`` requests per second for ``seconds`` (bodies reused in a cycle).

    ``events`` maps a time (s from the start) to a callable run then in a thread,
    e.g. a fault injection; the load goes on meanwhile.
    """
    return asyncio.run(_fixed_rate(url, bodies, rate, seconds, path, events or {}, timeout))


async def _fixed_rate(
    url: str,
    bodies: Sequence[bytes],
    rate: float,
    seconds: float,
    path: str,
    events: dict[float, Callable[[], None]],
    timeout: float,
) -> list[Outcome]:
    import httpx

    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter() + 0.2

        async def one(k: int) -> None:
            due = k / rate
            delay = t0 + due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                response = await client.post(path, content=bodies[k % len(bodies)], headers=headers)
            except httpx.TransportError as exc:
                outcomes.append(Outcome(due, type(exc).__name__, time.perf_counter() - t0 - due))
                return
            latency = time.perf_counter() - t0 - due
            ids: list[str] = []
            route = reason = None
            if response.status_code == 200:
                data = response.json()
                answers = data if isinstance(data, list) else [data]
                ids = [a["request_id"] for a in answers]
                route, reason = answers[0]["route"], answers[0].get("degraded_reason")
            outcomes.append(Outcome(due, response.status_code, latency, ids, route, reason))

        async def at(when: float, action: Callable[[], None]) -> None:
            delay = t0 + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.to_thread(action)

        await asyncio.gather(
            *(one(k) for k in range(int(rate * seconds))),
            *(at(when, action) for when, action in events.items()),
        )
    outcomes.sort(key=lambda o: o.due)
    return outcomes


def percentiles(latencies_ms: Any, digits: int = 2) -> dict[str, float | None]:
    """p50, p95, p99 and max of latencies in ms (``None`` each when there are none)."""
    lat = np.asarray(latencies_ms, dtype=float)
    if not len(lat):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    out: dict[str, float | None] = {
        f"p{q}_ms": round(float(np.percentile(lat, q)), digits) for q in (50, 95, 99)
    }
    out["max_ms"] = round(float(lat.max()), digits)
    return out


def summarize(outcomes: Sequence[Outcome], seconds: float | None = None) -> dict[str, Any]:
    """Counts by status, 5xx and transport errors, latency percentiles of the answered."""
    statuses = Counter(str(o.status) for o in outcomes)
    ok = np.array([o.latency for o in outcomes if o.status == 200]) * 1000.0
    span = seconds or (max(o.due for o in outcomes) if outcomes else 0.0)
    out: dict[str, Any] = {
        "sent": len(outcomes),
        "answered_200": int(statuses.get("200", 0)),
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "transport_errors": sum(v for k, v in statuses.items() if not k.isdigit()),
        "statuses": dict(statuses),
        "rate_per_s": round(len(outcomes) / span, 1) if span else None,
        "routes": dict(Counter(o.route for o in outcomes if o.route)),
        # what degraded an answer, up to the first colon ("shed under overload", ...)
        "degraded": dict(Counter(o.reason.split(":")[0] for o in outcomes if o.reason)),
    }
    if len(ok):
        out.update(percentiles(ok, digits=1))
    return out


def timeline(outcomes: Sequence[Outcome], fault_at: float) -> dict[str, Any]:
    """Non-200 answers per second and how long after ``fault_at`` the last one was due."""
    bad = [o for o in outcomes if o.status != 200]
    per_second = Counter(int(o.due) for o in bad)
    after = [o.due - fault_at for o in bad if o.due >= fault_at - 1.0]
    return {
        "non_200_per_second": {str(k): v for k, v in sorted(per_second.items())},
        "last_non_200_after_fault_s": round(max(after), 2) if after else None,
    }


def log_accounting(log_dir: Path, answered: Sequence[Outcome]) -> dict[str, Any]:
    """Which answered request ids are in the request log (rows logged vs rows answered)."""

    return id_accounting(log_dir, [i for o in answered for i in o.request_ids])


def id_accounting(log_dir: Path, answered_ids: Sequence[str]) -> dict[str, Any]:
    """Which of these answered request ids are in the request log."""
    from pipelines.serving.request_log import read_shards

    ids = set(answered_ids)
    log = read_shards(log_dir) if log_dir.is_dir() else pd.DataFrame()
    logged = set(log["request_id"]) if len(log) else set()
    return {
        "answered_rows": len(ids),
        "logged_rows_of_these": len(ids & logged),
        "missing_rows": len(ids - logged),
        "duplicate_rows": int(log["request_id"].duplicated().sum()) if len(log) else 0,
    }


def encode(bodies: Sequence[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(b).encode() for b in bodies]


__all__ = [
    "MemorySampler",
    "Outcome",
    "Served",
    "encode",
    "fixed_rate",
    "free_port",
    "id_accounting",
    "log_accounting",
    "summarize",
    "timeline",
    "workload",
]


def shutdown_under_load(served: Served, bodies: list[bytes], rate: float) -> dict[str, Any]:
    """SIGTERM to the arbiter 2 s into a fixed-rate load: how long the pod takes to exit,
    and what the requests in flight and after it got (answers or fast errors, no hang)."""
    sent_at: list[float] = []

    def term() -> None:
        sent_at.append(time.monotonic())
        served.proc.send_signal(signal.SIGTERM)

    outcomes = fixed_rate(served.url, bodies, rate, 6, events={2.0: term}, timeout=30)
    served.proc.wait(120)
    exit_seconds = time.monotonic() - sent_at[0]
    after = [o for o in outcomes if o.due + o.latency >= 2.0]  # answered or failed after it
    s = summarize(after) if after else {}
    return {
        "exit_seconds": round(exit_seconds, 2),
        "exit_code": served.proc.returncode,
        "requests_ending_after_sigterm": len(after),
        "answered_200": s.get("answered_200", 0),
        "transport_errors": s.get("transport_errors", 0),
        "server_errors_5xx": s.get("server_errors_5xx", 0),
        "slowest_request_s": round(max((o.latency for o in after), default=0.0), 3),
    }
