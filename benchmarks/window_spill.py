"""What writing one row group of the open profile window costs the serving threads.

The request log's writer thread spills the open window (``WindowRows.spill``) every
``SPILL_ROWS`` rows. Work it does with the GIL held delays the event loop, and an event
loop does many short system calls per request, each of which gives the GIL up and must win
it back (up to the 5 ms switch interval behind a busy thread). This builds a window of
real served rows (test-set features) from one-row calls and from 1000-row calls, for this
checkout's ``window_rows.py`` and for the one at ``--before`` (a git revision), and spills
one row group of each while a second thread makes short system calls (a byte through a
pipe, as a loop's socket calls): its calls per millisecond while the spill runs, against
the same thread alone (10 ms runs between the spills), and its longest gap.

Usage::

    python benchmarks/window_spill.py --project . --before <rev>
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import run_facts, run_line, save_results  # noqa: E402


def load_module(source: str, name: str) -> ModuleType:
    """``window_rows.py`` of one revision, imported under its own name (from memory)."""
    module = ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def syscall_rate(stop: threading.Event, measure: threading.Event, out: list[float]) -> None:
    """A byte through a pipe and back until ``stop`` (both calls give up the GIL); while
    ``measure`` is set it counts its calls and its longest gap between two: ``out``."""
    r, w = os.pipe()
    last, n, longest = time.perf_counter(), 0, 0.0
    while not stop.is_set():
        os.write(w, b"x")
        os.read(r, 1)
        now = time.perf_counter()
        if measure.is_set():
            longest = max(longest, now - last)
            n += 1
        last = now
    os.close(r)
    os.close(w)
    out[:] = [n, longest * 1000.0]


def beside(work: Any) -> dict[str, float]:
    """Run ``work()`` while the pipe thread runs: its ms, and the thread's calls per ms
    and longest gap (ms) meanwhile."""
    stop, measure = threading.Event(), threading.Event()
    out: list[float] = []
    thread = threading.Thread(target=syscall_rate, args=(stop, measure, out))
    thread.start()
    time.sleep(0.02)  # the thread running before the work starts
    measure.set()
    started = time.perf_counter()
    work()
    ms = (time.perf_counter() - started) * 1000.0
    measure.clear()
    stop.set()
    thread.join()
    return {"ms": ms, "calls_per_ms": out[0] / ms, "longest_gap_ms": out[1]}


def spill_once(module: ModuleType, calls: list[Any], folder: Path) -> dict[str, float]:
    """Fill a window with ``calls``, then spill it beside the pipe thread."""
    window = module.WindowRows(100_000, seed=1)
    for call in calls:
        window.add(call)
    got = beside(lambda: window.spill(folder / "window.parquet.part"))
    window.abandon()
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--before", required=True, help="git revision to compare with")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--name", default="window_spill")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    path = "pipelines/serving/window_rows.py"
    before = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{args.before}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modules = {
        f"before ({args.before})": load_module(before, "window_rows_before"),
        "now": load_module((REPO / path).read_text(), "window_rows_now"),
    }
    release = json.loads((args.project / "build/release/release.json").read_text())
    names = list(release["features"])
    test = pd.read_parquet(args.project / "build/dataset/test.parquet", columns=names)
    rows = modules["now"].SPILL_ROWS
    X = test.to_numpy(np.float64)[:rows]
    rng = np.random.default_rng(0)

    def call(sl: slice) -> SimpleNamespace:
        n = sl.stop - sl.start
        surfaces = ["feed", "search", "recs"]
        return SimpleNamespace(
            surfaces=[surfaces[i % 3] for i in range(n)],
            devices=["ios"] * n,
            routes=["prod"] * n,
            probability=rng.random(n),
            features=X[sl],
            feature_names=names,
        )

    shapes = {
        "one-row calls": [call(slice(i, i + 1)) for i in range(rows)],
        "1000-row calls": [call(slice(i, min(i + 1000, rows))) for i in range(0, rows, 1000)],
    }
    alone: list[float] = []
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for shape, calls in shapes.items():
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in modules}
            for k in range(args.repeat + 1):  # the first of each is a warm-up
                for label in modules if k % 2 == 0 else list(modules)[::-1]:
                    got = spill_once(modules[label], calls, Path(folder))
                    if k:
                        runs[label].append(got)
                        alone.append(beside(lambda: time.sleep(0.01))["calls_per_ms"])
            for label, got in runs.items():
                spill = np.array([g["ms"] for g in got])
                rate = np.array([g["calls_per_ms"] for g in got])
                gap = np.array([g["longest_gap_ms"] for g in got])
                results[f"{shape}, {label}"] = {
                    "spill_ms_median": round(float(np.median(spill)), 2),
                    "pipe_calls_per_ms_median": round(float(np.median(rate)), 1),
                    "longest_gap_ms_median": round(float(np.median(gap)), 2),
                    "longest_gap_ms_max": round(float(gap.max()), 2),
                }
                print(shape, label, results[f"{shape}, {label}"], flush=True)
    report = {
        **run_facts(started_at, load_before),
        "rows_per_group": rows,
        "features": len(names),
        "pipe_calls_per_ms_alone": round(float(np.median(alone)), 1),
        "results": results,
        "command": "python benchmarks/window_spill.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# One row group of the open profile window: what it costs the serving threads",
        "",
        run_line(report, python=True) + f". {report['rows_per_group']:,} rows of "
        f"{report['features']} features per row group; a thread making short system calls "
        f"(a byte through a pipe) ran {report['pipe_calls_per_ms_alone']} calls/ms alone "
        "(median of 10 ms runs between the spills). "
        "Medians of the runs, both versions alternating.",
        "",
        "| calls, version | spill ms | pipe thread's calls/ms during the spill "
        "| its longest gap ms, median / max |",
        "|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        lines.append(
            f"| {key} | {r['spill_ms_median']} | {r['pipe_calls_per_ms_median']} | "
            f"{r['longest_gap_ms_median']} / {r['longest_gap_ms_max']} |"
        )
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
