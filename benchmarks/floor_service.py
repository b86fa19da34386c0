"""The floor of a ``/predict`` call: BentoML with the service's own request and answer models,
tracing and logging configuration, one worker, answering a fixed answer.

What BentoML, HTTP and the request's validation cost a call, none of the scoring path
(features, routing, model, request log) or of the service's own middlewares. Served by
``benchmarks/arrival_gaps.py --floor`` beside the bento.
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import bentoml  # noqa: E402

from pipelines.serving.http_limits import logging_config, tracing_config  # noqa: E402
from pipelines.serving.schema import PredictRequest, PredictResponse  # noqa: E402

ANSWER = {
    "request_id": "floor",
    "probability": 0.1,
    "model_version": "floor",
    "route": "prod",
    "degraded": False,
    "degraded_reason": None,
    "feature_age_seconds": 1.0,
    "features_fresh": True,
    "runtime": "compiled",
}


@bentoml.service(
    name="floor",
    workers=1,
    http={"host": "127.0.0.1"},
    traffic={"timeout": 10},
    tracing=tracing_config(os.environ),  # type: ignore[arg-type]
    logging=logging_config(os.environ),  # type: ignore[arg-type]
)
class Floor:
    """A fixed answer to a validated ``PredictRequest``."""

    def __init__(self) -> None:
        gc.freeze()

    @bentoml.api(route="/predict")
    async def predict(self, request: PredictRequest, /) -> PredictResponse:
        return PredictResponse.model_construct(**ANSWER)
