"""Serving cost with real load generators: the release bento against a bare BentoML service.

What it does (loopback, one BentoML worker per service, OMP_NUM_THREADS=1):

1. packages a trained project with this repository's code (compiled trees included), as
   ``benchmarks/serving_latency.py`` does, or imports ``--bento``; serves it with a release
   whose policy has ``workers: 1`` (and, for the overload scenario, shedding on or off);
   serves ``benchmarks/bare_service.py`` (the scikit-learn model on precomputed features);
2. closed loop with ``wrk`` (a Lua script cycles through real request bodies and reports
   p50/p95/p99): ``/predict`` at concurrency 1 and 8, ``/predict_batch`` and
   ``/predict_columns`` (1000 rows; the bare service's batch endpoint for both) and
   ``/rank`` (1000 candidates) at concurrency 1 and 2, alternating full and bare in rounds;
3. ``hey`` at a fixed rate of 60% of the measured concurrency-8 capacity (per-request
   latencies from its CSV output), then the same rate from the open-loop generator
   (``benchmarks/_openloop.py``: Poisson arrivals, latency from the scheduled time); a
   speed probe (``_machine.SpeedProbe``) times a fixed loop through both phases and for
   10 s alone before the services start, so a slow phase can be told from a slow host;
4. overload: ``wrk`` floods ``/rank`` on recs (low priority) while ``hey`` sends search
   (critical) and feed ``/predict`` at a fixed rate; latency per surface with priorities on
   (``serving.shed_inflight`` from params) and off (0);
5. the full service again with ``CTR_MODEL_RUNTIME=sklearn`` at concurrency 8, to show
   what the compiled trees bring;
6. writes ``benchmarks/results/serving_cost.json`` and ``.md`` (machine, date, load
   average, commands).

Usage::

    python benchmarks/serving_cost.py --project .     # after `make run`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
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

from serving_latency import (  # noqa: E402
    bare_bodies,
    build_bento,
    discard,
    full_bodies,
    machine,
    service_env,
    start,
    stop,
    stop_all,
)

from benchmarks._loadgen import hey, hey_command, hey_result, lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import SpeedProbe, save_results  # noqa: E402
from benchmarks._openloop import open_loop  # noqa: E402
from pipelines.modeling.release import reseal_release_dict  # noqa: E402
from tests.support.loadtest import free_port, percentiles, workload_frame  # noqa: E402

TOKEN = "serving-cost-bench-token"
QPS_TARGET = 120_000


def bento_release(folder: Path, **policy: Any) -> dict[str, Any]:
    """The release a bento under ``folder`` ships, with one worker (the benchmarks compare one
    worker per service) and any other ``policy`` values changed; edited as that bento wrote
    it, so that a bento of older code (fewer policy keys) can read it."""
    release = json.loads(next(folder.rglob("release.json")).read_text())
    release["policy"].update({"workers": 1, **policy})
    return release


def batches(rows: list[Any], size: int, key: str) -> list[dict[str, Any]]:
    """Batch bodies ``{key: rows}`` of ``size`` consecutive rows each, every row once."""
    return [{key: rows[k : k + size]} for k in range(0, len(rows) - size + 1, size)]


def column_batches(single: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """``/predict_columns`` bodies of the same rows as ``batches(single, size, ...)``."""
    import pandas as pd

    from pipelines.features.definitions import to_ms

    out = []
    for body in batches(single, size, "rows"):
        rows = body["rows"]
        columns = {k: [r[k] for r in rows] for k in ("user", "item", "surface", "device")}
        times = pd.to_datetime([r["timestamp"] for r in rows], format="ISO8601", utc=True)
        columns["timestamp_ms"] = to_ms(times).tolist()
        out.append(columns)
    return out


def rank_requests(single: list[dict[str, Any]], items: list[str], n: int) -> list[dict[str, Any]]:
    """Five ``/rank`` bodies: the user, surface, device and time of the first five
    ``/predict`` bodies, each with the first ``n`` distinct ``items`` as candidates."""
    candidates = list(dict.fromkeys(items))[:n]
    keys = ("user", "surface", "device", "timestamp")
    return [{k: body[k] for k in keys} | {"items": candidates} for body in single[:5]]


def serve_release(
    tag: str, release: dict[str, Any], env: dict[str, str], work: Path, name: str, **extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    release_file = work / f"{name}.json"
    release_file.write_text(json.dumps(reseal_release_dict(release)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(
        [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)],
        {**env, "CTR_RELEASE_FILE": str(release_file), **extra},
        work,
        url,
        work / f"{name}.log",
    )
    return proc, url


def serve_module(
    service: str, env: dict[str, str], work: Path, name: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Serve a BentoML service of this repository (``module:Class``) on a free port, its log
    ``<name>.log`` under ``work``; its process and URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", service, "--port", str(port)]
    return start(command, env, REPO, url, work / f"{name}.log"), url


def serve_bare(
    model_tag: str, env: dict[str, str], work: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Serve ``benchmarks/bare_service.py`` with the model ``model_tag`` (from the BentoML
    home in ``env``); its process and URL."""
    bare_env = {**env, "BARE_MODEL_TAG": model_tag}
    return serve_module("benchmarks.bare_service:BareService", bare_env, work, "bare")


def start_orders(tags: list[str], rounds: int) -> list[tuple[list[str], int]]:
    """Each start order of two bentos with its share of ``rounds``. On a shared host the
    bento started first was ahead in both orders, whichever build it was (docs/serving.md,
    21:59 and 22:02), so each is started first for half of the rounds."""
    first = (rounds + 1) // 2
    return [(o, k) for o, k in ((list(tags), first), (list(tags[::-1]), rounds - first)) if k]


def home_arguments(description: str, name: str) -> argparse.ArgumentParser:
    """The arguments every benchmark of bentos in a BentoML home takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--home", type=Path, required=True, help="BentoML home with the bentos")
    parser.add_argument("--name", default=name, help="results file name")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    return parser


def ab_arguments(
    description: str, rounds: int, seconds: float, name: str
) -> argparse.ArgumentParser:
    """The arguments of a benchmark of two bentos side by side (``tail_ab.py``,
    ``batch_ab.py``); the script adds its own."""
    parser = home_arguments(description, name)
    parser.add_argument("--tags", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--seconds", type=float, default=seconds, help="per phase, round and bento")
    return parser


def tag_arguments(description: str, name: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark of one bento of a BentoML home (``tail_trace.py``,
    ``arrival_gaps.py``); the script adds its own."""
    parser = home_arguments(description, name)
    parser.add_argument("--tag", required=True)
    return parser


def serve_tags(
    home: Path, tags: list[str], work: Path, **policy: Any
) -> tuple[list[subprocess.Popen[bytes]], dict[str, str], dict[str, dict[str, Any]]]:
    """Serve each bento ``tags`` names from the BentoML ``home`` (one worker, ``policy``
    values changed; files under ``work``): the processes, each tag's URL and each tag's
    release as served. On a failure the ones started are stopped."""
    env = {**service_env(work, TOKEN), "BENTOML_HOME": str(home.resolve())}
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    releases: dict[str, dict[str, Any]] = {}
    try:
        for k, tag in enumerate(tags):
            folder = home.resolve() / "bentos" / tag.replace(":", "/")
            releases[tag] = bento_release(folder, **policy)
            proc, urls[tag] = serve_release(tag, releases[tag], env, work, f"bento{k}")
            procs.append(proc)
    except BaseException:
        stop_all(procs)
        raise
    return procs, urls, releases


def main() -> None:  # noqa: PLR0915 - one benchmark, step by step
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, help="serve this exported bento instead of building")
    parser.add_argument("--seconds", type=float, default=10.0, help="per closed-loop run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank-items", type=int, default=1000)
    parser.add_argument(
        "--bare-first", action="store_true", help="start the bare service before the full one"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="serving-cost-"))
    env = service_env(work, TOKEN)
    procs: list[subprocess.Popen[bytes]] = []
    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    script = wrk_script(work)
    try:
        if args.bento:
            from pipelines.stages.packaging import import_bento

            tag = import_bento(args.bento.resolve(), work / "home").split('"')[1]
        else:
            tag, _ = build_bento(project, work)
        release = bento_release(work / "home" / "bentos")
        rows = workload_frame(project / "data", 3000)
        single = full_bodies(rows)
        feats = bare_bodies(rows, project / "data")
        b = 1000
        files = {
            "full_single": lines(work / "full_single.txt", single),
            "bare_single": lines(work / "bare_single.txt", [{"features": f} for f in feats]),
            "full_batch": lines(
                work / "full_batch.txt",
                batches(single, b, "requests"),
            ),
            "bare_batch": lines(
                work / "bare_batch.txt",
                batches(feats, b, "rows"),
            ),
            "full_columns": lines(work / "full_columns.txt", column_batches(single, b)),
        }
        files["bare_columns"] = files["bare_batch"]  # the bare service has one batch form
        rank_bodies = rank_requests(single, list(rows.item_id), args.rank_items)
        items = rank_bodies[0]["items"]
        files["full_rank"] = lines(work / "full_rank.txt", rank_bodies)
        # the host's speed with nothing running, to compare the 60% phases' with
        alone, began, ended = SpeedProbe.alone(10)
        host_speed = {"alone, before the services": alone.inside([(began, ended)])}
        if args.bare_first:  # the service started first was ahead on a shared host
            bare, bare_url = serve_bare(release["prod"]["tag"], env, work)
            procs.append(bare)
        full, full_url = serve_release(tag, release, env, work, "full")
        procs.append(full)
        if not args.bare_first:
            bare, bare_url = serve_bare(release["prod"]["tag"], env, work)
            procs.append(bare)
        urls = {"full": full_url, "bare": bare_url}
        for name, url in urls.items():  # warm up
            wrk(url, "/predict", files[f"{name}_single"], 2, 2, script)
        results: dict[str, Any] = {"full": {}, "bare": {}}
        scenarios = [
            ("predict_c1", "/predict", "single", 1, 1),
            ("predict_c8", "/predict", "single", 8, 1),
            ("batch1000_c1", "/predict_batch", "batch", 1, b),
            ("batch1000_c2", "/predict_batch", "batch", 2, b),
            ("columns1000_c1", "/predict_columns", "columns", 1, b),
            ("columns1000_c2", "/predict_columns", "columns", 2, b),
        ]
        bare_path = {"/predict_columns": "/predict_batch"}
        for name, path, kind, conc, per_call in scenarios:
            parts: dict[str, list[dict[str, Any]]] = {"full": [], "bare": []}
            for r in range(args.rounds):
                for label in list(urls) if r % 2 == 0 else list(reversed(urls)):
                    got = wrk(
                        urls[label],
                        bare_path.get(path, path) if label == "bare" else path,
                        files[f"{label}_{kind}"],
                        conc,
                        args.seconds,
                        script,
                    )
                    got["rows_per_s"] = round(got["req_per_s"] * per_call, 1)
                    parts[label].append(got)
            for label in urls:
                results[label][name] = pool(parts[label])
                print(label, name, results[label][name], flush=True)
        for conc in (1, 2):
            got = pool(
                [
                    wrk(full_url, "/rank", files["full_rank"], conc, args.seconds, script)
                    for _ in range(args.rounds)
                ]
            )
            got["rows_per_s"] = round(got["req_per_s"] * len(items), 1)
            results["full"][f"rank{len(items)}_c{conc}"] = got
            print("full rank", conc, got, flush=True)
        capacity = results["full"]["predict_c8"]["req_per_s"]
        one = work / "one.json"
        one.write_text(json.dumps(single[0]))
        window = release["policy"]["profile_window_seconds"]
        began = time.time()
        probe = SpeedProbe()  # the host's speed through both 60% phases
        probe.start()
        hey_span = time.monotonic()
        results["full"]["predict_fixed_rate_60pct"] = hey(
            full_url + "/predict", one, 0.6 * capacity, 8, max(args.seconds * 1.5, 10)
        )
        results["full"]["predict_fixed_rate_60pct"]["profile_window_closed"] = closed(began, window)
        print("fixed rate", results["full"]["predict_fixed_rate_60pct"], flush=True)
        # the same rate from the open-loop generator: Poisson arrivals, latency from the
        # scheduled time (hey's workers tick together and slow down with the server)
        began = time.time()
        open_span = time.monotonic()
        poisson = open_loop(
            full_url, "/predict", files["full_single"], 0.6 * capacity, max(args.seconds * 1.5, 10)
        )
        poisson.pop("raw")
        probe.stopped.set()
        poisson["profile_window_closed"] = closed(began, window)
        for name, (a, b) in (
            ("hey at 60%", (hey_span, open_span)),
            ("open loop at 60%", (open_span, time.monotonic())),
        ):
            host_speed[name] = {
                **probe.inside([(a, b)]),
                "slowest_second_ms": probe.slowest_second(a, b),
            }
        results["full"]["predict_open_loop_60pct"] = poisson
        print("open loop", poisson, flush=True)
        meta = post_json(full_url + "/metadata")
        results["full_counters"] = {
            "predictor": meta["counters"],
            "request_log": meta["request_log"],
        }
        results["runtime"] = meta["tiers"]["prod"]["runtime"]
        results["gc"] = meta.get("gc")  # GC pauses of the full service's worker
        stop(full)
        procs.remove(full)
        results["full_scoring_ms"] = scoring_time(Path(env["CTR_REQUEST_LOG_DIR"]))
        # the same service with the scikit-learn model answering
        sk, sk_url = serve_release(tag, release, env, work, "sklearn", CTR_MODEL_RUNTIME="sklearn")
        procs.append(sk)
        wrk(sk_url, "/predict", files["full_single"], 2, 2, script)
        results["full_sklearn"] = {
            "predict_c8": pool(
                [
                    wrk(sk_url, "/predict", files["full_single"], 8, args.seconds, script)
                    for _ in range(args.rounds)
                ]
            ),
        }
        print("sklearn runtime", results["full_sklearn"], flush=True)
        stop(sk)
        procs.remove(sk)
        results["overload"] = overload(
            tag, release, env, work, single, rank_bodies, script, capacity, args.seconds
        )
        stop_all(procs)
        procs.clear()
        report = {
            "benchmark": "serving_cost",
            "date": started_at.date().isoformat(),
            "started_at": started_at.isoformat(timespec="seconds"),
            "machine": machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "bento": tag,
            "settings": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "workers": 1,
                "rank_items": len(items),
                "batch_rows": b,
                "omp_num_threads": 1,
                "closed_loop": "wrk 4.1 (1 thread, Lua body rotation)",
                "fixed_rate": "hey (-q per worker, 8 workers)",
            },
            "results": results,
            "host_speed": host_speed,
            "command": "python benchmarks/serving_cost.py " + " ".join(sys.argv[1:]),
        }
        print(save_results(args.out, "serving_cost", report, markdown))
    finally:
        stop_all(procs)
        discard(work)


_CALL = re.compile(rb'"endpoint":"(\w+)","release_id":"[^"]*","latency_ms":([0-9.eE+-]+)')


def scoring_time(log_dir: Path) -> dict[str, dict[str, Any]]:
    """Per endpoint, the time each call spent in the Predictor's scoring (the request log's
    ``latency_ms``: features, shedding, routing, model, log hand-off), to set against the
    served latency. Read from the head of each line: a batch line holds its whole matrix."""
    found: dict[str, list[float]] = {}
    for shard in sorted(log_dir.glob("*.jsonl")):
        with shard.open("rb") as handle:
            for line in handle:
                match = _CALL.search(line, 0, 400)
                if match:
                    found.setdefault(match[1].decode(), []).append(float(match[2]))
    return {
        endpoint: {"calls": len(values), **percentiles(np.asarray(values))}
        for endpoint, values in sorted(found.items())
    }


def post_json(url: str) -> dict[str, Any]:
    import httpx

    return httpx.post(url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30).json()


def pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one scenario: rates summed over time, percentiles as the worst round's."""
    requests = sum(p["requests"] for p in parts)
    seconds = sum(p["seconds"] for p in parts)
    out = {
        "requests": requests,
        "seconds": round(seconds, 2),
        "req_per_s": round(requests / seconds, 1),
        "rounds_req_per_s": [p["req_per_s"] for p in parts],
        "errors": sum(p["errors"] + p.get("non2xx", 0) for p in parts),
        "p50_ms": round(float(np.median([p["p50_ms"] for p in parts])), 2),
        "p95_ms": round(max(p["p95_ms"] for p in parts), 2),
        "p99_ms": round(max(p["p99_ms"] for p in parts), 2),
    }
    if "rows_per_s" in parts[0]:
        per_call = parts[0]["rows_per_s"] / max(parts[0]["req_per_s"], 1e-9)
        out["rows_per_s"] = round(out["req_per_s"] * per_call, 1)
    return out


def closed(began: float, window: float) -> bool:
    """Whether a request-log profile window (aligned to wall-clock multiples) closed between
    ``began`` and now: the worker then hands the window's rows to its profiling helper."""
    return int(began // window) != int(time.time() // window)


def overload(
    tag: str,
    release: dict[str, Any],
    env: dict[str, str],
    work: Path,
    single: list[dict[str, Any]],
    rank_bodies: list[dict[str, Any]],
    script: Path,
    capacity: float,
    seconds: float,
) -> dict[str, Any]:
    """recs /rank flooded by wrk (16 connections) while hey sends search and feed /predict
    at a fixed rate; per-surface latency with priorities on and off."""
    recs = lines(work / "recs_rank.txt", [{**r, "surface": "recs"} for r in rank_bodies])
    body = {}
    for surface in ("search", "feed"):
        body[surface] = work / f"{surface}.json"
        body[surface].write_text(json.dumps({**single[0], "surface": surface}))
    out: dict[str, Any] = {}
    on = release["policy"]["shed_inflight"] or 8
    levels = release["policy"]["surface_priority"]
    flat = dict.fromkeys(levels, 0)  # off: no shedding and one level (first come, first served)
    for label, shed, priority in (("priorities_on", on, levels), ("priorities_off", 0, flat)):
        rel = json.loads(json.dumps(release))
        rel["policy"]["shed_inflight"] = shed
        rel["policy"]["surface_priority"] = priority
        proc, url = serve_release(tag, rel, env, work, label)
        try:
            flood = subprocess.Popen(
                ["wrk", "-t", "1", "-c", "16", "-d", f"{seconds + 2:g}s", "-s", str(script), url],
                env={**os.environ, "BODIES": str(recs), "WRK_PATH": "/rank"},
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)
            rate = max(0.1 * capacity, 5.0)
            probes = {
                s: subprocess.Popen(
                    hey_command(url + "/predict", body[s], rate, 2, seconds),
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for s in ("search", "feed")
            }
            got: dict[str, Any] = {"shed_inflight": shed, "surface_priority": priority}
            for s, p in probes.items():
                result = hey_result(p.communicate()[0], rate, seconds)
                got[s] = {k: result[k] for k in ("requests", "p50_ms", "p95_ms", "p99_ms")}
            text = flood.communicate()[0]
            found = re.search(r"^RESULT (\{.*\})$", text, re.M)
            got["recs_rank"] = json.loads(found.group(1)) if found else None
            meta = post_json(url + "/metadata")
            got["shed_rows"] = meta["counters"]["shed_rows"]
            got["routes"] = meta["counters"]["routes"]
            out[label] = got
            print(label, got, flush=True)
        finally:
            stop(proc)
    return out


def _rolled(phase: dict[str, Any]) -> str:
    if not phase.get("profile_window_closed"):
        return ""
    return " (a profile window closed during this phase: its rows went to the profiling helper)"


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["results"]
    full, bare = r["full"], r["bare"]
    lines_ = [
        "# Serving cost",
        "",
        f"Date {report['date']} ({report['started_at']}); {m['cores']} cores ({m['cpu']}), "
        f"Python {m['python']}, BentoML {m['bentoml']}; one worker per service, "
        "OMP_NUM_THREADS=1; wrk and hey on the same machine. Load average before/after: "
        f"{report['load_average_before'][0]} / {report['load_average_after'][0]} (machine "
        "shared with other jobs). Prod runtime: " + str(r.get("runtime")) + ".",
        "",
        "| scenario | full req/s | bare req/s | ratio | full p50/p95/p99 ms "
        "| bare p50/p95/p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name in (
        "predict_c1",
        "predict_c8",
        "batch1000_c1",
        "batch1000_c2",
        "columns1000_c1",
        "columns1000_c2",
    ):
        f, b = full[name], bare[name]
        lines_.append(
            f"| {name} | {f['req_per_s']} ({f.get('rows_per_s', f['req_per_s'])} rows/s) | "
            f"{b['req_per_s']} ({b.get('rows_per_s', b['req_per_s'])} rows/s) | "
            f"{f['req_per_s'] / b['req_per_s']:.2f} (rounds "
            + ", ".join(
                f"{x / y:.2f}"
                for x, y in zip(f["rounds_req_per_s"], b["rounds_req_per_s"], strict=True)
            )
            + f") | {f['p50_ms']} / {f['p95_ms']} / {f['p99_ms']} | "
            f"{b['p50_ms']} / {b['p95_ms']} / {b['p99_ms']} |"
        )
    for name, v in full.items():
        if name.startswith("rank"):
            lines_.append(
                f"| {name} | {v['req_per_s']} ({v['rows_per_s']} rows/s) | | | "
                f"{v['p50_ms']} / {v['p95_ms']} / {v['p99_ms']} | |"
            )
    fr = full["predict_fixed_rate_60pct"]
    c8 = full["predict_c8"]["req_per_s"]
    lines_ += [
        "",
        f"Fixed rate (hey) at 60% of capacity ({fr['target_rate']} req/s target, "
        f"{fr['achieved_rate']} achieved): p50 {fr['p50_ms']}, p95 {fr['p95_ms']}, "
        f"p99 {fr['p99_ms']} ms, {fr['errors']} errors{_rolled(fr)}.",
    ]
    ol = full.get("predict_open_loop_60pct")
    if ol:
        lines_.append(
            f"Same rate, open loop (`benchmarks/_openloop.py`: Poisson arrivals, real bodies, "
            f"latency from the scheduled send time; {ol['achieved_rate']} req/s): p50 "
            f"{ol['p50_ms']}, p95 {ol['p95_ms']}, p99 {ol['p99_ms']} ms, {ol['errors']} errors"
            f"{_rolled(ol)}."
        )
    speed = report.get("host_speed")
    if speed:
        lines_.append(
            "The host's speed (`SpeedProbe`: median CPU ms of a fixed integer sum run "
            "every 20 ms, and in the slowest second; higher is slower): "
            + "; ".join(
                f"{k} {v['python_ms']}"
                + (
                    f" (slowest second {v['slowest_second_ms']})"
                    if "slowest_second_ms" in v
                    else ""
                )
                for k, v in speed.items()
            )
            + "."
        )
    lines_ += [
        "",
        f"Same service with the scikit-learn runtime (CTR_MODEL_RUNTIME=sklearn), /predict at "
        f"concurrency 8: {r['full_sklearn']['predict_c8']['req_per_s']} req/s.",
        "",
        f"Cores for {QPS_TARGET:,} QPS of /predict at this rate ({c8} req/s per worker, one "
        f"worker taking about one core): about {QPS_TARGET / c8:,.0f} cores "
        f"(bare: {QPS_TARGET / bare['predict_c8']['req_per_s']:,.0f}).",
        "",
        "Overload (recs /rank flooded by wrk, 16 connections; search and feed /predict by hey "
        "at a fixed rate):",
        "",
        "| priorities | search p50/p95/p99 ms | feed p50/p95/p99 ms "
        "| recs rank req/s, p50 ms | shed rows |",
        "|---|---|---|---|---|",
    ]
    for label, o in r["overload"].items():
        s, f = o["search"], o["feed"]
        rr = o.get("recs_rank") or {}
        rate = rr.get("requests", 0) / max(rr.get("seconds", 1), 1e-9)
        lines_.append(
            f"| {label} (shed_inflight {o['shed_inflight']}, levels "
            f"{o.get('surface_priority')}) | {s['p50_ms']} / {s['p95_ms']} / "
            f"{s['p99_ms']} | {f['p50_ms']} / {f['p95_ms']} / {f['p99_ms']} | {rate:.1f}, "
            f"{rr.get('p50_ms', 0):.1f} | {o['shed_rows']} |"
        )
    if r.get("gc"):
        lines_ += [
            "",
            f"GC pauses of the full service's worker (count, total ms, max ms): {r['gc']}.",
        ]
    if r.get("full_scoring_ms"):
        lines_ += [
            "",
            "Time in the Predictor's scoring per call, full service, all its phases (request "
            "log `latency_ms`; the served latency adds parsing, validation, the answer's "
            "encoding and HTTP): "
            + "; ".join(
                f"{e} p50 / p95 / p99 {v['p50_ms']} / {v['p95_ms']} / {v['p99_ms']} ms "
                f"({v['calls']} calls)"
                for e, v in r["full_scoring_ms"].items()
            )
            + ".",
        ]
    c = r.get("full_counters", {})
    lines_ += [
        "",
        f"Full path counters: rows {c.get('predictor', {}).get('rows')}, routes "
        f"{c.get('predictor', {}).get('routes')}; request log written "
        f"{c.get('request_log', {}).get('written_rows')}, dropped "
        f"{c.get('request_log', {}).get('dropped_rows')}.",
        "",
        f"Reproduce: `{report['command']}`",
        "",
    ]
    return "\n".join(lines_)


if __name__ == "__main__":
    main()
