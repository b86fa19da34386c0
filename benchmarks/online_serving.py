"""The service reading the online store: /predict latency, event-to-response freshness, outages.

What it does (one machine, loopback, one BentoML worker each):

1. packages a trained project's model and events with this repository's code into a
   temporary BentoML home (as ``benchmarks/serving_latency.py`` does) and materializes
   a SQLite online store from the project's ``data/events.parquet``;
2. serves it twice side by side: with a release naming the store (``online_store``)
   and with ``CTR_FEATURE_STORE_URL=none`` (the packaged snapshot only, the default);
   /predict latency at concurrency 1 for the same requests (real keys, request time
   one minute after the last event, so both paths have fresh features), in rounds
   alternating the two services;
3. freshness through the service: a new event is POSTed to /admin/ingest (or written
   into the file by another process, as ``mlops features ingest`` does) and /predict
   is polled until its ``feature_age_seconds`` shows the new watermark;
4. outages under steady traffic: the SQLite file removed and restored after 2 s;
   a real redis-server (append-only file) stopped and restarted after 2 s; what
   clients got (status, route, degraded answers) and how long degradation lasted;
5. writes ``benchmarks/results/online_serving.json`` and ``.md``.

Usage::

    python benchmarks/online_serving.py --project .
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_latency import (  # noqa: E402
    build_bento,
    closed_loop,
    free_port,
    machine,
    start,
    stop,
    summarize,
)

from benchmarks._machine import save_results  # noqa: E402

TOKEN = "bench-token"


def iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()


def event(eid: str, ts: int, user: str, item: str) -> dict[str, Any]:
    return {
        "event_id": eid,
        "ts": iso(ts),
        "user_id": user,
        "item_id": item,
        "surface": "feed",
        "device": "mobile",
        "position": 1,
        "clicked": 0,
        "click_ts": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=1500, help="/predict calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freshness-runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    project = args.project.resolve()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

    from pipelines.features.online_store import OnlineStore
    from pipelines.modeling.release import reseal_release_dict
    from tests.support.store import RedisServer, Traffic, outage_summary

    work = Path(tempfile.mkdtemp(prefix="online_serving_"))
    home = work / "home"
    tag, _ = build_bento(project, work)  # the project's model and events, this repository's code
    events = pd.read_parquet(project / "data/events.parquet")
    db = work / "online/features.db"
    t = time.perf_counter()
    with OnlineStore.open(f"sqlite:///{db}") as store:
        for i in range(0, len(events), 50_000):
            store.ingest(events.iloc[i : i + 50_000])
        wm = int(store.stats()["watermark_ms"])
    print(f"store materialized: {len(events):,} events in {time.perf_counter() - t:.1f} s")
    release = json.loads((work / "src/build/release/release.json").read_text())
    release["online_store"] = {
        "url": f"sqlite:///{db}",
        "feature_set": release["feature_source"]["feature_set"],
    }
    release_file = work / "release.json"
    release_file.write_text(json.dumps(reseal_release_dict(release)))

    servers: dict[str, Any] = {}
    for name, extra in (
        ("store", {"CTR_RELEASE_FILE": str(release_file)}),
        ("snapshot", {"CTR_FEATURE_STORE_URL": "none"}),
    ):
        port = free_port()
        env = {
            **os.environ,
            "BENTOML_HOME": str(home),
            "OMP_NUM_THREADS": "1",
            "CTR_ADMIN_TOKEN": TOKEN,
            "CTR_REQUEST_LOG_DIR": str(work / name / "requests"),
            "CTR_PROFILE_DIR": str(work / name / "live"),
            "CTR_STATE_DIR": str(work / name / "state"),
            **extra,
        }
        env.pop("CTR_FEATURE_STORE_URL", None) if name == "store" else None
        url = f"http://127.0.0.1:{port}"
        (work / name).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)]
        servers[name] = (url, start(cmd, env, work / name, url, work / f"{name}.log"))
    report: dict[str, Any] = {"machine": machine(), "date": dt.date.today().isoformat()}
    try:
        # --- latency ---------------------------------------------------------
        rng = np.random.default_rng(0)
        recent = events[events["ts"] > events["ts"].max() - pd.Timedelta(days=1)]
        rows = recent.iloc[rng.integers(0, len(recent), args.requests)]
        at = iso(wm + 60_000)
        bodies = [
            json.dumps({"user": u, "item": i, "surface": s, "device": d, "timestamp": at}).encode()
            for u, i, s, d in zip(
                rows.user_id, rows.item_id, rows.surface, rows.device, strict=True
            )
        ]
        check = {
            n: httpx.post(
                u + "/predict", content=bodies[0], headers={"content-type": "application/json"}
            ).json()
            for n, (u, _) in servers.items()
        }
        assert all(not c["degraded"] for c in check.values()), check
        parts: dict[str, list[dict[str, Any]]] = {"store": [], "snapshot": []}
        for _ in range(args.rounds):
            for name, (url, _) in servers.items():
                parts[name].append(asyncio.run(closed_loop(url, "/predict", bodies, 1, 1)))
        report["latency_c1"] = {n: summarize(p) for n, p in parts.items()}
        print(json.dumps(report["latency_c1"], indent=1))

        # --- freshness through the service -----------------------------------
        url = servers["store"][0]
        user, item = str(rows.user_id.iloc[0]), str(rows.item_id.iloc[0])
        probe = {"user": user, "item": item, "surface": "feed", "device": "mobile"}
        fresh: dict[str, list[float]] = {"admin_ingest": [], "external_writer": []}
        clock = wm
        with (
            httpx.Client(base_url=url, timeout=30) as client,
            OnlineStore.open(f"sqlite:///{db}") as writer,
        ):
            for k in range(args.freshness_runs):
                for how in fresh:
                    clock += 1000
                    new = event(f"fresh-{how}-{k}", clock, user, item)
                    t_req = clock + 60_000
                    started = time.perf_counter()
                    if how == "admin_ingest":
                        r = client.post(
                            "/admin/ingest",
                            json={"events": [new]},
                            headers={"authorization": f"Bearer {TOKEN}"},
                        )
                        assert r.status_code == 200, r.text
                    else:
                        frame = pd.DataFrame([new])
                        frame["ts"] = pd.to_datetime(frame["ts"])
                        frame["click_ts"] = pd.NaT
                        writer.ingest(frame)
                    while True:
                        answer = client.post(
                            "/predict", json={**probe, "timestamp": iso(t_req)}
                        ).json()
                        if answer["feature_age_seconds"] == 60.0:
                            break
                    fresh[how].append((time.perf_counter() - started) * 1000)
        report["freshness_ms"] = {
            how: {
                "p50": round(float(np.percentile(v, 50)), 1),
                "p99": round(float(np.percentile(v, 99)), 1),
                "max": round(float(np.max(v)), 1),
                "runs": len(v),
            }
            for how, v in fresh.items()
        }
        print(report["freshness_ms"])

        # --- outages ---------------------------------------------------------
        body = {**probe, "timestamp": iso(wm + 60_000)}

        def outage(cut: Any, restore: Any) -> dict[str, Any]:
            traffic = Traffic(url, body).start()
            time.sleep(1.0)
            t_cut = time.monotonic()
            cut()
            time.sleep(2.0)
            restore()
            t_back = time.monotonic()
            traffic.wait_recovered(t_back)
            time.sleep(0.5)
            traffic.stop()
            return outage_summary(traffic.answers, t_cut, t_back)

        away = db.with_name("features.db.away")
        report["outage_sqlite_file_removed"] = outage(
            lambda: db.rename(away), lambda: away.rename(db)
        )
        redis_server = RedisServer(work / "redis")
        redis_server.start()
        try:
            with OnlineStore.open(redis_server.url) as store:
                store.ingest(events[events["ts"] > events["ts"].max() - pd.Timedelta(days=1)])
            release["online_store"]["url"] = redis_server.url
            release_file.write_text(json.dumps(reseal_release_dict(release)))
            r = httpx.post(
                url + "/admin/reload", json={}, headers={"authorization": f"Bearer {TOKEN}"}
            )
            assert r.status_code == 200 and not r.json()["problems"], r.text
            report["outage_redis_stopped"] = outage(redis_server.stop, redis_server.start)
        finally:
            redis_server.stop()
        print(json.dumps({k: v for k, v in report.items() if k.startswith("outage")}, indent=1))
    finally:
        for _, proc in servers.values():
            stop(proc)
    save_results(args.out, "online_serving", report, markdown)
    print(f"wrote {args.out / 'online_serving.md'}")


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Serving from the online store",
        "",
        f"`python benchmarks/online_serving.py --project .` on {m.get('cpu', '?')} "
        f"({m.get('cores', '?')} cores), {r['date']}.",
        "",
        "## /predict latency, concurrency 1 (same requests, rounds alternating)",
        "",
        "| features from | calls | p50 ms | p95 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in r["latency_c1"].items():
        lines.append(
            f"| {name} | {s['calls']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
            f"{s['req_per_s']} |"
        )
    lines += [
        "",
        "## Event ingested -> visible in a /predict response",
        "",
        "| path | runs | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for how, s in r["freshness_ms"].items():
        lines.append(f"| {how} | {s['runs']} | {s['p50']} | {s['p99']} | {s['max']} |")
    lines += [
        "",
        "## Store outages under steady /predict traffic (one client, back to back)",
        "",
        "| outage | store down s | requests | non-200 | degraded answers | degraded for s | "
        "first degraded after cut ms | served from store again after restore ms | routes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("outage_sqlite_file_removed", "outage_redis_stopped"):
        s = r[key]
        lines.append(
            f"| {key[7:]} | {s['outage_seconds']} | {s['requests']} | {s['non_200']} | "
            f"{s['degraded_requests']} | {s['degraded_seconds']} | "
            f"{s['first_degraded_after_cut_ms']} | {s['recovered_after_restore_ms']} | "
            f"{', '.join(s['routes_while_degraded'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
