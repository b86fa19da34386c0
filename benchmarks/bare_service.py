"""A bare BentoML service for comparison: the same model on precomputed features, nothing else.

No feature lookup, routing, fallbacks or request log: what BentoML itself costs
per request with this model. Served by ``benchmarks/serving_latency.py`` with
``BARE_MODEL_TAG`` naming the model in the BentoML store.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import bentoml  # noqa: E402
import joblib  # noqa: E402
import numpy as np  # noqa: E402


@bentoml.service(name="bare_ctr", workers=1, http={"host": "127.0.0.1"}, traffic={"timeout": 10})
class BareService:
    """predict_proba over HTTP."""

    model_ref = bentoml.models.BentoModel(os.environ["BARE_MODEL_TAG"])

    def __init__(self) -> None:
        self.model = joblib.load(Path(self.model_ref.path) / "model.joblib")
        gc.freeze()

    @bentoml.api
    def predict(self, features: list[float]) -> float:
        return float(self.model.predict_proba(np.asarray([features], dtype=np.float64))[0, 1])

    @bentoml.api
    def predict_batch(self, rows: list[list[float]]) -> list[float]:
        return self.model.predict_proba(np.asarray(rows, dtype=np.float64))[:, 1].tolist()
