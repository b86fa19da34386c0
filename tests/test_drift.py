"""Drift from real whylogs profiles: the adapter, the distances and the calibrated decision rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core import profiles as wl
from pipelines.core.config import ConfigError
from pipelines.features.definitions import CTR_V1, EventIndex, to_ms
from pipelines.features.offline import point_in_time_features
from pipelines.monitoring.drift import (
    DriftPolicy,
    bin_samples,
    compare_frames,
    critical_psi,
    hellinger,
    psi,
    value_skew,
)
from pipelines.simulation.generate import generate_events

COLUMNS = ["surface", "device", *CTR_V1.names]


@pytest.fixture(scope="module")
def feature_rows() -> dict[str, pd.DataFrame]:
    """Point-in-time feature rows (warm-up day dropped) for no drift and each drift scenario."""
    out = {}
    for scenario in ("none", "surface_shift", "ctr_drop", "new_items"):
        events = generate_events("small", 42, scenario=scenario)
        table = point_in_time_features(events)
        table = table[table["ts"] >= table["ts"].min().floor("D") + pd.Timedelta(hours=24)]
        out[scenario] = table[COLUMNS].reset_index(drop=True)
    return out


def test_adapter_sketches_match_the_data() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "x": rng.normal(size=5000),
            "k": rng.integers(0, 3, 5000),
            "s": rng.choice(["a", "b", "c"], 5000, p=[0.5, 0.3, 0.2]),
            "empty": np.full(5000, np.nan),
        }
    )
    sketches = wl.column_sketches(wl.profile(frame))
    assert {n: s.kind for n, s in sketches.items()} == {
        "x": "numeric",
        "k": "numeric",
        "s": "categorical",
        "empty": "empty",
    }
    x = sketches["x"]
    assert x.count == 5000
    points = np.quantile(frame["x"], [0.1, 0.5, 0.9])
    exact = [(frame["x"] <= p).mean() for p in points]
    assert np.allclose(x.cdf(points), exact, atol=max(x.rank_error, 1e-9) + 1e-3)
    assert abs(x.quantiles([0.5])[0] - np.median(frame["x"])) < 0.05
    assert sketches["s"].items() == frame["s"].value_counts().to_dict()
    assert sketches["empty"].nulls == 5000
    with pytest.raises(TypeError, match="not numeric"):
        sketches["s"].cdf([0.0])
    merged = wl.column_sketches(wl.merge_profiles([wl.profile(frame), wl.profile(frame)]))
    assert (
        merged["x"].count == 10_000 and merged["s"].items()["a"] == 2 * sketches["s"].items()["a"]
    )
    scores = wl.drift_scores(wl.profile(frame), wl.profile(frame))
    assert scores["x"]["algorithm"] == "ks" and scores["s"]["algorithm"] == "chi-square"


def test_distances() -> None:
    counts = np.array([100.0, 200.0, 300.0])
    assert psi(counts, counts) == pytest.approx(0.0)
    assert hellinger(counts, counts) == pytest.approx(0.0)
    assert hellinger(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert psi(counts, counts[::-1]) > 0.5
    # the noise limit shrinks with the sample sizes and grows with the number of bins
    assert critical_psi(10, 10_000, 1_000, 0.01) > critical_psi(10, 10_000, 10_000, 0.01)
    assert critical_psi(10, 10_000, 10_000, 0.01) > critical_psi(4, 10_000, 10_000, 0.01)
    rng = np.random.default_rng(1)
    ref = rng.normal(size=50_000)
    same = bin_samples(ref, rng.normal(size=50_000), 10)
    shifted = bin_samples(ref, rng.normal(0.1, 1, size=50_000), 10)
    assert psi(same.reference, same.live) < critical_psi(10, 50_000, 50_000, 0.01)
    assert 0.006 < psi(shifted.reference, shifted.live) < 0.015  # 0.1 SD ~ PSI 0.01


def test_no_shift_is_not_flagged(feature_rows: dict[str, pd.DataFrame]) -> None:
    """Random halves of one stationary stream: no column drifts, on three different splits."""
    rows = feature_rows["none"]
    for seed in (0, 1, 2):
        in_ref = np.random.default_rng(seed).random(len(rows)) < 0.5
        report = compare_frames(rows[in_ref], rows[~in_ref], feature_names=CTR_V1.names)
        table = report.table()
        assert report.drifted == [], table[["column", "psi", "threshold"]].head()
        assert len(report.decided) == len(COLUMNS)
        assert not report.dataset_drift and report.drift_share == 0.0


@pytest.mark.parametrize(
    ("scenario", "must_flag"),
    [
        ("surface_shift", {"surface", "surface_code", "user_surface_impr_7d"}),
        ("ctr_drop", {"user_ctr_7d", "item_ctr_all", "item_ctr_24h", "user_clicks_24h"}),
        ("new_items", {"item_impr_all", "item_impr_24h", "item_ctr_all"}),
    ],
)
def test_named_drift_scenarios_are_flagged(
    feature_rows: dict[str, pd.DataFrame], scenario: str, must_flag: set[str]
) -> None:
    base = feature_rows["none"]
    in_ref = np.random.default_rng(0).random(len(base)) < 0.5
    drifted = feature_rows[scenario].sample(n=10_000, random_state=3)
    report = compare_frames(base[in_ref], drifted, feature_names=CTR_V1.names)
    flagged = {c.column for c in report.drifted}
    assert must_flag <= flagged, report.table()[["column", "psi", "threshold"]]
    assert report.dataset_drift
    for col in report.drifted:
        assert col.psi > col.threshold >= DriftPolicy().psi_threshold
        assert col.whylogs_pvalue is not None  # reported for information
    if scenario == "surface_shift":
        surface = next(c for c in report.columns if c.column == "surface")
        assert surface.kind == "categorical" and surface.severity == "high"
        assert surface.bins["labels"][:3] == ["feed", "search", "recs"]
        assert surface.bins["live"][2] > 2 * surface.bins["reference"][2]  # recs share jumped


def test_small_windows_get_no_decision(feature_rows: dict[str, pd.DataFrame]) -> None:
    rows = feature_rows["ctr_drop"]
    report = compare_frames(feature_rows["none"], rows.head(100), feature_names=CTR_V1.names)
    assert {c.status for c in report.columns} == {"no_data"}
    assert report.drifted == [] and not report.dataset_drift
    # with the default min_rows, 800 rows of a strongly drifted stream are judged and flagged
    report = compare_frames(feature_rows["none"], rows.sample(800, random_state=0))
    assert {"item_ctr_all", "user_ctr_7d"} <= {c.column for c in report.drifted}
    assert all(c.threshold > DriftPolicy().psi_threshold for c in report.decided)  # noise term


def test_policy_from_params_names_bad_keys() -> None:
    assert DriftPolicy.from_params({"monitor": {"drift": {"bins": 20}}}).bins == 20
    with pytest.raises(ConfigError, match="unknown key.*'binz'"):
        DriftPolicy.from_params({"monitor": {"drift": {"binz": 20}}})
    with pytest.raises(ConfigError, match="family_alpha"):
        DriftPolicy.from_params({"monitor": {"drift": {"family_alpha": 1.5}}})
    with pytest.raises(ConfigError, match="psi_severe"):
        DriftPolicy(psi_threshold=0.2, psi_severe=0.1)


def test_value_skew_finds_the_feature_served_wrong() -> None:
    events = generate_events("small", 7)
    requests = events[events["ts"] >= events["ts"].max() - pd.Timedelta(hours=6)].head(1500)
    served = EventIndex(events, CTR_V1).lookup(
        requests["user_id"],
        requests["item_id"],
        requests["surface"],
        requests["device"],
        to_ms(requests["ts"]),
    )
    log = pd.DataFrame(
        {
            "user": requests["user_id"].to_numpy(),
            "item": requests["item_id"].to_numpy(),
            "surface": requests["surface"].to_numpy(),
            "device": requests["device"].to_numpy(),
            "request_time": requests["ts"].to_numpy(),
        }
    )
    log = pd.concat([log, served], axis=1)
    clean = value_skew(log, events, CTR_V1.names, "ctr_v1", sample=None)
    assert clean["mismatches"].sum() == 0
    log.loc[log.index[::10], "user_ctr_7d"] += 0.05  # an online store serving a wrong value
    skew = value_skew(log, events, CTR_V1.names, "ctr_v1", sample=None).set_index("feature")
    assert skew.loc["user_ctr_7d", "mismatch_rate"] == pytest.approx(0.1, abs=0.001)
    assert skew.drop(index="user_ctr_7d")["mismatches"].sum() == 0
