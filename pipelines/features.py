"""One feature definition for offline point-in-time builds and online lookups.

A feature set (``CTR_V1``) declares each feature once: its entity, source events,
aggregation, window, dtype, default for an empty history and a description.
``EventIndex`` computes every declared feature for any (user, item, surface,
device, time) query from an event log. The offline builder asks it for every
impression in the log; the online store asks it for one request; both therefore
run the very same code.

Semantics (point-in-time correctness):

* a query at time ``t`` sees impressions with ``ts < t`` and clicks with
  ``click_ts < t`` (a click is an event at the moment it happens, not at the
  moment of its impression); an event at exactly ``t`` is not visible;
* a window ``w`` covers the open interval ``(t - w, t)``; ``None`` means all
  history before ``t``;
* ``ctr`` features are smoothed towards ``prior_ctr`` with ``prior_strength``
  pseudo-impressions, so an empty history yields the prior;
* ``seconds_since`` features are capped at their window and equal the window
  length when the entity has no event in it.

Implementation: per (entity, source) one sorted int64 array of
``entity_code * 2**40 + (time_ms - EPOCH)``; a windowed count is the difference
of two binary searches, so a query costs O(log n) and a batch is vectorized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipelines.generate import DEVICES, SURFACES

EPOCH_MS = int(pd.Timestamp("2020-01-01", tz="UTC").value // 1_000_000)
STRIDE = 1 << 40  # ms; covers times up to 2054
WINDOWS_MS: dict[str | None, int | None] = {
    "1h": 3_600_000,
    "24h": 86_400_000,
    "7d": 7 * 86_400_000,
    None: None,
}
ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "item": ("item_id",),
    "user_surface": ("user_id", "surface"),
    "item_surface": ("item_id", "surface"),
    "request": (),
}


@dataclass(frozen=True)
class Feature:
    """One declared feature."""

    name: str
    entity: str  # a key of ENTITY_KEYS
    source: str  # "impressions", "clicks", "impressions+clicks" or "request"
    agg: str  # "count", "ctr", "seconds_since" or "context"
    window: str | None  # a key of WINDOWS_MS; None = all history
    dtype: str
    default: float
    description: str


@dataclass(frozen=True)
class FeatureSet:
    """A named, versioned list of features plus the smoothing constants they share."""

    name: str
    features: tuple[Feature, ...]
    prior_ctr: float = 0.1
    prior_strength: float = 20.0
    categorical: tuple[str, ...] = field(default=("surface_code", "device_code"))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature set {self.name} has no feature {name!r}")


def _count(entity: str, source: str, window: str | None, what: str) -> Feature:
    span = f"in the last {window}" if window else "in all history"
    return Feature(
        f"{entity}_{what}_{window or 'all'}",
        entity,
        source,
        "count",
        window,
        "float64",
        0.0,
        f"number of {source} of this {entity.replace('_', ' x ')} {span} before t",
    )


def _ctr(entity: str, window: str | None, prior: float) -> Feature:
    span = f"the last {window}" if window else "all history"
    return Feature(
        f"{entity}_ctr_{window or 'all'}",
        entity,
        "impressions+clicks",
        "ctr",
        window,
        "float64",
        prior,
        f"smoothed click-through rate of this {entity.replace('_', ' x ')} over {span} before t",
    )


def _since(entity: str, source: str, window: str) -> Feature:
    return Feature(
        f"{entity}_secs_since_{source[:-1]}",
        entity,
        source,
        "seconds_since",
        window,
        "float64",
        float(WINDOWS_MS[window] or 0) / 1000.0,
        f"seconds since this {entity}'s last {source[:-1]} before t, capped at {window}",
    )


_PRIOR = 0.1
CTR_V1 = FeatureSet(
    name="ctr_v1",
    prior_ctr=_PRIOR,
    features=(
        _count("user", "impressions", "1h", "impr"),
        _count("user", "impressions", "24h", "impr"),
        _count("user", "clicks", "24h", "clicks"),
        _ctr("user", "24h", _PRIOR),
        _count("user", "impressions", "7d", "impr"),
        _ctr("user", "7d", _PRIOR),
        _since("user", "impressions", "7d"),
        _since("user", "clicks", "7d"),
        _count("item", "impressions", "24h", "impr"),
        _ctr("item", "24h", _PRIOR),
        _count("item", "impressions", None, "impr"),
        _ctr("item", None, _PRIOR),
        _count("user_surface", "impressions", "7d", "impr"),
        _ctr("user_surface", "7d", _PRIOR),
        _ctr("item_surface", None, _PRIOR),
        Feature(
            "surface_code",
            "request",
            "request",
            "context",
            None,
            "int64",
            0,
            f"surface of the request as a code: {dict(enumerate(SURFACES))}",
        ),
        Feature(
            "device_code",
            "request",
            "request",
            "context",
            None,
            "int64",
            0,
            f"device of the request as a code: {dict(enumerate(DEVICES))}",
        ),
        Feature(
            "hour_of_day",
            "request",
            "request",
            "context",
            None,
            "int64",
            0,
            "UTC hour of the request time t",
        ),
    ),
)
FEATURE_SETS: dict[str, FeatureSet] = {CTR_V1.name: CTR_V1}


def to_ms(values: pd.Series | pd.DatetimeIndex | Sequence[object]) -> np.ndarray:
    """Convert timestamps (tz-aware or naive UTC, any unit) to int64 epoch milliseconds."""
    stamps = pd.to_datetime(pd.Series(values), utc=True)
    return stamps.dt.as_unit("ms").astype("int64").to_numpy()


class EventIndex:
    """Sorted per-entity event times that answer point-in-time feature queries."""

    def __init__(self, events: pd.DataFrame, feature_set: FeatureSet = CTR_V1) -> None:
        self.feature_set = feature_set
        self.n_events = len(events)
        self._vocab = {
            "user_id": pd.Index(pd.unique(events["user_id"].to_numpy(dtype=object))),
            "item_id": pd.Index(pd.unique(events["item_id"].to_numpy(dtype=object))),
        }
        ts = to_ms(events["ts"])
        clicked = events["clicked"].to_numpy() == 1
        click_ts = to_ms(events["click_ts"])[clicked] if clicked.any() else np.empty(0, np.int64)
        self.as_of_ms = int(max(ts.max(initial=0), click_ts.max(initial=0))) if len(ts) else 0
        codes = self._codes(events["user_id"], events["item_id"], events["surface"])
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        for feature in feature_set.features:
            for source in feature.source.split("+"):
                key = (feature.entity, source)
                if feature.entity == "request" or key in self._arrays:
                    continue
                entity_codes = codes[feature.entity]
                times = ts
                if source == "clicks":
                    entity_codes, times = entity_codes[clicked], click_ts
                composite = entity_codes.astype(np.int64) * STRIDE + (times - EPOCH_MS)
                composite.sort(kind="stable")
                self._arrays[key] = composite

    def _codes(self, user: object, item: object, surface: object) -> dict[str, np.ndarray]:
        user_code = self._vocab["user_id"].get_indexer(np.asarray(user, dtype=object))
        item_code = self._vocab["item_id"].get_indexer(np.asarray(item, dtype=object))
        surf = pd.Index(SURFACES).get_indexer(np.asarray(surface, dtype=object))
        n_s = len(SURFACES)
        both_user = (user_code >= 0) & (surf >= 0)
        both_item = (item_code >= 0) & (surf >= 0)
        return {
            "user": user_code,
            "item": item_code,
            "user_surface": np.where(both_user, user_code * n_s + surf, -1),
            "item_surface": np.where(both_item, item_code * n_s + surf, -1),
        }

    def lookup(
        self,
        user_id: object,
        item_id: object,
        surface: object,
        device: object,
        t_ms: np.ndarray,
    ) -> pd.DataFrame:
        """Feature rows for queries at times ``t_ms`` (epoch ms), in declared order."""
        t_ms = np.asarray(t_ms, dtype=np.int64)
        t_rel = np.clip(t_ms - EPOCH_MS, 0, STRIDE - 1)
        codes = self._codes(user_id, item_id, surface)
        counts: dict[tuple[str, str, str | None], np.ndarray] = {}
        out: dict[str, np.ndarray] = {}
        fs = self.feature_set
        for feature in fs.features:
            if feature.agg == "context":
                out[feature.name] = self._context(feature.name, surface, device, t_ms)
                continue
            entity_codes = codes[feature.entity]
            if feature.agg == "seconds_since":
                out[feature.name] = self._seconds_since(
                    self._arrays[(feature.entity, feature.source)],
                    entity_codes,
                    t_rel,
                    WINDOWS_MS[feature.window] or STRIDE,
                )
                continue
            sources = feature.source.split("+")
            for source in sources:
                ck = (feature.entity, source, feature.window)
                if ck not in counts:
                    counts[ck] = self._count(
                        self._arrays[(feature.entity, source)],
                        entity_codes,
                        t_rel,
                        WINDOWS_MS[feature.window],
                    )
            if feature.agg == "count":
                out[feature.name] = counts[(feature.entity, sources[0], feature.window)].astype(
                    np.float64
                )
            else:  # ctr
                impr = counts[(feature.entity, "impressions", feature.window)]
                clicks = counts[(feature.entity, "clicks", feature.window)]
                out[feature.name] = (clicks + fs.prior_strength * fs.prior_ctr) / (
                    impr + fs.prior_strength
                )
        return pd.DataFrame({f.name: out[f.name].astype(f.dtype) for f in fs.features})

    @staticmethod
    def _count(
        arr: np.ndarray, codes: np.ndarray, t_rel: np.ndarray, window: int | None
    ) -> np.ndarray:
        base = codes.astype(np.int64) * STRIDE
        hi = np.searchsorted(arr, base + t_rel, side="left")
        if window is None:
            lo = np.searchsorted(arr, base, side="left")
        else:
            lo = np.searchsorted(arr, base + np.maximum(t_rel - window, -1), side="right")
        result = hi - lo
        result[codes < 0] = 0
        return result

    @staticmethod
    def _seconds_since(
        arr: np.ndarray, codes: np.ndarray, t_rel: np.ndarray, window: int
    ) -> np.ndarray:
        base = codes.astype(np.int64) * STRIDE
        hi = np.searchsorted(arr, base + t_rel, side="left")
        prev = arr[np.maximum(hi - 1, 0)] if len(arr) else np.full(len(codes), -1, np.int64)
        age = t_rel - (prev - base)
        found = (codes >= 0) & (hi > 0) & (prev >= base) & (age < window)
        return np.where(found, age, window) / 1000.0

    @staticmethod
    def _context(name: str, surface: object, device: object, t_ms: np.ndarray) -> np.ndarray:
        if name == "surface_code":
            return np.maximum(pd.Index(SURFACES).get_indexer(np.asarray(surface, dtype=object)), 0)
        if name == "device_code":
            return np.maximum(pd.Index(DEVICES).get_indexer(np.asarray(device, dtype=object)), 0)
        if name == "hour_of_day":
            return (t_ms // 3_600_000) % 24
        raise KeyError(f"no context feature named {name!r}")


def point_in_time_features(events: pd.DataFrame, feature_set: FeatureSet = CTR_V1) -> pd.DataFrame:
    """Features for every impression in ``events`` at its own time, from strictly earlier events.

    Returns the event keys (event_id, ts, user_id, item_id, surface, device, clicked)
    followed by the declared features, one row per impression in input order.
    """
    index = EventIndex(events, feature_set)
    feats = index.lookup(
        events["user_id"],
        events["item_id"],
        events["surface"],
        events["device"],
        to_ms(events["ts"]),
    )
    keys = events[["event_id", "ts", "user_id", "item_id", "surface", "device", "clicked"]]
    return pd.concat([keys.reset_index(drop=True), feats], axis=1)


def feature_catalog_markdown(feature_set: FeatureSet = CTR_V1) -> str:
    """A markdown table of the feature set, for docs and model cards."""
    lines = [
        f"# Feature set `{feature_set.name}`",
        "",
        f"Smoothing: prior CTR {feature_set.prior_ctr}, {feature_set.prior_strength:g} "
        "pseudo-impressions. A query at time t sees events strictly before t; "
        "window w is (t - w, t).",
        "",
        "| name | entity | source | aggregation | window | dtype | default | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in feature_set.features:
        lines.append(
            f"| `{f.name}` | {f.entity} | {f.source} | {f.agg} | {f.window or 'all'} | "
            f"{f.dtype} | {f.default:g} | {f.description} |"
        )
    return "\n".join(lines) + "\n"
