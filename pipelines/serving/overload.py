"""Surface priorities under overload: who is answered by the rule baseline when a worker is full.

*Saturated* is measured per worker process: the number of scoring calls (``/predict``,
``/predict_batch``, ``/predict_columns``, ``/rank``) it holds, queued or running, when a
call arrives, that call included (``InFlight`` counts them at the ASGI layer, before
BentoML queues the call for its worker thread). With ``serving.shed_inflight`` = T and
``serving.surface_priority`` giving each surface a level (0 = critical, never shed), a
call on a surface of level p >= 1 is shed when it arrives to at least
``T * (1 + max_level - p)`` calls in flight: the lowest level first, at T; each level
above it needs another T. A shed row skips the feature lookup and every model: the rule
baseline answers it, ``degraded_reason`` says why, and it is counted per surface
(``counters.shed_rows``) and logged like every answered row. Details: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import threading
from collections.abc import Sequence
from typing import Any

from pipelines.core.settings import ServingSettings

SCORING_PATHS = frozenset({"/predict", "/predict_batch", "/predict_columns", "/rank"})
# In flight at this worker when the current call arrived (None outside a served call).
ARRIVAL_INFLIGHT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "arrival_inflight", default=None
)


def shed_threshold(policy: ServingSettings, surface: str) -> int | None:
    """Calls in flight at arrival from which ``surface`` is shed (None: never)."""
    level = policy.surface_priority.get(surface, 0)
    if policy.shed_inflight <= 0 or level <= 0:
        return None
    top = max(policy.surface_priority.values(), default=0)
    return policy.shed_inflight * (1 + top - level)


def shed_reasons(
    policy: ServingSettings, inflight: int | None, surfaces: Sequence[str]
) -> dict[str, str]:
    """Surfaces of these rows to shed now, each with the reason the rows will carry."""
    if inflight is None or policy.shed_inflight <= 0 or inflight < policy.shed_inflight:
        return {}
    out = {}
    for surface in set(surfaces):
        threshold = shed_threshold(policy, surface)
        if threshold is not None and inflight >= threshold:
            out[surface] = (
                f"shed under overload: {inflight} calls in flight in this worker, surface "
                f"{surface} (priority {policy.surface_priority[surface]}) is answered by the "
                f"rule baseline from {threshold}"
            )
    return out


class InFlight:
    """ASGI middleware: counts this worker's scoring calls in flight and tells each call
    how many it arrived to (``ARRIVAL_INFLIGHT``, read by the API in its worker thread:
    BentoML copies the context into it)."""

    count = 0  # per worker process; the event loop is its only writer

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in SCORING_PATHS:
            await self.app(scope, receive, send)
            return
        InFlight.count += 1
        token = ARRIVAL_INFLIGHT.set(InFlight.count)
        try:
            await self.app(scope, receive, send)
        finally:
            InFlight.count -= 1
            ARRIVAL_INFLIGHT.reset(token)


class GcPauses:
    """Garbage-collector pauses of this worker, per generation (for tail-latency diagnosis:
    /metadata ``gc``). Installed once per process by the service."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.stats: dict[str, dict[str, float]] = {
            str(g): {"collections": 0, "total_ms": 0.0, "max_ms": 0.0} for g in range(3)
        }

    def install(self) -> GcPauses:
        import gc

        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        import time

        if phase == "start":
            self.started = time.perf_counter()
            return
        if self.started is None:
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        self.started = None
        entry = self.stats[str(info.get("generation", 2))]
        entry["collections"] += 1
        entry["total_ms"] = round(entry["total_ms"] + ms, 3)
        entry["max_ms"] = round(max(entry["max_ms"], ms), 3)


class PriorityLane:
    """The worker's request thread, taking queued scoring calls most critical surface first.

    BentoML queues sync API calls for its one request thread first come, first served,
    so under a flood of low-priority calls a critical one waits behind all of them
    (shedding makes each of those cheaper, not fewer). The service's scoring endpoints
    are ``async`` and hand their call here instead: the lowest ``serving.surface_priority``
    level runs next, in arrival order within a level. A call runs in the context it was
    submitted from; one whose caller is gone (BentoML's timeout) is dropped if not started.

    A call marked ``inline`` (one that keeps the GIL throughout, so another thread would
    run it no sooner) runs on the calling event loop at once when the lane holds no call,
    queued or running: it has nothing to overtake, and it skips two thread hand-overs.
    """

    def __init__(self, name: str = "scoring") -> None:
        self._queue: list[tuple[int, int, Any]] = []
        self._running = False  # the lane's thread holds a call (written by that thread)
        self.calls = {"inline": 0, "lane": 0}  # calls run on the caller's loop / the thread
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def run(self, level: int, fn: Any, *args: Any, inline: bool = False) -> Any:
        """``fn(*args)`` on the lane's thread, after every queued call of a lower level (or
        here, with ``inline``, when the lane holds no call)."""
        if inline and not self._queue and not self._running and not self._closed:
            # only this loop queues calls, so none can be queued while this one runs
            self.calls["inline"] += 1
            return fn(*args)
        self.calls["lane"] += 1
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job = (contextvars.copy_context(), fn, args, loop, future)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scoring lane is closed (the worker is shutting down)")
            self._seq += 1
            heapq.heappush(self._queue, (level, self._seq, job))
            self._cond.notify()
        return await future

    def queued(self) -> dict[int, int]:
        """Calls waiting per level (not the one running)."""
        with self._cond:
            out: dict[int, int] = {}
            for level, _, _ in self._queue:
                out[level] = out.get(level, 0) + 1
            return out

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                self._running = True  # before the queue empties: ``run`` sees one or the other
                _, _, (ctx, fn, args, loop, future) = heapq.heappop(self._queue)
            if future.cancelled():
                self._running = False
                continue
            try:
                result, error = ctx.run(fn, *args), None
            except BaseException as exc:  # handed to the awaiting call
                result, error = None, exc
            self._running = False
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass


def _settle(future: Any, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def call_level(policy: ServingSettings, surfaces: Sequence[str]) -> int:
    """The lane level of a call: its most critical surface's priority (0 = critical)."""
    return min((policy.surface_priority.get(s, 0) for s in set(surfaces)), default=0)
