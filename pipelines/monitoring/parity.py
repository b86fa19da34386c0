"""Offline/online parity check: recompute served or stored vectors offline, compare exactly.

``parity_report`` takes feature vectors as the online path produced them,
either sampled from the online store now or read from a log of served vectors,
recomputes each one with the offline builder at the same time from the event
log, and counts mismatches per feature. Values must be *identical* (same float),
because both paths run the same feature code; any mismatch means skew: events
the store did not ingest (or ingested but the log lacks), a different feature
set, or a bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.features.definitions import to_ms
from pipelines.features.offline import build_point_in_time
from pipelines.features.online_store import OnlineStore

QUERY_COLUMNS = ("user_id", "item_id", "surface", "device")


def parse_time_ms(text: str) -> int:
    """ISO 8601 time (naive means UTC) as epoch milliseconds."""
    stamp = pd.Timestamp(text)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value // 1_000_000)


@dataclass
class ParityReport:
    """Per-feature mismatch counts between online vectors and their offline recomputation."""

    source: str  # "store" or "served log"
    n: int
    feature_set: str
    fingerprint: str
    as_of_ms: int
    mismatches: dict[str, int]
    mismatch_rate: dict[str, float]
    max_abs_diff: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"parity of {self.n:,} {self.source} vector(s), feature set {self.feature_set} "
            f"({self.fingerprint}), store watermark "
            f"{pd.Timestamp(self.as_of_ms, unit='ms', tz='UTC') if self.as_of_ms else 'none'}",
            f"{'feature':32} {'mismatches':>10} {'rate':>9} {'max |diff|':>12}",
        ]
        for name, count in self.mismatches.items():
            lines.append(
                f"{name:32} {count:>10,} {self.mismatch_rate[name]:>9.4%} "
                f"{self.max_abs_diff[name]:>12.6g}"
            )
        total = sum(self.mismatches.values())
        lines.append(
            "all features identical"
            if total == 0
            else f"{total:,} mismatching value(s); first: {self.examples[:3]}"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _compare(
    online: pd.DataFrame,
    offline: pd.DataFrame,
    queries: pd.DataFrame,
    source: str,
    store: OnlineStore,
    as_of_ms: int,
) -> ParityReport:
    fs = store.feature_set
    mismatches, rates, diffs = {}, {}, {}
    examples: list[dict[str, Any]] = []
    n = len(queries)
    for name in fs.names:
        a = online[name].to_numpy(np.float64)
        b = offline[name].to_numpy(np.float64)
        bad = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        mismatches[name] = int(bad.sum())
        rates[name] = float(bad.mean()) if n else 0.0
        diffs[name] = float(np.nanmax(np.abs(a - b), initial=0.0)) if n else 0.0
        for i in np.flatnonzero(bad)[:2]:
            examples.append(
                {
                    "feature": name,
                    **{c: str(queries[c].iloc[i]) for c in queries.columns},
                    "online": float(a[i]),
                    "offline": float(b[i]),
                }
            )
    return ParityReport(
        source, n, fs.name, fs.fingerprint, as_of_ms, mismatches, rates, diffs, examples
    )


def _events_as_of(events: pd.DataFrame, as_of_ms: int) -> pd.DataFrame:
    """The event log as a store with watermark ``as_of_ms`` held it: later times not yet seen."""
    ts = to_ms(events["ts"])
    kept = events[ts <= as_of_ms].copy()
    clicked = kept["clicked"].to_numpy() == 1
    late_click = clicked & (to_ms(kept["click_ts"].fillna(kept["ts"])) > as_of_ms)
    kept.loc[late_click, "clicked"] = 0
    kept.loc[late_click, "click_ts"] = pd.NaT
    return kept


def _offline_as_of(
    events: pd.DataFrame, queries: pd.DataFrame, as_of: np.ndarray, fs: Any, engine: str
) -> pd.DataFrame:
    """Offline rows at each query's time over the events up to the vector's as-of time.

    A served vector is current as of the store watermark when it was served; events with
    later times that arrived afterwards were not in it, by definition of freshness, so the
    recomputation leaves them out too (one offline build per distinct as-of time).
    """
    last = int(
        max(
            to_ms(events["ts"]).max(initial=0),
            to_ms(events["click_ts"].dropna()).max(initial=0),
        )
    )
    parts = []
    for value in np.unique(as_of):
        idx = np.flatnonzero(as_of == value)
        log = events if value >= last else _events_as_of(events, int(value))
        part = build_point_in_time(log, queries.iloc[idx], fs, engine=engine)
        parts.append(part.set_axis(idx))
    return pd.concat(parts).sort_index().reset_index(drop=True)


def served_from_request_log(log_dir: Path) -> pd.DataFrame:
    """Served vectors from the service's request log, for ``parity_report(served=...)``.

    One row per answered request whose features came from the configured source
    (rows answered without features, or from the snapshot while the online store was
    down, are left out): the query columns, ``ts`` (the request time), ``as_of_ms``
    (request time minus the reported feature age) and the feature columns.
    """
    from pipelines.serving.request_log import read_shards

    log = read_shards(log_dir)
    if log.empty:
        raise ValueError(f"no answered requests in the request log {log_dir}")
    fallback = log["degraded_reason"].fillna("").str.contains("online store unavailable")
    log = log[log["features"].notna() & ~fallback].reset_index(drop=True)
    if log.empty:
        raise ValueError(f"no request in {log_dir} was served with store features")
    ts = pd.to_datetime(log["request_time"], utc=True)
    age_ms = (log["feature_age_seconds"].astype(float) * 1000).round().astype(np.int64)
    out = pd.DataFrame(
        {
            "user_id": log["user"].astype(str),
            "item_id": log["item"].astype(str),
            "surface": log["surface"].astype(str),
            "device": log["device"].astype(str),
            "ts": ts,
            "as_of_ms": to_ms(ts) - age_ms.to_numpy(),
        }
    )
    return pd.concat([out, pd.DataFrame(list(log["features"]))], axis=1)


def load_served(path: Path) -> pd.DataFrame:
    """Served vectors from a request-log folder (``requests-*.jsonl``) or a parquet/jsonl file."""
    if path.is_dir() and any(path.glob("requests-*.jsonl")):
        return served_from_request_log(path)
    from pipelines.features.online_store import read_events_file

    return read_events_file(path)


def parity_report(
    store: OnlineStore,
    events: pd.DataFrame,
    served: pd.DataFrame | None = None,
    sample: int = 1000,
    at: str | int | None = None,
    seed: int = 0,
    engine: str = "numpy",
) -> ParityReport:
    """Compare online vectors with offline recomputation from ``events``.

    Without ``served``: sample ``sample`` (user, item, surface, device) rows of
    the event log (plus unseen combinations), look them up in the store at time
    ``at`` (default: one ms after the watermark, so every ingested event is
    visible) and recompute offline at that time. With ``served``: each row is a
    vector the service returned at ``ts``; recompute it offline at ``ts``.
    """
    fs = store.feature_set
    if served is not None:
        missing = [c for c in (*QUERY_COLUMNS, "ts", *fs.names) if c not in served.columns]
        if missing:
            raise ValueError(
                f"served vectors lack column(s) {missing}; a served log needs "
                f"{[*QUERY_COLUMNS, 'ts']} plus the feature columns {fs.names}"
            )
        rows = (
            served.sample(min(sample, len(served)), random_state=seed)
            if len(served) > sample
            else served
        )
        rows = rows.reset_index(drop=True)
        queries = rows[list(QUERY_COLUMNS)].assign(ts=rows["ts"])
        if "as_of_ms" in rows.columns:
            offline = _offline_as_of(
                events, queries, rows["as_of_ms"].to_numpy(np.int64), fs, engine
            )
        else:
            offline = build_point_in_time(events, queries, fs, engine=engine)
        as_of = int(store.stats()["watermark_ms"])
        return _compare(rows[fs.names], offline, queries, "served log", store, as_of)
    rng = np.random.default_rng(seed)
    picks = events.iloc[rng.integers(0, len(events), size=sample)] if len(events) else events
    queries = picks[list(QUERY_COLUMNS)].reset_index(drop=True).astype(str)
    if len(queries) > 4:  # recombine keys: pairs never seen together exercise empty histories
        queries["item_id"] = queries["item_id"].to_numpy()[rng.permutation(len(queries))]
    watermark = int(store.stats()["watermark_ms"])
    t = parse_time_ms(at) if isinstance(at, str) else (watermark + 1 if at is None else int(at))
    t_ms = np.full(len(queries), t, np.int64)
    result = store.lookup_many(
        queries["user_id"].tolist(),
        queries["item_id"].tolist(),
        queries["surface"].tolist(),
        queries["device"].tolist(),
        t_ms,
    )
    labels = queries.assign(ts=pd.to_datetime(t_ms, unit="ms", utc=True))
    offline = build_point_in_time(events, labels, fs, engine=engine)
    return _compare(
        result.features,
        offline,
        queries.assign(t_ms=to_ms(labels["ts"])),
        "store",
        store,
        result.as_of_ms,
    )
