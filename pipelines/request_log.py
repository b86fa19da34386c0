"""The request log: every answered row in JSON-lines shards, plus a whylogs profile per window.

The hot path only builds a ``LogBatch`` (arrays it already has) and puts it on a
bounded queue; a background thread encodes each batch as one JSON line holding
its columns (orjson serializes the NumPy arrays directly, so logging a 1000-row
batch costs about as much as logging one row), appends it to the current shard
and flushes + fsyncs at least every ``flush_seconds``. A full queue drops the
batch and counts its rows in ``dropped_rows`` instead of slowing requests down.
``read_request_log`` expands the lines back to one row per answered request.

Files (one writer per server worker process, named by host and pid)::

    <log_dir>/requests-<UTC start>-<host>-<pid>-<seq>.jsonl   rotated past rotate_bytes
    <profile_dir>/profile-<UTC window start>-<host>-<pid>.bin whylogs, one per window

whylogs profiles are computed by a helper process (``python -m pipelines.request_log
profile``) from the window's rows saved as parquet, so profiling does not hold the
service's GIL.

Durability: ``close()`` (called on a clean shutdown) drains the queue, fsyncs the
shard and profiles the unfinished window, so nothing is lost. A crash (SIGKILL,
power loss) loses at most the rows not yet fsynced: those answered in the last
``flush_seconds`` plus whatever still waited in the queue, and the profile of the
current window (rebuildable from the JSONL rows). A crash mid-write can leave one
partial last line; ``read_request_log`` skips it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue
import socket
import subprocess
import sys
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

    def to_line(self) -> bytes:
        """The batch as one JSON line of columns (NaN becomes null)."""
        answered = dt.datetime.fromtimestamp(self.answered_at, dt.UTC).isoformat(
            timespec="milliseconds"
        )
        record = {
            "v": 1,
            "answered_at": answered,
            "endpoint": self.endpoint,
            "release_id": self.release_id,
            "latency_ms": round(self.latency_ms, 3),
            "n": len(self.request_ids),
            "request_id": self.request_ids,
            "user": self.users,
            "item": self.items,
            "surface": self.surfaces,
            "device": self.devices,
            "request_time_ms": np.ascontiguousarray(self.t_ms),
            "route": self.routes,
            "model": self.models,
            "probability": np.ascontiguousarray(self.probability),
            "degraded_reason": self.reasons,
            "feature_age_seconds": np.ascontiguousarray(self.feature_age),
            "feature_names": self.feature_names,
            "features": None if self.features is None else np.ascontiguousarray(self.features),
            "scores": {k: np.ascontiguousarray(v) for k, v in self.scores.items()},
        }
        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def window_frame(batches: list[LogBatch]) -> pd.DataFrame:
    """Served rows of a window with columns named like the training reference profile."""
    frame = pd.DataFrame(
        {
            "surface": [s for b in batches for s in b.surfaces],
            "device": [d for b in batches for d in b.devices],
        }
    )
    with_features = [b for b in batches if b.features is not None]
    if len(with_features) == len(batches) and batches:
        names = batches[0].feature_names
        X = np.concatenate([b.features for b in with_features])  # type: ignore[misc]
        frame = pd.concat([frame, pd.DataFrame(X, columns=names)], axis=1)
    frame["prediction"] = np.concatenate([b.probability for b in batches])
    frame["route"] = [r for b in batches for r in b.routes]
    return frame


def profile_file(frame_file: Path, out: Path) -> None:
    """Profile a window saved as parquet and write the whylogs profile (helper process)."""
    from pipelines import whylogs_adapter as wl

    wl.write_profile(wl.profile(pd.read_parquet(frame_file)), out)


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
        self._pending_rows = 0
        self._seq = 0
        self._window_start: float | None = None
        self._window: list[LogBatch] = []
        self._profiles: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
        self._closed = False
        log_dir.mkdir(parents=True, exist_ok=True)
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
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
                self._finish_profiles(wait=True)
                return
            if item is not None:
                self._take(item, pending)
            if time.monotonic() >= deadline or len(pending) >= 20_000:
                self._flush(pending)
                pending = []
                deadline = time.monotonic() + self.flush_seconds
                self._profile_window(force=False)
                self._finish_profiles(wait=False)

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
            pending.append(batch.to_line())
            self._pending_rows += len(batch)
            if self.profile_dir is not None:
                window = batch.answered_at - batch.answered_at % self.profile_window_seconds
                if self._window_start is not None and window != self._window_start:
                    self._profile_window(force=True)
                self._window_start = window
                self._window.append(batch)
        except Exception:  # a bad batch must not stop the writer; its rows count as dropped
            self.counters["write_errors"] += 1
            self.counters["dropped_rows"] += len(batch)
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
            self.counters["written_rows"] += self._pending_rows
        except OSError:  # disk full or gone: the rows are lost, and counted
            self.counters["write_errors"] += 1
            self.counters["dropped_rows"] += self._pending_rows
            logger.exception(
                "request log: writing %d rows to %s failed", self._pending_rows, self.log_dir
            )
        pending.clear()
        self._pending_rows = 0

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
        """Hand a finished window to a helper process (its own session: stop signals sent to
        the server's process group do not cut it short; the writer waits for it on close)."""
        if self.profile_dir is None or not self._window or self._window_start is None:
            return
        if not force and time.time() < self._window_start + self.profile_window_seconds:
            return
        batches, self._window = self._window, []
        stamp = dt.datetime.fromtimestamp(self._window_start, dt.UTC).strftime("%Y%m%dT%H%M%S")
        out = self.profile_dir / f"profile-{stamp}-{self.worker}.bin"
        frame_file = self.profile_dir / f".window-{stamp}-{self.worker}.parquet"
        try:
            window_frame(batches).to_parquet(frame_file, index=False)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipelines.request_log",
                    "profile",
                    str(frame_file),
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": _package_root()},
            )
            self._profiles.append((proc, frame_file, out))
        except Exception:
            self.counters["profile_errors"] += 1
            logger.exception("request log: could not profile window %s", stamp)

    def _finish_profiles(self, wait: bool) -> None:
        still = []
        for proc, frame_file, out in self._profiles:
            if not wait and proc.poll() is None:
                still.append((proc, frame_file, out))
                continue
            try:
                _, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode == 0:
                self.counters["profiles"] += 1
            else:
                self.counters["profile_errors"] += 1
                logger.error("request log: profiling %s failed: %s", out, err.decode()[-2000:])
            frame_file.unlink(missing_ok=True)
        self._profiles = still


def _package_root() -> str:
    """The folder holding the ``pipelines`` package, so the helper imports this very code."""
    here = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return here if not extra else f"{here}{os.pathsep}{extra}"


def read_request_log(log_dir: Path) -> pd.DataFrame:
    """One row per answered request from all shards; a partial last line is skipped."""
    keys = (
        "request_id",
        "user",
        "item",
        "surface",
        "device",
        "route",
        "model",
        "probability",
        "degraded_reason",
        "feature_age_seconds",
    )
    rows: list[dict[str, Any]] = []
    for shard in sorted(log_dir.glob("requests-*.jsonl")):
        for line in shard.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            names = rec["feature_names"]
            for i in range(rec["n"]):
                row = {k: rec[k][i] for k in keys}
                row.update(
                    answered_at=rec["answered_at"],
                    endpoint=rec["endpoint"],
                    release_id=rec["release_id"],
                    latency_ms=rec["latency_ms"],
                    request_time=pd.Timestamp(rec["request_time_ms"][i], unit="ms", tz="UTC"),
                    degraded=rec["degraded_reason"][i] is not None,
                )
                row["features"] = (
                    dict(zip(names, rec["features"][i], strict=True))
                    if rec["features"] is not None
                    else None
                )
                row["scores"] = {k: v[i] for k, v in rec["scores"].items() if v[i] is not None}
                rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":  # the profiling helper: python -m pipelines.request_log profile IN OUT
    if len(sys.argv) != 4 or sys.argv[1] != "profile":
        sys.exit("usage: python -m pipelines.request_log profile WINDOW.parquet OUT.bin")
    os.nice(10)  # yield the CPU to the service it profiles for
    profile_file(Path(sys.argv[2]), Path(sys.argv[3]))
