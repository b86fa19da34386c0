"""How late a serving thread wakes while background helpers use every core, by the
helpers' scheduling: none running, nice 19 in an autogroup at nice 19 (as
``helper_process.spawn_detached`` starts them), and the same launcher putting itself in
the idle scheduling class (``SCHED_IDLE``) first.

A probe thread of this process (normal priority, as a serving worker's threads) sleeps
1 ms and does 0.2 ms of work, again and again; its lateness is how long after the timer it
ran. Each helper is a busy loop started through the launcher (one per core, as the
profiling helper's parquet read uses every core), so every wakeup must take a core from
one. Modes alternate over ``--rounds``.

Usage::

    python benchmarks/helper_priority.py --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import run_facts, run_line, save_results  # noqa: E402
from pipelines.serving import helper_process  # noqa: E402

_IDLE_LINES = (
    "if hasattr(os, 'SCHED_IDLE'):\n"
    "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
)
_HOG = (
    "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nwhile True:\n    pass\n"
)


def probe(seconds: float) -> np.ndarray:
    """Lateness (ms) of 1 ms sleeps, each followed by 0.2 ms of work."""
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        time.sleep(0.001)
        woke = time.perf_counter()
        out.append((woke - started - 0.001) * 1000.0)
        while time.perf_counter() - woke < 0.0002:
            pass
    return np.array(out)


def hogs(mode: str, folder: Path, n: int) -> list[int]:
    """Start ``n`` busy helpers through the launcher in ``mode``; their pids."""
    launcher = helper_process.LAUNCHER
    if mode == "idle class":
        head = "import os, subprocess, sys\n"
        assert launcher.startswith(head)
        launcher = head + _IDLE_LINES + launcher[len(head) :]
    pids = []
    with mock.patch.object(helper_process, "LAUNCHER", launcher):
        for k in range(n):
            pid_file = folder / f"hog{k}.pid"
            pid_file.unlink(missing_ok=True)
            cmd = [sys.executable, "-c", _HOG, str(pid_file)]
            launched = helper_process.spawn_detached(cmd, folder / f"hog{k}.err")
            assert helper_process.reap([launched], wait_s=30) == ([], [])
            deadline = time.monotonic() + 30
            while not pid_file.is_file() or not pid_file.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            pids.append(int(pid_file.read_text()))
    time.sleep(0.5)  # past their start
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="helper_priority")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    modes = ["no helper", "nice 19", "idle class"]
    late: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                pids = [] if mode == "no helper" else hogs(mode, Path(folder), cores)
                try:
                    got = probe(args.seconds)
                finally:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
                late[mode].append(got)
                print(r, mode, f"p99 {np.percentile(got, 99):.2f} ms", flush=True)
                time.sleep(0.5)
    results = {}
    for mode, runs in late.items():
        x = np.concatenate(runs)
        results[mode] = {
            "wakeups": int(len(x)),
            "p50_ms": round(float(np.percentile(x, 50)), 3),
            "p99_ms": round(float(np.percentile(x, 99)), 3),
            "p999_ms": round(float(np.percentile(x, 99.9)), 3),
            "max_ms": round(float(x.max()), 3),
            "over_1ms": int((x > 1.0).sum()),
            "round_p99_ms": [round(float(np.percentile(v, 99)), 3) for v in runs],
        }
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    report = {
        **run_facts(started_at, load_before),
        "helpers": cores,
        "autogroup": autogroup.read_text().strip() if autogroup.exists() else "absent",
        "results": results,
        "command": "python benchmarks/helper_priority.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# A serving thread's wakeups beside busy helpers, by the helpers' scheduling",
        "",
        run_line(report, python=True) + f"; {report['helpers']} busy helpers "
        f"started through the launcher; kernel autogroup {report['autogroup']}.",
        "",
        "| helpers | wakeups | lateness p50 / p99 / p99.9 / max ms | wakeups over 1 ms late "
        "| p99 per round ms |",
        "|---|---|---|---|---|",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"| {mode} | {r['wakeups']:,} | {r['p50_ms']} / {r['p99_ms']} / {r['p999_ms']} / "
            f"{r['max_ms']} | {r['over_1ms']:,} | {', '.join(map(str, r['round_p99_ms']))} |"
        )
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
