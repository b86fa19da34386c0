"""The serving logic without a server: release file, routing, fallback chain, request log.

Uses the small project's trained model and event snapshot plus two more model
versions trained here on the same dataset (candidate and previous).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from pipelines.core import profiles as wl
from pipelines.core.config import ConfigError
from pipelines.core.settings import settings_from
from pipelines.features.definitions import CTR_V1, EventIndex, to_ms
from pipelines.modeling.release import (
    ServingSettings,
    build_release,
    load_release,
)
from pipelines.serving.answers import join_rows
from pipelines.serving.predictor import (
    ColumnsResponse,
    Fault,
    NoTierAvailable,
    Predictor,
    PredictRequest,
    PredictResponse,
    Runtime,
    Scored,
    columns_request_model,
)
from pipelines.serving.request_log import (
    LogBatch,
    RequestLog,
    pending_windows,
    read_shards,
    settle_profiles,
)
from pipelines.serving.routing import Router, unit_hash
from pipelines.serving.schema import RequestRows
from pipelines.serving.sources import SnapshotFeatureSource
from pipelines.serving.window_rows import window_frame
from pipelines.stages.packaging import previous_prod_tag
from tests.support.project import REPO
from tests.support.serving import (
    feature_ref_for_dir,
    last_event_time,
    model_ref_for_dir,
    release_for,
    train_variant,
)


@pytest.fixture(scope="module")
def models(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """prod (the project's model), candidate and previous (trained here, different params)."""
    base = tmp_path_factory.mktemp("models")
    return {
        "prod": small_project / "build/model",
        "candidate": train_variant(small_project, base / "candidate", 25, 0.2),
        "previous": train_variant(small_project, base / "previous", 15, 0.1),
    }


@pytest.fixture(scope="module")
def raw_dir(small_project: Path) -> Path:
    return small_project / "data"


@pytest.fixture(scope="module")
def at(raw_dir: Path) -> str:
    """A request time an hour before the snapshot's last event: features exact and fresh."""
    return (last_event_time(raw_dir) - pd.Timedelta(hours=1)).isoformat()


def requests_for(n: int, at: str, offset: int = 0) -> list[PredictRequest]:
    surfaces, devices = ("feed", "search", "recs"), ("mobile", "desktop", "tablet")
    return [
        PredictRequest(
            user=f"u{(i + offset) % 1500:05d}",
            item=f"i{(i * 7) % 400:05d}",
            surface=surfaces[i % 3],
            device=devices[i % 3],
            timestamp=at,
        )
        for i in range(n)
    ]


def make(
    models: dict[str, Path],
    raw_dir: Path,
    tmp_path: Path,
    tiers: tuple[str, ...] = ("prod",),
    log: bool = True,
    profiles: bool = False,
    loaded_at_reload: int | None = None,
    reloader: Callable[[], Runtime] | None = None,
    **policy: Any,
) -> Predictor:
    policy.setdefault("latency_budget_ms", 5000)  # a busy test machine must not trip it
    release, model_path = release_for(
        ServingSettings(**policy),
        raw_dir,
        models["prod"],
        models["candidate"] if "candidate" in tiers else None,
        models["previous"] if "previous" in tiers else None,
    )
    runtime = Runtime.load(release, model_path)
    request_log = (
        RequestLog(
            tmp_path / "requests", tmp_path / "live" if profiles else None, flush_seconds=0.2
        )
        if log
        else None
    )
    return Predictor(
        runtime,
        request_log,
        tmp_path / "state",
        reloader=reloader,
        loaded_at_reload=loaded_at_reload,
    )


@functools.lru_cache(maxsize=2)
def event_index(raw_dir: Path) -> EventIndex:
    return EventIndex(pd.read_parquet(raw_dir / "events.parquet"), CTR_V1)


def direct(model_dir: Path, raw_dir: Path, reqs: list[PredictRequest]) -> np.ndarray:
    """What the model itself says for these requests (features from the same EventIndex)."""
    import joblib

    index = event_index(raw_dir)
    X = index.lookup(
        [r.user for r in reqs],
        [r.item for r in reqs],
        [r.surface for r in reqs],
        [r.device for r in reqs],
        to_ms([r.timestamp for r in reqs]),
    )
    return joblib.load(model_dir / "model.joblib").predict_proba(X.to_numpy(np.float64))[:, 1]


# --- release file -------------------------------------------------------------------
def test_serving_params_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"serving\.candidate_share"):
        settings_from({"serving": {"candidate_share": 2}})
    with pytest.raises(ConfigError, match=r"serving\.routng"):
        settings_from({"serving": {"routng": "canary"}})
    with pytest.raises(ConfigError, match="serving: is missing"):
        settings_from({}, root=REPO)


def test_release_round_trip_stable_id_and_candidate_rule(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path
) -> None:
    policy = ServingSettings(routing="canary", candidate_share=0.25)
    first, _ = release_for(policy, raw_dir, models["prod"], models["candidate"], models["previous"])
    again, _ = release_for(policy, raw_dir, models["prod"], models["candidate"], models["previous"])
    assert first.release_id == again.release_id
    path = tmp_path / "release.json"
    path.write_text(json.dumps(first.to_json_dict()))
    loaded = load_release(path)
    assert loaded.model_dump() == first.model_dump()
    data = json.loads(path.read_text())
    assert data["model_tag"] == first.prod.tag and data["features"] == CTR_V1.names
    assert {r: t.stage for r, t in loaded.tiers().items()} == {
        "prod": "prod",
        "candidate": "candidate",
        "previous": "previous",
    }
    with pytest.raises(ConfigError, match="no candidate model"):
        build_release(
            "ctr_service", policy, feature_ref_for_dir(raw_dir), model_ref_for_dir(models["prod"])
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "policy": {**data["policy"], "routing": "blue-green"}}))
    with pytest.raises(ConfigError, match=r"(?s)not a valid release.*routing"):
        load_release(bad)


def test_previous_prod_comes_from_the_release_being_replaced() -> None:
    assert previous_prod_tag(None, "ctr_model:b") is None
    assert previous_prod_tag({"model_tag": "ctr_model:a"}, "ctr_model:b") == "ctr_model:a"
    old = {"prod": {"tag": "ctr_model:b"}, "previous": {"tag": "ctr_model:a"}}
    assert previous_prod_tag(old, "ctr_model:b") == "ctr_model:a"  # same prod: keep its previous
    assert previous_prod_tag(old, "ctr_model:c") == "ctr_model:b"


# --- routing --------------------------------------------------------------------------
def test_canary_share_is_sticky_monotone_and_near_target() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    rids = [f"r{i}" for i in range(20_000)]
    ten = Router("canary", 0.10, 0.0, "salt").plan(users, rids, True).candidate
    assert abs(ten.mean() - 0.10) < 0.01
    assert (Router("canary", 0.10, 0.0, "salt").plan(users, rids, True).candidate == ten).all()
    twenty = Router("canary", 0.20, 0.0, "salt").plan(users, rids, True).candidate
    assert abs(twenty.mean() - 0.20) < 0.012 and twenty[ten].all()  # raising keeps the first 10%
    other = Router("canary", 0.10, 0.0, "other").plan(users, rids, True).candidate
    assert (other != ten).sum() > 1000  # a new salt reshuffles
    shadow = Router("shadow", 0.5, 0.3, "salt").plan(users, rids, True)
    assert not shadow.candidate.any() and abs(shadow.background.mean() - 0.3) < 0.015
    assert not Router("canary", 0.5, 1.0, "s").plan(users, rids, False).candidate.any()
    h = unit_hash("k", users)
    assert 0 <= h.min() and h.max() < 1 and abs(h.mean() - 0.5) < 0.01


# --- the fallback chain ---------------------------------------------------------------
def test_prod_answers_fresh_requests_with_the_models_own_output(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(models, raw_dir, tmp_path)
    reqs = requests_for(50, at)
    out = predictor.predict(reqs)
    assert {r.route for r in out} == {"prod"} and not any(r.degraded for r in out)
    encoded = json.loads(
        predictor.predict_json(RequestRows.of(reqs))
    )  # the batch endpoint's encoding
    assert [
        PredictResponse.model_validate(e).model_dump(exclude={"request_id"}) for e in encoded
    ] == [r.model_dump(exclude={"request_id"}) for r in out]
    assert all(r.feature_age_seconds == 0 and r.features_fresh for r in out)
    np.testing.assert_allclose(
        [r.probability for r in out], direct(models["prod"], raw_dir, reqs), atol=1e-6
    )
    predictor.close()


def test_batch_answers_joined_per_row_are_the_bytes_of_a_dict_per_row() -> None:
    """``_answers_json`` (labels encoded once when every row shares them) writes exactly what
    encoding one dict per row writes, shared labels or not."""
    n, rng = 300, np.random.default_rng(5)
    ids = [f"{i:016x}-{i}" for i in range(n)]
    age, prob = rng.random(n) * 100, rng.random(n)
    age[3], prob[7] = np.nan, np.nan

    def scored(**changes: Any) -> Scored:
        base: dict[str, Any] = {
            "call_id": "c",
            "request_ids": ids,
            "prob": prob,
            "routes": ["prod"] * n,
            "models": ["m1"] * n,
            "runtimes": ["compiled"] * n,
            "reasons": [None] * n,
            "age": age,
            "fresh": np.ones(n, dtype=bool),
        }
        return Scored(**{**base, **changes})

    stale = 'features are 400 s old, over the 300 s "SLA", say'
    for case in (
        scored(),
        scored(reasons=[stale] * n, fresh=np.zeros(n, dtype=bool), routes=["baseline"] * n),
        scored(routes=["prod", "canary"] * (n // 2)),
        scored(reasons=[None] * (n - 1) + [stale]),
        scored(fresh=np.arange(n) % 2 == 0),
        scored(request_ids=[f"{i},{i}" for i in range(n)]),  # a comma: not joined by columns
        scored(prob=np.full(n, np.nan), age=np.full(n, np.nan)),
        scored(
            request_ids=ids[:1],
            prob=prob[:1],
            age=age[:1],
            fresh=np.ones(1, dtype=bool),
            routes=["prod"],
            models=["m1"],
            runtimes=["rule"],
            reasons=[None],
        ),
    ):
        assert Predictor._answers_json(case) == orjson.dumps(Predictor._answers(case))
    assert join_rows([b"{", b"}"], [b'["a,b","c"]'], 2) is None  # values must be comma-free
    assert join_rows([b"{", b"}"], [b"[1,2,3]"], 2) is None
    assert join_rows([b"<", b"|", b">"], [b"[1,2]", b'["x","y"]'], 2) == b'[<1|"x">,<2|"y">]'


def test_stale_or_unavailable_features_get_the_baseline(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path
) -> None:
    predictor = make(models, raw_dir, tmp_path, freshness_sla_seconds=300)
    now = PredictRequest(user="u00001", item="i00001", surface="feed", device="mobile")
    stale = predictor.predict([now])[0]  # no timestamp: now, weeks after the snapshot
    assert stale.route == "baseline" and stale.degraded and not stale.features_fresh
    assert "300 s freshness SLA" in stale.degraded_reason
    later = (last_event_time(raw_dir) + pd.Timedelta(seconds=200)).isoformat()
    ok = predictor.predict([PredictRequest(**{**now.model_dump(), "timestamp": later})])[0]
    assert ok.route == "prod" and ok.feature_age_seconds == pytest.approx(200, abs=1)
    predictor.set_fault("features", Fault("error"))
    down = predictor.predict([PredictRequest(**{**now.model_dump(), "timestamp": later})])[0]
    assert down.route == "baseline" and down.feature_age_seconds is None
    assert down.degraded_reason.startswith("feature store unavailable")
    counts = predictor.counters["degraded_reasons"]
    assert counts == {"features_stale": 1, "features_unavailable": 1}
    predictor.close()


def test_model_errors_walk_the_chain_and_trip_the_breaker(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(models, raw_dir, tmp_path, tiers=("prod", "previous"), breaker_failures=2)
    reqs = requests_for(20, at)
    predictor.set_fault("prod", Fault("error"))
    out = predictor.predict(reqs)
    assert {r.route for r in out} == {"fallback"}
    assert out[0].model_version == predictor.runtime.tiers["previous"].ref.label
    assert "prod model error: InjectedFault" in out[0].degraded_reason
    np.testing.assert_allclose(
        [r.probability for r in out], direct(models["previous"], raw_dir, reqs), atol=1e-6
    )
    predictor.set_fault("previous", Fault("error"))
    out = predictor.predict(reqs)  # second prod failure in a row: its breaker opens
    assert {r.route for r in out} == {"baseline"}
    assert "prod model error" in out[0].degraded_reason
    assert "previous model error" in out[0].degraded_reason
    out = predictor.predict(reqs)
    assert {r.route for r in out} == {"baseline"}
    assert "prod skipped" in out[0].degraded_reason  # breaker open: prod not even tried
    predictor.set_fault("prod", None)  # clearing the fault closes the breaker
    assert {r.route for r in predictor.predict(reqs)} == {"prod"}
    c = predictor.counters
    assert c["degraded_rows"] == 60 and c["routes"] == {"fallback": 20, "baseline": 40, "prod": 20}
    assert c["degraded_reasons"] == {"prod_error": 40, "prod_breaker_open": 20}
    predictor.close()


def test_latency_budget_breach_falls_back_then_skips(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "previous"),
        latency_budget_ms=50,
        breaker_cooldown_seconds=30,
        breaker_failures=1,
    )
    predictor.set_fault("prod", Fault("slow", 400))
    first = predictor.predict(requests_for(1, at))[0]
    assert (
        first.route == "fallback" and "exceeded the 50 ms latency budget" in first.degraded_reason
    )
    second = predictor.predict(requests_for(1, at))[0]
    assert second.route == "fallback" and "prod skipped" in second.degraded_reason
    assert predictor.counters["degraded_reasons"] == {
        "prod_latency_budget": 1,
        "prod_breaker_open": 1,
    }
    predictor.close()


def test_corrupt_model_file_is_refused_and_reported(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    release, model_path = release_for(
        ServingSettings(latency_budget_ms=5000), raw_dir, models["prod"], None, models["previous"]
    )
    broken = tmp_path / "broken"
    shutil.copytree(models["prod"], broken)
    with (broken / "model.joblib").open("ab") as handle:
        handle.write(b"tampered")

    def resolve(tag: str) -> Path:
        return broken if tag == release.prod.tag else model_path(tag)

    runtime = Runtime.load(release, resolve)
    assert runtime.tiers["prod"].model is None
    assert any("prod" in p and "md5" in p for p in runtime.problems)
    predictor = Predictor(runtime)
    out = predictor.predict(requests_for(5, at))
    assert {r.route for r in out} == {"fallback"}
    assert "prod refused at load: ArtifactMismatch" in out[0].degraded_reason
    assert predictor.metadata()["tiers"]["prod"]["refused"].startswith("ArtifactMismatch")
    predictor.close()
    # Baseline file damaged as well and the features down: nothing can answer -> NoTierAvailable
    with (broken / "baseline.json").open("a") as handle:
        handle.write(" ")
    runtime = Runtime.load(release.model_copy(update={"previous": None}), resolve)
    assert runtime.baseline is None
    predictor = Predictor(runtime)
    with pytest.raises(NoTierAvailable, match="rule baseline refused"):
        predictor.predict(requests_for(1, at))
    predictor.close()


# --- canary, shadow, A/B, kill switch ----------------------------------------------------
# A canary at 30% of users, no shadow scoring (make's keyword arguments).
CANARY_30: dict[str, Any] = {
    "tiers": ("prod", "candidate"),
    "routing": "canary",
    "candidate_share": 0.3,
    "shadow_sample_rate": 0.0,
}


def test_canary_answers_its_share_with_the_candidate(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(models, raw_dir, tmp_path, **CANARY_30)
    reqs = requests_for(1500, at)
    out = predictor.predict(reqs)
    canary = np.array([r.route == "canary" for r in out])
    assert 0.25 < canary.mean() < 0.35
    assert {r.route for r in out} == {"prod", "canary"} and not any(r.degraded for r in out)
    expected = np.where(
        canary, direct(models["candidate"], raw_dir, reqs), direct(models["prod"], raw_dir, reqs)
    )
    np.testing.assert_allclose([r.probability for r in out], expected, atol=1e-6)
    # Candidate failing: its users get prod, flagged degraded
    predictor.set_fault("candidate", Fault("error"))
    again = predictor.predict(reqs)
    assert {r.route for r in again} == {"prod"}
    assert all(r.degraded == c for r, c in zip(again, canary, strict=True))
    predictor.close()


def test_columns_answer_as_the_rows_do_canary_shedding_and_log_included(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(
        models,
        raw_dir,
        tmp_path,
        **CANARY_30,
        shed_inflight=2,
        surface_priority={"search": 0, "feed": 1, "recs": 2},
    )
    reqs = requests_for(600, at)
    t_ms = to_ms([r.timestamp for r in reqs]).tolist()
    columns = columns_request_model(1000).model_validate_json(
        json.dumps(
            {
                "user": [r.user for r in reqs],
                "item": [r.item for r in reqs],
                "surface": [r.surface for r in reqs],
                "device": [r.device for r in reqs],
                "timestamp_ms": t_ms,
            }
        )
    )
    for inflight in (None, 2):  # 2 in flight: recs rows are shed, the rest scored
        rows = json.loads(predictor.predict_json(RequestRows.of(reqs), inflight=inflight))
        answer = json.loads(predictor.predict_columns_json(columns, inflight=inflight))
        ColumnsResponse.model_validate(answer)
        assert {len(v) for v in answer.values()} == {600}
        assert len(set(answer["request_id"])) == 600
        as_rows = [
            dict(zip(answer, values, strict=True)) for values in zip(*answer.values(), strict=True)
        ]
        drop = {"request_id"}
        assert [{k: v for k, v in a.items() if k not in drop} for a in as_rows] == [
            {k: v for k, v in a.items() if k not in drop} for a in rows
        ]
        routes = set(answer["route"])
        assert routes == (
            {"prod", "canary"} if inflight is None else {"prod", "canary", "baseline"}
        )
    shed = [i for i, r in enumerate(answer["route"]) if r == "baseline"]
    assert shed and {reqs[i].surface for i in shed} == {"recs"}
    assert all(answer["degraded_reason"][i].startswith("shed under overload") for i in shed)
    # without request times every row is scored now: weeks after the snapshot, stale
    no_time = columns.model_copy(update={"timestamp_ms": None})
    late = json.loads(predictor.predict_columns_json(no_time))
    assert not any(late["features_fresh"])
    predictor.close()
    log = read_shards(tmp_path / "requests")
    ours = log[log["endpoint"] == "predict_columns"]
    assert len(ours) == 3 * 600 and ours["request_id"].is_unique
    assert set(answer["request_id"]) <= set(ours["request_id"])


BAD_COLUMNS: list[tuple[dict[str, Any], str]] = [
    ({"item": ["i1", "i2"]}, "one value per row"),
    ({"user": [], "item": [], "surface": [], "device": []}, "at least 1"),
    ({"user": ["bad user"]}, "user"),
    ({"surface": ["email"]}, "surface"),
    ({"timestamp_ms": [1.5]}, "timestamp_ms"),
    ({"timestamp_ms": ["1700000000000"]}, "timestamp_ms"),
    ({"timestamp_ms": [2**62]}, "timestamp_ms"),
    ({"extra": [1]}, "extra"),
    ({"user": [f"u{k}" for k in range(11)]}, "at most 10"),
]


def test_columns_are_refused_with_the_field_and_the_reason() -> None:
    model = columns_request_model(10)
    base = {"user": ["u1"], "item": ["i1"], "surface": ["feed"], "device": ["mobile"]}
    assert model.model_validate({**base, "timestamp_ms": [0]}).timestamp_ms == [0]
    for change, words in BAD_COLUMNS:
        with pytest.raises(ValueError, match=words):
            model.model_validate_json(json.dumps({**base, **change}))


def test_shadow_scores_candidate_in_background_without_changing_answers(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    reqs = requests_for(300, at)
    plain = make(models, raw_dir, tmp_path / "plain", tiers=("prod", "candidate"), log=False)
    expected = [(r.route, r.probability) for r in plain.predict(reqs)]
    plain.close()
    shadow = make(
        models,
        raw_dir,
        tmp_path / "shadow",
        tiers=("prod", "candidate"),
        routing="shadow",
        shadow_sample_rate=1.0,
    )
    assert [(r.route, r.probability) for r in shadow.predict(reqs)] == expected
    shadow.close()
    log = read_shards(tmp_path / "shadow/requests")
    assert len(log) == 300
    candidate = log["scores"].map(lambda s: s.get("candidate"))
    np.testing.assert_allclose(
        candidate.to_numpy(float), direct(models["candidate"], raw_dir, reqs), atol=1e-6
    )
    np.testing.assert_allclose(
        log["scores"].map(lambda s: s["prod"]), log["probability"], atol=1e-6
    )
    assert shadow.counters["background_scored_rows"] == 300


def test_ab_logs_both_arms(models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str) -> None:
    predictor = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "candidate"),
        routing="ab",
        candidate_share=0.5,
        shadow_sample_rate=1.0,
    )
    out = predictor.predict(requests_for(400, at))
    assert {r.route for r in out} == {"prod", "ab-variant"}
    predictor.close()
    log = read_shards(tmp_path / "requests")
    assert len(log) == 400
    assert log["scores"].map(lambda s: set(s) == {"prod", "candidate"}).all()
    variant = log["route"] == "ab-variant"
    answered = log["scores"].map(lambda s: s["candidate"])
    np.testing.assert_allclose(answered[variant], log["probability"][variant], atol=1e-6)


def test_kill_switch_is_shared_through_the_state_dir(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "candidate"),
        routing="canary",
        candidate_share=0.5,
        log=False,
    )
    reqs = requests_for(200, at)
    assert any(r.route == "canary" for r in predictor.predict(reqs))
    predictor.set_candidate_share(0.0)
    assert {r.route for r in predictor.predict(reqs)} == {"prod"}
    with pytest.raises(ValueError, match="between 0 and 1"):
        predictor.set_candidate_share(1.5)
    # Another worker (or a restart) on the same release picks the override up
    other = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "candidate"),
        routing="canary",
        candidate_share=0.5,
        log=False,
    )
    assert other.runtime.router.candidate_share == 0.0
    # ... but a different release does not inherit it
    fresh = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "candidate"),
        routing="canary",
        candidate_share=0.4,
        log=False,
    )
    assert fresh.runtime.router.candidate_share == 0.4
    for p in (predictor, other, fresh):
        p.close()


def test_admin_changes_reach_every_worker_before_the_call_answers(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    """Reload, kill switch and faults go through state_dir: once ``sync`` returns, every
    worker (here a second Predictor on the same state dir) serves the change."""
    policy = ServingSettings(routing="canary", candidate_share=1.0, latency_budget_ms=5000)
    new_release, model_path = release_for(policy, raw_dir, models["prod"], models["candidate"])

    def reloader() -> Runtime:
        return Runtime.load(new_release, model_path)

    first = make(models, raw_dir, tmp_path, log=False)
    other = make(models, raw_dir, tmp_path, log=False)  # another worker: same state dir
    other.reloader = reloader
    assert "candidate" not in other.runtime.tiers
    generation = first.reload(reloader())
    done = {"complete": True, "generation": generation, "expected": 1}
    assert first.sync(generation, 30) == {**done, "applied": 2, "pending": [], "failed": {}}
    assert other.runtime.release.release_id == new_release.release_id  # no polling needed
    assert {r.route for r in other.predict(requests_for(50, at))} == {"canary"}

    generation = first.set_fault("candidate", Fault("error"))
    assert first.sync(generation, 30)["pending"] == []
    out = other.predict(requests_for(20, at))
    # the candidate fails on the other worker too: its users get prod, flagged degraded
    assert {r.route for r in out} == {"prod"} and all(r.degraded for r in out)
    first.sync(first.set_fault("candidate", None), 30)
    assert other.runtime.tiers["candidate"].fault is None
    assert {r.route for r in other.predict(requests_for(20, at, offset=50))} == {"canary"}

    first.sync(first.set_candidate_share(0.0)["generation"], 30)
    assert {r.route for r in other.predict(requests_for(50, at))} == {"prod"}
    # a reload of the same release ends injected faults but keeps the kill switch
    first.sync(first.set_fault("candidate", Fault("error")), 30)
    first.sync(first.reload(reloader()), 30)
    assert other.runtime.tiers["candidate"].fault is None
    assert other.runtime.router.candidate_share == 0.0

    late = make(models, raw_dir, tmp_path, log=False)  # started after: loads what it is given
    late.reloader = reloader
    late.predict(requests_for(1, at))
    assert late.runtime.release.release_id != new_release.release_id
    # a worker that read the pod before a reload was recorded, then loaded the old release
    # (a restart racing a reload), follows that reload as soon as it joins
    racing = make(models, raw_dir, tmp_path, log=False, loaded_at_reload=0, reloader=reloader)
    assert racing.runtime.release.release_id == new_release.release_id
    other.close()  # a worker that stopped is not waited for
    report = first.sync(first.set_candidate_share(0.5)["generation"], 5)
    assert report["complete"] and report["applied"] == 3 and report["pending"] == []
    # a pod configured for four workers, one still starting: waits, then says so
    started = time.monotonic()
    report = first.sync(first.set_candidate_share(0.4)["generation"], 1.0, workers=4)
    assert not report["complete"] and report["applied"] == 3 and report["expected"] == 4
    assert time.monotonic() - started >= 1.0
    for p in (first, late, racing):
        p.close()


def test_a_reload_naming_the_same_snapshot_reuses_its_index(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    """Building the snapshot's index is the cost of a reload (about a second of CPU on the
    full preset, in every worker at once, while serving); the same file (by md5 and
    sha256) reuses the index already built, a changed one is checked and refused."""
    release, model_path = release_for(ServingSettings(), raw_dir, models["prod"])
    first = Runtime.load(release, model_path)
    again = Runtime.load(release, model_path)
    assert isinstance(first.features, SnapshotFeatureSource)
    assert isinstance(again.features, SnapshotFeatureSource)
    assert again.features.index is first.features.index
    t = np.full(3, pd.Timestamp(at).value // 1_000_000, dtype=np.int64)
    keys = (["u1", "u2", "u3"], ["i1", "i2", "i3"], ["feed"] * 3, ["mobile"] * 3, t)
    np.testing.assert_array_equal(again.lookup(*keys).X, first.lookup(*keys).X)
    # a snapshot file whose content changed is refused by its hashes, never reused
    copy = tmp_path / "snapshot"
    shutil.copytree(raw_dir, copy)
    with (copy / "events.parquet").open("ab") as handle:
        handle.write(b"x")

    def changed(tag: str) -> Path:
        return copy if tag == release.feature_source.tag else model_path(tag)

    refused = Runtime.load(release, changed)
    assert refused.features is None and any("feature" in p for p in refused.problems)


def test_every_workers_request_log_health_is_visible_from_any_worker(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    """A worker whose log directory became unwritable shows in the /metadata of another
    worker (the one a load balancer happened to send the operator to)."""
    writer = make(models, raw_dir, tmp_path)
    other = make(models, raw_dir, tmp_path, log=False)
    try:
        shutil.rmtree(tmp_path / "requests")
        (tmp_path / "requests").write_text("not a directory")
        writer.predict(requests_for(30, at))
        deadline = time.monotonic() + 10
        while True:
            pod = other.metadata()["request_log_pod"]
            if pod.get("write_errors", 0) > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pod["workers_reporting"] == 1 and pod["backlog_rows"] == 30, pod
        (error,) = pod["failing_workers"].values()
        assert "NotADirectoryError" in error or "FileExistsError" in error, error
        assert str(tmp_path) not in error  # no internal paths in what callers see
        assert other.metadata()["request_log"] is None  # its own view: no log at all
        (tmp_path / "requests").unlink()
        deadline = time.monotonic() + 10
        while other.metadata()["request_log_pod"]["written_rows"] < 30:
            assert time.monotonic() < deadline, other.metadata()["request_log_pod"]
            time.sleep(0.1)
        assert other.metadata()["request_log_pod"]["failing_workers"] == {}
    finally:
        writer.close()
        other.close()


# --- request log ------------------------------------------------------------------------
def test_request_log_keeps_every_answered_row_and_counts_drops(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str
) -> None:
    predictor = make(
        models,
        raw_dir,
        tmp_path,
        tiers=("prod", "candidate"),
        routing="canary",
        candidate_share=0.2,
        shadow_sample_rate=0.5,
        profiles=True,
    )
    answered = 0
    for k in range(30):
        answered += len(predictor.predict(requests_for(1 + k % 7, at, offset=k)))
    predictor.close()
    log = read_shards(tmp_path / "requests")
    assert len(log) == answered and log["request_id"].is_unique
    assert predictor.request_log is not None
    assert predictor.request_log.counters["written_rows"] == answered
    assert set(log["features"].iloc[0]) == set(CTR_V1.names)
    # the open window is saved on close and profiled by a helper that outlives the close
    assert settle_profiles(tmp_path / "live", 120)
    assert not pending_windows(tmp_path / "live")
    # A crash mid-write leaves a partial last line: it is skipped, the rest is read
    shard = sorted((tmp_path / "requests").glob("requests-*.jsonl"))[-1]
    with shard.open("ab") as handle:
        handle.write(b'{"request_id": "cut-of')
    assert len(read_shards(tmp_path / "requests")) == answered
    # A full queue drops (and counts) instead of blocking the request path
    tiny = RequestLog(tmp_path / "tiny", None, flush_seconds=5, queue_size=1)
    batch = LogBatch(
        "predict",
        "r",
        0.0,
        1.0,
        ["a"],
        ["u"],
        ["i"],
        ["feed"],
        ["mobile"],
        np.zeros(1, np.int64),
        np.zeros(1),
        ["prod"],
        ["m"],
        [None],
        np.zeros(1),
        [],
        None,
    )
    accepted = sum(tiny.submit(batch) for _ in range(2000))
    tiny.close()
    assert tiny.counters["dropped_rows"] == 2000 - accepted > 0
    assert len(read_shards(tmp_path / "tiny")) == accepted == tiny.counters["written_rows"]


def _window_batch(rows: int, features: np.ndarray | None = None) -> LogBatch:
    """A logged call of ``rows`` rows as the profile window receives it."""
    return LogBatch(
        "predict",
        "r",
        0.0,
        1.0,
        [f"q{k}" for k in range(rows)],
        ["u"] * rows,
        ["i"] * rows,
        (["feed", "search"] * rows)[:rows],
        ["mobile"] * rows,
        np.zeros(rows, np.int64),
        np.linspace(0.01, 0.5, rows),
        ["prod"] * rows,
        ["m"] * rows,
        [None] * rows,
        np.zeros(rows),
        [] if features is None else [f"f{j + 1}" for j in range(features.shape[1])],
        features,
    )


def test_the_profiling_helper_runs_at_the_lowest_priority_from_its_start(tmp_path: Path) -> None:
    """The helper is started through a launcher that the worker does not wait for and that
    lowers itself to nice 19 before it starts the helper, which inherits it before its
    first import. The helper runs in a session of its own, and where the kernel groups
    sessions for the scheduler (autogroup) that group is at nice 19 too: a new group's
    processes would otherwise get as much CPU as the service's, whatever their nice. The
    launcher is reaped without waiting; one that fails is reported."""
    import os
    import sys

    from pipelines.serving import helper_process

    out = tmp_path / "probe.txt"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, pathlib\n"
        "group = pathlib.Path('/proc/self/autogroup')\n"
        "text = group.read_text().split()[-1] if group.exists() else '-'\n"
        f"open({str(out)!r}, 'w').write("
        "f'{os.nice(0)} {os.getsid(0) == os.getpid()} {text} {os.getsid(0)}')\n"
    )
    started = time.monotonic()
    pid = helper_process.spawn_detached([sys.executable, str(probe)], tmp_path / "err")
    assert time.monotonic() - started < 1.0  # not waited for
    deadline = time.monotonic() + 30
    while not out.is_file() or not out.read_text():
        assert time.monotonic() < deadline, (tmp_path / "err").read_text()
        time.sleep(0.05)
    nice, leader, group, session = out.read_text().split()
    assert nice == "19" and leader == "False"  # the launcher leads the session, not the helper
    assert int(session) != os.getsid(0)  # detached from this process's session
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if autogroup.exists() and autogroup.read_text().strip() == "1":
        assert group == "19"
    while (left := helper_process.reap([pid]))[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert left == ([], [])
    failing = helper_process.spawn_detached(["/nonexistent/helper"], tmp_path / "err2")
    while not (reaped := helper_process.reap([failing]))[1]:
        assert time.monotonic() < deadline and reaped[0] == [failing]
        time.sleep(0.05)
    assert reaped[1][0][0] == failing and reaped[1][0][1] != 0


def test_a_window_left_by_a_stopped_server_is_profiled_when_a_log_starts(tmp_path: Path) -> None:
    """Stopping the server does not wait for the last window's profile: a helper that did
    not finish (killed with the container) leaves the saved window, which the next start
    profiles; a window that cannot be profiled is kept aside, reported, not retried."""
    live = tmp_path / "live"
    live.mkdir()
    rows = 50
    batch = _window_batch(rows)
    left = live / ".window-20261001T000000-gone-7.parquet"
    window_frame([batch]).to_parquet(left, index=False)
    broken = live / ".window-20261001T000500-gone-7.parquet"
    broken.write_bytes(b"not a parquet file")
    log = RequestLog(tmp_path / "requests", live, flush_seconds=0.2)
    profiles = settle_profiles(live, 120)
    deadline = time.monotonic() + 60
    while log.counters["profiles"] + log.counters["profile_errors"] < 2:
        assert time.monotonic() < deadline, log.counters  # the writer reaps helpers each flush
        time.sleep(0.2)
    log.close()
    assert [p.name for p in profiles] == ["profile-20261001T000000-gone-7.bin"]
    assert pending_windows(live) == [] and (live / (broken.name + ".failed")).is_file()
    assert log.counters["profiles"] == 1 and log.counters["profile_errors"] == 1, log.counters
    view = wl.read_profile(profiles[0])
    assert wl.column_sketches(view)["prediction"].count == rows


def test_the_window_is_written_a_row_group_at_a_time_and_reads_back_whole(
    tmp_path: Path,
) -> None:
    """``WindowRows.spill`` writes the waiting rows as a row group while the window is open;
    the closed file holds every call's rows in order, as the profiling helper reads them.
    Rows served without feature vectors, or with another release's names, have NaN there."""
    import pyarrow.parquet as pq

    from pipelines.serving.window_rows import WindowRows

    def matrix(rows: int, start: int) -> np.ndarray:
        return np.arange(start, start + rows * 2, dtype=np.float64).reshape(rows, 2)

    renamed = _window_batch(2, matrix(2, 500))
    renamed.feature_names = ["g1", "g2"]
    groups = [
        [_window_batch(5, matrix(5, 0)), _window_batch(1, matrix(1, 100))],
        [_window_batch(3, None), renamed],
        [_window_batch(4, matrix(4, 200))],
    ]
    last = _window_batch(2, matrix(2, 300))
    path = tmp_path / "window.parquet"
    window = WindowRows()
    for group in groups:
        for b in group:
            window.add(b)
        window.spill(path)  # one row group per spill
    window.add(last)
    window.finish(path)  # the rest, and the footer

    expected = []
    for b in [*(b for group in groups for b in group), last]:
        n = len(b.request_ids)
        same = b.features is not None and b.feature_names == ["f1", "f2"]
        X = b.features if same else np.full((n, 2), np.nan)
        expected.append(
            pd.DataFrame(
                {"surface": b.surfaces, "device": b.devices, "f1": X[:, 0], "f2": X[:, 1],
                 "prediction": b.probability, "route": b.routes}
            )
        )  # fmt: skip
    want = pd.concat(expected, ignore_index=True)
    got = pd.read_parquet(path)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert list(got.dtypes.astype(str)) == ["str", "str", "float64", "float64", "float64", "str"]
    assert pq.ParquetFile(path).metadata.num_row_groups == 4 and len(window) == len(want) == 17

    empty = WindowRows()  # nothing served: the file still has the columns
    empty.finish(tmp_path / "empty.parquet")
    assert list(pd.read_parquet(tmp_path / "empty.parquet").columns) == [
        "surface", "device", "prediction", "route"
    ]  # fmt: skip


def test_one_row_calls_past_the_buffers_first_capacity_read_back_in_order(
    tmp_path: Path,
) -> None:
    """The /predict shape: thousands of one-row calls, the first few and some later ones
    without feature vectors, spilled in row groups of uneven size. Every row reads back
    in order with its own values (NaN where its call had none), and a table taken before a
    spill keeps its values after the window's buffers are refilled by later calls."""
    from pipelines.serving.window_rows import WindowRows

    path = tmp_path / "window.parquet"
    window = WindowRows()
    want_f1, want_p = [], []
    taken = None
    for i in range(5000):
        missing = i < 5 or i % 701 == 0
        b = _window_batch(1, None if missing else np.array([[float(i), -float(i)]]))
        b.probability = np.array([i / 10_000])
        window.add(b)
        want_f1.append(np.nan if missing else float(i))
        want_p.append(i / 10_000)
        if i in (1500, 4100):
            if taken is None:
                taken = window.table()
            window.spill(path)
    window.finish(path)
    got = pd.read_parquet(path)
    np.testing.assert_array_equal(got["f1"].to_numpy(), want_f1)
    np.testing.assert_array_equal(got["f2"].to_numpy(), -np.array(want_f1))
    np.testing.assert_array_equal(got["prediction"].to_numpy(), want_p)
    assert got["surface"].tolist() == ["feed"] * 5000
    assert taken is not None and taken.num_rows == 1501
    np.testing.assert_array_equal(taken.column("f1").to_numpy(), want_f1[:1501])
    np.testing.assert_array_equal(taken.column("prediction").to_numpy(), want_p[:1501])


def test_a_sampled_window_profiles_the_rows_of_the_smallest_keys_and_writes_few_rows(
    tmp_path: Path,
) -> None:
    """With ``sample_rows`` the window's profile describes exactly the ``sample_rows`` rows
    whose keys (one uniform draw per row, in served order) are smallest: a uniform sample,
    in served order, with their own features; rows that can no longer be among them are
    not written. The file says how many rows the window answered."""
    import pyarrow.parquet as pq

    from pipelines.serving.window_rows import WindowRows, read_window

    k, calls, rows = 200, 60, 100
    path = tmp_path / "window.parquet"
    window = WindowRows(k, seed=7)
    for i in range(calls):
        first = i * rows
        X = np.arange(2 * first, 2 * (first + rows), dtype=np.float64).reshape(rows, 2)
        b = _window_batch(rows, None if i == 3 else X)  # one call without feature vectors
        b.probability = np.arange(first, first + rows, dtype=np.float64)  # the row's number
        window.add(b)
        if i % 5 == 4:
            window.spill(path)
    window.finish(path)

    draws = np.random.default_rng(7)
    keys = np.concatenate([draws.random(rows) for _ in range(calls)])
    chosen = np.sort(np.argsort(keys)[:k])
    frame, counts = read_window(path)
    assert counts == {"window_rows": calls * rows, "profiled_rows": k}
    assert list(frame.columns) == ["surface", "device", "f1", "f2", "prediction", "route"]
    np.testing.assert_array_equal(frame["prediction"].to_numpy(), chosen)
    no_features = (chosen >= 300) & (chosen < 400)
    assert no_features.any() and frame.loc[no_features, "f1"].isna().all()
    np.testing.assert_array_equal(frame.loc[~no_features, "f1"], 2 * chosen[~no_features])
    written = pq.ParquetFile(path).metadata.num_rows
    assert k < written <= k * (2 + np.log2(calls * rows / k)), written

    small = WindowRows(k, seed=1)  # fewer rows than the sample: every row
    small.add(_window_batch(150, np.ones((150, 2))))
    small.finish(tmp_path / "small.parquet")
    frame, counts = read_window(tmp_path / "small.parquet")
    assert counts == {"window_rows": 150, "profiled_rows": 150} and len(frame) == 150
    WindowRows(k).finish(tmp_path / "empty.parquet")  # nothing served
    frame, counts = read_window(tmp_path / "empty.parquet")
    assert counts == {"window_rows": 0, "profiled_rows": 0} and "sample_key" not in frame


def test_a_sampled_window_profile_counts_its_sample_and_says_how_many_rows_were_served(
    tmp_path: Path,
) -> None:
    """Through the request log and its helper: the profile of a window of 250 rows with
    ``profile_sample_rows`` 100 counts 100 rows and carries both numbers."""
    live = tmp_path / "live"
    log = RequestLog(tmp_path / "requests", live, flush_seconds=0.05, profile_sample_rows=100)
    for _ in range(5):
        b = _window_batch(50, np.ones((50, 2)))
        b.answered_at = time.time()
        assert log.submit(b)
    log.close()
    assert log._launchers == []  # a stopping worker waits until its helper is detached
    profiles = [p for p in settle_profiles(live, 120) if log.worker in p.name]
    assert len(profiles) == 1 and log.counters["profile_errors"] == 0, (profiles, log.counters)
    view = wl.read_profile(profiles[0])
    assert wl.column_sketches(view)["prediction"].count == 100
    assert view.metadata == {"window_rows": "250", "profiled_rows": "100"}


def test_a_large_window_is_on_disk_before_it_closes_and_handed_over_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer spills the open window once it holds ``SPILL_ROWS`` rows; the helper gets
    one complete file when the window closes; row groups a dead writer left are removed,
    those another live worker may still be writing are not."""
    import pipelines.serving.request_log as request_log

    monkeypatch.setattr(request_log, "SPILL_ROWS", 100)
    live = tmp_path / "live"
    live.mkdir()
    stale = live / ".window-20261001T000000-gone-7.parquet.part"
    stale.write_bytes(b"PAR1 row groups without a footer")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    other = live / ".window-20261001T000500-alive-8.parquet.part"
    other.write_bytes(b"PAR1")
    log = RequestLog(tmp_path / "requests", live, flush_seconds=0.05, profile_window_seconds=600)
    assert not stale.exists() and other.exists()
    for _ in range(5):
        b = _window_batch(50, np.ones((50, 2)))
        b.answered_at = time.time()
        assert log.submit(b)
    part = None
    deadline = time.monotonic() + 30
    while part is None:  # written while the window is still open
        assert time.monotonic() < deadline, sorted(p.name for p in live.iterdir())
        part = next(live.glob(f".window-*-{log.worker}.parquet.part"), None)
        time.sleep(0.02)
    log.close()  # closes the window: the rest, the footer, the helper
    assert not part.exists()
    profiles = [p for p in settle_profiles(live, 120) if log.worker in p.name]
    assert len(profiles) == 1 and log.counters["profile_errors"] == 0, (profiles, log.counters)
    assert wl.column_sketches(wl.read_profile(profiles[0]))["prediction"].count == 250


def test_a_large_call_splits_its_searches_with_at_most_one_other_call_in_its_worker(
    models: dict[str, Path], raw_dir: Path, tmp_path: Path, at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of ``search.SPLIT_QUERIES`` rows or more runs part of its searches on the
    process's helper thread when at most one other call is in its worker (in flight 1 or
    2): that core is then mostly idle. With more in flight, or unknown, all run on the
    calling thread (the event loop needs that core). The answers are the same."""
    import threading

    from pipelines.features import search

    predictor = make(models, raw_dir, tmp_path, log=False)
    threads: list[str] = []
    plain = search.locate

    def traced(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return plain(*args)

    monkeypatch.setattr(search, "locate", traced)
    reqs = requests_for(search.SPLIT_QUERIES, at)
    answers = []
    for inflight, splits in ((1, True), (2, True), (3, False), (None, False)):
        threads.clear()
        answers.append(json.loads(predictor.predict_json(RequestRows.of(reqs), inflight=inflight)))
        assert threads, "no search ran"
        helper = any(name.startswith(search.HELPER_THREAD) for name in threads)
        assert helper == splits, (inflight, sorted(set(threads)))
    probabilities = [[a["probability"] for a in answer] for answer in answers]
    assert all(p == probabilities[0] for p in probabilities)
    predictor.close()
