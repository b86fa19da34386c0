"""Bulk load of the online store: the same store as incremental ingest, on pandas and Spark.

A store filled by ``bulk_load`` (pandas) or ``bulk_load_spark`` (the shared local
session) from the events that arrived by a cut time must be byte-identical to a
store that ingested them in one call, answer like a store that ingested them in
random out-of-order batches and like the offline numpy engine (for times >= the
watermark minus the allowed lateness), and stay so while later events are ingested.
SQLite and a real redis-server; small-preset project events and hypothesis logs.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.features.definitions import CTR_V1, FeatureSet, to_ms
from pipelines.features.offline import build_point_in_time
from pipelines.features.online_store import EntityState, OnlineStore, StoreError, arrivals
from tests.support.project import REPO, project_env
from tests.support.strategies import FEATURE_SETS, assert_frames_identical, event_logs

LATENESS_S = 3600.0


@pytest.fixture(scope="module")
def project_events() -> pd.DataFrame:
    """The small preset's raw events (what the pipeline tests use)."""
    from pipelines.simulation.generate import generate_events

    return generate_events("small", seed=42)


def _open(url: str, fs: FeatureSet = CTR_V1, lateness_s: float = LATENESS_S) -> OnlineStore:
    if url.startswith("redis://"):
        import redis

        redis.Redis.from_url(url).flushdb()
    return OnlineStore.open(url, fs, allowed_lateness_seconds=lateness_s)


def _urls(backend: str, tmp_path: Path, redis_url: str | None) -> list[str]:
    if backend == "sqlite":
        return [f"sqlite:///{tmp_path / f'{name}.db'}" for name in ("bulk", "one", "inc")]
    assert redis_url is not None
    return [redis_url.rsplit("/", 1)[0] + f"/{db}" for db in (1, 2, 3)]


def dump(store: OnlineStore) -> tuple[dict[str, bytes], dict[str, tuple[int, int]], dict[str, str]]:
    """Everything a store holds: encoded states, seen ids (ts, clicked) and meta."""
    b: Any = store.backend
    if hasattr(b, "_con"):
        states = dict(b._con.execute("SELECT key, value FROM state").fetchall())
        rows = b._con.execute("SELECT event_id, ts, clicked FROM seen").fetchall()
        seen = {r[0]: (int(r[1]), int(r[2])) for r in rows}
        return states, seen, b.read_meta()
    client, p = b.client, b.p
    keys = list(client.scan_iter(match=f"{p}s:*", count=10_000))
    states = {k.decode()[len(p) + 2 :]: v for k, v in zip(keys, client.mget(keys), strict=True)}
    seen = {
        k.decode(): tuple(int(x) for x in v.decode().split(","))
        for k, v in client.hgetall(f"{p}seen").items()
    }
    ts = {k.decode(): int(s) for k, s in client.zrange(f"{p}seen_ts", 0, -1, withscores=True)}
    assert ts == {k: v[0] for k, v in seen.items()}  # the prune index matches the seen hash
    meta = b.read_meta()
    assert client.get(f"{p}watermark").decode() == meta["watermark_ms"]
    return states, seen, meta  # type: ignore[return-value]


def assert_same_store(a: OnlineStore, b: OnlineStore) -> None:
    """Byte-identical states, the same seen ids and the same meta (watermark, counters)."""
    (sa, seen_a, meta_a), (sb, seen_b, meta_b) = dump(a), dump(b)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if sa[k] != sb[k]] == []
    assert seen_a == seen_b and meta_a == meta_b


def assert_same_history(a: OnlineStore, b: OnlineStore) -> None:
    """The same histories, however they were written (states of a store ingested in
    batches carry the watermark of their last write and may keep times that a later
    batch would prune): per key and source, the times after the horizon, the count of
    older ones and the latest event are equal."""
    (sa, seen_a, meta_a), (sb, seen_b, _) = dump(a), dump(b)
    assert sa.keys() == sb.keys() and seen_a == seen_b
    horizon = int(meta_a["watermark_ms"]) - a.retention_ms
    for key in sa:
        n = len(a.feature_set.entity_sources[key.split(":", 1)[0]])
        x, y = EntityState.decode(sa[key], n), EntityState.decode(sb[key], n)
        assert x.last_event_ms == y.last_event_ms, key
        for j in range(n):
            for s in (x, y):
                old = s.times[j] <= horizon
                s.pruned[j] += int(old.sum())
                s.times[j] = s.times[j][~old]
            assert x.pruned[j] == y.pruned[j] and np.array_equal(x.times[j], y.times[j]), key


def ingest_shuffled(
    stores: list[OnlineStore], rows: pd.DataFrame, rng: random.Random, batches: int = 0
) -> None:
    """Random batches (1-6 rows, or about ``batches`` of them), each row delayed by up to
    the allowed lateness (out-of-order arrival)."""
    lateness = stores[0].allowed_lateness_ms
    jitter = np.array([rng.randint(0, lateness) for _ in range(len(rows))], np.int64)
    rows = rows.iloc[np.argsort(rows["arrival_ms"].to_numpy() + jitter, kind="stable")]
    rows = rows.drop(columns=["arrival_ms"])
    i = 0
    while i < len(rows):
        size = rng.randint(len(rows) // (2 * batches), 2 * len(rows) // batches) if batches else 0
        size = size or rng.randint(1, 6)
        for store in stores:
            assert store.ingest(rows.iloc[i : i + size]).rejected == 0
        i += size


def lookups_agree(
    stores: list[OnlineStore],
    events: pd.DataFrame,
    queries: pd.DataFrame,
    rng: random.Random,
    complete: bool = True,
) -> None:
    """Every store and the offline engine over ``events`` give the same rows at times in
    the exact range, up to the watermark + 1 ms (only up to the watermark when rows at
    the watermark may still be missing: ``complete=False``)."""
    watermark = stores[0].stats()["watermark_ms"]
    lateness = stores[0].allowed_lateness_ms
    top = lateness + int(complete)
    t = np.array([watermark - lateness + rng.randint(0, top) for _ in queries.index])
    args = [queries[c].tolist() for c in ("user_id", "item_id", "surface", "device")]
    results = [s.lookup_many(*args, t) for s in stores]
    labels = queries.assign(ts=pd.to_datetime(t, unit="ms", utc=True))
    offline = build_point_in_time(events, labels, stores[0].feature_set, engine="numpy")
    for result in results:
        assert result.exact.all() and result.as_of_ms == watermark
        assert_frames_identical(result.features, offline)


def _queries(events: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Keys of real events, recombined (empty histories too), plus unknown entities."""
    rng = np.random.default_rng(seed)
    pick = lambda c: events[c].to_numpy()[rng.integers(0, len(events), n)]  # noqa: E731
    q = pd.DataFrame({c: pick(c) for c in ("user_id", "item_id", "surface", "device")})
    q.loc[: n // 10, "user_id"] = "nobody"
    return q


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_bulk_load_of_project_events_equals_incremental_ingest(
    backend: str, project_events: pd.DataFrame, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Small preset: everything that arrived until the last day bulk-loaded; the last day
    then ingested in batches into every store."""
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    stream = arrivals(project_events)
    cut = int(stream["arrival_ms"].max()) - 86_400_000
    before, after = stream[stream["arrival_ms"] < cut], stream[stream["arrival_ms"] >= cut]
    bulk, one, inc = (_open(u) for u in _urls(backend, tmp_path, redis_url))
    rng = random.Random(7)
    try:
        report = bulk.bulk_load(before.drop(columns=["arrival_ms"]))
        # The stream holds each clicked impression twice (unclicked, then with its click).
        assert report.rows == len(before) and report.rejected == 0
        assert report.duplicates == int((before["clicked"] == 1).sum())
        one.ingest(before.drop(columns=["arrival_ms"]))
        assert_same_store(bulk, one)
        ingest_shuffled([inc], before, rng, batches=6)
        assert_same_history(bulk, inc)
        queries = _queries(project_events, 3000, seed=1)
        lookups_agree([bulk, inc], project_events, queries, rng, complete=False)
        assert bulk.stats()["watermark_ms"] < cut

        ingest_shuffled(
            [bulk, one, inc], after, rng, batches=3
        )  # later events: incremental from here
        assert_same_store(bulk, one)
        assert_same_history(bulk, inc)
        lookups_agree([bulk, inc], project_events, queries, rng)
        with pytest.raises(StoreError, match="not empty.*mlops features ingest"):
            bulk.bulk_load(before.drop(columns=["arrival_ms"]))
    finally:
        for s in (bulk, one, inc):
            s.close()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    which=st.sampled_from(sorted(FEATURE_SETS)),
    lateness_ms=st.sampled_from([0, 1000, 3000]),
)
def test_bulk_load_then_ingest_equals_incremental_on_generated_logs(
    data: st.DataObject, which: str, lateness_ms: int
) -> None:
    """Any log, any cut: bulk load + later batches == incremental batches == offline."""
    fs = FEATURE_SETS[which]
    events = data.draw(event_logs())
    stream = arrivals(events)
    cut = data.draw(st.integers(0, len(stream)))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    stores = [_open("sqlite:///:memory:", fs, lateness_ms / 1000) for _ in range(3)]
    bulk, one, inc = stores
    try:
        bulk.bulk_load(stream.iloc[:cut].drop(columns=["arrival_ms"]))
        one.ingest(stream.iloc[:cut].drop(columns=["arrival_ms"]))
        ingest_shuffled([inc], stream.iloc[:cut], rng)
        assert_same_store(bulk, one)
        assert_same_history(bulk, inc)
        queries = _queries(events, 6, seed=cut) if len(events) else None
        if queries is not None and cut:
            lookups_agree([bulk, inc], events, queries, rng, complete=False)
        ingest_shuffled(stores, stream.iloc[cut:], rng)
        assert_same_store(bulk, one)
        assert_same_history(bulk, inc)
        if queries is not None:
            lookups_agree([bulk, inc], events, queries, rng)
    finally:
        for s in stores:
            s.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_failed_bulk_load_leaves_the_store_empty(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    store = _open(_urls(backend, tmp_path, redis_url)[0])

    def chunks() -> Iterator[tuple[list[tuple[str, bytes]], list[tuple[str, int, int]]]]:
        yield [("user:u1", b"x" * 24)], [("e1", 1, 0)]
        raise RuntimeError("the event source failed")

    try:
        with pytest.raises(RuntimeError, match="event source failed"):
            store.write_bulk(chunks(), store.initial_meta(), {"rows": 1}, horizon=0)
        assert store.backend.is_empty() and store.stats()["watermark_ms"] == 0
        store.require_empty()  # a rerun may start
        store.ingest(arrivals(_few_events()).drop(columns=["arrival_ms"]))
        with pytest.raises(StoreError, match="not empty"):
            store.require_empty()
    finally:
        store.close()


def _few_events() -> pd.DataFrame:
    from tests.support.strategies import make_events

    base = int(pd.Timestamp("2026-03-01", tz="UTC").value // 1_000_000)
    return make_events(
        [
            {
                "event_id": f"e{i}",
                "ts": base + 1000 * i,
                "user_id": f"u{i % 2}",
                "item_id": "i0",
                "surface": "feed",
                "device": "mobile",
                "position": 1,
                "clicked": i % 2,
                "click_ts": base + 1000 * i + 500 if i % 2 else None,
            }
            for i in range(6)
        ]
    )


def _with_bad_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """A re-sent row (duplicate), an id re-sent with another ts (conflict), a bad device."""
    resent = rows.iloc[[5]]
    conflict = rows.iloc[[6]].assign(ts=rows["ts"].iloc[6] + pd.Timedelta(seconds=1))
    bad = rows.iloc[[7]].assign(event_id="bad-device", device="fridge")
    return pd.concat([rows, resent, conflict, bad], ignore_index=True)


def test_spark_bulk_load_writes_the_pandas_bulk_load(
    project_events: pd.DataFrame, tmp_path: Path
) -> None:
    """On the shared local[2] session (3 buckets, chunks of 1,000): the same bytes as pandas.

    Into SQLite only: the Redis writes are the ones the pandas path makes (tested above)."""
    from pipelines.features.spark_materialize import bulk_load_spark
    from tests.support.spark import local_session

    spark = local_session()
    stream = arrivals(project_events)
    cut = int(stream["arrival_ms"].max()) - 86_400_000
    log = _with_bad_rows(stream[stream["arrival_ms"] < cut].drop(columns=["arrival_ms"]))
    path = tmp_path / "log.parquet"
    log.to_parquet(path, index=False)
    frame = spark.read.parquet(str(path))
    pandas_store = _open(f"sqlite:///{tmp_path / 'pandas.db'}")
    spark_sqlite = _open(f"sqlite:///{tmp_path / 'spark.db'}")
    try:
        expected = pandas_store.bulk_load(log)
        assert (expected.rejected, sorted(expected.rejected_rows["event_id"])) == (
            2,
            sorted([log["event_id"].iloc[6], "bad-device"]),
        )
        report = bulk_load_spark(spark_sqlite, frame, buckets=3, chunk_rows=1000)
        for field in ("rows", "impressions", "clicks", "duplicates", "rejected"):
            assert getattr(report, field) == getattr(expected, field), field
        assert report.entities_written == expected.entities_written
        assert sorted(report.rejected_rows["event_id"]) == sorted(
            expected.rejected_rows["event_id"]
        )
        assert_same_store(spark_sqlite, pandas_store)
        later = stream[stream["arrival_ms"] >= cut].drop(columns=["arrival_ms"])
        for store in (pandas_store, spark_sqlite):
            store.ingest(later)
        assert_same_store(spark_sqlite, pandas_store)
        with pytest.raises(StoreError, match="not empty"):
            bulk_load_spark(spark_sqlite, frame)
    finally:
        for s in (pandas_store, spark_sqlite):
            s.close()


def test_cli_materialize_summary_and_refusal(project_events: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    project_events.iloc[:5000].to_parquet(path, index=False)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cmd = [sys.executable, "-m", "pipelines.cli", "features", "materialize"]
    args = ["--events", str(path), "--store", url]

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd + args, cwd=REPO, env=project_env(REPO), capture_output=True, text=True, timeout=120
        )

    done = run()
    assert done.returncode == 0, done.stderr
    assert "wrote " in done.stdout and "entity state(s)" in done.stdout
    assert "from 5,000 row(s)" in done.stdout and f"with pandas into {url}" in done.stdout
    head = project_events.iloc[:5000]
    latest = max(to_ms(head["ts"]).max(), to_ms(head["click_ts"].dropna()).max())
    with OnlineStore.open(url) as store:
        assert store.stats()["watermark_ms"] == int(latest)
    again = run()
    assert again.returncode == 1 and "is not empty" in again.stderr
