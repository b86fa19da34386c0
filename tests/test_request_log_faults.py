"""The request-log writer under an unwritable or vanished log directory (in-process, fast).

The same fault against a running ``bentoml serve`` is in ``tests/test_serving_reliability.py``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.serving.request_log import LogBatch, RequestLog, read_shards


def batch(request_id: str) -> LogBatch:
    return LogBatch(
        "predict",
        "r",
        time.time(),
        1.0,
        [request_id],
        ["u"],
        ["i"],
        ["feed"],
        ["mobile"],
        np.zeros(1, np.int64),
        np.full(1, 0.5),
        ["prod"],
        ["m"],
        [None],
        np.zeros(1),
        [],
        None,
    )


def wait_for(condition, seconds: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_unwritable_directory_keeps_rows_in_memory_and_writes_them_later(tmp_path: Path) -> None:
    log_dir = tmp_path / "requests"
    log = RequestLog(log_dir, None, flush_seconds=0.1, queue_size=50)
    for k in range(5):
        assert log.submit(batch(f"before-{k}"))
    wait_for(lambda: log.counters["written_rows"] == 5)
    time.sleep(0.3)  # past the next fsync: these rows are on disk, and go with the directory
    # The directory disappears and a file takes its place: nothing can be written there.
    shutil.rmtree(log_dir)
    log_dir.write_text("not a directory")
    for k in range(20):
        assert log.submit(batch(f"during-{k}"))  # the request path never blocks or fails
    wait_for(lambda: log.counters["write_errors"] >= 2 and log.counters["backlog_rows"] == 20)
    assert log.last_write_error and "FileExistsError" in log.last_write_error
    # More than the bound: the oldest rows are dropped and counted, memory stays bounded.
    for k in range(40):
        log.submit(batch(f"over-{k}"))
    wait_for(lambda: log.counters["dropped_rows"] == 10)
    assert log.counters["backlog_rows"] == 50
    log_dir.unlink()  # writable again
    wait_for(lambda: log.counters["backlog_rows"] == 0)
    log.close()
    ids = set(read_shards(log_dir)["request_id"])
    kept = {f"during-{k}" for k in range(10, 20)} | {f"over-{k}" for k in range(40)}
    assert ids == kept  # the 5 rows before were deleted with the old directory
    assert log.last_write_error is None
    assert log.counters["written_rows"] == 5 + len(kept)


def test_a_deleted_shard_is_replaced_and_its_unsynced_rows_written_again(tmp_path: Path) -> None:
    log_dir = tmp_path / "requests"
    log = RequestLog(log_dir, None, flush_seconds=30, queue_size=100)  # no fsync in the test
    for k in range(3):
        log.submit(batch(f"a-{k}"))
    wait_for(lambda: log.counters["written_rows"] == 3)
    for shard in log_dir.glob("*.jsonl"):
        shard.unlink()  # e.g. a log cleanup job removed the open shard
    log.submit(batch("b-0"))
    wait_for(lambda: log.counters["written_rows"] == 4 and log.counters["backlog_rows"] == 0)
    log.close()
    assert set(read_shards(log_dir)["request_id"]) == {"a-0", "a-1", "a-2", "b-0"}


def test_close_with_an_unwritable_directory_counts_what_is_lost(tmp_path: Path) -> None:
    log_dir = tmp_path / "requests"
    log = RequestLog(log_dir, None, flush_seconds=0.05, queue_size=100)
    shutil.rmtree(log_dir)
    log_dir.write_text("not a directory")
    for k in range(4):
        log.submit(batch(f"x-{k}"))
    log.close()
    assert log.counters["dropped_rows"] == 4 and log.counters["backlog_rows"] == 0


def test_unwritable_directory_is_retried_twice_a_second_with_contiguous_shard_numbers(
    tmp_path: Path,
) -> None:
    """Retries do not run on every batch, and failed opens do not use up shard numbers."""
    log_dir = tmp_path / "requests"
    log = RequestLog(log_dir, None, flush_seconds=1.0, queue_size=10_000)
    log.submit(batch("first"))
    wait_for(lambda: log.counters["written_rows"] == 1)
    shutil.rmtree(log_dir)
    log_dir.write_text("not a directory")
    started = time.monotonic()
    k = 0
    while time.monotonic() - started < 2.0:  # ~200 batches in 2 s, as a busy service sends
        log.submit(batch(f"during-{k}"))
        k += 1
        time.sleep(0.01)
    errors = log.counters["write_errors"]
    assert 1 <= errors <= 2 * 2.0 + 2, f"{errors} write attempts in 2 s for {k} batches"
    log_dir.unlink()
    wait_for(lambda: log.counters["backlog_rows"] == 0)
    log.close()
    seqs = sorted(int(p.stem.rsplit("-", 1)[1]) for p in log_dir.glob("requests-*.jsonl"))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert seqs[0] <= 2  # the first shard went with the old directory; the next is number 2
    during = {f"during-{i}" for i in range(k)}
    # "first" was not fsynced yet when its shard went, so it is written again (test above).
    assert set(read_shards(log_dir)["request_id"]) - {"first"} == during


def test_a_slow_fsync_never_holds_rows_back_from_the_os(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows taken while an fsync waits on the disk reach the shard at once: a SIGKILL then
    loses only what is queued, not what was answered during the fsync."""
    real_fsync, started, release = os.fsync, threading.Event(), threading.Event()

    def slow_fsync(fd: int) -> None:  # a busy disk: this fsync takes until released
        started.set()
        release.wait(10.0)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    log = RequestLog(tmp_path / "requests", None, flush_seconds=0.05)
    try:
        log.submit(batch("before"))
        assert started.wait(5.0)  # the first deadline's fsync is waiting on the disk
        for k in range(3):
            log.submit(batch(f"during-{k}"))
        shard = next((tmp_path / "requests").glob("*.jsonl"))
        wait_for(lambda: shard.read_bytes().count(b'"during-') == 3, 2.0)
    finally:
        release.set()
        log.close()
    assert set(read_shards(tmp_path / "requests")["request_id"]) == {
        "before", "during-0", "during-1", "during-2"
    }  # fmt: skip
