"""The Spark engine (``features.engine: spark``): the point-in-time SQL run on Apache Spark.

The same statement the DuckDB engine runs (``sql.point_in_time_sql``, generated
from the feature declarations) runs here as Spark SQL over entity-partitioned window
aggregates, so one cluster computes what one process cannot hold. pyspark is an
optional extra (``make setup-spark``) and is imported only when this engine is used.

Details: docs/feature_store.md ("Scaling out").
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.features.definitions import CTR_V1, FeatureSet, check_times, to_ms
from pipelines.features.sql import CONTEXT_COLUMNS, plan_range_joins, point_in_time_sql

if TYPE_CHECKING:  # pragma: no cover - types only; pyspark is optional at run time
    from pyspark.sql import DataFrame, SparkSession

DEFAULT_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",  # coalesces small shuffles, splits skewed joins
}


class SparkUnavailableError(RuntimeError):
    """The Spark engine was chosen but pyspark (or Java) is not installed."""


def require_pyspark() -> Any:
    """Import pyspark, or say how to install it."""
    try:
        import pyspark
    except ImportError:
        raise SparkUnavailableError(
            "features.engine is 'spark' but pyspark is not installed; run `make setup-spark` "
            "(installs requirements-spark.lock into .venv; Java 17 must be on the system) or "
            "choose features.engine numpy or duckdb in params.yaml"
        ) from None
    return pyspark


def local_cores(master: str) -> int:
    """Cores of a ``local``, ``local[N]``, ``local[*]`` or ``local[N,F]`` master."""
    inside = master.partition("[")[2].partition("]")[0].split(",")[0].strip()
    if inside in ("", "*"):
        return os.cpu_count() or 1
    return max(int(inside), 1)


def spark_session(master: str = "local[*]", conf: Mapping[str, str] | None = None) -> SparkSession:
    """The active Spark session, else a new one on ``master``.

    ``master`` is any Spark master URL (``local[*]``, ``spark://host:7077``, ``yarn``,
    ``k8s://...``) or a Spark Connect URL (``sc://host:15002``), passed unchanged. On a
    ``local`` master the shuffle has 4 partitions per core unless ``conf`` says otherwise
    (Spark's 200 cost a task start each: half of a 1M-event build on 2 cores). A
    ``local`` master runs Python workers (``spark_profile``) with this interpreter unless
    ``PYSPARK_PYTHON`` names another: Spark's default, ``python3`` on the PATH, may lack
    the project's packages.
    """
    require_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName("mlops-features")
    builder = builder.remote(master) if master.startswith("sc://") else builder.master(master)
    if master.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        os.environ["PYSPARK_PYTHON"] = sys.executable  # read by pyspark when the context starts
    local = (
        {"spark.sql.shuffle.partitions": str(4 * local_cores(master))}
        if master.startswith("local")
        else {}
    )
    for key, value in {**DEFAULT_CONF, **local, **(conf or {})}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def events_frame(events: DataFrame) -> DataFrame:
    """Raw events (RawEvents columns, timestamps as Spark TIMESTAMP) as the engine's input.

    Columns: the key columns, ``t`` and ``ct`` (impression and click time, epoch ms)
    and ``clicked``. ``unix_millis`` counts from the epoch, so the session time zone
    does not matter.
    """
    from pyspark.sql import functions as F

    return events.select(
        "user_id",
        "item_id",
        "surface",
        "device",
        F.unix_millis("ts").alias("t"),
        F.col("clicked").cast("int").alias("clicked"),
        F.unix_millis("click_ts").alias("ct"),
    )


def point_in_time_frame(
    spark: SparkSession,
    events: DataFrame,
    labels: DataFrame,
    feature_set: FeatureSet = CTR_V1,
    range_join: str = "auto",
) -> DataFrame:
    """The lazy Spark DataFrame of ``rid`` plus one column per feature for every label row.

    ``events`` has the key columns, ``t``, ``clicked`` and ``ct`` (``events_frame``);
    ``labels`` has ``rid`` (any unique id), the key columns, ``ctx_surface``,
    ``ctx_device`` and ``t``. ``range_join`` plans windowed entities as in the DuckDB
    engine (``auto`` by estimated join size, ``always``, ``never``).
    """
    tag = uuid.uuid4().hex[:12]
    ev_name, lab_name = f"pit_events_{tag}", f"pit_labels_{tag}"
    events.createOrReplaceTempView(ev_name)
    labels.createOrReplaceTempView(lab_name)

    def query(sql: str) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in spark.sql(sql).collect()]

    chosen = plan_range_joins(query, feature_set, range_join, events=ev_name, labels=lab_name)
    sql = point_in_time_sql(feature_set, ev_name, lab_name, chosen, dialect="spark")
    return spark.sql(sql)


def _strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    chunks = [
        (c.dictionary_decode() if pa.types.is_dictionary(c.type) else c).cast(pa.string())
        for c in column.chunks
    ]
    return pa.chunked_array(chunks, type=pa.string())


def _table(data: Any, columns: list[str]) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        missing = [c for c in columns if c not in data.columns]
        if missing:
            raise KeyError(f"input table lacks column(s) {missing}; it has {list(data.columns)}")
        return pa.Table.from_pandas(data[columns], preserve_index=False)
    return data.select(columns)


_DDL = {pa.string(): "STRING", pa.int64(): "BIGINT", pa.int32(): "INT"}


def _spark_frame(spark: SparkSession, table: pa.Table) -> DataFrame:
    """A Spark DataFrame from an Arrow table with an explicit schema (empty tables too).

    Columns are combined into one chunk each first: pyspark 4.3 keeps only the first
    row batch of a table whose columns are chunked differently (pandas 3 strings are
    Arrow-backed, so a concatenated frame has one chunk per part).
    """
    table = table.combine_chunks()
    schema = ", ".join(f"`{f.name}` {_DDL[f.type]}" for f in table.schema)
    return spark.createDataFrame(table, schema=schema)


def build_point_in_time_spark(
    events: Any,
    labels: Any,
    feature_set: FeatureSet = CTR_V1,
    spark: SparkSession | None = None,
    range_join: str = "auto",
) -> pd.DataFrame:
    """``offline.build_point_in_time`` on Spark for in-memory inputs (pandas or pyarrow).

    Times are converted to epoch ms exactly as the numpy engine does; the result is
    one row per label row in label order with the declared dtypes.
    """
    spark = spark or spark_session()
    keys = ["user_id", "item_id", "surface", "device"]
    ev = _table(events, keys + ["ts", "clicked", "click_ts"])
    lab = _table(labels, keys + ["ts"])
    ts = to_ms(ev.column("ts").to_pandas())
    clicked = np.asarray(ev.column("clicked").to_pandas()) == 1
    ct = to_ms(ev.column("click_ts").to_pandas().where(clicked))  # NaT where not clicked
    check_times(ts, "impression times (ts)")
    check_times(ct[clicked], "click times (click_ts)")
    ev_arrow = pa.table(
        {
            **{k: _strings(ev.column(k)) for k in keys},
            "t": pa.array(ts, pa.int64()),
            "clicked": pa.array(clicked.astype(np.int32)),
            "ct": pa.array(ct, pa.int64(), mask=~clicked),
        }
    )
    lab_arrow = pa.table(
        {
            "rid": pa.array(np.arange(lab.num_rows, dtype=np.int64)),
            **{k: _strings(lab.column(k)) for k in keys if k in feature_set.key_columns},
            **{f"ctx_{c}": _strings(lab.column(c)) for c in CONTEXT_COLUMNS},
            "t": pa.array(to_ms(lab.column("ts").to_pandas()), pa.int64()),
        }
    )
    ev_frame, lab_frame = _spark_frame(spark, ev_arrow), _spark_frame(spark, lab_arrow)
    result = point_in_time_frame(spark, ev_frame, lab_frame, feature_set, range_join).toArrow()
    if result.num_rows != lab.num_rows:  # a guard: every label row must come back once
        raise RuntimeError(f"Spark returned {result.num_rows} rows for {lab.num_rows} labels")
    # Scatter by row id: a distributed query returns rows in no particular order.
    rid = result.column("rid").to_numpy()
    out = {}
    for f in feature_set.features:
        values = np.empty(lab.num_rows, dtype=f.dtype)
        values[rid] = result.column(f.name).to_numpy()
        out[f.name] = values
    return pd.DataFrame(out)
