"""Online store: bad input, duplicates, click updates, lateness, freshness, Redis, CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.features.contracts import ContractViolation
from pipelines.features.definitions import CTR_V1, to_ms
from pipelines.features.offline import build_point_in_time
from pipelines.features.online_store import OnlineStore, StoreError, arrivals
from tests.support.loadtest import free_port
from tests.support.project import REPO, project_env
from tests.support.strategies import (
    BASE_MS,
    EDGE_SET,
    assert_frames_identical,
    event_logs,
    labels_for,
    make_events,
)
from tests.test_feature_parity import check_online_equals_offline


def _row(
    event_id: str,
    ts: int,
    user: str = "u0",
    item: str = "i0",
    clicked: int = 0,
    click_ts: int | None = None,
    surface: str = "feed",
) -> dict[str, object]:
    return {
        "event_id": event_id,
        "ts": ts,
        "user_id": user,
        "item_id": item,
        "surface": surface,
        "device": "mobile",
        "position": 1,
        "clicked": clicked,
        "click_ts": click_ts,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[OnlineStore]:
    s = OnlineStore.open(
        f"sqlite:///{tmp_path / 'online.db'}",
        EDGE_SET,
        allowed_lateness_seconds=1.0,
        freshness_sla_seconds=5.0,
    )
    yield s
    s.close()


def _vector(s: OnlineStore, t: int, user: str = "u0", item: str = "i0") -> pd.DataFrame:
    return s.lookup(user, item, "feed", "mobile", t).features


def test_bad_rows_are_rejected_counted_and_returned_with_reasons(store: OnlineStore) -> None:
    batch = make_events([_row("a", BASE_MS), _row("b", BASE_MS + 10), _row("c", BASE_MS + 20)])
    batch["surface"] = batch["surface"].astype(object)
    batch.loc[1, "surface"] = "email"
    batch.loc[2, "clicked"] = 1  # clicked without a click time
    report = store.ingest(batch)
    assert (report.rows, report.impressions, report.rejected) == (3, 1, 2)
    reasons = dict(
        zip(report.rejected_rows["event_id"], report.rejected_rows["reason"], strict=True)
    )
    assert "surface" in reasons["b"] and "isin" in reasons["b"]
    assert "row check failed: click_ts must be set exactly when clicked == 1" in reasons["c"]
    assert "rejected 1 row(s)" in report.summary()
    assert store.stats()["counters"]["rejected"] == 2
    assert _vector(store, BASE_MS + 100)["u_impr_2s"].iloc[0] == 1


def test_a_malformed_batch_is_refused_whole_with_the_missing_columns(store: OnlineStore) -> None:
    batch = make_events([_row("a", BASE_MS)]).drop(columns=["device"])
    with pytest.raises(ContractViolation, match="missing column.*'device'"):
        store.ingest(batch)
    assert store.stats()["watermark_ms"] == 0


def test_resent_events_are_idempotent_and_late_clicks_update(store: OnlineStore) -> None:
    first = make_events([_row("a", BASE_MS), _row("b", BASE_MS + 5)])
    store.ingest(first)
    before = _vector(store, BASE_MS + 100)
    again = store.ingest(first)
    assert (again.duplicates, again.impressions) == (2, 0)
    assert_frames_identical(_vector(store, BASE_MS + 100), before)
    click = make_events([_row("a", BASE_MS, clicked=1, click_ts=BASE_MS + 50)])
    report = store.ingest(click)
    assert (report.click_updates, report.impressions, report.clicks) == (1, 0, 1)
    row = _vector(store, BASE_MS + 100)
    assert row["u_impr_2s"].iloc[0] == 2 and row["u_clicks_5s"].iloc[0] == 1
    conflict = make_events([_row("b", BASE_MS + 999)])
    assert "different ts" in store.ingest(conflict).rejected_rows["reason"].iloc[0]


def test_late_events_are_reported_and_still_applied(store: OnlineStore) -> None:
    store.ingest(make_events([_row("a", BASE_MS + 10_000)]))
    report = store.ingest(make_events([_row("late", BASE_MS + 6_000), _row("ok", BASE_MS + 9_500)]))
    assert report.late == 1 and report.late_examples == ["late"]
    assert report.max_lateness_seconds == pytest.approx(3.0)  # 10 s - 1 s lateness - 6 s
    assert "late: 1 event(s)" in report.summary()
    assert store.stats()["counters"]["late"] == 1
    assert _vector(store, BASE_MS + 10_001)["u_impr_all_ttl4s"].iloc[0] == 3


def test_vectors_carry_as_of_age_and_staleness(store: OnlineStore) -> None:
    empty = store.lookup("u0", "i0", "feed", "mobile", BASE_MS)
    assert empty.as_of_ms == 0 and empty.stale.all()  # nothing ingested yet
    store.ingest(make_events([_row("a", BASE_MS)]))
    fresh = store.lookup("u0", "i0", "feed", "mobile", BASE_MS + 5_000)
    stale = store.lookup("u0", "i0", "feed", "mobile", BASE_MS + 5_001)
    assert fresh.as_of_ms == BASE_MS and fresh.age_seconds[0] == 5.0 and not fresh.stale[0]
    assert stale.stale[0] and stale.age_seconds[0] == pytest.approx(5.001)
    now = store.lookup("u9", "i9", "search", "tablet")  # default t: now, unknown entities
    assert now.stale[0] and now.features["i_impr_all"].iloc[0] == 0


def test_store_refuses_another_feature_set_or_lateness(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with OnlineStore.open(url, EDGE_SET, allowed_lateness_seconds=1) as s:
        s.ingest(make_events([_row("a", BASE_MS)]))
    with pytest.raises(StoreError, match="fingerprint"):
        OnlineStore.open(url, CTR_V1, allowed_lateness_seconds=1)
    with pytest.raises(StoreError, match="allowed lateness"):
        OnlineStore.open(url, EDGE_SET, allowed_lateness_seconds=2)
    with pytest.raises(StoreError, match="not understood"):
        OnlineStore.open("postgres://x")


def test_pruned_history_keeps_all_time_counts_exact(tmp_path: Path) -> None:
    """Events far older than the retention horizon leave only their counts behind."""
    with OnlineStore.open(
        f"sqlite:///{tmp_path / 'p.db'}", EDGE_SET, allowed_lateness_seconds=0
    ) as s:
        rows = [
            _row(
                f"e{i}",
                BASE_MS + i * 1000,
                clicked=i % 2,
                click_ts=BASE_MS + i * 1000 + 300 if i % 2 else None,
            )
            for i in range(30)
        ]
        events = make_events(rows)
        for i in range(0, 30, 7):
            s.ingest(events.iloc[i : i + 7])
        state = s.states(["item:i0"], "item")[0]
        assert state is not None and state.pruned[0] > 10 and len(state.times[0]) < 10
        t = BASE_MS + 30_000
        labels = pd.DataFrame(
            {
                "user_id": ["u0"],
                "item_id": ["i0"],
                "surface": ["feed"],
                "device": ["mobile"],
                "ts": [pd.Timestamp(t, unit="ms", tz="UTC")],
            }
        )
        offline = build_point_in_time(events, labels, EDGE_SET, engine="numpy")
        assert_frames_identical(s.lookup("u0", "i0", "feed", "mobile", t).features, offline)
        assert offline["i_impr_all"].iloc[0] == 30


# ----------------------------------------------------------------------------- Redis


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_online_redis_equals_offline(redis_url: str, data: st.DataObject) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    events = data.draw(event_logs())
    labels = data.draw(labels_for(events))
    store = OnlineStore.open(redis_url, EDGE_SET, allowed_lateness_seconds=1.0)
    try:
        check_online_equals_offline(store, events, labels, random.Random(data.draw(st.integers())))
    finally:
        store.close()


def test_redis_replicas_share_state_and_sqlite_agrees(redis_url: str, tmp_path: Path) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    events = make_events(
        [
            _row(
                f"e{i}",
                BASE_MS + 137 * i,
                user=f"u{i % 3}",
                item=f"i{i % 2}",
                clicked=i % 3 == 0,
                click_ts=BASE_MS + 137 * i + 90 if i % 3 == 0 else None,
            )
            for i in range(40)
        ]
    )
    stream = arrivals(events).drop(columns=["arrival_ms"])
    writer = OnlineStore.open(redis_url, EDGE_SET, allowed_lateness_seconds=1.0)
    reader = OnlineStore.open(redis_url, EDGE_SET, allowed_lateness_seconds=1.0)
    local = OnlineStore.open(
        f"sqlite:///{tmp_path / 'x.db'}", EDGE_SET, allowed_lateness_seconds=1.0
    )
    try:
        for i in range(0, len(stream), 9):
            writer.ingest(stream.iloc[i : i + 9])
            local.ingest(stream.iloc[i : i + 9])
        t = writer.stats()["watermark_ms"] + 1
        users, items = [f"u{i % 4}" for i in range(8)], [f"i{i % 3}" for i in range(8)]
        a = reader.lookup_many(users, items, ["feed"] * 8, ["mobile"] * 8, [t] * 8)
        b = local.lookup_many(users, items, ["feed"] * 8, ["mobile"] * 8, [t] * 8)
        assert_frames_identical(a.features, b.features)
        assert a.as_of_ms == b.as_of_ms == t - 1
        assert reader.stats()["counters"]["impressions"] == 40
    finally:
        writer.close()
        reader.close()
        local.close()


def test_redis_down_gives_an_actionable_error() -> None:
    with pytest.raises(StoreError, match="cannot reach the Redis online store"):
        OnlineStore.open(f"redis://127.0.0.1:{free_port()}/0")


# ----------------------------------------------------------------------------- CLI and catalog


def _mlops(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=project_env(cwd),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_ingest_lookup_and_parity_on_generated_events(tmp_path: Path) -> None:
    from pipelines.core.domain import Preset
    from pipelines.simulation.generate import generate_events

    events = generate_events(Preset(n_users=60, n_items=30, days=2, events=3000), seed=3)
    bad = events.iloc[:2].copy()
    bad["event_id"] = ["bad1", "bad2"]
    bad["device"] = "fridge"
    path = tmp_path / "events.parquet"
    pd.concat([events, bad], ignore_index=True).to_parquet(path, index=False)
    url = f"sqlite:///{tmp_path / 'online.db'}"
    ingest = _mlops(["features", "ingest", str(path), "--store", url, "--batch-size", "1000"], REPO)
    assert ingest.returncode == 0, ingest.stderr
    assert "2 rejected row(s) with their reasons written to" in ingest.stderr
    rejected = pd.read_parquet(tmp_path / "events.rejected.parquet")
    assert (
        sorted(rejected["event_id"]) == ["bad1", "bad2"]
        and rejected["reason"].str.contains("device").all()
    )
    assert f"done: {len(events) + 2:,} row(s), 2 rejected" in ingest.stdout
    user, item = events["user_id"].iloc[0], events["item_id"].iloc[0]
    lookup = _mlops(
        [
            "features",
            "lookup",
            user,
            item,
            "feed",
            "mobile",
            "--store",
            url,
            "--at",
            "2026-10-03T00:00:00",
        ],
        REPO,
    )
    assert lookup.returncode == 0, lookup.stderr
    shown = json.loads(lookup.stdout)
    assert shown["exact"] and shown["features"]["item_impr_all"] > 0
    out = tmp_path / "parity.json"
    events.to_parquet(tmp_path / "clean.parquet", index=False)
    parity = _mlops(
        [
            "features",
            "parity",
            "--store",
            url,
            "--events",
            str(tmp_path / "clean.parquet"),
            "--sample",
            "300",
            "--json-out",
            str(out),
        ],
        REPO,
    )
    assert parity.returncode == 0, parity.stdout + parity.stderr
    assert "all features identical" in parity.stdout
    report = json.loads(out.read_text())
    assert report["n"] == 300 and set(report["mismatch_rate"].values()) == {0.0}
    # The offline side reads the log like the training pipeline: contract first.
    refused = _mlops(["features", "parity", "--store", url, "--events", str(path)], REPO)
    assert refused.returncode == 1 and "Contract RawEvents violated" in refused.stderr
    # Served vectors that drifted from the feature code are caught, with the rate per feature.
    served = tmp_path / "served.parquet"
    with OnlineStore.open(url) as s:
        t = to_ms(events["ts"].iloc[-50:]) + 1
        q = events.iloc[-50:]
        vectors = s.lookup_many(
            q["user_id"].tolist(),
            q["item_id"].tolist(),
            q["surface"].tolist(),
            q["device"].tolist(),
            t,
        ).features
    vectors["user_ctr_24h"] += np.where(np.arange(50) < 5, 0.01, 0.0)  # skew 10 % of one feature
    pd.concat(
        [
            q[["user_id", "item_id", "surface", "device"]].reset_index(drop=True),
            vectors.assign(ts=pd.to_datetime(t, unit="ms", utc=True)),
        ],
        axis=1,
    ).to_parquet(served)
    skew = _mlops(
        [
            "features",
            "parity",
            "--store",
            url,
            "--events",
            str(tmp_path / "clean.parquet"),
            "--served",
            str(served),
        ],
        REPO,
    )
    assert skew.returncode == 1
    line = next(ln for ln in skew.stdout.splitlines() if ln.startswith("user_ctr_24h"))
    assert "10.0000%" in line and "parity broken" in skew.stderr


def test_feature_catalog_is_up_to_date() -> None:
    from pipelines.features.definitions import FEATURE_SETS, feature_catalog_markdown

    expected = "\n".join(feature_catalog_markdown(fs) for fs in FEATURE_SETS.values())
    assert (REPO / "docs/features.md").read_text() == expected, (
        "docs/features.md is stale: run `mlops features catalog --out docs/features.md`"
    )


def test_feature_declarations_are_checked() -> None:
    from pipelines.features.definitions import Feature, FeatureDefinitionError

    with pytest.raises(FeatureDefinitionError, match="duration"):
        Feature("x", "user", "impressions", "count", "7 days", "float64", 0.0, "d")
    with pytest.raises(FeatureDefinitionError, match="seconds_since needs a window"):
        Feature("x", "user", "clicks", "seconds_since", None, "float64", 0.0, "d")
    with pytest.raises(FeatureDefinitionError, match="ctr needs"):
        Feature("x", "user", "clicks", "ctr", "1h", "float64", 0.0, "d")
    with pytest.raises(FeatureDefinitionError, match="entity"):
        Feature("x", "session", "clicks", "count", "1h", "float64", 0.0, "d")
