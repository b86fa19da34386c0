"""Request-time logic of the BentoML service: features, model, baseline, response.

The service class in ``bentos/service.py`` only wires HTTP to ``Predictor``;
everything here is importable and tested without a server. Features come from
``EventIndex``, the same code that built the training set.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import joblib
import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from pipelines.features import FEATURE_SETS, EventIndex, FeatureSet
from pipelines.io import md5_file
from pipelines.model import RuleBaseline

Surface = Literal["feed", "search", "recs"]
Device = Literal["mobile", "desktop", "tablet"]
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class PredictRequest(BaseModel):
    """One scoring request; ``timestamp`` defaults to the time the request arrives."""

    user: Id
    item: Id
    surface: Surface
    device: Device
    timestamp: dt.datetime | None = None


class PredictResponse(BaseModel):
    """Click probability and how it was produced."""

    probability: float
    model_version: str
    route: Literal["prod", "baseline"]
    degraded: bool
    degraded_reason: str | None = None
    feature_age_seconds: float
    features_fresh: bool


class ArtifactMismatch(RuntimeError):
    """A model file does not match the hash recorded in the release."""


@dataclass
class Predictor:
    """The model, the rule baseline and the online feature index of one release."""

    release: dict[str, Any]
    feature_set: FeatureSet
    index: EventIndex
    baseline: RuleBaseline
    model: Any | None
    load_error: str | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"requests": 0, "degraded": 0})

    @classmethod
    def load(cls, release: dict[str, Any], model_dir: Path, features_dir: Path) -> Predictor:
        """Load the release; a model whose md5 differs from the release is refused, not loaded."""
        feature_set = FEATURE_SETS[release["feature_set"]]
        events = pd.read_parquet(
            features_dir / "events.parquet",
            columns=["user_id", "item_id", "surface", "ts", "clicked", "click_ts"],
        )
        index = EventIndex(events, feature_set)
        baseline = RuleBaseline.load(model_dir / "baseline.json")
        model, error = None, None
        model_file = model_dir / "model.joblib"
        actual = md5_file(model_file)
        if actual != release["model_md5"]:
            error = (
                f"model file {model_file} has md5 {actual}, release expects "
                f"{release['model_md5']}; refusing to load it"
            )
        else:
            model = joblib.load(model_file)
        return cls(release, feature_set, index, baseline, model, error)

    def predict(self, requests: list[PredictRequest]) -> list[PredictResponse]:
        """Score a batch of validated requests; falls back to the baseline if the model fails."""
        now_ms = int(time.time() * 1000)
        t_ms = np.array(
            [now_ms if r.timestamp is None else _epoch_ms(r.timestamp) for r in requests],
            dtype=np.int64,
        )
        users = [r.user for r in requests]
        items = [r.item for r in requests]
        surfaces = [r.surface for r in requests]
        devices = [r.device for r in requests]
        age = np.maximum(t_ms - self.index.as_of_ms, 0) / 1000.0
        sla = float(self.release.get("freshness_sla_seconds", 300))
        route: Literal["prod", "baseline"] = "prod"
        reason = self.load_error
        probs: np.ndarray | None = None
        if self.model is not None:
            try:
                X = self.index.lookup(users, items, surfaces, devices, t_ms).to_numpy(np.float64)
                probs = self.model.predict_proba(X)[:, 1]
            except Exception as exc:  # any model failure degrades to the baseline tier
                reason = f"model error: {type(exc).__name__}: {exc}"
        if probs is None:
            route = "baseline"
            probs = self.baseline.predict(items, surfaces)
        self.counters["requests"] += len(requests)
        if route != "prod":
            self.counters["degraded"] += len(requests)
        version = self.release["model_version"] if route == "prod" else "rule-baseline"
        return [
            PredictResponse(
                probability=round(float(p), 6),
                model_version=version,
                route=route,
                degraded=route != "prod",
                degraded_reason=reason if route != "prod" else None,
                feature_age_seconds=round(float(a), 3),
                features_fresh=bool(a <= sla),
            )
            for p, a in zip(probs, age, strict=True)
        ]


def _epoch_ms(stamp: dt.datetime) -> int:
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp() * 1000)


def load_release(path: Path) -> dict[str, Any]:
    """Read the release description written by the ``package`` stage."""
    if not path.is_file():
        raise FileNotFoundError(f"release file {path} is missing; run `dvc repro package`")
    return json.loads(path.read_text())
