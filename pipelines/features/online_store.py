"""Online feature store: incremental materialization, bulk load, fresh lookups; one feature code.

Details: docs/feature_store.md.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pandera.errors import SchemaErrors

from pipelines.core.settings import Settings
from pipelines.features.contracts import RAW_EVENTS, ContractViolation, validate
from pipelines.features.definitions import (
    ENTITY_KEYS,
    EPOCH_MS,
    FEATURE_SETS,
    STRIDE,
    FeatureSet,
    Histories,
    as_frame,
    evaluate,
    to_ms,
)

SEP = "\x1f"  # separates the values of a composite entity key
FORMAT = 1  # version of the state encoding
COUNTERS = (
    "batches",
    "rows",
    "impressions",
    "clicks",
    "duplicates",
    "click_updates",
    "rejected",
    "late",
    "beyond_retention",
)


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message says why and what to do."""


def entity_key(entity: str, values: Sequence[object]) -> str:
    """The store key of one entity, e.g. ``user_surface:u000001<US>feed``."""
    return f"{entity}:" + SEP.join(str(v) for v in values)


def _keys(entity: str, columns: Mapping[str, Sequence[object]]) -> list[str]:
    cols = [columns[c] for c in ENTITY_KEYS[entity]]
    if len(cols) == 1:
        return [f"{entity}:{v}" for v in cols[0]]
    return [f"{entity}:" + SEP.join(map(str, vals)) for vals in zip(*cols, strict=True)]


@dataclass
class EntityState:
    """The stored history of one entity: retained event times and counts of older ones."""

    times: list[np.ndarray]  # per source of the entity, sorted int64 ms
    pruned: list[int]
    last_event_ms: int
    as_of_ms: int  # the store watermark when this state was written

    def encode(self) -> bytes:
        parts: list[np.ndarray] = [np.array([FORMAT, self.as_of_ms, self.last_event_ms], np.int64)]
        for times, pruned in zip(self.times, self.pruned, strict=True):
            parts.append(np.array([pruned, len(times)], np.int64))
            parts.append(np.asarray(times, np.int64))
        return np.concatenate(parts).astype("<i8").tobytes()

    @classmethod
    def decode(cls, blob: bytes, n_sources: int) -> EntityState:
        a = np.frombuffer(blob, dtype="<i8")
        if a[0] != FORMAT:
            raise StoreError(
                f"stored state has format {a[0]}, this code reads {FORMAT}; rebuild the store"
            )
        pos, times, pruned = 3, [], []
        for _ in range(n_sources):
            pruned.append(int(a[pos]))
            n = int(a[pos + 1])
            times.append(a[pos + 2 : pos + 2 + n])
            pos += 2 + n
        return cls(times, pruned, int(a[2]), int(a[1]))


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Key-value storage of encoded states, seen event ids and store metadata."""

    def snapshot(self, keys: list[str]) -> tuple[dict[str, str], list[bytes | None]]: ...

    @contextmanager
    def writer(self) -> Iterator[None]: ...

    def read_states(self, keys: list[str]) -> list[bytes | None]: ...

    def read_seen(self, event_ids: list[str]) -> dict[str, tuple[int, int]]: ...

    def read_meta(self) -> dict[str, str]: ...

    def commit(
        self,
        states: dict[str, bytes],
        seen: dict[str, tuple[int, int]],
        meta: dict[str, str],
        counters: dict[str, int],
        prune_seen_before: int,
    ) -> None: ...

    def is_empty(self) -> bool: ...

    def bulk_insert(
        self, states: Sequence[tuple[str, bytes]], seen: Sequence[tuple[str, int, int]]
    ) -> None: ...

    def discard_bulk(self) -> None: ...

    def close(self) -> None: ...


class SQLiteBackend:
    """One SQLite file (WAL mode): readers never block the single writer."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # ``timeout``: how long a statement waits for a lock held by another connection
        # (the service reads with a short one so a locked file degrades fast, not slowly).
        self._con = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        self._lock = threading.RLock()
        with self._lock:
            self._con.execute("PRAGMA page_size=8192")  # effective for a new file only
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, never corrupt
            self._con.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages per connection
            self._con.execute("PRAGMA temp_store=MEMORY")
            self._con.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)
                    WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, ts INTEGER NOT NULL,
                    clicked INTEGER NOT NULL) WITHOUT ROWID;
                CREATE INDEX IF NOT EXISTS seen_ts ON seen (ts);
                """
            )

    def _select(self, sql: str, values: list[str]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(values), 900):
            chunk = values[i : i + 900]
            marks = ",".join("?" * len(chunk))
            rows.extend(self._con.execute(sql.format(marks=marks), chunk).fetchall())
        return rows

    def read_meta(self) -> dict[str, str]:
        with self._lock:
            return dict(self._con.execute("SELECT key, value FROM meta").fetchall())

    def read_states(self, keys: list[str]) -> list[bytes | None]:
        with self._lock:
            found = dict(self._select("SELECT key, value FROM state WHERE key IN ({marks})", keys))
        return [found.get(k) for k in keys]

    def snapshot(self, keys: list[str]) -> tuple[dict[str, str], list[bytes | None]]:
        with self._lock:
            self._con.execute("BEGIN")
            try:
                meta = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
                found = dict(
                    self._select("SELECT key, value FROM state WHERE key IN ({marks})", keys)
                )
            finally:
                self._con.execute("COMMIT")
        return meta, [found.get(k) for k in keys]

    def read_seen(self, event_ids: list[str]) -> dict[str, tuple[int, int]]:
        with self._lock:
            rows = self._select(
                "SELECT event_id, ts, clicked FROM seen WHERE event_id IN ({marks})", event_ids
            )
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    @contextmanager
    def writer(self) -> Iterator[None]:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")  # the write lock, held from read to commit
            try:
                yield
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def commit(
        self,
        states: dict[str, bytes],
        seen: dict[str, tuple[int, int]],
        meta: dict[str, str],
        counters: dict[str, int],
        prune_seen_before: int,
    ) -> None:
        con = self._con
        con.executemany("INSERT OR REPLACE INTO state VALUES (?, ?)", states.items())
        con.executemany(
            "INSERT OR REPLACE INTO seen VALUES (?, ?, ?)",
            ((k, ts, c) for k, (ts, c) in seen.items()),
        )
        con.execute("DELETE FROM seen WHERE ts < ?", (prune_seen_before,))
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
        for name, add in counters.items():
            con.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                "value = CAST(CAST(value AS INTEGER) + ? AS TEXT)",
                (f"count.{name}", str(add), add),
            )

    def is_empty(self) -> bool:
        with self._lock:
            row = self._con.execute(
                "SELECT EXISTS(SELECT 1 FROM state) OR EXISTS(SELECT 1 FROM seen) "
                "OR EXISTS(SELECT 1 FROM meta)"
            ).fetchone()
        return not row[0]

    def bulk_insert(
        self, states: Sequence[tuple[str, bytes]], seen: Sequence[tuple[str, int, int]]
    ) -> None:
        """Plain inserts inside the bulk load's one transaction (``writer``)."""
        self._con.executemany("INSERT INTO state VALUES (?, ?)", states)
        self._con.executemany("INSERT INTO seen VALUES (?, ?, ?)", seen)

    def discard_bulk(self) -> None:
        """Nothing to do: ``writer`` rolls the bulk load's transaction back."""

    def close(self) -> None:
        with self._lock:
            self._con.close()


class RedisBackend:
    """Redis keys under one prefix; lookups read states and watermark with one MGET."""

    def __init__(self, url: str, prefix: str, timeout: float = 5.0) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise StoreError(
                f"cannot reach the Redis online store at {url}: {exc}; start "
                "redis-server or point features.online.url elsewhere"
            ) from exc
        self.p = prefix
        self._lock: Any = None  # the write lock while ``writer`` holds it

    def _meta_key(self) -> str:
        return f"{self.p}meta"

    def read_meta(self) -> dict[str, str]:
        raw = self.client.hgetall(self._meta_key())
        return {k.decode(): v.decode() for k, v in raw.items()}

    def read_states(self, keys: list[str]) -> list[bytes | None]:
        return list(self.client.mget([f"{self.p}s:{k}" for k in keys])) if keys else []

    def snapshot(self, keys: list[str]) -> tuple[dict[str, str], list[bytes | None]]:
        values = self.client.mget([f"{self.p}watermark", *(f"{self.p}s:{k}" for k in keys)])
        meta = {"watermark_ms": values[0].decode()} if values[0] is not None else {}
        return meta, list(values[1:])

    def read_seen(self, event_ids: list[str]) -> dict[str, tuple[int, int]]:
        if not event_ids:
            return {}
        values = self.client.hmget(f"{self.p}seen", event_ids)
        out = {}
        for event_id, value in zip(event_ids, values, strict=True):
            if value is not None:
                ts, clicked = value.decode().split(",")
                out[event_id] = (int(ts), int(clicked))
        return out

    @contextmanager
    def writer(self) -> Iterator[None]:
        lock = self.client.lock(f"{self.p}lock", timeout=300, blocking_timeout=60)
        if not lock.acquire():
            raise StoreError(
                "another ingest holds the Redis store's write lock for over 60 s; retry"
            )
        self._lock = lock
        try:
            yield
        finally:
            self._lock = None
            lock.release()

    def commit(
        self,
        states: dict[str, bytes],
        seen: dict[str, tuple[int, int]],
        meta: dict[str, str],
        counters: dict[str, int],
        prune_seen_before: int,
    ) -> None:
        old = self.client.zrangebyscore(f"{self.p}seen_ts", "-inf", f"({prune_seen_before}")
        pipe = self.client.pipeline(transaction=True)
        items = list(states.items())
        for i in range(0, len(items), 10_000):
            pipe.mset({f"{self.p}s:{k}": v for k, v in items[i : i + 10_000]})
        if seen:
            pipe.hset(f"{self.p}seen", mapping={k: f"{ts},{c}" for k, (ts, c) in seen.items()})
            pipe.zadd(f"{self.p}seen_ts", {k: ts for k, (ts, c) in seen.items()})
        if old:
            pipe.hdel(f"{self.p}seen", *old)
            pipe.zrem(f"{self.p}seen_ts", *old)
        if meta:
            pipe.hset(self._meta_key(), mapping=meta)
            if "watermark_ms" in meta:
                pipe.set(f"{self.p}watermark", meta["watermark_ms"])
        for name, add in counters.items():
            pipe.hincrby(self._meta_key(), f"count.{name}", add)
        pipe.execute()

    def _keys_written(self) -> Iterator[bytes]:
        lock = f"{self.p}lock".encode()
        pattern = self.p.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?") + "*"
        for key in self.client.scan_iter(match=pattern, count=10_000):
            if key != lock:
                yield key

    def is_empty(self) -> bool:
        return next(self._keys_written(), None) is None

    def bulk_insert(
        self, states: Sequence[tuple[str, bytes]], seen: Sequence[tuple[str, int, int]]
    ) -> None:
        """One pipeline (not a transaction) per chunk; the write lock is renewed each time."""
        if self._lock is not None:
            self._lock.reacquire()  # a bulk load can outlast the lock's 300 s expiry
        pipe = self.client.pipeline(transaction=False)
        for i in range(0, len(states), 10_000):
            pipe.mset({f"{self.p}s:{k}": v for k, v in states[i : i + 10_000]})
        for i in range(0, len(seen), 10_000):
            part = seen[i : i + 10_000]
            pipe.hset(f"{self.p}seen", mapping={k: f"{ts},{c}" for k, ts, c in part})
            pipe.zadd(f"{self.p}seen_ts", {k: ts for k, ts, _ in part})
        pipe.execute()

    def discard_bulk(self) -> None:
        """Delete what a failed bulk load wrote (the store was empty when it began)."""
        batch: list[bytes] = []
        for key in self._keys_written():
            batch.append(key)
            if len(batch) == 10_000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- results


@dataclass
class IngestReport:
    """What one ``ingest`` call did; nothing is dropped without being counted here."""

    rows: int
    impressions: int
    clicks: int
    duplicates: int
    click_updates: int
    rejected: int
    rejected_rows: pd.DataFrame  # the rejected input rows plus a `reason` column
    late: int
    beyond_retention: int  # new rows older than the retention horizon: not deduplicable
    max_lateness_seconds: float
    late_examples: list[str]
    watermark_before_ms: int
    watermark_ms: int
    entities_written: int
    seconds: float

    def summary(self) -> str:
        wm = pd.Timestamp(self.watermark_ms, unit="ms", tz="UTC") if self.watermark_ms else "none"
        lines = [
            f"ingested {self.rows:,} row(s) in {self.seconds:.2f} s: "
            f"{self.impressions:,} impression(s), "
            f"{self.clicks:,} click(s) ({self.click_updates:,} click update(s)), "
            f"{self.duplicates:,} duplicate(s) skipped, {self.rejected:,} rejected; "
            f"{self.entities_written:,} entity state(s) written; watermark {wm}",
        ]
        if self.late:
            lines.append(
                f"late: {self.late:,} event(s) older than the watermark minus the allowed lateness "
                f"(up to {self.max_lateness_seconds:,.1f} s late, "
                f"e.g. {', '.join(self.late_examples)}); "
                "they were applied, but vectors served before they arrived did not include them"
            )
        if self.beyond_retention:
            lines.append(
                f"beyond retention: {self.beyond_retention:,} row(s) older than the retention "
                "horizon were applied as new events; if they were re-sent duplicates they are now "
                "counted twice"
            )
        if self.rejected:
            reasons = self.rejected_rows["reason"].value_counts()
            for reason, n in reasons.head(10).items():
                lines.append(f"rejected {n:,} row(s): {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "rejected_rows"}
        out["rejected_reasons"] = (
            self.rejected_rows["reason"].value_counts().to_dict() if self.rejected else {}
        )
        return out


@dataclass
class LookupResult:
    """Feature vectors of a batch of requests with their freshness."""

    features: pd.DataFrame  # declared columns and dtypes, one row per request
    as_of_ms: int  # watermark the vectors are current as of (0: nothing ingested)
    t_ms: np.ndarray
    age_seconds: np.ndarray
    stale: np.ndarray  # age above the freshness SLA (or nothing ingested yet)
    exact: np.ndarray  # False for query times older than watermark - allowed lateness
    feature_set: str
    fingerprint: str
    freshness_sla_seconds: float


# --------------------------------------------------------------------------- the store

_INGEST_SCHEMA = RAW_EVENTS.update_column("event_id", unique=False)
_KEY_COLUMNS = ("event_id", "user_id", "item_id", "surface", "device")
_IDENTITY = ("ts", "user_id", "item_id", "surface", "device", "position")


_NO_LAST = np.iinfo(np.int64).min


def _decode_many(
    blobs: list[bytes | None], n_sources: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Decode many states at once: latest event per key, and per source (pruned, codes, times).

    ``codes``/``times`` list every retained event time with the position of its key
    in ``blobs``; keys without a state have no times, nothing pruned and no latest event.
    """
    k = len(blobs)
    sizes = np.array([0 if b is None else len(b) // 8 for b in blobs], dtype=np.int64)
    flat = np.frombuffer(b"".join(b for b in blobs if b is not None), dtype="<i8")
    off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    has = sizes > 0
    if len(flat) == 0:
        empty = np.empty(0, np.int64)
        return np.full(k, _NO_LAST, np.int64), [
            (np.zeros(k, np.int64), empty, empty) for _ in range(n_sources)
        ]
    top = len(flat) - 1

    def at(index: np.ndarray) -> np.ndarray:
        return np.where(has, flat[np.minimum(index, top)], 0)

    if (at(off)[has] != FORMAT).any():
        raise StoreError(f"stored states use another format than {FORMAT}; rebuild the store")
    last = np.where(has, at(off + 2), _NO_LAST)
    pos = off + 3
    out = []
    for _ in range(n_sources):
        pruned, counts = at(pos), at(pos + 1)
        codes = np.repeat(np.arange(k), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        idx = np.repeat(pos + 2 - first, counts) + np.arange(int(counts.sum()))
        out.append((pruned, codes, flat[idx].astype(np.int64)))
        pos = pos + 2 + counts
    return last, out


def _encode_many(
    watermark: int, last: np.ndarray, merged: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> list[bytes]:
    """Encode many states at once (the layout of ``EntityState.encode``).

    ``merged`` holds per source the retained times sorted by key position, the
    number of times per key and the pruned count per key.
    """
    k = len(last)
    sizes = np.full(k, 3, dtype=np.int64)
    for _, counts, _ in merged:
        sizes += 2 + counts
    off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = np.empty(int(sizes.sum()), dtype="<i8")
    flat[off] = FORMAT
    flat[off + 1] = watermark
    flat[off + 2] = last
    pos = off + 3
    for times, counts, pruned in merged:
        flat[pos] = pruned
        flat[pos + 1] = counts
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat[np.repeat(pos + 2 - first, counts) + np.arange(len(times))] = times
        pos = pos + 2 + counts
    raw = flat.tobytes()
    ends = (off + sizes) * 8
    return [raw[a:b] for a, b in zip((off * 8).tolist(), ends.tolist(), strict=True)]


def check_rows(events: pd.DataFrame, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a batch into contract-valid (coerced) rows and rejected rows with reasons."""
    missing = [c for c in RAW_EVENTS.columns if c not in events.columns]
    extra = [c for c in events.columns if c not in RAW_EVENTS.columns]
    if missing or extra:
        validate(RAW_EVENTS, events, where)  # raises a ContractViolation naming the columns
    frame = events.reset_index(drop=True)
    reasons: dict[int, list[str]] = {}
    try:
        valid = _INGEST_SCHEMA.validate(frame, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
        if cases["index"].isna().any():
            validate(RAW_EVENTS, frame, where)
            raise
        for _, case in cases.iterrows():
            if str(case.get("schema_context")) == "DataFrameSchema":
                reason = f"row check failed: {case['check']}"  # one check over several columns
            else:
                reason = (
                    f"column '{case['column']}': {case['check']} (got {case['failure_case']!r})"
                )
            found = reasons.setdefault(int(case["index"]), [])
            if reason not in found:
                found.append(reason)
        good = frame.drop(index=list(reasons))
        valid = _INGEST_SCHEMA.validate(good, lazy=True) if len(good) else good
    # Rules of the store beyond the contract: keys without the separator, times in range.
    if len(valid):
        bad_sep = np.zeros(len(valid), dtype=bool)
        for col in _KEY_COLUMNS:
            bad_sep |= valid[col].astype(str).str.contains(SEP, regex=False).to_numpy()
        ts = to_ms(valid["ts"])
        cts = to_ms(valid["click_ts"].fillna(valid["ts"]))
        out_of_range = (ts < EPOCH_MS) | (cts >= EPOCH_MS + STRIDE)
        for idx in valid.index[bad_sep]:
            reasons.setdefault(int(idx), []).append("an id contains the reserved character \\x1f")
        for idx in valid.index[out_of_range]:
            reasons.setdefault(int(idx), []).append("ts/click_ts outside 2020-01-01 .. 2054-11-04")
        valid = valid[~(bad_sep | out_of_range)]
    rejected = frame.loc[sorted(reasons)].copy()
    rejected["reason"] = ["; ".join(reasons[i]) for i in sorted(reasons)]
    return valid, rejected


class _Reader(Protocol):
    """Where a batch's prior state comes from: the backend, or nothing (a bulk load)."""

    def read_seen(self, event_ids: list[str]) -> dict[str, tuple[int, int]]: ...

    def read_states(self, keys: list[str]) -> list[bytes | None]: ...


class _EmptyStore:
    """The reads of an empty store: nothing seen, no states."""

    def read_seen(self, event_ids: list[str]) -> dict[str, tuple[int, int]]:
        return {}

    def read_states(self, keys: list[str]) -> list[bytes | None]:
        return [None] * len(keys)


EMPTY_STORE = _EmptyStore()


@dataclass
class _Resolved:
    """A batch after deduplication: which rows add an impression, which add a click."""

    v: pd.DataFrame  # the valid rows, index 0..n-1
    ids: np.ndarray
    ts: np.ndarray
    cts: np.ndarray  # click time, 0 where not clicked
    clicked: np.ndarray
    new_impr: np.ndarray
    new_click: np.ndarray
    duplicates: int
    rejected: list[pd.DataFrame]  # conflicting rows with a `reason`


def resolve_batch(
    valid: pd.DataFrame, read_seen: Callable[[list[str]], dict[str, tuple[int, int]]]
) -> _Resolved:
    """Deduplicate a batch within itself and against the ids ``read_seen`` knows."""
    # Within the batch: one row per event_id (identical repeats are duplicates,
    # an unclicked and a clicked version merge into the clicked one).
    v = valid.reset_index(drop=True)
    ids = v["event_id"].astype(str).to_numpy(dtype=object)
    ts = to_ms(v["ts"])
    clicked = v["clicked"].to_numpy().astype(np.int64) == 1
    cts = np.where(clicked, to_ms(v["click_ts"].fillna(v["ts"])), 0)
    id_codes = pd.factorize(ids)[0]
    order = np.lexsort((-clicked.astype(np.int64), id_codes))  # per id: clicked version first
    first = np.ones(len(v), dtype=bool)
    if len(v):
        same = id_codes[order][1:] == id_codes[order][:-1]
        if same.any():
            # Which row of a repeated id is kept must not depend on row order (a Spark
            # shuffle reorders rows): the clicked version, then the earliest by content.
            content = [
                pd.factorize(v[c].astype(str), sort=True)[0] for c in reversed(_IDENTITY[1:])
            ]
            order = np.lexsort((*content, cts, ts, -clicked.astype(np.int64), id_codes))
            same = id_codes[order][1:] == id_codes[order][:-1]
        first[order[1:][same]] = False
    dup_in_batch = ~first
    conflicts = np.zeros(len(v), dtype=bool)
    if dup_in_batch.any():
        keep_of = pd.Series(np.flatnonzero(first), index=ids[first])
        rep = keep_of[ids].to_numpy()  # the kept row of each id
        differs = clicked & (cts != cts[rep])
        for col in _IDENTITY:
            values = ts if col == "ts" else v[col].astype(str).to_numpy(dtype=object)
            differs |= values != values[rep]
        conflicts = dup_in_batch & differs
    duplicates = int((dup_in_batch & ~conflicts).sum())
    rejected = []
    if conflicts.any():
        bad = v[conflicts].copy()
        bad["reason"] = "event_id repeated in the batch with different contents"
        rejected.append(bad)

    # Across batches: the seen table says what was ingested before.
    keep = np.flatnonzero(first)
    seen = read_seen(list(ids[keep]))
    new_impr = np.zeros(len(v), dtype=bool)
    new_click = np.zeros(len(v), dtype=bool)
    conflict_seen = []
    for i in keep:
        prior = seen.get(ids[i])
        if prior is None:
            new_impr[i] = True
            new_click[i] = clicked[i]
        elif prior[0] != ts[i]:
            conflict_seen.append(i)
        elif clicked[i] and not prior[1]:
            new_click[i] = True
        else:
            duplicates += 1
    if conflict_seen:
        bad = v.iloc[conflict_seen].copy()
        bad["reason"] = "event_id was ingested before with a different ts"
        rejected.append(bad)
    return _Resolved(v, ids, ts, cts, clicked, new_impr, new_click, duplicates, rejected)


def entity_states(
    entity: str,
    sources: Sequence[str],
    cols: Mapping[str, Sequence[object]],
    new_impr: np.ndarray,
    new_click: np.ndarray,
    ts: np.ndarray,
    cts: np.ndarray,
    horizon: int,
    watermark: int,
    reader: _Reader = EMPTY_STORE,
) -> dict[str, bytes]:
    """New encoded states of the ``entity`` keys that the new events touch.

    Rows are events with their key columns ``cols``, impression time ``ts`` and click
    time ``cts``; ``new_impr``/``new_click`` say which add an impression or a click.
    Old states come from ``reader`` (none: a bulk load). The one state-building path of
    incremental ingest, the single-machine bulk load and the Spark bulk load.
    """
    keys = np.asarray(_keys(entity, cols), dtype=object)
    masks = [new_impr if source == "impressions" else new_click for source in sources]
    if not masks:
        return {}
    # One hash pass: codes of the touched keys (rows with an event of this entity).
    rows = np.flatnonzero(np.logical_or.reduce(masks))
    if len(rows) == 0:
        return {}
    row_codes, touched = pd.factorize(keys[rows])
    code_of = np.full(len(keys), -1, np.int64)
    code_of[rows] = row_codes
    per_source = [
        (code_of[m], ts[m] if source == "impressions" else cts[m])
        for m, source in zip(masks, sources, strict=True)
    ]
    touched_keys = list(touched)
    blobs = reader.read_states(touched_keys)
    return dict(zip(touched_keys, merge_states(blobs, per_source, horizon, watermark), strict=True))


def merge_states(
    blobs: list[bytes | None],
    per_source: list[tuple[np.ndarray, np.ndarray]],
    horizon: int,
    watermark: int,
) -> list[bytes]:
    """New states of keys with old states ``blobs``: old times + new times, pruned at ``horizon``.

    ``per_source`` holds, per source of the entity, the position in ``blobs`` of
    each new event's key and its time. Vectorized over all keys (decode, merge,
    prune, encode), so a batch costs a few numpy passes rather than Python work per
    entity.
    """
    n = len(blobs)
    last, old = _decode_many(blobs, len(per_source))
    merged: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for (new_codes, times), (pruned, old_codes, old_times) in zip(per_source, old, strict=True):
        # One int64 key per event time, code * 2^40 + (time - epoch) (times are checked
        # to lie in that range): the old keys are already sorted (states are decoded in
        # key order, times sorted within a state), so only the batch's few new keys are
        # sorted and inserted, instead of a two-key sort of every retained time.
        old_keys = old_codes.astype(np.int64) * STRIDE + (old_times.astype(np.int64) - EPOCH_MS)
        if len(times):
            np.maximum.at(last, new_codes, times)
            new_keys = np.sort(new_codes.astype(np.int64) * STRIDE + (times - EPOCH_MS))
            keys = np.insert(old_keys, np.searchsorted(old_keys, new_keys), new_keys)
        else:
            keys = old_keys
        codes = keys // STRIDE
        all_times = keys - codes * STRIDE + EPOCH_MS
        drop = all_times <= horizon
        if drop.any():
            pruned = pruned + np.bincount(codes[drop], minlength=n)
            codes, all_times = codes[~drop], all_times[~drop]
        counts = np.bincount(codes, minlength=n)
        merged.append((all_times, counts, pruned))
    return _encode_many(watermark, last, merged)


@dataclass
class _Plan:
    """What one batch (or a bulk load) writes."""

    states: dict[str, bytes]
    seen: dict[str, tuple[int, int]]
    meta: dict[str, str]
    counters: dict[str, int]
    horizon: int  # seen ids older than this are dropped
    report: IngestReport


def ingest_report(
    counters: Mapping[str, int],
    rejected_rows: pd.DataFrame,
    *,
    max_lateness_seconds: float = 0.0,
    late_examples: list[str] | None = None,
    watermark_before_ms: int,
    watermark_ms: int,
    entities_written: int,
) -> IngestReport:
    return IngestReport(
        rows=counters["rows"],
        impressions=counters["impressions"],
        clicks=counters["clicks"],
        duplicates=counters["duplicates"],
        click_updates=counters["click_updates"],
        rejected=counters["rejected"],
        rejected_rows=rejected_rows,
        late=counters["late"],
        beyond_retention=counters["beyond_retention"],
        max_lateness_seconds=max_lateness_seconds,
        late_examples=late_examples or [],
        watermark_before_ms=watermark_before_ms,
        watermark_ms=watermark_ms,
        entities_written=entities_written,
        seconds=0.0,
    )


class OnlineStore:
    """Incrementally materialized feature state with point-in-time-exact lookups.

    Open with ``OnlineStore.open("sqlite:///build/online/features.db")`` or
    ``OnlineStore.open("redis://127.0.0.1:6379/0")``; ``ingest`` event batches;
    ``lookup_many`` feature vectors with their age.
    """

    def __init__(
        self,
        backend: Backend,
        feature_set: FeatureSet,
        allowed_lateness_ms: int,
        freshness_sla_seconds: float,
        url: str,
    ) -> None:
        self.backend = backend
        self.feature_set = feature_set
        self.allowed_lateness_ms = allowed_lateness_ms
        self.freshness_sla_seconds = freshness_sla_seconds
        self.url = url
        self._entities = feature_set.entity_sources
        meta = backend.read_meta()
        if meta.get("fingerprint") and meta["fingerprint"] != feature_set.fingerprint:
            raise StoreError(
                f"the online store at {url} was built for feature set {meta.get('feature_set')} "
                f"(fingerprint {meta['fingerprint']}), but this code declares "
                f"{feature_set.name} (fingerprint {feature_set.fingerprint}); ingest into a new "
                "store (another file or Redis db) and switch serving to it"
            )
        stored_lateness = meta.get("allowed_lateness_ms")
        if stored_lateness is not None and int(stored_lateness) != allowed_lateness_ms:
            raise StoreError(
                f"the online store at {url} prunes with an allowed lateness of "
                f"{int(stored_lateness) / 1000:g} s, not {allowed_lateness_ms / 1000:g} s; "
                "rebuild it to change features.online.allowed_lateness_seconds"
            )

    @classmethod
    def open(
        cls,
        url: str,
        feature_set: FeatureSet | str = "ctr_v1",
        allowed_lateness_seconds: float = 3600.0,
        freshness_sla_seconds: float = 300.0,
        timeout_seconds: float | None = None,
    ) -> OnlineStore:
        """Open (creating if needed) the store at ``sqlite:///path`` or ``redis://host:port/db``.

        ``timeout_seconds`` bounds how long one operation waits for a SQLite lock or a
        Redis socket (default 30 s and 5 s, fit for ingest jobs; the service passes a
        few tens of milliseconds so an outage falls back instead of stalling requests).
        """
        fs = FEATURE_SETS[feature_set] if isinstance(feature_set, str) else feature_set
        if url.startswith("sqlite:///"):
            backend: Backend = SQLiteBackend(
                url[len("sqlite:///") :] or ":memory:",
                30.0 if timeout_seconds is None else timeout_seconds,
            )
        elif url.startswith(("redis://", "rediss://", "unix://")):
            backend = RedisBackend(
                url, f"mlops:{fs.name}:", 5.0 if timeout_seconds is None else timeout_seconds
            )
        else:
            raise StoreError(
                f"online store URL {url!r} is not understood; use "
                "sqlite:///path/to/file.db or redis://host:port/db"
            )
        return cls(
            backend,
            fs,
            int(round(allowed_lateness_seconds * 1000)),
            float(freshness_sla_seconds),
            url,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, root: Path | None = None, url: str | None = None
    ) -> OnlineStore:
        """Open the store configured in ``params.yaml`` (``features.online``, ``serving``)."""
        url = url or settings.features.online.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and root is not None:
            url = f"sqlite:///{(root / url[len('sqlite:///') :]).resolve()}"
        return cls.open(
            url,
            settings.features.feature_set,
            settings.features.online.allowed_lateness_seconds,
            settings.serving.freshness_sla_seconds,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ state

    @property
    def retention_ms(self) -> int:
        """How far behind the watermark event times are kept (longest window/TTL + lateness)."""
        return self.feature_set.horizon_ms + self.allowed_lateness_ms

    def stats(self) -> dict[str, Any]:
        """Watermark, feature set and the lifetime counters of the store."""
        meta = self.backend.read_meta()
        wm = int(meta.get("watermark_ms", 0))
        return {
            "url": self.url,
            "feature_set": self.feature_set.name,
            "fingerprint": self.feature_set.fingerprint,
            "watermark_ms": wm,
            "watermark": pd.Timestamp(wm, unit="ms", tz="UTC").isoformat() if wm else None,
            "allowed_lateness_seconds": self.allowed_lateness_ms / 1000,
            "retention_seconds": self.retention_ms / 1000,
            "counters": {c: int(meta.get(f"count.{c}", 0)) for c in COUNTERS},
        }

    def states(self, keys: list[str], entity: str) -> list[EntityState | None]:
        """Decoded states of entity keys (``None`` where the entity has no events)."""
        n = len(self._entities[entity])
        return [
            None if b is None else EntityState.decode(b, n) for b in self.backend.read_states(keys)
        ]

    # ------------------------------------------------------------------ ingest

    def ingest(self, events: pd.DataFrame, where: str = "the ingested batch") -> IngestReport:
        """Apply a batch of RawEvents rows (any order) to the online state atomically.

        Each row is an impression; a clicked row also carries its click at
        ``click_ts``. Rows already ingested are skipped as duplicates; an
        ingested unclicked row re-sent with its click adds the click only. Raises
        ``ContractViolation`` only when the batch as a whole is malformed
        (missing or unexpected columns); bad rows are rejected individually.
        """
        start = time.perf_counter()
        valid, rejected = check_rows(events, where)
        with self.backend.writer():
            report = self._apply(valid, rejected)
        report.seconds = time.perf_counter() - start
        return report

    # ------------------------------------------------------------------ bulk load

    def require_empty(self) -> None:
        """Raise ``StoreError`` unless the store holds nothing (the precondition of a bulk load)."""
        if self.backend.is_empty():
            return
        stats = self.stats()
        raise StoreError(
            f"the online store at {self.url} is not empty (watermark "
            f"{stats['watermark'] or 'none'}, {stats['counters']['impressions']:,} impression(s) "
            "ingested); a bulk load fills an empty store only: load into a new SQLite file or "
            "an empty Redis db (or delete this file / FLUSHDB that db first), or add the new "
            "events with `mlops features ingest`"
        )

    def bulk_load(
        self,
        events: pd.DataFrame,
        where: str = "the event log",
        chunk_rows: int = 200_000,
        progress: Callable[[str], None] | None = None,
    ) -> IngestReport:
        """Fill an empty store from a whole event log in one pass (no per-batch rewrites).

        The result is exactly what ``ingest(events)`` in one call would write (the
        same planning code against an empty store): states, seen ids, watermark, meta
        and counters, so later ``ingest`` calls continue as after incremental ingest.
        Written in chunks of ``chunk_rows`` (SQLite: one transaction; Redis:
        pipelines under the write lock). Raises ``StoreError`` on a non-empty store.
        """
        start = time.perf_counter()
        self.require_empty()
        valid, rejected = check_rows(events, where)
        plan = self._plan(valid, rejected, EMPTY_STORE, {})
        if progress:
            progress(
                f"computed {len(plan.states):,} entity state(s) from {len(events):,} row(s) "
                f"in {time.perf_counter() - start:.1f} s"
            )
        states = sorted(plan.states.items())  # key order: B-tree appends in SQLite
        seen = sorted((k, ts, c) for k, (ts, c) in plan.seen.items() if ts >= plan.horizon)

        def chunks() -> Iterator[tuple[list[tuple[str, bytes]], list[tuple[str, int, int]]]]:
            for i in range(0, max(len(states), len(seen)), chunk_rows):
                yield states[i : i + chunk_rows], seen[i : i + chunk_rows]

        self.write_bulk(chunks(), plan.meta, plan.counters, plan.horizon, progress)
        plan.report.seconds = time.perf_counter() - start
        return plan.report

    def write_bulk(
        self,
        chunks: Iterable[tuple[Sequence[tuple[str, bytes]], Sequence[tuple[str, int, int]]]],
        meta: dict[str, str],
        counters: dict[str, int],
        horizon: int,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Write chunks of (states, seen ids) into the empty store, then meta and counters.

        SQLite: one transaction, so a failed load leaves the store empty. Redis:
        pipelines under the store's write lock; on failure what was written is deleted.
        """
        with self.backend.writer():
            self.require_empty()  # again under the write lock: no ingest began meanwhile
            try:
                n_states = n_seen = 0
                for states, seen in chunks:
                    self.backend.bulk_insert(states, seen)
                    n_states, n_seen = n_states + len(states), n_seen + len(seen)
                    if progress:
                        progress(f"wrote {n_states:,} entity state(s), {n_seen:,} seen event id(s)")
                self.backend.commit({}, {}, meta, counters, prune_seen_before=horizon)
            except BaseException:
                self.backend.discard_bulk()
                raise

    def initial_meta(self) -> dict[str, str]:
        """What the first write into an empty store records beside the watermark."""
        return {
            "feature_set": self.feature_set.name,
            "fingerprint": self.feature_set.fingerprint,
            "allowed_lateness_ms": str(self.allowed_lateness_ms),
        }

    def _apply(self, valid: pd.DataFrame, rejected: pd.DataFrame) -> IngestReport:
        meta = self.backend.read_meta()
        plan = self._plan(valid, rejected, self.backend, meta)
        self.backend.commit(
            plan.states, plan.seen, plan.meta, plan.counters, prune_seen_before=plan.horizon
        )
        return plan.report

    def _plan(
        self, valid: pd.DataFrame, rejected: pd.DataFrame, reader: _Reader, meta: dict[str, str]
    ) -> _Plan:
        """Everything one batch writes, computed against ``reader``'s seen ids and states.

        ``ingest`` plans against the backend; a bulk load plans the whole log against
        an empty store (``EMPTY_STORE``) and writes the same result in large chunks.
        """
        meta_new = {} if meta.get("fingerprint") else self.initial_meta()
        w0 = int(meta.get("watermark_ms", 0))
        n_rows = len(valid) + len(rejected)
        b = resolve_batch(valid, reader.read_seen)
        ts, cts = b.ts, b.cts
        new_impr, new_click = b.new_impr, b.new_click
        click_updates = int((new_click & ~new_impr).sum())

        # Late events: older than the watermark before this batch minus the allowed lateness.
        limit = w0 - self.allowed_lateness_ms
        late_impr = new_impr & (ts < limit) if w0 else np.zeros(len(ts), bool)
        late_click = new_click & (cts < limit) if w0 else np.zeros(len(ts), bool)
        late = late_impr | late_click
        beyond = new_impr & (ts < w0 - self.retention_ms) if w0 else np.zeros(len(ts), bool)
        lateness = np.maximum(
            np.where(late_impr, limit - ts, 0), np.where(late_click, limit - cts, 0)
        )
        applied_times = np.concatenate([ts[new_impr], cts[new_click]])
        w1 = max(w0, int(applied_times.max())) if len(applied_times) else w0
        horizon = w1 - self.retention_ms

        cols = {c: b.v[c].astype(str).tolist() for c in self.feature_set.key_columns}
        states: dict[str, bytes] = {}
        for entity, sources in self._entities.items():
            states.update(
                entity_states(
                    entity, sources, cols, new_impr, new_click, ts, cts, horizon, w1, reader
                )
            )

        applied = np.flatnonzero(new_impr | new_click)
        seen_new = dict(
            zip(
                b.ids[applied].astype(str).tolist(),
                zip(
                    ts[applied].tolist(),
                    b.clicked[applied].astype(np.int64).tolist(),
                    strict=True,
                ),
                strict=True,
            )
        )
        if w1 != w0 or meta_new:
            meta_new["watermark_ms"] = str(w1)
        parts = [rejected, *b.rejected]
        rejected_all = (
            pd.concat([r for r in parts if len(r)], ignore_index=True)
            if any(len(r) for r in parts)
            else rejected.iloc[0:0]
        )
        counters = {
            "batches": 1,
            "rows": n_rows,
            "impressions": int(new_impr.sum()),
            "clicks": int(new_click.sum()),
            "duplicates": b.duplicates,
            "click_updates": click_updates,
            "rejected": len(rejected_all),
            "late": int(late.sum()),
            "beyond_retention": int(beyond.sum()),
        }
        report = ingest_report(
            counters,
            rejected_all,
            max_lateness_seconds=float(lateness.max(initial=0)) / 1000.0,
            late_examples=[str(b.ids[i]) for i in np.flatnonzero(late)[:5]],
            watermark_before_ms=w0,
            watermark_ms=w1,
            entities_written=len(states),
        )
        return _Plan(states, seen_new, meta_new, counters, horizon, report)

    # ------------------------------------------------------------------ lookup

    def lookup_many(
        self,
        user_id: Sequence[object],
        item_id: Sequence[object],
        surface: Sequence[object],
        device: Sequence[object],
        t_ms: Sequence[int] | np.ndarray | None = None,
    ) -> LookupResult:
        """Feature vectors at times ``t_ms`` (epoch ms; default: now) from the online state."""
        fs = self.feature_set
        n = len(user_id)
        t = (
            np.full(n, int(time.time() * 1000), np.int64)
            if t_ms is None
            else np.asarray(t_ms, np.int64)
        )
        cols = {"user_id": user_id, "item_id": item_id, "surface": surface, "device": device}
        entity_keys: dict[str, list[str]] = {}
        wanted: list[str] = []
        for entity in self._entities:
            keys = _keys(entity, cols)
            entity_keys[entity] = keys
            wanted.extend(keys)
        unique = list(dict.fromkeys(wanted))
        meta, blobs = self.backend.snapshot(unique)
        watermark = int(meta.get("watermark_ms", 0))
        found = dict(zip(unique, blobs, strict=True))
        histories, codes = self._histories(entity_keys, found)
        matrix = evaluate(fs, histories, codes, surface, device, t)
        age = (t - watermark) / 1000.0
        return LookupResult(
            features=as_frame(fs, matrix),
            as_of_ms=watermark,
            t_ms=t,
            age_seconds=age,
            stale=(age > self.freshness_sla_seconds) | (watermark == 0),
            exact=t >= watermark - self.allowed_lateness_ms,
            feature_set=fs.name,
            fingerprint=fs.fingerprint,
            freshness_sla_seconds=self.freshness_sla_seconds,
        )

    def lookup(
        self, user_id: str, item_id: str, surface: str, device: str, t_ms: int | None = None
    ) -> LookupResult:
        """One feature vector (a one-row ``LookupResult``)."""
        return self.lookup_many(
            [user_id], [item_id], [surface], [device], None if t_ms is None else [t_ms]
        )

    def _histories(
        self, entity_keys: Mapping[str, list[str]], found: Mapping[str, bytes | None]
    ) -> tuple[Histories, dict[str, np.ndarray]]:
        """``evaluate`` inputs from fetched states: local codes 0..k-1 per entity."""
        arrays, starts, pruned, codes = {}, {}, {}, {}
        for entity, sources in self._entities.items():
            keys = entity_keys[entity]
            local = list(dict.fromkeys(k for k in keys if found.get(k) is not None))
            position = {k: i for i, k in enumerate(local)}
            codes[entity] = np.array([position.get(k, -1) for k in keys], np.int64)
            decoded = [EntityState.decode(found[k], len(sources)) for k in local]  # type: ignore[arg-type]
            for j, source in enumerate(sources):
                parts = [i * STRIDE + (s.times[j] - EPOCH_MS) for i, s in enumerate(decoded)]
                arr = np.concatenate(parts) if parts else np.empty(0, np.int64)
                lengths = np.array([len(s.times[j]) for s in decoded], np.int64)
                starts[(entity, source)] = np.concatenate([[0], np.cumsum(lengths)]).astype(
                    np.int64
                )
                arrays[(entity, source)] = arr
                pruned[(entity, source)] = np.array([s.pruned[j] for s in decoded], np.int64)
        return Histories(arrays, starts, pruned), codes


def read_events_file(path: Path) -> pd.DataFrame:
    """Read a batch of events from parquet, CSV or JSON lines (by extension)."""
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files in {path}")
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path, dtype={"event_id": str, "user_id": str, "item_id": str})
    if suffix in (".jsonl", ".json"):
        return pd.read_json(
            path, lines=suffix == ".jsonl", dtype={"event_id": str, "user_id": str, "item_id": str}
        )
    raise ValueError(f"{path}: unknown event file type {suffix!r}; use .parquet, .csv or .jsonl")


def arrivals(events: pd.DataFrame) -> pd.DataFrame:
    """Replay a final event log as the stream that produced it, in arrival order.

    Each impression arrives at ``ts`` without its click; a clicked impression is
    re-sent at ``click_ts`` with the click. Columns: the RawEvents columns plus
    ``arrival_ms``. Used by tests, the parity command and the benchmarks.
    """
    base = events.copy()
    impressions = base.copy()
    impressions["clicked"] = impressions["clicked"] * 0
    impressions["click_ts"] = impressions["click_ts"].where(impressions["clicked"] == 1)
    impressions["arrival_ms"] = to_ms(base["ts"])
    clicks = base[base["clicked"] == 1].copy()
    clicks["arrival_ms"] = to_ms(clicks["click_ts"])
    out = pd.concat([impressions, clicks], ignore_index=True)
    return out.sort_values(["arrival_ms", "event_id"], kind="stable").reset_index(drop=True)


__all__ = [
    "ContractViolation",
    "EntityState",
    "IngestReport",
    "LookupResult",
    "OnlineStore",
    "StoreError",
    "arrivals",
    "entity_key",
    "read_events_file",
]
