"""What ``mlops monitor drift`` prints: the drift table first, then verdicts, signals, actions.

Alert payloads are not printed here: they go to the alert log (``route_alert_log``)
and the webhook; the console shows one line per alert with its delivery status.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd

TABLE_COLUMNS = (
    "column",
    "role",
    "status",
    "reasons",
    "psi",
    "threshold",
    "between_windows",
    "null_rate_live",
    "n_live",
)


def format_result(result: Any, source: str, rows: int) -> str:
    """The console report of one ``MonitorResult`` (plain text, table first)."""
    report = result.drift
    s = report.summary()
    lines = [
        f"== drift: {rows:,} requests from {source}, {s['window'].get('start')} .. "
        f"{s['window'].get('end')} (reference blocks {s['reference_blocks']})"
    ]
    table = report.table()
    if not table.empty:
        cols = [c for c in TABLE_COLUMNS if c in table.columns]
        shown = table[cols].copy()
        for c in ("psi", "threshold", "between_windows", "null_rate_live"):
            shown[c] = shown[c].map(lambda v: "" if v is None or pd.isna(v) else f"{v:.5f}")
        with pd.option_context("display.width", 200, "display.max_rows", 200):
            lines.append(shown.to_string(index=False))
    notes = [(c.column, c.note) for c in report.columns if c.note]
    for column, note in notes:
        lines.append(f"  {column}: {note}")
    for column, why in s["not_monitored"].items():
        lines.append(f"  {column}: not monitored ({why})")
    lines.append(
        f"distribution drift in {len(s['drifted_columns'])} of {s['columns_compared']} columns "
        f"(share {s['drift_share']:.0%}; dataset drift: {s['dataset_drift']}; "
        f"prediction drift: {s['prediction_drift']}); data problems: "
        + (
            ", ".join(f"{c} ({'/'.join(r)})" for c, r in s["data_problems"].items())
            if s["data_problems"]
            else "none"
        )
    )
    lines.append(
        "training-serving skew (value parity) is not part of this check: "
        "`mlops monitor report --events EVENTS` recomputes served rows offline"
    )
    sig = result.signals
    if sig.get("rows"):
        lines.append(
            f"signals: fallback {sig['fallback_rate']:.2%} | stale features "
            f"{sig['stale_share']:.2%} | latency p95 {sig['latency_p95_ms']} ms | "
            f"feature age p95 {sig['feature_age_p95_s']} s"
        )
    for b in result.signal_breaches:
        lines.append(f"BREACH signal {b['signal']}: {b['value']} > {b['limit']}")
    if result.quality is not None and not result.quality.empty:
        wanted = ("model", "route", "labelled", "pending", "auc", "log_loss", "calibration_error")
        cols = [c for c in wanted if c in result.quality.columns]
        lines.append("online quality:\n" + result.quality[cols].round(4).to_string(index=False))
    for b in result.quality_breaches:
        lines.append(
            f"BREACH {b['signal']} {b.get('model')}/{b.get('route')}: {b['value']} vs {b['limit']}"
        )
    for a in result.alerts:
        lines.append(f"alert {a['key']} ({a['severity']}): {a['status']}")
    if result.trigger:
        lines.append(f"retraining trigger: {result.trigger}")
    if result.retraining:
        r = result.retraining
        lines.append(f"retraining: {r['command']} {r['status']} in {r['seconds']} s")
    return "\n".join(lines)


def route_alert_log(path: Path | None, echo: bool = False) -> None:
    """Send the ``mlops.alerts`` JSON lines to ``path`` (appended), and to stderr if ``echo``.

    Failed deliveries (errors) always reach stderr as well, so an operator sees them.
    """
    logger = logging.getLogger("mlops.alerts")
    for handler in list(logger.handlers):
        if getattr(handler, "_mlops_alert_route", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if echo else logging.ERROR)
    handlers.append(stderr)
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler._mlops_alert_route = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
