"""The service's online-store feature source without a server: selection, parity, fallback."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.features.definitions import CTR_V1, EventIndex, to_ms
from pipelines.features.online_store import OnlineStore
from pipelines.modeling.release import FeatureRef, OnlineStoreRef, Release
from pipelines.serving.predictor import SnapshotFeatureSource
from pipelines.serving.store_source import OnlineStoreFeatureSource, events_from_json, store_ref_for

T0 = int(pd.Timestamp("2026-10-01", tz="UTC").value // 1_000_000)


def _events(n: int = 60) -> pd.DataFrame:
    rows = [
        {
            "event_id": f"e{i}",
            "ts": T0 + 61_000 * i,
            "user_id": f"u{i % 4}",
            "item_id": f"i{i % 3}",
            "surface": ("feed", "search", "recs")[i % 3],
            "device": "mobile",
            "position": 1 + i % 5,
            "clicked": int(i % 4 == 0),
            "click_ts": T0 + 61_000 * i + 5_000 if i % 4 == 0 else None,
        }
        for i in range(n)
    ]
    return events_from_json(rows)


def _source(tmp_path: Path, events: pd.DataFrame) -> OnlineStoreFeatureSource:
    ref = OnlineStoreRef.model_validate(
        {"url": "sqlite:///store/features.db", "feature_set": "ctr_v1", "retry_seconds": 0.0}
    )
    snapshot = SnapshotFeatureSource(EventIndex(events, CTR_V1), "snap")
    return OnlineStoreFeatureSource(ref, 300.0, snapshot, root=tmp_path)


def _ask(source: OnlineStoreFeatureSource, t_ms: int):  # noqa: ANN202
    users, items = ["u0", "u1", "u9"], ["i0", "i2", "i0"]
    return source.lookup(users, items, ["feed", "recs", "feed"], ["mobile"] * 3, np.full(3, t_ms))


def test_store_vectors_equal_the_snapshot_and_fall_back_while_the_file_is_gone(
    tmp_path: Path,
) -> None:
    events = _events()
    source = _source(tmp_path, events)
    last = int(max(to_ms(events["ts"]).max(), to_ms(events["click_ts"].dropna()).max()))
    missing = _ask(source, last + 1000)
    assert missing.note and "does not exist" in missing.note  # snapshot answered
    with OnlineStore.open(f"sqlite:///{tmp_path / 'store/features.db'}") as store:
        store.ingest(events)
    fresh = _ask(source, last + 1000)
    assert fresh.note is None and (fresh.as_of_ms == last).all()
    np.testing.assert_array_equal(fresh.X, missing.X)  # same events: identical vectors
    assert source.status()["outages"][0]["fallback_rows"] == 3

    db = tmp_path / "store/features.db"
    db.rename(db.with_suffix(".away"))
    assert "was removed" in (_ask(source, last + 1000).note or "")
    db.with_suffix(".away").rename(db)
    time.sleep(0.01)
    assert _ask(source, last + 1000).note is None
    old = _ask(source, T0 + 61_000 * 10)  # inside the snapshot: exact from it either way
    assert old.note is None


def test_empty_store_falls_back_and_env_overrides_the_release(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    OnlineStore.open(f"sqlite:///{tmp_path / 'store/features.db'}").close()
    source = _source(tmp_path, _events())
    assert "holds no events" in (_ask(source, T0).note or "")

    feature_ref = FeatureRef(tag="f:1", feature_set="ctr_v1", names=CTR_V1.names, files={})
    ref = OnlineStoreRef.model_validate({"url": "sqlite:///a.db", "feature_set": "ctr_v1"})
    with_store = Release.model_construct(feature_source=feature_ref, online_store=ref)
    without = Release.model_construct(feature_source=feature_ref, online_store=None)
    assert store_ref_for(with_store, {}) == ref
    assert store_ref_for(with_store, {"CTR_FEATURE_STORE_URL": "none"}) is None
    assert store_ref_for(without, {}) is None
    override = store_ref_for(without, {"CTR_FEATURE_STORE_URL": "redis://127.0.0.1:1/0"})
    assert override is not None and override.url == "redis://127.0.0.1:1/0"
    assert store_ref_for(with_store, {"CTR_FEATURE_STORE_URL": "sqlite:///b.db"}).url.endswith(
        "b.db"
    )
