"""Alerts to a real local webhook (http.server on loopback) and the log, with de-duplication."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from pipelines.core.config import ConfigError
from pipelines.monitoring.alerts import Alert, AlertSettings, AlertSink
from tests.support.http_receiver import http_receiver
from tests.support.loadtest import free_port


def _alert(key: str = "drift:user_ctr_7d", **kw: object) -> Alert:
    return Alert(
        kind="drift",
        key=key,
        severity="warning",
        summary="user_ctr_7d drifted: PSI 0.03 > 0.005",
        evidence={"psi": 0.03, "threshold": 0.005},
        **kw,  # type: ignore[arg-type]
    )


def test_delivery_dedup_and_cooldown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mlops.alerts")
    with http_receiver() as hook:
        sink = AlertSink(hook.url + "/hook", tmp_path / "alerts.sqlite", cooldown_minutes=60)
        t0 = 1_800_000_000.0
        assert sink.emit(_alert(), now=t0).status == "sent"
        body = hook.bodies("/hook")[0]
        assert body["key"] == "drift:user_ctr_7d" and body["evidence"]["psi"] == 0.03
        assert body["severity"] == "warning" and body["repeats_suppressed"] == 0
        assert hook.requests[0].headers["content-type"] == "application/json"
        # repeats within the cool-down are suppressed, also by a new sink on the same state
        assert sink.emit(_alert(), now=t0 + 60).status == "suppressed"
        again = AlertSink(hook.url + "/hook", tmp_path / "alerts.sqlite", cooldown_minutes=60)
        assert again.emit(_alert(), now=t0 + 120).status == "suppressed"
        # another key is independent
        assert sink.emit(_alert("drift:surface"), now=t0 + 130).status == "sent"
        assert len(hook.bodies("/hook")) == 2
        # after the cool-down it is delivered again and says how many repeats were folded
        delivery = sink.emit(_alert(), now=t0 + 3601)
        assert delivery.status == "sent" and delivery.suppressed_before == 2
        assert hook.bodies("/hook")[-1]["repeats_suppressed"] == 2
    state = {row["key"]: row for row in sink.state()}
    assert state["drift:user_ctr_7d"]["sent"] == 2 and state["drift:user_ctr_7d"]["suppressed"] == 2
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT ")]
    assert len(logged) == 3  # every delivered alert is also one JSON log line
    assert json.loads(logged[0].removeprefix("ALERT "))["key"] == "drift:user_ctr_7d"


def test_failed_delivery_is_retried_not_suppressed(tmp_path: Path) -> None:
    with http_receiver(status=500) as hook:
        sink = AlertSink(hook.url, tmp_path / "alerts.sqlite", cooldown_minutes=60)
        first = sink.emit(_alert(), now=1000.0)
        assert first.status == "failed" and "HTTP 500" in first.detail
        hook.status = 200
        assert sink.emit(_alert(), now=1010.0).status == "sent"  # retried at once
        assert len(hook.requests) == 2
    closed = AlertSink(
        f"http://127.0.0.1:{free_port()}", tmp_path / "other.sqlite", timeout_seconds=2
    )
    refused = closed.emit(_alert())
    assert refused.status == "failed" and "ConnectError" in refused.detail


def test_no_webhook_logs_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mlops.alerts")
    sink = AlertSink("", tmp_path / "alerts.sqlite")
    assert sink.emit(_alert()).status == "logged"
    assert sink.emit(_alert()).status == "suppressed"
    assert any("drift:user_ctr_7d" in r.getMessage() for r in caplog.records)


def test_concurrent_emitters_deliver_once(tmp_path: Path) -> None:
    with http_receiver() as hook:
        sinks = [AlertSink(hook.url, tmp_path / "alerts.sqlite") for _ in range(6)]
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda s=s: results.append(s.emit(_alert()).status))
            for s in sinks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["sent"] + ["suppressed"] * 5
        assert len(hook.requests) == 1


def test_alert_and_policy_validation() -> None:
    with pytest.raises(ValueError, match="severity"):
        Alert(kind="drift", key="k", severity="loud", summary="x")
    with pytest.raises(ValueError, match="key"):
        Alert(kind="drift", key="", severity="info", summary="x")
    with pytest.raises(ConfigError, match="webhook_url"):
        AlertSettings(webhook_url="ftp://x")
    assert AlertSettings(webhook_url=None).webhook_url == ""
