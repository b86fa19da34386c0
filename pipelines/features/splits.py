"""The time split of a training set and its meta, shared by the pandas stage and Spark.

``build_dataset`` (pandas, ``pipelines.stages.dataset``) and the Spark build
(``spark_dataset``) place the same windows and record the same ``meta`` keys from
their own counts. Details: docs/feature_store.md ("Scaling out").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from pipelines.core.config import ConfigError
from pipelines.core.settings import BuildDatasetSettings
from pipelines.features.contracts import SPLITS
from pipelines.features.definitions import FeatureSet


def split_windows(
    first: pd.Timestamp, last: pd.Timestamp, policy: BuildDatasetSettings
) -> dict[str, pd.Timestamp]:
    """Start of train, valid and test and the end of data for events from ``first`` to
    ``last``, on whole days from the end."""
    end = last.ceil("D")
    test_start = end - pd.Timedelta(days=policy.test_days)
    valid_start = test_start - pd.Timedelta(days=policy.valid_days)
    train_start = first.floor("D") + pd.Timedelta(hours=policy.warmup_hours)
    if train_start >= valid_start:
        days = (end - first.floor("D")).days
        raise ConfigError(
            f"no training window left: the data covers {days} day(s), warm-up is "
            f"{policy.warmup_hours} h, valid {policy.valid_days} d and test {policy.test_days} d; "
            "lower build_dataset.valid_days/test_days/warmup_hours or generate more days"
        )
    return {
        "train_start": train_start,
        "valid_start": valid_start,
        "test_start": test_start,
        "end": end,
    }


def split_boundaries(ts: pd.Series, policy: BuildDatasetSettings) -> dict[str, pd.Timestamp]:
    """``split_windows`` of the first and last impression time in ``ts``."""
    return split_windows(ts.min(), ts.max(), policy)


def training_set_meta(
    feature_set: FeatureSet,
    engine: str,
    bounds: Mapping[str, pd.Timestamp],
    rows: Mapping[str, int],
    clicks: Mapping[str, int],
    raw_events: int,
) -> dict[str, Any]:
    """The ``meta.json`` of a training set from its row and click counts per split.

    ``raw_events`` counts the input impressions; those not in ``rows`` were dropped
    in the warm-up window. The click rate of an empty split is NaN.
    """
    counts = {s: int(rows.get(s, 0)) for s in SPLITS}
    rates = {
        s: round(int(clicks.get(s, 0)) / counts[s], 6) if counts[s] else float("nan")
        for s in SPLITS
    }
    return {
        "feature_set": feature_set.name,
        "feature_set_fingerprint": feature_set.fingerprint,
        "feature_engine": engine,
        "features": feature_set.names,
        "rows": counts,
        "click_rate": rates,
        "windows": {k: v.isoformat() for k, v in bounds.items()},
        "raw_events": int(raw_events),
        "warmup_rows_dropped": int(raw_events - sum(counts.values())),
    }
