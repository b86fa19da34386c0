"""Canary guard: real GTO tags in a temporary git repo, a real HTTP kill switch and webhook.

Request logs are synthesized with the service's exact log schema (no server needed):
prod answers most users, a sticky share goes to the canary, delayed clicks follow
the true click rate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.monitoring.alerts import AlertSink
from pipelines.monitoring.canary import (
    CanarySettings,
    KillSwitchError,
    evaluate,
    guard,
    kill_switch,
)
from pipelines.registry.registry import Registry, RegistryError, parse_message
from pipelines.simulation.replay import user_bucket
from tests.support.http_receiver import http_receiver
from tests.support.project import REPO, project_env, run

TOKEN = "s3cret-admin-token"
T0 = pd.Timestamp("2026-10-07T00:00:00Z")


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo with the project's params/dvc.yaml, v0.1.0 in prod and v0.2.0 in canary."""
    root = tmp_path_factory.mktemp("registry") / "project"
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".gto"):
        shutil.copy(REPO / name, root / name)
    gto = [sys.executable, "-m", "gto.cli"]
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    run([*gto, "register", "ctr-model", "--version", "v0.1.0"], root)
    run(
        [*gto, "assign", "ctr-model", "--version", "v0.1.0", "--stage", "prod", "-m", "first"], root
    )
    run(["git", "commit", "-q", "--allow-empty", "-m", "retrained"], root)
    run([*gto, "register", "ctr-model", "--version", "v0.2.0"], root)
    run(
        [*gto, "assign", "ctr-model", "--version", "v0.2.0", "--stage", "canary", "-m", "try"], root
    )
    return root


@pytest.fixture
def registry(registry_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the registry repo; the cwd and git identity point at it."""
    root = tmp_path / "project"
    shutil.copytree(registry_template, root, symlinks=True)
    env = project_env(root)
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(root)
    return root


def make_log(
    n: int = 4000,
    canary_share: float = 0.2,
    canary_error_rate: float = 0.0,
    canary_latency: float = 1.0,
    canary_random: bool = False,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A normalized request log (service schema) and its delayed clicks."""
    rng = np.random.default_rng(seed)
    rate = rng.beta(2, 18, n)  # true click rate of each impression
    y = rng.random(n) < rate
    times = T0 + pd.to_timedelta(np.sort(rng.integers(0, 6 * 3600, n)), unit="s")
    users = [f"u{i % 700:06d}" for i in range(n)]
    on_canary = user_bucket(np.array(users), "test") < canary_share  # sticky, deterministic
    prod_p = np.clip(rate + rng.normal(0, 0.01, n), 0.001, 0.999)
    cand_p = (
        rng.uniform(0.01, 0.3, n)
        if canary_random
        else np.clip(rate + rng.normal(0, 0.01, n), 0.001, 0.999)
    )
    failed = on_canary & (rng.random(n) < canary_error_rate)
    answered_by_canary = on_canary & ~failed
    latency = rng.gamma(4.0, 1.5, n) * np.where(answered_by_canary, canary_latency, 1.0)
    log = pd.DataFrame(
        {
            "request_id": [f"q{i:06d}" for i in range(n)],
            "answered_at": times,
            "endpoint": "predict",
            "release_id": "r1",
            "user": users,
            "item": "i00001",
            "surface": rng.choice(["feed", "search", "recs"], n),
            "device": "mobile",
            "request_time": times,
            "route": np.where(answered_by_canary, "canary", "prod"),
            "model": np.where(answered_by_canary, "v0.2.0", "v0.1.0"),
            "probability": np.where(answered_by_canary, cand_p, prod_p).round(6),
            "degraded": failed,
            "degraded_reason": np.where(
                failed, "candidate model error: RuntimeError: injected", None
            ),
            "latency_ms": latency.round(3),
            "feature_age_seconds": 5.0,
        }
    )
    clicks = pd.DataFrame(
        {
            "request_id": log.loc[y, "request_id"],
            "click_ts": log.loc[y, "request_time"] + pd.Timedelta(minutes=2),
        }
    )
    return log, clicks


def _tag_messages(root: Path) -> dict[str, str]:
    out = subprocess.run(
        [
            "git",
            "for-each-ref",
            "refs/tags",
            "--format=%(refname:short)%00%(contents)%00%(taggeremail)%01",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tags = {}
    for chunk in out.split("\x01"):
        if chunk.strip():
            name, body, _ = chunk.strip("\n").split("\x00")
            tags[name] = body
    return tags


def test_healthy_canary_gets_the_health_report(registry: Path) -> None:
    log, clicks = make_log()
    policy = CanarySettings()
    with http_receiver(token=TOKEN) as service:
        outcome = guard(log, policy, registry, clicks, service_url=service.url)
        assert service.requests == []  # no kill switch for a healthy canary
    report = outcome.report
    assert report.decision == "healthy", [c for c in report.checks]
    assert {c.name: c.status for c in report.checks} == {
        "error_rate": "pass",
        "latency_p95_ms": "pass",
        "prediction_psi": "pass",
        "online_auc": "pass",
        "online_log_loss": "pass",
    }
    health_file = registry / "monitors/canary/health_v0.2.0.json"  # release.canary_health_file
    assert outcome.actions["health_report"] == str(health_file.relative_to(registry))
    health = json.loads(health_file.read_text())
    assert health["schema"] == "canary-health/1" and health["healthy"] is True
    assert health["reasons"] == [] and health["requests"] == report.rows["canary"]
    assert health["artifact"] == "ctr-model" and health["version"] == "v0.2.0"
    assert health["canary_model"] == "v0.2.0" and health["prod_model"] == "v0.1.0"
    assert health["rows"]["canary"] > 300 and health["window"]["start"].startswith("2026-10-07")
    assert Registry(registry).holders().get("canary") == "v0.2.0"  # registry untouched
    # the registry accepts the promotion to prod with this report as its canary evidence
    promoted = Registry(registry).promote("v0.2.0", "prod", approver="Ana", reason="canary ok")
    assert promoted["fields"]["canary_evidence"]["healthy"] is True
    assert Registry(registry).holders().get("prod") == "v0.2.0"


def test_breaching_canary_is_rolled_back_with_evidence(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, clicks = make_log(canary_error_rate=0.08)
    monkeypatch.setenv("CTR_ADMIN_TOKEN", TOKEN)
    policy = CanarySettings()
    with http_receiver(token=TOKEN) as service, http_receiver() as hook:
        sink = AlertSink(hook.url, registry / "monitors/alerts.sqlite")
        outcome = guard(log, policy, registry, clicks, service_url=service.url, alerts=sink)
        # the kill switch: POST /admin/canary {"share": 0} with the bearer token
        assert [r.path for r in service.requests] == ["/admin/canary"]
        assert service.requests[0].body == {"share": 0.0}
        assert service.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
        alert = hook.bodies()[0]
        assert alert["kind"] == "canary_rollback" and alert["severity"] == "critical"
        assert "error_rate" in alert["summary"] and "canary share set to 0" in alert["summary"]
    assert outcome.errors == []
    error_check = next(c for c in outcome.report.checks if c.name == "error_rate")
    assert outcome.report.decision == "breach" and error_check.status == "breach"
    assert error_check.canary > 0.05 and error_check.prod == 0.0
    # the registry: canary stage removed by an annotated tag that carries the evidence
    tag = outcome.actions["registry_tag"]
    assert tag.startswith("ctr-model#canary!#")
    title, fields = parse_message(_tag_messages(registry)[tag])
    assert title == "Automatic canary rollback of ctr-model v0.2.0: error_rate"
    assert fields["action"] == "canary-rollback" and fields["kill_switch"] == "canary share 0"
    assert fields["breached"]["error_rate"]["canary"] > 0.05
    assert fields["evidence"] == outcome.actions["evidence"]
    assert Registry(registry).holders().get("canary") is None
    last = Registry(registry).events()[-1]  # what `mlops model history` shows
    assert (last.tag, last.action, last.version) == (tag, "canary-rollback", "v0.2.0")
    assert Registry(registry).holders().get("prod") == "v0.1.0"
    history = run([sys.executable, "-m", "gto.cli", "history", "ctr-model"], registry).stdout
    assert "unassignment" in history
    evidence = json.loads((registry / outcome.actions["evidence"]).read_text())
    assert evidence["kill_switch"]["status_code"] == 200
    assert evidence["report"]["decision"] == "breach" and evidence["version"] == "v0.2.0"
    health = json.loads((registry / "monitors/canary/health_v0.2.0.json").read_text())
    assert health["healthy"] is False and health["reasons"][0].startswith("error_rate")
    with pytest.raises(RegistryError, match="NOT healthy"):  # the rolled-back version is blocked
        Registry(registry).promote("v0.2.0", "prod", approver="Ana", reason="try anyway")


def test_quality_and_latency_breaches(registry: Path) -> None:
    policy = CanarySettings()
    log, clicks = make_log(canary_random=True)
    report = evaluate(log, policy, clicks)
    statuses = {c.name: c.status for c in report.checks}
    assert report.decision == "breach"
    assert statuses["online_auc"] == "breach" and statuses["error_rate"] == "pass"
    # without labels the same canary is still caught by its prediction distribution
    no_labels = evaluate(log, policy, None)
    assert {c.name: c.status for c in no_labels.checks}["prediction_psi"] == "breach"
    slow, _ = make_log(canary_latency=3.0)
    slow_report = evaluate(slow, policy, None)
    assert {c.name: c.status for c in slow_report.checks}["latency_p95_ms"] == "breach"
    assert slow_report.decision == "breach"


def test_too_little_canary_traffic_does_nothing(registry: Path) -> None:
    log, clicks = make_log(n=1500, canary_share=0.05)
    policy = CanarySettings()
    with http_receiver(token=TOKEN) as service:
        outcome = guard(log, policy, registry, clicks, service_url=service.url)
        assert service.requests == []
    assert outcome.report.decision == "insufficient_data"
    assert outcome.actions == {}
    assert not (registry / "monitors/canary").exists()
    assert Registry(registry).holders().get("canary") == "v0.2.0"


def test_failed_kill_switch_still_records_and_alerts(
    registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, clicks = make_log(canary_error_rate=0.1)
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "wrong-token")
    with http_receiver(token=TOKEN) as service, http_receiver() as hook:
        sink = AlertSink(hook.url, registry / "monitors/alerts.sqlite")
        outcome = guard(
            log, CanarySettings(), registry, clicks, service_url=service.url, alerts=sink
        )
        assert len(service.requests) == 1
        assert "kill switch FAILED" in hook.bodies()[0]["summary"]
    assert any("HTTP 403" in e for e in outcome.errors)
    assert outcome.actions["registry_tag"].startswith("ctr-model#canary!#")
    monkeypatch.delenv("CTR_ADMIN_TOKEN")
    with pytest.raises(KillSwitchError, match="CTR_ADMIN_TOKEN.*not set"):
        kill_switch("http://127.0.0.1:9", "/admin/canary", "CTR_ADMIN_TOKEN")


def test_cli_canary_check(registry: Path, tmp_path: Path) -> None:
    log, clicks = make_log(canary_error_rate=0.08)
    log.to_parquet(tmp_path / "log.parquet")
    clicks.to_parquet(tmp_path / "clicks.parquet")
    # PYTHONPATH: the repo has no pipelines/ of its own; use this checkout's package
    env = {**project_env(registry), "CTR_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    with http_receiver(token=TOKEN) as service:
        base = [
            sys.executable,
            "-m",
            "pipelines.cli",
            "monitor",
            "canary",
            "--log-file",
            str(tmp_path / "log.parquet"),
            "--clicks",
            str(tmp_path / "clicks.parquet"),
            "--service-url",
            service.url,
        ]
        dry = run([*base, "--dry-run"], registry, check=False, env=env)
        assert dry.returncode == 2, dry.stderr
        assert "decision: breach" in dry.stdout and service.requests == []
        assert Registry(registry).holders().get("canary") == "v0.2.0"
        real = run(base, registry, check=False, env=env)
        assert real.returncode == 2, real.stderr
        assert "kill_switch:" in real.stdout and "registry_tag: ctr-model#canary!#" in real.stdout
        assert len(service.requests) == 1
    assert Registry(registry).holders().get("canary") is None
    bad = run(
        [*base[:5], "--log-file", str(tmp_path / "missing.parquet")], registry, check=False, env=env
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr
