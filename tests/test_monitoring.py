"""The request log as monitors read it: shard format, normalization, windows and serving signals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.core import profiles as wl
from pipelines.monitoring.requests import (
    LogReadStats,
    RequestLogError,
    SignalSettings,
    latest,
    live_frame,
    normalize_request_log,
    read_request_log,
    read_window_profiles,
    reason_code,
    select_window,
    serving_signals,
    signal_breaches,
    signal_timeline,
    write_request_log_shard,
    write_window_profiles,
)
from pipelines.serving.request_log import LogBatch


def service_batches() -> list[LogBatch]:
    """Two calls as the service logs them: a canary answer, then a baseline batch of two."""
    t0 = int(pd.Timestamp("2026-10-07T12:00:00Z").value // 1_000_000)
    names = ["user_ctr_7d", "surface_code"]
    canary = LogBatch(
        endpoint="predict",
        release_id="r0123456789ab",
        answered_at=t0 / 1000 + 0.123,
        latency_ms=3.25,
        request_ids=["9f2c4e1d0a7b3c55"],
        users=["u000001"],
        items=["i00002"],
        surfaces=["feed"],
        devices=["mobile"],
        t_ms=np.array([t0]),
        probability=np.array([0.0871]),
        routes=["canary"],
        models=["v1.1.0"],
        reasons=[None],
        feature_age=np.array([12.5]),
        feature_names=names,
        features=np.array([[0.11, 0.0]]),
        scores={"candidate": np.array([0.0871]), "prod": np.array([0.0912])},
    )
    baseline = LogBatch(
        endpoint="predict_batch",
        release_id="r0123456789ab",
        answered_at=t0 / 1000 + 1,
        latency_ms=1.5,
        request_ids=["b-0", "b-1"],
        users=["u1", "u2"],
        items=["i1", "i2"],
        surfaces=["recs", "search"],
        devices=["tablet", "desktop"],
        t_ms=np.array([t0 + 1000, t0 + 1000]),
        probability=np.array([0.05, 0.07]),
        routes=["baseline", "baseline"],
        models=["rule-baseline", "rule-baseline"],
        reasons=["feature store unavailable: ConnectionError: x"] * 2,
        feature_age=np.array([np.nan, np.nan]),
        feature_names=names,
        features=None,
    )
    return [canary, baseline]


def synthetic_log(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A normalized log with every field, two features and a mix of routes and reasons."""
    rng = np.random.default_rng(seed)
    times = pd.Timestamp("2026-10-07", tz="UTC") + pd.to_timedelta(
        np.sort(rng.integers(0, 3 * 3600, n)), unit="s"
    )
    route = np.where(rng.random(n) < 0.9, "prod", "baseline")
    reason = np.where(
        route == "baseline", "features are 900 s old, over the 300 s freshness SLA", None
    )
    return pd.DataFrame(
        {
            "request_id": [f"r{i:06d}" for i in range(n)],
            "answered_at": times,
            "endpoint": "predict",
            "release_id": "r1",
            "user": [f"u{i % 50:06d}" for i in range(n)],
            "item": "i00001",
            "surface": rng.choice(["feed", "search", "recs"], n),
            "device": rng.choice(["mobile", "desktop", "tablet"], n),
            "request_time": times,
            "route": route,
            "model": np.where(route == "prod", "m1", "rule-baseline"),
            "probability": rng.uniform(0.01, 0.3, n).round(6),
            "degraded": route == "baseline",
            "degraded_reason": reason,
            "latency_ms": rng.gamma(2.0, 2.0, n).round(3),
            "feature_age_seconds": np.where(route == "baseline", 900.0, 10.0),
            "user_ctr_7d": rng.uniform(0, 0.3, n),
            "surface_code": rng.integers(0, 3, n).astype(float),
            "score_prod": np.where(route == "prod", 0.1, np.nan),
        }
    )


def test_reads_the_service_shard_format(tmp_path: Path) -> None:
    shard = tmp_path / "requests-20261007T120000-host-1-0001.jsonl"
    lines = b"".join(b.to_line() for b in service_batches())  # the service's own writer
    shard.write_bytes(lines + b'{"v": 1, "answered_at": "2026-10-0')  # crash mid-write
    (tmp_path / "unrelated.txt").write_text("not a shard")
    stats = LogReadStats()
    log = read_request_log(tmp_path, stats=stats)
    assert (stats.shards, stats.rows) == (1, 3)  # the partial last line is skipped
    assert isinstance(log["request_time"].dtype, pd.DatetimeTZDtype)
    assert str(log["request_time"].dt.tz) == "UTC"
    first = log.set_index("request_id").loc["9f2c4e1d0a7b3c55"]
    assert first["route"] == "canary" and first["model"] == "v1.1.0"
    assert first["user_ctr_7d"] == 0.11 and first["score_candidate"] == 0.0871
    assert first["score_prod"] == 0.0912 and first["feature_age_seconds"] == 12.5
    assert first["request_time"] == pd.Timestamp("2026-10-07T12:00:00Z")
    second = log.set_index("request_id").loc["b-1"]
    assert np.isnan(second["user_ctr_7d"]) and np.isnan(second["feature_age_seconds"])
    assert second["degraded"] and second["latency_ms"] == 1.5
    assert reason_code(second["degraded_reason"]) == "features_unavailable"


def test_feature_vectors_read_back_bit_for_bit_and_version_1_lines_still_read(
    tmp_path: Path,
) -> None:
    """A line carries its feature matrix as the base64 of its float64 bytes (version 2):
    read back, every value is the served one to the bit, NaN as None; a version 1 line
    (nested lists of numbers) reads as before."""
    import orjson

    from pipelines.serving.request_log import read_shards

    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(0, 1e6, (40, 2)), [[np.nan, 5e-324], [1 / 3, -0.0]]])
    batch = service_batches()[0]
    batch.request_ids = [f"r{i}" for i in range(len(X))]
    for name in ("users", "items", "surfaces", "devices", "routes", "models", "reasons"):
        setattr(batch, name, getattr(batch, name) * len(X))
    batch.t_ms, batch.probability = np.repeat(batch.t_ms, len(X)), rng.random(len(X))
    batch.feature_age, batch.features, batch.scores = np.zeros(len(X)), X, {}
    line = batch.to_line()
    record = orjson.loads(line)
    assert record["v"] == 2 and record["features"]["shape"] == [len(X), 2]
    old = {**record, "v": 1, "features": [[None if v != v else v for v in r] for r in X.tolist()]}
    for name, data in (("new", line), ("old", orjson.dumps(old) + b"\n")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "requests-20261007T120000-host-1-0001.jsonl").write_bytes(data)
        got = read_shards(folder)["features"].tolist()
        values = [[row[k] for k in ("user_ctr_7d", "surface_code")] for row in got]
        assert values[-2][0] is None and values[-2][1] == 5e-324, name
        rest = np.array(values[:-2] + [values[-1]], dtype=np.float64)
        assert rest.tobytes() == np.concatenate([X[:-2], X[-1:]]).tobytes(), name


def test_round_trip_through_a_shard(tmp_path: Path) -> None:
    log = synthetic_log()
    write_request_log_shard(log, tmp_path, "t")
    back = read_request_log(tmp_path)
    assert len(back) == len(log)
    pd.testing.assert_series_equal(back["probability"], log["probability"], check_names=False)
    assert np.allclose(back["user_ctr_7d"], log["user_ctr_7d"])
    assert (back["request_time"] == log["request_time"]).all()
    assert back["score_prod"].isna().sum() == log["score_prod"].isna().sum()


def test_bad_logs_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RequestLogError, match=r"does not exist.*mlops monitor replay"):
        read_request_log(tmp_path / "nowhere")
    with pytest.raises(RequestLogError, match="no request-log rows"):
        read_request_log(tmp_path)
    row = synthetic_log(1).iloc[0].to_dict()
    broken = pd.DataFrame([{k: v for k, v in row.items() if k not in ("route", "latency_ms")}])
    with pytest.raises(RequestLogError, match=r"lacks field\(s\) \['route', 'latency_ms'\]"):
        normalize_request_log(broken, where="shard X")
    with pytest.raises(RequestLogError, match="request_time"):
        normalize_request_log(pd.DataFrame([dict(row, request_time="yesterday")]))
    (tmp_path / "requests-old.jsonl").write_text('{"request_id": "a", "route": "prod"}\n')
    with pytest.raises(RequestLogError, match="not in the service's request-log format"):
        read_request_log(tmp_path)


def test_windows_live_frame_and_profiles(tmp_path: Path) -> None:
    log = synthetic_log()
    part = select_window(log, pd.Timestamp("2026-10-07T01:00Z"), pd.Timestamp("2026-10-07T02:00"))
    assert part["request_time"].min() >= pd.Timestamp("2026-10-07T01:00Z")
    assert part["request_time"].max() < pd.Timestamp("2026-10-07T02:00Z")
    newest = log["request_time"].max()
    hour = latest(log, "1h")  # the last hour, ending at the newest request
    assert hour["request_time"].max() == newest
    assert hour["request_time"].min() > newest - pd.Timedelta("1h")
    assert len(hour) == (log["request_time"] > newest - pd.Timedelta("1h")).sum() < len(log)
    assert latest(log, "") is log and len(latest(log, "30D")) == len(log)
    for bad in ("yesterday", "-1h", "0s"):
        with pytest.raises(RequestLogError, match="duration"):
            latest(log, bad)
    frame = live_frame(log, ["user_ctr_7d", "surface_code", "absent_feature"])
    assert list(frame.columns) == [
        "surface",
        "device",
        "user_ctr_7d",
        "surface_code",
        "absent_feature",
        "prediction",
    ]
    # only the prod model's outputs count as predictions (baseline rows are NaN)
    assert frame["prediction"].notna().sum() == (log["route"] == "prod").sum()
    paths = write_window_profiles(log, tmp_path, "1h", ["user_ctr_7d", "surface_code"])
    assert len(paths) == 3
    merged = wl.column_sketches(read_window_profiles(tmp_path))
    assert merged["user_ctr_7d"].count == len(log)


def test_serving_signals_and_breaches() -> None:
    log = synthetic_log()
    signals = serving_signals(log, sla_seconds=300)
    baseline = (log["route"] == "baseline").mean()
    assert signals["fallback_rate"] == pytest.approx(baseline, abs=1e-6)
    assert signals["stale_share"] == pytest.approx(baseline, abs=1e-6)
    assert signals["degraded_reasons"] == {
        "features_stale": int((log["route"] == "baseline").sum())
    }
    assert signals["latency_p95_ms"] == pytest.approx(
        np.quantile(log["latency_ms"], 0.95), abs=1e-3
    )
    breaches = signal_breaches(
        signals, SignalSettings(max_fallback_rate=0.05, max_stale_share=0.05)
    )
    assert {b["signal"] for b in breaches} == {"fallback_rate", "stale_share"}
    assert signal_breaches(signals, SignalSettings(min_rows=10_000)) == []  # too few rows to judge
    timeline = signal_timeline(log, "1h", 300)
    assert len(timeline) == 3 and timeline["rows"].sum() == len(log)
    assert {"fallback_rate", "stale_share", "latency_p95_ms", "feature_age_p95_s"} <= set(timeline)


def test_reason_codes() -> None:
    assert reason_code(None) is None
    assert reason_code("features are 400 s old, over the 300 s freshness SLA") == "features_stale"
    assert reason_code("candidate model error: RuntimeError: boom") == "candidate_error"
    assert reason_code("prod model exceeded the 40 ms latency budget") == "prod_latency_budget"
    assert reason_code("candidate skipped for 9.0 s after: x") == "candidate_breaker_open"
    assert reason_code("prod refused at load: md5 mismatch") == "prod_refused"


def test_report_notebook_is_thin_stripped_and_parameterized() -> None:
    from tests.support.project import REPO
    from tests.test_notebooks import test_notebook_is_thin_stripped_and_parameterized as thin

    thin(REPO / "monitors/drift_report.ipynb")


def test_drift_report_names_schema_problems_of_the_request_log() -> None:
    """A served feature missing, an undeclared one and a retyped one, from raw log rows."""
    from pipelines.monitoring.monitor import MonitorConfig, drift_report
    from pipelines.stages.drift_reference import build_reference
    from tests.support.project import REPO

    cfg = MonitorConfig.load(REPO)
    n = 2000
    rng = np.random.default_rng(0)
    times = pd.Timestamp("2026-10-07", tz="UTC") + pd.to_timedelta(np.arange(n) * 5, unit="s")
    names = cfg.feature_names
    train = pd.DataFrame({name: rng.integers(0, 5, n).astype(float) for name in names})
    train.insert(0, "device", rng.choice(["ios", "web"], n))
    train.insert(0, "surface", rng.choice(["feed", "search", "recs"], n))
    train["prediction"] = rng.uniform(0.05, 0.2, n)
    reference = build_reference(train, pd.Series(times))
    features = [
        {
            **{k: float(v) for k, v in zip(names[1:], row, strict=True)},
            "brand_new": 1.0,
            names[2]: "n/a" if i % 3 else float(row[1]),
        }
        for i, row in enumerate(rng.integers(0, 5, (n, len(names) - 1)))
    ]
    raw = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "request_time": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "surface": train["surface"],
            "device": train["device"],
            "route": "prod",
            "model": "v1",
            "probability": train["prediction"],
            "latency_ms": 3.0,
            "features": features,
        }
    )
    log = normalize_request_log(raw)
    report = drift_report(cfg, log, reference)
    reasons = {c.column: c.reasons for c in report.columns if c.reasons}
    assert reasons == {
        names[0]: ["missing_column"],
        names[2]: ["type_change"],
        "brand_new": ["new_column"],
    }, report.table()[["column", "status", "reasons"]]
    assert not report.dataset_drift and report.summary()["data_problems"].keys() == reasons.keys()
