"""Online quality: delayed clicks joined onto served predictions, scored per model and route.

Clicks arrive after the prediction (seconds to many minutes later). A served row
gets a label only once its **label window** has closed: ``label_delay_minutes``
after its ``request_time``. Then the label is 1 if a click with the row's
``request_id`` arrived inside the window, else 0. Rows whose window is still open
at ``as_of`` are ``pending`` and left out, so a fresh window is not scored as if
nobody had clicked. Clicks later than the window count as no click, the same
convention as the offline label (the generator caps click delays at 30 minutes).

The click table (``CLICK_FIELDS``) is whatever the event pipeline delivers,
keyed by the request id the service returned with the prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.settings import QualitySettings
from pipelines.modeling.evaluation import score

CLICK_FIELDS: dict[str, str] = {
    "request_id": "the request id the service returned with the prediction",
    "click_ts": "UTC time of the click",
}


def read_clicks(path: Path) -> pd.DataFrame:
    """Clicks from a parquet file or a folder of parquet files (``CLICK_FIELDS``)."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(
            f"no click files at {path}; write parquet files with columns {list(CLICK_FIELDS)} "
            "there (or pass --clicks)"
        )
    clicks = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return check_clicks(clicks, str(path))


def check_clicks(clicks: pd.DataFrame, where: str = "clicks") -> pd.DataFrame:
    """Validate and type a click table; the error names the missing columns."""
    missing = [c for c in CLICK_FIELDS if c not in clicks.columns]
    if missing:
        raise ValueError(
            f"{where} lacks column(s) {missing}; a click table needs {list(CLICK_FIELDS)}"
        )
    out = clicks[list(CLICK_FIELDS)].copy()
    out["request_id"] = out["request_id"].astype(str)
    out["click_ts"] = pd.to_datetime(out["click_ts"], utc=True)
    return out.dropna(subset=["click_ts"])


def clicks_from_events(events: pd.DataFrame) -> pd.DataFrame:
    """The click table of generated/raw events whose ``event_id`` served as request id."""
    clicked = events[events["clicked"] == 1]
    return pd.DataFrame(
        {"request_id": clicked["event_id"].astype(str).to_numpy(), "click_ts": clicked["click_ts"]}
    ).reset_index(drop=True)


def join_labels(
    log: pd.DataFrame,
    clicks: pd.DataFrame,
    label_delay_minutes: float,
    as_of: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """``log`` plus ``label`` (0/1, NaN while pending) and ``label_status`` (labelled/pending).

    ``as_of`` is the time the labels are known up to (default: the latest click
    or request time seen). Duplicate clicks on one request count once.
    """
    clicks = check_clicks(clicks)
    delay = pd.Timedelta(minutes=label_delay_minutes)
    if as_of is None:
        candidates = [log["request_time"].max()]
        if len(clicks):
            candidates.append(clicks["click_ts"].max())
        as_of = max(candidates)
    as_of = pd.Timestamp(as_of)
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of
    first = clicks.groupby("request_id", sort=False)["click_ts"].min()
    out = log.copy()
    click_ts = out["request_id"].astype(str).map(first)
    out["click_ts"] = pd.to_datetime(click_ts, utc=True)
    closed = (out["request_time"] + delay) <= as_of
    in_window = (
        out["click_ts"].notna()
        & (out["click_ts"] >= out["request_time"])
        & (out["click_ts"] <= out["request_time"] + delay)
    )
    out["label"] = np.where(closed, in_window.astype(float), np.nan)
    out["label_status"] = np.where(closed, "labelled", "pending")
    return out


def online_quality(
    joined: pd.DataFrame, by: tuple[str, ...] = ("model", "route"), n_bins: int = 10
) -> pd.DataFrame:
    """AUC, log loss, calibration error (and more) per group of labelled rows.

    Groups are the served model version and route by default; rows still pending
    are left out and counted in ``pending``.
    """
    rows = []
    for key, part in joined.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        labelled = part[part["label_status"] == "labelled"]
        y = labelled["label"].to_numpy(dtype=np.int64)
        p = np.clip(labelled["probability"].to_numpy(dtype=np.float64), 1e-6, 1 - 1e-6)
        metrics = score(y, p, n_bins) if len(y) else {"n": 0}
        rows.append(
            {
                **dict(zip(by, key, strict=True)),
                "labelled": int(len(labelled)),
                "pending": int(len(part) - len(labelled)),
                **{k: v for k, v in metrics.items() if k != "n"},
            }
        )
    return pd.DataFrame(rows)


def quality_timeline(
    joined: pd.DataFrame, freq: str, by: tuple[str, ...] = ("model",), n_bins: int = 10
) -> pd.DataFrame:
    """``online_quality`` per ``freq`` window of request time (for the report's timelines)."""
    frames = []
    labelled = joined[joined["label_status"] == "labelled"]
    if labelled.empty:
        return pd.DataFrame()
    for start, part in labelled.groupby(labelled["request_time"].dt.floor(freq), sort=True):
        table = online_quality(part, by, n_bins)
        table.insert(0, "window", start)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Standard error of an AUC estimate (Hanley and McNeil, 1982)."""
    if n_positive < 1 or n_negative < 1 or not np.isfinite(auc):
        return float("inf")
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    var = (
        auc * (1 - auc) + (n_positive - 1) * (q1 - auc**2) + (n_negative - 1) * (q2 - auc**2)
    ) / (n_positive * n_negative)
    return float(np.sqrt(max(var, 0.0)))


def quality_breaches(
    quality: pd.DataFrame, policy: QualitySettings, reference_auc: float | None
) -> list[dict[str, Any]]:
    """Groups with enough labels whose AUC fell too far below offline, or calibration broke.

    "Too far" is the larger of ``max_auc_drop`` and ``confidence_z`` standard errors of
    the online AUC, so a small labelled window does not breach by chance.
    """
    out: list[dict[str, Any]] = []
    for row in quality.to_dict("records"):
        if row.get("labelled", 0) < policy.min_labels or "auc" not in row:
            continue
        group = {k: row[k] for k in ("model", "route") if k in row}
        auc = row.get("auc")
        if reference_auc is not None and auc == auc:
            positives = int(round(row["click_rate"] * row["labelled"]))
            se = auc_standard_error(auc, positives, row["labelled"] - positives)
            limit = reference_auc - max(policy.max_auc_drop, policy.confidence_z * se)
            if auc < limit:
                out.append(
                    {
                        **group,
                        "signal": "online_auc",
                        "value": auc,
                        "limit": round(limit, 6),
                        "reference_auc": reference_auc,
                        "labelled": row["labelled"],
                    }
                )
        ece = row.get("calibration_error")
        if ece is not None and ece == ece and ece > policy.max_calibration_error:
            out.append(
                {
                    **group,
                    "signal": "online_calibration_error",
                    "value": ece,
                    "limit": policy.max_calibration_error,
                    "click_rate": row.get("click_rate"),
                    "mean_prediction": row.get("mean_prediction"),
                    "labelled": row["labelled"],
                }
            )
    return out
