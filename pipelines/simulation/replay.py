"""Offline replay: the request log the service would have written for a stream of impressions.

Used to exercise the monitors without a running service (tests, benchmarks, the
``mlops monitor replay`` demo) and to backfill monitoring for historical traffic.
Each impression becomes one request (``request_id`` = ``event_id``, so the events'
own clicks are the delayed labels); features come from ``EventIndex`` (the code
the service and the training set use) and predictions from the packaged model.

The online store is either *streaming* (every event before the request is
visible; feature age 0) or a *snapshot* taken at ``snapshot_as_of`` (events after
it are invisible; feature age is the time since the snapshot), like the service's
default snapshot store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from pipelines.core.io import md5_file
from pipelines.features.definitions import FEATURE_SETS, EventIndex, to_ms


@dataclass
class ReplayModel:
    """A model as the replay serves it: the estimator, its feature set and its version label."""

    model: object
    feature_set: str
    label: str

    @classmethod
    def load(cls, model_dir: Path, label: str | None = None) -> ReplayModel:
        """Load ``model.joblib`` + ``model_card.json``; the label defaults to the packaged one."""
        card = json.loads((model_dir / "model_card.json").read_text())
        model_file = model_dir / "model.joblib"
        return cls(
            joblib.load(model_file),
            card["feature_set"],
            label or f"m{md5_file(model_file)[:12]}",
        )

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(X)[:, 1], dtype=np.float64)  # type: ignore[attr-defined]


def user_bucket(users: np.ndarray, salt: str = "ctr") -> np.ndarray:
    """A sticky uniform number in [0, 1) per user (keyed blake2b, like the service's router)."""
    key = salt.encode()[:16]
    out = np.empty(len(users), dtype=np.float64)
    for i, user in enumerate(users):
        digest = hashlib.blake2b(str(user).encode(), digest_size=8, key=key).digest()
        out[i] = int.from_bytes(digest, "big") / float(1 << 64)
    return out


def replay(
    history: pd.DataFrame,
    requests: pd.DataFrame,
    prod: ReplayModel,
    candidate: ReplayModel | None = None,
    canary_share: float = 0.0,
    salt: str = "ctr",
    snapshot_as_of: pd.Timestamp | None = None,
    release_id: str = "replay",
    chunk: int = 2000,
) -> pd.DataFrame:
    """A normalized request log (see ``pipelines.monitoring.requests``) for impression rows.

    ``history`` holds the events the online store knows. With a ``candidate`` and
    ``canary_share`` > 0, a sticky share of users is answered by the candidate
    (route ``canary``) and prod also scores those rows in the background
    (``score_prod``), as the service's canary mode logs them. ``latency_ms`` is the
    measured per-row cost of feature lookup plus scoring, per chunk.
    """
    fs = FEATURE_SETS[prod.feature_set]
    if snapshot_as_of is not None:
        as_of = pd.Timestamp(snapshot_as_of)
        as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of
        history = history[history["ts"] < as_of]
        as_of_ms: int | None = int(as_of.value // 1_000_000)
    else:
        as_of_ms = None
    index = EventIndex(history, fs)
    requests = requests.sort_values("ts", kind="stable").reset_index(drop=True)
    users = requests["user_id"].to_numpy(dtype=object)
    t_ms = to_ms(requests["ts"])
    on_candidate = (
        user_bucket(users, salt) < canary_share
        if candidate is not None and canary_share > 0
        else np.zeros(len(requests), dtype=bool)
    )
    feats = np.empty((len(requests), len(fs.names)), dtype=np.float64)
    prob = np.empty(len(requests), dtype=np.float64)
    score_prod = np.full(len(requests), np.nan)
    score_cand = np.full(len(requests), np.nan)
    latency = np.empty(len(requests), dtype=np.float64)
    for lo in range(0, len(requests), chunk):
        hi = min(lo + chunk, len(requests))
        started = time.perf_counter()
        X = index.lookup(
            users[lo:hi],
            requests["item_id"].to_numpy(dtype=object)[lo:hi],
            requests["surface"].to_numpy(dtype=object)[lo:hi],
            requests["device"].to_numpy(dtype=object)[lo:hi],
            t_ms[lo:hi],
        ).to_numpy(np.float64)
        p = prod.predict(X)
        feats[lo:hi], score_prod[lo:hi] = X, p
        prob[lo:hi] = p
        if candidate is not None and on_candidate[lo:hi].any():
            c = candidate.predict(X)
            rows = np.flatnonzero(on_candidate[lo:hi])
            score_cand[lo:hi][rows] = c[rows]
            prob[lo:hi][rows] = c[rows]
        latency[lo:hi] = (time.perf_counter() - started) * 1000.0 / (hi - lo)
    if as_of_ms is None:
        age = np.zeros(len(requests))
    else:
        age = np.maximum(t_ms - as_of_ms, 0) / 1000.0
    route = np.where(on_candidate, "canary", "prod")
    model = np.where(on_candidate, candidate.label if candidate else "", prod.label)
    times = pd.to_datetime(t_ms, unit="ms", utc=True)
    log = pd.DataFrame(
        {
            "request_id": requests["event_id"].astype(str).to_numpy(),
            "answered_at": times,
            "endpoint": "predict",
            "release_id": release_id,
            "user": users.astype(str),
            "item": requests["item_id"].astype(str).to_numpy(),
            "surface": requests["surface"].astype(str).to_numpy(),
            "device": requests["device"].astype(str).to_numpy(),
            "request_time": times,
            "route": route,
            "model": model,
            "probability": np.round(prob, 6),
            "degraded": False,
            "degraded_reason": None,
            "latency_ms": np.round(latency, 4),
            "feature_age_seconds": np.round(age, 3),
        }
    )
    log = pd.concat([log, pd.DataFrame(feats, columns=fs.names)], axis=1)
    log["score_prod"] = score_prod
    if candidate is not None:
        log["score_candidate"] = score_cand
    return log
