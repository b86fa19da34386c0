"""The request log: every answered row as JSON lines, plus a whylogs profile per time window.

The hot path only builds a ``LogBatch`` (arrays it already has) and puts it on a
bounded queue; a background thread turns batches into JSON lines, appends them to
the current shard and flushes + fsyncs at least every ``flush_seconds``. A full
queue drops the batch and counts the rows in ``dropped_rows`` instead of slowing
requests down.

Files (one writer per server worker process, named by host and pid)::

    <log_dir>/requests-<UTC start>-<host>-<pid>-<seq>.jsonl   rotated past rotate_bytes
    <profile_dir>/profile-<UTC window start>-<host>-<pid>.bin whylogs, one per window

Durability: ``close()`` (called on a clean shutdown) drains the queue, fsyncs the
shard and writes the profile of the unfinished window, so nothing is lost. A
crash (SIGKILL, power loss) loses at most the rows not yet fsynced: those answered
in the last ``flush_seconds`` plus whatever still waited in the queue, and the
profile of the current window (rebuildable from the JSONL rows). A crash mid-write
can leave one partial last line; ``read_request_log`` skips it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

logger = logging.getLogger("ctr.request_log")
_STOP = object()


@dataclass
class LogBatch:
    """What one API call answered, column-wise (one entry per row)."""

    endpoint: str
    release_id: str
    answered_at: float  # epoch seconds
    latency_ms: float  # time inside the predictor for the whole call
    request_ids: list[str]
    users: list[str]
    items: list[str]
    surfaces: list[str]
    devices: list[str]
    t_ms: np.ndarray
    probability: np.ndarray
    routes: list[str]
    models: list[str]
    reasons: list[str | None]
    feature_age: np.ndarray  # seconds; NaN when features were unavailable
    feature_names: list[str]
    features: np.ndarray | None  # (rows, features) or None when unavailable
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # tier role -> output or NaN

    def __len__(self) -> int:
        return len(self.request_ids)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per row."""
        answered = dt.datetime.fromtimestamp(self.answered_at, dt.UTC).isoformat(
            timespec="milliseconds"
        )
        rows = []
        feats = self.features.tolist() if self.features is not None else None
        scores = {k: v.tolist() for k, v in self.scores.items()}
        req_times = pd.to_datetime(self.t_ms, unit="ms", utc=True).strftime("%Y-%m-%dT%H:%M:%S.%f")
        ages = self.feature_age.tolist()
        probs = self.probability.tolist()
        for i, rid in enumerate(self.request_ids):
            rows.append(
                {
                    "request_id": rid,
                    "answered_at": answered,
                    "endpoint": self.endpoint,
                    "release_id": self.release_id,
                    "user": self.users[i],
                    "item": self.items[i],
                    "surface": self.surfaces[i],
                    "device": self.devices[i],
                    "request_time": req_times[i] + "Z",
                    "route": self.routes[i],
                    "model": self.models[i],
                    "probability": probs[i],
                    "degraded": self.reasons[i] is not None,
                    "degraded_reason": self.reasons[i],
                    "latency_ms": round(self.latency_ms, 3),
                    "feature_age_seconds": None if ages[i] != ages[i] else round(ages[i], 3),
                    "features": dict(zip(self.feature_names, feats[i], strict=True))
                    if feats is not None
                    else None,
                    "scores": {
                        k: v[i]
                        for k, v in scores.items()
                        if v[i] == v[i]  # skip NaN
                    },
                }
            )
        return rows

    def profile_frame(self) -> pd.DataFrame:
        """Columns named like the training reference profile (features, surface, device, prediction)."""
        frame = pd.DataFrame({"surface": self.surfaces, "device": self.devices})
        if self.features is not None:
            frame = pd.concat(
                [frame, pd.DataFrame(self.features, columns=self.feature_names)], axis=1
            )
        frame["prediction"] = self.probability
        frame["route"] = self.routes
        return frame


class RequestLog:
    """Background writer of request-log shards and windowed whylogs profiles."""

    def __init__(
        self,
        log_dir: Path,
        profile_dir: Path | None,
        flush_seconds: float = 1.0,
        rotate_bytes: int = 64 << 20,
        queue_size: int = 100_000,
        profile_window_seconds: float = 300.0,
    ) -> None:
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.flush_seconds = flush_seconds
        self.rotate_bytes = rotate_bytes
        self.profile_window_seconds = profile_window_seconds
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.counters: dict[str, int] = {
            "queued_rows": 0,
            "written_rows": 0,
            "dropped_rows": 0,
            "shards": 0,
            "profiles": 0,
            "write_errors": 0,
            "profile_errors": 0,
        }
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._file: Any = None
        self._file_bytes = 0
        self._seq = 0
        self._window_start: float | None = None
        self._window_frames: list[pd.DataFrame] = []
        self._closed = False
        log_dir.mkdir(parents=True, exist_ok=True)
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            from pipelines import whylogs_adapter  # noqa: F401  # import now, not mid-traffic
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def submit(self, batch: LogBatch) -> bool:
        """Queue a batch without blocking; a full queue drops it and counts its rows."""
        if self._closed:
            self.counters["dropped_rows"] += len(batch)
            return False
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.counters["dropped_rows"] += len(batch)
            return False
        self.counters["queued_rows"] += len(batch)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Drain everything queued, fsync the shard and profile the open window."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # --- writer thread -------------------------------------------------------
    def _run(self) -> None:
        pending: list[bytes] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                item = None
            if item is _STOP:
                self._drain_nowait(pending)
                self._flush(pending)
                self._close_shard()
                self._profile_window(force=True)
                return
            if item is not None:
                self._take(item, pending)
            if time.monotonic() >= deadline or len(pending) >= 20_000:
                self._flush(pending)
                pending = []
                deadline = time.monotonic() + self.flush_seconds
                self._profile_window(force=False)

    def _drain_nowait(self, pending: list[bytes]) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._take(item, pending)

    def _take(self, batch: LogBatch, pending: list[bytes]) -> None:
        try:
            pending.extend(
                orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in batch.records()
            )
            if self.profile_dir is not None:
                window = batch.answered_at - batch.answered_at % self.profile_window_seconds
                if self._window_start is not None and window != self._window_start:
                    self._profile_window(force=True)
                self._window_start = window
                self._window_frames.append(batch.profile_frame())
        except Exception:  # a bad batch must not stop the writer
            self.counters["write_errors"] += 1
            logger.exception("request log: could not encode a batch of %d rows", len(batch))

    def _flush(self, pending: list[bytes]) -> None:
        if not pending:
            return
        try:
            if self._file is None or self._file_bytes >= self.rotate_bytes:
                self._close_shard()
                self._open_shard()
            data = b"".join(pending)
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file_bytes += len(data)
            self.counters["written_rows"] += len(pending)
        except OSError:
            self.counters["write_errors"] += 1
            logger.exception(
                "request log: writing %d rows to %s failed", len(pending), self.log_dir
            )
        pending.clear()

    def _open_shard(self) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        self._seq += 1
        path = self.log_dir / f"requests-{stamp}-{self.worker}-{self._seq:04d}.jsonl"
        self._file = path.open("ab")
        self._file_bytes = path.stat().st_size
        self.counters["shards"] += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _profile_window(self, force: bool) -> None:
        if self.profile_dir is None or not self._window_frames or self._window_start is None:
            return
        now = time.time()
        if not force and now < self._window_start + self.profile_window_seconds:
            return
        from pipelines import whylogs_adapter as wl

        frames, self._window_frames = self._window_frames, []
        stamp = dt.datetime.fromtimestamp(self._window_start, dt.UTC).strftime("%Y%m%dT%H%M%S")
        try:
            view = wl.profile(pd.concat(frames, ignore_index=True))
            wl.write_profile(view, self.profile_dir / f"profile-{stamp}-{self.worker}.bin")
            self.counters["profiles"] += 1
        except Exception:
            self.counters["profile_errors"] += 1
            logger.exception("request log: whylogs profile of window %s failed", stamp)


def read_request_log(log_dir: Path) -> pd.DataFrame:
    """All rows of all shards in ``log_dir``; a partial last line (crash mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    for shard in sorted(log_dir.glob("requests-*.jsonl")):
        for line in shard.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return pd.DataFrame(rows)
