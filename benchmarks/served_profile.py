"""Where a served worker spends the GIL: py-spy samples the thread holding it under wrk load.

Serves a bento with one worker (as ``serving_cost.py`` does), drives one endpoint with
``wrk`` at concurrency 1 and records the worker with ``py-spy record --gil --nonblocking``:
only the thread holding the GIL is sampled, so native code that releases it (the compiled
trees, the feature searches) is not counted. Each sample is assigned to a phase of the
call by the frames on its stack; the report gives each phase's share of the samples, the
GIL time per request that share stands for, and the functions with the most samples.
A second run of the same load without the profiler gives each thread's CPU time per
request (user and system, from ``/proc``), GIL or not.
Writes ``benchmarks/results/served_profile_<endpoint>.json`` and ``.md``.

Usage::

    python benchmarks/served_profile.py --project . --bento build/bento/ctr_service.bento \\
        --endpoint predict_batch
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import (  # noqa: E402
    TOKEN,
    batches,
    bento_release,
    column_batches,
    rank_requests,
    serve_release,
)
from serving_latency import discard, full_bodies, machine, service_env, stop  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import save_results  # noqa: E402
from pipelines.simulation.launcher import worker_pids  # noqa: E402
from tests.support.loadtest import workload_frame  # noqa: E402

# A sample belongs to the first phase whose marker is on its stack (in this order).
PHASES = [
    ("request validation (pydantic, event loop)", "model_validate_json"),
    ("feature lookup", "Runtime.lookup"),
    ("model", "ModelTier.predict"),
    ("request bookkeeping (columns, epoch ms, routing, counters)", "Predictor._requests"),
    ("request bookkeeping (columns, epoch ms, routing, counters)", "Predictor._score"),
    ("answer encoding", "Predictor._answers"),
    ("answer encoding", "Predictor.rank_json"),
    ("answer encoding", "Predictor._answer_columns"),
    ("request bookkeeping (columns, epoch ms, routing, counters)", "predict_columns_json"),
    ("request log (writer thread)", "RequestLog._run"),
    ("scoring lane hand-over", "PriorityLane"),
]
# The rest of the event loop's samples; py-spy's --nonblocking samples can hold a
# coroutine's frames without the thread's root, so the loop's packages mark them too.
EVENT_LOOP = "HTTP, middleware and BentoML (event loop)"
EVENT_LOOP_MARKS = ("_run_module_as_main", "starlette/", "uvicorn/", "asyncio/", "h11/")
EVENT_LOOP_MARKS += ("_bentoml_impl/", "_bentoml_sdk/", "serving/http_limits.py")
EVENT_LOOP_MARKS += ("serving/security.py", "InFlight.__call__")


def phases(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples in all, per phase, and per leaf function (py-spy's raw format)."""
    total, by_phase, by_leaf = 0, collections.Counter[str](), collections.Counter[str]()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        phase = next((name for name, mark in PHASES if mark in stack), None)
        if phase is None:
            loop = any(mark in stack for mark in EVENT_LOOP_MARKS)
            phase = EVENT_LOOP if loop else "other threads"
        by_phase[phase] += n
        leaf = re.sub(r" \(.*/(site-packages|main|lib/python3\.\d+)/", " (", stack.split(";")[-1])
        by_leaf[leaf] += n
    return total, by_phase, by_leaf


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """User and system CPU seconds of each thread of ``pid`` so far (psutil)."""
    return {t.id: (t.user_time, t.system_time) for t in psutil.Process(pid).threads()}


def thread_names(spy: str, pid: int) -> dict[int, str]:
    """Python thread names by native thread id (``py-spy dump``)."""
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
    found = re.findall(r'^Thread (?:0x[0-9A-Fa-f]+|(\d+)) \([^)]*\): "([^"]*)"', dump.stdout, re.M)
    return {int(tid): name for tid, name in found if tid}


def cpu_per_request(
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    names: dict[int, str],
    requests: int,
) -> dict[str, dict[str, float]]:
    """CPU ms per request by thread (user, system), threads that used any."""
    ms = 1000.0 / max(requests, 1)
    out: dict[str, dict[str, float]] = {}
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        if user - u0 or system - s0:
            name = names.get(tid, "native threads")
            got = out.setdefault(name, {"user_ms": 0.0, "system_ms": 0.0})
            got["user_ms"] = round(got["user_ms"] + (user - u0) * ms, 2)
            got["system_ms"] = round(got["system_ms"] + (system - s0) * ms, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, required=True, help="an exported bento")
    parser.add_argument(
        "--endpoint", choices=["predict", "predict_batch", "predict_columns", "rank"], required=True
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="served-profile-"))
    env = service_env(work, TOKEN)
    load_before = os.getloadavg()
    from pipelines.stages.packaging import import_bento

    tag = import_bento(args.bento.resolve(), work / "home").split('"')[1]
    rows = workload_frame(project / "data", 3000)
    single = full_bodies(rows)
    bodies: list[Any] = {
        "predict": single,
        "predict_batch": batches(single, 1000, "requests"),
        "predict_columns": column_batches(single, 1000),
        "rank": rank_requests(single, list(rows.item_id), 1000),
    }[args.endpoint]
    body_file = lines(work / "bodies.txt", bodies)
    script = wrk_script(work)
    proc, url = serve_release(tag, bento_release(work / "home" / "bentos"), env, work, "full")
    try:
        path = f"/{args.endpoint}"
        wrk(url, path, body_file, 1, 3, script)  # warm up
        raw_file = work / "gil.raw"
        cmd = [spy, "record", "--gil", "--nonblocking", "--format", "raw", "--rate"]
        cmd += [str(args.rate), "--duration", str(int(args.seconds)), "--output", str(raw_file)]
        worker = worker_pids(proc.pid)[0]
        cmd += ["--pid", str(worker)]
        print(f"py-spy on the worker for {args.seconds:.0f} s while wrk drives {path}", flush=True)
        recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        load = wrk(url, path, body_file, 1, args.seconds - 2, script)
        _, err = recorder.communicate(timeout=args.seconds + 60)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        # CPU by thread, without the profiler: a second run of the same load
        names, before = thread_names(spy, worker), thread_cpu(worker)
        unprofiled = wrk(url, path, body_file, 1, args.seconds, script)
        cpu = cpu_per_request(before, thread_cpu(worker), names, unprofiled["requests"])
    finally:
        stop(proc)
    total, by_phase, by_leaf = phases(raw_file.read_text())
    seconds_held = total / args.rate
    per_request = 1000.0 * seconds_held / max(load["req_per_s"] * args.seconds, 1)
    report = {
        "machine": machine(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_before": [round(x, 2) for x in load_before],
        "bento": tag,
        "endpoint": args.endpoint,
        "wrk": load,
        "samples": total,
        "rate": args.rate,
        "gil_ms_per_request": round(per_request, 2),
        "phases": {
            k: {"share": round(v / total, 3), "ms_per_request": round(per_request * v / total, 2)}
            for k, v in by_phase.most_common()
        },
        "top_functions": {k: round(v / total, 3) for k, v in by_leaf.most_common(15)},
        "wrk_unprofiled": unprofiled,
        "cpu_ms_per_request_by_thread": cpu,
        "command": "python benchmarks/served_profile.py --project . --bento "
        f"build/bento/ctr_service.bento --endpoint {args.endpoint}",
    }
    print(save_results(args.out, f"served_profile_{args.endpoint}", report, markdown))
    discard(work)


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["wrk"]
    out = [
        f"# Where the GIL goes: `/{r['endpoint']}`, one worker, wrk at concurrency 1",
        "",
        f"{r['started_at']}; {m['cores']} cores ({m['cpu']}), Python {m['python']}; load "
        f"average before {r['load_average_before'][0]}. Bento {r['bento']}. Under the profiler "
        f"wrk measured {w['req_per_s']} req/s, p50 {w['p50_ms']} ms. py-spy `--gil` "
        f"(`--nonblocking`, {r['rate']} Hz) took {r['samples']} samples: about "
        f"**{r['gil_ms_per_request']} ms of GIL time per request**. Native code that releases "
        "the GIL (compiled trees, feature searches) is not counted.",
        "",
        "| phase | share of GIL samples | ms per request |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {v['share']:.1%} | {v['ms_per_request']} |" for k, v in r["phases"].items()]
    out += ["", "| function (leaf frame) | share |", "|---|---|"]
    out += [f"| `{k}` | {v:.1%} |" for k, v in r["top_functions"].items()]
    u = r["wrk_unprofiled"]
    cpu = r["cpu_ms_per_request_by_thread"]
    total_cpu = sum(v["user_ms"] + v["system_ms"] for v in cpu.values())
    out += [
        "",
        f"CPU time per request by thread, from `/proc` over a second run without the profiler "
        f"(wrk: {u['req_per_s']} req/s, p50 {u['p50_ms']} ms): **{total_cpu:.2f} ms in all**, "
        "with or without the GIL.",
        "",
        "| thread | user ms | system ms |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {v['user_ms']} | {v['system_ms']} |" for k, v in cpu.items()]
    out += ["", f"Reproduce: `{r['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
