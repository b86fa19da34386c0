"""Online store: ingest throughput, lookup latency and event-to-visible freshness.

For the SQLite backend (a file) and the Redis backend (a real ``redis-server``
started on a free loopback port and stopped afterwards):

* ingest: the full sample preset replayed as its arrival stream (impressions at
  ``ts``, click re-sends at ``click_ts``) in batches, events/s;
* lookup: single-request ``lookup`` latency, p50/p99 over random request keys,
  in one process (after ``gc.freeze()``, as the service does);
* freshness: a reader (its own connection, another thread) polls a lookup while
  the writer ingests a batch holding a brand-new event; the time from the
  ingest call to the first lookup that shows the event, p50/p99/max.

``--bulk`` measures instead the bulk load of an empty SQLite store from the same
arrival stream (``OnlineStore.bulk_load``; with ``--spark-master local[2]`` also
``bulk_load_spark`` from a parquet copy) against incremental ingest of it in
batches, and checks the stores hold the same bytes (results:
``benchmarks/results/online_store_bulk.{json,md}``).

Run: ``python benchmarks/online_store.py`` (results go to
``benchmarks/results/online_store.{json,md}``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tests.support.store import RedisServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bench_backend(url: str, stream: Any, events: Any, batch: int, lookups: int) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from pipelines.features.definitions import to_ms
    from pipelines.features.online_store import OnlineStore

    cols = [c for c in stream.columns if c != "arrival_ms"]
    store = OnlineStore.open(url, "ctr_v1", allowed_lateness_seconds=3600)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(stream), batch):
        report = store.ingest(stream.iloc[i : i + batch][cols])
        assert report.rejected == 0
    ingest_s = time.perf_counter() - start
    # CPU seconds of this process (SQLite runs in it; a Redis server does not): on a machine
    # shared with other jobs, events per CPU-second is the figure that does not move with load.
    ingest_cpu = time.process_time() - cpu
    load = os.getloadavg()[0]
    print(f"  ingested {len(stream):,} arrivals in {ingest_s:.1f} s", flush=True)
    watermark = store.stats()["watermark_ms"]

    rng = np.random.default_rng(0)
    picks = events.iloc[rng.integers(0, len(events), lookups)]
    users, items = picks["user_id"].tolist(), picks["item_id"].tolist()
    surfaces, devices = picks["surface"].tolist(), picks["device"].tolist()
    for i in range(200):  # warm-up
        store.lookup(users[i], items[i], surfaces[i], devices[i], watermark + 1)
    # As the service does after loading (bentos/service.py): move the objects loaded so far
    # out of the collector's generations, so a gen-2 pass over millions of them cannot land
    # inside a request.
    gc.collect()
    gc.freeze()
    latency = []
    for i in range(lookups):
        t0 = time.perf_counter()
        store.lookup(users[i], items[i], surfaces[i], devices[i], watermark + 1)
        latency.append(time.perf_counter() - t0)
    lat = np.array(latency) * 1000

    # Freshness: a new event ingested by the writer, polled for by a reader connection.
    reader = OnlineStore.open(url, "ctr_v1", allowed_lateness_seconds=3600)
    delays = []
    template = events.iloc[[0]].copy()
    for k in range(30):
        user = f"fresh-user-{k}"
        row = template.assign(
            event_id=f"fresh-{k}",
            user_id=user,
            clicked=0,
            ts=pd.Timestamp(watermark + 1000 * (k + 1), unit="ms", tz="UTC"),
        )
        row["click_ts"] = row["click_ts"].where(row["clicked"] == 1)  # NaT, same dtype
        t_query = int(to_ms(row["ts"])[0]) + 1
        seen = threading.Event()
        visible_at: list[float] = []

        def poll(
            user: str = user,
            t_query: int = t_query,
            seen: threading.Event = seen,
            visible_at: list[float] = visible_at,
        ) -> None:
            while not seen.is_set():
                got = reader.lookup(user, "i00000", "feed", "mobile", t_query)
                if got.features["user_impr_1h"].iloc[0] == 1:
                    visible_at.append(time.perf_counter())
                    seen.set()
                    return
                time.sleep(0.0005)

        thread = threading.Thread(target=poll)
        thread.start()
        t0 = time.perf_counter()
        store.ingest(row)
        seen.wait(timeout=30)
        thread.join(timeout=30)
        delays.append((visible_at[0] - t0) if visible_at else float("inf"))
    fresh = np.array(delays) * 1000
    store.close()
    reader.close()
    return {
        "events_ingested": int(len(stream)),
        "batch_rows": batch,
        "ingest_seconds": round(ingest_s, 2),
        "ingest_events_per_s": round(len(stream) / ingest_s),
        "ingest_events_per_cpu_s": round(len(stream) / ingest_cpu),
        "load_average_1m_after_ingest": round(load, 2),
        "lookups": lookups,
        "lookup_p50_ms": round(float(np.percentile(lat, 50)), 3),
        "lookup_p99_ms": round(float(np.percentile(lat, 99)), 3),
        "freshness_p50_ms": round(float(np.percentile(fresh, 50)), 1),
        "freshness_p99_ms": round(float(np.percentile(fresh, 99)), 1),
        "freshness_max_ms": round(float(fresh.max()), 1),
    }


def _timed(run: Any) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def _same_answers(url: str, reference: str, rows: Any) -> bool:
    """The same seen ids and the same vectors for 5,000 random requests at watermark + 1 ms.

    (States are not byte-identical to batched ingest: each records the watermark of its
    last write, and a batch prunes only the states it touches.)"""
    import sqlite3

    import numpy as np

    from pipelines.features.online_store import OnlineStore

    seen = []
    for u in (url, reference):
        con = sqlite3.connect(u[len("sqlite:///") :])
        seen.append(con.execute("SELECT * FROM seen ORDER BY 1").fetchall())
        con.close()
    pick = rows.iloc[np.random.default_rng(0).integers(0, len(rows), 5000)]
    keys = [pick[c].tolist() for c in ("user_id", "item_id", "surface", "device")]
    vectors = []
    for u in (url, reference):
        with OnlineStore.open(u, "ctr_v1", allowed_lateness_seconds=3600) as store:
            t = [store.stats()["watermark_ms"] + 1] * len(pick)
            vectors.append(store.lookup_many(*keys, t).features)
    return seen[0] == seen[1] and vectors[0].equals(vectors[1])


def bench_bulk(tmp: str, stream: Any, batch: int, spark_master: str | None) -> dict[str, Any]:
    """Bulk load vs incremental ingest of the same arrival stream into SQLite files."""
    from pipelines.features.online_store import OnlineStore

    rows = stream.drop(columns=["arrival_ms"])
    urls = {name: f"sqlite:///{tmp}/{name}.db" for name in ("ingest", "bulk", "spark")}
    out: dict[str, Any] = {"arrivals": int(len(rows)), "batch_rows": batch}
    with OnlineStore.open(urls["ingest"], "ctr_v1", allowed_lateness_seconds=3600) as store:
        out["ingest_seconds"], out["ingest_cpu_seconds"] = _timed(
            lambda: [store.ingest(rows.iloc[i : i + batch]) for i in range(0, len(rows), batch)]
        )
    print(f"  incremental ingest: {out['ingest_seconds']:.1f} s", flush=True)
    with OnlineStore.open(urls["bulk"], "ctr_v1", allowed_lateness_seconds=3600) as store:
        reports = []
        out["bulk_seconds"], out["bulk_cpu_seconds"] = _timed(
            lambda: reports.append(store.bulk_load(rows))
        )
        out["entities"] = reports[0].entities_written
    print(f"  bulk load (pandas): {out['bulk_seconds']:.1f} s", flush=True)
    out["bulk_equal_ingest"] = _same_answers(urls["bulk"], urls["ingest"], rows)
    if spark_master:
        from pipelines.features.spark_engine import spark_session
        from pipelines.features.spark_materialize import bulk_load_spark

        path = Path(tmp) / "arrivals.parquet"
        rows.to_parquet(path, index=False)
        spark = spark_session(spark_master, {"spark.ui.enabled": "false"})
        spark.sparkContext.setLogLevel("ERROR")
        spark.read.parquet(str(path)).count()  # session and Python workers warm
        with OnlineStore.open(urls["spark"], "ctr_v1", allowed_lateness_seconds=3600) as store:
            out["spark_seconds"], _ = _timed(
                lambda: bulk_load_spark(store, spark.read.parquet(str(path)))
            )
        out["spark_master"] = spark_master
        out["spark_equal_ingest"] = _same_answers(urls["spark"], urls["ingest"], rows)
        print(f"  bulk load (Spark {spark_master}): {out['spark_seconds']:.1f} s", flush=True)
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    for key in [k for k in out if k.endswith("_seconds")]:
        out[key] = round(out[key], 2)
    return out


def write_bulk(report: dict[str, Any]) -> None:
    r, m = report["results"], report["machine"]
    (RESULTS / "online_store_bulk.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        f"| incremental ingest, batches of {r['batch_rows']:,} | {r['ingest_seconds']} | "
        f"{r['ingest_cpu_seconds']} | {round(r['arrivals'] / r['ingest_seconds']):,} | - |",
        f"| bulk load, pandas | {r['bulk_seconds']} | {r['bulk_cpu_seconds']} | "
        f"{round(r['arrivals'] / r['bulk_seconds']):,} | {r['bulk_equal_ingest']} |",
    ]
    if "spark_seconds" in r:
        rows.append(
            f"| bulk load, Spark {r['spark_master']} | {r['spark_seconds']} | - | "
            f"{round(r['arrivals'] / r['spark_seconds']):,} | {r['spark_equal_ingest']} |"
        )
    lines = [
        "# Online store: bulk load vs incremental ingest (SQLite)",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"date {m['date']}; load average {r['load_average_1m']} at the end. Command: "
        f"`{report['command']}`. Stream: {r['arrivals']:,} arrivals, {r['entities']:,} entity "
        "states, feature set ctr_v1.",
        "",
        "| how | wall s | CPU s (this process) | arrivals/s | same seen ids, vectors as ingest |",
        "|---|---|---|---|---|",
        *rows,
    ]
    (RESULTS / "online_store_bulk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=Path, default=ROOT / "data" / "events.parquet")
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N events.")
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--lookups", type=int, default=5_000)
    parser.add_argument("--bulk", action="store_true", help="Bulk load vs ingest only.")
    parser.add_argument("--spark-master", default=None, help="With --bulk: also on Spark.")
    args = parser.parse_args()

    import pandas as pd
    from _machine import machine

    from pipelines.features.online_store import arrivals

    events = pd.read_parquet(args.events)
    if args.limit:
        events = events.iloc[: args.limit]
    stream = arrivals(events)
    command = "python benchmarks/online_store.py " + " ".join(sys.argv[1:])
    if args.bulk:
        with tempfile.TemporaryDirectory() as tmp:
            bulk = bench_bulk(tmp, stream, args.batch, args.spark_master)
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_bulk({"machine": machine(), "command": command, "results": bulk})
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("sqlite ...", flush=True)
        results["sqlite"] = bench_backend(
            f"sqlite:///{tmp}/online.db", stream, events, args.batch, args.lookups
        )
        print(results["sqlite"], flush=True)
        redis_server = RedisServer(Path(tmp) / "redis", persistent=False)
        redis_server.start()
        try:
            print("redis ...", flush=True)
            results["redis"] = bench_backend(
                redis_server.url, stream, events, args.batch, args.lookups
            )
            print(results["redis"], flush=True)
        finally:
            redis_server.stop()
    report = {
        "machine": machine(),
        "command": "python benchmarks/online_store.py " + " ".join(sys.argv[1:]),
        "events": int(len(events)),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "online_store.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# Online store",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"date {m['date']}. Command: `{report['command']}`. Stream: {len(stream):,} arrivals "
        f"({len(events):,} impressions plus click re-sends), feature set ctr_v1.",
        "",
        "| backend | ingest events/s | events per CPU-s (ingesting process) | load avg (1 min) "
        "| batch rows | lookup p50 ms | lookup p99 ms "
        "| freshness p50 ms | freshness p99 ms | freshness max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ingest_events_per_s']:,} | {r['ingest_events_per_cpu_s']:,} | "
            f"{r['load_average_1m_after_ingest']} | {r['batch_rows']:,} | "
            f"{r['lookup_p50_ms']} | {r['lookup_p99_ms']} | {r['freshness_p50_ms']} | "
            f"{r['freshness_p99_ms']} | {r['freshness_max_ms']} |"
        )
    (RESULTS / "online_store.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'online_store.json'} and {RESULTS / 'online_store.md'}")


if __name__ == "__main__":
    main()
