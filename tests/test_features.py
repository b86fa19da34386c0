"""Point-in-time features: brute-force reference, leakage, ties, window edges, unknowns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core.domain import Preset
from pipelines.features.definitions import (
    CTR_V1,
    WINDOWS_MS,
    EventIndex,
    to_ms,
)
from pipelines.features.offline import point_in_time_features
from pipelines.simulation.generate import generate_events

TINY = Preset(n_users=40, n_items=15, days=3, events=2_500)


def brute_force(
    events: pd.DataFrame, user: str, item: str, surface: str, t: int
) -> dict[str, float]:
    """Reference values straight from the documented semantics, one query at a time."""
    ts = to_ms(events["ts"])
    click_ts = np.where(
        events["clicked"].to_numpy() == 1, to_ms(events["click_ts"]), np.iinfo(np.int64).max
    )
    keys = {
        "user": events["user_id"].to_numpy() == user,
        "item": events["item_id"].to_numpy() == item,
        "user_surface": (events["user_id"].to_numpy() == user)
        & (events["surface"].to_numpy() == surface),
        "item_surface": (events["item_id"].to_numpy() == item)
        & (events["surface"].to_numpy() == surface),
    }
    out: dict[str, float] = {}
    for f in CTR_V1.features:
        if f.agg == "context":
            continue
        mask = keys[f.entity]
        w = WINDOWS_MS[f.window]
        lo = -np.inf if w is None else t - w

        def count(times: np.ndarray, mask: np.ndarray = mask, lo: float = lo) -> int:
            return int(((times > lo) & (times < t) & mask).sum())

        if f.agg == "count":
            out[f.name] = count(ts if f.source == "impressions" else click_ts)
        elif f.agg == "ctr":
            out[f.name] = (count(click_ts) + CTR_V1.prior_strength * CTR_V1.prior_ctr) / (
                count(ts) + CTR_V1.prior_strength
            )
        else:
            times = ts if f.source == "impressions" else click_ts
            seen = times[mask & (times < t) & (times > lo)]
            out[f.name] = (t - seen.max()) / 1000 if len(seen) else w / 1000
    return out


def test_offline_rows_equal_brute_force_reference() -> None:
    events = generate_events(TINY, seed=11)
    table = point_in_time_features(events)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(events), 60, replace=False):
        row = events.iloc[i]
        expected = brute_force(
            events, row.user_id, row.item_id, row.surface, int(to_ms([row.ts])[0])
        )
        for name, value in expected.items():
            assert table.iloc[i][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (i, name)


def test_future_events_never_change_earlier_rows() -> None:
    events = generate_events(TINY, seed=12)
    cut = events["ts"].iloc[len(events) // 2]
    past = events[events["ts"] < cut]
    # Clicks that happen after the cut are also future events: hide them from the past log.
    past = past.assign(
        clicked=np.where(past["click_ts"] < cut, past["clicked"], 0).astype("int8"),
        click_ts=past["click_ts"].where(past["click_ts"] < cut),
    )
    only_past = point_in_time_features(past)
    with_future = point_in_time_features(events).iloc[: len(past)]
    pd.testing.assert_frame_equal(
        only_past[CTR_V1.names].reset_index(drop=True),
        with_future[CTR_V1.names].reset_index(drop=True),
    )


def _one_user_log(times_ms: list[int], clicks: list[int | None]) -> pd.DataFrame:
    n = len(times_ms)
    return pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "ts": pd.to_datetime(times_ms, unit="ms", utc=True),
            "user_id": ["u1"] * n,
            "item_id": ["i1"] * n,
            "surface": ["feed"] * n,
            "device": ["mobile"] * n,
            "clicked": [0 if c is None else 1 for c in clicks],
            "click_ts": pd.to_datetime(
                [c if c is not None else None for c in clicks], unit="ms", utc=True
            ),
        }
    )


def test_window_edges_and_ties_are_exclusive() -> None:
    t0 = int(pd.Timestamp("2026-10-02", tz="UTC").value // 1_000_000)
    hour = WINDOWS_MS["1h"]
    assert hour is not None
    log = _one_user_log([t0, t0 - hour, t0 - hour + 1], [None, None, t0 - 10])
    index = EventIndex(log)
    row = index.lookup(["u1"], ["i1"], ["feed"], ["mobile"], np.array([t0])).iloc[0]
    # The event at exactly t is invisible; the one at exactly t - 1h is outside (t - w, t).
    assert row["user_impr_1h"] == 1
    assert row["user_impr_24h"] == 2
    assert row["user_clicks_24h"] == 1
    assert row["user_secs_since_click"] == pytest.approx(0.01)
    later = index.lookup(["u1"], ["i1"], ["feed"], ["mobile"], np.array([t0 + 1])).iloc[0]
    # At t0 + 1 the event at t0 is visible and t0 - 1h + 1 sits exactly on the open lower edge.
    assert later["user_impr_1h"] == 1
    assert later["user_impr_24h"] == 3


def test_unknown_entities_get_declared_defaults() -> None:
    events = generate_events(TINY, seed=13)
    index = EventIndex(events)
    row = index.lookup(
        ["nobody"], ["nothing"], ["search"], ["tablet"], np.array([index.as_of_ms])
    ).iloc[0]
    for f in CTR_V1.features:
        if f.agg != "context":
            assert row[f.name] == f.default, f.name
    assert row["surface_code"] == 1 and row["device_code"] == 2


def test_order_of_input_rows_does_not_matter() -> None:
    events = generate_events(TINY, seed=14)
    shuffled = events.sample(frac=1.0, random_state=1)
    a = EventIndex(events).lookup(
        events.user_id, events.item_id, events.surface, events.device, to_ms(events.ts)
    )
    b = EventIndex(shuffled).lookup(
        events.user_id, events.item_id, events.surface, events.device, to_ms(events.ts)
    )
    pd.testing.assert_frame_equal(a, b)


def test_online_single_lookup_equals_offline_row() -> None:
    """The service path (one request) and the batch path give identical vectors."""
    events = generate_events(TINY, seed=15)
    table = point_in_time_features(events)
    index = EventIndex(events)
    for i in (10, 500, 1500, len(events) - 1):
        row = events.iloc[i]
        one = index.lookup(
            [row.user_id], [row.item_id], [row.surface], [row.device], to_ms([row.ts])
        )
        assert one.iloc[0].tolist() == table.iloc[i][CTR_V1.names].tolist()
