"""The monitoring loop on the small project: replayed drifted traffic -> drift, quality breach,
alerts to a real webhook, a retraining trigger that runs `dvc exp run`, and the HTML report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.http_receiver import http_receiver
from tests.support.project import project_env, run

pytestmark = pytest.mark.slow


def _set_monitor(root: Path, section: str, key: str, value: object) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["monitor"][section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_drift_quality_alerts_retraining_and_report(project_copy: Path, tmp_path: Path) -> None:
    root = project_copy
    mlops = [sys.executable, "-m", "pipelines.cli"]
    env = project_env(root)
    # Clicks get rarer from day 6 on: the last two days are replayed through the model.
    replay = run(
        [
            *mlops,
            "monitor",
            "replay",
            "--scenario",
            "ctr_drop",
            "--scenario-start-day",
            "6",
            "--events-out",
            str(tmp_path / "events.parquet"),
        ],
        root,
    )
    assert "requests to" in replay.stdout
    with http_receiver() as hook:
        _set_monitor(root, "alerts", "webhook_url", hook.url + "/alerts")
        _set_monitor(root, "quality", "max_calibration_error", 0.03)
        result = run([*mlops, "monitor", "drift", "--retrain", "exp"], root, check=False, env=env)
        assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
        keys = {body["key"] for body in hook.bodies("/alerts")}
    out = result.stdout
    # the table comes first; alert payloads go to the alert log, not the console
    assert out.startswith("== drift") and out.index("column") < out.index("alert ")
    assert '"key"' not in out + result.stderr
    assert '"key": "drift:user_ctr_24h"' in (root / "monitors/drift/alerts.log").read_text()
    assert "BREACH online_calibration_error" in out
    assert {"drift:user_ctr_24h", "retrain_trigger"} <= keys
    assert any(k.startswith("quality:") and k.endswith("online_calibration_error") for k in keys)
    latest = json.loads((root / "monitors/drift/latest.json").read_text())
    ctr = {c["column"]: c for c in latest["drift"]["columns"]}
    assert ctr["user_ctr_24h"]["status"] == "drift"
    assert ctr["user_ctr_24h"]["reasons"] == ["distribution"]
    assert ctr["surface"]["status"] == "no_drift"  # the traffic mix did not change
    # the small preset's 7-day windows fill during training: not judged, and the model's
    # output (which reads them) neither, each with the reason
    assert (
        ctr["user_ctr_7d"]["status"] == "not_judged" and "7d window" in ctr["user_ctr_7d"]["note"]
    )
    assert ctr["prediction"]["status"] == "not_judged"
    # the trigger record names the breaches, the window and the experiment it ran
    trigger = json.loads((root / latest["trigger"]).read_text())
    kinds = {b["kind"] for b in trigger["breaches"]}
    assert "quality" in kinds
    assert trigger["window"]["start"].startswith("2026-10-07")
    assert trigger["run"]["status"] == "succeeded", trigger["run"]["output_tail"]
    exps = run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], root).stdout
    assert trigger["run"]["experiment"] in exps.split()

    report = run([*mlops, "monitor", "report", "--events", str(tmp_path / "events.parquet")], root)
    html = (root / "monitors/reports/drift_report.html").read_text()
    assert "report:" in report.stdout
    assert html.count("data:image/png") >= 4  # histograms, signal and quality timelines
    for text in ("Drift score table", "Serving signals over time", "Online quality", "prediction"):
        assert text in html
    assert "mismatch_rate" in html  # value-level skew against the events the traffic came from
