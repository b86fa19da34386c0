"""Shared hypothesis strategies and helpers for the feature parity tests.

Event logs are tiny (a few users and items, times inside ~20 s on a coarse
grid) so that ties, window edges, TTL edges, empty histories and pruning in the
online store all happen often.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import strategies as st

from pipelines.core.domain import DEVICES, SURFACES
from pipelines.features.definitions import CTR_V1, Feature, FeatureSet, context_feature, to_ms

BASE_MS = int(pd.Timestamp("2026-03-01", tz="UTC").value // 1_000_000)

# Small windows and TTLs so that 20 s of events cross every edge; defaults that
# differ from the natural empty value, so "default" is observable.
EDGE_SET = FeatureSet(
    name="edge_test",
    prior_ctr=0.25,
    prior_strength=3.0,
    categorical=("surface_code",),
    features=(
        Feature("u_impr_2s", "user", "impressions", "count", "2s", "float64", 0.0, "t"),
        Feature("u_clicks_5s", "user", "clicks", "count", "5s", "float64", 0.0, "t"),
        Feature(
            "u_ctr_5s_ttl3s",
            "user",
            "impressions+clicks",
            "ctr",
            "5s",
            "float64",
            0.25,
            "t",
            ttl="3s",
        ),
        Feature(
            "u_impr_all_ttl4s", "user", "impressions", "count", None, "float64", -1.0, "t", ttl="4s"
        ),
        Feature("i_ctr_all", "item", "impressions+clicks", "ctr", None, "float64", 0.25, "t"),
        Feature("i_impr_all", "item", "impressions", "count", None, "float64", 0.0, "t"),
        Feature("i_since_click_6s", "item", "clicks", "seconds_since", "6s", "float64", 6.0, "t"),
        Feature("us_impr_3s", "user_surface", "impressions", "count", "3s", "float64", 0.0, "t"),
        Feature(
            "is_ctr_1s", "item_surface", "impressions+clicks", "ctr", "1s", "float64", 0.25, "t"
        ),
        Feature(
            "is_since_impr_1500ms",
            "item_surface",
            "impressions",
            "seconds_since",
            "1500ms",
            "float64",
            1.5,
            "t",
            ttl="1s",
        ),
        context_feature("surface_code"),
        context_feature("device_code"),
        context_feature("hour_of_day"),
    ),
)
FEATURE_SETS = {"edge": EDGE_SET, "ctr_v1": CTR_V1}
EDGE_OFFSETS_MS = (0, 1, -1, 500, 999, 1000, 1001, 1500, 2000, 2001, 3000, 4000, 5000, 6000, 6001)

_times = st.one_of(
    st.integers(0, 40).map(lambda k: k * 500),  # a coarse grid: many ties
    st.integers(0, 20_000),
)


@st.composite
def event_logs(draw: st.DrawFn, max_events: int = 25) -> pd.DataFrame:
    """A RawEvents frame with few entities, ties and clicks (possibly empty)."""
    n = draw(st.integers(0, max_events))
    rows = []
    for i in range(n):
        ts = BASE_MS + draw(_times)
        clicked = draw(st.booleans())
        delay = draw(st.one_of(st.sampled_from([1, 500, 1000, 2000]), st.integers(1, 6000)))
        rows.append(
            {
                "event_id": f"e{i:04d}",
                "ts": ts,
                "user_id": f"u{draw(st.integers(0, 2))}",
                "item_id": f"i{draw(st.integers(0, 2))}",
                "surface": draw(st.sampled_from(SURFACES)),
                "device": draw(st.sampled_from(DEVICES)),
                "position": draw(st.integers(1, 5)),
                "clicked": int(clicked),
                "click_ts": ts + delay if clicked else None,
            }
        )
    return make_events(rows)


def make_events(rows: list[dict[str, object]]) -> pd.DataFrame:
    """RawEvents-typed frame from dict rows with integer-ms times."""
    cols = [
        "event_id",
        "ts",
        "user_id",
        "item_id",
        "surface",
        "device",
        "position",
        "clicked",
        "click_ts",
    ]
    frame = pd.DataFrame(rows, columns=cols)
    frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="ms", utc=True).dt.as_unit("ms")
    click = pd.to_numeric(frame["click_ts"], errors="coerce")
    frame["click_ts"] = pd.to_datetime(click, unit="ms", utc=True).dt.as_unit("ms")
    frame["position"] = frame["position"].astype("int64")
    frame["clicked"] = frame["clicked"].astype("int64")
    for c in ("event_id", "user_id", "item_id", "surface", "device"):
        frame[c] = frame[c].astype("str")
    return frame


@st.composite
def query_times(draw: st.DrawFn, events: pd.DataFrame, n_max: int = 8) -> list[int]:
    """Query times around events, on window/TTL edges, and at random."""
    anchors = [int(a) for a in to_ms(events["ts"])] if len(events) else []
    clicks = events["click_ts"].dropna()
    anchors += [int(c) for c in to_ms(clicks)] if len(clicks) else []
    out = []
    for _ in range(draw(st.integers(1, n_max))):
        if anchors and draw(st.booleans()):
            out.append(draw(st.sampled_from(anchors)) + draw(st.sampled_from(EDGE_OFFSETS_MS)))
        else:
            out.append(BASE_MS + draw(st.integers(0, 28_000)))
    return out


@st.composite
def labels_for(draw: st.DrawFn, events: pd.DataFrame, n_max: int = 8) -> pd.DataFrame:
    """Label rows (queries) including entities that never had an event."""
    times = draw(query_times(events, n_max))
    rows = [
        {
            "user_id": f"u{draw(st.integers(0, 3))}",
            "item_id": f"i{draw(st.integers(0, 3))}",
            "surface": draw(st.sampled_from(SURFACES)),
            "device": draw(st.sampled_from(DEVICES)),
            "ts": pd.Timestamp(t, unit="ms", tz="UTC"),
        }
        for t in times
    ]
    return pd.DataFrame(rows)


def assert_frames_identical(a: pd.DataFrame, b: pd.DataFrame, context: str = "") -> None:
    """Exact equality of two feature frames (same columns, dtypes and bit-identical values)."""
    assert list(a.columns) == list(b.columns), context
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        assert x.dtype == y.dtype, (col, x.dtype, y.dtype, context)
        same = (x == y) | (np.isnan(x) & np.isnan(y)) if x.dtype.kind == "f" else x == y
        assert same.all(), f"{col} differs {context}: {x[~same][:5]} vs {y[~same][:5]}"


def hand_checked_edges() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[float]]]:
    """Events, label times and the hand-checked values of the ``edge`` feature set at its
    window, TTL and tie edges (docs/features.md): the same case for every engine.

    Two impressions at BASE (one clicked at BASE+1000) and six label times around them.
    """
    row = {"user_id": "u0", "surface": "feed", "device": "mobile", "position": 1}
    events = make_events(
        [
            {
                **row,
                "event_id": "a",
                "ts": BASE_MS,
                "item_id": "i0",
                "clicked": 1,
                "click_ts": BASE_MS + 1000,
            },
            {
                **row,
                "event_id": "b",
                "ts": BASE_MS,
                "item_id": "i1",
                "clicked": 0,
                "click_ts": None,
            },
        ]
    )
    at = [BASE_MS, BASE_MS + 1, BASE_MS + 1999, BASE_MS + 2000, BASE_MS + 4000, BASE_MS + 4001]
    labels = pd.DataFrame(
        {
            "user_id": "u0",
            "item_id": "i0",
            "surface": "feed",
            "device": "mobile",
            "ts": pd.to_datetime(at, unit="ms", utc=True),
        }
    )
    expected = {
        # 2 s window: both tied impressions visible from t+1 ms until t+1999 ms, gone at t+2000.
        "u_impr_2s": [0, 2, 2, 0, 0, 0],
        # all-history count with a 4 s TTL: default -1 before any event and from 4 s on
        # (the TTL interval (t - ttl, t) is open like a window).
        "u_impr_all_ttl4s": [-1, 2, 2, 2, -1, -1],
        # the click at BASE+1000 is an event at its own time.
        "u_clicks_5s": [0, 0, 1, 1, 1, 1],
        "i_since_click_6s": [6.0, 6.0, 0.999, 1.0, 3.0, 3.001],
    }
    return events, labels, expected


def with_future_event(
    data: st.DataObject, events: pd.DataFrame, labels: pd.DataFrame
) -> tuple[pd.DataFrame, int]:
    """``events`` plus one event at a drawn t_new (or a click at t_new for an earlier
    impression), and t_new: the step of the no-leakage properties of every engine."""
    t_new = BASE_MS + data.draw(st.integers(0, 28_000))
    future = events.copy()
    unclicked = np.flatnonzero((future["clicked"].to_numpy() == 0) & (to_ms(future["ts"]) < t_new))
    if len(unclicked) and data.draw(st.booleans()):
        i = int(unclicked[0])
        future.loc[future.index[i], "clicked"] = 1
        future.loc[future.index[i], "click_ts"] = pd.Timestamp(t_new, unit="ms", tz="UTC")
        return future, t_new
    extra = make_events(
        [
            {
                "event_id": "future",
                "ts": t_new,
                "user_id": labels["user_id"].iloc[0],
                "item_id": labels["item_id"].iloc[0],
                "surface": labels["surface"].iloc[0],
                "device": "mobile",
                "position": 1,
                "clicked": 1,
                "click_ts": t_new + 1,
            }
        ]
    )
    return pd.concat([future, extra], ignore_index=True), t_new
