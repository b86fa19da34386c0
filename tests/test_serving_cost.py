"""Compiled trees, the ranking endpoint and surface priorities, through a real `bentoml serve`.

One server for the module: the small project's exported bento (built by `dvc repro`, so
its prod model ships compiled), imported into an empty BentoML home, one worker, with a
release whose policy has a small ranking limit and shedding from 2 calls in flight.
Fast in-process checks (the one-user feature path, the shedding rule, a library built
for another platform) come first.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pandas as pd
import pytest

from pipelines.core.settings import ServingSettings
from pipelines.features.definitions import CTR_V1, EventIndex, to_ms
from pipelines.features.search import HELPER_THREAD, spare_core
from pipelines.modeling.compiled import META, SPLIT_ROWS, CompiledModel, CompileError
from pipelines.modeling.release import reseal_release_dict
from pipelines.serving.overload import shed_reasons, shed_threshold
from pipelines.serving.request_log import read_shards
from pipelines.serving.sources import SnapshotFeatureSource
from pipelines.stages.dataset import load_split
from pipelines.stages.packaging import import_bento
from tests.support.loadtest import Served, workload_frame
from tests.support.project import project_env

TOKEN = "cost-test-admin-token-1234"
MAX_RANK = 50
MAX_BATCH = 250


def _model_folder(home: Path, tag: str) -> Path:
    name, version = tag.split(":")
    return home / "models" / name / version


# --- in-process ----------------------------------------------------------------------
def test_one_user_lookup_equals_the_row_by_row_lookup(small_project: Path) -> None:
    events = pd.read_parquet(small_project / "data/events.parquet")
    source = SnapshotFeatureSource(EventIndex(events, CTR_V1))
    rows = workload_frame(small_project / "data", 1)
    items = [*pd.unique(events["item_id"])[:300].tolist(), "i-never-seen"]
    n = len(items)
    t = int(to_ms(rows.ts)[0])
    for user in (rows.user_id[0], "u-never-seen"):
        one = source.lookup_one_user(user, items, "search", "tablet", t)
        each = source.lookup(
            [user] * n, items, ["search"] * n, ["tablet"] * n, np.full(n, t, dtype=np.int64)
        )
        np.testing.assert_array_equal(one.X, each.X)
        np.testing.assert_array_equal(one.as_of_ms, each.as_of_ms)


def test_shedding_rule_levels() -> None:
    policy = ServingSettings(shed_inflight=4, surface_priority={"search": 0, "feed": 1, "recs": 2})
    assert shed_threshold(policy, "search") is None
    assert (shed_threshold(policy, "recs"), shed_threshold(policy, "feed")) == (4, 8)
    assert shed_reasons(policy, None, ["recs"]) == {}  # not a served call
    assert shed_reasons(policy, 3, ["recs", "feed", "search"]) == {}
    assert set(shed_reasons(policy, 4, ["recs", "feed", "search"])) == {"recs"}
    assert set(shed_reasons(policy, 8, ["recs", "feed", "search"])) == {"recs", "feed"}
    off = policy.model_copy(update={"shed_inflight": 0})
    assert shed_reasons(off, 100, ["recs"]) == {}
    with pytest.raises(ValueError, match="unknown surfaces"):
        ServingSettings(surface_priority={"email": 1})


def test_priority_lane_takes_the_most_critical_queued_call_first() -> None:
    import asyncio
    import contextvars

    from pipelines.serving.overload import PriorityLane, call_level

    policy = ServingSettings(surface_priority={"search": 0, "feed": 1, "recs": 2})
    assert call_level(policy, ["recs", "feed"]) == 1 and call_level(policy, []) == 0
    lane = PriorityLane()
    order: list[str] = []
    who: contextvars.ContextVar[str] = contextvars.ContextVar("who")
    gate = threading.Event()

    def job(name: str) -> str:
        gate.wait(5)  # the first call holds the thread while the others queue
        order.append(f"{name}:{who.get()}")
        if name == "boom":
            raise KeyError(name)
        return name

    async def main() -> list[Any]:
        async def submit(name: str, level: int) -> Any:
            who.set(name)  # each call runs in the context it was submitted from
            return await lane.run(level, job, name)

        tasks = [asyncio.create_task(submit("holder", 0))]
        await asyncio.sleep(0.05)
        for name, level in [("recs", 2), ("feed", 1), ("boom", 1), ("search", 0)]:
            tasks.append(asyncio.create_task(submit(name, level)))
        await asyncio.sleep(0.05)
        assert lane.queued() == {2: 1, 1: 2, 0: 1}
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    lane.close()
    assert order == ["holder:holder", "search:search", "feed:feed", "boom:boom", "recs:recs"]
    assert results[:3] == ["holder", "recs", "feed"] and isinstance(results[3], KeyError)
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(lane.run(0, job, "late"))


def test_a_call_that_keeps_the_gil_runs_on_the_loop_only_when_the_lane_is_idle() -> None:
    import asyncio

    from pipelines.serving.overload import PriorityLane

    lane = PriorityLane()
    gate = threading.Event()
    ran: list[tuple[str, str]] = []

    def job(name: str, wait: bool = False) -> str:
        if wait:
            gate.wait(5)
        ran.append((name, threading.current_thread().name))
        return name

    async def main() -> list[Any]:
        loop_thread = threading.current_thread().name
        assert await lane.run(0, job, "idle", inline=True) == "idle"
        assert ran == [("idle", loop_thread)]
        assert await lane.run(0, job, "not inline") == "not inline"
        assert ran[-1] == ("not inline", "scoring")
        holder = asyncio.create_task(lane.run(1, job, "holder", True))
        await asyncio.sleep(0.05)  # the holder runs on the lane: nothing may overtake it
        low = asyncio.create_task(lane.run(2, job, "low"))
        small = asyncio.create_task(lane.run(0, job, "small", inline=True))
        await asyncio.sleep(0.05)
        assert lane.queued() == {2: 1, 0: 1}
        gate.set()
        return await asyncio.gather(holder, low, small)

    assert asyncio.run(main()) == ["holder", "low", "small"]
    lane.close()
    assert [name for name, _ in ran[2:]] == ["holder", "small", "low"]
    assert {thread for _, thread in ran[2:]} == {"scoring"}
    assert lane.calls == {"inline": 1, "lane": 4}


def test_a_library_built_for_another_platform_is_refused(
    small_project: Path, tmp_path: Path
) -> None:
    release = json.loads((small_project / "build/release/release.json").read_text())
    folder = _model_folder(small_project / ".bentoml", release["prod"]["tag"])
    copy = tmp_path / "lib"
    shutil.copytree(folder, copy)
    CompiledModel.load(copy)  # loads as built
    meta = json.loads((copy / META).read_text())
    (copy / META).write_text(json.dumps({**meta, "platform": "darwin-arm64-libc"}))
    with pytest.raises(CompileError, match="built for darwin-arm64-libc"):
        CompiledModel.load(copy)


def test_small_calls_keep_the_gil_and_answer_exactly_as_tl2cgen(small_project: Path) -> None:
    """Fewer than RELEASE_GIL_QUERIES rows go through tl2cgen's C API without letting go of the
    GIL; the probabilities are those of ``tl2cgen.Predictor.predict``, bit for bit, with
    missing values and extreme ones, and ``predict`` picks the path by the row count."""
    import tl2cgen

    from pipelines.features.search import RELEASE_GIL_QUERIES as HOLD_GIL_ROWS

    release = json.loads((small_project / "build/release/release.json").read_text())
    model = CompiledModel.load(_model_folder(small_project / ".bentoml", release["prod"]["tag"]))
    rng = np.random.default_rng(11)
    X = rng.normal(0, 50, (3 * HOLD_GIL_ROWS, model.meta["features"]))
    X[rng.random(X.shape) < 0.15] = np.nan
    X[0, :] = np.nan
    X[1, :] = [1e300, -1e300] * (X.shape[1] // 2) + [0.0] * (X.shape[1] % 2)
    want = np.asarray(model._predictor.predict(tl2cgen.DMatrix(X, dtype="float64"))).ravel()
    for n in (1, 2, HOLD_GIL_ROWS - 1):
        assert np.array_equal(model.predict_holding_gil(X[:n]), want[:n]), n
        assert np.array_equal(model.predict(X[:n]), want[:n]), n
    assert np.array_equal(model.predict(X), want)  # the tl2cgen path, GIL let go
    calls: list[int] = []
    held = model.predict_holding_gil
    model.predict_holding_gil = lambda X: calls.append(len(X)) or held(X)  # type: ignore[method-assign]
    model.predict(X[: HOLD_GIL_ROWS - 1])
    model.predict(X[:HOLD_GIL_ROWS])
    assert calls == [HOLD_GIL_ROWS - 1]


def test_a_large_call_with_a_spare_core_scores_its_halves_on_two_threads(
    small_project: Path,
) -> None:
    release = json.loads((small_project / "build/release/release.json").read_text())
    model = CompiledModel.load(_model_folder(small_project / ".bentoml", release["prod"]["tag"]))
    rng = np.random.default_rng(5)
    X = rng.normal(0, 50, (SPLIT_ROWS + 1, model.meta["features"]))
    X[rng.random(X.shape) < 0.15] = np.nan
    want = model.predict(X)
    threads: list[str] = []
    released = model._released
    model._released = lambda *a: threads.append(threading.current_thread().name) or released(*a)  # type: ignore[method-assign]
    with spare_core():
        assert np.array_equal(model.predict(X), want)  # both halves, in order
    assert sorted(t.startswith(HELPER_THREAD) for t in threads) == [False, True]
    threads.clear()
    with spare_core():
        model.predict(X[:-2])  # under SPLIT_ROWS: one call on this thread
    model.predict(X)  # no spare core
    assert threads == [threading.current_thread().name] * 2


# --- one real server ---------------------------------------------------------------------
class Server:
    def __init__(self, served: Served, home: Path, work: Path, release: dict[str, Any]) -> None:
        self.served, self.home, self.work, self.release = served, home, work, release
        self.ranked_items = 0
        self.column_rows: list[str] = []

    def post(self, path: str, body: Any, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.served.url + path, json=body, headers=headers, timeout=60)

    def metadata(self) -> dict[str, Any]:
        return self.post("/metadata", {}, TOKEN).json()

    def reload(self) -> dict[str, Any]:
        response = self.post("/admin/reload", {}, TOKEN)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def server(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("cost")
    home = work / "bentoml_home"
    import_bento(small_project / "build/bento/ctr_service.bento", home)
    bento_tag = json.loads((small_project / "build/bento/bento.json").read_text())["bento_tag"]
    release = json.loads((small_project / "build/release/release.json").read_text())
    release["policy"].update(
        workers=1,
        max_rank_items=MAX_RANK,
        max_batch_size=MAX_BATCH,
        shed_inflight=2,
        latency_budget_ms=5000,
    )
    release["policy"]["surface_priority"] = {"search": 0, "feed": 1, "recs": 2}
    release = reseal_release_dict(release)
    (work / "release.json").write_text(json.dumps(release))
    env = project_env(work)
    env.update(
        BENTOML_HOME=str(home),
        CTR_ADMIN_TOKEN=TOKEN,
        CTR_ENABLE_FAULT_INJECTION="1",
        CTR_RELEASE_FILE=str(work / "release.json"),
        CTR_REQUEST_LOG_DIR=str(work / "requests"),
        CTR_PROFILE_DIR=str(work / "live"),
        CTR_STATE_DIR=str(work / "state"),
    )
    served = Served(bento_tag, None, env, work, work / "server.log", ready_timeout=120)
    try:
        yield Server(served, home, work, release)
    finally:
        served.stop()


@pytest.fixture(scope="module")
def rows(small_project: Path) -> pd.DataFrame:
    return workload_frame(small_project / "data", 200, seed=3)


def _bodies(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {"user": u, "item": i, "surface": s, "device": d, "timestamp": t.isoformat()}
        for u, i, s, d, t in zip(
            rows.user_id, rows.item_id, rows.surface, rows.device, rows.ts, strict=True
        )
    ]


@pytest.mark.slow
def test_package_ships_a_verified_hashed_library(small_project: Path, server: Server) -> None:
    prod = server.release["prod"]
    for name in ("model.so", "compiled.json"):
        assert len(prod["files"][name]) == 32 and len(prod["sha256"][name]) == 64
    record = prod["lineage"]["compiled"]
    test_rows = len(load_split(small_project / "build/dataset", "test"))
    assert record["shipped"] and record["test_rows"] == test_rows > 1000
    assert 0 <= record["max_abs_diff"] <= record["tolerance"] == 1e-9
    with tarfile.open(small_project / "build/bento/ctr_service.bento") as archive:
        names = archive.getnames()
    version = prod["tag"].split(":")[1]
    assert any(n.endswith(f"models/ctr_model/{version}/model.so") for n in names)


@pytest.mark.slow
def test_compiled_answers_match_sklearn_and_offline_features(
    small_project: Path, server: Server, rows: pd.DataFrame
) -> None:
    meta = server.metadata()
    assert meta["tiers"]["prod"]["runtime"] == "compiled", meta["tiers"]
    answered = server.post("/predict_batch", {"requests": _bodies(rows)}).json()
    assert {a["runtime"] for a in answered} == {"compiled"}
    assert {a["route"] for a in answered} == {"prod"}
    single = server.post("/predict", _bodies(rows)[0]).json()
    assert single["runtime"] == "compiled" and single["probability"] == answered[0]["probability"]
    # the offline point-in-time features through the scikit-learn model
    events = pd.read_parquet(small_project / "data/events.parquet")
    X = EventIndex(events, CTR_V1).compute(
        rows.user_id, rows.item_id, rows.surface, rows.device, to_ms(rows.ts)
    )
    model = joblib.load(small_project / "build/model/model.joblib")
    offline = model.predict_proba(X)[:, 1]
    served = np.array([a["probability"] for a in answered])
    assert np.max(np.abs(served - offline)) <= 1e-6


@pytest.mark.slow
def test_a_damaged_library_falls_back_to_sklearn_with_the_same_answers(
    server: Server, rows: pd.DataFrame
) -> None:
    body = {"requests": _bodies(rows)}
    compiled = server.post("/predict_batch", body).json()
    library = _model_folder(server.home, server.release["prod"]["tag"]) / "model.so"
    original = library.read_bytes()
    try:
        library.write_bytes(original[:-16] + b"\0" * 16)
        reloaded = server.reload()
        assert any("compiled library refused" in p for p in reloaded["problems"])
        assert reloaded["tiers"]["prod"]["loaded"] and reloaded["tiers"]["prod"]["runtime"] == (
            "sklearn"
        )
        fallback = server.post("/predict_batch", body).json()
    finally:
        library.write_bytes(original)
    assert {a["runtime"] for a in fallback} == {"sklearn"}
    assert {a["route"] for a in fallback} == {"prod"} and not any(a["degraded"] for a in fallback)
    diff = np.abs(
        np.array([a["probability"] for a in compiled]) - [a["probability"] for a in fallback]
    )
    assert diff.max() <= 1e-6  # answers rounded to 6 decimals; 1e-9 apart before rounding
    assert server.reload()["tiers"]["prod"]["runtime"] == "compiled"


@pytest.mark.slow
def test_rank_sorts_scores_like_the_batch_endpoint_and_logs_every_item(
    server: Server, rows: pd.DataFrame
) -> None:
    user, at = rows.user_id[0], rows.ts[0].isoformat()
    items = list(dict.fromkeys(rows.item_id))[:MAX_RANK]
    ranked = server.post(
        "/rank",
        {"user": user, "surface": "feed", "device": "mobile", "timestamp": at, "items": items},
    )
    assert ranked.status_code == 200, ranked.text
    body = ranked.json()
    assert body["route"] == "prod" and body["runtime"] == "compiled" and not body["degraded"]
    probs = [e["probability"] for e in body["items"]]
    assert probs == sorted(probs, reverse=True)
    assert sorted(e["item"] for e in body["items"]) == sorted(items)
    batch = server.post(
        "/predict_batch",
        {
            "requests": [
                {"user": user, "item": i, "surface": "feed", "device": "mobile", "timestamp": at}
                for i in items
            ]
        },
    ).json()
    expected = {i: a["probability"] for i, a in zip(items, batch, strict=True)}
    assert {e["item"]: e["probability"] for e in body["items"]} == expected
    server.ranked_items = len(items)


@pytest.mark.slow
def test_columns_answer_as_the_batch_endpoint_and_refuse_bad_calls(
    server: Server, rows: pd.DataFrame
) -> None:
    bodies = _bodies(rows)
    batch = server.post("/predict_batch", {"requests": bodies}).json()
    columns = {
        "user": rows.user_id.tolist(),
        "item": rows.item_id.tolist(),
        "surface": rows.surface.tolist(),
        "device": rows.device.tolist(),
        "timestamp_ms": to_ms(rows.ts).tolist(),
    }
    response = server.post("/predict_columns", columns)
    assert response.status_code == 200, response.text
    answer = response.json()
    for field in ("probability", "route", "runtime", "model_version", "features_fresh"):
        assert answer[field] == [a[field] for a in batch], field
    assert set(answer["runtime"]) == {"compiled"} and not any(answer["degraded"])
    server.column_rows = answer["request_id"]
    too_many = {k: v * 2 for k, v in columns.items()}  # 400 rows, the limit is 250
    unequal = {**columns, "item": columns["item"][:-1]}
    for body, words in ((too_many, "at most 250"), (unequal, "one value per row")):
        refused = server.post("/predict_columns", body)
        assert refused.status_code == 400 and words in refused.text, refused.text
    assert server.post("/predict_batch", {"requests": bodies * 2}).status_code == 400


BAD_RANKS: list[tuple[dict[str, Any], str]] = [
    ({"items": []}, "items"),
    ({"items": [f"i{k}" for k in range(MAX_RANK + 1)]}, "items"),
    ({"items": ["i1", "i2", "i1"]}, "distinct"),
    ({"items": ["i1", "bad item"]}, "items"),
    ({"surface": "email"}, "surface"),
    ({"extra": 1}, "extra"),
    ({"timestamp": "yesterday"}, "timestamp"),
]


@pytest.mark.slow
def test_rank_refuses_bad_calls_with_400_naming_the_field(server: Server) -> None:
    base = {"user": "u00001", "surface": "feed", "device": "mobile", "items": ["i00001"]}
    for change, word in BAD_RANKS:
        response = server.post("/rank", {**base, **change})
        assert response.status_code == 400, (change, response.text)
        assert word in response.text, (change, response.text)
    assert server.post("/rank", base).status_code == 200


@pytest.mark.slow
def test_low_priority_surfaces_are_shed_first_when_the_worker_is_saturated(
    server: Server, rows: pd.DataFrame
) -> None:
    at = rows.ts[0].isoformat()

    def call(surface: str) -> dict[str, Any]:
        body = {
            "user": rows.user_id[0],
            "item": rows.item_id[0],
            "surface": surface,
            "device": "mobile",
            "timestamp": at,
        }
        response = server.post("/predict", body)
        assert response.status_code == 200, response.text
        return response.json()

    assert call("recs")["route"] == "prod"  # one call in flight: not saturated
    # Four slow critical calls hold the worker; then one call per surface arrives.
    server.post("/admin/fault", {"target": "prod", "kind": "slow", "delay_ms": 400}, TOKEN)
    answers: dict[str, list[dict[str, Any]]] = {"hold": [], "late": []}
    try:
        held: list[float] = []

        def hold() -> None:
            answers["hold"].append(call("search"))
            held.append(time.monotonic())

        holders = [threading.Thread(target=hold) for _ in range(4)]
        for t in holders:
            t.start()
        threading.Event().wait(0.3)
        done: dict[str, float] = {}

        def late_call(surface: str) -> None:
            answers["late"].append(call(surface))
            done[surface] = time.monotonic()

        late = {
            s: threading.Thread(target=late_call, args=(s,)) for s in ("recs", "feed", "search")
        }
        for surface, t in late.items():  # search queues last, behind recs and feed
            t.start()
            threading.Event().wait(0.1 if surface == "feed" else 0.0)
        for t in [*holders, *late.values()]:
            t.join(60)
    finally:
        server.post("/admin/fault", {"target": "prod", "kind": "none"}, TOKEN)
    shed = [a for a in answers["late"] if a["route"] == "baseline"]
    reasons = sorted(a["degraded_reason"] for a in shed)
    assert len(shed) == 2, answers["late"]  # recs (from 2 in flight) and feed (from 4)
    assert all(r.startswith("shed under overload") for r in reasons)
    assert {r.split("surface ")[1].split()[0] for r in reasons} == {"feed", "recs"}
    assert all(a["runtime"] == "rule" for a in shed)
    assert [a["route"] for a in answers["late"] if a not in shed] == ["prod"]  # search
    assert {a["route"] for a in answers["hold"]} == {"prod"}
    # The critical call queued last is taken first: its slow (400 ms) prod call runs after
    # the holders and before the shed recs and feed calls, which BentoML's own queue (first
    # come, first served) answered right after the holders.
    assert min(done["recs"], done["feed"]) - max(held) > 0.2, (done, held)
    assert done["search"] - max(held) > 0.2, (done, held)
    counters = server.metadata()["counters"]
    assert counters["shed_rows"] == {"recs": 1, "feed": 1}
    assert counters["degraded_reasons"]["shed_overload"] == 2


@pytest.mark.slow
def test_small_calls_run_on_the_event_loop_unless_a_call_may_wait(
    server: Server, rows: pd.DataFrame
) -> None:
    body = _bodies(rows)[0]

    def calls() -> dict[str, int]:
        return server.metadata()["lane"]  # type: ignore[no-any-return]

    before = calls()
    assert server.post("/predict", body).status_code == 200
    one = calls()
    assert one == {**before, "inline": before["inline"] + 1}
    assert server.post("/predict_batch", {"requests": _bodies(rows)}).status_code == 200
    batch = calls()  # 200 rows let go of the GIL in the searches and the trees
    assert batch == {**one, "lane": one["lane"] + 1}
    slow = {"target": "features", "kind": "slow", "delay_ms": 1}
    assert server.post("/admin/fault", slow, TOKEN).status_code == 200
    try:  # a call that may wait (here on the feature source) waits on the lane's thread
        assert server.post("/predict", body).json()["route"] == "prod"
    finally:
        server.post("/admin/fault", {"target": "features", "kind": "none"}, TOKEN)
    assert calls() == {**batch, "lane": batch["lane"] + 1}
    assert server.post("/predict", body).status_code == 200
    assert calls()["inline"] == batch["inline"] + 1


@pytest.mark.slow
def test_request_log_holds_every_ranked_item_column_row_and_shed_row(server: Server) -> None:
    assert server.served.stop() == 0  # clean shutdown: the log is flushed
    log = read_shards(server.work / "requests")
    ranked = log[log["endpoint"] == "rank"]
    assert len(ranked) >= server.ranked_items > 0
    assert ranked["request_id"].is_unique
    columns = log[log["endpoint"] == "predict_columns"]
    assert sorted(columns["request_id"]) == sorted(server.column_rows) != []
    shed = log[log["degraded_reason"].fillna("").str.startswith("shed under overload")]
    assert sorted(shed["surface"]) == ["feed", "recs"]
    assert set(shed["route"]) == {"baseline"}
