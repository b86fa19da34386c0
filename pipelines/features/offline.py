"""Offline point-in-time builder: feature rows for (entity, time) label rows from an event log.

Two engines compute the same declarations (``pipelines.features.definitions``) with the
same semantics, and tests prove them equal row by row:

Details: docs/features.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.features.definitions import (
    CONTEXT,
    CTR_V1,
    ENTITY_KEYS,
    EventIndex,
    FeatureSet,
    as_frame,
    check_times,
    to_ms,
)

ENGINES = ("duckdb", "numpy", "spark")
RANGE_JOIN_BUDGET = 4.0  # estimated joined rows per input row below which a range join wins
CONTEXT_COLUMNS = ("surface", "device")


def _ident(*parts: str | None) -> str:
    return "__".join(p or "all" for p in parts)


def _double(value: float) -> str:
    # A string literal cast parses the shortest repr exactly (a bare 0.1 would be DECIMAL).
    return f"CAST('{float(value)!r}' AS DOUBLE)"


def range_join_span(feature_set: FeatureSet, entity: str) -> int | None:
    """The longest window/TTL of an entity if all its windows are finite, else ``None``.

    Only such entities can be computed with a range join bounded to that span.
    """
    spans = []
    for f in feature_set.features:
        if f.entity != entity:
            continue
        if f.window_ms is None:
            return None
        spans += [f.window_ms, f.ttl_ms or 0]
    return max(spans) if spans else None


def point_in_time_sql(
    feature_set: FeatureSet,
    events: str = "events",
    labels: str = "labels",
    range_join: frozenset[str] | set[str] = frozenset(),
    dialect: str = "duckdb",
) -> str:
    """The SQL statement computing ``feature_set`` for relation ``labels`` from ``events``.

    ``dialect`` is ``duckdb`` or ``spark`` (Spark SQL): the statement is the same
    but for how a column name is quoted.

    ``events`` needs the key columns (any type: strings or integer codes),
    ``t`` (ms), ``clicked`` and ``ct`` (click time in ms); ``labels`` needs
    ``rid`` (row id), the key columns, ``ctx_surface``, ``ctx_device`` and ``t``.
    The result has ``rid`` and one column per feature (in no particular row order).

    Entities in ``range_join`` (only those with finite windows) are computed with
    a range join of labels and events bounded to the entity's longest window,
    counting with ``FILTER``s: fast when entities have few events per window.
    The others use window aggregates over the time-ordered stream of labels and
    events, whose cost does not depend on how many events fall in a window.
    """
    if dialect not in ("duckdb", "spark"):
        raise ValueError(f"SQL dialect must be 'duckdb' or 'spark', got {dialect!r}")
    quote = '"' if dialect == "duckdb" else "`"
    keys = list(feature_set.key_columns)
    ctx = ", ".join(f"ctx_{c}" for c in CONTEXT_COLUMNS)
    ctx_null = ", ".join(f"NULL AS ctx_{c}" for c in CONTEXT_COLUMNS)
    key_list = ", ".join(keys)
    for entity in range_join:
        if range_join_span(feature_set, entity) is None:
            raise ValueError(f"entity {entity!r} has an all-history feature: no range join")
    aggregates: dict[str, str] = {}  # window-aggregate columns over the stream
    joined: dict[str, dict[str, str]] = {e: {} for e in range_join}  # range-join columns

    def frame(entity: str, start: str) -> str:
        part = ", ".join(ENTITY_KEYS[entity])
        return f"OVER (PARTITION BY {part} ORDER BY t RANGE BETWEEN {start} AND 1 PRECEDING)"

    def count_col(entity: str, source: str, window: int | None) -> str:
        name = _ident("n", entity, source, None if window is None else str(window))
        if entity in range_join:
            joined[entity][name] = (
                f"count(*) FILTER (WHERE e.{source} = 1 AND e.t > l.t - {window}) AS {name}"
            )
            return f"coalesce({name}, 0)"
        start = "UNBOUNDED PRECEDING" if window is None else f"{window - 1} PRECEDING"
        aggregates[name] = f"coalesce(sum({source}) {frame(entity, start)}, 0) AS {name}"
        return name

    def latest_col(entity: str, source: str) -> str:
        name = _ident("last", entity, source)
        if entity in range_join:  # bounded by the longest window/TTL: all that is ever needed
            joined[entity][name] = f"max(e.t) FILTER (WHERE e.{source} = 1) AS {name}"
            return name
        aggregates[name] = (
            f"max(CASE WHEN {source} = 1 THEN t END) "
            f"{frame(entity, 'UNBOUNDED PRECEDING')} AS {name}"
        )
        return name

    fs = feature_set
    selects = []
    for f in fs.features:
        if f.agg == "context":
            expr = CONTEXT[f.name][2]
        else:
            window = f.window_ms
            counts = {s: count_col(f.entity, s, window) for s in f.sources}
            empty = " AND ".join(f"{c} = 0" for c in counts.values())
            if f.agg == "count":
                value = f"CAST({counts[f.sources[0]]} AS DOUBLE)"
            elif f.agg == "ctr":
                clicks = f"least({counts['clicks']}, {counts['impressions']})"  # CTR <= 1
                value = (
                    f"(CAST({clicks} AS DOUBLE) + "
                    f"{_double(fs.prior_strength * fs.prior_ctr)})"
                    f" / (CAST({counts['impressions']} AS DOUBLE) + {_double(fs.prior_strength)})"
                )
            else:
                value = (
                    f"CAST(t - {latest_col(f.entity, f.sources[0])} AS DOUBLE) / {_double(1000.0)}"
                )
            if f.ttl_ms is not None:
                lasts = [f"coalesce({latest_col(f.entity, s)}, -1)" for s in f.sources]
                last = lasts[0] if len(lasts) == 1 else f"greatest({', '.join(lasts)})"
                empty = f"({empty}) OR {last} < 0 OR t - {last} >= {f.ttl_ms}"
            expr = f"CASE WHEN {empty} THEN {_double(f.default)} ELSE {value} END"
        sql_type = "BIGINT" if f.dtype.startswith("int") else "DOUBLE"
        selects.append(f"CAST({expr} AS {sql_type}) AS {quote}{f.name}{quote}")

    ctes = []
    renamed = ", ".join(f"ctx_{c} AS {c}" for c in CONTEXT_COLUMNS)
    if aggregates:
        stream = (
            f"SELECT rid, {key_list}, {ctx}, t, 0 AS impressions, 0 AS clicks FROM {labels}\n"
            f"  UNION ALL SELECT NULL, {key_list}, {ctx_null}, t, 1, 0 FROM {events}\n"
            f"  UNION ALL SELECT NULL, {key_list}, {ctx_null}, ct, 0, 1 FROM {events} "
            "WHERE clicked = 1"
        )
        agg_list = ",\n    ".join(aggregates.values())
        ctes.append(f"stream AS (\n  {stream}\n)")
        ctes.append(f"agg AS (\n  SELECT rid, t, {ctx},\n    {agg_list}\n  FROM stream\n)")
        ctes.append(
            f"labelled AS (\n  SELECT rid, t, {', '.join(aggregates)}, {renamed}\n"
            "  FROM agg WHERE rid IS NOT NULL\n)"
        )
    else:
        ctes.append(f"labelled AS (\n  SELECT rid, t, {renamed} FROM {labels}\n)")
    sources = "labelled"
    if range_join:
        ctes.append(
            f"evs AS (\n  SELECT {key_list}, t, 1 AS impressions, 0 AS clicks FROM {events}\n"
            f"  UNION ALL SELECT {key_list}, ct, 0, 1 FROM {events} WHERE clicked = 1\n)"
        )
    for entity in sorted(range_join):
        span = range_join_span(fs, entity)
        on = " AND ".join(f"e.{k} = l.{k}" for k in ENTITY_KEYS[entity])
        cols = ",\n    ".join(joined[entity].values())
        ctes.append(
            f"rj_{entity} AS (\n  SELECT l.rid,\n    {cols}\n  FROM {labels} l JOIN evs e\n"
            f"    ON {on} AND e.t < l.t AND e.t > l.t - {span}\n  GROUP BY l.rid\n)"
        )
        sources += f" LEFT JOIN rj_{entity} USING (rid)"
    select_list = ",\n  ".join(selects)
    return "WITH " + ",\n".join(ctes) + f"\nSELECT rid,\n  {select_list}\nFROM {sources}"


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


def plan_range_joins(
    query: Callable[[str], list[tuple[Any, ...]]],
    feature_set: FeatureSet,
    mode: str,
    events: str = "events",
    labels: str = "labels",
) -> set[str]:
    """Entities to compute by range join: ``always``/``never``, or ``auto`` by estimated size.

    ``auto`` estimates the join size of an entity as the sum over its keys of
    labels x events x (span / time covered by the events) and takes the range
    join when that stays below ``RANGE_JOIN_BUDGET`` x (events + labels) rows:
    cheap for sparse entities (users), ruinous for popular ones (items).
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"range_join must be 'auto', 'always' or 'never', got {mode!r}")
    candidates = {
        e: span for e in feature_set.entity_sources if (span := range_join_span(feature_set, e))
    }
    if mode != "auto" or not candidates:
        return set(candidates) if mode == "always" else set()
    n_events, n_labels, lo, hi = query(
        f"SELECT (SELECT count(*) FROM {events}), (SELECT count(*) FROM {labels}), "
        f"min(t), max(t) FROM {events}"
    )[0]
    covered = max(int(hi or 0) - int(lo or 0), 1)
    chosen = set()
    for entity, span in candidates.items():
        keys = ", ".join(ENTITY_KEYS[entity])
        pairs = query(
            f"SELECT coalesce(sum(l.n * e.n), 0) FROM "
            f"(SELECT {keys}, count(*) AS n FROM {labels} GROUP BY {keys}) l JOIN "
            f"(SELECT {keys}, count(*) AS n FROM {events} GROUP BY {keys}) e USING ({keys})"
        )[0][0]
        if float(pairs) * min(1.0, span / covered) <= RANGE_JOIN_BUDGET * (n_events + n_labels):
            chosen.add(entity)
    return chosen


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
