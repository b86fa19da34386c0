"""Request-time logic of the BentoML service: features, routing, the fallback chain, logging.

The service class in ``bentos/service.py`` only wires HTTP to ``Predictor``;
everything here is importable and tested without a server.

Details: docs/serving.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import orjson

from pipelines.features import keys, search
from pipelines.modeling.model import RuleBaseline
from pipelines.modeling.release import Release, load_release
from pipelines.serving import answers, times
from pipelines.serving.overload import shed_reasons
from pipelines.serving.pod import Pod, PodState, verdict
from pipelines.serving.request_log import (
    LogBatch,
    RequestLog,
)
from pipelines.serving.routing import Router
from pipelines.serving.schema import (
    ColumnsRequest,
    ColumnsResponse,
    PredictRequest,
    PredictResponse,
    RankRequest,
    RankResponse,
    RequestRows,
    columns_request_model,
    epoch_ms,
    rank_request_model,
)
from pipelines.serving.security import redact_paths
from pipelines.serving.sources import (
    ArtifactMismatch,
    FeatureBatch,
    FeatureSource,
    FeatureStoreUnavailable,
    SnapshotFeatureSource,
    check_file,
    iso_ms,
)
from pipelines.serving.store_source import feature_source_for
from pipelines.serving.tiers import Fault, InjectedFault, ModelTier, load_tier

logger = logging.getLogger("ctr.serving")


# The answer's fields in ``PredictResponse``'s order.
_FIELDS = tuple(PredictResponse.model_fields)

# Call ids: 64 random bits from a generator seeded from os.urandom (again in a forked
# child). uuid4 reads os.urandom on every call, which lets go of the GIL (see
# "Tail latency" in docs/serving.md); these ids correlate log rows, they guard nothing.
_CALL_IDS = random.Random()
os.register_at_fork(after_in_child=_CALL_IDS.seed)

_row_tail_cache: list[str] = []


def _tally(values: list[Any]) -> dict[Any, int]:
    """How many times each value occurs (one C-level pass when all are the same)."""
    n = len(values)
    if n and values.count(values[0]) == n:
        return {values[0]: n}
    return Counter(values)


def _row_tails(n: int) -> list[str]:
    """``-0 .. -(n-1)``: the row suffixes of a call's request ids, formatted once (a larger
    call builds a new list and rebinds it, so concurrent callers never see a partial one)."""
    global _row_tail_cache  # noqa: PLW0603 - a cache, rebound whole
    tails = _row_tail_cache
    if len(tails) < n:
        tails = [f"-{i}" for i in range(max(n, 2 * len(tails)))]
        _row_tail_cache = tails
    return tails[:n]


# --- one loaded release ----------------------------------------------------------
@dataclass
class Runtime:
    """Everything loaded for one release; replaced as a whole by a reload."""

    release: Release
    tiers: dict[str, ModelTier]
    baseline: RuleBaseline | None
    features: FeatureSource | None
    router: Router
    problems: list[str] = field(default_factory=list)
    features_fault: Fault | None = None
    loaded_at: str = field(default_factory=lambda: iso_ms(int(time.time() * 1000)))

    @classmethod
    def load(
        cls,
        release: Release,
        model_path: Callable[[str], Path],
        features: FeatureSource | None = None,
    ) -> Runtime:
        """Load every tier of ``release``; ``model_path`` maps a BentoML tag to its folder.

        A tier that fails its hash check or cannot be loaded is refused and listed in
        ``problems``; the release still serves with the tiers that loaded.
        """
        problems: list[str] = []
        tiers: dict[str, ModelTier] = {}
        for role, ref in release.tiers().items():
            try:
                folder = model_path(ref.tag)
            except Exception as exc:
                tiers[role] = ModelTier(role, ref, None, refused=redact_paths(f"not found: {exc}"))
            else:
                tiers[role] = load_tier(role, ref, folder)
            if tiers[role].refused:
                problems.append(f"{role} ({ref.tag}): {tiers[role].refused}")
            elif (tiers[role].compiled_note or "").startswith("compiled library refused"):
                problems.append(f"{role} ({ref.tag}): {tiers[role].compiled_note}")
        baseline = None
        try:
            folder = model_path(release.baseline.tag)
            check_file(
                folder / release.baseline.file,
                release.baseline.md5,
                release.baseline.sha256,
                "rule baseline",
            )
            baseline = RuleBaseline.load(folder / release.baseline.file)
        except Exception as exc:
            logger.error("refusing rule baseline: %s", exc)
            problems.append(redact_paths(f"baseline: {type(exc).__name__}: {exc}"))
        if features is None:
            try:
                features = SnapshotFeatureSource.open(
                    model_path(release.feature_source.tag), release.feature_source
                )
            except Exception as exc:
                logger.error("feature source unavailable: %s", exc)
                problems.append(
                    redact_paths(
                        f"features ({release.feature_source.tag}): {type(exc).__name__}: {exc}"
                    )
                )
            # The online store when the release or CTR_FEATURE_STORE_URL names one, the
            # snapshot as its fallback (pipelines.serving.store_source).
            features = feature_source_for(release, features, problems)
        search.warm_up()  # compiled (or read from numba's cache) before any request waits
        times.warm_up()
        keys.warm_up()
        answers.warm_up()
        policy = release.policy
        router = Router(
            policy.routing, policy.candidate_share, policy.shadow_sample_rate, policy.routing_salt
        )
        return cls(release, tiers, baseline, features, router, problems)

    def unservable(self) -> str | None:
        """Why this release could not answer any request (no model tier and no baseline).

        A reload to such a release is refused and the running one keeps serving:
        swapping it in would turn every valid request into a 503.
        """
        if self.baseline is not None or any(t.model is not None for t in self.tiers.values()):
            return None
        return "no tier of the release can answer: " + "; ".join(self.problems)

    def lookup(
        self,
        users: list[str],
        items: list[str],
        surfaces: list[str],
        devices: list[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        if self.features is None:
            raise FeatureStoreUnavailable("no feature source loaded")
        if self.features_fault is not None:
            self.features_fault.apply("feature source")
        n = len(users)  # one user and surface (a rank call): list.count, not a set of keys
        if n > 1 and users.count(users[0]) == n and surfaces.count(surfaces[0]) == n:
            one_user = getattr(self.features, "lookup_one_user", None)
            if one_user is not None and len(set(devices)) == 1 and len(set(t_ms.tolist())) == 1:
                batch: FeatureBatch = one_user(
                    users[0], items, surfaces[0], devices[0], int(t_ms[0])
                )
                return batch
        return self.features.lookup(users, items, surfaces, devices, t_ms)


_ROLE_ROUTE = {"prod": "prod", "previous": "fallback"}


@dataclass
class Scored:
    """What the request path decided for each row of one call."""

    call_id: str
    request_ids: list[str]
    prob: np.ndarray
    routes: list[str]
    models: list[str]
    runtimes: list[str]
    reasons: list[str | None]
    age: np.ndarray
    fresh: np.ndarray


class NoTierAvailable(RuntimeError):
    """Every tier, the baseline included, is unavailable: the only case that is not answered."""


class Predictor:
    """Routes, scores with fallbacks, logs; shared by the HTTP service and the tests.

    With a ``state_dir`` the worker joins its pod (``pod.py``); ``loaded_at_reload`` is the
    pod's reload generation read before ``runtime`` was loaded, so a reload recorded
    meanwhile is followed rather than missed.
    """

    def __init__(
        self,
        runtime: Runtime,
        request_log: RequestLog | None = None,
        state_dir: Path | None = None,
        background_queue_size: int = 1000,
        reloader: Callable[[], Runtime] | None = None,
        loaded_at_reload: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.request_log = request_log
        self.state_dir = state_dir
        self.reloader = reloader
        self.counters: dict[str, Any] = {
            "requests": 0,
            "rows": 0,
            "degraded_rows": 0,
            "routes": {},
            "degraded_reasons": {},
            "background_scored_rows": 0,
            "background_skipped_rows": 0,
            "unanswered_rows": 0,
            "shed_rows": {},
        }
        self._lock = threading.Lock()
        self._pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="model")
        self._background: queue.Queue[Any] = queue.Queue(maxsize=background_queue_size)
        self._bg_thread = threading.Thread(
            target=self._background_loop, name="background-scorer", daemon=True
        )
        self._bg_thread.start()
        self.pod: Pod | None = None
        self._reload_generation = 0
        if state_dir is not None:
            self.pod = Pod(state_dir, self._apply_pod_state, report=self.worker_report)
            # ``runtime`` is the current release unless a reload was recorded after the
            # caller read ``loaded_at_reload`` and before this worker followed the pod
            if loaded_at_reload is None:
                loaded_at_reload = self.pod.read().reload_generation
            self._reload_generation = loaded_at_reload
            self.pod.start()

    # --- the request path ------------------------------------------------------
    def keeps_gil(self, rows: int) -> bool:
        """Whether a call of ``rows`` rows keeps the GIL from start to end: the searches and
        the trees keep it under ``search.RELEASE_GIL_QUERIES`` rows, the features come from
        the packaged snapshot (no store round trip) and every tier is compiled with no fault
        (no wait on a helper thread)."""
        rt = self.runtime
        return (
            rows < search.RELEASE_GIL_QUERIES
            and rt.features_fault is None
            and isinstance(rt.features, SnapshotFeatureSource)
            and all(t.runs_on_caller for t in rt.tiers.values())
        )

    def predict(
        self,
        requests: Sequence[PredictRequest],
        endpoint: str = "predict",
        inflight: int | None = None,
    ) -> list[PredictResponse]:
        """Answer every (validated) request; see the module docstring for the chain."""
        # model_construct: the values are built by _answers and already valid;
        # validating them again per row would cost more than scoring the row.
        return [
            PredictResponse.model_construct(**a)
            for a in self._answers(self._rows(RequestRows.of(requests), endpoint, inflight))
        ]

    def predict_json(
        self,
        rows: RequestRows,
        endpoint: str = "predict_batch",
        inflight: int | None = None,
    ) -> bytes:
        """The same answers as ``predict`` for rows read as columns, encoded as a JSON array
        (batch endpoint: no pydantic object per row on the way in or out)."""
        return self._answers_json(self._rows(rows, endpoint, inflight))

    def predict_columns_json(
        self,
        columns: ColumnsRequest,
        endpoint: str = "predict_columns",
        inflight: int | None = None,
    ) -> bytes:
        """The answers of ``predict`` for rows given as columns, as JSON columns (no object
        per row on the way in or out)."""
        n, timed = len(columns.user), columns.timestamp_ms is not None
        rows = RequestRows(
            columns.user,
            columns.item,
            cast(list[str], columns.surface),
            cast(list[str], columns.device),
            np.array(columns.timestamp_ms, dtype=np.int64) if timed else np.zeros(n, np.int64),
            np.full(n, timed),
        )
        return orjson.dumps(self._answer_columns(self._rows(rows, endpoint, inflight)))

    def rank_json(self, request: RankRequest, inflight: int | None = None) -> bytes:
        """One user's candidate items scored and sorted by probability (highest first), as
        JSON. The user's features are computed once for the call; every item is one row of
        the request log (endpoint ``rank``)."""
        n = len(request.items)
        t = int(time.time() * 1000) if request.timestamp is None else epoch_ms(request.timestamp)
        scored = self._score(
            [request.user] * n,
            list(request.items),
            [request.surface] * n,
            [request.device] * n,
            np.full(n, t, dtype=np.int64),
            "rank",
            inflight,
        )
        order = np.argsort(-scored.prob, kind="stable")
        probs = np.round(scored.prob, 6).tolist()
        first = int(order[0])
        labels: tuple[list[Any], ...] = (
            scored.routes,
            scored.models,
            scored.reasons,
            scored.runtimes,
        )
        uniform = all(v.count(v[0]) == n for v in labels)
        ranked = order.tolist()
        names = request.items
        items: list[dict[str, Any]] = [{"item": names[i], "probability": probs[i]} for i in ranked]
        if not uniform:  # rows answered differently: each says how
            for entry, i in zip(items, ranked, strict=True):
                entry.update(
                    route=scored.routes[i],
                    model_version=scored.models[i],
                    runtime=scored.runtimes[i],
                    degraded_reason=scored.reasons[i],
                )
        age = float(np.round(scored.age[first], 3))
        return orjson.dumps(
            {
                "request_id": scored.call_id,
                "user": request.user,
                "surface": request.surface,
                "device": request.device,
                "model_version": scored.models[first],
                "route": scored.routes[first],
                "runtime": scored.runtimes[first],
                "degraded": any(r is not None for r in scored.reasons),
                "degraded_reason": scored.reasons[first],
                "feature_age_seconds": None if age != age else age,
                "features_fresh": bool(scored.fresh.all()),
                "items": items,
            }
        )

    def _rows(self, rows: RequestRows, endpoint: str, inflight: int | None) -> Scored:
        return self._score(
            rows.users,
            rows.items,
            rows.surfaces,
            rows.devices,
            rows.times(int(time.time() * 1000)),
            endpoint,
            inflight,
        )

    @staticmethod
    def _answer_columns(scored: Scored) -> dict[str, list[Any]]:
        """Every answer field as a column, in ``PredictResponse``'s order."""
        return {
            "request_id": scored.request_ids,
            "probability": np.round(scored.prob, 6).tolist(),
            "model_version": scored.models,
            "route": scored.routes,
            "degraded": [why is not None for why in scored.reasons],
            "degraded_reason": scored.reasons,
            "feature_age_seconds": [
                None if a != a else a for a in np.round(scored.age, 3).tolist()
            ],
            "features_fresh": scored.fresh.tolist(),
            "runtime": scored.runtimes,
        }

    @classmethod
    def _answers(cls, scored: Scored) -> list[dict[str, Any]]:
        """The same answers row by row (a dict display per row: half the cost of
        ``dict(zip(names, row))``)."""
        return [
            {
                "request_id": rid,
                "probability": p,
                "model_version": model,
                "route": route,
                "degraded": degraded,
                "degraded_reason": why,
                "feature_age_seconds": age,
                "features_fresh": ok,
                "runtime": runtime,
            }
            for rid, p, model, route, degraded, why, age, ok, runtime in zip(
                *cls._answer_columns(scored).values(), strict=True
            )
        ]

    @classmethod
    def _answers_json(cls, scored: Scored) -> bytes:
        """``orjson.dumps(cls._answers(scored))``, byte for byte. When every row has the same
        labels (the usual case) the rows are assembled by one compiled pass (answers.py)
        from the three per-row columns, each encoded once, and the labels encoded once."""
        n = len(scored.request_ids)
        reasons, fresh = scored.reasons, scored.fresh
        labels: tuple[list[Any], ...] = (scored.models, scored.routes, reasons, scored.runtimes)
        if n == 0 or any(v.count(v[0]) != n for v in labels) or 0 < fresh.sum() < n:
            return orjson.dumps(cls._answers(scored))
        per_row = {
            "request_id": scored.request_ids,
            "probability": np.round(scored.prob, 6),
            "feature_age_seconds": np.round(scored.age, 3),
        }
        shared_values = {
            "model_version": scored.models[0],
            "route": scored.routes[0],
            "degraded": reasons[0] is not None,
            "degraded_reason": reasons[0],
            "features_fresh": bool(fresh[0]),
            "runtime": scored.runtimes[0],
        }
        shared: list[bytes] = []
        columns: list[bytes] = []
        text = b"{"
        for name in _FIELDS:
            text += b'"' + name.encode() + b'":'
            if name in per_row:
                shared.append(text)
                columns.append(answers.column_json(per_row[name]))
                text = b","
            else:
                text += orjson.dumps(shared_values[name]) + b","
        shared.append(text[:-1] + b"}")
        joined = answers.join_rows(shared, columns, n)
        return joined if joined is not None else orjson.dumps(cls._answers(scored))

    def _score(
        self,
        users: list[str],
        items: list[str],
        surfaces: list[str],
        devices: list[str],
        t_ms: np.ndarray,
        endpoint: str,
        inflight: int | None,
    ) -> Scored:
        """Features, shedding, routing, the fallback chain and the log hand-off for rows."""
        started = time.perf_counter()
        rt = self.runtime
        policy = rt.release.policy
        n = len(users)
        call_id = f"{_CALL_IDS.getrandbits(64):016x}"
        request_ids = [call_id] if n == 1 else [call_id + tail for tail in _row_tails(n)]

        prob = np.full(n, np.nan)
        routes: list[str] = ["baseline"] * n
        models: list[str] = ["rule-baseline"] * n
        runtimes: list[str] = ["rule"] * n
        reasons: list[str | None] = [None] * n
        codes: list[str | None] = [None] * n
        scores: dict[str, np.ndarray] = {}

        # Overload: rows of surfaces shed now skip features and models (baseline answers).
        shed = shed_reasons(policy, inflight, surfaces)
        live = np.ones(n, dtype=bool)
        if shed:
            for i, surface in enumerate(surfaces):
                why = shed.get(surface)
                if why is not None:
                    live[i] = False
                    codes[i], reasons[i] = "shed_overload", why
        keep = np.flatnonzero(live)
        # At most one other call in the worker: the other core is mostly idle (that call waits
        # for the network, the GIL or this one), so the searches and trees may use it.
        spare = inflight is not None and inflight <= 2
        X: np.ndarray | None = None
        age = np.full(n, np.nan)
        fresh = np.zeros(n, dtype=bool)
        feature_note: str | None = None
        if len(keep):
            try:
                with search.spare_core(spare):
                    if len(keep) == n:
                        batch = rt.lookup(users, items, surfaces, devices, t_ms)
                        X = batch.X
                        as_of = batch.as_of_ms
                    else:
                        batch = rt.lookup(
                            [users[i] for i in keep],
                            [items[i] for i in keep],
                            [surfaces[i] for i in keep],
                            [devices[i] for i in keep],
                            t_ms[keep],
                        )
                        X = np.full((n, batch.X.shape[1]), np.nan)
                        X[keep] = batch.X
                        as_of = np.zeros(n, dtype=np.int64)
                        as_of[keep] = batch.as_of_ms
                feature_note = batch.note
                age[keep] = np.maximum(t_ms[keep] - as_of[keep], 0) / 1000.0
                fresh[keep] = age[keep] <= policy.freshness_sla_seconds
                for i in np.flatnonzero(live & ~fresh).tolist():
                    codes[i] = "features_stale"
                    reasons[i] = (
                        f"features are {age[i]:.0f} s old, over the "
                        f"{policy.freshness_sla_seconds:g} s freshness SLA"
                    )
            except Exception as exc:  # an unavailable store degrades to the baseline, never 5xx
                why = f"feature store unavailable: {type(exc).__name__}: {exc}"
                for i in keep.tolist():
                    codes[i], reasons[i] = "features_unavailable", why

        if X is None and not live.all():  # keep the window's feature columns (profiles)
            X = np.full((n, len(rt.release.feature_source.names)), np.nan)
        candidate = rt.tiers.get("candidate")
        plan = rt.router.plan(
            users, request_ids, candidate is not None and candidate.model is not None
        )
        answered = np.zeros(n, dtype=bool)
        if X is not None:
            with search.spare_core(spare):  # the trees may split too
                for wants_candidate in (True, False):
                    rows = np.flatnonzero(fresh & (plan.candidate == wants_candidate))
                    if len(rows) == 0:
                        continue
                    chain = (
                        ["candidate", "prod", "previous"]
                        if wants_candidate
                        else ["prod", "previous"]
                    )
                    self._score_chain(
                        rt,
                        chain,
                        rows,
                        X,
                        prob,
                        (routes, models, runtimes, reasons, codes),
                        scores,
                        answered,
                    )
        rest = np.flatnonzero(~answered)
        if len(rest):
            if rt.baseline is None:
                self._count_unanswered(len(rest))
                raise NoTierAvailable(
                    "no tier can answer: "
                    + "; ".join(filter(None, (reasons[i] for i in rest[:1])))
                    + f"; rule baseline refused ({'; '.join(rt.problems)})"
                )
            prob[rest] = rt.baseline.predict([items[i] for i in rest], [surfaces[i] for i in rest])
            for i in rest.tolist():
                if reasons[i] is None:
                    codes[i], reasons[i] = "no_model", "no model tier could answer"
        if feature_note is not None:  # a fallback feature source answered: say so on every row
            for j in keep.tolist():
                codes[j] = "features_fallback"
                reasons[j] = feature_note if reasons[j] is None else f"{feature_note}; {reasons[j]}"
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._count(routes, codes, surfaces if shed else None)
        log = LogBatch(
            endpoint=endpoint,
            release_id=rt.release.release_id,
            answered_at=time.time(),
            latency_ms=latency_ms,
            request_ids=request_ids,
            users=users,
            items=items,
            surfaces=surfaces,
            devices=devices,
            t_ms=t_ms,
            probability=prob,
            routes=routes,
            models=models,
            reasons=reasons,
            feature_age=age,
            feature_names=rt.release.feature_source.names,
            features=X,
            scores=scores,
        )
        self._after(rt, log, plan.background & answered, plan.candidate, X)
        return Scored(call_id, request_ids, prob, routes, models, runtimes, reasons, age, fresh)

    def _score_chain(
        self,
        rt: Runtime,
        chain: list[str],
        rows: np.ndarray,
        X: np.ndarray,
        prob: np.ndarray,
        labels: tuple[list[str], list[str], list[str], list[str | None], list[str | None]],
        scores: dict[str, np.ndarray],
        answered: np.ndarray,
    ) -> None:
        routes, models, runtimes, reasons, codes = labels
        policy = rt.release.policy
        budget_s = (policy.latency_budget_ms + policy.batch_row_budget_ms * len(rows)) / 1000.0
        failures: list[tuple[str, str]] = []
        X_rows = X if len(rows) == len(X) else X[rows]  # fancy indexing lets go of the GIL
        for role in chain:
            tier = rt.tiers.get(role)
            if tier is None:
                continue
            why = tier.unavailable(time.monotonic())
            if why is not None:
                failures.append(
                    (f"{role}_{'refused' if tier.model is None else 'breaker_open'}", why)
                )
                continue
            try:
                if tier.runs_on_caller:  # the hop to a helper thread cost more than the call
                    out, runtime = tier.predict(X_rows)
                else:
                    future = self._pool.submit(tier.predict, X_rows)
                    out, runtime = future.result(timeout=budget_s)
            except cf.TimeoutError:
                why = f"{role} model exceeded the {budget_s * 1000:.0f} ms latency budget"
                tier.trip(why, policy.breaker_cooldown_seconds, policy.breaker_failures)
                failures.append((f"{role}_latency_budget", why))
                continue
            except Exception as exc:
                why = f"{role} model error: {type(exc).__name__}: {exc}"
                tier.trip(why, policy.breaker_cooldown_seconds, policy.breaker_failures)
                failures.append((f"{role}_error", why))
                continue
            tier.failures = 0
            prob[rows] = out
            scores.setdefault(role, np.full(len(prob), np.nan))[rows] = out
            route = rt.router.answering_route() if role == "candidate" else _ROLE_ROUTE[role]
            reason = "; ".join(w for _, w in failures) or None
            code = failures[0][0] if failures else None
            label = tier.ref.label
            for column, value in (
                (routes, route),
                (models, label),
                (runtimes, runtime),
                (reasons, reason),
                (codes, code),
            ):
                _fill(column, rows, value)
            answered[rows] = True
            return
        reason = "; ".join(w for _, w in failures) or "no model tier loaded"
        code = failures[0][0] if failures else "no_model"
        _fill(reasons, rows, reason)
        _fill(codes, rows, code)

    def _count(
        self, routes: list[str], codes: list[str | None], surfaces: list[str] | None = None
    ) -> None:
        with self._lock:
            c = self.counters
            c["requests"] += 1
            c["rows"] += len(routes)
            for route, k in _tally(routes).items():
                c["routes"][route] = c["routes"].get(route, 0) + k
            for code, k in _tally(codes).items():
                if code is not None:
                    c["degraded_rows"] += k
                    c["degraded_reasons"][code] = c["degraded_reasons"].get(code, 0) + k
            if surfaces is not None:  # rows shed under overload, per surface
                for code, surface in zip(codes, surfaces, strict=True):
                    if code == "shed_overload":
                        c["shed_rows"][surface] = c["shed_rows"].get(surface, 0) + 1

    def _count_unanswered(self, rows: int) -> None:
        with self._lock:
            self.counters["unanswered_rows"] += rows

    # --- background scoring and logging ------------------------------------------
    def _after(
        self,
        rt: Runtime,
        log: LogBatch,
        background: np.ndarray,
        to_candidate: np.ndarray,
        X: np.ndarray | None,
    ) -> None:
        rows = np.flatnonzero(background)
        if X is not None and len(rows):
            # The other model of each sampled row: the candidate for rows prod answered
            # (shadow, control arm), prod for rows the candidate answered.
            job = (rt, log, rows, to_candidate[rows], X[rows])
            try:
                self._background.put_nowait(job)
                return
            except queue.Full:
                with self._lock:
                    self.counters["background_skipped_rows"] += len(rows)
        if self.request_log is not None:
            self.request_log.submit(log)

    def _background_loop(self) -> None:
        while True:
            job = self._background.get()
            if job is None:
                return
            rt, log, rows, answered_by_candidate, X = job
            try:
                for other_role, mask in (
                    ("candidate", ~answered_by_candidate),
                    ("prod", answered_by_candidate),
                ):
                    tier = rt.tiers.get(other_role)
                    if tier is None or not mask.any() or tier.unavailable(time.monotonic()):
                        continue
                    try:
                        out, _ = tier.predict(X[mask])
                    except Exception as exc:
                        logger.warning("background scoring with %s failed: %s", other_role, exc)
                        continue
                    target = log.scores.setdefault(other_role, np.full(len(log), np.nan))
                    target[rows[mask]] = out
                    with self._lock:
                        self.counters["background_scored_rows"] += int(mask.sum())
            finally:
                if self.request_log is not None:
                    self.request_log.submit(log)

    # --- operations (shared by every worker of the pod through state_dir) ---------
    def reload(self, runtime: Runtime) -> int:
        """Swap in a freshly loaded release (requests in flight finish on the old one)
        and ask the pod's other workers to reload too; returns the pod generation.
        Injected faults end here; the kill switch holds if the release is the same."""
        self.runtime = runtime
        if self.pod is None:
            return 0

        def edit(state: PodState) -> None:
            state.reload_generation += 1
            state.faults = {}  # chaos faults end with a reload, even of the same release
            self._reload_generation = state.reload_generation

        return self.pod.change(edit)

    def set_candidate_share(self, share: float) -> dict[str, Any]:
        """Change the candidate's share of users now (0 = kill switch), pod-wide.

        The override holds for this release, across restarts, until another is loaded.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, got {share}")
        rt = self.runtime
        rt.router.candidate_share = share
        state: dict[str, Any] = {
            "release_id": rt.release.release_id,
            "candidate_share": share,
            "set_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if self.pod is not None:

            def edit(pod: PodState) -> None:
                self._own(pod)
                pod.candidate_share = share

            state["generation"] = self.pod.change(edit)
        return state

    def set_fault(self, target: str, fault: Fault | None) -> int:
        """Inject or clear a fault on a tier or on the feature source (chaos testing), pod-wide;
        clearing a tier's fault also closes its breaker. Returns the pod generation."""
        rt = self.runtime
        if target != "features" and target not in rt.tiers:
            raise KeyError(f"no {target!r} tier in this release (tiers: {sorted(rt.tiers)})")
        _set_fault(rt, target, fault, reset_breaker=fault is None)
        if self.pod is None:
            return 0

        def edit(pod: PodState) -> None:
            self._own(pod)
            pod.faults.pop(target, None)
            if fault is not None:
                pod.faults[target] = vars(fault)

        return self.pod.change(edit)

    def sync(self, generation: int, timeout: float, workers: int = 1) -> dict[str, Any]:
        """Wait until every worker of the pod (``workers`` at least) applied ``generation``:
        who did, who did not."""
        if self.pod is None:
            return verdict([{"pid": os.getpid(), "generation": generation}], generation, 1)[1]
        return self.pod.wait(generation, timeout, workers)

    def _own(self, state: PodState) -> None:
        """Overrides recorded for another release do not carry over to this one."""
        release_id = self.runtime.release.release_id
        if state.release_id != release_id:
            state.release_id, state.candidate_share, state.faults = release_id, None, {}

    def _apply_pod_state(self, state: PodState) -> str | None:
        """Bring this worker in line with the pod: reload if asked, then the overrides."""
        error = None
        if state.reload_generation > self._reload_generation:
            self._reload_generation = state.reload_generation
            if self.reloader is not None:
                try:
                    runtime = self.reloader()
                    why = runtime.unservable()
                    if why is not None:
                        raise RuntimeError(why)
                    self.runtime = runtime
                    logger.warning(
                        "reloaded release %s (pod generation %d)",
                        runtime.release.release_id,
                        state.generation,
                    )
                except Exception as exc:
                    logger.exception("reload failed; still serving the old release")
                    error = f"reload failed, still serving the previous release: {exc}"
        rt = self.runtime
        if state.release_id == rt.release.release_id:
            if state.candidate_share is not None:
                rt.router.candidate_share = state.candidate_share
            for target in ("features", *rt.tiers):
                given = state.faults.get(target)
                _set_fault(rt, target, None if given is None else Fault(**given))
        return error

    def worker_report(self) -> dict[str, Any]:
        """This worker's health, published to the pod: request-log counters and last
        write error, and whether its feature source answers degraded."""
        log = self.request_log
        features = self.runtime.features
        degraded = getattr(features, "degraded_since", None) is not None
        return {
            "request_log": None
            if log is None
            else {
                **log.counters,
                "last_write_error": None
                if log.last_write_error is None
                else redact_paths(log.last_write_error),
            },
            "features_degraded": degraded,
        }

    def metadata(self) -> dict[str, Any]:
        """The release, its lineage, what loaded, and the counters; returned by /metadata."""
        rt = self.runtime
        pod = None if self.pod is None else self.pod.status()
        return {
            "release": rt.release.to_json_dict(),
            "loaded_at": rt.loaded_at,
            "routing": {
                "mode": rt.router.mode,
                "candidate_share": rt.router.candidate_share,
                "background_sample_rate": rt.router.sample_rate,
            },
            "tiers": {role: tier.status() for role, tier in rt.tiers.items()},
            "baseline_loaded": rt.baseline is not None,
            "features": rt.features.status() if rt.features is not None else None,
            "features_fault": None if rt.features_fault is None else vars(rt.features_fault),
            "problems": rt.problems,
            "counters": json.loads(json.dumps(self.counters)),
            "request_log": None if self.request_log is None else dict(self.request_log.counters),
            "request_log_pod": None if pod is None else pod_request_log(pod["workers"]),
            "pid": os.getpid(),
            "pod": pod,
        }

    def close(self) -> None:
        """Finish background scoring, then flush the request log (clean shutdown)."""
        if self.pod is not None:
            self.pod.close()
        self._background.put(None)
        self._bg_thread.join(30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.request_log is not None:
            self.request_log.close()


def pod_request_log(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The request-log counters summed over the workers that published a report, and the
    workers whose last write failed (pid: error)."""
    total: Counter[str] = Counter()
    failing: dict[str, str] = {}
    reported = 0
    for ack in workers:
        log = (ack.get("report") or {}).get("request_log")
        if not isinstance(log, dict):
            continue
        reported += 1
        total.update({k: v for k, v in log.items() if isinstance(v, int)})
        if log.get("last_write_error"):
            failing[str(ack["pid"])] = log["last_write_error"]
    return {"workers_reporting": reported, **total, "failing_workers": failing}


def _set_fault(rt: Runtime, target: str, fault: Fault | None, reset_breaker: bool = False) -> None:
    if target == "features":
        rt.features_fault = fault
        return
    tier = rt.tiers[target]
    if fault is None and (reset_breaker or tier.fault is not None):
        tier.open_until, tier.failures = 0.0, 0
    tier.fault = fault


def _fill(column: list[Any], rows: np.ndarray, value: Any) -> None:
    """Set ``column[i] = value`` for the ``rows`` (in place; all of it in one step)."""
    if len(rows) == len(column):
        column[:] = [value] * len(column)
    else:
        for i in rows.tolist():
            column[i] = value


__all__ = [
    "ArtifactMismatch",
    "Fault",
    "FeatureBatch",
    "FeatureSource",
    "FeatureStoreUnavailable",
    "ModelTier",
    "NoTierAvailable",
    "ColumnsRequest",
    "ColumnsResponse",
    "PredictRequest",
    "PredictResponse",
    "Predictor",
    "RankRequest",
    "RankResponse",
    "InjectedFault",
    "columns_request_model",
    "rank_request_model",
    "Runtime",
    "SnapshotFeatureSource",
    "load_release",
]
