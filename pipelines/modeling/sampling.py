"""Training past memory: the train split read whole, or as a day-stratified negative sample.

Details: docs/feature_store.md ("Training past memory").
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BATCH_ROWS = 1 << 20  # rows read at a time when sampling


def read_training_rows(
    path: Path, max_rows: int, seed: int, batch_rows: int = BATCH_ROWS
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows of ``path`` to train on, and the record of how they were chosen.

    Up to ``max_rows`` rows (or ``max_rows`` 0) the file is read whole. Beyond it every
    click is kept and each non-click with probability ``rate = (max_rows - clicks) /
    non-clicks``, the same on every day of the window (one uniform draw per row, in file
    order, from ``seed``), reading ``batch_rows`` rows at a time: only the sample is ever
    held in memory. The model trained on it must be corrected by ``log(rate)`` on the
    logit (``apply_negative_rate``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_rows = pq.ParquetFile(path).metadata.num_rows
    if max_rows <= 0 or n_rows <= max_rows:
        return pd.read_parquet(path), {"kind": "none", "rows": n_rows, "max_train_rows": max_rows}
    labels = pq.read_table(path, columns=["clicked", "ts"])
    clicked = labels["clicked"].to_numpy() == 1
    days = _days(labels["ts"].to_numpy())
    positives = int(clicked.sum())
    negatives = n_rows - positives
    if positives >= max_rows:
        raise ValueError(
            f"{path}: {positives:,} clicks alone exceed train.max_train_rows={max_rows:,}; "
            "raise it (every click is kept when sampling)"
        )
    rate = (max_rows - positives) / negatives
    rng = np.random.default_rng([seed, 0x5A3D])
    kept_parts = []
    keep_all = np.empty(n_rows, dtype=bool)
    start = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        n = batch.num_rows
        keep = clicked[start : start + n] | (rng.random(n) < rate)
        keep_all[start : start + n] = keep
        kept_parts.append(batch.filter(pa.array(keep)))
        start += n
    sink = io.BytesIO()  # through parquet, so dtypes are exactly those of a whole read
    pq.write_table(pa.Table.from_batches(kept_parts, schema=kept_parts[0].schema), sink)
    rows = pd.read_parquet(io.BytesIO(sink.getvalue()))
    per_day = {}
    for day in np.unique(days):
        neg = (days == day) & ~clicked
        per_day[str(np.datetime64(int(day), "D"))] = {
            "non_clicks": int(neg.sum()),
            "kept": int((neg & keep_all).sum()),
        }
    return rows, {
        "kind": "negative_downsampling",
        "max_train_rows": max_rows,
        "rows_before": n_rows,
        "rows_after": len(rows),
        "clicks_kept": positives,
        "negative_rate": round(rate, 12),
        "stratified_by": "day: each day's non-clicks are kept at the same rate",
        "per_day": per_day,
        "calibration": "log(negative_rate) added to the model's logit (its baseline score)",
        "seed": seed,
    }


def apply_negative_rate(model: Any, rate: float) -> None:
    """Correct a model fitted on non-clicks kept at ``rate``: the odds it learned are the
    true odds divided by ``rate``, so ``log(rate)`` goes back on every logit, through the
    constant score the boosted trees start from (the compiled trees read it too)."""
    model._baseline_prediction = model._baseline_prediction + math.log(rate)


def _days(ts: np.ndarray) -> np.ndarray:
    """UTC day numbers of timestamps (any datetime64 unit, or tz-aware via pandas)."""
    values = pd.DatetimeIndex(ts)
    if values.tz is not None:
        values = values.tz_convert("UTC").tz_localize(None)
    return values.values.astype("datetime64[D]").astype(np.int64)
