"""The ``build_dataset`` training set built on Spark, from parquet events at any Hadoop path.

``build_dataset_spark`` checks the RawEvents contract with aggregates, computes the
features with the Spark engine, places the stage's time split and writes parquet
partitioned by ``split`` and ``day`` plus ``_meta.json``; the previous output is
replaced only once the new one is complete. ``read_split`` reads one split back as
the stage's table. Details: docs/feature_store.md ("Scaling out").
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.core.domain import DEVICES, SURFACES
from pipelines.core.io import json_text
from pipelines.core.settings import BuildDatasetSettings
from pipelines.features.contracts import RAW_EVENTS, SPLITS, ContractViolation
from pipelines.features.definitions import EPOCH_MS, STRIDE, FeatureSet
from pipelines.features.offline import LABEL_KEYS
from pipelines.features.spark_engine import events_frame, point_in_time_frame
from pipelines.features.splits import split_windows, training_set_meta
from pipelines.features.sql import CONTEXT_COLUMNS

if TYPE_CHECKING:  # pragma: no cover - types only; pyspark is optional at run time
    from pyspark.sql import Column, DataFrame, SparkSession

PARTITIONS = ("split", "day")
META_FILE = "_meta.json"  # "_" keeps it out of what Spark and pyarrow read as data
DAY_MS = 86_400_000
_STRINGS = ("event_id", "user_id", "item_id", "surface", "device")
_TIMES = ("ts", "click_ts")
_OUTPUT_TS = "spark.sql.parquet.outputTimestampType"


class EventsInputError(ValueError):
    """The events path matches nothing, holds no rows, or the output would overwrite it."""


class _Hadoop:
    """The Hadoop FileSystem calls the build needs (through the session's JVM gateway)."""

    def __init__(self, spark: SparkSession):
        jvm, jsc = getattr(spark, "_jvm", None), getattr(spark, "_jsc", None)
        if jvm is None or jsc is None:
            raise EventsInputError(
                "the Spark dataset build moves its output with the Hadoop FileSystem API, which "
                "a Spark Connect session (sc://) does not expose; use a cluster master URL "
                "(spark://, yarn, k8s://) or local[*]"
            )
        self._path = jvm.org.apache.hadoop.fs.Path
        self._conf = jsc.hadoopConfiguration()

    def path(self, text: str) -> Any:
        return self._path(text)

    def fs(self, path: Any) -> Any:
        return path.getFileSystem(self._conf)

    def qualified(self, text: str) -> str:
        path = self.path(text)
        return str(self.fs(path).makeQualified(path).toString()).rstrip("/")

    def matches(self, pattern: str) -> bool:
        """Whether a path or glob names at least one file or folder."""
        path = self.path(pattern)
        found = self.fs(path).globStatus(path)
        return found is not None and len(found) > 0

    def sibling(self, text: str, kind: str) -> Any:
        """A hidden, unique sibling of ``text`` (readers of the parent folder skip it)."""
        path = self.path(text)
        parent = path.getParent()
        if parent is None:
            raise EventsInputError(f"the output {text} has no parent folder; name a folder")
        return self._path(parent, f".{path.getName()}.{kind}-{uuid.uuid4().hex[:12]}")

    def write_text(self, path: Any, text: str) -> None:
        stream = self.fs(path).create(path, True)
        try:
            stream.write(bytearray(text.encode()))
        finally:
            stream.close()

    def delete(self, path: Any) -> None:
        try:
            self.fs(path).delete(path, True)
        except Exception:  # best effort: a leftover hidden folder is harmless
            pass

    def replace(self, tmp: Any, out: str) -> None:
        """Move ``tmp`` to ``out``, the previous ``out`` kept until the move succeeded.

        Hadoop has no atomic replace of a folder: the old one is renamed aside, the new
        one renamed in and the old one deleted (on HDFS and local disks renames are
        atomic; on object stores such as s3a a rename is a copy).
        """
        target = self.path(out)
        fs = self.fs(target)
        old = None
        if fs.exists(target):
            old = self.sibling(out, "old")
            if not fs.rename(target, old):
                raise OSError(f"could not move the previous output {out} aside to {old}")
        if not fs.rename(tmp, target):
            if old is not None:
                fs.rename(old, target)
            raise OSError(f"could not move the new output {tmp} to {out}")
        if old is not None:
            self.delete(old)


def _type_problems(raw: DataFrame) -> list[tuple[str, str, str]]:
    """(column, check, what) for missing, unexpected and unusable columns: schema only."""
    from pyspark.sql import types as T

    usable: dict[str, tuple[tuple[type, ...], str]] = {
        **{c: ((T.StringType,), "a string") for c in _STRINGS},
        **{c: ((T.TimestampType, T.TimestampNTZType), "a timestamp") for c in _TIMES},
        "position": ((T.IntegralType,), "an integer"),
        "clicked": ((T.IntegralType, T.BooleanType), "an integer 0/1 or a boolean"),
    }
    types = {f.name: f.dataType for f in raw.schema.fields}
    problems = []
    for name in RAW_EVENTS.columns:
        if name not in types:
            problems.append((name, "column_in_dataframe", "missing"))
        elif not isinstance(types[name], usable[name][0]):
            what = f"is {types[name].simpleString()}, needs {usable[name][1]}"
            problems.append((name, "dtype", what))
    problems += [
        (name, "column_in_schema", "unexpected (the contract is strict)")
        for name in types
        if name not in RAW_EVENTS.columns
    ]
    return problems


def _normalized(raw: DataFrame) -> DataFrame:
    """The raw columns with UTC ``TIMESTAMP`` times (naive ones read as UTC, as the
    pandas contract does) plus ``t`` and ``click_t`` in epoch ms."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    tz = raw.sparkSession.conf.get("spark.sql.session.timeZone") or "UTC"
    types = {f.name: f.dataType for f in raw.schema.fields}
    times = {}
    for name in _TIMES:
        col = F.col(name)
        if isinstance(types[name], T.TimestampNTZType):
            col = F.convert_timezone(F.lit("UTC"), F.lit(tz), col).cast("timestamp")
        times[name] = col
    return raw.select(
        *_STRINGS,
        "position",
        "clicked",
        times["ts"].alias("ts"),
        times["click_ts"].alias("click_ts"),
        F.unix_millis(times["ts"]).alias("t"),
        F.unix_millis(times["click_ts"]).alias("click_t"),
    )


def _row_checks(events: DataFrame) -> list[tuple[str, str, Column]]:
    """(column, check, condition of a violating row), the RawEvents rules in Spark."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    clicked_bool = isinstance(events.schema["clicked"].dataType, T.BooleanType)
    is_click = F.col("clicked") if clicked_bool else F.col("clicked") == 1
    lo, hi = EPOCH_MS, EPOCH_MS + STRIDE  # what definitions.check_times accepts
    checks = [
        (c, "not_nullable", F.col(c).isNull()) for c in (*_STRINGS, "ts", "position", "clicked")
    ]
    checks += [(c, "str_length(min_value=1)", F.length(c) == 0) for c in _STRINGS[:3]]
    checks += [
        ("surface", f"isin({list(SURFACES)})", ~F.col("surface").isin(*SURFACES)),
        ("device", f"isin({list(DEVICES)})", ~F.col("device").isin(*DEVICES)),
        ("position", "in_range(1, 100)", ~F.col("position").between(1, 100)),
        ("ts", "between 2020-01-01 and 2054-11-04", (F.col("t") < lo) | (F.col("t") >= hi)),
        (
            "click_ts",
            "set exactly when clicked == 1",
            F.col("click_ts").isNull() == is_click,
        ),
        (
            "click_ts",
            "later than ts",
            is_click & F.col("click_ts").isNotNull() & (F.col("click_t") <= F.col("t")),
        ),
        (
            "click_ts",
            "between 2020-01-01 and 2054-11-04",
            is_click & ((F.col("click_t") < lo) | (F.col("click_t") >= hi)),
        ),
    ]
    if not clicked_bool:
        checks.append(("clicked", "isin([0, 1])", ~F.col("clicked").isin(0, 1)))
    return checks


def _violation(
    where: str, n_rows: int | None, found: list[tuple[str, str, int, str]], out_path: str
) -> ContractViolation:
    checked = "its columns checked" if n_rows is None else f"{n_rows:,} rows checked"
    lines = [f"Contract RawEvents violated by {where} ({checked}):"]
    for column, check, count, example in found:
        if check in ("column_in_dataframe", "column_in_schema", "dtype"):
            lines.append(f"  - column '{column}': {example}")
        else:
            lines.append(
                f"  - column '{column}': check {check} failed {count:,} time(s); e.g. {example}"
            )
    lines.append(
        "What to do: fix these rows or columns at their source (or the contract in "
        "pipelines/features/contracts.py if the rule itself is wrong) and rerun; "
        f"the output at {out_path} was left untouched."
    )
    cases = pd.DataFrame(found, columns=["column", "check", "count", "failure_case"])
    return ContractViolation("RawEvents", where, "\n".join(lines), cases)


def check_raw_events(raw: DataFrame, where: str, out_path: str = "the output") -> dict[str, int]:
    """Check ``raw`` against the RawEvents contract on Spark; its row count and time span.

    One aggregate pass (plus one small query naming a duplicated ``event_id`` when
    there is one); nothing but counts and one example row per failed check reaches the
    driver. Raises ``ContractViolation`` naming each failed check with its count and
    an example, or ``EventsInputError`` when there are no rows.
    """
    from pyspark.sql import functions as F

    problems = _type_problems(raw)
    if problems:
        raise _violation(where, None, [(c, k, 0, w) for c, k, w in problems], out_path)
    events = _normalized(raw)
    checks = _row_checks(events)
    example = F.to_json(F.struct(*RAW_EVENTS.columns))
    aggs = [F.count(F.lit(1)).alias("n"), F.min("t").alias("lo"), F.max("t").alias("hi")]
    aggs.append((F.count("event_id") - F.count_distinct("event_id")).alias("dup"))
    for k, (_, _, bad) in enumerate(checks):
        aggs += [
            F.count(F.when(bad, 1)).alias(f"n{k}"),
            F.min(F.when(bad, example)).alias(f"e{k}"),
        ]
    row = events.agg(*aggs).first()
    assert row is not None
    n_rows = int(row["n"])
    if n_rows == 0:
        raise EventsInputError(f"{where} holds no event rows; point the events path at raw events")
    found = [
        (column, check, int(row[f"n{k}"]), str(row[f"e{k}"]))
        for k, (column, check, _) in enumerate(checks)
        if row[f"n{k}"]
    ]
    if row["dup"]:
        dup = raw.groupBy("event_id").count().where("count > 1").orderBy("event_id").first()
        assert dup is not None
        shown = f"{dup['event_id']!r} appears {dup['count']} times"
        found.append(("event_id", "field_uniqueness", int(row["dup"]), shown))
    if found:
        raise _violation(where, n_rows, sorted(found, key=lambda f: f[:2]), out_path)
    return {"rows": n_rows, "first_ms": int(row["lo"]), "last_ms": int(row["hi"])}


def training_frame(
    spark: SparkSession,
    events: DataFrame,
    feature_set: FeatureSet,
    bounds: dict[str, pd.Timestamp],
    range_join: str = "auto",
) -> DataFrame:
    """The lazy training set of checked ``events`` (``_normalized``): the stage's columns,
    every impression from ``train_start`` on, with ``split`` and ``day`` (UTC date)."""
    from pyspark.sql import functions as F

    ms = {k: int(v.value // 1_000_000) for k, v in bounds.items()}
    kept = events.where(F.col("t") >= ms["train_start"])
    keys = [k for k in ("user_id", "item_id", "surface", "device") if k in feature_set.key_columns]
    labels = kept.select(
        F.col("event_id").alias("rid"),
        *keys,
        *(F.col(c).alias(f"ctx_{c}") for c in CONTEXT_COLUMNS),
        "t",
    )
    features = point_in_time_frame(spark, events_frame(events), labels, feature_set, range_join)
    columns = {
        "event_id": F.col("event_id"),
        "ts": F.timestamp_millis("t"),
        **{k: F.col(k) for k in ("user_id", "item_id", "surface", "device")},
        "clicked": F.col("clicked").cast("bigint"),
    }
    assert list(columns) == list(LABEL_KEYS)  # the stage's key columns, in its order
    split = (
        F.when(F.col("t") >= ms["test_start"], "test")
        .when(F.col("t") >= ms["valid_start"], "valid")
        .otherwise("train")
    )
    # A left join: a label row the query lost shows as null features (build_dataset_spark
    # stops on those) instead of silently going missing.
    return kept.join(features, kept["event_id"] == features["rid"], "left").select(
        *(c.alias(name) for name, c in columns.items()),
        *feature_set.names,
        split.alias("split"),
        F.date_from_unix_date(F.expr(f"int(t div {DAY_MS})")).alias("day"),
    )


def build_dataset_spark(
    spark: SparkSession,
    events_path: str,
    out_path: str,
    feature_set: FeatureSet,
    policy: BuildDatasetSettings,
    range_join: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build the ``build_dataset`` training set on Spark into ``out_path``.

    Reads parquet at ``events_path`` (a Hadoop path or glob: ``file:``, ``hdfs://``,
    ``s3a://``), checks the RawEvents contract, writes ``out_path/split=S/day=D/*.parquet``
    and ``out_path/_meta.json`` (the keys of the stage's ``meta.json``) to a hidden
    sibling and then moves it into place, so a failed run leaves the previous output
    as it was. Each split read back with ``read_split`` equals the stage's table for
    the same events. Returns ``path``, ``meta`` and the ``days`` written per split.
    """
    from pyspark.sql import functions as F

    say = progress or (lambda _: None)
    hadoop = _Hadoop(spark)
    if not hadoop.matches(events_path):
        raise EventsInputError(
            f"no events at {events_path}: the path matches no file or folder; "
            "name a parquet file, folder or glob of raw events"
        )
    source, target = hadoop.qualified(events_path), hadoop.qualified(out_path)
    if target == source or source.startswith(target + "/") or target.startswith(source + "/"):
        raise EventsInputError(
            f"the output {out_path} is, holds or lies inside the events {events_path}; "
            "replacing it would delete the input. Write the dataset elsewhere"
        )
    say(f"checking the events at {events_path} against the RawEvents contract")
    raw = spark.read.parquet(events_path)
    span = check_raw_events(raw, events_path, out_path)
    first, last = (pd.Timestamp(span[k], unit="ms", tz="UTC") for k in ("first_ms", "last_ms"))
    bounds = split_windows(first, last, policy)
    say(
        f"{span['rows']:,} events from {first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S} "
        f"passed; train from "
        f"{bounds['train_start']:%Y-%m-%d %H:%M}, valid from {bounds['valid_start']:%Y-%m-%d}, "
        f"test from {bounds['test_start']:%Y-%m-%d}"
    )
    table = training_frame(spark, _normalized(raw), feature_set, bounds, range_join)
    tmp = hadoop.sibling(out_path, "tmp")
    try:
        say(f"computing {len(feature_set.names)} features ({feature_set.name}) and writing")
        previous = spark.conf.get(_OUTPUT_TS)
        spark.conf.set(_OUTPUT_TS, "TIMESTAMP_MILLIS")  # read back as the stage's ms times
        try:
            table.write.partitionBy(*PARTITIONS).parquet(str(tmp.toString()))
        finally:
            if previous is None:
                spark.conf.unset(_OUTPUT_TS)
            else:
                spark.conf.set(_OUTPUT_TS, previous)
        written = spark.read.parquet(str(tmp.toString()))
        lost = functools.reduce(lambda a, b: a | b, [F.isnull(f) for f in feature_set.names])
        per_day = (
            written.groupBy(*PARTITIONS)
            .agg(
                F.count(F.lit(1)).alias("rows"),
                F.sum("clicked").alias("clicks"),
                F.count(F.when(lost, 1)).alias("lost"),
            )
            .collect()
        )
        if any(r["lost"] for r in per_day):  # a guard, as build_point_in_time_spark has
            n_lost = sum(int(r["lost"]) for r in per_day)
            raise RuntimeError(f"Spark returned no features for {n_lost:,} row(s)")
        rows = {s: sum(int(r["rows"]) for r in per_day if r["split"] == s) for s in SPLITS}
        clicks = {s: sum(int(r["clicks"]) for r in per_day if r["split"] == s) for s in SPLITS}
        meta = training_set_meta(feature_set, "spark", bounds, rows, clicks, span["rows"])
        hadoop.write_text(hadoop.path(f"{tmp.toString()}/{META_FILE}"), json_text(meta))
        hadoop.replace(tmp, out_path)
    except BaseException:
        hadoop.delete(tmp)
        raise
    days = {s: sorted(str(r["day"]) for r in per_day if r["split"] == s) for s in SPLITS}
    say(f"wrote {sum(rows.values()):,} rows to {out_path}")
    return {"path": out_path, "meta": meta, "days": days}


def read_split(out_path: str | Path, split: str) -> pd.DataFrame:
    """One split of a ``build_dataset_spark`` output as the stage's table (pandas + pyarrow).

    The partition columns (which pyarrow returns as categories) are dropped and rows
    sorted by ``ts`` and ``event_id``, the stage's order: the frame equals
    ``build_training_set``'s rows of that split, columns, values and dtypes.
    """
    frame = pd.read_parquet(str(out_path), filters=[("split", "==", split)])
    frame = frame.drop(columns=list(PARTITIONS))
    return frame.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
