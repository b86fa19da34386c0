"""The service's feature source backed by the online store, with the packaged snapshot as fallback.

Which source the service reads (``feature_source_for``), in this order:

Details: docs/serving.md.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.features.online_store import IngestReport, OnlineStore, StoreError
from pipelines.modeling.release import OnlineStoreRef, Release
from pipelines.serving.sources import FeatureBatch, FeatureSource, FeatureStoreUnavailable

logger = logging.getLogger("ctr.features")

ENV_URL = "CTR_FEATURE_STORE_URL"
_OFF = ("none", "off", "snapshot")


def _store_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (StoreError, sqlite3.Error, OSError)
    try:
        import redis

        errors += (redis.RedisError,)
    except ImportError:  # redis is needed only for a redis:// store
        pass
    return errors


STORE_ERRORS = _store_errors()


def resolve_url(url: str, root: Path | None = None) -> str:
    """A store URL with a relative SQLite path made absolute against ``root`` (or the cwd)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        base = root if root is not None else Path(os.environ.get("MLOPS_PROJECT_ROOT", "."))
        return f"{prefix}{(base / url[len(prefix) :]).resolve()}"
    return url


def redact(url: str) -> str:
    """The URL without a password, for logs and /metadata."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class OnlineStoreFeatureSource:
    """``FeatureSource`` reading the online store; ``fallback`` answers while it cannot."""

    name = "online_store"

    def __init__(
        self,
        ref: OnlineStoreRef,
        freshness_sla_seconds: float,
        fallback: FeatureSource | None = None,
        root: Path | None = None,
    ) -> None:
        self.ref = ref
        self.url = resolve_url(ref.url, root)
        self.sla = float(freshness_sla_seconds)
        self.fallback = fallback
        self._sqlite_path = (
            Path(self.url[len("sqlite:///") :]) if self.url.startswith("sqlite:///") else None
        )
        self._store: OnlineStore | None = None
        self._ingest_store: OnlineStore | None = None
        self._file_id: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._ingest_lock = threading.Lock()
        self._retry_at = 0.0
        self.degraded_since: float | None = None  # wall time of the first failure of an outage
        self.last_error: str | None = None
        self.last_watermark_ms = 0
        self.outages: list[dict[str, Any]] = []
        self._outage_rows = 0
        self.counters = {"store_rows": 0, "fallback_rows": 0, "failures": 0, "reopens": 0}

    # --- connection --------------------------------------------------------------
    def _open(self) -> OnlineStore:
        if self._sqlite_path is not None and not self._sqlite_path.is_file():
            # Opening would create an empty file: the service never materializes a store.
            raise StoreError(
                f"online store file {self._sqlite_path} does not exist; ingest events with "
                f"`mlops features ingest FILE --store {self.ref.url}`"
            )
        store = OnlineStore.open(
            self.url,
            self.ref.feature_set,
            self.ref.allowed_lateness_seconds,
            self.sla,
            timeout_seconds=self.ref.timeout_ms / 1000.0,
        )
        if self._sqlite_path is not None:
            st = os.stat(self._sqlite_path)
            self._file_id = (st.st_dev, st.st_ino)
        self.counters["reopens"] += 1
        return store

    def _current(self) -> OnlineStore:
        """The open store, reopened if its SQLite file was replaced; errors if it vanished."""
        with self._lock:
            if self._store is not None and self._sqlite_path is not None:
                try:
                    st = os.stat(self._sqlite_path)
                except FileNotFoundError:
                    raise StoreError(f"online store file {self._sqlite_path} was removed") from None
                if (st.st_dev, st.st_ino) != self._file_id:  # replaced: read the new file
                    self._close_store()
            if self._store is None:
                self._store = self._open()
            return self._store

    def _close_store(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception:  # closing a broken handle must not mask the outage
                pass
            self._store = None

    def connect(self) -> str | None:
        """Try the store once now (at load); returns the problem, or None if it answers."""
        try:
            store = self._current()
            self.last_watermark_ms = int(store.stats()["watermark_ms"])
            if self.last_watermark_ms == 0:
                raise StoreError(f"the online store at {redact(self.url)} holds no events yet")
            return None
        except STORE_ERRORS as exc:
            self._failed(exc, 0)
            return self.last_error

    # --- lookups -----------------------------------------------------------------
    def lookup(
        self,
        users: Sequence[str],
        items: Sequence[str],
        surfaces: Sequence[str],
        devices: Sequence[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        """Vectors from the store; from the fallback (with a note) while the store fails."""
        n = len(users)
        if time.monotonic() >= self._retry_at:
            try:
                batch = self._from_store(users, items, surfaces, devices, t_ms)
            except STORE_ERRORS as exc:
                self._failed(exc, n)
            else:
                self._recovered()
                self.counters["store_rows"] += n
                return batch
        else:
            self._outage_rows += n
        reason = self.last_error or "online store unavailable"
        if self.fallback is None:
            raise FeatureStoreUnavailable(reason)
        batch = self.fallback.lookup(users, items, surfaces, devices, t_ms)
        self.counters["fallback_rows"] += n
        batch.note = f"online store unavailable ({reason}); features from the packaged snapshot"
        return batch

    def _from_store(
        self,
        users: Sequence[str],
        items: Sequence[str],
        surfaces: Sequence[str],
        devices: Sequence[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        result = self._current().lookup_many(users, items, surfaces, devices, t_ms)
        if result.as_of_ms == 0:
            raise StoreError(f"the online store at {redact(self.url)} holds no events yet")
        self.last_watermark_ms = result.as_of_ms
        X = result.features.to_numpy(np.float64)
        as_of = np.minimum(t_ms, result.as_of_ms).astype(np.int64)
        old = np.flatnonzero(~result.exact)
        if len(old) and self.fallback is not None:
            # Older than the store's exact range: the snapshot is exact up to its last event.
            idx = old.tolist()
            sub = self.fallback.lookup(
                [users[i] for i in idx],
                [items[i] for i in idx],
                [surfaces[i] for i in idx],
                [devices[i] for i in idx],
                t_ms[old],
            )
            covered = sub.as_of_ms == t_ms[old]
            X[old[covered]] = sub.X[covered]
        return FeatureBatch(X, as_of)

    def _failed(self, exc: BaseException, rows: int) -> None:
        why = f"{type(exc).__name__}: {exc}"
        self.counters["failures"] += 1
        self._retry_at = time.monotonic() + self.ref.retry_seconds
        if self.degraded_since is None:
            self.degraded_since = time.time()
            self._outage_rows = 0
            logger.error("online store %s unavailable: %s", redact(self.url), why)
        self._outage_rows += rows
        self.last_error = why
        with self._lock:
            if not isinstance(exc, StoreError) or "removed" not in str(exc):
                self._close_store()  # reopened at the next try (a restarted server, a new file)

    def _recovered(self) -> None:
        if self.degraded_since is None:
            return
        ended = time.time()
        outage = {
            "started": _iso(self.degraded_since),
            "ended": _iso(ended),
            "seconds": round(ended - self.degraded_since, 3),
            "cause": self.last_error,
            "fallback_rows": self._outage_rows,
        }
        self.outages = [*self.outages[-19:], outage]
        logger.warning(
            "online store %s answers again after %.1f s (%d row(s) from the fallback)",
            redact(self.url),
            outage["seconds"],
            self._outage_rows,
        )
        self.degraded_since = None
        self.last_error = None

    # --- ingest ------------------------------------------------------------------
    def ingest(self, events: pd.DataFrame, where: str = "the ingested batch") -> IngestReport:
        """Apply RawEvents rows to the store (``OnlineStore.ingest``); errors propagate.

        Uses its own connection with the store's ordinary lock timeouts, so a batch
        waits for another writer instead of failing after the lookup timeout.
        """
        with self._ingest_lock:
            if self._ingest_store is None:
                self._ingest_store = OnlineStore.open(
                    self.url, self.ref.feature_set, self.ref.allowed_lateness_seconds, self.sla
                )
            try:
                return self._ingest_store.ingest(events, where)
            except STORE_ERRORS:
                self._ingest_store.close()
                self._ingest_store = None
                raise

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "url": redact(self.url),
            "as_of": _iso(self.last_watermark_ms / 1000) if self.last_watermark_ms else None,
            "timeout_ms": self.ref.timeout_ms,
            "retry_seconds": self.ref.retry_seconds,
            "degraded": self.degraded_since is not None,
            "degraded_since": None if self.degraded_since is None else _iso(self.degraded_since),
            "last_error": self.last_error,
            "counters": dict(self.counters),
            "outages": list(self.outages),
            "fallback": None if self.fallback is None else self.fallback.status(),
        }

    def close(self) -> None:
        with self._lock:
            self._close_store()
        with self._ingest_lock:
            if self._ingest_store is not None:
                self._ingest_store.close()
                self._ingest_store = None


def store_ref_for(release: Release, env: Mapping[str, str] | None = None) -> OnlineStoreRef | None:
    """The store the service should read (see the module docstring), or None: snapshot only."""
    env = os.environ if env is None else env
    override = env.get(ENV_URL, "").strip()
    if override.lower() in _OFF:
        return None
    ref = release.online_store
    if override:
        base = ref or OnlineStoreRef.model_validate(
            {"url": override, "feature_set": release.feature_source.feature_set}
        )
        ref = base.model_copy(update={"url": override})
    return ref


def feature_source_for(
    release: Release,
    snapshot: FeatureSource | None,
    problems: list[str],
    env: Mapping[str, str] | None = None,
    root: Path | None = None,
) -> FeatureSource | None:
    """The release's feature source: the online store with ``snapshot`` as fallback, or it alone.

    A store that cannot answer at load is reported in ``problems`` and retried per request.
    """
    ref = store_ref_for(release, env)
    if ref is None:
        return snapshot
    source = OnlineStoreFeatureSource(ref, release.policy.freshness_sla_seconds, snapshot, root)
    problem = source.connect()
    if problem:
        problems.append(
            f"online store ({redact(source.url)}): {problem}; "
            + ("the packaged snapshot answers meanwhile" if snapshot else "no fallback")
        )
    return source


def events_from_json(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """RawEvents rows posted as JSON objects to a frame for ``OnlineStore.ingest``.

    ``ts``/``click_ts`` may be ISO-8601 strings (UTC when no zone is given) or epoch
    milliseconds. A time that cannot be parsed becomes missing, so the contract check
    rejects its row with a reason instead of failing the batch.
    """
    frame = pd.DataFrame(list(rows))
    for col in ("ts", "click_ts"):
        if col not in frame.columns:
            continue
        values = frame[col]
        numeric = pd.to_numeric(values, errors="coerce")
        is_num = numeric.notna() & values.map(lambda v: isinstance(v, int | float))
        parsed = pd.to_datetime(values.where(~is_num), errors="coerce", utc=True, format="ISO8601")
        from_ms = pd.to_datetime(numeric.where(is_num), unit="ms", utc=True)
        frame[col] = parsed.where(~is_num, from_ms)
    return frame


def rejected_json(report: IngestReport, limit: int = 100) -> list[dict[str, Any]]:
    """The first ``limit`` rejected rows of a report as JSON-ready records with their reason."""
    rows = report.rejected_rows.head(limit)
    out = []
    for record in rows.astype(object).where(rows.notna(), None).to_dict(orient="records"):
        out.append({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in record.items()})
    return out


def _iso(seconds: float) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat(timespec="milliseconds")


__all__ = [
    "ENV_URL",
    "STORE_ERRORS",
    "OnlineStoreFeatureSource",
    "events_from_json",
    "feature_source_for",
    "rejected_json",
    "redact",
    "resolve_url",
    "store_ref_for",
]
