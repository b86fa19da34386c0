"""Served latency while the profiling helper works on a closed window, paced and not.

Builds a closed profile window of ``--rows`` served rows (sampled as the service samples,
``serving.profile_sample_rows``), serves the release bento with one worker (an hour-long
window, so that its own helper stays out of the way), measures its capacity (``wrk``,
concurrency 8) and sends ``/predict`` at 60% of it from the open-loop generator in
phases that alternate over ``--rounds``: no helper; a helper started at the phase's
start through ``helper_process.spawn_detached`` as the service starts it, not paced; and
the same paced (``helper_process.PACE``). Each helper profiles its own copy of the
window; the next phase waits until it is done.

Usage::

    python benchmarks/helper_pacing.py --project . --bento build/bento/ctr_service.bento
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_latency import discard, stop  # noqa: E402
from window_profile import serve_without_helper, served_rows, write_window  # noqa: E402

from benchmarks._machine import run_facts, save_results  # noqa: E402
from benchmarks._openloop import open_loop  # noqa: E402
from pipelines.core.settings import load_settings  # noqa: E402
from pipelines.serving import helper_process  # noqa: E402
from pipelines.serving.window_rows import WINDOW_PREFIX, window_profile_path  # noqa: E402
from tests.support.loadtest import percentiles  # noqa: E402

PHASES = {"no helper": None, "helper, not paced": "none", "helper, paced": "paced"}


def start_helper(window: Path, folder: Path, pace: tuple[float, float] | None) -> tuple[int, Path]:
    """The service's helper on a fresh copy of ``window``; its launcher and profile path."""
    copy = folder / f"{WINDOW_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns()}.parquet"
    shutil.copyfile(window, copy)
    command = [sys.executable, "-m", "pipelines.serving.request_log", "profile", str(copy)]
    launcher = helper_process.spawn_detached(command, copy.with_suffix(".err"), pace)
    return launcher, window_profile_path(copy)


def first_seconds(raw: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Percentiles of the answered requests due in the first ``seconds`` of a phase."""
    due = np.asarray(raw["due_s"])
    ok = np.asarray([s == "200" for s in raw["status"]])
    return percentiles(np.asarray(raw["latency_ms"])[(due < seconds) & ok])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8_000_000, help="rows in the window")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0, help="per open-loop phase")
    parser.add_argument(
        "--pace", type=float, nargs=2, default=helper_process.PACE, help="run, pause seconds"
    )
    parser.add_argument("--name", default="helper_pacing")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    project = args.project.resolve()
    sample = load_settings(project).serving.profile_sample_rows
    work = Path(tempfile.mkdtemp(prefix="helper-pacing-"))
    try:
        print(f"building a window of {args.rows:,} served rows", flush=True)
        window = work / "window.parquet"
        built = write_window(served_rows(project, args.rows), window, sample)
        print(built, flush=True)
        served = serve_phases(args, project, work, window)
    finally:
        discard(work)
    report = {
        **run_facts(started_at, load_before),
        "window": built,
        "pace_s": list(args.pace),
        **served,
        "command": "python benchmarks/helper_pacing.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def serve_phases(
    args: argparse.Namespace, project: Path, work: Path, window: Path
) -> dict[str, Any]:
    helpers = work / "helpers"
    helpers.mkdir()
    proc, url, single, capacity = serve_without_helper(args.bento, project, work)
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name in PHASES}
    try:
        rate = 0.6 * capacity
        for r in range(args.rounds):
            for phase in list(PHASES) if r % 2 == 0 else list(PHASES)[::-1]:
                began = time.monotonic()
                helper = None
                if PHASES[phase] is not None:
                    pace = tuple(args.pace) if PHASES[phase] == "paced" else None
                    helper = start_helper(window, helpers, pace)  # type: ignore[arg-type]
                got = open_loop(url, "/predict", single, rate, args.seconds, seed=r)
                raw = got.pop("raw")
                got["first_4_s"] = first_seconds(raw, 4.0)
                if helper is not None:
                    launcher, profile = helper
                    assert helper_process.reap([launcher], wait_s=30)[1] == []
                    while not profile.exists():  # the next phase starts without a helper
                        assert time.monotonic() - began < 300, f"no profile {profile}"
                        time.sleep(0.1)
                    got["helper_done_s"] = round(time.monotonic() - began, 1)
                phases[phase].append(got)
                keys = ("p50_ms", "p95_ms", "p99_ms", "helper_done_s")
                print(r, phase, {k: got.get(k) for k in keys}, flush=True)
                time.sleep(1.0)
    finally:
        stop(proc)
    return {"capacity_c8": capacity, "rate": round(rate, 1), "phases": phases}


def _cells(rounds: list[dict[str, Any]]) -> str:
    return "; ".join(f"{x['p50_ms']} / {x['p95_ms']} / {x['p99_ms']}" for x in rounds)


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["window"]
    run, pause = (round(x * 1000) for x in r["pace_s"])
    out = [
        "# Served latency while the profiling helper works, paced and not",
        "",
        f"{r['started_at']}; {m['cores']} cores ({m['cpu']}), Python {m['python']}; load "
        f"average {r['load_average_before'][0]:.2f} before, {r['load_average_after'][0]:.2f} "
        f"after. The helper profiled a closed window of {w['rows_answered']:,} served rows "
        f"({w['rows_written']:,} written, a sample of {w['sample_rows']:,}); paced: "
        f"{run} ms running, {pause} ms stopped.",
        "",
        f"`/predict` from the open-loop generator at {r['rate']} req/s (60% of "
        f"{r['capacity_c8']} req/s at concurrency 8), one worker; each helper started at "
        "its phase's start. p50 / p95 / p99 ms per round:",
        "",
        "| phase | whole phase | its first 4 s | helper done after s |",
        "|---|---|---|---|",
    ]
    for phase, rounds in r["phases"].items():
        done = ", ".join(str(x["helper_done_s"]) for x in rounds if "helper_done_s" in x)
        whole, first = _cells(rounds), _cells([x["first_4_s"] for x in rounds])
        out.append(f"| {phase} | {whole} | {first} | {done or '-'} |")
    medians = ", ".join(
        f"{phase} {np.median([x['p99_ms'] for x in rounds]):.1f}"
        for phase, rounds in r["phases"].items()
    )
    out += ["", f"Median of the rounds' p99 (ms): {medians}."]
    out += ["", f"Reproduce: `{r['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
