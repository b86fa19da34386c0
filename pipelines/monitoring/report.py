"""Inputs and figures of the drift report notebook (``monitors/drift_report.ipynb``).

The notebook stays thin: it calls ``load_inputs`` and the ``plot_*`` functions
here, which return matplotlib figures, and ``render`` runs it with papermill
(``pipelines.stages.runner``) into ``monitor.report_out`` plus its HTML rendering.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.monitoring.drift import DriftReport
from pipelines.monitoring.monitor import MonitorConfig
from pipelines.monitoring.requests import RequestLogError, normalize_request_log, read_request_log


def load_log(
    cfg: MonitorConfig,
    log_dir: str = "",
    log_file: str = "",
    since: str = "",
    until: str = "",
    last: str = "",
) -> tuple[pd.DataFrame, str]:
    """A normalized request log from a parquet/JSONL file or a shard folder (default: params),
    cut to ``since``/``until`` and then to its ``last`` span (e.g. ``1D``; empty: all)."""
    from pipelines.monitoring.requests import latest, select_window

    if log_file:
        path = cfg.root / log_file
        if not path.is_file():
            raise RequestLogError(f"request log file {path} does not exist")
        if path.suffix == ".parquet":
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_json(path, lines=True, dtype=False)
        log = normalize_request_log(raw, where=str(path))
        source = str(path)
    else:
        folder = cfg.root / log_dir if log_dir else cfg.request_log_dir
        log = read_request_log(folder)
        source = str(folder)
    log = select_window(
        log, pd.Timestamp(since) if since else None, pd.Timestamp(until) if until else None
    )
    log = latest(log, last)
    if log.empty:
        raise RequestLogError(
            f"no request-log rows in {source} between {since or '-'} and {until or '-'}"
        )
    return log, source


def load_clicks(cfg: MonitorConfig, clicks_path: str = "") -> pd.DataFrame | None:
    """Clicks from ``clicks_path`` (default ``monitor.clicks_path``); None when there are none."""
    from pipelines.monitoring.quality import read_clicks

    path = cfg.root / clicks_path if clicks_path else cfg.clicks_path
    if not path.exists():
        return None
    try:
        return read_clicks(path)
    except FileNotFoundError:
        return None


def plot_histograms(report: DriftReport, max_columns: int = 24, per_row: int = 4) -> Any:
    """Reference-vs-live bin masses for each compared column, drifted first."""
    import matplotlib.pyplot as plt

    cols = sorted(
        (c for c in report.columns if c.bins), key=lambda c: (not c.drifted, -(c.psi or 0.0))
    )[:max_columns]
    if not cols:
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.text(0.5, 0.5, "no column had enough live rows", ha="center")
        ax.axis("off")
        return fig
    rows = math.ceil(len(cols) / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(4.2 * per_row, 2.8 * rows), squeeze=False)
    for ax, col in zip(axes.flat, cols, strict=False):
        n = len(col.bins["labels"])
        xs = range(n)
        ax.bar([x - 0.2 for x in xs], col.bins["reference"], width=0.4, label="reference")
        ax.bar([x + 0.2 for x in xs], col.bins["live"], width=0.4, label="live")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(col.bins["labels"], rotation=60, ha="right", fontsize=6)
        flag = "DRIFT " if col.drifted else ""
        ax.set_title(
            f"{flag}{col.column}\nPSI {col.psi:.4f} (limit {col.threshold:.4f})",
            fontsize=8,
            color="tab:red" if col.drifted else "black",
        )
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_signal_timelines(timeline: pd.DataFrame, limits: dict[str, float]) -> Any:
    """Fallback rate, stale share, feature age p95 and latency p50/p95 per window."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.2))
    panels = [
        ("fallback_rate", ["fallback_rate", "degraded_rate"], "share of rows"),
        ("stale_share", ["stale_share"], "share of rows"),
        ("feature_age", ["feature_age_p50_s", "feature_age_p95_s"], "seconds"),
        ("latency", ["latency_p50_ms", "latency_p95_ms"], "ms"),
    ]
    for ax, (name, series, unit) in zip(axes, panels, strict=True):
        for s in series:
            if s in timeline.columns:
                ax.plot(timeline["window"], timeline[s], marker=".", label=s)
        limit = limits.get(name)
        if limit is not None:
            ax.axhline(limit, color="tab:red", linestyle="--", linewidth=1, label="limit")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_quality_timeline(timeline: pd.DataFrame) -> Any:
    """Online AUC, log loss and calibration error per window and model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2))
    if timeline.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no labelled rows yet", ha="center")
            ax.axis("off")
        return fig
    for ax, metric in zip(axes, ("auc", "log_loss", "calibration_error"), strict=True):
        if metric in timeline.columns:
            for model, part in timeline.groupby("model"):
                ax.plot(part["window"], part[metric], marker=".", label=str(model))
        ax.set_title(f"online {metric.replace('_', ' ')}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def render(
    cfg: MonitorConfig,
    parameters: dict[str, Any],
    output: Path | None = None,
) -> Path:
    """Execute the report notebook with papermill and render it to HTML; returns the .ipynb path."""
    from pipelines.stages.runner import run_notebook

    if not cfg.report_notebook.is_file():
        raise FileNotFoundError(f"report notebook {cfg.report_notebook} is missing; restore it")
    output = output or cfg.report_out
    run_notebook(cfg.report_notebook, output, parameters, cfg.root)
    return output
