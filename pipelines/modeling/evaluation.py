"""The ``evaluate`` stage: metrics (overall and per surface), curves for ``dvc plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pipelines.core.domain import SURFACES


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Weighted mean |observed rate - mean prediction| over equal-count bins of p."""
    order = np.argsort(p, kind="stable")
    bins = np.array_split(order, n_bins)
    total = len(p)
    return float(sum(len(b) / total * abs(y[b].mean() - p[b].mean()) for b in bins if len(b)))


def score(y: np.ndarray, p: np.ndarray, n_bins: int) -> dict[str, float]:
    """AUC, log loss, Brier, average precision and calibration error for one slice."""
    if len(np.unique(y)) < 2:
        return {"n": int(len(y)), "click_rate": float(np.mean(y)) if len(y) else float("nan")}
    return {
        "n": int(len(y)),
        "click_rate": round(float(y.mean()), 6),
        "mean_prediction": round(float(p.mean()), 6),
        "auc": round(float(roc_auc_score(y, p)), 6),
        "log_loss": round(float(log_loss(y, p, labels=[0, 1])), 6),
        "brier": round(float(brier_score_loss(y, p)), 6),
        "average_precision": round(float(average_precision_score(y, p)), 6),
        "calibration_error": round(expected_calibration_error(y, p, n_bins), 6),
    }


def evaluate(
    y: np.ndarray, p: np.ndarray, surface: np.ndarray, p_baseline: np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """The metrics document written to ``metrics.json`` (read by dvc metrics and the gates)."""
    overall = score(y, p, n_bins)
    base = score(y, p_baseline, n_bins)
    return {
        **overall,
        "per_surface": {s: score(y[surface == s], p[surface == s], n_bins) for s in SURFACES},
        "baseline": {k: base[k] for k in ("auc", "log_loss", "calibration_error") if k in base},
        "auc_lift_over_baseline": round(overall.get("auc", 0.0) - base.get("auc", 0.0), 6),
    }


def _thin(frame: pd.DataFrame, max_points: int = 200) -> pd.DataFrame:
    if len(frame) <= max_points:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, max_points).round().astype(int))
    return frame.iloc[keep]


def curves(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, pd.DataFrame]:
    """ROC, precision-recall and calibration curves, thinned to <= 200 points each."""
    fpr, tpr, _ = roc_curve(y, p)
    precision, recall, _ = precision_recall_curve(y, p)
    order = np.argsort(p, kind="stable")
    calib = pd.DataFrame(
        [
            {
                "mean_predicted": float(p[b].mean()),
                "fraction_clicked": float(y[b].mean()),
                "n": len(b),
            }
            for b in np.array_split(order, n_bins)
            if len(b)
        ]
    )
    return {
        "roc": _thin(pd.DataFrame({"fpr": fpr, "tpr": tpr})).round(6),
        "precision_recall": _thin(
            pd.DataFrame({"recall": recall, "precision": precision}).iloc[::-1]
        ).round(6),
        "calibration": calib.round(6),
    }


def write_plots(plots: dict[str, pd.DataFrame], plots_dir: Path) -> None:
    """Write each curve as CSV (the format ``dvc plots`` reads), atomically per file."""
    from pipelines.core.io import atomic_path

    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in plots.items():
        with atomic_path(plots_dir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
