"""Tail latency of two builds of the service, side by side under the same open-loop load.

A tail measured in one run and compared with another run's reads the host as much as the
code. This serves two bentos of a BentoML home (for example the bento of a change and the
one built before it; `bentoml list` names them), one worker each, measures each one's
``/predict`` capacity at concurrency 8 (``wrk``), then sends both the same Poisson
arrivals (``benchmarks/_openloop.py``) at ``--share`` of the lower capacity, in rounds
that alternate their order (each bento started first for half of them), and reports
p50/p95/p99 per round and pooled. Each round also times ``/predict`` at concurrency 1
(``wrk``, ``--c1-seconds``; 0 skips it).

Usage::

    python benchmarks/tail_ab.py --project . --home .bentoml \\
        --tags ctr_service:<before> ctr_service:<after>
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import (  # noqa: E402
    ab_arguments,
    closed,
    post_json,
    serve_tags,
    start_orders,
)
from serving_latency import discard, predict_workload, stop_all  # noqa: E402

from benchmarks._loadgen import wrk  # noqa: E402
from benchmarks._machine import run_facts, run_line, save_results  # noqa: E402
from benchmarks._openloop import answered, open_loop  # noqa: E402
from tests.support.loadtest import percentiles  # noqa: E402


def main() -> None:
    parser = ab_arguments(__doc__.split("\n\n")[0], rounds=4, seconds=10.0, name="tail_ab")
    parser.add_argument("--share", type=float, default=0.6, help="of the lower capacity")
    parser.add_argument("--c1-seconds", type=float, default=0.0, help="wrk at concurrency 1")
    args = parser.parse_args()
    work, script, bodies = predict_workload(args.project, "tail-ab-")
    load_before = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    rounds: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {t: [] for t in args.tags}
    metadata: dict[str, Any] = {}  # per bento and start order
    capacity: dict[str, float] = {}
    rate = 0.0
    r = 0
    try:
        for order, count in start_orders(args.tags, args.rounds):
            procs, urls, releases = serve_tags(args.home, order, work)
            window = releases[order[0]]["policy"]["profile_window_seconds"]
            try:
                for url in urls.values():  # warm up
                    wrk(url, "/predict", bodies, 2, 2, script)
                if not capacity:  # measured once, in the first start order
                    capacity = {
                        t: wrk(u, "/predict", bodies, 8, 6, script)["req_per_s"]
                        for t, u in urls.items()
                    }
                    rate = args.share * min(capacity.values())
                    print(f"capacity at concurrency 8: {capacity}; open loop at {rate:.0f} req/s")
                for _ in range(count):
                    for tag in order if r % 2 == 0 else order[::-1]:
                        c1 = {}
                        if args.c1_seconds > 0:
                            c1 = wrk(urls[tag], "/predict", bodies, 1, args.c1_seconds, script)
                        began = time.time()
                        got = open_loop(urls[tag], "/predict", bodies, rate, args.seconds, seed=r)
                        got["c1"] = {k: c1[k] for k in ("req_per_s", "p50_ms", "p99_ms") if k in c1}
                        got["profile_window_closed"] = closed(began, window)
                        latencies[tag].extend(answered(got.pop("raw")))
                        rounds.append({"round": r, "tag": tag, "started_first": order[0], **got})
                        print(
                            r, tag, {k: got[k] for k in ("p50_ms", "p95_ms", "p99_ms")}, flush=True
                        )
                    r += 1
                for t, u in urls.items():
                    which = "first" if t == order[0] else "second"
                    metadata[f"{t} (started {which})"] = post_json(u + "/metadata")
            finally:
                stop_all(procs)
    finally:
        discard(work)
    report = {
        **run_facts(started_at, load_before),
        "capacity_c8": capacity,
        "rate": round(rate, 1),
        "rounds": rounds,
        "pooled": {t: percentiles(np.asarray(v)) for t, v in latencies.items()},
        "gc": {t: m.get("gc") for t, m in metadata.items()},
        "lane": {t: m.get("lane") for t, m in metadata.items()},
        "command": "python benchmarks/tail_ab.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(report: dict[str, Any]) -> str:
    lines_ = [
        "# Tail latency, two bentos side by side",
        "",
        run_line(report) + f". `/predict` capacity at concurrency 8: {report['capacity_c8']}; "
        "open loop at "
        f"{report['rate']} req/s for both.",
        "",
        "| round | bento | started first | p50 ms | p95 ms | p99 ms | a profile window closed "
        "| concurrency 1: req/s, p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    c1_rates: dict[str, list[float]] = {}
    for r in report["rounds"]:
        c1 = r.get("c1") or {}
        if c1:
            c1_rates.setdefault(r["tag"], []).append(c1["req_per_s"])
        lines_.append(
            f"| {r['round']} | {r['tag']} | {'yes' if r.get('started_first') == r['tag'] else ''} "
            f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{'yes' if r.get('profile_window_closed') else ''} | "
            + (f"{c1['req_per_s']}, {c1['p50_ms']} / {c1['p99_ms']}" if c1 else "")
            + " |"
        )
    for tag, p in report["pooled"].items():
        mean = c1_rates.get(tag)
        lines_.append(
            f"| all | {tag} | | {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | | "
            + (f"{sum(mean) / len(mean):.1f} (mean)" if mean else "")
            + " |"
        )
    lines_ += [
        "",
        "Garbage-collector pauses per generation over the whole run (`/metadata` gc):",
        "",
    ]
    for tag, gens in (report.get("gc") or {}).items():
        lines_.append(
            f"* {tag}: "
            + "; ".join(
                f"gen {g}: {v['collections']} collections, {v['total_ms']:.0f} ms, "
                f"longest {v['max_ms']:.1f} ms"
                for g, v in (gens or {}).items()
            )
        )
    for tag, calls in (report.get("lane") or {}).items():
        if calls:
            lines_.append(f"* {tag}: scoring calls run on the event loop / the lane: {calls}")
    lines_ += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines_)


if __name__ == "__main__":
    main()
