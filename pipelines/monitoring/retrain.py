"""Retraining trigger: a drift or quality breach becomes a trigger record and, optionally, a run.

A trigger record (``<trigger_dir>/trigger-<UTC time>.json``) says what breached,
with the evidence (scores, limits), and which data window showed it. With
``run: repro`` the monitor then runs ``dvc repro`` in the project; with
``run: exp`` it runs ``dvc exp run -n retrain-<time>`` so the retrained model
lands as an experiment to compare (``dvc exp show``) instead of in the work tree.
Either way the outcome (command, exit code, duration, output tail) is added to
the record. New events must already be in the raw data folder (``dvc add
data`` after they land): DVC then sees changed inputs and reruns the stages.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.core.io import write_json
from pipelines.core.settings import RetrainSettings
from pipelines.monitoring.requests import to_jsonable


def reasons(
    drift_summary: dict[str, Any] | None,
    quality_breaches: list[dict[str, Any]],
    policy: RetrainSettings,
) -> list[dict[str, Any]]:
    """The breaches that call for retraining under ``policy`` (empty: no trigger).

    Retraining is for a world that moved: dataset drift (``share_threshold`` of the
    judged columns), prediction drift, one input shifted severely (PSI >= ``psi_severe``)
    or an online quality breach. Data problems (null rate, missing, new or retyped
    columns, a growing feature that fell) alert but never retrain: a model retrained on
    broken inputs learns the breakage.
    """
    out: list[dict[str, Any]] = []
    if drift_summary:
        if policy.on_dataset_drift and drift_summary.get("dataset_drift"):
            out.append(
                {
                    "kind": "dataset_drift",
                    "drift_share": drift_summary.get("drift_share"),
                    "drifted_columns": drift_summary.get("drifted_columns"),
                }
            )
        if policy.on_prediction_drift and drift_summary.get("prediction_drift"):
            out.append({"kind": "prediction_drift"})
        severe = drift_summary.get("severe_drift_columns") or []
        if policy.on_severe_drift and severe:
            out.append({"kind": "severe_drift", "columns": severe})
    if policy.on_quality_breach:
        out.extend({"kind": "quality", **b} for b in quality_breaches)
    return out


def write_trigger(
    root: Path,
    policy: RetrainSettings,
    breaches: list[dict[str, Any]],
    evidence: dict[str, Any],
    window: dict[str, Any],
) -> Path:
    """Write the trigger record and return its path."""
    now = dt.datetime.now(dt.UTC)
    path = root / policy.trigger_dir / f"trigger-{now.strftime('%Y%m%dT%H%M%S%f')}.json"
    record = {
        "created_at": now.isoformat(timespec="seconds"),
        "breaches": breaches,
        "window": window,
        "evidence": evidence,
        "run": {"mode": policy.run, "status": "not run" if policy.run == "none" else "pending"},
    }
    write_json(path, to_jsonable(record))
    return path


def run_retraining(root: Path, mode: str, trigger: Path, timeout_minutes: float = 120.0) -> dict:
    """Run ``dvc repro`` or ``dvc exp run`` for a trigger and record the outcome in it."""
    if mode not in ("repro", "exp"):
        raise ValueError(f"retraining mode must be 'repro' or 'exp', got {mode!r}")
    name = "retrain-" + trigger.stem.removeprefix("trigger-")[:15].lower()
    cmd = [sys.executable, "-m", "dvc", "repro"]
    if mode == "exp":
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "-n", name]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=timeout_minutes * 60
        )
        code, out = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        code, out = -1, f"timed out after {timeout_minutes} min: {exc}"
    result = {
        "mode": mode,
        "command": " ".join(["dvc", *cmd[3:]]),
        "experiment": name if mode == "exp" else None,
        "returncode": code,
        "status": "succeeded" if code == 0 else "failed",
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": out[-3000:],
    }
    record = json.loads(trigger.read_text())
    record["run"] = result
    write_json(trigger, record)
    return result
