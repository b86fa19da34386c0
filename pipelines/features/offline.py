"""Offline point-in-time builder: feature rows for (entity, time) label rows from an event log.

Three engines compute the same declarations (``pipelines.features.definitions``) with the
same semantics, and tests prove them equal row by row: numpy (``EventIndex``), DuckDB
(``sql.point_in_time_sql``) and Spark (the same SQL, ``pipelines.features.spark_engine``).

Details: docs/features.md.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.features.definitions import (
    CTR_V1,
    EventIndex,
    FeatureSet,
    as_frame,
    check_times,
    to_ms,
)
from pipelines.features.sql import (
    CONTEXT_COLUMNS,
    plan_range_joins,
    point_in_time_sql,
)

ENGINES = ("duckdb", "numpy", "spark")


def _ms_column(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp column as int64 epoch ms (nulls kept)."""
    if pa.types.is_timestamp(col.type):
        if col.type.unit != "ms":
            col = pc.cast(col, pa.timestamp("ms", tz=col.type.tz), safe=False)
        return pc.cast(col, pa.int64())
    return pc.cast(col, pa.int64())


def _as_arrow(data: Any, columns: list[str]) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        missing = [c for c in columns if c not in data.columns]
        if missing:
            raise KeyError(f"input table lacks column(s) {missing}; it has {list(data.columns)}")
        return pa.Table.from_pandas(data[columns], preserve_index=False)
    return data.select(columns)


def _duckdb_build(
    events: Any, labels: Any, feature_set: FeatureSet, threads: int | None, range_join: str
) -> pd.DataFrame:
    import duckdb

    keys = list(feature_set.key_columns)
    label_cols = keys + [c for c in CONTEXT_COLUMNS if c not in keys]
    ev = _as_arrow(events, keys + ["ts", "clicked", "click_ts"])
    lab = _as_arrow(labels, label_cols + ["ts"])
    # Integer codes for the key columns (one dictionary over labels and events):
    # sorting and partitioning on integers is several times faster than on strings.
    ev_keys, lab_keys = {}, {}
    for k in keys:
        chunks = [
            (c.dictionary_decode() if pa.types.is_dictionary(c.type) else c).cast(pa.large_string())
            for c in (*lab.column(k).chunks, *ev.column(k).chunks)
        ]
        both = pa.chunked_array(chunks, type=pa.large_string())
        codes = pc.dictionary_encode(both).combine_chunks().indices
        lab_keys[k] = codes.slice(0, lab.num_rows)
        ev_keys[k] = codes.slice(lab.num_rows)
    ev = pa.table(
        {
            **ev_keys,
            "t": _ms_column(ev.column("ts")),
            "clicked": pc.cast(ev.column("clicked"), pa.int8()),
            "ct": _ms_column(ev.column("click_ts")),
        }
    )
    lab = pa.table(
        {
            "rid": pa.array(np.arange(lab.num_rows, dtype=np.int64)),
            **lab_keys,
            **{f"ctx_{c}": lab.column(c) for c in CONTEXT_COLUMNS},
            "t": _ms_column(lab.column("ts")),
        }
    )
    con = duckdb.connect(
        config={"threads": threads or os.cpu_count() or 1, "preserve_insertion_order": False}
    )
    try:
        con.register("events", ev)
        con.register("labels", lab)
        chosen = plan_range_joins(lambda sql: con.execute(sql).fetchall(), feature_set, range_join)
        result = con.sql(point_in_time_sql(feature_set, range_join=chosen)).to_arrow_table()
    finally:
        con.close()
    # Scatter by row id rather than trusting the result order of a parallel query.
    rid = result.column("rid").to_numpy()
    out = {}
    for f in feature_set.features:
        values = np.empty(lab.num_rows, dtype=f.dtype)
        values[rid] = result.column(f.name).to_numpy()
        out[f.name] = values
    return pd.DataFrame(out)


def build_point_in_time(
    events: Any,
    labels: Any,
    feature_set: FeatureSet = CTR_V1,
    engine: str = "duckdb",
    threads: int | None = None,
    range_join: str = "auto",
) -> pd.DataFrame:
    """Feature rows for every label row from strictly earlier events.

    ``events`` has the RawEvents columns (at least the key columns, ``ts``,
    ``clicked`` and ``click_ts``); ``labels`` has ``user_id``, ``item_id``,
    ``surface``, ``device`` and ``ts`` (the query time). Either may be a pandas
    DataFrame or a pyarrow Table. Returns the declared features, one row per
    label row in label order, with the declared dtypes. ``range_join`` (DuckDB
    only) picks how windowed entities are computed: ``auto`` (by estimated
    join size), ``always`` or ``never``; the values are identical either way.
    """
    if engine not in ENGINES:
        raise ValueError(
            f"unknown feature engine {engine!r}; choose one of {ENGINES} "
            "(params.yaml features.engine)"
        )
    label_ts = to_ms(
        labels["ts"] if isinstance(labels, pd.DataFrame) else labels.column("ts").to_pandas()
    )
    check_times(label_ts, "label times (ts)")
    if engine == "numpy":
        index = EventIndex(events, feature_set)

        def col(name: str) -> Any:
            return (
                labels[name]
                if isinstance(labels, pd.DataFrame)
                else labels.column(name).to_pandas()
            )

        matrix = index.compute(
            col("user_id"), col("item_id"), col("surface"), col("device"), label_ts
        )
        return as_frame(feature_set, matrix)
    if engine == "spark":  # pyspark is optional: imported only when chosen
        from pipelines.features.spark_engine import build_point_in_time_spark

        return build_point_in_time_spark(events, labels, feature_set, range_join=range_join)
    return _duckdb_build(events, labels, feature_set, threads, range_join)


LABEL_KEYS = ("event_id", "ts", "user_id", "item_id", "surface", "device", "clicked")


def point_in_time_features(
    events: pd.DataFrame, feature_set: FeatureSet = CTR_V1, engine: str = "numpy"
) -> pd.DataFrame:
    """Features for every impression in ``events`` at its own time, from strictly earlier events.

    Returns the event keys (event_id, ts, user_id, item_id, surface, device, clicked)
    followed by the declared features, one row per impression in input order.
    ``engine`` is ``numpy`` (``EventIndex``), ``duckdb`` (generated SQL) or ``spark``
    (the same SQL on the active Spark session, ``pipelines.features.spark_engine``).
    """
    keys = events[list(LABEL_KEYS)].reset_index(drop=True)
    feats = build_point_in_time(events, keys, feature_set, engine=engine)
    return pd.concat([keys, feats[feature_set.names]], axis=1)
