"""The request log as monitors read it: schema, reader, live profiles per window, serving signals.

Details: docs/monitoring.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.settings import SignalSettings

# What one request-log row holds once the service's reader has expanded a shard line.
REQUEST_LOG_FIELDS: dict[str, str] = {
    "request_id": "unique id of the answered row; delayed clicks are joined on it",
    "answered_at": "ISO-8601 UTC time the service answered",
    "endpoint": "predict, predict_batch, predict_columns or rank",
    "release_id": "id of the release that answered",
    "user": "user id of the request",
    "item": "item id of the request",
    "surface": "feed | search | recs",
    "device": "mobile | desktop | tablet",
    "request_time": "ISO-8601 UTC time the request is about (features are computed at it)",
    "route": "prod | canary | ab-variant | fallback | baseline",
    "model": "version of the model that answered (registry version when known) or rule-baseline",
    "probability": "the click probability returned",
    "degraded": "true when a fallback tier answered or features were stale/unavailable",
    "degraded_reason": "why the answer is degraded (null when it is not)",
    "latency_ms": "time the predictor spent on the call that produced this row",
    "feature_age_seconds": "age of the online features at request time (null: unavailable)",
    "features": "object {feature name: served value}, null when features were unavailable",
    "scores": "object {tier role: output} for every model that scored the row (shadow included)",
}
REQUIRED_FIELDS: tuple[str, ...] = (
    "request_id",
    "request_time",
    "surface",
    "device",
    "route",
    "model",
    "probability",
    "latency_ms",
)
MODEL_ROUTES: tuple[str, ...] = ("prod", "canary", "ab-variant", "fallback")
CANDIDATE_ROUTES: tuple[str, ...] = ("canary", "ab-variant")
FALLBACK_ROUTES: tuple[str, ...] = ("fallback", "baseline")


class RequestLogError(ValueError):
    """The request log is missing, empty or malformed; the message says where and what to do."""


@dataclass
class LogReadStats:
    """What ``read_request_log`` saw: shards and rows."""

    shards: int = 0
    rows: int = 0


def read_request_log(
    log_dir: Path,
    since: pd.Timestamp | None = None,
    until: pd.Timestamp | None = None,
    stats: LogReadStats | None = None,
) -> pd.DataFrame:
    """Read every ``requests-*.jsonl`` shard in ``log_dir`` and normalize the rows.

    Parsing is the service's own (``pipelines.serving.request_log.read_shards``: one JSON
    line of columns per answered batch; a partial last line left by a crash is
    skipped), so the format is defined in one place. ``since``/``until`` keep rows
    with ``since <= request_time < until``.
    """
    from pipelines.serving.request_log import read_shards

    stats = stats if stats is not None else LogReadStats()
    if not log_dir.is_dir():
        raise RequestLogError(
            f"request log folder {log_dir} does not exist: no traffic has been logged yet. "
            "Serve the bento (make serve) or write a log without a service "
            "(mlops monitor replay --last-days 1), or point --log-dir (or "
            "serving.request_log_dir in params.yaml) at the folder the service writes"
        )
    shards = sorted(log_dir.glob("requests-*.jsonl"))
    stats.shards = len(shards)
    try:
        raw = read_shards(log_dir)
    except (KeyError, IndexError, TypeError) as exc:
        raise RequestLogError(
            f"a shard in {log_dir} is not in the service's request-log format ({type(exc).__name__}"
            f": {exc}); was it written by this service version?"
        ) from exc
    if raw.empty:
        raise RequestLogError(
            f"no request-log rows in {log_dir} ({len(shards)} shard(s) named requests-*.jsonl); "
            "send traffic to the service first or point at the right folder"
        )
    frame = normalize_request_log(raw, where=str(log_dir))
    stats.rows = len(frame)
    return select_window(frame, since, until)


def write_request_log_shard(
    frame: pd.DataFrame, log_dir: Path, name: str = "replay", max_batch: int = 1000
) -> Path:
    """Write a normalized log as one shard in the service's format (replays, tests).

    Rows become ``pipelines.serving.request_log.LogBatch`` lines, so the bytes are exactly what
    the service writes. Consecutive rows with the same endpoint, release and latency
    share a batch (the service logs one latency and answer time per call); the batch's
    answer time is its first row's.
    """
    from pipelines.core.io import atomic_path
    from pipelines.serving.request_log import LogBatch

    names = feature_columns(frame)
    roles = [c[6:] for c in frame.columns if c.startswith("score_")]
    key = frame[["endpoint", "release_id", "latency_ms"]].astype(str).agg("|".join, axis=1)
    run_id = (key != key.shift()).cumsum().to_numpy()
    lines: list[bytes] = []
    start = 0
    while start < len(frame):
        stop = start + 1
        while stop < len(frame) and stop - start < max_batch and run_id[stop] == run_id[start]:
            stop += 1
        part = frame.iloc[start:stop]
        first = part.iloc[0]
        X = part[names].to_numpy(np.float64) if names else None
        has_features = X is not None and not np.isnan(X).all()
        reasons = [None if _isnan(r) else str(r) for r in part["degraded_reason"]]
        lines.append(
            LogBatch(
                endpoint=str(first["endpoint"]),
                release_id=str(first["release_id"]),
                answered_at=pd.Timestamp(first["answered_at"]).timestamp(),
                latency_ms=float(first["latency_ms"]),
                request_ids=part["request_id"].astype(str).tolist(),
                users=part["user"].astype(str).tolist(),
                items=part["item"].astype(str).tolist(),
                surfaces=part["surface"].astype(str).tolist(),
                devices=part["device"].astype(str).tolist(),
                t_ms=part["request_time"].dt.as_unit("ms").astype("int64").to_numpy(),
                probability=part["probability"].to_numpy(np.float64),
                routes=part["route"].astype(str).tolist(),
                models=part["model"].astype(str).tolist(),
                reasons=reasons,
                feature_age=part["feature_age_seconds"].to_numpy(np.float64),
                feature_names=names,
                features=X if has_features else None,
                scores={r: part[f"score_{r}"].to_numpy(np.float64) for r in roles},
            ).to_line()
        )
        start = stop
    log_dir.mkdir(parents=True, exist_ok=True)
    target = log_dir / f"requests-{name}.jsonl"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"".join(lines))
    return target


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def normalize_request_log(raw: pd.DataFrame, where: str = "the request log") -> pd.DataFrame:
    """Check the fields, parse times, flatten ``features``/``scores`` (see module docstring)."""
    missing = [c for c in REQUIRED_FIELDS if c not in raw.columns]
    if missing:
        raise RequestLogError(
            f"{where} lacks field(s) {missing}; every row needs {list(REQUIRED_FIELDS)} "
            "(see REQUEST_LOG_FIELDS in pipelines.monitoring.requests). Was it written by this "
            "service "
            "version?"
        )
    frame = raw.copy()
    for col in ("request_time", "answered_at"):
        if col in frame.columns:
            try:
                frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
            except (ValueError, TypeError) as exc:
                raise RequestLogError(
                    f"{where}: field {col!r} has a value that is not an "
                    f"ISO-8601 time ({exc}); fix the writer"
                ) from exc
    if "answered_at" not in frame.columns:
        frame["answered_at"] = frame["request_time"]
    for col, default in (
        ("degraded", False),
        ("degraded_reason", None),
        ("feature_age_seconds", np.nan),
        ("endpoint", "predict"),
        ("release_id", ""),
        ("user", ""),
        ("item", ""),
    ):
        if col not in frame.columns:
            frame[col] = default
    if "features" in frame.columns:
        nested = frame.pop("features")
        flat = pd.DataFrame.from_records(
            [v if isinstance(v, dict) else {} for v in nested], index=frame.index
        )
        frame = pd.concat([frame, _numeric_where_possible(flat)], axis=1)
    if "scores" in frame.columns:
        nested = frame.pop("scores")
        flat = pd.DataFrame.from_records(
            [v if isinstance(v, dict) else {} for v in nested], index=frame.index
        )
        flat.columns = [f"score_{c}" for c in flat.columns]
        frame = pd.concat([frame, flat.astype(np.float64)], axis=1)
    frame["probability"] = pd.to_numeric(frame["probability"], errors="coerce")
    frame["latency_ms"] = pd.to_numeric(frame["latency_ms"], errors="coerce")
    frame["feature_age_seconds"] = pd.to_numeric(frame["feature_age_seconds"], errors="coerce")
    frame["degraded"] = frame["degraded"].fillna(False).astype(bool)
    bad_time = frame["request_time"].isna()
    if bad_time.any():
        raise RequestLogError(
            f"{where}: {int(bad_time.sum())} row(s) have no request_time (e.g. request_id "
            f"{frame.loc[bad_time, 'request_id'].iloc[0]!r}); fix the writer"
        )
    return frame.sort_values("request_time", kind="stable").reset_index(drop=True)


def _numeric_where_possible(flat: pd.DataFrame) -> pd.DataFrame:
    """Feature values as float64; a column holding non-numbers stays as it is (type drift)."""
    out = {}
    for col in flat.columns:
        values = flat[col]
        numbers = pd.to_numeric(values, errors="coerce")
        same = int(numbers.notna().sum()) == int(values.notna().sum())
        out[col] = numbers.astype(np.float64) if same else values.astype(object)
    return pd.DataFrame(out, index=flat.index)


def feature_columns(log: pd.DataFrame) -> list[str]:
    """Columns of a normalized log that hold served feature values."""
    fixed = set(REQUEST_LOG_FIELDS)
    return [c for c in log.columns if c not in fixed and not c.startswith("score_")]


def select_window(
    log: pd.DataFrame, since: pd.Timestamp | None = None, until: pd.Timestamp | None = None
) -> pd.DataFrame:
    """Rows with ``since <= request_time < until`` (either bound optional)."""
    keep = np.ones(len(log), dtype=bool)
    if since is not None:
        keep &= (log["request_time"] >= _utc(since)).to_numpy()
    if until is not None:
        keep &= (log["request_time"] < _utc(until)).to_numpy()
    return log[keep].reset_index(drop=True)


def latest(log: pd.DataFrame, span: str) -> pd.DataFrame:
    """The rows of the last ``span`` (a pandas duration such as ``1D`` or ``6h``) of ``log``,
    ending at its newest request; all rows when ``span`` is empty."""
    if not span or log.empty:
        return log
    try:
        width = pd.Timedelta(span)
    except ValueError as exc:
        raise RequestLogError(
            f"last={span!r} is not a duration; use a pandas duration such as 1D, 6h or 30min"
        ) from exc
    if width <= pd.Timedelta(0):
        raise RequestLogError(f"last={span!r} must be a positive duration (for example 1D)")
    # the rows after newest - width: select_window keeps since <= t
    return select_window(log, log["request_time"].max() - width + pd.Timedelta(1, "ns"))


def _utc(stamp: Any) -> pd.Timestamp:
    ts = pd.Timestamp(stamp)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def live_frame(log: pd.DataFrame, feature_names: list[str] | None = None) -> pd.DataFrame:
    """The columns the reference profile has: request fields, served features, ``prediction``.

    ``prediction`` is the prod model's output: ``score_prod`` when the log has it
    (prod also scores the rows a canary answered in the background), else
    ``probability`` on rows answered by prod; other rows get NaN so baseline and
    candidate answers never count as the prod model's predictions.
    """
    names = feature_names if feature_names is not None else feature_columns(log)
    frame = pd.DataFrame(
        {"surface": log["surface"].astype(str), "device": log["device"].astype(str)}
    )
    for name in names:
        if name not in log.columns:
            frame[name] = np.nan
        elif pd.api.types.is_numeric_dtype(log[name]):
            frame[name] = log[name].to_numpy(np.float64)
        else:  # values that are not numbers: drift reports the type change
            frame[name] = log[name].to_numpy(object)
    prod_answer = np.where(log["route"].to_numpy() == "prod", log["probability"], np.nan)
    if "score_prod" in log.columns:
        score = log["score_prod"].to_numpy(np.float64)
        frame["prediction"] = np.where(np.isnan(score), prod_answer, score)
    else:
        frame["prediction"] = prod_answer
    return frame


def live_profile(log: pd.DataFrame, feature_names: list[str] | None = None) -> Any:
    """whylogs profile of ``live_frame(log)``."""
    from pipelines.core import profiles as wl

    return wl.profile(live_frame(log, feature_names))


def windows(log: pd.DataFrame, freq: str) -> Iterator[tuple[pd.Timestamp, pd.DataFrame]]:
    """(window start, rows) for each non-empty ``freq`` window of ``request_time``."""
    if log.empty:
        return
    starts = log["request_time"].dt.floor(freq)
    for start, part in log.groupby(starts, sort=True):
        yield pd.Timestamp(start), part


def write_window_profiles(
    log: pd.DataFrame, out_dir: Path, freq: str, feature_names: list[str] | None = None
) -> list[Path]:
    """One whylogs profile per window, ``out_dir/window-<UTC start>.bin``; returns the paths."""
    from pipelines.core import profiles as wl

    paths = []
    for start, part in windows(log, freq):
        path = out_dir / f"window-{start.strftime('%Y%m%dT%H%M%S')}.bin"
        wl.write_profile(live_profile(part, feature_names), path)
        paths.append(path)
    return paths


def read_window_profiles(profile_dir: Path) -> Any:
    """Merge every ``*.bin`` profile in ``profile_dir`` (windows or workers) into one."""
    from pipelines.core import profiles as wl

    files = sorted(profile_dir.glob("*.bin"))
    if not files:
        raise RequestLogError(f"no live profiles (*.bin) in {profile_dir}")
    return wl.merge_profiles([wl.read_profile(p) for p in files])


# --- serving signals: fallback rate, freshness, latency ------------------------------------


def reason_code(reason: object) -> str | None:
    """A short code for a degraded reason: features_stale, features_unavailable, <role>_error..."""
    if not isinstance(reason, str) or not reason:
        return None
    text = reason.lower()
    if text.startswith("features are"):
        return "features_stale"
    if text.startswith("feature store"):
        return "features_unavailable"
    for role in ("candidate", "prod", "previous"):
        if text.startswith(role):
            if "latency budget" in text:
                return f"{role}_latency_budget"
            if "refused" in text:
                return f"{role}_refused"
            if "skipped" in text:
                return f"{role}_breaker_open"
            return f"{role}_error"
    return "other"


def serving_signals(log: pd.DataFrame, sla_seconds: float) -> dict[str, Any]:
    """Fallback rate, degraded rate by reason, feature freshness and latency of a window."""
    n = len(log)
    if n == 0:
        return {"rows": 0}
    age = log["feature_age_seconds"].to_numpy(np.float64)
    stale = np.isnan(age) | (age > sla_seconds)
    latency = log["latency_ms"].to_numpy(np.float64)
    codes = log["degraded_reason"].map(reason_code).dropna().value_counts()
    valid_age = age[~np.isnan(age)]
    return {
        "rows": n,
        "fallback_rate": round(float(log["route"].isin(FALLBACK_ROUTES).mean()), 6),
        "baseline_rate": round(float((log["route"] == "baseline").mean()), 6),
        "degraded_rate": round(float(log["degraded"].mean()), 6),
        "degraded_reasons": {str(k): int(v) for k, v in codes.items()},
        "stale_share": round(float(stale.mean()), 6),
        "feature_age_p50_s": _q(valid_age, 0.5),
        "feature_age_p95_s": _q(valid_age, 0.95),
        "latency_p50_ms": _q(latency, 0.5),
        "latency_p95_ms": _q(latency, 0.95),
        "latency_p99_ms": _q(latency, 0.99),
        "routes": {str(k): int(v) for k, v in log["route"].value_counts().items()},
    }


def _q(values: np.ndarray, q: float) -> float | None:
    values = values[~np.isnan(values)]
    return round(float(np.quantile(values, q)), 3) if len(values) else None


def signal_breaches(signals: dict[str, Any], policy: SignalSettings) -> list[dict[str, Any]]:
    """Each signal over its limit, as {signal, value, limit}; none below ``min_rows``."""
    if signals.get("rows", 0) < policy.min_rows:
        return []
    limits = {
        "fallback_rate": policy.max_fallback_rate,
        "stale_share": policy.max_stale_share,
        "latency_p95_ms": policy.max_latency_p95_ms,
    }
    out = []
    for name, limit in limits.items():
        value = signals.get(name)
        if value is not None and value > limit:
            out.append({"signal": name, "value": value, "limit": limit})
    return out


def signal_timeline(log: pd.DataFrame, freq: str, sla_seconds: float) -> pd.DataFrame:
    """Per window: rows, fallback rate, stale share, feature age and latency percentiles."""
    rows = []
    for start, part in windows(log, freq):
        s = serving_signals(part, sla_seconds)
        rows.append(
            {
                "window": start,
                **{k: v for k, v in s.items() if not isinstance(v, dict)},
            }
        )
    return pd.DataFrame(rows)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, numpy scalars and timestamps -> plain JSON values."""
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
