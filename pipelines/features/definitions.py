"""One feature definition for offline point-in-time builds and online lookups.

A feature set (``CTR_V1``) declares each feature once: its entity, source events,
aggregation, window, optional TTL, dtype, default for an empty history and a
description. Everything else is derived from these declarations:

Details: docs/features.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.domain import DEVICES, SURFACES
from pipelines.features import search
from pipelines.features.keys import Vocabulary

EPOCH_MS = int(pd.Timestamp("2020-01-01", tz="UTC").value // 1_000_000)
STRIDE = 1 << 40  # ms; event times must lie in [2020-01-01, 2054-11-04)
MAX_CODES = (1 << 62) // STRIDE  # entity codes per (entity, source) array without int64 overflow
NO_EVENT = np.iinfo(np.int64).min // 4  # "latest event" of an entity without one
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^([1-9][0-9]*)(ms|s|m|h|d)$")

ENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "user": ("user_id",),
    "item": ("item_id",),
    "user_surface": ("user_id", "surface"),
    "item_surface": ("item_id", "surface"),
    "request": (),
}
SOURCES = ("impressions", "clicks")
AGGREGATIONS = ("count", "ctr", "seconds_since", "context")


class FeatureDefinitionError(ValueError):
    """A feature declaration is inconsistent; the message names the feature and the fix."""


def duration_ms(text: str | None) -> int | None:
    """Parse a window/TTL such as ``90s``, ``1h`` or ``7d`` into milliseconds (``None`` stays)."""
    if text is None:
        return None
    match = _DURATION.match(text)
    if not match:
        raise FeatureDefinitionError(
            f"duration {text!r} is not understood; write a positive whole number followed by "
            f"one of {list(_UNITS_MS)}, e.g. '1h' or '7d'"
        )
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


# The windows CTR_V1 uses, in ms (None = all history); any duration_ms() string works.
WINDOWS_MS: dict[str | None, int | None] = {w: duration_ms(w) for w in ("1h", "24h", "7d", None)}


# Request-context features: the only per-name logic, one entry per feature with its
# numpy and SQL forms side by side (the offline engine proves them equal).
def _code_of(vocabulary: tuple[str, ...]) -> Callable[[object], np.ndarray]:
    index = pd.Index(vocabulary)
    online = Vocabulary(vocabulary)  # request-time lists (keys.py)

    def encode(values: object) -> np.ndarray:
        if isinstance(values, (list, tuple)):  # the online path
            return np.maximum(online.codes(values), 0)
        return np.maximum(index.get_indexer(np.asarray(values, dtype=object)), 0)

    return encode


def _code_sql(column: str, vocabulary: tuple[str, ...]) -> str:
    cases = " ".join(f"WHEN '{v}' THEN {i}" for i, v in enumerate(vocabulary))
    return f"CASE {column} {cases} ELSE 0 END"


_SURFACE_CODE = _code_of(SURFACES)
_DEVICE_CODE = _code_of(DEVICES)
CONTEXT: dict[str, tuple[str, Callable[[object, object, np.ndarray], np.ndarray], str]] = {
    # name: (description, numpy(surface, device, t_ms), SQL over columns surface, device, t)
    "surface_code": (
        f"surface of the request as a code: {dict(enumerate(SURFACES))}",
        lambda surface, device, t: _SURFACE_CODE(surface),
        _code_sql("surface", SURFACES),
    ),
    "device_code": (
        f"device of the request as a code: {dict(enumerate(DEVICES))}",
        lambda surface, device, t: _DEVICE_CODE(device),
        _code_sql("device", DEVICES),
    ),
    "hour_of_day": (
        "UTC hour of the request time t",
        lambda surface, device, t: (np.asarray(t, dtype=np.int64) // 3_600_000) % 24,
        "CAST(floor(t / 3600000) AS BIGINT) % 24",  # portable: DuckDB and Spark SQL
    ),
}


@dataclass(frozen=True)
class Feature:
    """One declared feature (see the module docstring for the exact semantics)."""

    name: str
    entity: str  # a key of ENTITY_KEYS
    source: str  # "impressions", "clicks", "impressions+clicks" or "request"
    agg: str  # one of AGGREGATIONS
    window: str | None  # a duration such as "1h" or "7d"; None = all history
    dtype: str
    default: float
    description: str
    ttl: str | None = None  # a duration; older latest events turn the value into `default`

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if self.entity not in ENTITY_KEYS:
            raise FeatureDefinitionError(
                f"{where}: entity {self.entity!r} not in {list(ENTITY_KEYS)}"
            )
        if self.agg not in AGGREGATIONS:
            raise FeatureDefinitionError(f"{where}: aggregation {self.agg!r} not in {AGGREGATIONS}")
        window, ttl = duration_ms(self.window), duration_ms(self.ttl)
        if self.agg == "context":
            if self.entity != "request" or self.source != "request" or self.name not in CONTEXT:
                raise FeatureDefinitionError(
                    f"{where}: context features use entity and source 'request' and a name "
                    f"from pipelines.features.definitions.CONTEXT {list(CONTEXT)}"
                )
            return
        if self.entity == "request":
            raise FeatureDefinitionError(f"{where}: only context features use entity 'request'")
        wanted = {"count": None, "seconds_since": None, "ctr": ("impressions", "clicks")}[self.agg]
        if wanted and self.sources != wanted:
            raise FeatureDefinitionError(f"{where}: ctr needs source 'impressions+clicks'")
        if not wanted and (len(self.sources) != 1 or self.sources[0] not in SOURCES):
            raise FeatureDefinitionError(f"{where}: {self.agg} needs one source of {SOURCES}")
        if self.agg == "seconds_since" and window is None:
            raise FeatureDefinitionError(f"{where}: seconds_since needs a window (its cap)")
        if ttl is not None and window is not None and ttl > window:
            raise FeatureDefinitionError(
                f"{where}: a ttl ({self.ttl}) longer than the window ({self.window}) has no effect"
            )

    @functools.cached_property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.source.split("+"))

    @functools.cached_property
    def window_ms(self) -> int | None:
        return duration_ms(self.window)

    @functools.cached_property
    def ttl_ms(self) -> int | None:
        return duration_ms(self.ttl)


@dataclass(frozen=True)
class FeatureSet:
    """A named, versioned list of features plus the smoothing constants they share.

    The name carries the version (``ctr_v1``); ``fingerprint`` hashes every
    declaration, so any edit is visible in the catalog, the model card and the
    online store, which refuses to serve a fingerprint it was not built with.
    """

    name: str
    features: tuple[Feature, ...]
    prior_ctr: float = 0.1
    prior_strength: float = 20.0
    categorical: tuple[str, ...] = field(default=("surface_code", "device_code"))
    # Features that grow by construction (counts over all history): their level rises
    # while history accumulates, so drift monitoring judges only a fall (docs/monitoring.md).
    growing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        unknown = [g for g in self.growing if g not in names]
        if unknown:
            raise FeatureDefinitionError(
                f"feature set {self.name}: growing features {unknown} are not declared"
            )
        if not (0.0 <= self.prior_ctr <= 1.0 and self.prior_strength > 0):
            raise FeatureDefinitionError(
                f"feature set {self.name}: prior_ctr must lie in [0, 1] and prior_strength be "
                f"positive (got {self.prior_ctr}, {self.prior_strength}); a CTR stays in [0, 1]"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FeatureDefinitionError(f"feature set {self.name}: duplicate names {dupes}")
        missing = [c for c in self.categorical if c not in names]
        if missing:
            raise FeatureDefinitionError(
                f"feature set {self.name}: categorical {missing} undeclared"
            )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def __getitem__(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"feature set {self.name} has no feature {name!r}")

    @functools.cached_property
    def fingerprint(self) -> str:
        """Short hash of every declaration (names, semantics, constants, order)."""
        body = {
            "name": self.name,
            "features": [asdict(f) for f in self.features],
            "prior_ctr": self.prior_ctr,
            "prior_strength": self.prior_strength,
            "categorical": list(self.categorical),
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    @functools.cached_property
    def plan(self) -> _Plan:
        """The layout ``evaluate`` computes this feature set in (made on first use)."""
        return _plan(self)

    @functools.cached_property
    def entity_sources(self) -> dict[str, tuple[str, ...]]:
        """Entities with event features and the sources each needs, in declaration order."""
        out: dict[str, list[str]] = {}
        for f in self.features:
            if f.agg == "context":
                continue
            sources = out.setdefault(f.entity, [])
            sources.extend(s for s in f.sources if s not in sources)
        return {e: tuple(sorted(s, key=SOURCES.index)) for e, s in out.items()}

    @functools.cached_property
    def windows(self) -> dict[tuple[str, str], np.ndarray]:
        """The windows (ms, ascending) each (entity, source) counts its events over."""
        out: dict[tuple[str, str], set[int]] = {
            (entity, source): set()
            for entity, sources in self.entity_sources.items()
            for source in sources
        }
        for f in self.features:
            if f.agg != "context" and f.window_ms is not None:
                for source in f.sources:
                    out[(f.entity, source)].add(f.window_ms)
        return {key: np.array(sorted(ws), dtype=np.int64) for key, ws in out.items()}

    @functools.cached_property
    def key_columns(self) -> tuple[str, ...]:
        """Event/query columns that identify the entities of this feature set."""
        cols: list[str] = []
        for entity in self.entity_sources:
            cols.extend(c for c in ENTITY_KEYS[entity] if c not in cols)
        return tuple(cols)

    @functools.cached_property
    def horizon_ms(self) -> int:
        """Longest finite window or TTL: how far back the online store must keep event times."""
        spans = [f.window_ms or 0 for f in self.features] + [f.ttl_ms or 0 for f in self.features]
        return max(spans, default=0)


def _count(
    entity: str, source: str, window: str | None, what: str, ttl: str | None = None
) -> Feature:
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
        ttl,
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
        float(duration_ms(window) or 0) / 1000.0,
        f"seconds since this {entity}'s last {source[:-1]} before t, capped at {window}",
    )


def context_feature(name: str) -> Feature:
    return Feature(name, "request", "request", "context", None, "int64", 0, CONTEXT[name][0])


_PRIOR = 0.1
CTR_V1 = FeatureSet(
    name="ctr_v1",
    prior_ctr=_PRIOR,
    growing=("item_impr_all",),
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
        context_feature("surface_code"),
        context_feature("device_code"),
        context_feature("hour_of_day"),
    ),
)
FEATURE_SETS: dict[str, FeatureSet] = {CTR_V1.name: CTR_V1}


def get_feature_set(name: str) -> FeatureSet:
    """Look up a declared feature set by name."""
    if name not in FEATURE_SETS:
        raise FeatureDefinitionError(
            f"features.feature_set {name!r} is not declared; known: {sorted(FEATURE_SETS)}"
        )
    return FEATURE_SETS[name]


def to_ms(values: pd.Series | pd.DatetimeIndex | Sequence[object] | np.ndarray) -> np.ndarray:
    """Convert timestamps (tz-aware or naive UTC, any unit) to int64 epoch milliseconds."""
    stamps = pd.to_datetime(pd.Series(values), utc=True)
    return stamps.dt.as_unit("ms").astype("int64").to_numpy()


def check_times(times: np.ndarray, what: str) -> None:
    if len(times) and (times.min() < EPOCH_MS or times.max() >= EPOCH_MS + STRIDE):
        raise ValueError(
            f"{what} must lie between 2020-01-01 and 2054-11-04 (UTC), got "
            f"{pd.Timestamp(int(times.min()), unit='ms')} .. "
            f"{pd.Timestamp(int(times.max()), unit='ms')};"
            " fix the timestamps at their source"
        )


@dataclass
class Histories:
    """Per (entity, source) sorted composite event times, the input of ``evaluate``.

    ``arrays[(entity, source)]`` holds ``code * STRIDE + (time_ms - EPOCH_MS)``
    sorted ascending; ``starts[(entity, source)][c]`` is where code ``c`` begins
    (length ``n_codes + 1``); ``pruned[(entity, source)][c]``, when present,
    counts events of code ``c`` older than the retained times (online store).
    """

    arrays: dict[tuple[str, str], np.ndarray]
    starts: dict[tuple[str, str], np.ndarray]
    pruned: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_codes(
        cls,
        feature_set: FeatureSet,
        codes: Mapping[str, np.ndarray],
        n_codes: Mapping[str, int],
        times: Mapping[str, np.ndarray],
        masks: Mapping[str, np.ndarray | None],
        pruned: Mapping[tuple[str, str], np.ndarray] | None = None,
    ) -> Histories:
        """Build from per-event entity codes and per-source event times (any order)."""
        arrays: dict[tuple[str, str], np.ndarray] = {}
        starts: dict[tuple[str, str], np.ndarray] = {}
        for entity, sources in feature_set.entity_sources.items():
            if n_codes[entity] >= MAX_CODES:
                raise ValueError(
                    f"{n_codes[entity]:,} distinct {entity} keys exceed the index limit of "
                    f"{MAX_CODES:,}; build offline features with engine 'duckdb'"
                )
            for source in sources:
                mask = masks[source]
                ent = codes[entity] if mask is None else codes[entity][mask]
                composite = ent.astype(np.int64) * STRIDE + (times[source] - EPOCH_MS)
                composite.sort(kind="stable")
                arrays[(entity, source)] = composite
                bounds = np.arange(n_codes[entity] + 1, dtype=np.int64) * STRIDE
                starts[(entity, source)] = np.searchsorted(composite, bounds, side="left")
        return cls(arrays, starts, dict(pruned or {}))


_AGGREGATION_CODES = {
    "count": search.COUNT,
    "ctr": search.CTR,
    "seconds_since": search.SECONDS_SINCE,
}


@dataclass(frozen=True)
class _Plan:
    """How ``evaluate`` lays out a feature set for ``search.derive`` and ``search.assemble``:
    a column of ``counts`` per (entity, source, window) and of ``lasts`` per (entity,
    source) that some feature reads, and a ``spec`` row per event feature."""

    # per (entity, source): its count column per window of ``windows[key]``, its column of
    # the count over all history and of the latest event (-1 where no feature reads them)
    columns: dict[tuple[str, str], tuple[np.ndarray, int, int]]
    n_counts: int
    n_lasts: int
    spec: np.ndarray
    defaults: np.ndarray
    context: tuple[tuple[int, str], ...]  # (column, name) of the context features


def _plan(fs: FeatureSet) -> _Plan:
    count_of: dict[tuple[str, str, int | None], int] = {}
    last_of: dict[tuple[str, str], int] = {}
    for key, windows in fs.windows.items():
        for w in windows.tolist():
            count_of[(*key, w)] = len(count_of)
    spec, defaults, context = [], [], []
    for j, f in enumerate(fs.features):
        if f.agg == "context":
            context.append((j, f.name))
            continue
        # a ctr's sources are impressions (a) then clicks (b), as Feature checks; the
        # others have one source
        counted = [
            count_of.setdefault((f.entity, s, f.window_ms), len(count_of)) for s in f.sources
        ]
        wants_last = f.agg == "seconds_since" or f.ttl_ms is not None
        latest = [
            last_of.setdefault((f.entity, s), len(last_of)) if wants_last else -1 for s in f.sources
        ]
        spec.append(
            [j, _AGGREGATION_CODES[f.agg], counted[0], (counted + [-1])[1]]
            + [latest[0], (latest + [-1])[1], -1 if f.ttl_ms is None else f.ttl_ms]
        )
        defaults.append(float(f.default))
    return _Plan(
        columns={
            key: (
                np.array([count_of[(*key, w)] for w in ws.tolist()], np.int64),
                count_of.get((*key, None), -1),
                last_of.get(key, -1),
            )
            for key, ws in fs.windows.items()
        },
        n_counts=len(count_of),
        n_lasts=len(last_of),
        spec=np.array(spec, np.int64).reshape(-1, 7),
        defaults=np.array(defaults, np.float64),
        context=tuple(context),
    )


_NONE_PRUNED = np.zeros(0, np.int64)


def evaluate(
    feature_set: FeatureSet,
    histories: Histories,
    codes: Mapping[str, np.ndarray],
    surface: object,
    device: object,
    t_ms: np.ndarray,
) -> np.ndarray:
    """Feature matrix (rows = queries, columns = declared order, float64) at times ``t_ms``.

    ``codes[entity]`` gives each query's entity code in ``histories`` (-1 when
    the entity has no events), one per query. This is the single implementation of the
    feature semantics used by the numpy offline engine and by the online store: the
    searches and the values are compiled (``pipelines/features/search.py``), the request
    context is read here.
    """
    t_ms = np.asarray(t_ms, dtype=np.int64)
    n = len(t_ms)
    t_rel = np.minimum(np.maximum(t_ms - EPOCH_MS, 0), STRIDE - 1)  # np.clip costs more
    out = np.empty((n, len(feature_set.features)), dtype=np.float64)
    plan = feature_set.plan
    codes = {e: np.asarray(codes[e], dtype=np.int64) for e in feature_set.entity_sources}
    for entity, c in codes.items():
        if len(c) != n:
            raise ValueError(f"{len(c)} {entity} codes for {n} queries: give one per query")
    # Per (entity, source): start of the entity's events, index of its first event >= t,
    # and per window the index of its first event inside the window (all windows at once).
    searched = search.locate_all(
        {
            (entity, source): (
                histories.arrays[(entity, source)],
                histories.starts[(entity, source)],
                codes[entity],
                t_rel,
                windows,
                STRIDE,
            )
            for (entity, source), windows in feature_set.windows.items()
        }
    )
    counts = np.empty((n, plan.n_counts), np.int64)
    lasts = np.empty((n, plan.n_lasts), np.int64)
    for key, (lo, hi, first) in searched.items():
        pruned = histories.pruned.get(key)
        count_cols, all_col, last_col = plan.columns[key]
        search.derive(
            histories.arrays[key],
            lo,
            hi,
            first,
            codes[key[0]],
            _NONE_PRUNED if pruned is None else np.asarray(pruned, np.int64),
            STRIDE,
            NO_EVENT,
            counts,
            count_cols,
            all_col,
            lasts,
            last_col,
        )
    prior = feature_set.prior_strength
    search.assemble(
        out, plan.spec, plan.defaults, counts, lasts, t_rel, prior * feature_set.prior_ctr, prior
    )
    for j, name in plan.context:
        out[:, j] = CONTEXT[name][1](surface, device, t_ms)
    return out


def as_frame(feature_set: FeatureSet, matrix: np.ndarray) -> pd.DataFrame:
    """A feature matrix from ``evaluate`` as a DataFrame with the declared dtypes."""
    return pd.DataFrame(
        {f.name: matrix[:, j].astype(f.dtype) for j, f in enumerate(feature_set.features)}
    )


def _values(data: Any, name: str) -> Any:
    """A column of a pandas DataFrame or pyarrow Table as pandas (categoricals kept)."""
    if isinstance(data, pd.DataFrame):
        return data[name]
    return data.column(name).to_pandas()


def _factorize(values: Any) -> tuple[np.ndarray, pd.Index]:
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        return values.cat.codes.to_numpy(np.int64), pd.Index(values.cat.categories)
    codes, uniques = pd.factorize(values)
    return codes.astype(np.int64), pd.Index(uniques)


def _lookup_codes(vocab: pd.Index, values: Any) -> np.ndarray:
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        mapped = vocab.get_indexer(values.cat.categories)
        codes = values.cat.codes.to_numpy()
        return np.where(codes >= 0, mapped[np.maximum(codes, 0)], -1).astype(np.int64)
    if not isinstance(values, (pd.Series, pd.Index, np.ndarray)):
        values = np.asarray(values, dtype=object)
    return vocab.get_indexer(values).astype(np.int64)


class EventIndex:
    """The numpy engine: sorted per-entity event times answering point-in-time queries.

    Built from a whole event log (pandas DataFrame or pyarrow Table with the
    RawEvents columns); ``lookup`` evaluates every declared feature for any
    (user, item, surface, device, t) queries with ``evaluate``.
    """

    def __init__(self, events: Any, feature_set: FeatureSet = CTR_V1) -> None:
        self.feature_set = feature_set
        self.n_events = len(events)
        ts = to_ms(_values(events, "ts"))
        clicked = np.asarray(_values(events, "clicked")) == 1
        click_ts = (
            to_ms(_values(events, "click_ts"))[clicked] if clicked.any() else np.empty(0, np.int64)
        )
        check_times(ts, "impression times (ts)")
        check_times(click_ts, "click times (click_ts)")
        self.as_of_ms = int(max(ts.max(initial=0), click_ts.max(initial=0))) if len(ts) else 0
        self._vocab: dict[str, pd.Index] = {}
        self._online: dict[str, Vocabulary] = {}  # request-time lookups, made on first use
        column_codes: dict[str, np.ndarray] = {}
        for col in feature_set.key_columns:
            column_codes[col], self._vocab[col] = _factorize(_values(events, col))
        codes, n_codes = {}, {}
        self._compact: dict[str, np.ndarray | None] = {}
        for entity in feature_set.entity_sources:
            combined = self._combine(entity, column_codes)
            radix = self._radix(entity)
            if radix < MAX_CODES:
                codes[entity], n_codes[entity], self._compact[entity] = combined, radix, None
            else:
                uniq, inverse = np.unique(combined, return_inverse=True)
                codes[entity], n_codes[entity], self._compact[entity] = inverse, len(uniq), uniq
        self.histories = Histories.from_codes(
            feature_set,
            codes,
            n_codes,
            {"impressions": ts, "clicks": click_ts},
            {"impressions": None, "clicks": clicked},
        )

    def _radix(self, entity: str) -> int:
        size = 1
        for col in ENTITY_KEYS[entity]:
            size *= max(len(self._vocab[col]), 1)
        return size

    def _combine(self, entity: str, column_codes: Mapping[str, np.ndarray]) -> np.ndarray:
        combined: np.ndarray | None = None
        unknown: np.ndarray | None = None
        for col in ENTITY_KEYS[entity]:
            code = column_codes[col]
            combined = code.copy() if combined is None else combined * len(self._vocab[col]) + code
            unknown = code < 0 if unknown is None else unknown | (code < 0)
        assert combined is not None and unknown is not None
        combined[unknown] = -1
        return combined

    def entity_codes(self, queries: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Entity codes of query rows given their key columns (-1 for unseen entities)."""
        column_codes = {}
        for c in self.feature_set.key_columns:
            values = queries[c]
            if isinstance(values, list):
                # Request-time keys (the service): keys.Vocabulary. pandas' get_indexer on a
                # str Index costs about 1 ms a call whatever the size (request_path.py).
                if c not in self._online:
                    self._online[c] = Vocabulary(self._vocab[c].tolist())
                column_codes[c] = self._online[c].codes(values)
            else:
                column_codes[c] = _lookup_codes(self._vocab[c], values)
        out = {}
        for entity in self.feature_set.entity_sources:
            combined = self._combine(entity, column_codes)
            compact = self._compact[entity]
            if compact is not None:
                pos = np.clip(np.searchsorted(compact, combined), 0, max(len(compact) - 1, 0))
                found = (combined >= 0) & (len(compact) > 0) & (compact[pos] == combined)
                combined = np.where(found, pos, -1)
            out[entity] = combined
        return out

    def compute(
        self, user_id: object, item_id: object, surface: object, device: object, t_ms: np.ndarray
    ) -> np.ndarray:
        """Feature matrix (float64, declared column order) for the queries."""
        queries = {"user_id": user_id, "item_id": item_id, "surface": surface, "device": device}
        codes = self.entity_codes(queries)
        return evaluate(self.feature_set, self.histories, codes, surface, device, t_ms)

    def lookup(
        self,
        user_id: object,
        item_id: object,
        surface: object,
        device: object,
        t_ms: np.ndarray,
    ) -> pd.DataFrame:
        """Feature rows for queries at times ``t_ms`` (epoch ms), in declared order and dtypes."""
        return as_frame(self.feature_set, self.compute(user_id, item_id, surface, device, t_ms))


def feature_catalog_markdown(feature_set: FeatureSet = CTR_V1) -> str:
    """Markdown catalog of a feature set (``mlops features catalog`` writes docs/features.md)."""
    lines = [
        f"# Feature set `{feature_set.name}`",
        "",
        f"Fingerprint `{feature_set.fingerprint}` (a hash of every declaration below; any edit "
        "changes it). Generated by `mlops features catalog --out docs/features.md` from "
        "`pipelines/features/definitions.py`; do not edit by hand.",
        "",
        f"Smoothing: prior CTR {feature_set.prior_ctr}, {feature_set.prior_strength:g} "
        "pseudo-impressions. Online stores keep event times for "
        f"{feature_set.horizon_ms // 3_600_000} h (longest finite window or TTL) plus the allowed "
        "lateness, and lifetime counts beyond that.",
        "",
        "Semantics: a query at time t sees impressions with `ts < t` and clicks with "
        "`click_ts < t`; window w is the open interval (t - w, t), `all` is all history before t; "
        "a CTR's clicks are capped at its impressions in the same window (a click counts at its "
        "own time, so a window may hold clicks of older impressions), so a CTR never exceeds 1; "
        "an entity with no event in the window gets the default, and so does one whose latest "
        "event is not within the TTL; times are integer milliseconds; input order and ties "
        "never change a value.",
        "",
        "| name | entity (keys) | source | aggregation | window | ttl | dtype | default "
        "| description |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in feature_set.features:
        keys = ", ".join(ENTITY_KEYS[f.entity]) or "request"
        lines.append(
            f"| `{f.name}` | {f.entity} ({keys}) | {f.source} | {f.agg} | {f.window or 'all'} | "
            f"{f.ttl or '-'} | {f.dtype} | {f.default:g} | {f.description} |"
        )
    return "\n".join(lines) + "\n"
