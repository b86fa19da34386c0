"""Offline point-in-time build: numpy, DuckDB and Spark engines vs a hand-written query and pandas.

Every implementation runs in its own subprocess (clean peak memory: VmHWM of the
child) on the same parquet inputs, writes its feature table, and the parent
checks all outputs equal before recording anything. ``spark_engine`` runs the
project's Spark engine on a session of ``--spark-master`` (default ``local[2]``,
driver memory ``--spark-driver-memory``); its session start-up is timed apart from
the build, its peak memory adds the JVM's VmHWM to the Python child's, and
``--spark-sizes`` limits it to some sizes. Sizes:

* ``full``: the full sample preset (~1.5M events), one label row per impression
  (exactly what the build_dataset stage computes): decides ``features.engine``;
* ``1m``: ~1M events x 100k label rows;
* ``10m``: ~10M events x 1M label rows (generated in 2M-event chunks; the exact
  counts vary by a few hundred because the generator draws its size).

Feature sets: ``user_windows`` (user impressions in 1h/24h/7d: the issue's
reference, with a hand-written DuckDB range join) and ``ctr_v1`` (all 18).

Run: ``python benchmarks/feature_build.py --sizes full 1m 10m`` (results go to
``benchmarks/results/feature_build.{json,md}``, or to ``--out``; inputs are cached in
``benchmarks/data/``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = Path(__file__).resolve().parent / "data"
RESULTS = Path(__file__).resolve().parent / "results"
SIZES: dict[str, tuple[int, int]] = {
    "full": (0, 0),
    "1m": (1_000_000, 100_000),
    "10m": (10_000_000, 1_000_000),
}
STRING_COLUMNS = ["user_id", "item_id", "surface", "device"]


def feature_sets() -> dict[str, Any]:
    from pipelines.features.definitions import CTR_V1, FeatureSet

    user_windows = FeatureSet(
        name="user_windows",
        features=tuple(CTR_V1[n] for n in ("user_impr_1h", "user_impr_24h", "user_impr_7d")),
        categorical=(),
    )
    return {"user_windows": user_windows, "ctr_v1": CTR_V1}


# ----------------------------------------------------------------------------- inputs


def make_inputs(size: str) -> tuple[Path, Path]:
    """Events and labels parquet files for a size (generated once, cached)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.domain import Preset
    from pipelines.simulation.generate import generate_events

    DATA.mkdir(parents=True, exist_ok=True)
    events_path, labels_path = DATA / f"events_{size}.parquet", DATA / f"labels_{size}.parquet"
    if events_path.exists() and labels_path.exists():
        return events_path, labels_path
    if size == "full":
        src = ROOT / "data" / "events.parquet"
        if not src.exists():
            raise SystemExit("data/events.parquet is missing: run `make data` first")
        table = pq.read_table(src)
        pq.write_table(table, events_path)
        pq.write_table(table.select([*STRING_COLUMNS, "ts"]), labels_path)
        return events_path, labels_path
    n_events, n_labels = SIZES[size]
    # Chunks of 2M keep the generator's memory low; users/items span all chunks.
    chunk = min(n_events, 2_000_000)
    writer = None
    tmp = events_path.with_suffix(".tmp")
    for k in range(n_events // chunk):
        preset = Preset(
            n_users=max(30_000, n_events // 50),
            n_items=max(4_000, n_events // 500),
            days=28,
            events=chunk,
        )
        frame = generate_events(preset, seed=100 + k)
        frame["event_id"] = f"c{k}-" + frame["event_id"]
        table = pa.Table.from_pandas(frame, preserve_index=False)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
        print(f"  generated chunk {k + 1}/{n_events // chunk}", flush=True)
    assert writer is not None
    writer.close()
    tmp.rename(events_path)
    events = pq.read_table(events_path, columns=[*STRING_COLUMNS, "ts"])
    rng = np.random.default_rng(7)
    pick = np.sort(rng.choice(events.num_rows, size=n_labels, replace=False))
    pq.write_table(events.take(pick), labels_path)
    return events_path, labels_path


def read_inputs(events_path: Path, labels_path: Path) -> tuple[Any, Any]:
    import pyarrow.parquet as pq

    cols = [*STRING_COLUMNS, "ts", "clicked", "click_ts"]
    events = pq.read_table(events_path, columns=cols, read_dictionary=STRING_COLUMNS)
    labels = pq.read_table(labels_path, read_dictionary=STRING_COLUMNS)
    return events, labels


# ----------------------------------------------------------------------------- implementations


def run_engine(engine: str, events: Any, labels: Any, fs: Any) -> Any:
    from pipelines.features.offline import build_point_in_time

    return build_point_in_time(events, labels, fs, engine=engine)


def run_handwritten_duckdb(events: Any, labels: Any, fs: Any) -> Any:
    """The query one would write by hand: a range join over the last 7 days, filtered counts."""
    import duckdb
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if fs.name != "user_windows":
        raise NotImplementedError("hand-written query only for user_windows")
    lab = labels.append_column("rid", pa.array(np.arange(labels.num_rows)))
    con = duckdb.connect(config={"threads": os.cpu_count() or 1})
    con.register("events", events)
    con.register("labels", lab)
    result = con.sql(
        """
        SELECT l.rid,
          count(e.ts) FILTER (WHERE e.ts > l.ts - INTERVAL 1 HOUR) AS user_impr_1h,
          count(e.ts) FILTER (WHERE e.ts > l.ts - INTERVAL 24 HOUR) AS user_impr_24h,
          count(e.ts) AS user_impr_7d
        FROM labels l LEFT JOIN events e
          ON e.user_id = l.user_id AND e.ts < l.ts AND e.ts > l.ts - INTERVAL 7 DAY
        GROUP BY l.rid
        """
    ).to_arrow_table()
    frame = result.to_pandas().sort_values("rid")
    return pd.DataFrame({n: frame[n].to_numpy(np.float64) for n in fs.names})


def run_pandas(events: Any, labels: Any, fs: Any) -> Any:
    """Straightforward pandas: per entity, cumulative counts + merge_asof at t and t - w."""
    import numpy as np
    import pandas as pd

    from pipelines.features.definitions import CONTEXT, ENTITY_KEYS, to_ms

    ev = events.to_pandas()
    lab = labels.to_pandas()
    lab["t"] = to_ms(lab["ts"])
    lab["rid"] = np.arange(len(lab))
    ev["t"] = to_ms(ev["ts"])
    clicked = ev["clicked"].to_numpy() == 1
    out = pd.DataFrame(index=lab.index)
    cache: dict[tuple[str, ...], pd.DataFrame] = {}

    def key_frame(frame: pd.DataFrame, entity: str) -> pd.Series:
        cols = ENTITY_KEYS[entity]
        key = frame[cols[0]].astype(str)
        for c in cols[1:]:
            key = key + "|" + frame[c].astype(str)
        return key

    def stats(entity: str, source: str, window: int | None) -> pd.DataFrame:
        """Per label: events before t (n), events <= t - w (n_old), latest event time."""
        ck = (entity, source, str(window))
        if ck in cache:
            return cache[ck]
        if source == "impressions":
            src = pd.DataFrame({"key": key_frame(ev, entity), "e_t": ev["t"]})
        else:
            src = pd.DataFrame(
                {"key": key_frame(ev[clicked], entity), "e_t": to_ms(ev.loc[clicked, "click_ts"])}
            )
        src = src.sort_values(["e_t"], kind="stable")
        src["cum"] = src.groupby("key").cumcount() + 1
        q = pd.DataFrame({"key": key_frame(lab, entity), "t": lab["t"], "rid": lab["rid"]})
        q = q.sort_values("t", kind="stable")
        before = pd.merge_asof(
            q, src, left_on="t", right_on="e_t", by="key", allow_exact_matches=False
        )
        res = pd.DataFrame(
            {"n": before["cum"].fillna(0).to_numpy(), "last": before["e_t"].to_numpy()},
            index=before["rid"].to_numpy(),
        )
        if window is not None:
            q2 = q.assign(t=q["t"] - window)
            old = pd.merge_asof(
                q2, src, left_on="t", right_on="e_t", by="key", allow_exact_matches=True
            )
            res["n"] = res["n"] - pd.Series(
                old["cum"].fillna(0).to_numpy(), index=old["rid"].to_numpy()
            )
        res = res.sort_index()
        cache[ck] = res
        return res

    for f in fs.features:
        if f.agg == "context":
            out[f.name] = CONTEXT[f.name][1](
                lab["surface"].astype(str).to_numpy(),
                lab["device"].astype(str).to_numpy(),
                lab["t"],
            )
            continue
        s = {src: stats(f.entity, src, f.window_ms) for src in f.sources}
        empty = np.logical_and.reduce([s[src]["n"].to_numpy() == 0 for src in f.sources])
        if f.agg == "count":
            value = s[f.sources[0]]["n"].to_numpy(np.float64)
        elif f.agg == "ctr":
            value = (s["clicks"]["n"].to_numpy() + fs.prior_strength * fs.prior_ctr) / (
                s["impressions"]["n"].to_numpy() + fs.prior_strength
            )
        else:
            value = (lab["t"].to_numpy() - s[f.sources[0]]["last"].to_numpy()) / 1000.0
        if f.ttl_ms is not None:
            last = np.fmax.reduce([s[src]["last"].to_numpy(np.float64) for src in f.sources])
            empty |= np.isnan(last) | (lab["t"].to_numpy() - last >= f.ttl_ms)
        out[f.name] = np.where(empty, float(f.default), value)
    return pd.DataFrame({f.name: out[f.name].to_numpy().astype(f.dtype) for f in fs.features})


IMPLEMENTATIONS = {
    "duckdb_engine": lambda e, lab, fs: run_engine("duckdb", e, lab, fs),
    "numpy_engine": lambda e, lab, fs: run_engine("numpy", e, lab, fs),
    # The session is started (and timed) by the child before the build; the engine
    # picks up the active session.
    "spark_engine": lambda e, lab, fs: run_engine("spark", e, lab, fs),
    "handwritten_duckdb": run_handwritten_duckdb,
    "pandas": run_pandas,
}


# ----------------------------------------------------------------------------- process memory


def _status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(x.split()[1]) for x in fh if x.startswith(field + ":")), 0)
    except OSError:
        return 0


def _cpu_s(pid: int | str) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``), 0 if gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` and its command name (the JVM is ``java``)."""
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        head, tail = stat.rsplit(")", 1)
        parent[int(entry)] = int(tail.split()[1])
        comm[int(entry)] = head.split("(", 1)[1]
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child_pid, ppid in parent.items():
            if ppid == p and child_pid not in found:
                found[child_pid] = comm[child_pid]
                frontier.append(child_pid)
    return found


class RssSampler(threading.Thread):
    """Samples the summed RSS of this process and its descendants (the JVM) every 0.2 s:
    the peak of the sum, which the per-process high-water marks can only bound."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            pids = [os.getpid(), *descendants(os.getpid())]
            self.peak_kib = max(self.peak_kib, sum(_status_kib(p, "VmRSS") for p in pids))


def child(
    impl: str,
    events_path: Path,
    labels_path: Path,
    set_name: str,
    out: Path,
    spark_conf: dict[str, str] | None = None,
) -> None:
    """Run one implementation; print wall times, CPU time and peak memory as JSON."""
    extra: dict[str, Any] = {}
    sampler = None
    if impl == "spark_engine":
        from pipelines.features.spark_engine import spark_session

        conf = dict(spark_conf or {})
        master = conf.pop("master")
        sampler = RssSampler()
        sampler.start()
        t0 = time.perf_counter()
        spark = spark_session(master, conf)
        spark.range(1).count()  # the JVM and its first job are up
        extra["session_start_s"] = round(time.perf_counter() - t0, 2)
        jconf = spark.sparkContext.getConf()
        extra["spark"] = {
            "version": spark.version,
            "master": spark.sparkContext.master,
            "default_parallelism": spark.sparkContext.defaultParallelism,
            "conf": {k: jconf.get(k, "(default)") for k in sorted({*conf, "spark.driver.memory"})},
            "sql.shuffle.partitions": spark.conf.get("spark.sql.shuffle.partitions"),
            "sql.adaptive.enabled": spark.conf.get("spark.sql.adaptive.enabled"),
        }
        jvms = [p for p, name in descendants(os.getpid()).items() if name == "java"]
        if len(jvms) != 1:
            raise RuntimeError(f"expected one JVM child, found {jvms}")
        jvm = jvms[0]
    start = time.perf_counter()
    events, labels = read_inputs(events_path, labels_path)
    loaded = time.perf_counter()
    cpu0 = sum(os.times()[:2]) + (_cpu_s(jvm) if sampler else 0.0)
    table = IMPLEMENTATIONS[impl](events, labels, feature_sets()[set_name])
    done = time.perf_counter()
    cpu1 = sum(os.times()[:2]) + (_cpu_s(jvm) if sampler else 0.0)
    table.to_parquet(out, index=False)
    # VmHWM is this process's own high-water mark; ru_maxrss would carry the parent's
    # peak across fork + exec on Linux.
    peak_kib = _status_kib("self", "VmHWM")
    if sampler is not None:
        # The JVM's high-water mark, read before the session stops (Python workers, if
        # any ran, are counted too: every descendant of this process).
        others = descendants(os.getpid())
        jvm_kib = _status_kib(jvm, "VmHWM")
        workers_kib = sum(_status_kib(p, "VmHWM") for p in others if p != jvm)
        sampler.stop.set()
        sampler.join()
        extra.update(
            python_peak_mib=round(peak_kib / 1024),
            jvm_peak_mib=round(jvm_kib / 1024),
            workers_peak_mib=round(workers_kib / 1024),
            sampled_sum_peak_mib=round(sampler.peak_kib / 1024),
        )
        peak_kib += jvm_kib + workers_kib
        spark.stop()
    print(
        json.dumps(
            {
                "load_s": round(loaded - start, 2),
                "build_s": round(done - loaded, 2),
                "total_s": round(done - start, 2),
                "build_cpu_s": round(cpu1 - cpu0, 1),
                "peak_mib": round(peak_kib / 1024),
                **extra,
            }
        )
    )


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["full", "1m", "10m"], choices=list(SIZES))
    parser.add_argument("--sets", nargs="+", default=["user_windows", "ctr_v1"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--spark-master", default="local[2]", help="spark_engine's master URL")
    parser.add_argument("--spark-driver-memory", default="8g", help="spark.driver.memory")
    parser.add_argument(
        "--spark-sizes",
        nargs="+",
        choices=list(SIZES),
        help="run spark_engine only at these sizes (default: every size in --sizes)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument("--child", nargs=5, metavar=("IMPL", "EVENTS", "LABELS", "SET", "OUT"))
    args = parser.parse_args()
    spark_conf = {
        "master": args.spark_master,
        "spark.driver.memory": args.spark_driver_memory,
        "spark.ui.enabled": "false",
    }
    if args.child:
        impl, ev, lab, set_name, out = args.child
        child(impl, Path(ev), Path(lab), set_name, Path(out), spark_conf)
        return

    import numpy as np
    import pandas as pd
    from _machine import machine, save_results

    results: Path = args.out
    results.mkdir(parents=True, exist_ok=True)
    target = results / "feature_build.json"
    load_before = os.getloadavg()
    previous = json.loads(target.read_text()) if target.exists() else {}
    runs: list[dict[str, Any]] = [
        r for r in previous.get("runs", []) if r["size"] not in args.sizes
    ]
    for size in args.sizes:
        print(f"== size {size}: preparing inputs", flush=True)
        events_path, labels_path = make_inputs(size)
        import pyarrow.parquet as pq

        n_events = pq.ParquetFile(events_path).metadata.num_rows
        n_labels = pq.ParquetFile(labels_path).metadata.num_rows
        for set_name in args.sets:
            outputs: dict[str, Path] = {}
            for impl in args.impls:
                if impl == "handwritten_duckdb" and set_name != "user_windows":
                    continue
                if size == "full" and impl not in ("duckdb_engine", "numpy_engine", "spark_engine"):
                    continue
                if impl == "spark_engine" and args.spark_sizes and size not in args.spark_sizes:
                    continue
                out = DATA / f"out_{size}_{set_name}_{impl}.parquet"
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    impl,
                    str(events_path),
                    str(labels_path),
                    set_name,
                    str(out),
                    "--spark-master",
                    args.spark_master,
                    "--spark-driver-memory",
                    args.spark_driver_memory,
                ]
                env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
                print(f"  {set_name} / {impl} ...", end=" ", flush=True)
                run = {
                    "size": size,
                    "events": n_events,
                    "labels": n_labels,
                    "features": set_name,
                    "impl": impl,
                }
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, env=env, timeout=args.timeout
                    )
                except subprocess.TimeoutExpired:
                    print("timeout", flush=True)
                    runs.append({**run, "status": "timeout", "timeout_s": args.timeout})
                    continue
                if proc.returncode != 0:
                    print("failed", flush=True)
                    runs.append({**run, "status": "failed", "error": proc.stderr[-2000:]})
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                print(result, flush=True)
                outputs[impl] = out
                runs.append({**run, "status": "ok", **result})
            # All outputs must be identical before any number counts.
            frames = {k: pd.read_parquet(v) for k, v in outputs.items()}
            ref_name = "numpy_engine" if "numpy_engine" in frames else next(iter(frames), None)
            for name, frame in frames.items():
                ref = frames[ref_name]
                equal = all(np.array_equal(frame[c].to_numpy(), ref[c].to_numpy()) for c in ref)
                for r in runs:
                    if (r["size"], r["features"], r["impl"]) == (size, set_name, name):
                        r["equal_to_numpy_engine"] = bool(equal)
                if not equal:
                    print(f"  !! {name} differs from {ref_name}", flush=True)
    report = {
        "machine": machine(),
        "command": "python benchmarks/feature_build.py " + " ".join(sys.argv[1:]),
        # The machine may be shared: the 1-minute load average before and after the run.
        "load_average_1m": {
            "before": round(load_before[0], 2),
            "after": round(os.getloadavg()[0], 2),
        },
        "runs": runs,
    }
    print(save_results(results, "feature_build", report, markdown))
    print(f"wrote {target} and {results / 'feature_build.md'}")


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = report.get("load_average_1m")
    lines = [
        "# Offline point-in-time build",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"date {m['date']}. Command: `{report['command']}`. Each implementation runs in its own "
        "process on the same parquet inputs; wall time is the build after loading the inputs, "
        "peak memory is the process's high-water RSS (VmHWM; for Spark the Python driver's "
        "plus the JVM's); CPU s is the build's user + system time (Python and JVM); every "
        "output was checked equal to the numpy engine's (column `equal`).",
        "",
    ]
    if load:
        lines += [
            f"The machine was shared with other jobs: 1-minute load average {load['before']} "
            f"before the run and {load['after']} after it, on {m['cores']} cores.",
            "",
        ]
    lines += [
        "| size | events | labels | features | implementation | build s | load s | peak MiB "
        "| build CPU s | events / CPU s | vs hand-written | equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = report["runs"]
    for r in runs:
        if r["status"] != "ok":
            lines.append(
                f"| {r['size']} | {r['events']:,} | {r['labels']:,} | {r['features']} | "
                f"{r['impl']} | {r['status']} | | | | | | |"
            )
            continue
        hand = next(
            (
                x
                for x in runs
                if x["size"] == r["size"]
                and x["features"] == r["features"]
                and x["impl"] == "handwritten_duckdb"
                and x["status"] == "ok"
            ),
            None,
        )
        ratio = f"{r['build_s'] / hand['build_s']:.2f}x" if hand else "-"
        cpu = r.get("build_cpu_s")
        rate = f"{r['events'] / cpu:,.0f}" if cpu else "-"
        lines.append(
            f"| {r['size']} | {r['events']:,} | {r['labels']:,} | {r['features']} | {r['impl']} | "
            f"{r['build_s']:.1f} | {r['load_s']:.1f} | {r['peak_mib']:,} | "
            f"{cpu if cpu is not None else '-'} | {rate} | {ratio} | "
            f"{r.get('equal_to_numpy_engine', '-')} |"
        )
    spark_runs = [r for r in runs if r["status"] == "ok" and "spark" in r]
    if spark_runs:
        lines += ["", "Spark runs (`spark_engine`):", ""]
        for r in spark_runs:
            sp = r["spark"]
            conf = ", ".join(f"`{k}={v}`" for k, v in sp["conf"].items())
            lines.append(
                f"- {r['size']} / {r['features']}: Spark {sp['version']} on `{sp['master']}` "
                f"(default parallelism {sp['default_parallelism']}; {conf}; "
                f"`spark.sql.shuffle.partitions={sp['sql.shuffle.partitions']}`, adaptive "
                f"{sp['sql.adaptive.enabled']}). Session start-up {r['session_start_s']} s "
                f"(not in build s). Peak: Python {r['python_peak_mib']:,} MiB + JVM "
                f"{r['jvm_peak_mib']:,} MiB + Python workers {r['workers_peak_mib']:,} MiB "
                f"(sum of high-water marks: {r['peak_mib']:,} MiB); the largest sampled "
                f"sum of their RSS (every 0.2 s) was {r['sampled_sum_peak_mib']:,} MiB."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
