"""Online quality: delayed clicks joined by request id within the label window, scored per model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from pipelines.core.config import ConfigError
from pipelines.monitoring.quality import (
    QualitySettings,
    check_clicks,
    join_labels,
    online_quality,
    quality_breaches,
    quality_timeline,
)

T0 = pd.Timestamp("2026-10-07T12:00:00Z")


def test_label_window_rules() -> None:
    log = pd.DataFrame(
        {
            "request_id": ["a", "b", "c", "d", "e"],
            "request_time": [T0, T0, T0, T0 + pd.Timedelta(minutes=50), T0],
            "probability": 0.1,
            "model": "m1",
            "route": "prod",
        }
    )
    clicks = pd.DataFrame(
        {
            "request_id": ["a", "a", "b", "d", "e"],
            "click_ts": [
                T0 + pd.Timedelta(minutes=5),  # in the window
                T0 + pd.Timedelta(minutes=7),  # a second click on the same request counts once
                T0 + pd.Timedelta(minutes=45),  # after the 30-minute window: no click
                T0 + pd.Timedelta(minutes=52),  # window of d still open at as_of
                T0 - pd.Timedelta(minutes=1),  # before the request: not this request's click
            ],
        }
    )
    joined = join_labels(log, clicks, 30, as_of=T0 + pd.Timedelta(minutes=60)).set_index(
        "request_id"
    )
    assert joined.loc["a", "label"] == 1 and joined.loc["b", "label"] == 0
    assert joined.loc["c", "label"] == 0 and joined.loc["e", "label"] == 0
    assert joined.loc["d", "label_status"] == "pending" and np.isnan(joined.loc["d", "label"])
    table = online_quality(joined.reset_index())
    assert table.loc[0, "labelled"] == 4 and table.loc[0, "pending"] == 1


def test_metrics_per_model_and_route_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    p = rng.uniform(0.02, 0.4, n)
    y = rng.random(n) < p
    model = np.where(np.arange(n) % 4 == 0, "m2", "m1")
    log = pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(n)],
            "request_time": T0 + pd.to_timedelta(np.arange(n), unit="s"),
            "probability": p,
            "model": model,
            "route": np.where(model == "m2", "canary", "prod"),
        }
    )
    clicks = pd.DataFrame(
        {
            "request_id": log.loc[y, "request_id"],
            "click_ts": log.loc[y, "request_time"] + pd.Timedelta(seconds=20),
        }
    )
    joined = join_labels(log, clicks, 30, as_of=T0 + pd.Timedelta(days=1))
    table = online_quality(joined).set_index("model")
    for name in ("m1", "m2"):
        mask = model == name
        assert table.loc[name, "auc"] == pytest.approx(roc_auc_score(y[mask], p[mask]), abs=1e-5)
        assert table.loc[name, "log_loss"] == pytest.approx(log_loss(y[mask], p[mask]), abs=1e-5)
        assert table.loc[name, "calibration_error"] < 0.03  # p is the true rate
    assert table.loc["m2", "route"] == "canary"
    timeline = quality_timeline(joined, "15min")
    assert timeline["window"].nunique() == 5 and timeline["labelled"].sum() == n

    # a model whose probabilities are three times too high breaches the calibration limit
    log["probability"] = np.clip(p * 3, 0, 0.99)
    joined = join_labels(log, clicks, 30, as_of=T0 + pd.Timedelta(days=1))
    breaches = quality_breaches(online_quality(joined), QualitySettings(min_labels=500), 0.7)
    assert {(b["model"], b["signal"]) for b in breaches} >= {
        ("m1", "online_calibration_error"),
        ("m2", "online_calibration_error"),
    }
    # AUC below the offline reference by more than max_auc_drop
    auc_breaches = quality_breaches(online_quality(joined), QualitySettings(min_labels=500), 0.9)
    assert any(b["signal"] == "online_auc" for b in auc_breaches)
    assert quality_breaches(online_quality(joined), QualitySettings(min_labels=10**6), 0.9) == []


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['click_ts'\]"):
        check_clicks(pd.DataFrame({"request_id": ["a"]}))
    with pytest.raises(ConfigError, match="label_delay_minutes"):
        QualitySettings(label_delay_minutes=0)
    with pytest.raises(ConfigError, match="monitor.quality.delay: is not a known key"):
        QualitySettings(delay=5)


def test_auc_standard_error_matches_simulation() -> None:
    from sklearn.metrics import roc_auc_score

    from pipelines.monitoring.quality import auc_standard_error

    rng = np.random.default_rng(3)
    aucs = []
    for _ in range(300):
        y = np.r_[np.ones(80), np.zeros(720)]
        score = rng.normal(size=800) + 0.8 * y
        aucs.append(roc_auc_score(y, score))
    se = auc_standard_error(float(np.mean(aucs)), 80, 720)
    assert 0.75 < se / np.std(aucs) < 1.33
    assert auc_standard_error(0.7, 0, 100) == float("inf")
