"""The drift reference: exact binned statistics of the training period, per time window.

``build_reference`` is the one definition of the format (docs/monitoring.md, "Drift
reference"). For every monitored column it records the bins (numeric: edges at the
reference's exact quantiles; categorical: the reference's categories), the pooled bin
counts and null count, and the same counts **per time window** of the training period,
so the monitor can measure how much the statistic moves between windows when nothing
changed (clustered traffic moves far more than independent rows would).

Another engine (for example Spark, partition by partition) produces the same dict in
two passes: the exact quantile edges over the whole period first, then per-window bin
counts, which add up across partitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_FORMAT = 1


def is_categorical(values: pd.Series) -> bool:
    """String-like columns are categorical; numbers and booleans are numeric."""
    return not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values))


def numeric_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Exact reference-quantile edges, duplicates removed (a point mass gets its own bin)."""
    if len(values) == 0:
        return np.empty(0)
    return np.unique(np.quantile(values, [i / bins for i in range(1, bins)]))


def numeric_bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value over ``(-inf, e1], (e1, e2], ..., (ek, inf)``."""
    return np.searchsorted(edges, values, side="left")


def category_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Index of each value in ``categories``; ``len(categories)`` for any other value."""
    codes = pd.Categorical(values.astype(str), categories=categories).codes.astype(np.int64)
    codes[codes < 0] = len(categories)
    return codes


def build_reference(
    frame: pd.DataFrame,
    times: pd.Series,
    window: str = "1h",
    bins: int = 10,
    max_categories: int = 50,
    growing: Mapping[str, str] | None = None,
    filled_from: Mapping[str, tuple[pd.Timestamp, str]] | None = None,
) -> dict[str, Any]:
    """The drift reference of ``frame`` (one row per training row) as a JSON-ready dict.

    ``times`` holds each row's time (UTC); rows are grouped into ``window`` windows.
    ``growing`` maps columns that grow by construction (all-history counts) to the
    reason, which the monitor shows next to their verdict. ``filled_from`` maps a
    column to ``(time, reason)``: rows before ``time`` are left out of that column's
    statistics because its window was still filling; a column with no row left is
    recorded as not judged, with the reason.

    Layout: ``{"format", "rows", "window", "windows": [window start ISO times],
    "columns": {name: {"kind": "numeric"|"categorical", "rows", "nulls",
    "edges"|"categories", "counts", "window_rows", "window_nulls", "window_counts"
    (windows x bins), "growing", "not_judged"}}}``. All counts are exact integers,
    so the same training rows always give the same reference.
    """
    growing = dict(growing or {})
    filled_from = dict(filled_from or {})
    stamps = pd.to_datetime(pd.Series(times), utc=True).reset_index(drop=True)
    if len(stamps) != len(frame):
        raise ValueError(f"{len(stamps)} times for {len(frame)} rows")
    starts = stamps.dt.floor(window).dt.tz_localize(None).to_numpy("datetime64[ns]")
    labels, codes = np.unique(starts.view("int64"), return_inverse=True)
    n_windows = len(labels)
    columns: dict[str, Any] = {}
    for name in frame.columns:
        series = frame[name].reset_index(drop=True)
        keep = np.ones(len(series), dtype=bool)
        entry: dict[str, Any] = {"growing": growing.get(name), "not_judged": None}
        if name in filled_from:
            since, reason = filled_from[name]
            keep = (stamps >= pd.Timestamp(since)).to_numpy()
            entry["judged_from"] = pd.Timestamp(since).isoformat()
            if not keep.any():
                entry["not_judged"] = reason
        series, win = series[keep], codes[keep]
        null = series.isna().to_numpy()
        values = series[~null]
        if is_categorical(series):
            counts = values.astype(str).value_counts()
            ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            categories = [str(k) for k, _ in ordered[:max_categories]]
            idx = category_codes(values, categories)
            has_other = bool((idx == len(categories)).any())
            k = len(categories) + (1 if has_other else 0)
            entry.update(kind="categorical", categories=categories, other_bin=has_other)
        else:
            x = values.to_numpy(np.float64)
            edges = numeric_edges(x, bins)
            idx = numeric_bin(x, edges)
            k = len(edges) + 1
            entry.update(kind="numeric", edges=[float(e) for e in edges])
        wv = win[~null]
        per_window = np.bincount(wv * k + idx, minlength=n_windows * k).reshape(n_windows, k)
        entry.update(
            rows=int(len(series)),
            nulls=int(null.sum()),
            counts=per_window.sum(axis=0).astype(int).tolist(),
            window_rows=np.bincount(win, minlength=n_windows).astype(int).tolist(),
            window_nulls=np.bincount(win[null], minlength=n_windows).astype(int).tolist(),
            window_counts=per_window.astype(int).tolist(),
        )
        columns[str(name)] = entry
    return {
        "format": REFERENCE_FORMAT,
        "rows": int(len(frame)),
        "window": window,
        "bins": bins,
        "windows": [pd.Timestamp(int(t), unit="ns", tz="UTC").isoformat() for t in labels],
        "columns": columns,
    }


def filling_columns(
    feature_set: Any, data_start: pd.Timestamp, columns: list[str]
) -> dict[str, tuple[pd.Timestamp, str]]:
    """Features whose window was not yet full during part of the reference period.

    A feature over the last ``w`` before ``t`` sees a full window only from
    ``data_start + w`` on; earlier rows are still filling and would make a later,
    undrifted window look drifted. Features over all history never fill (they are
    ``FeatureSet.growing``).
    """
    out: dict[str, tuple[pd.Timestamp, str]] = {}
    for name in columns:
        try:
            feature = feature_set[name]
        except KeyError:
            continue
        if feature.window_ms:
            since = pd.Timestamp(data_start) + pd.Timedelta(milliseconds=feature.window_ms)
            out[name] = (
                since,
                f"its {feature.window} window is full only from {since.isoformat()} "
                f"(data from {pd.Timestamp(data_start).isoformat()})",
            )
    return out
