"""Feature sources of the service: the packaged event snapshot and the protocol stores follow."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipelines.core.io import md5_file
from pipelines.features.definitions import (
    ENTITY_KEYS,
    FEATURE_SETS,
    EventIndex,
    FeatureSet,
    evaluate,
)
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

    # The index last built in this process, by (md5, sha256, feature set) of its file. An
    # index is read-only once built, so a reload that names the same snapshot (a kill
    # switch, a fault cleared, another model) reuses it instead of building it again:
    # building takes about a second of CPU on the full preset, which every worker spent
    # at once while serving.
    _last: tuple[tuple[str, str | None, str], EventIndex] | None = None

    @classmethod
    def open(cls, folder: Path, ref: FeatureRef) -> SnapshotFeatureSource:
        """Load the snapshot after checking its md5 and sha256 against the release."""
        import pandas as pd

        path = folder / "events.parquet"
        check_file(
            path,
            ref.files["events.parquet"],
            ref.sha256.get("events.parquet"),
            f"feature snapshot {ref.tag}",
        )
        key = (ref.files["events.parquet"], ref.sha256.get("events.parquet"), ref.feature_set)
        last = SnapshotFeatureSource._last
        if last is not None and last[0] == key:
            return cls(last[1], ref.tag)
        events = pd.read_parquet(
            path, columns=["user_id", "item_id", "surface", "ts", "clicked", "click_ts"]
        )
        index = EventIndex(events, FEATURE_SETS[ref.feature_set])
        SnapshotFeatureSource._last = (key, index)
        return cls(index, ref.tag)

    def lookup(
        self,
        users: Sequence[str],
        items: Sequence[str],
        surfaces: Sequence[str],
        devices: Sequence[str],
        t_ms: np.ndarray,
    ) -> FeatureBatch:
        # compute, not lookup: the same float64 matrix without a DataFrame round trip
        X = self.index.compute(list(users), list(items), list(surfaces), list(devices), t_ms)
        return FeatureBatch(X, np.minimum(t_ms, self.index.as_of_ms))

    def lookup_one_user(
        self, user: str, items: Sequence[str], surface: str, device: str, t_ms: int
    ) -> FeatureBatch:
        """Vectors of one user, surface, device and time against many items (ranking).

        The features that do not depend on the item (user, user x surface, request
        context) are computed once, from one query; only the item-dependent ones per
        item. Same values as ``lookup`` of the expanded rows (same ``evaluate``).
        """
        n = len(items)
        fs = self.index.feature_set
        user_side, item_side = _split_by_item(fs)
        # The call's user, surface and device are coded once: the codes of entities made of
        # them alone have one entry, those with the item one per item (numpy broadcasting).
        codes = self.index.entity_codes(
            {"user_id": [user], "item_id": list(items), "surface": [surface], "device": [device]}
        )
        t = np.full(n, t_ms, dtype=np.int64)
        X = np.empty((n, len(fs.features)), dtype=np.float64)
        one = {entity: c[:1] for entity, c in codes.items()}
        X[:, user_side[0]] = evaluate(
            user_side[1], self.index.histories, one, [surface], [device], t[:1]
        )
        X[:, item_side[0]] = evaluate(
            item_side[1], self.index.histories, codes, [surface] * n, [device] * n, t
        )
        return FeatureBatch(X, np.minimum(t, self.index.as_of_ms))

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "tag": self.tag,
            "events": self.index.n_events,
            "as_of": iso_ms(self.index.as_of_ms),
        }


_SPLITS: dict[str, tuple[tuple[list[int], FeatureSet], tuple[list[int], FeatureSet]]] = {}


def _split_by_item(
    fs: FeatureSet,
) -> tuple[tuple[list[int], FeatureSet], tuple[list[int], FeatureSet]]:
    """The feature set's columns that do not depend on the item, and those that do, each
    with a feature set of just those features (for ``evaluate``)."""
    if fs.name not in _SPLITS:
        parts = []
        for by_item in (False, True):
            cols = [
                j
                for j, f in enumerate(fs.features)
                if ("item_id" in ENTITY_KEYS.get(f.entity, ())) == by_item
            ]
            names = {fs.features[j].name for j in cols}
            sub = FeatureSet(
                name=fs.name,
                features=tuple(fs.features[j] for j in cols),
                prior_ctr=fs.prior_ctr,
                prior_strength=fs.prior_strength,
                categorical=tuple(c for c in fs.categorical if c in names),
                growing=tuple(g for g in fs.growing if g in names),
            )
            parts.append((cols, sub))
        _SPLITS[fs.name] = (parts[0], parts[1])
    return _SPLITS[fs.name]


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
