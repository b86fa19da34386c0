"""One local Spark session for every Spark test in the run, and batching of small cases.

A session costs 10-50 s to start on 2 cores and each query a few seconds, so tests
share one ``local[2]`` session (UI off, 2 shuffle partitions) and put many small
hypothesis cases into one query: each case's user and item ids get a prefix of
their own, so the cases share no entity and cannot change each other's rows.
"""

from __future__ import annotations

import atexit
import functools
from typing import Any

import pandas as pd
import pytest

CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "2",
    "spark.default.parallelism": "2",
    "spark.driver.memory": "1g",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
}


@functools.cache
def local_session() -> Any:
    """The shared ``local[2]`` session (skips the test when pyspark is not installed)."""
    pytest.importorskip("pyspark", reason="pyspark missing: run `make setup-spark`")
    from pipelines.features.spark_engine import spark_session

    spark = spark_session("local[2]", CONF)
    spark.sparkContext.setLogLevel("ERROR")
    atexit.register(spark.stop)
    return spark


def namespaced(frame: pd.DataFrame, case: int) -> pd.DataFrame:
    """``frame`` with user and item ids prefixed by the case number."""
    out = frame.copy()
    for col in ("user_id", "item_id"):
        out[col] = f"c{case}_" + out[col].astype(str)
    if "event_id" in out.columns:
        out["event_id"] = f"c{case}_" + out["event_id"].astype(str)
    return out


def batch(cases: list[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events and labels of all cases in one pair of frames (labels in case order)."""
    events = [namespaced(e, k) for k, (e, _) in enumerate(cases)]
    labels = [namespaced(lab, k) for k, (_, lab) in enumerate(cases)]
    return pd.concat(events, ignore_index=True), pd.concat(labels, ignore_index=True)
