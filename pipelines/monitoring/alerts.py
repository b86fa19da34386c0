"""Structured alert events: POSTed to a webhook and written to the log, de-duplicated.

Details: docs/monitoring.md.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipelines.core.settings import AlertSettings

logger = logging.getLogger("mlops.alerts")
SEVERITIES = ("info", "warning", "critical")


@dataclass
class Alert:
    """One alert event; ``evidence`` is any JSON-ready detail (scores, limits, windows)."""

    kind: str
    key: str
    severity: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    source: str = "mlops-monitor"
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert severity must be one of {SEVERITIES}, got {self.severity!r}")
        if not self.key:
            raise ValueError("an alert needs a non-empty key (used to de-duplicate repeats)")


@dataclass
class Delivery:
    """What happened to one alert: sent, suppressed, failed or logged (no webhook set)."""

    key: str
    status: str
    detail: str = ""
    suppressed_before: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_state (
    key TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_sent REAL,
    sent INTEGER NOT NULL DEFAULT 0,
    suppressed INTEGER NOT NULL DEFAULT 0,
    suppressed_since_sent INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_alert TEXT
)
"""


class AlertSink:
    """Deliver alerts to a webhook and the log, folding repeats of a key within a cool-down."""

    def __init__(
        self,
        webhook_url: str | None,
        state_db: Path,
        cooldown_minutes: float = 60.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.webhook_url = webhook_url or None
        self.state_db = state_db
        self.cooldown_seconds = cooldown_minutes * 60.0
        self.timeout_seconds = timeout_seconds
        state_db.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(_SCHEMA)

    @classmethod
    def from_policy(cls, policy: AlertSettings, root: Path) -> AlertSink:
        return cls(
            policy.webhook_url,
            root / policy.state_db,
            policy.cooldown_minutes,
            policy.timeout_seconds,
        )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.state_db, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def emit(self, alert: Alert, now: float | None = None) -> Delivery:
        """Log the alert, and deliver it unless its key is within the cool-down."""
        now = time.time() if now is None else now
        payload = asdict(alert)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT last_sent, suppressed_since_sent, last_status FROM alert_state "
                "WHERE key = ?",
                (alert.key,),
            ).fetchone()
            last_sent, pending_suppressed, last_status = row if row else (None, 0, None)
            if row is None:
                db.execute(
                    "INSERT INTO alert_state (key, first_seen, last_seen) VALUES (?, ?, ?)",
                    (alert.key, now, now),
                )
            if (
                last_sent is not None
                and last_status in ("sent", "sending")
                and now - last_sent < self.cooldown_seconds
            ):
                db.execute(
                    "UPDATE alert_state SET last_seen = ?, suppressed = suppressed + 1, "
                    "suppressed_since_sent = suppressed_since_sent + 1 WHERE key = ?",
                    (now, alert.key),
                )
                db.execute("COMMIT")
                logger.debug("alert %s suppressed (repeat within cool-down)", alert.key)
                return Delivery(alert.key, "suppressed", "repeat within the cool-down")
            # Claim the delivery before sending so a concurrent run suppresses its copy.
            db.execute(
                "UPDATE alert_state SET last_seen = ?, last_sent = ?, last_status = 'sending', "
                "last_alert = ? WHERE key = ?",
                (now, now, json.dumps(payload, default=str), alert.key),
            )
            db.execute("COMMIT")
        payload["repeats_suppressed"] = int(pending_suppressed)
        logger.warning("ALERT %s", json.dumps(payload, sort_keys=True, default=str))
        status, detail = self._deliver(payload)
        with closing(self._connect()) as db, db:
            if status == "failed":
                db.execute(
                    "UPDATE alert_state SET last_sent = ?, last_status = 'failed' WHERE key = ?",
                    (last_sent, alert.key),
                )
            else:
                db.execute(
                    "UPDATE alert_state SET last_status = 'sent', sent = sent + 1, "
                    "suppressed_since_sent = 0 WHERE key = ?",
                    (alert.key,),
                )
        return Delivery(alert.key, status, detail, int(pending_suppressed))

    def _deliver(self, payload: dict[str, Any]) -> tuple[str, str]:
        if not self.webhook_url:
            return "logged", "no webhook configured (monitor.alerts.webhook_url)"
        try:
            response = httpx.post(
                self.webhook_url,
                content=json.dumps(payload, default=str),
                headers={"content-type": "application/json"},
                timeout=self.timeout_seconds,
            )
        except httpx.HTTPError as exc:
            logger.error("alert %s not delivered to %s: %s", payload["key"], self.webhook_url, exc)
            return "failed", f"{type(exc).__name__}: {exc}"
        if response.status_code >= 300:
            logger.error(
                "alert %s not delivered: %s answered %s",
                payload["key"],
                self.webhook_url,
                response.status_code,
            )
            return "failed", f"webhook answered HTTP {response.status_code}"
        return "sent", f"HTTP {response.status_code}"

    def state(self) -> list[dict[str, Any]]:
        """Every key with its counters (for status output and tests)."""
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM alert_state ORDER BY key").fetchall()
        return [dict(r) for r in rows]
