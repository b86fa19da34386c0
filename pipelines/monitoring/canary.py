"""Canary guard: compare the canary arm with prod and act without a human.

From the request log (and delayed clicks, when they have arrived) the guard
compares the two arms on

Details: docs/monitoring.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from pipelines.core.settings import CanarySettings
from pipelines.monitoring.drift import bin_samples, critical_psi, psi
from pipelines.monitoring.requests import CANDIDATE_ROUTES, to_jsonable

HEALTH_SCHEMA = "canary-health/1"
_CANDIDATE_FAILED = re.compile(r"(?:^|; )candidate (?:model|refused|skipped)")
_PROD_FAILED = re.compile(r"(?:^|; )prod (?:model|refused|skipped)")


@dataclass
class Check:
    """One comparison of canary against prod."""

    name: str
    status: str  # pass | breach | skipped
    canary: float | None
    prod: float | None
    limit: float | None
    detail: str = ""


@dataclass
class CanaryReport:
    """The guard's verdict with its evidence."""

    decision: str  # healthy | breach | insufficient_data
    checks: list[Check]
    canary_model: str | None
    prod_model: str | None
    rows: dict[str, int]
    window: dict[str, str | None]
    checked_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if c.status == "breach"]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(asdict(self))


def split_arms(log: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series, pd.Series]:
    """Boolean masks: canary arm, prod arm, candidate failures, prod failures.

    The canary arm is every row the candidate answered plus every row it should have
    answered but failed on (its failure is in ``degraded_reason``). Rows degraded for
    feature reasons (stale or unavailable features) reached neither model and belong
    to neither arm.
    """
    reason = log["degraded_reason"].fillna("").astype(str)
    cand_failed = reason.str.contains(_CANDIDATE_FAILED)
    canary = log["route"].isin(CANDIDATE_ROUTES) | cand_failed
    feature_degraded = reason.str.startswith(("features are", "feature store"))
    prod = ~canary & ~feature_degraded
    prod_failed = prod & reason.str.contains(_PROD_FAILED)
    return canary, prod, cand_failed & canary, prod_failed


def evaluate(
    log: pd.DataFrame,
    policy: CanarySettings,
    clicks: pd.DataFrame | None = None,
    as_of: pd.Timestamp | None = None,
) -> CanaryReport:
    """Compare the canary arm with prod in ``log`` (see the module docstring)."""
    canary, prod, cand_failed, prod_failed = split_arms(log)
    n_c, n_p = int(canary.sum()), int(prod.sum())
    answered_c = log["route"].isin(CANDIDATE_ROUTES)
    answered_p = log["route"] == "prod"
    checks: list[Check] = []
    enough = n_c >= policy.min_rows and n_p >= policy.min_rows

    # Error rate.
    if enough:
        rate_c, rate_p = float(cand_failed.sum() / n_c), float(prod_failed.sum() / n_p)
        limit = rate_p + policy.max_error_rate_increase
        checks.append(
            Check(
                "error_rate",
                "breach" if rate_c > limit else "pass",
                round(rate_c, 6),
                round(rate_p, 6),
                round(limit, 6),
                f"{int(cand_failed.sum())} of {n_c} canary rows failed",
            )
        )
    else:
        checks.append(_skipped("error_rate", f"needs {policy.min_rows} rows per arm", n_c, n_p))

    # Latency p95.
    lat_c = log.loc[answered_c, "latency_ms"].dropna().to_numpy(np.float64)
    lat_p = log.loc[answered_p, "latency_ms"].dropna().to_numpy(np.float64)
    if len(lat_c) >= policy.min_rows and len(lat_p) >= policy.min_rows:
        p95_c, p95_p = float(np.quantile(lat_c, 0.95)), float(np.quantile(lat_p, 0.95))
        limit = max(p95_p * policy.max_latency_p95_ratio, p95_p + policy.min_latency_p95_gap_ms)
        checks.append(
            Check(
                "latency_p95_ms",
                "breach" if p95_c > limit else "pass",
                round(p95_c, 3),
                round(p95_p, 3),
                round(limit, 3),
            )
        )
    else:
        checks.append(
            _skipped("latency_p95_ms", "too few rows answered by each arm", len(lat_c), len(lat_p))
        )

    # Prediction distribution: paired on the same rows when both scores were logged.
    pred_c, pred_p, paired = _prediction_samples(log, answered_c, answered_p)
    if len(pred_c) >= policy.min_rows and len(pred_p) >= policy.min_rows:
        binned = bin_samples(pred_p, pred_c, policy.prediction_bins)
        value = psi(binned.reference, binned.live)
        crit = critical_psi(len(binned.labels), len(pred_p), len(pred_c), 0.01)
        limit = max(policy.max_prediction_psi, crit)
        checks.append(
            Check(
                "prediction_psi",
                "breach" if value > limit else "pass",
                round(value, 6),
                0.0,
                round(limit, 6),
                f"{'paired' if paired else 'unpaired'}; mean canary {pred_c.mean():.4f}, "
                f"prod {pred_p.mean():.4f}",
            )
        )
    else:
        checks.append(
            _skipped("prediction_psi", "too few predictions per arm", len(pred_c), len(pred_p))
        )

    # Online quality, when labels exist.
    checks.extend(_quality_checks(log, answered_c, answered_p, policy, clicks, as_of))

    core = [c for c in checks if c.name in ("error_rate", "latency_p95_ms", "prediction_psi")]
    quality = [c for c in checks if c.name.startswith("online_")]
    if any(c.status == "breach" for c in checks):
        decision = "breach"
    elif all(c.status == "pass" for c in core) and (
        not policy.require_labels or (quality and all(c.status == "pass" for c in quality))
    ):
        decision = "healthy"
    else:
        decision = "insufficient_data"
    times = log["request_time"]
    return CanaryReport(
        decision=decision,
        checks=checks,
        canary_model=_mode(log.loc[answered_c, "model"]),
        prod_model=_mode(log.loc[answered_p, "model"]),
        rows={
            "canary": n_c,
            "prod": n_p,
            "canary_failed": int(cand_failed.sum()),
            "prod_failed": int(prod_failed.sum()),
        },
        window={
            "start": times.min().isoformat() if len(times) else None,
            "end": times.max().isoformat() if len(times) else None,
        },
    )


def _skipped(name: str, why: str, n_c: int, n_p: int) -> Check:
    return Check(name, "skipped", None, None, None, f"{why} (canary {n_c}, prod {n_p})")


def _mode(values: pd.Series) -> str | None:
    values = values.dropna()
    return None if values.empty else str(values.value_counts().index[0])


def _prediction_samples(
    log: pd.DataFrame, answered_c: pd.Series, answered_p: pd.Series
) -> tuple[np.ndarray, np.ndarray, bool]:
    if "score_candidate" in log.columns and "score_prod" in log.columns:
        both = log[["score_candidate", "score_prod"]].dropna()
        if len(both) >= 2:
            return (
                both["score_candidate"].to_numpy(np.float64),
                both["score_prod"].to_numpy(np.float64),
                True,
            )
    return (
        log.loc[answered_c, "probability"].dropna().to_numpy(np.float64),
        log.loc[answered_p, "probability"].dropna().to_numpy(np.float64),
        False,
    )


def _quality_checks(
    log: pd.DataFrame,
    answered_c: pd.Series,
    answered_p: pd.Series,
    policy: CanarySettings,
    clicks: pd.DataFrame | None,
    as_of: pd.Timestamp | None,
) -> list[Check]:
    """AUC and log loss of the two arms; a gap counts only beyond its sampling noise.

    A few hundred labelled rows with a 10% click rate carry only tens of clicks, so
    an AUC moves by a few hundredths by chance. The limit is therefore the larger of
    the configured margin and ``confidence_z`` standard errors of the difference
    (Hanley-McNeil for AUC, the per-row loss spread for log loss).
    """
    from pipelines.monitoring.quality import auc_standard_error, join_labels

    names = ("online_auc", "online_log_loss")
    if clicks is None:
        return [Check(n, "skipped", None, None, None, "no click data") for n in names]
    joined = join_labels(log, clicks, policy.label_delay_minutes, as_of)
    labelled = joined["label_status"].to_numpy() == "labelled"
    arms = {}
    for arm, mask in (("canary", answered_c.to_numpy()), ("prod", answered_p.to_numpy())):
        rows = joined[mask & labelled]
        y = rows["label"].to_numpy(dtype=np.int64)
        p = np.clip(rows["probability"].to_numpy(dtype=np.float64), 1e-6, 1 - 1e-6)
        arms[arm] = (y, p)
    n_c, n_p = len(arms["canary"][0]), len(arms["prod"][0])
    if n_c < policy.min_labels or n_p < policy.min_labels:
        why = f"needs {policy.min_labels} labelled rows per arm"
        return [_skipped(n, why, n_c, n_p) for n in names]
    if any(len(np.unique(y)) < 2 for y, _ in arms.values()):
        return [_skipped(n, "an arm has only one class of labels", n_c, n_p) for n in names]
    from sklearn.metrics import roc_auc_score

    stats: dict[str, dict[str, float]] = {}
    for arm, (y, p) in arms.items():
        auc = float(roc_auc_score(y, p))
        loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        stats[arm] = {
            "auc": auc,
            "auc_se": auc_standard_error(auc, int(y.sum()), int(len(y) - y.sum())),
            "ll": float(loss.mean()),
            "ll_se": float(loss.std(ddof=1) / np.sqrt(len(loss))),
        }
    c, p_ = stats["canary"], stats["prod"]
    z = policy.confidence_z
    auc_noise = z * float(np.hypot(c["auc_se"], p_["auc_se"]))
    ll_noise = z * float(np.hypot(c["ll_se"], p_["ll_se"]))
    auc_limit = p_["auc"] - max(policy.max_auc_drop, auc_noise)
    ll_limit = p_["ll"] + max(p_["ll"] * policy.max_log_loss_increase, ll_noise)
    detail = f"labelled rows: canary {n_c}, prod {n_p}"
    return [
        Check(
            "online_auc",
            "breach" if c["auc"] < auc_limit else "pass",
            round(c["auc"], 6),
            round(p_["auc"], 6),
            round(auc_limit, 6),
            f"{detail}; noise margin {auc_noise:.4f}",
        ),
        Check(
            "online_log_loss",
            "breach" if c["ll"] > ll_limit else "pass",
            round(c["ll"], 6),
            round(p_["ll"], 6),
            round(ll_limit, 6),
            f"{detail}; noise margin {ll_noise:.4f}",
        ),
    ]


# --- actions -------------------------------------------------------------------------


class KillSwitchError(RuntimeError):
    """The service's kill switch could not be reached or refused the call."""


def kill_switch(
    service_url: str, path: str, token_env: str, timeout: float = 5.0
) -> dict[str, Any]:
    """Set the canary share to 0 through the service's admin endpoint (bearer token from env)."""
    token = os.environ.get(token_env, "")
    if not token:
        raise KillSwitchError(
            f"environment variable {token_env} (the service's admin token) is not set; the "
            "guard cannot call the kill switch. Set it to the token the service was started with"
        )
    url = service_url.rstrip("/") + path
    try:
        response = httpx.post(
            url,
            json={"share": 0.0},
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise KillSwitchError(
            f"kill switch {url} unreachable: {type(exc).__name__}: {exc}"
        ) from exc
    if response.status_code >= 300:
        raise KillSwitchError(
            f"kill switch {url} answered HTTP {response.status_code}: {response.text[:300]}"
        )
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:300]}
    return {"url": url, "status_code": response.status_code, "response": body}


def write_health_report(
    path: Path, report: CanaryReport, policy: CanarySettings, version: str | None
) -> dict[str, Any]:
    """The canary health report promotion to prod reads (schema ``canary-health/1``).

    Holds the registry's required fields (``version``, ``healthy``, ``checked_at``,
    ``requests``, ``reasons``; docs/registry.md) plus the checks and the window.
    Written for a healthy canary (``healthy: true``) and again after a breach
    (``healthy: false``), so an earlier healthy report cannot carry a rolled-back
    canary into prod.
    """
    from pipelines.core.io import write_json

    if report.decision not in ("healthy", "breach"):
        raise ValueError(f"no health report for a canary with {report.decision!r}")
    document = {
        "schema": HEALTH_SCHEMA,
        "artifact": policy.artifact,
        "version": version,
        "healthy": report.decision == "healthy",
        "checked_at": report.checked_at,
        "requests": report.rows["canary"],
        "reasons": [
            f"{c.name}: canary {c.canary} vs prod {c.prod} (limit {c.limit})"
            for c in report.breaches
        ],
        "decision": report.decision,
        "canary_model": report.canary_model,
        "prod_model": report.prod_model,
        "window": report.window,
        "rows": report.rows,
        "checks": [asdict(c) for c in report.checks],
        "policy": policy.model_dump(mode="json"),
    }
    write_json(path, to_jsonable(document))
    return document


@dataclass
class GuardOutcome:
    """What the guard decided and did."""

    report: CanaryReport
    version: str | None
    actions: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "decision": self.report.decision,
                "version": self.version,
                "actions": self.actions,
                "errors": self.errors,
                "report": self.report.to_dict(),
            }
        )


def guard(
    log: pd.DataFrame,
    policy: CanarySettings,
    root: Path,
    clicks: pd.DataFrame | None = None,
    version: str | None = None,
    service_url: str | None = None,
    alerts: Any | None = None,
    act: bool = True,
    as_of: pd.Timestamp | None = None,
) -> GuardOutcome:
    """Evaluate the canary and, unless ``act`` is False, roll it back or certify it.

    ``version`` is the registry version of the canary; by default the version the
    registry in ``root`` (``pipelines.registry.registry``) has in the ``canary`` stage. Each
    action that fails is recorded in ``errors`` and the others still run: a kill
    switch that cannot be reached must not stop the registry record or the alert
    that asks a human to act.
    """
    from pipelines.monitoring.alerts import Alert
    from pipelines.registry.registry import Registry, RegistryError

    report = evaluate(log, policy, clicks, as_of)
    outcome = GuardOutcome(report, version)
    if version is None:
        try:
            outcome.version = Registry(root).holders().get("canary")
        except (RegistryError, OSError, ValueError) as exc:
            outcome.errors.append(f"cannot read the canary version from the registry: {exc}")
    if not act:
        return outcome
    if report.decision == "healthy":
        path = policy.health_path(root, outcome.version)
        write_health_report(path, report, policy, outcome.version)
        outcome.actions["health_report"] = str(path.relative_to(root))
        return outcome
    if report.decision != "breach":
        return outcome

    url = service_url or policy.service_url
    try:
        outcome.actions["kill_switch"] = kill_switch(
            url, policy.kill_switch_path, policy.admin_token_env, policy.timeout_seconds
        )
    except KillSwitchError as exc:
        outcome.errors.append(str(exc))
        outcome.actions["kill_switch"] = {"error": str(exc)}

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    evidence_path = (
        root / policy.evidence_dir / f"rollback-{stamp}-{outcome.version or 'unknown'}.json"
    )
    evidence = {
        "event": "automatic canary rollback",
        "artifact": policy.artifact,
        "version": outcome.version,
        "kill_switch": outcome.actions.get("kill_switch"),
        "report": report.to_dict(),
    }
    from pipelines.core.io import write_json

    write_json(evidence_path, to_jsonable(evidence))
    digest = hashlib.sha256(evidence_path.read_bytes()).hexdigest()
    outcome.actions["evidence"] = str(evidence_path.relative_to(root))
    health = policy.health_path(root, outcome.version)
    write_health_report(health, report, policy, outcome.version)
    outcome.actions["health_report"] = f"{health.relative_to(root)} (healthy: false)"

    if outcome.version:
        names = ", ".join(c.name for c in report.breaches)
        kill = outcome.actions["kill_switch"]
        fields = {
            "action": "canary-rollback",
            "stage": "canary",
            "version": outcome.version,
            "reason": f"canary guard breach: {names}",
            "requested_by": "canary guard (mlops monitor canary), automatic",
            "breached": {
                c.name: {"canary": c.canary, "prod": c.prod, "limit": c.limit}
                for c in report.breaches
            },
            "rows": report.rows,
            "window": report.window,
            "kill_switch": f"FAILED: {kill['error']}" if "error" in kill else "canary share 0",
            "evidence": outcome.actions["evidence"],
            "evidence_sha256": digest,
        }
        title = f"Automatic canary rollback of {policy.artifact} {outcome.version}: {names}"
        try:
            tag = Registry(root).unassign(outcome.version, "canary", title, fields)
            outcome.actions["registry_tag"] = tag
        except (RegistryError, OSError, ValueError) as exc:
            outcome.errors.append(str(exc))
    else:
        outcome.errors.append(
            f"no registry version for the canary (none in stage 'canary' of {policy.artifact}); "
            "the rollback is recorded only in the evidence file"
        )

    if alerts is not None:
        failed = "error" in outcome.actions["kill_switch"]
        delivery = alerts.emit(
            Alert(
                kind="canary_rollback",
                key=f"canary_rollback:{policy.artifact}:{outcome.version}",
                severity="critical",
                summary=(
                    f"canary {outcome.version or report.canary_model} breached "
                    f"{', '.join(c.name for c in report.breaches)}; "
                    + (
                        "kill switch FAILED, set the canary share to 0 by hand"
                        if failed
                        else "canary share set to 0"
                    )
                ),
                evidence=evidence,
            )
        )
        outcome.actions["alert"] = delivery.status
    return outcome
