"""The point-in-time SQL generated from the feature declarations (DuckDB and Spark SQL).

One statement serves the DuckDB engine (``offline``) and the Spark engine
(``spark_engine``); ``plan_range_joins`` picks per entity between window aggregates
and a bounded range join. Details: docs/feature_store.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.features.definitions import CONTEXT, ENTITY_KEYS, FeatureSet

CONTEXT_COLUMNS = ("surface", "device")
RANGE_JOIN_BUDGET = 4.0  # estimated joined rows per input row below which a range join wins


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

    ``dialect`` is ``duckdb`` or ``spark`` (Spark SQL). The statements differ in how a
    column name is quoted and in windowed counts of window-aggregate entities: DuckDB
    counts over a sliding ``RANGE`` frame; Spark, which re-aggregates a sliding frame's
    whole buffer each time it moves, subtracts a running count of exits (each event
    again at ``t + window - 1``) from the running count of events.

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
    exits: dict[tuple[str, int], str] = {}  # (source, window) -> exit column (spark)
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
        if window is not None and dialect == "spark":
            # Spark re-aggregates a sliding frame's whole buffer whenever it moves (rows x
            # events per window: quadratic for hot keys). A windowed count is the running
            # count of events minus the running count of their exits at t + window - 1.
            leaving = exits.setdefault((source, window), _ident("x", source, str(window)))
            run = frame(entity, "UNBOUNDED PRECEDING")
            aggregates[name] = (
                f"coalesce(sum({source}) {run}, 0) - coalesce(sum({leaving}) {run}, 0) AS {name}"
            )
            return name
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
        names = "".join(f", 0 AS {x}" for x in exits.values())
        zeros = ", 0" * len(exits)
        stream = (
            f"SELECT rid, {key_list}, {ctx}, t, 0 AS impressions, 0 AS clicks{names} "
            f"FROM {labels}\n"
            f"  UNION ALL SELECT NULL, {key_list}, {ctx_null}, t, 1, 0{zeros} FROM {events}\n"
            f"  UNION ALL SELECT NULL, {key_list}, {ctx_null}, ct, 0, 1{zeros} FROM {events} "
            "WHERE clicked = 1"
        )
        for (source, window), x in exits.items():
            flags = "".join(", 1" if other == x else ", 0" for other in exits.values())
            time, where = ("ct", " WHERE clicked = 1") if source == "clicks" else ("t", "")
            stream += (
                f"\n  UNION ALL SELECT NULL, {key_list}, {ctx_null}, {time} + {window - 1}, 0, 0"
                f"{flags} FROM {events}{where}"
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
