"""The click-through BentoML service: HTTP wiring only; logic is in ``pipelines.serving.predictor``.

Environment (all optional):

* ``CTR_RELEASE_FILE``: release to serve (default: the one built into the bento);
* ``CTR_ADMIN_TOKEN`` (name set by ``serving.admin_token_env``): bearer token for
  the ``/admin/*`` endpoints; unset means they refuse every call;
* ``CTR_ENABLE_FAULT_INJECTION=1``: allow ``/admin/fault`` (chaos tests only);
* ``CTR_FEATURE_STORE_URL``: online feature store to read (overrides the release's
  ``online_store``; ``none``: the packaged snapshot only). See pipelines/serving/store_source.py;
* ``CTR_TRACE_SCORING=1``: let BentoML's OpenTelemetry middleware trace the scoring
  routes too (off: they are excluded, see docs/serving.md, "Tail latency");
* ``CTR_ACCESS_LOG=1``: BentoML's access log (a line per request on stdout; off: the
  request log records every call);
* ``CTR_REQUEST_LOG_DIR``, ``CTR_PROFILE_DIR``, ``CTR_STATE_DIR``: override the
  ``serving.*_dir`` paths, which are otherwise relative to ``MLOPS_PROJECT_ROOT``
  (or the working directory).

The service binds to 127.0.0.1 unless ``bentoml serve --host`` says otherwise.
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread per worker: with the default, two workers on 2 cores
# oversubscribe and tail latency goes to seconds.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import asyncio  # noqa: E402
import gc  # noqa: E402
import hmac  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any, Literal  # noqa: E402

import bentoml  # noqa: E402
from pydantic import Field  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response  # noqa: E402

from pipelines.features.contracts import ContractViolation  # noqa: E402
from pipelines.modeling.release import load_release  # noqa: E402
from pipelines.serving.http_limits import (  # noqa: E402
    install_header_timeout,
    install_request_timer_release,
    logging_config,
    tracing_config,
)
from pipelines.serving.overload import (  # noqa: E402
    ARRIVAL_INFLIGHT,
    GcPauses,
    InFlight,
    PriorityLane,
    call_level,
)
from pipelines.serving.pod import read_state  # noqa: E402
from pipelines.serving.predictor import (  # noqa: E402
    ColumnsResponse,
    Fault,
    NoTierAvailable,
    Predictor,
    PredictRequest,
    PredictResponse,
    RankResponse,
    Runtime,
    columns_request_model,
    rank_request_model,
)
from pipelines.serving.request_log import RequestLog  # noqa: E402
from pipelines.serving.schema import RequestRows, batch_rows, read_batch  # noqa: E402
from pipelines.serving.security import (  # noqa: E402
    Guard,
    check_bearer,
    public_metadata,
    quiet_bentoml_client_errors,
)
from pipelines.serving.store_source import (  # noqa: E402
    STORE_ERRORS,
    OnlineStoreFeatureSource,
    events_from_json,
    rejected_json,
)

logger = logging.getLogger("ctr.service")
RELEASE_FILE = Path(
    os.environ.get(
        "CTR_RELEASE_FILE", Path(__file__).resolve().parent.parent / "build/release/release.json"
    )
)
RELEASE = load_release(RELEASE_FILE)
POLICY = RELEASE.policy
MAX_BATCH = POLICY.max_batch_size
RankRequest = rank_request_model(POLICY.max_rank_items)
ColumnsRequest = columns_request_model(MAX_BATCH)
BatchRows = batch_rows(MAX_BATCH)
MAX_INGEST = RELEASE.online_store.max_ingest_rows if RELEASE.online_store else 10_000
MAX_INGEST_BYTES = MAX_INGEST * 2048  # a RawEvents row as JSON is ~250 bytes
# BentoML cuts any request at TIMEOUT_SECONDS with a 5xx; an admin change waits for the
# other workers at most ADMIN_SYNC_SECONDS after the call came in, then answers 202.
TIMEOUT_SECONDS = 10.0
ADMIN_SYNC_SECONDS = TIMEOUT_SECONDS - 2.0
# Refused requests: one line each from Guard, no BentoML traceback; slow request heads: 408.
quiet_bentoml_client_errors()
install_header_timeout(POLICY.header_timeout_seconds)
# BentoML's per-request timeout timer holds each finished request for 10 s: released.
install_request_timer_release()


class BatchInput(bentoml.IODescriptor):
    """``/predict_batch``'s body, ``{"requests": [...]}``: the usual JSON body is decoded by
    msgspec and read straight into columns; any other body is validated by BentoML as
    declared, which accepts the same rows and reports the errors."""

    requests: BatchRows  # type: ignore[valid-type]

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> bentoml.IODescriptor:
        media_type = request.headers.get("content-type", "application/json")
        if media_type.split(";")[0].strip() == "application/json":
            rows = read_batch(await request.body(), MAX_BATCH)
            if rows is not None:
                return cls.model_construct(requests=rows)
        return await super().from_http_request(request, serde)


def _local_path(setting: str, env: str) -> Path:
    override = os.environ.get(env)
    if override:
        return Path(override)
    base = Path(os.environ.get("MLOPS_PROJECT_ROOT", "."))
    return base / setting


def _model_path(tag: str) -> Path:
    return Path(bentoml.models.get(tag).path)


def _load_runtime() -> Runtime:
    """Load the release file as it is now (used by reload, here and in the other workers)."""
    return Runtime.load(load_release(RELEASE_FILE), _model_path)


def _refuse(ctx: bentoml.Context) -> dict[str, str] | None:
    """None if the bearer token matches, else the error body (status set on ``ctx``)."""
    token = os.environ.get(POLICY.admin_token_env, "")
    if not token:
        ctx.response.status_code = 403
        return {
            "error": f"admin endpoints are disabled: set {POLICY.admin_token_env} in the "
            "service environment to enable them"
        }
    header = ctx.request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        ctx.response.status_code = 401
        return {"error": "missing bearer token: send 'Authorization: Bearer <token>'"}
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        ctx.response.status_code = 403
        return {"error": "invalid admin token"}
    return None


@bentoml.service(
    name=RELEASE.service_name,
    traffic={"timeout": TIMEOUT_SECONDS},
    workers=POLICY.workers,
    http={"host": "127.0.0.1"},
    tracing=tracing_config(os.environ),  # type: ignore[arg-type]
    logging=logging_config(os.environ),  # type: ignore[arg-type]
)
class CtrService:
    """Click probability for (user, item, surface, device[, timestamp]), routed, with fallbacks."""

    # Every model of the release is referenced here so `bentoml build` ships it.
    prod_model = bentoml.models.BentoModel(RELEASE.prod.tag)
    candidate_model = (
        bentoml.models.BentoModel(RELEASE.candidate.tag) if RELEASE.candidate else None
    )
    previous_model = bentoml.models.BentoModel(RELEASE.previous.tag) if RELEASE.previous else None
    features_ref = bentoml.models.BentoModel(RELEASE.feature_source.tag)

    def __init__(self) -> None:
        state_dir = _local_path(POLICY.state_dir, "CTR_STATE_DIR")
        # read before the release: a reload recorded while this worker loads is followed
        loaded_at_reload = read_state(state_dir).reload_generation
        runtime = _load_runtime()
        request_log = RequestLog(
            _local_path(POLICY.request_log_dir, "CTR_REQUEST_LOG_DIR"),
            _local_path(POLICY.profile_dir, "CTR_PROFILE_DIR"),
            flush_seconds=POLICY.log_flush_seconds,
            rotate_bytes=int(POLICY.log_rotate_mb * (1 << 20)),
            queue_size=POLICY.log_queue_size,
            profile_window_seconds=POLICY.profile_window_seconds,
            profile_sample_rows=POLICY.profile_sample_rows,
        )
        self.predictor = Predictor(
            runtime,
            request_log,
            state_dir,
            background_queue_size=POLICY.shadow_queue_size,
            reloader=_load_runtime,
            loaded_at_reload=loaded_at_reload,
        )
        for problem in runtime.problems:
            logger.error("release %s: %s", RELEASE.release_id, problem)
        # Move everything loaded so far out of the GC's generations: it cut p99
        # latency at concurrency 1 from ~120 ms to ~7 ms on 2 cores.
        gc.freeze()
        self.gc_pauses = GcPauses().install()
        # Scoring calls run on one thread, most critical surface first (not BentoML's FIFO).
        self.lane = PriorityLane()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """Clean shutdown: finish queued and background scoring, flush the request log."""
        self.lane.close()
        self.predictor.close()

    @bentoml.api(route="/predict")
    async def predict(self, request: PredictRequest, /) -> PredictResponse:
        """Score one impression."""
        answers = await self._score(
            1,
            [request.surface],
            self.predictor.predict,
            [request],
            "predict",
            ARRIVAL_INFLIGHT.get(),
        )
        return answers if isinstance(answers, Response) else answers[0]  # type: ignore[no-any-return]

    @bentoml.api(route="/predict_batch", input_spec=BatchInput)
    async def predict_batch(self, requests: BatchRows) -> list[PredictResponse]:  # type: ignore[valid-type]
        """Score 1 to ``serving.max_batch_size`` impressions in one call."""
        rows: RequestRows = requests  # read as columns (pipelines/serving/schema.py)
        return await self._score(  # type: ignore[no-any-return]
            len(rows),
            rows.surfaces,
            self.predictor.predict_json,
            rows,
            "predict_batch",
            ARRIVAL_INFLIGHT.get(),
        )

    @bentoml.api(route="/predict_columns")
    async def predict_columns(self, columns: ColumnsRequest, /) -> ColumnsResponse:  # type: ignore[valid-type]
        """Score 1 to ``serving.max_batch_size`` impressions given as columns (one list per
        field, request times in epoch ms); the answers as columns."""
        return await self._score(  # type: ignore[no-any-return]
            len(columns.user),  # type: ignore[attr-defined]
            columns.surface,  # type: ignore[attr-defined]
            self.predictor.predict_columns_json,
            columns,
            "predict_columns",
            ARRIVAL_INFLIGHT.get(),
        )

    @bentoml.api(route="/rank")
    async def rank(self, request: RankRequest, /) -> RankResponse:  # type: ignore[valid-type]
        """Rank 1 to ``serving.max_rank_items`` candidate items for one user, surface and
        device: each item's click probability, highest first."""
        return await self._score(  # type: ignore[no-any-return]
            len(request.items),  # type: ignore[attr-defined]
            [request.surface],  # type: ignore[attr-defined]
            self.predictor.rank_json,
            request,
            ARRIVAL_INFLIGHT.get(),
        )

    async def _score(self, rows: int, surfaces: list[str], fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the scoring lane at the level of the call's most critical surface;
        JSON bytes become the response as they are; 503 when no tier, baseline included, can
        answer. A call alone in the worker that keeps the GIL throughout anyway runs here:
        another thread would run it no sooner, and no other call could use the loop meanwhile
        (with calls in flight, the loop reads them while the lane's thread scores)."""
        level = call_level(POLICY, surfaces)
        inline = self.predictor.keeps_gil(rows)
        if inline:
            await asyncio.sleep(0)  # requests that came in with this one enter the count
            inline = InFlight.count == 1
        try:
            out = await self.lane.run(level, fn, *args, inline=inline)
        except NoTierAvailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return Response(out, media_type="application/json") if isinstance(out, bytes) else out

    @bentoml.api(route="/metadata")
    def metadata(self, ctx: bentoml.Context) -> dict[str, Any]:
        """The release and model versions answering; with the admin token also the lineage,
        policy, load problems and counters."""
        full = {**self.predictor.metadata(), "gc": self.gc_pauses.stats, "lane": self.lane.calls}
        token = ctx.request.headers.get("authorization", "")
        if check_bearer(token, POLICY.admin_token_env) is None:
            return full
        return public_metadata(full)

    async def _sync(self, ctx: bentoml.Context, generation: int, since: float) -> dict[str, Any]:
        """Answer once every worker of the pod applied the change, or 202 in time for the
        client: a worker lags, restarts (fewer than ``serving.workers`` loaded) or failed.
        The change is recorded either way; a lagging worker applies it when it follows."""
        budget = max(0.0, since + ADMIN_SYNC_SECONDS - time.monotonic())
        workers = await asyncio.to_thread(self.predictor.sync, generation, budget, POLICY.workers)
        if not workers["complete"]:
            ctx.response.status_code = 202
            logger.error("admin: workers %s have not applied generation %d", workers, generation)
        return {"workers": workers}

    @bentoml.api(route="/admin/canary")
    async def admin_canary(
        self, ctx: bentoml.Context, share: Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
    ) -> dict[str, Any]:
        """Set the candidate's share of users now; 0 is the kill switch. Bearer token required."""
        since = time.monotonic()
        refused = _refuse(ctx)
        if refused:
            return refused
        state = await asyncio.to_thread(self.predictor.set_candidate_share, share)
        logger.warning("admin: candidate share set to %s", share)
        return {"ok": True, **state, **await self._sync(ctx, state.get("generation", 0), since)}

    @bentoml.api(route="/admin/reload")
    async def admin_reload(self, ctx: bentoml.Context) -> dict[str, Any]:
        """Re-read the release file and reload every tier, no restart. Bearer token required."""
        since = time.monotonic()
        refused = _refuse(ctx)
        if refused:
            return refused

        try:
            runtime = await asyncio.to_thread(_load_runtime)
        except Exception as exc:  # a bad release file keeps the old release serving
            ctx.response.status_code = 422
            return {"error": f"reload failed, still serving the previous release: {exc}"}
        unservable = runtime.unservable()
        if unservable is not None:
            ctx.response.status_code = 422
            logger.error("admin: reload refused: %s", unservable)
            return {"error": f"reload refused, still serving the previous release: {unservable}"}
        generation = await asyncio.to_thread(self.predictor.reload, runtime)
        logger.warning(
            "admin: reloaded release %s (problems: %s)",
            runtime.release.release_id,
            runtime.problems,
        )
        return {
            "ok": True,
            "release_id": runtime.release.release_id,
            "problems": runtime.problems,
            "tiers": {r: t.status() for r, t in runtime.tiers.items()},
            **await self._sync(ctx, generation, since),
        }

    @bentoml.api(route="/admin/fault")
    async def admin_fault(
        self,
        ctx: bentoml.Context,
        target: Literal["prod", "candidate", "previous", "features"],
        kind: Literal["error", "slow", "none"],
        delay_ms: Annotated[float, Field(ge=0, le=60_000, strict=True)] = 0.0,
    ) -> dict[str, Any]:
        """Inject or clear a fault (chaos tests): CTR_ENABLE_FAULT_INJECTION=1 and token needed."""
        since = time.monotonic()
        refused = _refuse(ctx)
        if refused:
            return refused
        if os.environ.get("CTR_ENABLE_FAULT_INJECTION") != "1":
            ctx.response.status_code = 403
            return {
                "error": "fault injection is disabled: start the service with "
                "CTR_ENABLE_FAULT_INJECTION=1 (test environments only)"
            }
        fault = None if kind == "none" else Fault(kind, delay_ms)
        try:
            generation = await asyncio.to_thread(self.predictor.set_fault, target, fault)
        except KeyError as exc:
            ctx.response.status_code = 404
            return {"error": str(exc.args[0])}
        logger.warning("admin: fault on %s set to %s", target, fault)
        return {
            "ok": True,
            "target": target,
            "fault": None if fault is None else vars(fault),
            **await self._sync(ctx, generation, since),
        }

    @bentoml.api(route="/admin/ingest")
    def admin_ingest(
        self,
        ctx: bentoml.Context,
        events: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_INGEST)],
    ) -> dict[str, Any]:
        """Apply RawEvents rows to the online store; returns the ingest report. Token required.

        Bad rows are rejected one by one with their reason (first 100 returned); the valid
        rest is ingested atomically. A store that cannot take the batch answers 503 and
        ingests nothing, so the sender can retry the same batch (re-sent rows are idempotent).
        """
        refused = _refuse(ctx)
        if refused:
            return refused
        size = int(ctx.request.headers.get("content-length") or 0)
        if size > MAX_INGEST_BYTES:
            ctx.response.status_code = 413
            return {
                "error": f"body of {size} bytes is over {MAX_INGEST_BYTES}; send smaller batches"
            }
        source = self.predictor.runtime.features
        if not isinstance(source, OnlineStoreFeatureSource):
            ctx.response.status_code = 409
            return {
                "error": "this service reads no online store; set features.online.serve: true "
                "and re-package, or start it with CTR_FEATURE_STORE_URL"
            }
        try:
            report = source.ingest(events_from_json(events), "POST /admin/ingest")
        except ContractViolation as exc:
            ctx.response.status_code = 400
            return {"error": exc.report}
        except STORE_ERRORS as exc:
            ctx.response.status_code = 503
            return {
                "error": f"online store unavailable, nothing was ingested; retry the batch: "
                f"{type(exc).__name__}: {exc}"
            }
        body = report.to_dict()
        body["rejected_rows"] = rejected_json(report)
        return body


# Token before body for /admin and /metrics, JSON content type, bounded 400 bodies and
# refusal logging; bodies over serving.max_body_mb get 413 before BentoML parses them.
CtrService.add_asgi_middleware(
    Guard,
    token_env=POLICY.admin_token_env,
    max_body_bytes=int(POLICY.max_body_mb * (1 << 20)),
    body_timeout=POLICY.body_timeout_seconds,
    public_metrics=POLICY.public_metrics,
    refused_log_per_second=POLICY.refused_log_per_second,
)
# Scoring calls in flight per worker, seen by each call at arrival (surface priorities).
CtrService.add_asgi_middleware(InFlight)
