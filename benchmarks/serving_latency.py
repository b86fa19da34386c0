"""Serving latency and throughput of the release bento over real HTTP on loopback.

What it does:

1. builds a release bento from a trained project (its ``build/model``, ``data`` and
   ``build/eval/metrics.json``, read only) with this repository's service code and
   ``params.yaml`` serving policy, in a temporary BentoML home; or imports an
   exported bento archive (``--bento``);
2. starts ``bentoml serve`` on a free loopback port (one worker, OMP_NUM_THREADS=1);
3. sends requests built from real events near the end of the snapshot (fresh
   features, so the full path runs: validation, feature lookup, routing, model,
   request log) with an httpx load generator: a closed loop at each concurrency
   for /predict and /predict_batch, then an open loop at a fixed rate of 60% of
   the measured concurrency-8 throughput (latency counted from the scheduled send
   time, so client-side queueing is not hidden);
4. unless ``--no-bare``, also serves a bare BentoML service returning the same
   model's prediction for precomputed features; every scenario runs in rounds that
   alternate the two services, so load from other jobs hits both alike;
5. writes ``benchmarks/results/serving_latency.json`` and ``.md`` with the machine,
   the date and the load average during the run.

The load generator runs on the same machine (2 cores here) and uses CPU too.

Usage::

    python benchmarks/serving_latency.py --project /path/to/trained/project
    python benchmarks/serving_latency.py --bento build/bento/ctr_service.bento --project .
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import save_results  # noqa: E402
from tests.support.loadtest import free_port, percentiles, workload_frame  # noqa: E402

BENCH_TOKEN = "serving-bench-admin-token"


def machine() -> dict[str, Any]:
    """``benchmarks._machine.machine()`` plus the serving stack's versions and platform."""
    import bentoml  # noqa: F401  # version only; BENTOML_HOME is already set
    import sklearn

    from benchmarks._machine import machine as base

    return {
        **base(),
        "bentoml": sys.modules["bentoml"].__version__,
        "scikit_learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def service_env(work: Path, token: str) -> dict[str, str]:
    """The environment a benchmark serves a bento in: BentoML home, request log, profiles
    and state under ``work``, one OpenMP thread, ``token`` for the admin endpoints (also
    sets this process's BentoML home, for importing the bento)."""
    os.environ["BENTOML_HOME"] = str(work / "home")
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CTR_REQUEST_LOG_DIR": str(work / "requests"),
        "CTR_PROFILE_DIR": str(work / "live"),
        "CTR_STATE_DIR": str(work / "state"),
        "CTR_ADMIN_TOKEN": token,  # /metadata details need it
    }
    env.pop("MLOPS_PROJECT_ROOT", None)
    return env


def build_bento(project: Path, work: Path) -> tuple[str, dict[str, Any]]:
    """Package the project's model and events with this repository's code; returns the tag."""
    from pipelines.core import lineage
    from pipelines.core.settings import load_settings
    from pipelines.stages import packaging

    root = work / "src"
    for folder in ("bentos", "pipelines"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    policy = load_settings(REPO).serving
    card = json.loads((project / "build/model/model_card.json").read_text())
    record = lineage.collect(project, project / "build/model/model.joblib", card["feature_set"])
    summary = packaging.package_stage(
        root,
        project / "build/model",
        project / "data",
        project / "build/eval/metrics.json",
        root / "build/release/release.json",
        work / "bento",
        "ctr_service",
        work / "home",
        policy,
        record,
        dataset_dir=project / "build/dataset",
    )
    return summary["bento_tag"], summary


def start(
    cmd: list[str], env: dict[str, str], cwd: Path, url: str, log: Path
) -> subprocess.Popen[bytes]:
    import httpx

    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"server not ready after 180 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the arbiter stops its workers
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop each of ``procs`` (``stop``)."""
    for proc in procs:
        stop(proc)


def discard(work: Path) -> None:
    """Remove a benchmark's work folder (request logs: gigabytes per run) and stop the
    profiling helpers its stopped services left on their last windows there: detached by
    design, they would otherwise profile a window of the whole run on both cores for
    minutes after the benchmark ends, and slow whatever runs next."""
    import psutil

    helpers = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(work) in " ".join(proc.info["cmdline"] or []):
            helpers.append(proc)
            proc.terminate()
    psutil.wait_procs(helpers, timeout=10)
    shutil.rmtree(work, ignore_errors=True)


def full_bodies(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"user": u, "item": i, "surface": s, "device": d, "timestamp": t.isoformat()}
        for u, i, s, d, t in zip(
            rows.user_id, rows.item_id, rows.surface, rows.device, rows.ts, strict=True
        )
    ]


def predict_workload(project: Path, prefix: str) -> tuple[Path, Path, Path]:
    """A new work folder, the wrk body-rotation script in it, and a file of 3000 real
    ``/predict`` bodies from the project's data, one per line."""
    from benchmarks._loadgen import lines, wrk_script

    work = Path(tempfile.mkdtemp(prefix=prefix))
    bodies = lines(work / "single.txt", full_bodies(workload_frame(project / "data", 3000)))
    return work, wrk_script(work), bodies


def bare_bodies(rows: pd.DataFrame, raw_dir: Path) -> list[list[float]]:
    from pipelines.features.definitions import CTR_V1, EventIndex, to_ms

    events = pd.read_parquet(
        raw_dir / "events.parquet",
        columns=["user_id", "item_id", "surface", "ts", "clicked", "click_ts"],
    )
    index = EventIndex(events, CTR_V1)
    X = index.lookup(rows.user_id, rows.item_id, rows.surface, rows.device, to_ms(rows.ts))
    return X.to_numpy(np.float64).tolist()


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the rounds of one scenario: latency percentiles over all calls, rate over all time."""
    lat = np.concatenate([p["latencies"] for p in parts]) * 1000.0
    wall = sum(p["wall"] for p in parts)
    calls = int(sum(len(p["latencies"]) for p in parts))
    rows = int(sum(p["rows"] for p in parts))
    return {
        "calls": calls,
        "rows": rows,
        "errors": int(sum(p["errors"] for p in parts)),
        "seconds": round(wall, 2),
        "req_per_s": round(calls / wall, 1),
        "rows_per_s": round(rows / wall, 1),
        **percentiles(lat),
        "rounds_req_per_s": [round(len(p["latencies"]) / p["wall"], 1) for p in parts],
    }


async def closed_loop(
    url: str, path: str, bodies: list[bytes], concurrency: int, rows_per_call: int
) -> dict[str, Any]:
    """``concurrency`` workers send back-to-back until every body is sent."""
    import httpx

    latencies: list[float] = []
    errors = 0
    queue = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal errors
            headers = {"content-type": "application/json"}
            for body in queue:
                started = time.perf_counter()
                response = await client.post(path, content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "latencies": np.asarray(latencies),
        "wall": wall,
        "rows": len(latencies) * rows_per_call,
        "errors": errors,
    }


async def open_loop(url: str, path: str, bodies: list[bytes], rate: float) -> dict[str, Any]:
    """Send at a fixed rate; latency counts from the scheduled send time."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        headers = {"content-type": "application/json"}

        async def one(body: bytes, scheduled: float) -> None:
            nonlocal errors
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            response = await client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - scheduled)
            errors += response.status_code != 200

        t0 = time.perf_counter() + 0.2
        started = time.perf_counter()
        await asyncio.gather(*(one(b, t0 + k / rate) for k, b in enumerate(bodies)))
        wall = time.perf_counter() - started
    result = summarize(
        [
            {
                "latencies": np.asarray(latencies),
                "wall": wall,
                "rows": len(latencies),
                "errors": errors,
            }
        ]
    )
    result["target_rate"] = round(rate, 1)
    return result


def measure(
    services: dict[str, tuple[str, list[bytes], list[bytes]]],
    batch_rows: int,
    concurrencies: list[int],
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """Every scenario in ``rounds`` rounds, alternating the services within each round, so a
    change in background load on a shared machine hits both sides alike."""
    import httpx

    for url, single, _ in services.values():  # warm up
        for body in single[:50]:
            httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"})
    scenarios = [(f"predict_c{c}", "/predict", c, 1) for c in concurrencies]
    scenarios += [(f"batch{batch_rows}_c{c}", "/predict_batch", c, batch_rows) for c in (1, 2)]
    out: dict[str, dict[str, Any]] = {label: {} for label in services}
    for name, path, c, rows in scenarios:
        parts: dict[str, list[dict[str, Any]]] = {label: [] for label in services}
        for r in range(rounds):
            order = list(services) if r % 2 == 0 else list(reversed(services))
            for label in order:
                url, single, batches = services[label]
                bodies = single if path == "/predict" else batches
                n = (
                    len(bodies) // rounds
                    if c > 1 or path != "/predict"
                    else len(bodies) // (2 * rounds)
                )
                chunk = bodies[r * n : (r + 1) * n] or bodies[:n]
                parts[label].append(asyncio.run(closed_loop(url, path, chunk, c, rows)))
        for label in services:
            out[label][name] = summarize(parts[label])
            print(f"{label} {name}: {out[label][name]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--project",
        type=Path,
        required=True,
        help="trained project (build/model, data, build/eval/metrics.json)",
    )
    parser.add_argument("--bento", type=Path, help="serve this exported bento instead of building")
    parser.add_argument("--requests", type=int, default=3000, help="/predict calls per scenario")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--batch-rows", type=int, default=1000)
    parser.add_argument("--batch-calls", type=int, default=40)
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare BentoML service")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per scenario, alternating full and bare"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    project = args.project.resolve()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    ADMIN = {"authorization": f"Bearer {BENCH_TOKEN}"}
    home = work / "home"
    env = service_env(work, BENCH_TOKEN)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started_at = dt.datetime.now(dt.UTC)
        load_before = os.getloadavg()
        if args.bento:
            from pipelines.stages.packaging import import_bento

            tag = import_bento(args.bento.resolve(), home).split('"')[1]
            built: dict[str, Any] = {"bento_tag": tag, "archive": str(args.bento)}
        else:
            tag, built = build_bento(project, work)
        print(f"serving {tag} from {home}", flush=True)
        rows = workload_frame(project / "data", args.requests)
        single = [json.dumps(b).encode() for b in full_bodies(rows)]
        full_rows = full_bodies(rows)
        batches = [
            json.dumps(
                {
                    "requests": [
                        full_rows[(k * args.batch_rows + j) % len(full_rows)]
                        for j in range(args.batch_rows)
                    ]
                }
            ).encode()
            for k in range(args.batch_calls)
        ]
        results: dict[str, Any] = {}
        port = free_port()
        full_url = f"http://127.0.0.1:{port}"
        proc = start(
            [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)],
            env,
            work,
            full_url,
            work / "full.log",
        )
        procs.append(proc)
        services = {"full": (full_url, single, batches)}
        import httpx

        meta = httpx.post(full_url + "/metadata", headers=ADMIN, timeout=30).json()
        if not args.no_bare:
            feats = bare_bodies(rows, project / "data")
            bare_single = [json.dumps({"features": f}).encode() for f in feats]
            bare_batches = [
                json.dumps(
                    {
                        "rows": [
                            feats[(k * args.batch_rows + j) % len(feats)]
                            for j in range(args.batch_rows)
                        ]
                    }
                ).encode()
                for k in range(args.batch_calls)
            ]
            port = free_port()
            bare_url = f"http://127.0.0.1:{port}"
            bare_env = {**env, "BARE_MODEL_TAG": meta["release"]["prod"]["tag"]}
            procs.append(
                start(
                    [
                        sys.executable,
                        "-m",
                        "bentoml",
                        "serve",
                        "benchmarks.bare_service:BareService",
                        "--port",
                        str(port),
                    ],
                    bare_env,
                    REPO,
                    bare_url,
                    work / "bare.log",
                )
            )
            services["bare"] = (bare_url, bare_single, bare_batches)
        results.update(measure(services, args.batch_rows, concurrencies, args.rounds))
        capacity = results["full"]["predict_c8"]["req_per_s"] if 8 in concurrencies else None
        if capacity:
            rate = 0.6 * capacity
            n = max(int(rate * args.rate_seconds), 100)
            bodies = (single * (n // len(single) + 1))[:n]
            results["full"]["predict_fixed_rate_60pct"] = asyncio.run(
                open_loop(full_url, "/predict", bodies, rate)
            )
            print(f"full fixed rate: {results['full']['predict_fixed_rate_60pct']}", flush=True)
        meta = httpx.post(full_url + "/metadata", headers=ADMIN, timeout=30).json()
        results["full_counters"] = {
            "predictor": meta["counters"],
            "request_log": meta["request_log"],
        }
        stop_all(procs)
        from pipelines.serving.request_log import read_shards

        results["full_counters"]["logged_rows_after_shutdown"] = len(read_shards(work / "requests"))
        report = {
            "benchmark": "serving_latency",
            "date": started_at.date().isoformat(),
            "started_at": started_at.isoformat(timespec="seconds"),
            "machine": machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "project": str(project),
            "bento": {k: built.get(k) for k in ("bento_tag", "archive", "release_id", "tiers")},
            "events_in_snapshot": int(
                pd.read_parquet(project / "data/events.parquet", columns=["ts"]).shape[0]
            ),
            "settings": {
                "requests": args.requests,
                "concurrency": concurrencies,
                "batch_rows": args.batch_rows,
                "batch_calls": args.batch_calls,
                "workers": 1,
                "omp_num_threads": 1,
                "client": "httpx (asyncio)",
            },
            "results": results,
            "command": "python benchmarks/serving_latency.py " + " ".join(sys.argv[1:]),
        }
        print(save_results(args.out, "serving_latency", report, markdown))
    finally:
        stop_all(procs)
        discard(work)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Serving latency",
        "",
        f"Date {report['date']}; {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
        f"BentoML {m['bentoml']}, scikit-learn {m['scikit_learn']}; one worker, "
        "OMP_NUM_THREADS=1; load generator (httpx, asyncio) on the same machine. "
        f"Load average before/after: {report['load_average_before'][0]} / "
        f"{report['load_average_after'][0]} (the machine was shared with other jobs).",
        "",
        f"Bento `{report['bento']['bento_tag']}`, snapshot of {report['events_in_snapshot']:,} "
        "events. Full path = JSON validation, point-in-time feature lookup, routing, model, "
        "fallback checks, request log (background thread). Bare = the same model on "
        "precomputed features in a minimal BentoML service.",
        "",
        "| service | scenario | calls | rows/s | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for service in ("full", "bare"):
        for name, r in report["results"].get(service, {}).items():
            lines.append(
                f"| {service} | {name} | {r['calls']} | {r['rows_per_s']:,} | {r['req_per_s']:,} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |"
            )
    full, bare = report["results"].get("full", {}), report["results"].get("bare", {})
    if "predict_c8" in full and "predict_c8" in bare:
        ratio = full["predict_c8"]["req_per_s"] / bare["predict_c8"]["req_per_s"]
        per_round = [
            round(f / b, 2)
            for f, b in zip(
                full["predict_c8"]["rounds_req_per_s"],
                bare["predict_c8"]["rounds_req_per_s"],
                strict=True,
            )
        ]
        lines += [
            "",
            f"Full-path throughput at concurrency 8 = {ratio:.2f}x the bare service "
            f"(per round: {per_round}).",
        ]
    c = report["results"].get("full_counters", {})
    if c:
        log = c.get("request_log") or {}
        pred = c.get("predictor") or {}
        lines += [
            "",
            f"Full path answered {pred.get('rows')} rows, by route {pred.get('routes')}; "
            f"degraded rows {pred.get('degraded_rows')} {pred.get('degraded_reasons') or ''}.",
        ]
        lines += [
            "",
            f"Request log: {log.get('written_rows')} rows written before shutdown, "
            f"{c.get('logged_rows_after_shutdown')} after a clean shutdown, "
            f"{log.get('dropped_rows')} dropped.",
        ]
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
