"""The request log: every answered row in JSON-lines shards, plus a whylogs profile per window.

Details: docs/serving.md.
"""

from __future__ import annotations

import binascii
import datetime as dt
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from pipelines.serving import helper_process
from pipelines.serving.shard_sync import ShardSync
from pipelines.serving.window_rows import (
    PART_SUFFIX,
    SPILL_ROWS,
    WINDOW_PREFIX,
    WindowRows,
    profile_file,
    remove_stale_parts,
    window_profile_path,
)

logger = logging.getLogger("ctr.request_log")
_STOP = object()
# 1: the feature matrix as nested lists of numbers; 2: as the base64 of its float64 bytes
# (exact, and about a third of the writer's cost per 1000 rows: docs/serving.md).
LINE_VERSION = 2
RETRY_SECONDS = 0.5  # while the directory is unwritable, one write attempt per this long

# Request times the service accepts and the readers turn into timestamps: pandas'
# nanosecond range, in whole milliseconds. Outside it pandas silently wraps the value
# (9999-12-31 read back as 1972-01-01), so such times are refused at the API.
REQUEST_TIME_MIN_MS = -(-pd.Timestamp.min.value // 1_000_000)
REQUEST_TIME_MAX_MS = pd.Timestamp.max.value // 1_000_000


def request_time_in_range(t_ms: np.ndarray) -> np.ndarray:
    """Which epoch-millisecond request times pandas can represent (bool per value)."""
    t_ms = np.asarray(t_ms, dtype=np.int64)
    return (t_ms >= REQUEST_TIME_MIN_MS) & (t_ms <= REQUEST_TIME_MAX_MS)


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
        """The batch as one JSON line of columns (NaN becomes null), the feature matrix last,
        as the base64 of its float64 bytes (``features_matrix`` reads it)."""
        answered = dt.datetime.fromtimestamp(self.answered_at, dt.UTC).isoformat(
            timespec="milliseconds"
        )
        record = {
            "v": LINE_VERSION,
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
            "scores": {k: np.ascontiguousarray(v) for k, v in self.scores.items()},
        }
        head = memoryview(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY))[:-1]
        if self.features is None:
            return b"".join((head, b',"features":null}\n'))
        X = np.ascontiguousarray(self.features, dtype="<f8")
        shape = b'{"dtype":"<f8","shape":[%d,%d],"base64":"' % X.shape
        data = binascii.b2a_base64(X.data, newline=False)
        return b"".join((head, b',"features":', shape, data, b'"}}\n'))


def features_matrix(value: Any) -> list[list[float | None]] | None:
    """A line's ``features`` as rows of numbers (None for NaN): version 2's base64 of the
    float64 bytes, or version 1's nested lists as they are."""
    if value is None or isinstance(value, list):
        return value
    X = np.frombuffer(binascii.a2b_base64(value["base64"]), np.dtype(value["dtype"]))
    X = X.reshape(value["shape"])
    rows: list[list[float | None]] = X.tolist()
    if np.isnan(X).any():
        rows = [[None if v != v else v for v in row] for row in rows]
    return rows


def pending_windows(profile_dir: Path) -> list[Path]:
    """Windows saved for profiling whose profile is not written yet (failed ones excluded)."""
    return sorted(profile_dir.glob(f"{WINDOW_PREFIX}*.parquet"))


def settle_profiles(profile_dir: Path, timeout: float = 120.0) -> list[Path]:
    """Wait until every saved window is profiled (or failed); the profiles written."""
    deadline = time.monotonic() + timeout
    while pending_windows(profile_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(profile_dir.glob("profile-*.bin"))


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
        profile_sample_rows: int = 100_000,
    ) -> None:
        self.log_dir = log_dir
        self.profile_dir = profile_dir
        self.flush_seconds = flush_seconds
        self.rotate_bytes = rotate_bytes
        self.profile_window_seconds = profile_window_seconds
        self.profile_sample_rows = profile_sample_rows  # 0: a window's profile has every row
        self.worker = f"{socket.gethostname()}-{os.getpid()}"
        self.counters: dict[str, int] = {
            "queued_rows": 0,
            "written_rows": 0,
            "dropped_rows": 0,
            "shards": 0,
            "profiles": 0,
            "write_errors": 0,
            "profile_errors": 0,
            "backlog_rows": 0,
        }
        self.last_write_error: str | None = None
        self._backlog: list[tuple[bytes, int]] = []  # (line, rows) not yet written
        self._backlog_limit = queue_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._file: Any = None
        self._path = log_dir
        self._file_bytes = 0
        self._sync = ShardSync()  # fsync off the writer thread; lines not yet covered
        self._seq = 0
        self._retry_at = 0.0  # after a failed write, no new attempt before this (monotonic)
        self._window_start: float | None = None
        self._window = WindowRows(profile_sample_rows)
        self._profiles: list[Path] = []  # windows handed to helpers, not yet done
        self._launchers: list[int] = []  # their launchers' pids, not yet reaped
        self._closed = False
        log_dir.mkdir(parents=True, exist_ok=True)
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_parts(
                profile_dir,
                f"{WINDOW_PREFIX}*.parquet{PART_SUFFIX}",
                2 * profile_window_seconds + 60,
            )
            for frame_file in pending_windows(profile_dir):  # left by a stopped process
                try:
                    self._start_helper(frame_file)
                except OSError:
                    logger.exception("request log: could not profile %s", frame_file)
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
        deadline = time.monotonic() + self.flush_seconds
        while True:
            wait = deadline - time.monotonic()
            if self._backlog:  # an unwritable directory: retry at least twice a second
                wait = min(wait, RETRY_SECONDS)
            try:
                item = self._queue.get(timeout=max(wait, 0.001))
            except queue.Empty:
                item = None
            if item is not None and item is not _STOP:
                self._take(item)
                if self._drain_nowait():
                    item = _STOP
            if item is _STOP:
                self._drain_nowait()
                self._flush(sync=True)
                for _ in range(
                    int(2 / min(self.flush_seconds, 0.5)) + 1
                ):  # unwritable: a last chance
                    if not self._backlog:
                        break
                    time.sleep(min(self.flush_seconds, RETRY_SECONDS))
                    self._flush(sync=True, force=True)
                if self._backlog:
                    lost = self.counters["backlog_rows"]
                    self.counters["dropped_rows"] += lost
                    self.counters["backlog_rows"] = 0
                    logger.error(
                        "request log: %d rows could not be written to %s before shutdown (%s)",
                        lost,
                        self.log_dir,
                        self.last_write_error,
                    )
                try:
                    self._close_shard()
                except OSError:
                    logger.exception("request log: closing the shard failed")
                self._profile_window(force=True)
                self._finish_profiles(wait_s=10.0)
                self._sync.close()
                return
            # Hand the lines to the OS at once: a killed process then loses only what is
            # still queued; fsync (power-loss durability) runs on its own thread from the
            # deadline on, so a slow disk never holds the hand-over (shard_sync.py).
            self._flush(sync=False)
            if time.monotonic() >= deadline:
                self._flush(sync=True)
                deadline = time.monotonic() + self.flush_seconds
                self._profile_window(force=False)
                self._spill_window()
                self._finish_profiles()

    def _drain_nowait(self) -> bool:
        """Take everything queued now; True when the stop marker was among it."""
        stop = False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return stop
            if item is _STOP:
                stop = True
            else:
                self._take(item)

    def _take(self, batch: LogBatch) -> None:
        try:
            self._backlog.append((batch.to_line(), len(batch)))
            self.counters["backlog_rows"] += len(batch)
            if self.profile_dir is not None:
                window = batch.answered_at - batch.answered_at % self.profile_window_seconds
                if self._window_start is not None and window != self._window_start:
                    self._profile_window(force=True)
                self._window_start = window
                self._window.add(batch)
        except Exception:  # a bad batch must not stop the writer; its rows count as dropped
            self.counters["write_errors"] += 1
            self.counters["dropped_rows"] += len(batch)
            logger.exception("request log: could not encode a batch of %d rows", len(batch))

    def _flush(self, sync: bool = True, force: bool = False) -> None:
        """Write the backlog to the current shard (``sync``: and fsync it).

        Lines stay in ``self._backlog`` until a write succeeded, so a failed write
        keeps them for the next attempt instead of dropping them. After a failure the
        next attempt waits ``RETRY_SECONDS`` (unless ``force``): retrying on every batch
        turned one unwritable directory into thousands of failed opens a second.
        """
        if not self._backlog and not (sync and self._file is not None):
            return
        if not force and self.last_write_error is not None and time.monotonic() < self._retry_at:
            return
        try:
            if self._file is not None and not self._shard_in_place():
                # Deleted or moved under us. A moved shard keeps its lines; a deleted one
                # takes the lines written since the last fsync with it (the writer
                # cannot tell them safe), so those go back into the backlog.
                deleted = os.fstat(self._file.fileno()).st_nlink == 0
                self._file.close()
                self._file = None
                lost = self._sync.forget()
                if deleted:
                    again = sum(n for _, n in lost)
                    self._backlog[:0] = lost
                    self.counters["backlog_rows"] += again
                    self.counters["written_rows"] -= again
                raise OSError(f"shard {self._path} was {'deleted' if deleted else 'moved'}")
            if self._file is None or self._file_bytes >= self.rotate_bytes:
                self._close_shard()
                self._open_shard()
            if self._backlog:
                data = b"".join(line for line, _ in self._backlog)
                rows = sum(n for _, n in self._backlog)
                self._file.write(data)
                self._file.flush()
                self._file_bytes += len(data)
                self.counters["written_rows"] += rows
                self.counters["backlog_rows"] -= rows
                self._sync.written(self._backlog)
                self._backlog = []
            if sync:
                self._sync.start(self._file.fileno())
        except OSError as exc:  # unwritable: keep the rows (bounded) and retry next flush
            self.counters["write_errors"] += 1
            self._retry_at = time.monotonic() + RETRY_SECONDS
            first = self.last_write_error is None
            self.last_write_error = f"{type(exc).__name__}: {exc}"
            self._abandon_shard()
            self._bound_backlog()
            if first or self.counters["write_errors"] % 60 == 0:
                logger.error(
                    "request log: cannot write to %s (%s); %d rows kept in memory, retrying",
                    self.log_dir,
                    self.last_write_error,
                    self.counters["backlog_rows"],
                )
        else:
            if self.last_write_error is not None and not self._backlog:
                logger.warning("request log: writing to %s again, backlog written", self.log_dir)
                self.last_write_error = None

    def _shard_in_place(self) -> bool:
        """The open shard is still the file at its path (not deleted, moved or replaced)."""
        try:
            return os.stat(self._path).st_ino == os.fstat(self._file.fileno()).st_ino
        except OSError:
            return False

    def _abandon_shard(self) -> None:
        """Drop a shard a write failed on; cut a partly written tail so it is not repeated."""
        if self._file is None:
            return
        try:
            self._file.truncate(self._file_bytes)
        except (OSError, ValueError):
            pass
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def _bound_backlog(self) -> None:
        while self._backlog and self.counters["backlog_rows"] > self._backlog_limit:
            _, rows = self._backlog.pop(0)
            self.counters["backlog_rows"] -= rows
            self.counters["dropped_rows"] += rows

    def _open_shard(self) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        seq = self._seq + 1  # taken only once the shard opened: numbers stay contiguous
        path = self.log_dir / f"requests-{stamp}-{self.worker}-{seq:04d}.jsonl"
        self.log_dir.mkdir(parents=True, exist_ok=True)  # recreated if it was removed
        self._file = path.open("ab")
        self._seq = seq
        self._path = path
        self._file_bytes = path.stat().st_size
        self.counters["shards"] += 1

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._sync.now(self._file.fileno())
            self._file.close()
            self._file = None

    def _window_files(self) -> tuple[Path, Path]:
        """The open window's file for the helper, and the part file its row groups go to."""
        assert self.profile_dir is not None and self._window_start is not None
        stamp = dt.datetime.fromtimestamp(self._window_start, dt.UTC).strftime("%Y%m%dT%H%M%S")
        frame_file = self.profile_dir / f"{WINDOW_PREFIX}{stamp}-{self.worker}.parquet"
        return frame_file, frame_file.with_name(frame_file.name + PART_SUFFIX)

    def _spill_window(self) -> None:
        """Write the open window's waiting rows as a row group once there are ``SPILL_ROWS``
        (and its feature columns are known), so closing a window is never a burst."""
        rows = self._window
        if self.profile_dir is None or self._window_start is None or rows.waiting < SPILL_ROWS:
            return
        if rows.feature_names is None and rows.waiting < 8 * SPILL_ROWS:
            return  # no call with features yet: wait a little for the columns
        _, part = self._window_files()
        try:
            rows.spill(part)
        except Exception:
            self._drop_window(part)

    def _drop_window(self, part: Path) -> None:
        """A window that could not be written: counted, logged; its rows stay in the log."""
        self.counters["profile_errors"] += 1
        logger.exception("request log: could not write profile window %s", part.name)
        try:
            self._window.abandon()
        except Exception:  # the file is removed below either way
            logger.debug("request log: closing %s failed", part.name, exc_info=True)
        part.unlink(missing_ok=True)
        self._window = WindowRows(self.profile_sample_rows)

    def _profile_window(self, force: bool) -> None:
        """Close a finished window and hand it to a detached helper process that profiles
        it: stopping the server neither waits for it nor cuts it short, and a window whose
        helper did not finish (the container stopped) is profiled when a worker starts."""
        if self.profile_dir is None or not self._window or self._window_start is None:
            return
        if not force and time.time() < self._window_start + self.profile_window_seconds:
            return
        frame_file, part = self._window_files()
        try:
            self._window.finish(part)
        except Exception:
            self._drop_window(part)
            return
        self._window = WindowRows(self.profile_sample_rows)
        try:
            os.replace(part, frame_file)
            self._start_helper(frame_file)
        except Exception:
            self.counters["profile_errors"] += 1
            logger.exception("request log: could not profile window %s", frame_file.name)

    def _start_helper(self, frame_file: Path) -> None:
        """Start the detached helper that profiles ``frame_file`` (``helper_process``)."""
        command = [sys.executable, "-m", "pipelines.serving.request_log", "profile"]
        pid = helper_process.spawn_detached(
            [*command, str(frame_file)], frame_file.with_suffix(".err")
        )
        self._launchers.append(pid)
        self._profiles.append(frame_file)

    def _finish_profiles(self, wait_s: float = 0.0) -> None:
        """Count the windows handed to helpers that are done: profiled, or failed (waiting
        up to ``wait_s`` for their launchers to exit)."""
        self._launchers, failed = helper_process.reap(self._launchers, wait_s)
        for pid, code in failed:
            self.counters["profile_errors"] += 1
            logger.error("request log: the helper launcher %d exited with %d", pid, code)
        still = []
        for frame_file in self._profiles:
            if frame_file.exists():
                still.append(frame_file)
                continue
            err = frame_file.with_suffix(".err")
            if frame_file.with_name(frame_file.name + ".failed").exists():
                self.counters["profile_errors"] += 1
                text = err.read_text(errors="replace")[-2000:] if err.is_file() else ""
                logger.error("request log: profiling %s failed: %s", frame_file, text)
            elif window_profile_path(frame_file).exists():
                self.counters["profiles"] += 1
        self._profiles = still


def read_shards(log_dir: Path) -> pd.DataFrame:
    """One row per answered request from all shards; a partial last line is skipped.

    Rows whose request time is outside pandas' range (only a service before the range
    check could log them) are skipped with a warning: no window can hold them, and
    converting them would wrap to a wrong date.
    """
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
    out_of_range = 0
    for shard in sorted(log_dir.glob("requests-*.jsonl")):
        for line in shard.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            names = rec["feature_names"]
            features = features_matrix(rec["features"])
            t_ms = np.asarray(rec["request_time_ms"], dtype=np.int64)
            valid = request_time_in_range(t_ms)
            out_of_range += int((~valid).sum())
            for i in range(rec["n"]):
                if not valid[i]:
                    continue
                row = {k: rec[k][i] for k in keys}
                row.update(
                    answered_at=rec["answered_at"],
                    endpoint=rec["endpoint"],
                    release_id=rec["release_id"],
                    latency_ms=rec["latency_ms"],
                    request_time=pd.Timestamp(int(t_ms[i]), unit="ms", tz="UTC"),
                    degraded=rec["degraded_reason"][i] is not None,
                )
                row["features"] = (
                    dict(zip(names, features[i], strict=True)) if features is not None else None
                )
                row["scores"] = {k: v[i] for k, v in rec["scores"].items() if v[i] is not None}
                rows.append(row)
    if out_of_range:
        logger.warning(
            "request log %s: skipped %d row(s) whose request time is outside %s .. %s",
            log_dir,
            out_of_range,
            pd.Timestamp(REQUEST_TIME_MIN_MS, unit="ms", tz="UTC"),
            pd.Timestamp(REQUEST_TIME_MAX_MS, unit="ms", tz="UTC"),
        )
    return pd.DataFrame(rows)


if (
    __name__ == "__main__"
):  # the profiling helper: python -m pipelines.serving.request_log profile IN OUT
    if len(sys.argv) != 3 or sys.argv[1] != "profile":
        sys.exit("usage: python -m pipelines.serving.request_log profile .window-*.parquet")
    profile_file(Path(sys.argv[2]))  # at nice 19 (helper_process.spawn_detached)
