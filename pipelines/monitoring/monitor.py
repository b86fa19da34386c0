"""One monitoring pass over a window of traffic: drift, skew, signals, quality, alerts, trigger.

``MonitorConfig`` resolves the ``monitor`` section of params.yaml against the
project root; ``check`` runs the pass on a normalized request log and returns a
``MonitorResult`` that the CLI prints, the report notebook renders and
``save_result`` writes as JSON (``<out_dir>/latest.json`` plus one file per run).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core import config
from pipelines.core.io import write_json
from pipelines.core.settings import load_settings, settings_from
from pipelines.monitoring.alerts import Alert, AlertSettings, AlertSink
from pipelines.monitoring.canary import CanarySettings
from pipelines.monitoring.drift import DATA_PROBLEMS, DriftReport, DriftSettings, compare_reference
from pipelines.monitoring.quality import (
    QualitySettings,
    join_labels,
    online_quality,
    quality_breaches,
)
from pipelines.monitoring.requests import (
    SignalSettings,
    feature_columns,
    live_frame,
    serving_signals,
    signal_breaches,
    to_jsonable,
)
from pipelines.monitoring.retrain import RetrainSettings, reasons, run_retraining, write_trigger

logger = logging.getLogger("mlops.monitor")


@dataclass
class MonitorConfig:
    """Paths and policies of the monitors, from params.yaml."""

    root: Path
    drift_reference: Path
    request_log_dir: Path
    clicks_path: Path
    out_dir: Path
    live_profile_dir: Path
    window: str
    report_notebook: Path
    report_out: Path
    drift: DriftSettings
    signals: SignalSettings
    quality: QualitySettings
    canary: CanarySettings
    alerts: AlertSettings
    retrain: RetrainSettings
    feature_set: str

    @classmethod
    def load(cls, root: Path | None = None, params: dict[str, Any] | None = None) -> MonitorConfig:
        root = root or config.project_root()
        settings = (
            settings_from(params, root / "params.yaml")
            if params is not None
            else load_settings(root)
        )
        m = settings.monitor
        return cls(
            root=root,
            drift_reference=root / settings.drift_reference,
            request_log_dir=root / settings.serving.request_log_dir,
            clicks_path=root / m.clicks_path,
            out_dir=root / m.out_dir,
            live_profile_dir=root / m.live_profile_dir,
            window=m.window,
            report_notebook=root / m.report_notebook,
            report_out=root / m.report_out,
            drift=m.drift,
            signals=m.signals,
            quality=m.quality,
            canary=m.canary,
            alerts=m.alerts,
            retrain=m.retrain,
            feature_set=settings.features.feature_set,
        )

    @property
    def feature_names(self) -> list[str]:
        from pipelines.features.definitions import FEATURE_SETS

        if self.feature_set not in FEATURE_SETS:
            raise config.ConfigError(
                f"features.feature_set {self.feature_set!r} is not declared; "
                f"known: {sorted(FEATURE_SETS)}"
            )
        return FEATURE_SETS[self.feature_set].names

    def alert_sink(self, webhook_url: str | None = None) -> AlertSink:
        return AlertSink(
            webhook_url if webhook_url is not None else self.alerts.webhook_url,
            self.root / self.alerts.state_db,
            self.alerts.cooldown_minutes,
            self.alerts.timeout_seconds,
        )

    def reference_auc(self) -> float | None:
        """Offline test AUC of the current model (``evaluate`` stage), if present."""
        path = self.root / self.quality.reference_metrics
        if not path.is_file():
            return None
        auc = json.loads(path.read_text()).get("auc")
        return float(auc) if auc is not None else None


@dataclass
class MonitorResult:
    """Everything one monitoring pass found and did."""

    window: dict[str, str | None]
    drift: DriftReport
    signals: dict[str, Any]
    signal_breaches: list[dict[str, Any]]
    quality: pd.DataFrame | None
    quality_breaches: list[dict[str, Any]]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    trigger: str | None = None
    retraining: dict[str, Any] | None = None

    @property
    def breached(self) -> bool:
        return bool(self.drift.drifted or self.signal_breaches or self.quality_breaches)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "window": self.window,
                "breached": self.breached,
                "drift": self.drift.to_dict(),
                "signals": self.signals,
                "signal_breaches": self.signal_breaches,
                "quality": None if self.quality is None else self.quality.to_dict("records"),
                "quality_breaches": self.quality_breaches,
                "alerts": self.alerts,
                "trigger": self.trigger,
                "retraining": self.retraining,
            }
        )


def load_reference(cfg: MonitorConfig) -> dict[str, Any]:
    """The drift reference written by the ``profile`` stage (``drift_reference.json``)."""
    if not cfg.drift_reference.is_file():
        raise FileNotFoundError(
            f"drift reference {cfg.drift_reference} is missing; run `dvc repro profile`"
        )
    reference = json.loads(cfg.drift_reference.read_text())
    if not isinstance(reference, dict) or reference.get("format") != 1:
        raise ValueError(
            f"{cfg.drift_reference} is not a drift reference of format 1; rerun `dvc repro profile`"
        )
    return reference


def drift_report(
    cfg: MonitorConfig,
    log: pd.DataFrame,
    reference: dict[str, Any],
    window: dict[str, str | None] | None = None,
) -> DriftReport:
    """Drift of a normalized request log against the drift reference (every served column).

    Declared features the log does not carry are ``missing_column``; served features
    that are not declared are ``new_column``.
    """
    names = cfg.feature_names
    extra = [c for c in feature_columns(log) if c not in names]
    absent = [n for n in names if n not in log.columns]
    frame = live_frame(log, [*names, *extra]).drop(columns=absent)
    return compare_reference(
        reference, frame, log["request_time"], cfg.drift, names, window, absent
    )


def check(
    cfg: MonitorConfig,
    log: pd.DataFrame,
    clicks: pd.DataFrame | None = None,
    reference: Any | None = None,
    alerts: AlertSink | None = None,
    retrain_run: str | None = None,
    as_of: pd.Timestamp | None = None,
) -> MonitorResult:
    """Run one monitoring pass over ``log`` (a normalized request log for one window).

    Drift and skew compare ``log`` with the reference profile; the serving signals
    and (with ``clicks``) online quality are checked against their limits. Every
    breach becomes an alert when ``alerts`` is given; a breach that calls for
    retraining (``monitor.retrain``) writes a trigger record and, with
    ``retrain_run`` (or ``monitor.retrain.run``) set to repro/exp, runs it.
    """
    reference = reference if reference is not None else load_reference(cfg)
    times = log["request_time"]
    window = {
        "start": times.min().isoformat() if len(log) else None,
        "end": times.max().isoformat() if len(log) else None,
    }
    report = drift_report(cfg, log, reference, window)
    signals = serving_signals(log, cfg.signals.freshness_sla_seconds)
    s_breaches = signal_breaches(signals, cfg.signals)
    quality = None
    q_breaches: list[dict[str, Any]] = []
    if clicks is not None:
        joined = join_labels(log, clicks, cfg.quality.label_delay_minutes, as_of)
        quality = online_quality(joined, ("model", "route"), cfg.quality.calibration_bins)
        q_breaches = quality_breaches(quality, cfg.quality, cfg.reference_auc())
    result = MonitorResult(window, report, signals, s_breaches, quality, q_breaches)

    if alerts is not None:
        for alert in _alerts(result):
            delivery = alerts.emit(alert)
            result.alerts.append(
                {"key": alert.key, "severity": alert.severity, "status": delivery.status}
            )

    why = reasons(report.summary(), q_breaches, cfg.retrain)
    if why:
        evidence = {
            "drift": report.summary(),
            "drift_columns": [
                {k: c.__dict__[k] for k in ("column", "psi", "threshold", "severity")}
                for c in report.distribution_drifted
            ],
            "quality_breaches": q_breaches,
            "signals": signals,
        }
        trigger = write_trigger(cfg.root, cfg.retrain, why, evidence, window)
        result.trigger = str(trigger.relative_to(cfg.root))
        if alerts is not None:
            delivery = alerts.emit(
                Alert(
                    kind="retrain_trigger",
                    key="retrain_trigger",
                    severity="warning",
                    summary="retraining triggered by " + ", ".join(r["kind"] for r in why),
                    evidence={"trigger": result.trigger, "breaches": why},
                )
            )
            result.alerts.append(
                {"key": "retrain_trigger", "severity": "warning", "status": delivery.status}
            )
        mode = retrain_run or cfg.retrain.run
        if mode != "none":
            result.retraining = run_retraining(cfg.root, mode, trigger, cfg.retrain.timeout_minutes)
    return result


def _alerts(result: MonitorResult) -> list[Alert]:
    out: list[Alert] = []
    report = result.drift
    for col in report.drifted:
        data = [r for r in col.reasons if r in DATA_PROBLEMS]
        if data:
            out.append(
                Alert(
                    kind="data_quality",
                    key=f"data:{col.column}",
                    severity="critical",
                    summary=f"{col.role} column {col.column}: {', '.join(data)} ({col.note})"
                    if col.note
                    else f"{col.role} column {col.column}: {', '.join(data)}",
                    evidence={
                        "column": col.column,
                        "reasons": data,
                        "null_rate_reference": col.null_rate_reference,
                        "null_rate_live": col.null_rate_live,
                        "null_rate_limit": col.null_rate_limit,
                        "note": col.note,
                        "window": report.window,
                    },
                )
            )
        if "distribution" not in col.reasons:
            continue
        out.append(
            Alert(
                kind="prediction_drift" if col.role == "prediction" else "drift",
                key=f"drift:{col.column}",
                severity="critical" if col.severity == "high" else "warning",
                summary=(
                    f"{col.role} column {col.column} drifted: PSI {col.psi:.4f} > "
                    f"{col.threshold:.4f} ({col.reference_summary} -> {col.live_summary})"
                ),
                evidence={
                    "column": col.column,
                    "role": col.role,
                    "psi": col.psi,
                    "hellinger": col.hellinger,
                    "threshold": col.threshold,
                    "critical_psi": col.critical_psi,
                    "between_windows": col.between_windows,
                    "n_live": col.n_live,
                    "window": report.window,
                },
            )
        )
    if report.dataset_drift:
        out.append(
            Alert(
                kind="dataset_drift",
                key="dataset_drift",
                severity="critical",
                summary=(
                    f"{len(report.distribution_drifted)} of {len(report.decided)} columns drifted "
                    f"(share {report.drift_share:.0%} >= {report.policy.share_threshold:.0%})"
                ),
                evidence=report.summary(),
            )
        )
    for b in result.signal_breaches:
        out.append(
            Alert(
                kind="serving_signal",
                key=f"signal:{b['signal']}",
                severity="warning",
                summary=f"{b['signal']} {b['value']} over its limit {b['limit']}",
                evidence={**b, "window": result.window},
            )
        )
    for b in result.quality_breaches:
        out.append(
            Alert(
                kind="online_quality",
                key=f"quality:{b.get('model')}:{b.get('route')}:{b['signal']}",
                severity="critical",
                summary=(
                    f"{b['signal']} of model {b.get('model')} on route {b.get('route')}: "
                    f"{b['value']:.4f} vs limit {b['limit']:.4f}"
                ),
                evidence={**b, "window": result.window},
            )
        )
    return out


def save_result(cfg: MonitorConfig, result: MonitorResult) -> Path:
    """Write the result to ``<out_dir>/drift-<time>.json`` and ``latest.json``; returns the path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    data = result.to_dict()
    path = cfg.out_dir / f"drift-{stamp}.json"
    write_json(path, data)
    write_json(cfg.out_dir / "latest.json", data)
    return path
