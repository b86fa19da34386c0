"""Bulk load of an online store from a Spark DataFrame of raw events.

The executors run the online store's own planning code: rows are checked and
deduplicated per hash bucket of ``event_id`` (``check_rows``, ``resolve_batch``), then
entity states are built per hash bucket of each entity key (``entity_states``), both
with ``groupBy(bucket).applyInPandas``; the driver streams states and seen ids into
the empty store in chunks (``OnlineStore.write_bulk``).

Details: docs/feature_store.md ("Bulk load").
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipelines.features.contracts import RAW_EVENTS
from pipelines.features.definitions import ENTITY_KEYS
from pipelines.features.online_store import (
    EMPTY_STORE,
    IngestReport,
    OnlineStore,
    check_rows,
    entity_states,
    ingest_report,
    resolve_batch,
)

if TYPE_CHECKING:  # pragma: no cover - types only; pyspark is optional at run time
    from pyspark.sql import DataFrame

_KEYS = ("user_id", "item_id", "surface", "device")
RESOLVED_SCHEMA = (
    "event_id string, user_id string, item_id string, surface string, device string, "
    "ts long, cts long, clicked int, reason string"
)
STATE_SCHEMA = "key string, state binary"
BUCKET_ROWS = 500_000  # rows per applyInPandas group (one pandas frame in a Python worker)


def _resolve_bucket(group: pd.DataFrame) -> pd.DataFrame:
    """Check and deduplicate the rows of one event-id bucket, as ``ingest`` does a batch."""
    raw = group.drop(columns=["ts_ms", "click_ms"]).assign(
        ts=pd.to_datetime(group["ts_ms"], unit="ms", utc=True),
        click_ts=pd.to_datetime(group["click_ms"], unit="ms", utc=True),
    )[list(RAW_EVENTS.columns)]
    valid, rejected = check_rows(raw, "the event log")
    b = resolve_batch(valid, EMPTY_STORE.read_seen)
    new = b.new_impr  # an empty store: every first row of an id is new
    bad = [r for r in (rejected, *b.rejected) if len(r)]
    rows = pd.concat(bad, ignore_index=True) if bad else None
    n_bad = 0 if rows is None else len(rows)

    def strings(kept: np.ndarray, column: str) -> np.ndarray:
        # One object array per column, not a concat of frames: pyspark cannot send the
        # chunked Arrow arrays that concatenated pandas 3 string columns become.
        shown = [] if rows is None else rows[column].astype(str).tolist()
        return np.concatenate([kept.astype(object), np.array(shown, dtype=object)])

    def ints(kept: np.ndarray) -> pd.arrays.IntegerArray:
        values = np.concatenate([kept.astype(np.int64), np.zeros(n_bad, np.int64)])
        return pd.arrays.IntegerArray(values, np.arange(len(values)) >= len(kept))

    out = {"event_id": strings(b.ids[new], "event_id")}
    out.update({c: strings(b.v[c].astype(str).to_numpy()[new], c) for c in _KEYS})
    out.update(ts=ints(b.ts[new]), cts=ints(b.cts[new]), clicked=ints(b.clicked[new]))
    reasons = [] if rows is None else rows["reason"].astype(str).tolist()
    out["reason"] = np.array([None] * int(new.sum()) + reasons, dtype=object)
    return pd.DataFrame(out)


def _states_of(
    sources: dict[str, tuple[str, ...]], horizon: int, watermark: int
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The ``applyInPandas`` function: encoded states of the entity keys of one bucket."""

    def one_bucket(group: pd.DataFrame) -> pd.DataFrame:
        keys: list[str] = []
        blobs: list[bytes] = []
        for entity, rows in group.groupby("entity", sort=True):
            assert isinstance(entity, str)
            states = entity_states(
                entity,
                sources[entity],
                {c: rows[c].tolist() for c in ENTITY_KEYS[entity]},
                np.ones(len(rows), bool),
                rows["clicked"].to_numpy() == 1,
                rows["ts"].to_numpy(np.int64),
                rows["cts"].to_numpy(np.int64),
                horizon,
                watermark,
            )
            for key in sorted(states):
                keys.append(key)
                blobs.append(states[key])
        return pd.DataFrame({"key": keys, "state": blobs})

    return one_bucket


def bulk_load_spark(
    store: OnlineStore,
    events: DataFrame,
    buckets: int | None = None,
    chunk_rows: int = 200_000,
    max_rejected_rows: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> IngestReport:
    """Fill the empty ``store`` from a Spark DataFrame of RawEvents rows (timestamps as TIMESTAMP).

    Writes the same states, seen ids, watermark, meta and counters as
    ``store.bulk_load`` of the same rows in pandas. ``buckets`` (default: the cores,
    or more so a bucket holds about 500k rows) sets the applyInPandas groups. At most
    ``max_rejected_rows`` rejected rows come back in the report (``report.rejected``
    counts all).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    start = time.perf_counter()
    say = progress or (lambda _: None)
    store.require_empty()
    check_rows(events.limit(0).toPandas(), "the event log")  # names missing/extra columns
    spark = events.sparkSession
    n_rows = events.count()
    if buckets is None:  # a group per core at least, at most about BUCKET_ROWS rows a group
        try:
            cores = int(spark.sparkContext.defaultParallelism)
        except Exception:  # Spark Connect has no SparkContext
            cores = int(spark.conf.get("spark.sql.shuffle.partitions") or 200)
        buckets = max(cores, n_rows // BUCKET_ROWS + 1)
    flat = events.select(
        *(F.col(c) for c in ("event_id", *_KEYS, "position", "clicked")),
        F.unix_millis("ts").alias("ts_ms"),
        F.unix_millis("click_ts").alias("click_ms"),
    )
    resolved = (
        flat.groupBy(F.pmod(F.xxhash64("event_id"), F.lit(buckets)))
        .applyInPandas(_resolve_bucket, RESOLVED_SCHEMA)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        ok = F.col("reason").isNull()
        totals = resolved.agg(
            F.count(F.when(ok, 1)).alias("new"),
            F.count(F.when(~ok, 1)).alias("rejected"),
            F.sum(F.when(ok, F.col("clicked"))).alias("clicks"),
            F.max(F.when(ok, F.col("ts"))).alias("max_ts"),
            F.max(F.when(ok & (F.col("clicked") == 1), F.col("cts"))).alias("max_cts"),
        ).first()
        assert totals is not None
        n_new, n_rejected = int(totals["new"]), int(totals["rejected"])
        watermark = max(int(totals["max_ts"] or 0), int(totals["max_cts"] or 0))
        horizon = watermark - store.retention_ms
        say(
            f"resolved {n_rows:,} row(s) in {buckets} bucket(s): {n_new:,} event(s), "
            f"{n_rejected:,} rejected, in {time.perf_counter() - start:.1f} s"
        )
        new = resolved.where(ok)
        written = {"states": 0}

        # Every entity's events in one shuffle: a bucket holds all events of its keys.
        sources = store.feature_set.entity_sources
        stacked = functools.reduce(
            lambda a, b: a.unionByName(b),
            [
                new.select(
                    F.lit(entity).alias("entity"),
                    *(
                        F.col(c)
                        if c in ENTITY_KEYS[entity]
                        else F.lit(None).cast("string").alias(c)
                        for c in _KEYS
                    ),
                    "ts",
                    "cts",
                    "clicked",
                )
                for entity in sources
            ],
        )
        states = stacked.groupBy(
            F.pmod(F.xxhash64("entity", *_KEYS), F.lit(buckets))
        ).applyInPandas(_states_of(dict(sources), horizon, watermark), STATE_SCHEMA)

        def chunks() -> Iterator[tuple[list[tuple[str, bytes]], list[tuple[str, int, int]]]]:
            part: list[tuple[str, bytes]] = []
            for row in states.toLocalIterator(prefetchPartitions=True):
                part.append((row[0], bytes(row[1])))
                if len(part) == chunk_rows:
                    written["states"] += len(part)
                    yield part, []
                    part = []
            written["states"] += len(part)
            yield part, []
            seen: list[tuple[str, int, int]] = []
            recent = new.where(F.col("ts") >= horizon).select("event_id", "ts", "clicked")
            for row in recent.toLocalIterator(prefetchPartitions=True):
                seen.append((row[0], int(row[1]), int(row[2])))
                if len(seen) == chunk_rows:
                    yield [], seen
                    seen = []
            yield [], seen

        meta = {**store.initial_meta(), "watermark_ms": str(watermark)}
        counters = {
            "batches": 1,
            "rows": n_rows,
            "impressions": n_new,
            "clicks": int(totals["clicks"] or 0),
            "duplicates": n_rows - n_new - n_rejected,
            "click_updates": 0,
            "rejected": n_rejected,
            "late": 0,
            "beyond_retention": 0,
        }
        store.write_bulk(chunks(), meta, counters, horizon, progress)
        rejected_rows = (
            resolved.where(~ok)
            .select("event_id", *_KEYS, "reason")
            .limit(max_rejected_rows)
            .toPandas()
            if n_rejected
            else pd.DataFrame(columns=["event_id", *_KEYS, "reason"])
        )
    finally:
        resolved.unpersist()
    report = ingest_report(
        counters,
        rejected_rows,
        watermark_before_ms=0,
        watermark_ms=watermark,
        entities_written=written["states"],
    )
    report.seconds = time.perf_counter() - start
    return report
