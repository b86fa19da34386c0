"""Cost of a profile window's whylogs profile, every row against a sample, and its effect on
served latency.

1. builds a window of ``--rows`` served rows (features of the test set, surfaces, devices,
   predictions, routes) in 1000-row calls, as the request log's writer does
   (``WindowRows.add``, a row group every ``SPILL_ROWS``), once with every row and once
   with ``serving.profile_sample_rows`` from params.yaml; times the writer per 1000 rows;
2. runs the profiling helper (``profile_file``, nice 19 as the service starts it) on each
   window: wall and CPU time, peak memory, rows written and profiled;
3. with ``--bento``: serves it (one worker), measures its capacity (``wrk``, concurrency
   8) and sends ``/predict`` at 60% of it from the open-loop generator while no helper
   runs, while the helper profiles the whole window, and while it profiles the sample
   (each helper started 2 s before the phase), in alternating rounds.

Usage::

    python benchmarks/window_profile.py --project . --bento build/bento/ctr_service.bento
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import TOKEN, bento_release, serve_release  # noqa: E402
from serving_latency import discard, full_bodies, service_env, stop  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import machine, save_results  # noqa: E402
from benchmarks._openloop import open_loop  # noqa: E402
from pipelines.core.settings import load_settings  # noqa: E402
from pipelines.serving.request_log import LogBatch  # noqa: E402
from pipelines.serving.window_rows import SPILL_ROWS, WINDOW_PREFIX, WindowRows  # noqa: E402
from tests.support.loadtest import workload_frame  # noqa: E402

# The helper as the service runs it (helper_process.LAUNCHER: nice 19), reporting its own cost.
_HELPER = (
    "import json, os, resource, sys, time\n"
    "os.nice(19 - os.nice(0))\n"
    "began = time.perf_counter()\n"
    "from pathlib import Path\n"
    "from pipelines.serving.window_rows import profile_file\n"
    "profile_file(Path(sys.argv[1]))\n"
    "use = resource.getrusage(resource.RUSAGE_SELF)\n"
    "peak = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
    "print(json.dumps({'wall_s': round(time.perf_counter() - began, 2),\n"
    "    'cpu_s': round(use.ru_utime + use.ru_stime, 2), 'peak_rss_mb': peak // 1024}))\n"
)  # VmHWM: ru_maxrss would count the forking parent's memory too


def served_rows(project: Path, rows: int, seed: int = 0) -> list[LogBatch]:
    """``rows`` served rows in 1000-row calls: test-set features, surfaces and devices."""
    from pipelines.stages.dataset import load_split

    card = json.loads((project / "build/model/model_card.json").read_text())
    test = load_split(project / "build/dataset", "test")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(test), rows)
    X = test[card["features"]].to_numpy(np.float64)[pick]
    surfaces = test["surface"].to_numpy(object)[pick].tolist()
    devices = test["device"].to_numpy(object)[pick].tolist()
    probability = rng.random(rows)
    routes = np.where(rng.random(rows) < 0.9, "prod", "canary").tolist()
    out = []
    for start in range(0, rows, 1000):
        part = slice(start, min(start + 1000, rows))
        n = part.stop - part.start
        out.append(
            LogBatch(
                "predict_batch", "r", 0.0, 1.0, [""] * n, [""] * n, [""] * n,
                surfaces[part], devices[part], np.zeros(n, np.int64), probability[part],
                routes[part], [""] * n, [None] * n, np.zeros(n), card["features"], X[part],
            )
        )  # fmt: skip
    return out


def write_window(calls: list[LogBatch], path: Path, sample_rows: int) -> dict[str, Any]:
    """The window through ``WindowRows`` as the writer fills it; its cost and size."""
    window = WindowRows(sample_rows, seed=0)
    began = time.perf_counter()
    for batch in calls:
        window.add(batch)
        if window.waiting >= SPILL_ROWS:
            window.spill(path)
    window.finish(path)
    took = time.perf_counter() - began
    import pyarrow.parquet as pq

    return {
        "sample_rows": sample_rows,
        "rows_answered": window.answered,
        "rows_written": pq.ParquetFile(path).metadata.num_rows,
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "writer_ms_per_1000_rows": round(took * 1000 / (window.answered / 1000), 3),
    }


def run_helper(window: Path, work: Path) -> subprocess.Popen[str]:
    """Start the helper on a copy of ``window`` (it removes the file it profiles)."""
    copy = work / f"{WINDOW_PREFIX}{window.stem}-{time.monotonic_ns()}.parquet"
    shutil.copyfile(window, copy)
    return subprocess.Popen(
        [sys.executable, "-c", _HELPER, str(copy)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, help="also measure served latency (this bento)")
    parser.add_argument("--rows", type=int, default=3_000_000, help="rows in the window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12.0, help="per open-loop phase")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    project = args.project.resolve()
    sample = load_settings(project).serving.profile_sample_rows
    work = Path(tempfile.mkdtemp(prefix="window-profile-"))
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "window_profile",
        "machine": machine(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_before": [round(x, 2) for x in load_before],
        "rows": args.rows,
    }
    try:
        print(f"building a window of {args.rows:,} served rows", flush=True)
        calls = served_rows(project, args.rows)
        windows = {
            "whole window": work / "w.parquet",
            f"sample of {sample:,} rows": work / "s.parquet",
        }
        report["windows"] = {}
        for (name, path), k in zip(windows.items(), (0, sample), strict=True):
            report["windows"][name] = write_window(calls, path, k)
            helper = run_helper(path, work)
            out, _ = helper.communicate()
            report["windows"][name]["helper"] = json.loads(out)
            print(name, report["windows"][name], flush=True)
        del calls
        if args.bento:
            report["served"] = served(args, project, work, windows)
    finally:
        discard(work)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["command"] = "python benchmarks/window_profile.py " + " ".join(sys.argv[1:])
    print(save_results(args.out, "window_profile", report, markdown))


def served(
    args: argparse.Namespace, project: Path, work: Path, windows: dict[str, Path]
) -> dict[str, Any]:
    """Open-loop ``/predict`` latency at 60% of capacity with and without a helper running."""
    from pipelines.stages.packaging import import_bento

    env = service_env(work, TOKEN)
    tag = import_bento(args.bento.resolve(), work / "home").split('"')[1]
    # an hour-long window: the service's own helper does not run during the phases
    release = bento_release(work / "home" / "bentos", profile_window_seconds=3600)
    single = lines(work / "single.txt", full_bodies(workload_frame(project / "data", 3000)))
    script = wrk_script(work)
    proc, url = serve_release(tag, release, env, work, "full")
    phases: dict[str, list[dict[str, Any]]] = {"no helper": []}
    phases.update({f"helper profiling the {name}": [] for name in windows})
    try:
        wrk(url, "/predict", single, 2, 3, script)  # warm up
        capacity = wrk(url, "/predict", single, 8, 5, script)["req_per_s"]
        rate = 0.6 * capacity
        for r in range(args.rounds):
            order = list(phases) if r % 2 == 0 else list(reversed(phases))
            for phase in order:
                helper = None
                if phase != "no helper":
                    name = phase.removeprefix("helper profiling the ")
                    helper = run_helper(windows[name], work)
                    time.sleep(2.0)
                got = open_loop(url, "/predict", single, rate, args.seconds)
                got.pop("raw")
                if helper is not None:
                    got["helper_still_running"] = helper.poll() is None
                    helper.kill()
                    helper.communicate()
                phases[phase].append(got)
                print(r, phase, {k: got.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")}, flush=True)
    finally:
        stop(proc)
    return {"capacity_c8": capacity, "rate": round(rate, 1), "phases": phases}


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [
        "# Profile windows: every row against a sample",
        "",
        f"{r['started_at']}; {m['cores']} cores ({m['cpu']}), Python {m['python']}; load "
        f"average {r['load_average_before'][0]} before, {r['load_average_after'][0]} after. "
        f"A window of {r['rows']:,} served rows (test-set features) in 1000-row calls.",
        "",
        "| window profile | rows written | file MB | writer ms per 1000 rows | helper wall s "
        "| helper CPU s | helper peak MB | rows profiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, w in r["windows"].items():
        h = w["helper"]
        profiled = (
            w["rows_answered"]
            if not w["sample_rows"]
            else min(w["sample_rows"], w["rows_answered"])
        )
        out.append(
            f"| {name} | {w['rows_written']:,} | {w['file_mb']} | {w['writer_ms_per_1000_rows']} "
            f"| {h['wall_s']} | {h['cpu_s']} | {h['peak_rss_mb']} | {profiled:,} |"
        )
    if "served" in r:
        s = r["served"]
        out += [
            "",
            f"`/predict` from the open-loop generator at {s['rate']} req/s (60% of "
            f"{s['capacity_c8']} req/s at concurrency 8), one worker; each helper started 2 s "
            "before its phase (nice 19, as the service starts it); p50 / p95 / p99 ms per round:",
            "",
            "| phase | rounds | helper still running at the end |",
            "|---|---|---|",
        ]
        for phase, runs in s["phases"].items():
            rounds = "; ".join(f"{g['p50_ms']} / {g['p95_ms']} / {g['p99_ms']}" for g in runs)
            running = [g["helper_still_running"] for g in runs if "helper_still_running" in g]
            out.append(f"| {phase} | {rounds} | {', '.join(map(str, running)) or '-'} |")
    out += ["", f"Reproduce: `{r['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
