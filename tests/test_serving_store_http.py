"""The service reading the online store, over a real `bentoml serve` on loopback.

The small project's exported bento is served with a release file that names a
SQLite online store (what `features.online.serve: true` writes); the store is
materialized from the packaged event log before the service starts. The tests
then ingest new events (through the service's /admin/ingest and directly into
the file, as `mlops features ingest` would), cut the store under traffic (SQLite
file removed and restored; a real redis-server stopped and restarted) and check
parity of the served vectors from the request log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from pipelines.features.online_store import OnlineStore
from pipelines.modeling.release import reseal_release_dict
from pipelines.stages.packaging import import_bento
from tests.support.loadtest import Served
from tests.support.project import project_env
from tests.support.store import RedisServer, Traffic, outage_summary

pytestmark = pytest.mark.slow
TOKEN = "store-admin-token-5678"
SLA = 300.0
RESULTS: dict[str, Any] = {}  # outage figures; written to $STORE_OUTAGE_RESULTS when set


def iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms", tz="UTC").isoformat()


@dataclass
class StoreServer:
    served: Served
    work: Path
    db: Path
    release_file: Path
    log_dir: Path
    server_log: Path
    events: pd.DataFrame
    watermark_ms: int
    project: Path

    @property
    def url(self) -> str:
        return self.served.url

    def post(self, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return httpx.post(self.url + path, json=body or {}, headers=headers, timeout=60)

    def predict(self, user: str, item: str, at_ms: int, surface: str = "feed") -> dict[str, Any]:
        body = {"user": user, "item": item, "surface": surface, "device": "mobile"}
        response = self.post("/predict", {**body, "timestamp": iso(at_ms)})
        assert response.status_code == 200, response.text
        return response.json()

    def admin(self, path: str, body: Any = None) -> dict[str, Any]:
        response = self.post(path, body, token=TOKEN)
        assert response.status_code == 200, response.text
        return response.json()

    def features(self) -> dict[str, Any]:
        return httpx.post(
            self.url + "/metadata",
            json={},
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ).json()["features"]


def _open(url: str) -> OnlineStore:
    return OnlineStore.open(url, "ctr_v1", 3600, SLA)


@pytest.fixture(scope="module")
def server(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServer]:
    work = tmp_path_factory.mktemp("store_serve")
    home = work / "bentoml_home"
    import_bento(small_project / "build/bento/ctr_service.bento", home)
    bento_tag = json.loads((small_project / "build/bento/bento.json").read_text())["bento_tag"]
    events = pd.read_parquet(small_project / "data/events.parquet")
    db = work / "online" / "features.db"
    with _open(f"sqlite:///{db}") as store:  # materialize the store from the packaged log
        store.ingest(events)
        watermark = int(store.stats()["watermark_ms"])
    release = json.loads((small_project / "build/release/release.json").read_text())
    # The outages test the feature path: a model call slowed past the 40 ms budget by a busy
    # test machine (the chain then answers with the baseline) must not count against it.
    release["policy"]["latency_budget_ms"] = 3000
    # One worker: /metadata reports the feature-source status (outages, degraded) of the
    # process that answers it; with two, it may come from the one that saw no traffic yet.
    release["policy"]["workers"] = 1
    release["online_store"] = {
        "url": "sqlite:///online/features.db",  # relative: resolved against MLOPS_PROJECT_ROOT
        "feature_set": "ctr_v1",
        "allowed_lateness_seconds": 3600,
        "timeout_ms": 50,
        "retry_seconds": 0.5,
        "max_ingest_rows": 500,
    }
    release_file = work / "release.json"
    release_file.write_text(json.dumps(reseal_release_dict(release)))
    env = project_env(work)
    env.pop("CTR_FEATURE_STORE_URL", None)
    env.update(
        BENTOML_HOME=str(home),
        MLOPS_PROJECT_ROOT=str(work),
        CTR_ADMIN_TOKEN=TOKEN,
        CTR_RELEASE_FILE=str(release_file),
        CTR_REQUEST_LOG_DIR=str(work / "requests"),
        CTR_PROFILE_DIR=str(work / "live"),
        CTR_STATE_DIR=str(work / "state"),
    )
    log_path = work / "server.log"
    served = Served(bento_tag, None, env, work, log_path, ready_timeout=120)
    srv = StoreServer(
        served,
        work,
        db,
        release_file,
        work / "requests",
        log_path,
        events,
        watermark,
        small_project,
    )
    try:
        yield srv
    finally:
        served.stop()
        out = os.environ.get("STORE_OUTAGE_RESULTS")
        if out and RESULTS:
            Path(out).write_text(json.dumps(RESULTS, indent=2))


def _event(event_id: str, ts: int, user: str, item: str, click_ms: int | None) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "ts": iso(ts),
        "user_id": user,
        "item_id": item,
        "surface": "feed",
        "device": "mobile",
        "position": 1,
        "clicked": int(click_ms is not None),
        "click_ts": None if click_ms is None else iso(click_ms),
    }


def test_service_reads_the_store_and_sees_events_ingested_after_packaging(
    server: StoreServer,
) -> None:
    meta = server.features()
    assert meta["kind"] == "online_store" and not meta["degraded"], meta
    assert meta["fallback"]["kind"] == "snapshot"
    user, item = server.events["user_id"].iloc[0], server.events["item_id"].iloc[0]
    wm = server.watermark_ms
    at = wm + 120_000
    before = server.predict(user, item, at)
    assert (before["route"], before["degraded"], before["features_fresh"]) == ("prod", False, True)
    assert before["feature_age_seconds"] == 120.0

    new = [
        _event(f"after-{k}", wm + 1000 * (k + 1), user, item, wm + 1000 * (k + 1) + 500)
        for k in range(8)
    ]
    bad = {**_event("after-bad", wm + 9000, user, item, None), "surface": "email"}
    report = server.admin("/admin/ingest", {"events": [*new, bad]})
    assert (report["impressions"], report["clicks"], report["rejected"]) == (8, 8, 1)
    assert "surface" in report["rejected_rows"][0]["reason"]
    assert report["watermark_ms"] == wm + 8500

    after = server.predict(user, item, at)
    assert after["probability"] != before["probability"]
    assert after["feature_age_seconds"] == (at - (wm + 8500)) / 1000
    assert after["features_fresh"] and not after["degraded"]

    # Another writer (what `mlops features ingest` does) is visible too.
    with _open(f"sqlite:///{server.db}") as store:
        store.ingest(
            pd.DataFrame([_event("after-cli", wm + 10_000, user, item, None)]).assign(
                ts=lambda f: pd.to_datetime(f["ts"]), click_ts=pd.NaT
            )
        )
    assert server.predict(user, item, at)["feature_age_seconds"] == (at - wm - 10_000) / 1000

    stale = server.predict(user, item, wm + 10_000 + int((SLA + 60) * 1000))
    assert stale["route"] == "baseline" and not stale["features_fresh"]
    assert "freshness SLA" in stale["degraded_reason"]

    refused = server.post("/admin/ingest", {"events": new})
    assert refused.status_code == 401
    too_many = server.post("/admin/ingest", {"events": new * 70}, token=TOKEN)
    assert too_many.status_code == 400 and "events" in too_many.text


def _outage(server: StoreServer, name: str, cut: Any, restore: Any) -> dict[str, Any]:
    user, item = server.events["user_id"].iloc[1], server.events["item_id"].iloc[1]
    body = {
        "user": user,
        "item": item,
        "surface": "search",
        "device": "mobile",
        "timestamp": iso(server.watermark_ms + 60_000),  # fresh for the store and the snapshot
    }
    traffic = Traffic(server.url, body).start()
    try:
        time.sleep(1.0)
        t_cut = time.monotonic()
        cut()
        time.sleep(2.0)
        restore()
        t_back = time.monotonic()
        recovered = traffic.wait_recovered(t_back)
        time.sleep(0.3)
    finally:
        traffic.stop()
    summary = outage_summary(traffic.answers, t_cut, t_back)
    RESULTS[name] = summary
    print(name, json.dumps(summary))
    assert recovered, f"{name}: still degraded after restore: {traffic.answers[-1]}"
    assert summary["non_200"] == 0, summary
    assert summary["degraded_requests"] > 0, summary
    # The snapshot covers the request time, so the prod model still answered.
    assert summary["routes_while_degraded"] == ["prod"], (
        summary,
        {a.degraded_reason for a in traffic.answers if a.route != "prod"},
    )
    return summary


def test_sqlite_store_removed_and_restored_under_traffic(server: StoreServer) -> None:
    away = server.db.with_name("features.db.away")
    _outage(
        server,
        "sqlite_file_removed",
        lambda: server.db.rename(away),
        lambda: away.rename(server.db),
    )
    status = server.features()
    assert not status["degraded"] and status["outages"][-1]["cause"].endswith("was removed")


def test_redis_store_stopped_and_restarted_under_traffic(
    server: StoreServer, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        with _open(f"sqlite:///{server.db}") as sqlite_store, _open(redis_server.url) as store:
            log = server.events
            store.ingest(log)
            assert store.stats()["watermark_ms"] == server.watermark_ms
            assert sqlite_store.stats()["watermark_ms"] > server.watermark_ms  # test 1 added
        release = json.loads(server.release_file.read_text())
        release["online_store"]["url"] = redis_server.url
        server.release_file.write_text(json.dumps(reseal_release_dict(release)))
        assert server.admin("/admin/reload")["problems"] == []
        assert server.features()["url"] == redis_server.url
        _outage(server, "redis_stopped", redis_server.stop, redis_server.start)
        status = server.features()
        assert not status["degraded"] and status["outages"], status
    finally:
        redis_server.stop()
        release = json.loads(server.release_file.read_text())
        release["online_store"]["url"] = "sqlite:///online/features.db"
        server.release_file.write_text(json.dumps(reseal_release_dict(release)))
        server.admin("/admin/reload")


def test_parity_of_served_vectors_from_the_request_log(server: StoreServer, tmp_path: Path) -> None:
    time.sleep(1.5)  # the request log is flushed every second
    events = tmp_path / "events.parquet"
    with _open(f"sqlite:///{server.db}") as store:
        assert store.stats()["counters"]["impressions"] == len(server.events) + 9
    # The event log the store holds: the packaged events plus the ones the tests ingested.
    user, item = server.events["user_id"].iloc[0], server.events["item_id"].iloc[0]
    wm = server.watermark_ms
    extra = [
        _event(f"after-{k}", wm + 1000 * (k + 1), user, item, wm + 1000 * (k + 1) + 500)
        for k in range(8)
    ]
    extra.append(_event("after-cli", wm + 10_000, user, item, None))
    added = pd.DataFrame(extra)
    for col in ("ts", "click_ts"):
        added[col] = pd.to_datetime(added[col], utc=True, format="ISO8601")
    pd.concat(
        [server.events, added.astype(server.events.dtypes.to_dict())], ignore_index=True
    ).to_parquet(events)
    result = subprocess.run(
        [
            sys.executable,  # the project's own pipelines package (cwd), like `mlops` there
            "-m",
            "pipelines.cli",
            "features",
            "parity",
            "--store",
            f"sqlite:///{server.db}",
            "--events",
            str(events),
            "--served",
            str(server.log_dir),
            "--sample",
            "100000",
            "--json-out",
            str(tmp_path / "parity.json"),
        ],
        cwd=server.project,  # its params.yaml (read only)
        env=project_env(server.project),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["n"] > 50 and sum(report["mismatches"].values()) == 0, report
