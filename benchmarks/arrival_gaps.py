"""What a ``/predict`` answer costs the worker as the gaps between requests grow.

``tail_trace.py`` found that a request arriving alone costs the worker's main thread more
CPU than one at concurrency 8, so "60% of capacity" keeps the worker 75-82% busy. This
serves one bento (one worker) and, in each round, times ``/predict`` at concurrency 8 and 1
(``wrk``, back to back) and in the open loop (``benchmarks/_openloop.py``) at each of
``--shares`` of that round's capacity at concurrency 8, that is with mean gaps between
arrivals from about 1 ms to 10 ms. For each phase it reports each thread's CPU per answer
from the scheduler's own accounting (``/proc/<pid>/task/<tid>/schedstat``, nanoseconds,
not the clock ticks of ``/proc/<pid>/stat``), the share of scoring calls run on the event
loop (``/metadata`` ``lane``), the latencies, and the speed probe's median
(``_machine.SpeedProbe``). After the service stops, ``GapProbe`` times a fixed piece of
Python work back to back and after sleeps of the phases' mean gaps: the machine's own
penalty for running code after a gap, none of the service's code.

``--floor`` also serves ``benchmarks/floor_service.py`` (BentoML with the service's request
and answer models and a fixed answer) through the same phases, the open loop at the
bento's rates: what the framework's own path costs at the same gaps.

``--perf`` also samples the main thread (``perf record -e cpu-clock``, needs perf and
root) at concurrency 1 and at the lowest share and lists its busiest symbols per answer
in both: a slower code path shows as a symbol that grows alone, a colder CPU as every
symbol growing together. ``--halt-poll-ns`` alternates the rounds over values of the
guest kernel's halt polling (``/sys/module/haltpoll/parameters/guest_halt_poll_ns``, a
KVM guest's idle CPU polls that long before it halts and exits to the host; needs root)
and restores the value found.

Usage::

    python benchmarks/arrival_gaps.py --project . --home .bentoml --tag ctr_service:<v>
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from feature_build import _cpu_s as cpu_s  # noqa: E402
from feature_build import descendants  # noqa: E402
from served_profile import thread_names  # noqa: E402
from serving_cost import TOKEN, serve_module, serve_tags, tag_arguments  # noqa: E402
from serving_latency import discard, predict_workload, service_env, stop_all  # noqa: E402
from tail_trace import inline_share, lane  # noqa: E402

from benchmarks._loadgen import wrk  # noqa: E402
from benchmarks._machine import SpeedProbe, run_facts, run_line, save_results  # noqa: E402
from benchmarks._openloop import open_loop  # noqa: E402

HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
THREADS = ("MainThread", "scoring", "request-log")  # the rest is reported as "other"


def thread_runtime(pid: int) -> dict[int, float]:
    """CPU seconds each thread of ``pid`` ran so far, from the scheduler (nanoseconds)."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return {tid: ns / 1e9 for tid, ns in out.items()}


def per_answer(
    before: dict[int, float], after: dict[int, float], names: dict[int, str], answers: int
) -> dict[str, float]:
    """CPU ms per answer by thread (``THREADS``, then "other" and "total")."""
    out = dict.fromkeys((*THREADS, "other"), 0.0)
    for tid, seconds in after.items():
        name = names.get(tid, "other")
        out[name if name in THREADS else "other"] += seconds - before.get(tid, 0.0)
    out["total"] = sum(out.values())
    return {k: round(1000 * v / max(answers, 1), 3) for k, v in out.items()}


class GapProbe:
    """The same Python work timed back to back and after a sleep: about 0.3 ms of dict,
    attribute and JSON work (1,500 random lookups in a table of 8 MB of objects; the shape
    of a request's interpreter work, none of the service's code), its thread CPU median
    over ``repeats``. Slower after a gap on an idle guest, the machine itself runs code
    colder when arrivals spread out."""

    def __init__(self) -> None:
        rng = random.Random(0)
        self.table = {f"k{i}": {"a": i, "b": str(i), "c": [i] * 4} for i in range(20_000)}
        self.keys = [f"k{rng.randrange(20_000)}" for _ in range(1_500)]
        self.body = json.dumps({"rows": [{"user": f"u{i}", "x": i / 7} for i in range(40)]})

    def work(self) -> float:
        began = time.thread_time()
        total = 0
        for key in self.keys:
            entry = self.table[key]
            total += entry["a"] + len(entry["b"]) + len(entry["c"])
        json.dumps(json.loads(self.body))
        return 1000 * (time.thread_time() - began)

    def median_ms(self, gap_s: float, repeats: int = 300) -> float:
        """Median CPU ms of ``work`` with ``gap_s`` of sleep before each (0: back to back)."""
        got = []
        for _ in range(repeats):
            if gap_s:
                time.sleep(gap_s)
            got.append(self.work())
        return round(statistics.median(got), 4)


def top_symbols(data: Path, answers: int, top: int = 15) -> dict[str, float]:
    """The busiest symbols of a ``perf record -e cpu-clock`` file, in CPU ms per answer."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = re.search(r"Event count \(approx\.\): (\d+)", report)
    ms = int(total.group(1)) / 1e6 / max(answers, 1) if total else 0.0
    out: dict[str, float] = {}
    for line in report.splitlines():
        row = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.+?)\s*$", line)
        if row and len(out) < top:
            out[f"{row.group(2)} {row.group(3)}"] = round(float(row.group(1)) / 100 * ms, 4)
    return out


def main() -> None:  # noqa: PLR0915 - one benchmark, step by step
    parser = tag_arguments(__doc__.split("\n\n")[0], "arrival_gaps")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.6, 0.3, 0.1])
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--perf", action="store_true", help="sample the main thread (root)")
    parser.add_argument("--floor", action="store_true", help="also serve floor_service.py")
    parser.add_argument("--halt-poll-ns", type=int, nargs="*", default=[])
    args = parser.parse_args()
    polls: list[int | None] = list(args.halt_poll_ns) or [None]
    poll_found = HALT_POLL.read_text().strip() if HALT_POLL.exists() else None
    if args.halt_poll_ns and poll_found is None:
        parser.error(f"{HALT_POLL} does not exist: not a KVM guest with the haltpoll driver")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work, script, bodies = predict_workload(args.project, "arrival-gaps-")
    load_before = os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    probe = SpeedProbe()
    probe.start()
    phases: list[dict[str, Any]] = []
    symbols: dict[str, dict[str, float]] = {}
    procs, urls, _ = serve_tags(args.home, [args.tag], work)
    try:
        if args.floor:
            floor, urls["floor"] = serve_module(
                "benchmarks.floor_service:Floor", service_env(work, TOKEN), work, "floor"
            )
            procs.append(floor)
        services: dict[str, dict[str, Any]] = {}  # name: url, worker pid, thread names
        for (name, url), proc in zip(urls.items(), procs, strict=True):
            wrk(url, "/predict", bodies, 2, 2, script)  # warm up
            worker = max(descendants(proc.pid), key=cpu_s)
            label = "bento" if name == args.tag else name
            services[label] = {"url": url, "worker": worker, "names": thread_names(spy, worker)}

        def phase(
            r: int, service: str, label: str, poll: int | None, send: Callable[[], dict[str, Any]]
        ) -> None:
            """Run ``send`` (which returns answers, rate and latencies) and record its costs."""
            s = services[service]
            scored = lane if service == "bento" else lambda _url: None
            threads0, lane0, began = thread_runtime(s["worker"]), scored(s["url"]), time.monotonic()
            got = send()
            threads1, lane1, ended = thread_runtime(s["worker"]), scored(s["url"]), time.monotonic()
            row = {
                "round": r,
                "halt_poll_ns": poll,
                "service": service,
                "phase": label,
                **got,
                "mean_gap_ms": round(1000 / max(got["req_per_s"], 1e-9), 2),
                "cpu_ms_per_answer": per_answer(threads0, threads1, s["names"], got["answers"]),
                "inline": inline_share(lane0, lane1) if lane0 is not None else None,
                "probe_ms": probe.inside([(began, ended)])["python_ms"],
            }
            phases.append(row)
            print(service, label, poll, row["req_per_s"], row["cpu_ms_per_answer"], flush=True)

        def closed(url: str, conc: int) -> Callable[[], dict[str, Any]]:
            def send() -> dict[str, Any]:
                got = wrk(url, "/predict", bodies, conc, args.seconds, script)
                return {
                    "answers": got["requests"],
                    "req_per_s": got["req_per_s"],
                    **{k: got.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")},
                }

            return send

        def opened(url: str, rate: float) -> Callable[[], dict[str, Any]]:
            def send() -> dict[str, Any]:
                got = open_loop(url, "/predict", bodies, rate, args.seconds, seed=len(phases))
                return {
                    "answers": got["answered_200"],
                    "req_per_s": round(got["answered_200"] / args.seconds, 1),
                    **{k: got[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                }

            return send

        def sampled(label: str, send: Callable[[], dict[str, Any]]) -> None:
            """Run ``send`` with the bento's main thread sampled by perf (not a phase of the
            table: sampling slows the worker); its busiest symbols per answer."""
            data = work / f"perf-{len(symbols)}.data"
            perf = subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "2000"]
                + ["-t", str(services["bento"]["worker"]), "-o", str(data)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            got = send()
            perf.send_signal(signal.SIGINT)
            perf.wait()
            symbols[label] = top_symbols(data, got["answers"])

        capacity: dict[str, float] = {}
        for r in range(args.rounds):
            for poll in polls:
                if poll is not None:
                    HALT_POLL.write_text(str(poll))
                for service, s in services.items():
                    phase(r, service, "concurrency 8", poll, closed(s["url"], 8))
                    capacity[service] = phases[-1]["req_per_s"]
                    phase(r, service, "concurrency 1", poll, closed(s["url"], 1))
                    for share in args.shares:  # the floor at the bento's rates: the same gaps
                        rate = share * capacity["bento"]
                        phase(r, service, f"open loop {share:g}", poll, opened(s["url"], rate))
        if args.perf:  # with the halt polling found
            if poll_found is not None and args.halt_poll_ns:
                HALT_POLL.write_text(poll_found)
            bento = services["bento"]["url"]
            sampled("concurrency 1", closed(bento, 1))
            low = min(args.shares)
            sampled(f"open loop {low:g}", opened(bento, low * capacity["bento"]))
    finally:
        if poll_found is not None and args.halt_poll_ns:
            HALT_POLL.write_text(poll_found)
        probe.stopped.set()
        stop_all(procs)
        discard(work)
    # the same fixed work after the phases' mean gaps, with the service stopped (and for
    # each halt polling asked)
    by_label: dict[str, list[float]] = {}
    for p in phases:
        if p["service"] == "bento":
            by_label.setdefault(p["phase"], []).append(p["mean_gap_ms"])
    gaps = sorted({0.0, *(round(statistics.median(g), 1) for g in by_label.values())})
    gap_probe = GapProbe()
    gap_ms: dict[str, dict[str, float]] = {}
    try:
        for poll in polls:
            if poll is not None:
                HALT_POLL.write_text(str(poll))
            gap_ms[str(poll)] = {str(g): gap_probe.median_ms(g / 1000) for g in gaps}
            print(f"the same work after a gap, halt polling {poll}:", gap_ms[str(poll)])
    finally:
        if poll_found is not None and args.halt_poll_ns:
            HALT_POLL.write_text(poll_found)
    report = {
        **run_facts(started_at, load_before),
        "tag": args.tag,
        "gap_probe_ms": gap_ms,
        "halt_poll_ns_found": poll_found,
        "phases": phases,
        "perf_symbols_ms_per_answer": symbols,
        "command": "python benchmarks/arrival_gaps.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(r: dict[str, Any]) -> str:
    polls = any(p["halt_poll_ns"] is not None for p in r["phases"])
    lines = [
        f"# What an answer costs the worker as arrivals spread out ({r['tag']})",
        "",
        run_line(r) + f"; guest halt polling found at {r['halt_poll_ns_found']} ns.",
        "",
        "CPU ms per `/predict` answer by thread, from `/proc/<pid>/task/<tid>/schedstat`; "
        "worker CPUs: the CPUs its threads used (total times req/s); "
        "floor: `benchmarks/floor_service.py`, BentoML with the same request and answer "
        "models and a fixed answer, sent the bento's open-loop rates; "
        "`inline`: the share of scoring calls run on the event loop; probe: the speed "
        "probe's median CPU ms over the phase (lower is a faster host).",
        "",
        "| round | "
        + ("halt poll ns | " if polls else "")
        + "service | phase | req/s | mean gap ms | main | scoring | request log | other | "
        "total | worker CPUs | inline | p50 / p95 / p99 ms | probe |",
        "|---|" + ("---|" if polls else "") + "---|---|" + "---:|" * 9 + "---|---:|",
    ]
    for p in r["phases"]:
        c = p["cpu_ms_per_answer"]
        lines.append(
            f"| {p['round']} | "
            + (f"{p['halt_poll_ns']} | " if polls else "")
            + f"{p.get('service', 'bento')} | {p['phase']} | {p['req_per_s']:,.0f} | "
            f"{p['mean_gap_ms']} | {c['MainThread']} | "
            f"{c['scoring']} | {c['request-log']} | {c['other']} | {c['total']} | "
            f"{c['total'] * p['req_per_s'] / 1000:.2f} | "
            + ("" if p["inline"] is None else f"{p['inline']:.0%}")
            + f" | {p['p50_ms']} / {p['p95_ms']} / {p['p99_ms']} | "
            f"{p['probe_ms']} |"
        )
    gaps = list(next(iter(r["gap_probe_ms"].values())))
    lines += [
        "",
        "The same fixed Python work (`GapProbe`: dict, attribute and JSON work, 1,500 random "
        "lookups in 8 MB of objects, none of the service's code), median thread CPU ms, "
        "after each gap with the service stopped:",
        "",
        "| halt poll ns | " + " | ".join(f"{g} ms gap" for g in gaps) + " |",
        "|---|" + "---:|" * len(gaps),
    ]
    for poll, by_gap in r["gap_probe_ms"].items():
        lines.append(f"| {poll} | " + " | ".join(str(by_gap[g]) for g in gaps) + " |")
    if r["perf_symbols_ms_per_answer"]:
        labels = list(r["perf_symbols_ms_per_answer"])
        table = r["perf_symbols_ms_per_answer"]
        keys = list(dict.fromkeys(k for t in table.values() for k in t))
        lines += [
            "",
            "The main thread's busiest symbols (`perf record -e cpu-clock`; sampling slows "
            "the worker, so compare the two columns, not these with the table above), CPU ms "
            "per answer:",
            "",
            "| symbol | " + " | ".join(labels) + " | ratio |",
            "|---|" + "---:|" * (len(labels) + 1),
        ]
        for k in keys:
            got = [table[label].get(k) for label in labels]
            ratio = f"{got[-1] / got[0]:.2f}" if len(got) > 1 and got[0] and got[-1] else ""
            cells = " | ".join("" if g is None else f"{g:.4f}" for g in got)
            lines.append(f"| `{k}` | {cells} | {ratio} |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
