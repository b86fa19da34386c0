"""One hot item on the Spark engine: windowed counts as running counts against a sliding frame.

A single item gets ``--events`` impressions within one day (10% clicked); ``--labels`` of
them are scored with ``item_impr_24h`` and ``item_ctr_24h`` (window aggregates, no range
join). ``running`` is the engine's statement (running count of events minus running
count of their exits); ``sliding`` is the same statement with DuckDB's sliding ``RANGE``
frame, which Spark re-aggregates over its whole buffer each time it moves. Both are
checked equal to the numpy engine. Details: docs/feature_store.md ("Hot keys").

    python benchmarks/spark_hot_key.py --events 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import machine, save_results  # noqa: E402


def hot_item(n: int, n_labels: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    ts = start + pd.to_timedelta(np.sort(rng.integers(0, 86_400_000, n)), unit="ms")
    clicked = rng.random(n) < 0.1
    events = pd.DataFrame(
        {
            "user_id": [f"u{i % 5000}" for i in range(n)],
            "item_id": "hot",
            "surface": "feed",
            "device": "ios",
            "ts": ts,
            "clicked": clicked.astype(int),
            "click_ts": (ts + pd.Timedelta(seconds=30)).where(clicked),
        }
    )
    keys = ["user_id", "item_id", "surface", "device", "ts"]
    labels = events.sample(n=min(n, n_labels), random_state=1)[keys].reset_index(drop=True)
    return events, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=20_000)
    parser.add_argument("--variants", nargs="+", default=["running", "sliding"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()

    from pipelines.features import spark_engine, sql
    from pipelines.features.definitions import CTR_V1, FeatureSet
    from pipelines.features.offline import build_point_in_time

    events, labels = hot_item(args.events, args.labels)
    fs = FeatureSet(
        name="hot_item", features=(CTR_V1["item_impr_24h"], CTR_V1["item_ctr_24h"]), categorical=()
    )
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false"}
    spark = spark_engine.spark_session("local[2]", conf)
    spark.range(1).count()
    expected = build_point_in_time(events, labels, fs, engine="numpy")
    statement = sql.point_in_time_sql

    def sliding(*a: Any, **k: Any) -> str:  # DuckDB's sliding frames, Spark's quoting
        return statement(*a, **{**k, "dialect": "duckdb"}).replace('"', "`")

    rows = []
    try:
        for variant in args.variants:
            spark_engine.point_in_time_sql = sliding if variant == "sliding" else statement
            spark_engine.build_point_in_time_spark(events.head(1000), labels.head(10), fs, spark)
            started = time.perf_counter()
            got = spark_engine.build_point_in_time_spark(
                events, labels, fs, spark, range_join="never"
            )
            took = time.perf_counter() - started
            equal = all(np.array_equal(expected[c].to_numpy(), got[c].to_numpy()) for c in fs.names)
            rows.append({"variant": variant, "seconds": round(took, 1), "equal_numpy": equal})
            print(rows[-1], flush=True)
    finally:
        spark_engine.point_in_time_sql = statement
    report = {
        "benchmark": "spark_hot_key",
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "spark": {"version": spark.version, "master": spark.sparkContext.master},
        "events": args.events,
        "labels": len(labels),
        "rows": rows,
        "command": "python benchmarks/spark_hot_key.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, "spark_hot_key", report, markdown))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Spark engine: one hot item",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python "
        f"{m['python']}; Spark {report['spark']['version']} on {report['spark']['master']}; "
        f"date {report['date']}. One item with {report['events']:,} impressions in one day, "
        f"{report['labels']:,} of them scored with item_impr_24h and item_ctr_24h. "
        f"Command: `{report['command']}`.",
        "",
        "| statement | seconds | equal to numpy |",
        "|---|---|---|",
    ]
    names = {
        "running": "running count minus running exits (the engine)",
        "sliding": "sliding RANGE frame (DuckDB's statement)",
    }
    for r in report["rows"]:
        lines.append(f"| {names[r['variant']]} | {r['seconds']} | {r['equal_numpy']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
