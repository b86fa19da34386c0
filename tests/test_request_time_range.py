"""Request times outside pandas' range: refused at the API, never misdated by the log readers."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.monitoring.requests import read_request_log as read_monitor_log
from pipelines.serving.predictor import PredictRequest
from pipelines.serving.request_log import (
    REQUEST_TIME_MAX_MS,
    REQUEST_TIME_MIN_MS,
    LogBatch,
    RequestLog,
    read_shards,
)

ROW = {"user": "u1", "item": "i1", "surface": "feed", "device": "mobile"}


@pytest.mark.parametrize(
    "stamp",
    [
        "9999-12-31T23:59:59-14:00",  # read back as 1972-01-01 before the fix
        "0001-01-01T00:00:00+14:00",  # read back as 1972-12-31
        "1677-09-21T00:00:00Z",
        "2262-04-12T00:00:00Z",
        "2262-04-11T23:59:00-05:00",  # in range as written, out of range in UTC
    ],
)
def test_a_timestamp_outside_the_supported_range_is_refused(stamp: str) -> None:
    with pytest.raises(ValidationError) as err:
        PredictRequest.model_validate({**ROW, "timestamp": stamp})
    error = err.value.errors()[0]
    assert error["loc"] == ("timestamp",)
    bound = {
        "greater_than_equal": "1677-09-21T00:12:43.146",
        "less_than": "2262-04-11T23:47:16.855",
    }
    assert bound[error["type"]] in error["msg"]  # says which bound the time is past


def test_the_supported_range_is_in_the_api_schema() -> None:
    described = PredictRequest.model_json_schema()["properties"]["timestamp"]["anyOf"][0]
    assert (
        "1677-09-21T00:12:43.146+00:00 .. 2262-04-11T23:47:16.854+00:00" in described["description"]
    )


@pytest.mark.parametrize(
    "stamp", ["1677-09-22T00:00:00Z", "2262-04-10T23:59:59+00:00", "2026-10-14T23:00:00", 0]
)
def test_timestamps_inside_the_range_are_accepted(stamp: object) -> None:
    assert PredictRequest.model_validate({**ROW, "timestamp": stamp}).timestamp is not None


@pytest.mark.parametrize("zone", [None, dt.UTC, dt.timezone(dt.timedelta(hours=-11, minutes=-30))])
def test_the_range_edges_are_exact_to_the_millisecond_the_log_stores(zone: object) -> None:
    """Accepted exactly when the floored epoch milliseconds fit pandas' nanosecond range."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    lo = epoch + dt.timedelta(milliseconds=REQUEST_TIME_MIN_MS)
    hi = epoch + dt.timedelta(milliseconds=REQUEST_TIME_MAX_MS)

    def ok(t: dt.datetime) -> bool:
        stamp = t.replace(tzinfo=None) if zone is None else t.astimezone(zone)  # type: ignore[arg-type]
        try:
            PredictRequest.model_validate({**ROW, "timestamp": stamp})
        except ValidationError:
            return False
        return True

    micro = dt.timedelta(microseconds=1)
    assert ok(lo) and ok(hi) and ok(hi + dt.timedelta(microseconds=999))
    assert not ok(lo - micro) and not ok(hi + dt.timedelta(milliseconds=1))
    assert pd.Timestamp(REQUEST_TIME_MAX_MS, unit="ms", tz="UTC") == pd.Timestamp(hi)


def _batch(request_id: str, t_ms: int) -> LogBatch:
    return LogBatch(
        "predict", "r", time.time(), 1.0, [request_id], ["u"], ["i"], ["feed"], ["mobile"],
        np.array([t_ms], np.int64), np.full(1, 0.5), ["prod"], ["m"], [None], np.zeros(1), [],
        None,
    )  # fmt: skip


def test_log_readers_never_misdate_a_row(tmp_path: Path) -> None:
    """Rows a service before the fix logged with out-of-range times are skipped, not wrapped."""
    log = RequestLog(tmp_path, None, flush_seconds=0.05)
    times = {
        "late": 253402351199000,  # 9999-12-31T23:59:59-14:00
        "early": -62135646000000,  # 0001-01-01T00:00:00+14:00
        "ok": 1_760_000_000_000,
        "edge": int(pd.Timestamp("2262-04-10", tz="UTC").timestamp() * 1000),
    }
    for rid, ms in times.items():
        log.submit(_batch(rid, ms))
    log.close()
    for read in (read_shards, read_monitor_log):
        frame = read(tmp_path).set_index("request_id")
        assert sorted(frame.index) == ["edge", "ok"]
        assert frame.loc["ok", "request_time"] == pd.Timestamp(times["ok"], unit="ms", tz="UTC")
        assert frame.loc["edge", "request_time"] == pd.Timestamp("2262-04-10", tz="UTC")
    assert dt.datetime.fromtimestamp(times["ok"] / 1000, dt.UTC).year == 2025
