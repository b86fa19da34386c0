"""Served latency while the request log's profile window closes, with a large window.

The request log keeps a whylogs profile per ``serving.profile_window_seconds`` window
(aligned to the wall clock) and hands each closed window's rows to a helper process.
This serves the release bento with one worker and a short window, fills one window with
``/predict_batch`` calls (closed loop, ``wrk``), then sends ``/predict`` at a fixed rate
(``benchmarks/_openloop.py``: Poisson arrivals, latency from the scheduled time) from
``--lead`` seconds before the window closes to ``--lead`` seconds after, and compares the
latency of the requests due before and after the close.

Usage::

    python benchmarks/window_roll.py --project . --bento build/bento/ctr_service.bento
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import TOKEN, batches, bento_release, post_json, serve_release  # noqa: E402
from serving_latency import full_bodies, service_env, stop  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import machine, save_results  # noqa: E402
from benchmarks._openloop import open_loop  # noqa: E402
from tests.support.loadtest import percentiles, workload_frame  # noqa: E402


def split(raw: dict[str, Any], boundary: float) -> dict[str, Any]:
    """Percentiles of the answered requests due before and after ``boundary`` (unix s)."""
    due = raw["started_unix"] + np.asarray(raw["due_s"])
    lat = np.asarray(raw["latency_ms"])
    ok = np.asarray([s == "200" for s in raw["status"]])
    out: dict[str, Any] = {}
    for name, keep in (("before the close", due < boundary), ("after the close", due >= boundary)):
        out[name] = {"requests": int(keep.sum()), **percentiles(lat[keep & ok])}
    second = np.floor(due - boundary).astype(int)
    out["p99 per second from the close"] = {
        int(s): round(float(np.percentile(lat[(second == s) & ok], 99)), 1)
        for s in sorted(set(second.tolist()))
        if ((second == s) & ok).any()
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, required=True)
    parser.add_argument("--window", type=float, default=60.0, help="profile window, seconds")
    parser.add_argument("--lead", type=float, default=10.0, help="seconds each side of the close")
    parser.add_argument("--rate", type=float, default=300.0, help="/predict requests per second")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    if args.window < 3 * args.lead:
        sys.exit("--window must be at least three times --lead")
    project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="window-roll-"))
    env = service_env(work, TOKEN)
    from pipelines.stages.packaging import import_bento

    tag = import_bento(args.bento.resolve(), work / "home").split('"')[1]
    release = bento_release(work / "home" / "bentos", profile_window_seconds=args.window)
    rows = workload_frame(project / "data", 3000)
    single = full_bodies(rows)
    single_file = lines(work / "single.txt", single)
    batch_file = lines(work / "batch.txt", batches(single, 1000, "requests"))
    script = wrk_script(work)
    load_before = os.getloadavg()
    proc, url = serve_release(tag, release, env, work, "full")
    try:
        # the start of a window, then fill it until `lead` seconds before it closes
        now = time.time()
        opened = (now // args.window + 1) * args.window
        time.sleep(opened - now + 0.5)
        boundary = opened + args.window
        fill_seconds = int(boundary - args.lead - time.time() - 1.0)
        print(f"filling the window for {fill_seconds:.0f} s with 1000-row batches", flush=True)
        fill = wrk(url, "/predict_batch", batch_file, 1, fill_seconds, script)
        time.sleep(max(0.0, boundary - args.lead - time.time() - 0.3))
        print(f"/predict at {args.rate:g}/s across the close", flush=True)
        result = open_loop(url, "/predict", single_file, args.rate, 2 * args.lead)
        time.sleep(3)
        meta = post_json(url + "/metadata")
    finally:
        stop(proc)
    # the helper that profiles the closed window (detached, nice 19) outlives the server;
    # wait for it so that the next benchmark does not share the cores with it
    from pipelines.serving.request_log import pending_windows, settle_profiles

    settle_profiles(work / "live", 900)
    profiled_after = round(time.time() - boundary, 1)
    left = [p.name for p in pending_windows(work / "live")]
    report = {
        "benchmark": "window_roll",
        "machine": machine(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "window_seconds": args.window,
        "rows_in_window": fill["requests"] * 1000,
        "fill": fill,
        "rate": args.rate,
        "achieved_rate": result["achieved_rate"],
        "errors": result["errors"],
        "latency": split(result["raw"], boundary),
        "request_log": meta.get("request_log"),
        "window_profiled_within_s": profiled_after,
        "windows_not_profiled": left,
        "command": "python benchmarks/window_roll.py " + " ".join(sys.argv[1:]),
    }

    def markdown(r: dict[str, Any]) -> str:
        m = r["machine"]
        out = [
            "# Served latency while a profile window closes",
            "",
            f"{m['date']}, {m['cores']} cores ({m['cpu']}), load average "
            f"{r['load_average_before'][0]} before, {r['load_average_after'][0]} after; one "
            f"worker, {r['window_seconds']:g} s profile window holding "
            f"{r['rows_in_window']:,} rows when it closed.",
            "",
            f"`/predict` at {r['rate']:g} req/s (achieved {r['achieved_rate']}), "
            f"{r['errors']} errors:",
            "",
            "| requests due | n | p50 ms | p95 ms | p99 ms | max ms |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("before the close", "after the close"):
            p = r["latency"][name]
            out.append(
                f"| {name} | {p['requests']} | {p.get('p50_ms')} | {p.get('p95_ms')} | "
                f"{p.get('p99_ms')} | {p.get('max_ms')} |"
            )
        per_second = ", ".join(
            f"{s:+d} s: {v}" for s, v in r["latency"]["p99 per second from the close"].items()
        )
        out += ["", f"p99 per second from the close (ms): {per_second}", ""]
        out += [
            f"The closed window's profile was written within {r['window_profiled_within_s']} s "
            f"of the close by its helper process (nice 19); not profiled: "
            f"{r['windows_not_profiled'] or 'none'}.",
            "",
        ]
        out += [f"Reproduce: `{r['command']}`", ""]
        return "\n".join(out)

    print(save_results(args.out, "window_roll", report, markdown))


if __name__ == "__main__":
    main()
