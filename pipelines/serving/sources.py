"""Feature sources of the service: the packaged event snapshot and the protocol stores follow."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipelines.core.io import md5_file
from pipelines.features.definitions import FEATURE_SETS, EventIndex
from pipelines.modeling.release import FeatureRef, file_sha256


class ArtifactMismatch(RuntimeError):
    """A model file does not match the hash recorded in the release."""


class FeatureStoreUnavailable(RuntimeError):
    """The online feature source cannot answer; the baseline answers instead."""


# --- features ------------------------------------------------------------------
@dataclass
class FeatureBatch:
    """Feature vectors in the release's feature order and the time each is current as of."""

    X: np.ndarray  # float64 (rows, features)
    as_of_ms: np.ndarray  # int64 (rows,)
    note: str | None = None  # set when a fallback source answered: why (degraded_reason)


class FeatureSource(Protocol):
    """What the predictor needs from an online store: vectors at given times and a status."""

    name: str

    def lookup(
        self,
        users: Sequence[str],
        items: Sequence[str],
        surfaces: Sequence[str],
        devices: Sequence[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        """Point-in-time vectors; raise FeatureStoreUnavailable when the store cannot answer."""
        ...

    def status(self) -> dict[str, Any]:
        """A JSON-ready description (kind, as-of time, size) for /metadata."""
        ...


class SnapshotFeatureSource:
    """Features computed by ``EventIndex`` from the release's event snapshot.

    A vector at time t is exact for t up to the snapshot's last event; after that
    it is as of that last event, and its age grows with t.
    """

    name = "snapshot"

    def __init__(self, index: EventIndex, tag: str = "") -> None:
        self.index = index
        self.tag = tag

    @classmethod
    def open(cls, folder: Path, ref: FeatureRef) -> SnapshotFeatureSource:
        """Load the snapshot after checking its md5 against the release."""
        import pandas as pd

        path = folder / "events.parquet"
        check_file(
            path,
            ref.files["events.parquet"],
            ref.sha256.get("events.parquet"),
            f"feature snapshot {ref.tag}",
        )
        events = pd.read_parquet(
            path, columns=["user_id", "item_id", "surface", "ts", "clicked", "click_ts"]
        )
        return cls(EventIndex(events, FEATURE_SETS[ref.feature_set]), ref.tag)

    def lookup(
        self,
        users: Sequence[str],
        items: Sequence[str],
        surfaces: Sequence[str],
        devices: Sequence[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        X = self.index.lookup(users, items, surfaces, devices, t_ms).to_numpy(np.float64)
        return FeatureBatch(X, np.minimum(t_ms, self.index.as_of_ms))

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "tag": self.tag,
            "events": self.index.n_events,
            "as_of": iso_ms(self.index.as_of_ms),
        }


def check_file(path: Path, md5: str, sha256: str | None, what: str) -> None:
    """Refuse a file whose md5 or (when recorded) sha256 differs from the release's.

    Messages name the file, never its folder: they reach /metadata and degraded_reason.
    """
    if not path.is_file():
        raise ArtifactMismatch(f"{what}: {path.name} is missing from its model store folder")
    actual = md5_file(path)
    if actual != md5:
        raise ArtifactMismatch(
            f"{what}: {path.name} has md5 {actual}, the release records {md5}; refusing to load it"
        )
    if sha256:
        actual = file_sha256(path)
        if actual != sha256:
            raise ArtifactMismatch(
                f"{what}: {path.name} has sha256 {actual}, the release records {sha256}; "
                "refusing to load it"
            )


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as an ISO-8601 UTC time (seconds)."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")
