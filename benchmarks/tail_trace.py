"""What the CPUs did while slow requests waited: the open loop under a kernel scheduler trace.

Serves one bento of a BentoML home (one worker), measures its ``/predict`` capacity at
concurrency 8 (``wrk``), then sends Poisson arrivals at ``--share`` of it
(``benchmarks/_openloop.py``) for ``--seconds`` while ``perf sched record`` traces every
context switch on every CPU (clock: CLOCK_MONOTONIC, so slices and requests share one time
line). Each request slower than ``--slow-ms`` marks the span from its scheduled send to its
answer. For the union of those spans and for the whole run it reports the CPU time by kind
of task (the worker's threads one by one, profiling helpers, the load generator, kernel
threads by name, other processes, idle), and the worker's main thread's running, runnable
(waiting for a CPU) and sleeping time, and the worker's CPU per answer; and for the closed
loop at concurrency 8 and the open loop, each thread's CPU per answer and the share of
scoring calls run on the event loop (``/metadata`` lane). A speed probe
(``_machine.SpeedProbe``) times a fixed loop every 20 ms through the run, and alone for
``--idle-seconds`` before the service starts; its median in the slow spans, over the run and
by second tells a slower host from a busier service. Steal time comes from ``/proc/stat``.

Needs ``perf`` (linux-perf) and permission to trace (root, or perf_event_paranoid <= -1).

Usage::

    python benchmarks/tail_trace.py --project . --home .bentoml --tag ctr_service:<tag>
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from feature_build import _cpu_s as cpu_s  # noqa: E402
from feature_build import descendants  # noqa: E402
from served_profile import cpu_per_request, thread_cpu, thread_names  # noqa: E402
from serving_cost import post_json, serve_tags, tag_arguments  # noqa: E402
from serving_latency import discard, predict_workload, stop_all  # noqa: E402

from benchmarks import _openloop  # noqa: E402
from benchmarks._loadgen import wrk  # noqa: E402
from benchmarks._machine import SpeedProbe, run_facts, run_line, save_results  # noqa: E402
from tests.support.loadtest import percentiles  # noqa: E402

_SLICE = re.compile(
    r"^\s*(?P<t>\d+\.\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<comm>.+?)(?:\[(?P<tid>\d+)(?:/(?P<pid>\d+))?\])?"
    r"\s+(?P<wait>\d+\.\d+)\s+(?P<delay>\d+\.\d+)\s+(?P<run>\d+\.\d+)\s+(?P<state>\S+)\s*$"
)
_KERNEL = re.compile(
    r"^(kworker|ksoftirqd|kdamond|rcu_|migration|kswapd|jbd2|kcompactd|khugepaged)"
)


class TreeWatch(threading.Thread):
    """Every process that belongs to the service's process tree during the run."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.stopped = root, threading.Event()
        self.first = dict(descendants(root))
        self.seen = dict(self.first)

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            for pid, comm in descendants(self.root).items():
                self.seen.setdefault(pid, comm)


def steal_ticks() -> int:
    return sum(int(line.split()[8]) for line in open("/proc/stat") if line.startswith("cpu "))


def slices(data: Path) -> list[dict[str, Any]]:
    """The trace's scheduling slices: which task ran on which CPU from when to when, and the
    task's scheduling delay before it (ms) and state when it left the CPU."""
    out = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(data), "--state"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = _SLICE.match(line)
        if not m:
            continue
        end, run = float(m["t"]), float(m["run"]) / 1000
        tid = int(m["tid"]) if m["tid"] else 0
        rows.append(
            {
                "cpu": int(m["cpu"]),
                "start": end - run,
                "end": end,
                "comm": m["comm"].strip(),
                "tid": tid,
                "pid": int(m["pid"]) if m["pid"] else tid,
                "delay_ms": float(m["delay"]),
                "state": m["state"],
            }
        )
    return rows


def kind(row: dict[str, Any], roles: dict[int, str], worker: int, names: dict[int, str]) -> str:
    """What a slice's task was: the worker's thread, a helper, the generator, ..."""
    if row["comm"] == "<idle>":
        return "idle"
    if row["pid"] == worker:
        name = names.get(row["tid"], "native")
        return f"worker thread {row['tid']} ({name})"
    if row["pid"] in roles:
        return roles[row["pid"]]
    if _KERNEL.match(row["comm"]):
        return "kernel: " + re.split(r"[/:]", row["comm"])[0]
    return "other: " + row["comm"]


def lane(url: str) -> dict[str, int]:
    """The worker's scoring calls so far: run on the event loop (inline) and on the lane."""
    return post_json(url + "/metadata")["lane"]


def inline_share(before: dict[str, int], after: dict[str, int]) -> float:
    inline, queued = (after[k] - before[k] for k in ("inline", "lane"))
    return round(inline / max(inline + queued, 1), 3)


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap(a: float, b: float, spans: list[tuple[float, float]], starts: np.ndarray) -> float:
    """Seconds of [a, b) inside the sorted, disjoint ``spans``."""
    i = max(int(np.searchsorted(starts, a, side="right")) - 1, 0)
    total = 0.0
    while i < len(spans) and spans[i][0] < b:
        total += max(0.0, min(b, spans[i][1]) - max(a, spans[i][0]))
        i += 1
    return total


def breakdown(
    rows: list[dict[str, Any]],
    spans: list[tuple[float, float]],
    roles: dict[int, str],
    worker: int,
    names: dict[int, str],
    answers: np.ndarray,
) -> dict[str, Any]:
    """CPU seconds by kind inside ``spans``; the worker's main thread running, runnable
    (its scheduling delay) and the rest of the spans' time; the requests answered inside
    ``spans`` (``answers``: the sorted times of the answers) and the worker's CPU per answer."""
    starts = np.array([a for a, _ in spans])
    cpu: collections.Counter[str] = collections.Counter()
    running = runnable = 0.0
    for row in rows:
        inside = overlap(row["start"], row["end"], spans, starts)
        if inside > 0:
            cpu[kind(row, roles, worker, names)] += inside
        if row["tid"] == worker and row["pid"] == worker:
            running += inside
            delay = row["delay_ms"] / 1000
            runnable += overlap(row["start"] - delay, row["start"], spans, starts)
    length = sum(b - a for a, b in spans)
    n = sum(int(np.searchsorted(answers, b) - np.searchsorted(answers, a)) for a, b in spans)
    mine = sum(v for k, v in cpu.items() if k.startswith("worker"))
    return {
        "span_s": round(length, 3),
        "answered_per_s": round(n / length, 1),
        "worker_cpu_ms_per_answer": round(1000 * mine / max(n, 1), 3),
        "cpu_share": {k: round(v / length, 4) for k, v in cpu.most_common()},
        "worker_main": {
            "running": round(running / length, 4),
            "runnable": round(runnable / length, 4),
            "neither": round(1 - (running + runnable) / length, 4),
        },
    }


def probe_by_burst(slow: list[int], probe: list[float | None]) -> dict[str, Any]:
    """The probe's median over the seconds with at least 10 slow requests and the others."""
    out: dict[str, Any] = {}
    for name, burst in (("seconds with slow requests", True), ("the others", False)):
        xs = [x for n, x in zip(slow, probe, strict=True) if x is not None and (n >= 10) == burst]
        out[name] = {
            "seconds": len(xs),
            "probe_python_ms": round(float(np.median(xs)), 4) if xs else None,
        }
    return out


def main() -> None:  # noqa: PLR0915 - one benchmark, step by step
    parser = tag_arguments(__doc__.split("\n\n")[0], "tail_trace")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--share", type=float, default=0.6)
    parser.add_argument("--slow-ms", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="the probe alone, first")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work, script, bodies = predict_workload(args.project, "tail-trace-")
    load_before = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    alone, begun, _ = SpeedProbe.alone(args.idle_seconds)  # the host's own variation
    idle_probe = alone.by_second(begun, int(args.idle_seconds))
    print(f"probe alone for {args.idle_seconds:g} s: {idle_probe}", flush=True)
    procs, urls, _ = serve_tags(args.home, [args.tag], work)
    url = urls[args.tag]
    try:
        wrk(url, "/predict", bodies, 2, 2, script)
        busiest = max(descendants(procs[0].pid), key=cpu_s)
        names = thread_names(spy, busiest)
        cpu0, threads0, lane0 = cpu_s(busiest), thread_cpu(busiest), lane(url)
        capacity = wrk(url, "/predict", bodies, 8, 6, script)["req_per_s"]
        cpu_c8 = 1000 * (cpu_s(busiest) - cpu0) / (capacity * 6)  # ms per answer, at 8
        by_thread = {"c8": cpu_per_request(threads0, thread_cpu(busiest), names, capacity * 6)}
        inline = {"c8": inline_share(lane0, lane(url))}
        rate = args.share * capacity
        watch = TreeWatch(procs[0].pid)
        workers = list(watch.first)
        watch.start()
        print(f"capacity {capacity:.0f} req/s; open loop at {rate:.0f} req/s, traced", flush=True)
        data = work / "sched.data"
        perf = subprocess.Popen(
            ["perf", "sched", "record", "-a", "-k", "CLOCK_MONOTONIC", "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        offset = time.time() - time.monotonic()
        probe = SpeedProbe()
        probe.start()
        steal0 = steal_ticks()
        threads0, lane0 = thread_cpu(busiest), lane(url)
        gen = subprocess.Popen(
            [sys.executable, _openloop.__file__, url, "/predict", str(bodies)]
            + [str(rate), str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        raw = json.loads(gen.communicate()[0])
        ok = _openloop.answered(raw)
        by_thread["open loop"] = cpu_per_request(threads0, thread_cpu(busiest), names, len(ok))
        inline["open loop"] = inline_share(lane0, lane(url))
        steal = steal_ticks() - steal0
        probe.stopped.set()
        perf.send_signal(signal.SIGINT)
        perf.wait()
        watch.stopped.set()
    finally:
        stop_all(procs)
    rows = slices(data)
    discard(work)
    # the worker: the service's child that ran longest on a CPU
    ran: collections.Counter[int] = collections.Counter()
    for row in rows:
        if row["pid"] in workers:
            ran[row["pid"]] += row["end"] - row["start"]
    worker = ran.most_common(1)[0][0]
    roles = {p: "helper" for p in watch.seen if p not in watch.first}
    roles |= {p: "service: " + c for p, c in watch.first.items() if p != worker}
    roles |= {procs[0].pid: "arbiter", gen.pid: "load generator", perf.pid: "perf"}
    roles[os.getpid()] = "this script (speed probe, process watch)"
    begin = raw["started_unix"] - offset
    lat = np.asarray(raw["latency_ms"])
    due = begin + np.asarray(raw["due_s"])
    done = due + lat / 1000
    is_slow = lat > args.slow_ms
    spans = merged(list(zip(due[is_slow].tolist(), done[is_slow].tolist(), strict=True)))
    seconds = int(args.seconds)
    slow_s = np.bincount((due - begin)[is_slow].astype(int), minlength=seconds)
    slow_s = slow_s.tolist()[:seconds]
    probe_s = probe.by_second(begin, seconds)

    answers = np.sort(done)

    def part(within: list[tuple[float, float]]) -> dict[str, Any]:
        return {
            **breakdown(rows, within, roles, worker, names, answers),
            "probe": probe.inside(within),
        }

    whole = [(float(due[0]), float(due[-1] + lat[-1] / 1000))]
    report = {
        **run_facts(started_at, load_before),
        "capacity_c8": capacity,
        "worker_cpu_ms_per_answer_c8": round(cpu_c8, 3),
        "cpu_ms_per_answer_by_thread": by_thread,
        "calls_run_inline": inline,
        "rate": round(rate, 1),
        "latency": percentiles(np.asarray(ok)),
        "slow_ms": args.slow_ms,
        "slow_requests": int(is_slow.sum()),
        "steal_ticks": steal,
        "slow_spans": part(spans) if spans else None,
        "longest_spans": [
            {"from_s": round(a - begin, 3), **part([(a, b)])}
            for a, b in sorted(spans, key=lambda s: s[0] - s[1])[:5]
        ],
        "whole_run": part(whole),
        "by_second": {
            "slow": slow_s,
            "probe_python_ms": probe_s,
            "idle_probe_python_ms": idle_probe,
        },
        "probe_by_burst": probe_by_burst(slow_s, probe_s),
        "worst": [
            {"due_s": round(float(d - begin), 3), "ms": round(float(x), 1)}
            for d, x in sorted(zip(due, lat, strict=True), key=lambda p: -p[1])[:10]
        ],
        "command": "python benchmarks/tail_trace.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(r: dict[str, Any]) -> str:
    lat = r["latency"]
    out = [
        "# What the CPUs did while slow requests waited",
        "",
        run_line(r) + ". "
        f"`/predict` capacity at concurrency 8: {r['capacity_c8']:.0f} req/s (the worker's "
        f"CPU: {r['worker_cpu_ms_per_answer_c8']} ms per answer); open loop at "
        f"{r['rate']} req/s under `perf sched record`: p50 / p95 / p99 {lat['p50_ms']} / "
        f"{lat['p95_ms']} / {lat['p99_ms']} ms, max {lat.get('max_ms')} ms. "
        f"{r['slow_requests']} requests over {r['slow_ms']:g} ms; steal {r['steal_ticks']} ticks.",
        "",
    ]
    parts = [("whole run", r["whole_run"])]
    if r["slow_spans"]:
        parts[:0] = [("spans of slow requests", r["slow_spans"])] + [
            (f"from {p['from_s']} s", p) for p in r["longest_spans"]
        ]
    kinds = list(dict.fromkeys(k for _, p in parts for k in p["cpu_share"]))
    out += [
        "CPU time by task, as a share of the span's length (2 CPUs: shares sum to 2):",
        "",
        "| task | " + " | ".join(f"{n} ({p['span_s']} s)" for n, p in parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    out += [
        f"| {k} | " + " | ".join(str(p["cpu_share"].get(k, 0)) for _, p in parts) + " |"
        for k in kinds
    ]
    out += [
        "",
        "Answers and the worker's CPU in each span; its main thread, as a share of the span:",
        "",
        "| | " + " | ".join(n for n, _ in parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    for key in ("answered_per_s", "worker_cpu_ms_per_answer"):
        out.append(
            f"| {key.replace('_', ' ')} | " + " | ".join(str(p[key]) for _, p in parts) + " |"
        )
    for key in ("python_ms", "memory_ms"):
        out.append(
            f"| speed probe: {key.replace('_ms', '')} (median CPU ms) | "
            + " | ".join(str(p["probe"][key]) for _, p in parts)
            + " |"
        )
    for state in ("running", "runnable", "neither"):
        out.append(
            f"| {state} | " + " | ".join(str(p["worker_main"][state]) for _, p in parts) + " |"
        )
    threads = r["cpu_ms_per_answer_by_thread"]
    out += [
        "",
        "The worker's CPU per answer by thread (user / system ms; from `/proc`), and the share "
        "of scoring calls run on the event loop instead of the lane (`/metadata` lane):",
        "",
        "| thread | " + " | ".join(threads) + " |",
        "|---|" + "---|" * len(threads),
    ]
    for name in dict.fromkeys(n for t in threads.values() for n in t):
        out.append(
            f"| {name} | "
            + " | ".join(
                f"{t[name]['user_ms']} / {t[name]['system_ms']}" if name in t else ""
                for t in threads.values()
            )
            + " |"
        )
    out.append(
        "| calls run inline | " + " | ".join(str(x) for x in r["calls_run_inline"].values()) + " |"
    )
    out += [
        "",
        "By second of the run: requests over the threshold, and the speed probe's integer sum's "
        "median CPU ms (alone before the run, by second: "
        + ", ".join(str(x) for x in r["by_second"]["idle_probe_python_ms"])
        + "):",
        "",
        "| second | requests over the threshold | probe CPU ms |",
        "|---|---|---|",
        *(
            f"| {k} | {n} | {x} |"
            for k, (n, x) in enumerate(
                zip(r["by_second"]["slow"], r["by_second"]["probe_python_ms"], strict=True)
            )
        ),
        "",
        "The probe's median over the seconds with at least 10 requests over the threshold "
        "and over the others: "
        + "; ".join(
            f"{k}: {v['probe_python_ms']} ms ({v['seconds']} s)"
            for k, v in r["probe_by_burst"].items()
        )
        + ".",
        "",
        "Slowest requests (s after the start, ms): "
        + ", ".join(f"{w['due_s']} s {w['ms']}" for w in r["worst"]),
        "",
        f"`{r['command']}`",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    main()
