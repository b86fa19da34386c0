"""The 60% tail as deployed: one bento served with one worker and with ``serving.workers``.

``serving_cost.py`` and ``tail_ab.py`` serve one worker per service, to compare a worker's
cost with the bare service's; production serves ``serving.workers`` (params: 2, one per
core). A worker is one GIL: at 60% of its capacity it is already about 75% busy, so a few
seconds of a slower host make a queue (``tail_trace.py``). This serves the bento twice
from one BentoML home, with 1 worker and with ``--workers`` (default: the release's own
``serving.workers``), measures each service's ``/predict`` capacity at concurrency 8
(``wrk``), then sends the open loop (``benchmarks/_openloop.py``) at ``--share`` of each
one's own capacity in rounds that alternate the two (each first in half of the rounds),
with the speed probe (``_machine.SpeedProbe``) timing the host through every round. It
reports each round's p50/p95/p99, the probe's median over the round and in its slowest
second, the rounds over the targets, and the latencies pooled per service.

Usage::

    python benchmarks/tail_workers.py --project . --bento build/bento/ctr_service.bento
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import TOKEN, bento_release, closed, serve_release  # noqa: E402
from serving_latency import discard, predict_workload, service_env, stop_all  # noqa: E402

from benchmarks._loadgen import wrk  # noqa: E402
from benchmarks._machine import SpeedProbe, run_facts, run_line, save_results  # noqa: E402
from benchmarks._openloop import answered, open_loop  # noqa: E402
from tests.support.loadtest import percentiles  # noqa: E402

P95_MS, P99_MS = 15.0, 30.0  # the targets of the 60% tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, required=True, help="an exported bento")
    parser.add_argument("--workers", type=int, help="the other service's (default: release's)")
    parser.add_argument("--rounds", type=int, default=6, help="per service")
    parser.add_argument("--seconds", type=float, default=12.0, help="per round")
    parser.add_argument("--share", type=float, default=0.6, help="of each one's capacity")
    parser.add_argument("--name", default="tail_workers")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    from pipelines.stages.packaging import import_bento

    work, script, bodies = predict_workload(args.project, "tail-workers-")
    load_before = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    env = service_env(work, TOKEN)
    procs = []
    try:
        tag = import_bento(args.bento.resolve(), work / "home").split('"')[1]
        shipped = json.loads(next((work / "home/bentos").rglob("release.json")).read_text())
        counts = [1, args.workers or int(shipped["policy"]["workers"])]
        urls: dict[int, str] = {}
        for n in counts:
            release = bento_release(work / "home/bentos", workers=n)
            proc, urls[n] = serve_release(tag, release, env, work, f"workers{n}")
            procs.append(proc)
        window = float(shipped["policy"]["profile_window_seconds"])
        capacity, rate = {}, {}
        for n, url in urls.items():
            wrk(url, "/predict", bodies, 8, 3, script)  # warm every worker up
            capacity[n] = wrk(url, "/predict", bodies, 8, 6, script)["req_per_s"]
            rate[n] = round(args.share * capacity[n], 1)
        print(f"capacity at concurrency 8 by workers: {capacity}; open loop at {rate}", flush=True)
        rounds: list[dict[str, Any]] = []
        pooled: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                probe, began = SpeedProbe(), time.time()
                probe.start()
                t0 = time.monotonic()
                got = open_loop(urls[n], "/predict", bodies, rate[n], args.seconds, seed=r)
                t1 = time.monotonic()
                probe.stopped.set()
                pooled[n].extend(answered(got.pop("raw")))
                got["probe_python_ms"] = probe.inside([(t0, t1)])["python_ms"]
                got["probe_slowest_second_ms"] = probe.slowest_second(t0, t1)
                got["profile_window_closed"] = closed(began, window)
                rounds.append({"round": r, "workers": n, **got})
                print(r, n, {k: got[k] for k in ("p50_ms", "p95_ms", "p99_ms")}, flush=True)
    finally:
        stop_all(procs)
        discard(work)
    report = {
        **run_facts(started_at, load_before),
        "bento": tag,
        "capacity_c8": capacity,
        "rate": rate,
        "rounds": rounds,
        "pooled": {n: percentiles(np.asarray(v)) for n, v in pooled.items()},
        "rounds_missed": {
            n: sum(1 for x in rounds if x["workers"] == n and not met(x)) for n in counts
        },
        "command": "python benchmarks/tail_workers.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def met(r: dict[str, Any]) -> bool:
    return r["p95_ms"] <= P95_MS and r["p99_ms"] <= P99_MS


def markdown(report: dict[str, Any]) -> str:
    out = [
        "# The 60% tail by number of workers",
        "",
        run_line(report) + f". Bento {report['bento']}. "
        f"`/predict` capacity at concurrency 8 by workers: {report['capacity_c8']}; the open "
        f"loop at {report['rate']} req/s. Targets: p95 at most {P95_MS:g} ms, p99 at most "
        f"{P99_MS:g} ms. The probe: median CPU ms of a fixed loop through the round (higher "
        "is a slower host).",
        "",
        "| round | workers | p50 ms | p95 ms | p99 ms | max ms | probe ms: round, slowest second "
        "| met | window closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        out.append(
            f"| {r['round']} | {r['workers']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} "
            f"| {r['max_ms']} | {r['probe_python_ms']}, {r['probe_slowest_second_ms']} | "
            f"{'yes' if met(r) else '**no**'} | "
            f"{'yes' if r['profile_window_closed'] else ''} |"
        )
    for n, p in report["pooled"].items():
        out.append(
            f"| all | {n} | {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {p['max_ms']} | | "
            f"{report['rounds_missed'][n]} rounds missed | |"
        )
    out += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
