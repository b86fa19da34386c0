"""Drift: calibrated on time windows of the training period, null and schema drift, determinism."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.core import profiles as wl
from pipelines.core.config import ConfigError
from pipelines.features.definitions import CTR_V1, EventIndex, to_ms
from pipelines.features.offline import point_in_time_features
from pipelines.monitoring.drift import (
    DriftSettings,
    bin_samples,
    compare_frames,
    compare_reference,
    critical_psi,
    hellinger,
    psi,
    value_skew,
)
from pipelines.simulation.generate import generate_events
from pipelines.stages.drift_reference import build_reference, filling_columns

COLUMNS = ["surface", "device", *CTR_V1.names]
GROWING = {"item_impr_all": "grows by construction"}
SCENARIO_DAY = 4


@pytest.fixture(scope="module")
def feature_rows() -> dict[str, pd.DataFrame]:
    """Point-in-time rows of the small preset with ``ts`` and ``day``; scenarios from day 4."""
    out = {}
    for scenario in ("none", "surface_shift", "ctr_drop", "new_items"):
        events = generate_events("small", 42, scenario=scenario, scenario_start_day=SCENARIO_DAY)
        table = point_in_time_features(events)
        day0 = table["ts"].min().floor("D")
        table["day"] = (table["ts"] - day0) // pd.Timedelta(days=1)
        out[scenario] = table[["ts", "day", *COLUMNS]].reset_index(drop=True)
    return out


@pytest.fixture(scope="module")
def train_reference(feature_rows: dict[str, pd.DataFrame]) -> dict:
    """The reference the profile stage would write for train days 1-3 (data from day 0)."""
    rows = feature_rows["none"]
    train = rows[rows["day"].between(1, 3)]
    filling = filling_columns(CTR_V1, rows["ts"].min().floor("D"), COLUMNS)
    return build_reference(train[COLUMNS], train["ts"], "1h", growing=GROWING, filled_from=filling)


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


def test_distances() -> None:
    counts = np.array([100.0, 200.0, 300.0])
    assert psi(counts, counts) == pytest.approx(0.0)
    assert hellinger(counts, counts) == pytest.approx(0.0)
    assert hellinger(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert psi(counts, counts[::-1]) > 0.5
    # the noise limit shrinks with the sample sizes and grows with the number of bins
    assert critical_psi(10, 10_000, 1_000, 0.01) > critical_psi(10, 10_000, 10_000, 0.01)
    assert critical_psi(10, 10_000, 10_000, 0.01) > critical_psi(4, 10_000, 10_000, 0.01)
    # variation between reference windows raises the limit at any sample size
    assert critical_psi(10, 10_000, 10_000, 0.01, 0.01) > critical_psi(10, 10_000, 10_000, 0.01)
    rng = np.random.default_rng(1)
    ref = rng.normal(size=50_000)
    same = bin_samples(ref, rng.normal(size=50_000), 10)
    shifted = bin_samples(ref, rng.normal(0.1, 1, size=50_000), 10)
    assert psi(same.reference, same.live) < critical_psi(10, 50_000, 50_000, 0.01)
    assert 0.006 < psi(shifted.reference, shifted.live) < 0.015  # 0.1 SD ~ PSI 0.01


def test_no_drift_on_later_time_windows(
    feature_rows: dict[str, pd.DataFrame], train_reference: dict
) -> None:
    """The train window against the later validation and test windows, whole and sampled."""
    rows = feature_rows["none"]
    for days in ((4, 5), (6, 7), (4, 4), (7, 7)):
        live = rows[rows["day"].between(*days)]
        for part in (live, live.sample(3000, random_state=1)):
            report = compare_reference(
                train_reference, part[COLUMNS], part["ts"], feature_names=CTR_V1.names
            )
            assert report.drifted == [], report.table()[["column", "psi", "threshold"]].head()
            assert not report.dataset_drift
    # windows still filling in the training period are not judged, and say why
    notes = {c.column: c.note for c in report.columns if c.status == "not_judged"}
    assert "user_ctr_7d" in notes and "7d window is full only from" in notes["user_ctr_7d"]
    assert "user_impr_24h" not in notes


def test_between_window_variation_widens_the_limit(feature_rows: dict[str, pd.DataFrame]) -> None:
    """With one reference window (iid assumption) the limit is the sampling limit only."""
    rows = feature_rows["none"]
    ref, live = rows[rows["day"] == 2], rows[rows["day"] == 3]
    timed = compare_frames(
        ref[COLUMNS], live[COLUMNS], reference_times=ref["ts"], live_times=live["ts"]
    )
    flat = compare_frames(ref[COLUMNS], live[COLUMNS])
    t = {c.column: c for c in timed.decided}
    f = {c.column: c for c in flat.decided}
    assert t["item_ctr_24h"].between_windows > 0 and f["item_ctr_24h"].between_windows == 0
    assert t["item_ctr_24h"].threshold > f["item_ctr_24h"].threshold


@pytest.mark.parametrize(
    ("scenario", "must_flag"),
    [
        ("surface_shift", {"surface", "surface_code"}),
        ("ctr_drop", {"user_ctr_24h"}),
        ("new_items", {"item_impr_24h", "item_impr_all"}),
    ],
)
def test_named_drift_scenarios_are_flagged_on_their_first_day(
    feature_rows: dict[str, pd.DataFrame], train_reference: dict, scenario: str, must_flag: set
) -> None:
    rows = feature_rows[scenario]
    live = rows[rows["day"] == SCENARIO_DAY]
    report = compare_reference(train_reference, live[COLUMNS], live["ts"])
    flagged = {c.column for c in report.drifted}
    assert must_flag <= flagged, report.table()[["column", "psi", "threshold"]].head(8)
    if scenario == "surface_shift":
        surface = next(c for c in report.columns if c.column == "surface")
        assert surface.kind == "categorical" and surface.severity == "high"
        assert report.summary()["severe_drift_columns"]  # what triggers retraining
        assert "<other>" not in surface.bins["labels"]  # no phantom bin
    if scenario == "new_items":  # a growing feature is judged on its fall only
        grown = next(c for c in report.columns if c.column == "item_impr_all")
        assert grown.reasons == ["growing_fall"] and "grows by construction" in grown.note


def test_live_rows_before_a_window_fills_are_not_judged_as_in_the_reference(
    feature_rows: dict[str, pd.DataFrame], train_reference: dict
) -> None:
    """A replay from the first day (24h windows still filling on day 0) is not drift."""
    rows = feature_rows["none"]
    live = rows[rows["day"].between(0, 1)]
    report = compare_reference(
        train_reference, live[COLUMNS], live["ts"], feature_names=CTR_V1.names
    )
    windowed = {c for c, e in train_reference["columns"].items() if e.get("judged_from")}
    assert "user_impr_24h" in windowed
    # (all-history counts do fall on a replay that starts before the training period)
    assert not {c.column for c in report.drifted} & windowed, report.table().head()
    impr = next(c for c in report.columns if c.column == "user_impr_24h")
    day0 = int((live["day"] == 0).sum())
    assert impr.n_live == len(live) - day0 and "window was still filling" in impr.note
    # judged on every row (no times), the filling day is a distribution change
    unaligned = compare_reference(train_reference, live[COLUMNS], feature_names=CTR_V1.names)
    assert "user_impr_24h" in {c.column for c in unaligned.drifted}


def test_growing_feature_rising_is_not_drift() -> None:
    rng = np.random.default_rng(0)
    times = pd.Series(
        pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(20_000) % 48, "h")
    )
    ref = pd.DataFrame({"n": rng.poisson(50, 20_000).astype(float)})
    ref_dict = build_reference(ref, times, growing={"n": "all-history count"})
    grown = pd.DataFrame({"n": rng.poisson(80, 5000).astype(float)})
    fell = pd.DataFrame({"n": rng.poisson(30, 5000).astype(float)})
    assert compare_reference(ref_dict, grown).drifted == []
    assert compare_reference(ref_dict, fell).drifted[0].reasons == ["growing_fall"]


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "y": rng.exponential(size=n),
            "s": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2]),
        }
    )


def test_null_rate_drift() -> None:
    ref, live = _frame(20_000, 0), _frame(10_000, 1)
    assert compare_frames(ref, live).drifted == []
    for share, flagged in ((0.1, True), (0.5, True), (0.005, False)):
        hole = live.copy()
        hole.loc[np.random.default_rng(2).random(len(hole)) < share, "y"] = np.nan
        report = compare_frames(ref, hole)
        y = next(c for c in report.columns if c.column == "y")
        assert y.drifted is flagged, (share, y)
        if flagged:
            assert y.reasons == ["null_rate"] and y.null_rate_live == pytest.approx(share, abs=0.02)
            assert report.summary()["data_problems"] == {"y": ["null_rate"]}
            assert not report.dataset_drift  # data problems alert, they do not retrain


def test_schema_drift_missing_new_and_retyped_columns() -> None:
    ref, live = _frame(20_000, 0), _frame(5000, 1)
    reference = build_reference(
        ref, pd.Series(pd.Timestamp("2026-01-01", tz="UTC"), index=ref.index)
    )
    report = compare_reference(reference, live.drop(columns="y").assign(z=1.0), absent=["y"])
    by = {c.column: c for c in report.columns}
    assert by["y"].reasons == ["missing_column"] and by["y"].severity == "high"
    assert by["z"].reasons == ["new_column"]
    assert not by["x"].drifted and not by["s"].drifted
    retyped = live.assign(x=live["x"].map(lambda v: f"{v:.2f}%"))
    report = compare_reference(reference, retyped)
    x = next(c for c in report.columns if c.column == "x")
    assert x.reasons == ["type_change"] and "not" in x.note
    # a new category gets its own bin and is named; without one there is no <other> bin
    unseen = live.assign(s=np.where(np.arange(len(live)) % 5 == 0, "d", live["s"]))
    s = next(c for c in compare_reference(reference, unseen).columns if c.column == "s")
    assert s.reasons == ["distribution"] and "'d'" in s.note and s.bins["labels"][-1] == "<other>"
    same = next(c for c in compare_reference(reference, live).columns if c.column == "s")
    assert same.bins["labels"] == ["a", "b", "c"]


def test_verdicts_are_deterministic(feature_rows: dict[str, pd.DataFrame]) -> None:
    """Same rows (in any order) give the same reference; the same window the same verdict."""
    rows = feature_rows["none"]
    ref, live = rows[rows["day"] == 2], rows[rows["day"] == 3]
    shuffled = ref.sample(frac=1.0, random_state=5)
    a = build_reference(ref[COLUMNS], ref["ts"], growing=GROWING)
    b = build_reference(shuffled[COLUMNS], shuffled["ts"], growing=GROWING)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    first = compare_reference(a, live[COLUMNS], live["ts"]).to_dict()
    second = compare_reference(b, live[COLUMNS], live["ts"]).to_dict()
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_small_windows_get_no_decision(
    feature_rows: dict[str, pd.DataFrame], train_reference: dict
) -> None:
    rows = feature_rows["ctr_drop"]
    live = rows[rows["day"] == 6].head(100)
    report = compare_reference(train_reference, live[COLUMNS], live["ts"])
    assert {c.status for c in report.columns} <= {"no_data", "not_judged"}
    assert report.drifted == [] and not report.dataset_drift


def test_policy_from_params_names_bad_keys() -> None:
    assert DriftSettings(bins=20).bins == 20
    with pytest.raises(ConfigError, match="drift.binz: is not a known key"):
        DriftSettings(binz=20)
    with pytest.raises(ConfigError, match="family_alpha"):
        DriftSettings(family_alpha=1.5)
    with pytest.raises(ConfigError, match="psi_severe"):
        DriftSettings(psi_threshold=0.2, psi_severe=0.1)
    with pytest.raises(ConfigError, match="null_rate_threshold"):
        DriftSettings(null_rate_threshold=1.5)


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


def test_growing_features_are_declared_in_the_feature_set() -> None:
    from pipelines.features.definitions import FeatureDefinitionError, FeatureSet

    assert CTR_V1.growing == ("item_impr_all",)
    with pytest.raises(FeatureDefinitionError, match="not declared"):
        FeatureSet("t", CTR_V1.features, growing=("item_impr_all", "nope"))
