"""Input and output drift of live traffic against the training reference, from whylogs profiles.

For every column present in both profiles (request fields, served features, the
model's prediction) this module computes

* the **population stability index** (PSI) and the **Hellinger distance** between
  the reference and live distributions over ``bins`` reference-quantile bins
  (numeric columns, from the KLL sketches) or over the reference's categories plus
  "other" (string columns, from the frequent-items sketches);
* whylogs' own test (KS on numeric sketches, chi-square on frequent items) with its
  p-value, reported as information only.

**Decision rule** (calibrated in ``benchmarks/drift_calibration.py``). whylogs'
sketch-based p-values ignore the sketches' approximation error and treat the
reference as exact; on large samples they flag columns that did not change, far
more often than the exact tests on the raw values do (measured in
``benchmarks/results/drift_calibration.md``). A column is therefore flagged when
its PSI exceeds **both**

* ``critical_psi``: the PSI that sampling noise alone exceeds with probability
  ``family_alpha / m`` (``m`` columns compared, so a window with no change raises
  any flag with probability at most ``family_alpha``). Under no change
  ``PSI * n_eff`` is approximately chi-square with ``bins - 1`` degrees of freedom,
  ``1 / n_eff = 1 / n_reference + 1 / n_live``: small live windows need a large
  PSI before they count;
* ``psi_threshold``: the smallest shift worth an alert (for a normal variable a mean
  shift of 0.1 standard deviations gives PSI ~0.01, 0.05 SD ~0.0025). It also
  absorbs the sketches' approximation error, which on large windows is as large as
  the sampling noise (the benchmark records the gap between sketch and exact PSI).

A window with fewer than ``min_rows`` live values in a column gets no decision
for that column (``no_data``). The dataset drifts when the share of decided
columns that drifted reaches ``share_threshold``. Training-serving skew is the
same comparison restricted to the served feature values (role ``feature``);
``value_skew`` additionally recomputes served features offline and compares them
value by value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.config import ConfigError

REQUEST_COLUMNS: tuple[str, ...] = ("surface", "device")
PREDICTION_COLUMN = "prediction"
_SMOOTH = 0.5  # pseudo-count per bin, so an empty bin gives a finite PSI


@dataclass(frozen=True)
class DriftPolicy:
    """Thresholds of the drift decision (``monitor.drift`` in params.yaml)."""

    bins: int = 10
    family_alpha: float = 0.05
    psi_threshold: float = 0.005
    psi_severe: float = 0.1
    share_threshold: float = 0.3
    min_rows: int = 500
    max_categories: int = 50
    ignore_columns: tuple[str, ...] = ("baseline_prediction",)

    def __post_init__(self) -> None:
        checks = [
            (self.bins >= 2, f"monitor.drift.bins must be >= 2, got {self.bins}"),
            (
                0 < self.family_alpha < 1,
                f"monitor.drift.family_alpha must be in (0, 1), got {self.family_alpha}",
            ),
            (
                self.psi_threshold >= 0,
                f"monitor.drift.psi_threshold must be >= 0, got {self.psi_threshold}",
            ),
            (
                self.psi_severe >= self.psi_threshold,
                "monitor.drift.psi_severe must be >= psi_threshold, got "
                f"{self.psi_severe} < {self.psi_threshold}",
            ),
            (
                0 < self.share_threshold <= 1,
                f"monitor.drift.share_threshold must be in (0, 1], got {self.share_threshold}",
            ),
            (self.min_rows >= 1, f"monitor.drift.min_rows must be >= 1, got {self.min_rows}"),
            (
                self.max_categories >= 1,
                f"monitor.drift.max_categories must be >= 1, got {self.max_categories}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DriftPolicy:
        """Read ``monitor.drift``; unknown keys are an error naming the key."""
        section = dict((params.get("monitor") or {}).get("drift") or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(
                f"params.yaml monitor.drift has unknown key(s) {unknown}; known: {sorted(known)}"
            )
        if "ignore_columns" in section:
            section["ignore_columns"] = tuple(section["ignore_columns"] or ())
        return cls(**section)


@dataclass(frozen=True)
class Binned:
    """Reference and live counts over the same bins."""

    labels: list[str]
    reference: np.ndarray  # counts
    live: np.ndarray  # counts


def _smoothed(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + _SMOOTH) / (counts.sum() + _SMOOTH * len(counts))


def psi(reference_counts: np.ndarray, live_counts: np.ndarray) -> float:
    """Population stability index sum((q - p) ln(q / p)) of two count vectors (smoothed)."""
    p, q = _smoothed(reference_counts), _smoothed(live_counts)
    return float(np.sum((q - p) * np.log(q / p)))


def hellinger(reference_counts: np.ndarray, live_counts: np.ndarray) -> float:
    """Hellinger distance (0 = identical, 1 = disjoint) of two count vectors."""
    p = np.asarray(reference_counts, np.float64) / max(float(np.sum(reference_counts)), 1.0)
    q = np.asarray(live_counts, np.float64) / max(float(np.sum(live_counts)), 1.0)
    return float(np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(q)) ** 2)))


def critical_psi(n_bins: int, n_reference: int, n_live: int, alpha: float) -> float:
    """PSI that sampling noise alone exceeds with probability ``alpha`` (chi-square approx.)."""
    from scipy import stats

    if n_bins < 2 or n_reference < 1 or n_live < 1:
        return math.inf
    return float(stats.chi2.ppf(1.0 - alpha, n_bins - 1) * (1.0 / n_reference + 1.0 / n_live))


def bin_sketches(reference: Any, live: Any, bins: int, max_categories: int) -> Binned:
    """Counts of both sketches over bins defined by the reference (see module docstring).

    Numeric: edges at the reference's ``1/bins .. (bins-1)/bins`` quantiles, duplicates
    removed (a point mass such as "no clicks yet" becomes its own bin); bins are
    ``(-inf, e1], (e1, e2], ..., (ek, inf)``. Categorical: the reference's most
    frequent ``max_categories`` values plus ``<other>``, where unseen live values land.
    """
    if reference.kind == "categorical" or live.kind == "categorical":
        if reference.kind != live.kind:
            raise ValueError(
                f"column {reference.name!r} is {reference.kind} in the reference but "
                f"{live.kind} in live traffic; the request log and the reference disagree "
                "on its type"
            )
        ref_items = sorted(reference.items().items(), key=lambda kv: (-kv[1], kv[0]))
        cats = [k for k, _ in ref_items[:max_categories]]
        live_items = live.items()
        ref_counts = [float(reference.items()[c]) for c in cats]
        live_counts = [float(live_items.get(c, 0)) for c in cats]
        ref_counts.append(max(float(reference.count) - sum(ref_counts), 0.0))
        live_counts.append(max(float(live.count) - sum(live_counts), 0.0))
        return Binned([*cats, "<other>"], np.array(ref_counts), np.array(live_counts))
    ranks = [i / bins for i in range(1, bins)]
    edges = np.unique(reference.quantiles(ranks))
    ref_cdf = np.concatenate([[0.0], reference.cdf(edges), [1.0]])
    live_cdf = np.concatenate([[0.0], live.cdf(edges), [1.0]])
    ref_counts = np.clip(np.diff(ref_cdf), 0, None) * reference.count
    live_counts = np.clip(np.diff(live_cdf), 0, None) * live.count
    labels = [f"<= {edges[0]:.6g}"]
    labels += [f"({a:.6g}, {b:.6g}]" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"> {edges[-1]:.6g}")
    return Binned(labels, ref_counts, live_counts)


def bin_samples(reference: np.ndarray, live: np.ndarray, bins: int) -> Binned:
    """Exact counts of two raw numeric samples over reference-quantile bins (same bins as above)."""
    reference = np.asarray(reference, np.float64)
    live = np.asarray(live, np.float64)
    reference, live = reference[~np.isnan(reference)], live[~np.isnan(live)]
    if len(reference) == 0:
        raise ValueError("the reference sample is empty")
    edges = np.unique(np.quantile(reference, [i / bins for i in range(1, bins)]))
    ref_counts = np.bincount(np.searchsorted(edges, reference, "left"), minlength=len(edges) + 1)
    live_counts = np.bincount(np.searchsorted(edges, live, "left"), minlength=len(edges) + 1)
    labels = [f"bin {i}" for i in range(len(edges) + 1)]
    return Binned(labels, ref_counts.astype(np.float64), live_counts.astype(np.float64))


@dataclass
class ColumnDrift:
    """The drift verdict and evidence for one column."""

    column: str
    role: str  # request | feature | prediction | other
    kind: str  # numeric | categorical
    n_reference: int
    n_live: int
    psi: float | None
    hellinger: float | None
    critical_psi: float | None
    threshold: float | None
    drifted: bool
    status: str  # no_drift | drift | no_data
    severity: str  # none | moderate | high
    whylogs_test: str | None = None
    whylogs_pvalue: float | None = None
    whylogs_statistic: float | None = None
    reference_summary: str = ""
    live_summary: str = ""
    bins: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class DriftReport:
    """Per-column drift plus the dataset-level verdict for one live window."""

    columns: list[ColumnDrift]
    policy: DriftPolicy
    n_live_rows: int
    window: dict[str, str | None] = field(default_factory=dict)

    @property
    def decided(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.status != "no_data"]

    @property
    def drifted(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.drifted]

    @property
    def drift_share(self) -> float:
        decided = self.decided
        return len(self.drifted) / len(decided) if decided else 0.0

    @property
    def dataset_drift(self) -> bool:
        return bool(self.decided) and self.drift_share >= self.policy.share_threshold

    @property
    def prediction_drift(self) -> bool:
        return any(c.drifted and c.role == "prediction" for c in self.columns)

    @property
    def skew_share(self) -> float:
        """Share of served feature columns whose distribution differs from training (skew)."""
        feats = [c for c in self.decided if c.role == "feature"]
        return sum(c.drifted for c in feats) / len(feats) if feats else 0.0

    def table(self) -> pd.DataFrame:
        """One row per column, most drifted first (the drift score table of the report)."""
        rows = [{k: v for k, v in asdict(c).items() if k != "bins"} for c in self.columns]
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        return frame.sort_values(["drifted", "psi"], ascending=[False, False], na_position="last")

    def summary(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "live_rows": self.n_live_rows,
            "columns_compared": len(self.decided),
            "columns_without_data": [c.column for c in self.columns if c.status == "no_data"],
            "drifted_columns": [c.column for c in self.drifted],
            "drift_share": round(self.drift_share, 4),
            "dataset_drift": self.dataset_drift,
            "prediction_drift": self.prediction_drift,
            "skew_share": round(self.skew_share, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: summary, policy and every column with its bins."""
        return {
            **self.summary(),
            "policy": asdict(self.policy),
            "columns": [_clean(asdict(c)) for c in self.columns],
        }


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON is valid for any reader."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.floating | np.integer):
        return _clean(value.item())
    return value


def column_role(name: str, feature_names: list[str] | None = None) -> str:
    """Which part of the request/response a profiled column describes."""
    if name == PREDICTION_COLUMN:
        return "prediction"
    if name in REQUEST_COLUMNS:
        return "request"
    if feature_names is None or name in feature_names:
        return "feature"
    return "other"


def _summaries(sketch: Any) -> str:
    if sketch.kind == "numeric":
        q = sketch.quantiles([0.5])[0]
        return f"median {q:.4g}"
    if sketch.kind == "categorical":
        items = sketch.items()
        total = max(sketch.count, 1)
        top = sorted(items.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} {v / total:.1%}" for k, v in top)
    return "no values"


def compare(
    reference_view: Any,
    live_view: Any,
    policy: DriftPolicy | None = None,
    feature_names: list[str] | None = None,
    window: dict[str, str | None] | None = None,
) -> DriftReport:
    """Drift of a live profile against the reference profile, column by column.

    Only columns present in both profiles are compared (``policy.ignore_columns``
    skipped). ``feature_names`` tells which columns are served features (role
    ``feature``); without it every non-request, non-prediction column is one.
    """
    from pipelines.core import profiles as wl

    policy = policy or DriftPolicy()
    ref = wl.column_sketches(reference_view)
    live = wl.column_sketches(live_view)
    names = [c for c in ref if c in live and c not in policy.ignore_columns]
    scores = wl.drift_scores(live_view, reference_view)
    decidable = [
        c
        for c in names
        if ref[c].kind != "empty"
        and live[c].kind != "empty"
        and ref[c].count >= policy.min_rows
        and live[c].count >= policy.min_rows
    ]
    alpha = policy.family_alpha / max(len(decidable), 1)
    columns: list[ColumnDrift] = []
    n_live_rows = max((s.count + s.nulls for s in live.values()), default=0)
    for name in names:
        r, lv = ref[name], live[name]
        score = scores.get(name) or {}
        kind = r.kind if r.kind != "empty" else lv.kind
        base: dict[str, Any] = {
            "column": name,
            "role": column_role(name, feature_names),
            "kind": kind,
            "n_reference": r.count,
            "n_live": lv.count,
            "whylogs_test": score.get("algorithm"),
            "whylogs_pvalue": score.get("pvalue"),
            "whylogs_statistic": score.get("statistic"),
            "reference_summary": _summaries(r),
            "live_summary": _summaries(lv),
        }
        if name not in decidable:
            columns.append(
                ColumnDrift(
                    **base,
                    psi=None,
                    hellinger=None,
                    critical_psi=None,
                    threshold=None,
                    drifted=False,
                    status="no_data",
                    severity="none",
                )
            )
            continue
        columns.append(ColumnDrift(**base, **judge(r, lv, policy, alpha)))
    return DriftReport(columns, policy, n_live_rows, window or {})


def judge(reference: Any, live: Any, policy: DriftPolicy, alpha: float) -> dict[str, Any]:
    """The decision for one column: PSI against ``max(psi_threshold, critical_psi(alpha))``.

    ``reference``/``live`` are ``ColumnSketch`` objects; ``alpha`` is the per-column
    false-alarm probability (``compare`` passes ``family_alpha / columns compared``).
    """
    binned = bin_sketches(reference, live, policy.bins, policy.max_categories)
    value = psi(binned.reference, binned.live)
    crit = critical_psi(len(binned.labels), reference.count, live.count, alpha)
    threshold = max(policy.psi_threshold, crit)
    drifted = value > threshold
    severity = "none" if not drifted else ("high" if value >= policy.psi_severe else "moderate")
    return {
        "psi": round(value, 6),
        "hellinger": round(hellinger(binned.reference, binned.live), 6),
        "critical_psi": round(crit, 6),
        "threshold": round(threshold, 6),
        "drifted": bool(drifted),
        "status": "drift" if drifted else "no_drift",
        "severity": severity,
        "bins": {
            "labels": binned.labels,
            "reference": [round(float(x) / max(reference.count, 1), 6) for x in binned.reference],
            "live": [round(float(x) / max(live.count, 1), 6) for x in binned.live],
        },
    }


def compare_frames(
    reference: pd.DataFrame,
    live: pd.DataFrame,
    policy: DriftPolicy | None = None,
    feature_names: list[str] | None = None,
) -> DriftReport:
    """Profile two DataFrames with whylogs and ``compare`` them (tests, benchmarks, notebooks)."""
    from pipelines.core import profiles as wl

    return compare(wl.profile(reference), wl.profile(live), policy, feature_names)


def value_skew(
    served: pd.DataFrame,
    events: pd.DataFrame,
    feature_names: list[str],
    feature_set_name: str,
    tolerance: float = 1e-6,
    sample: int | None = 5000,
    seed: int = 0,
) -> pd.DataFrame:
    """Served feature values versus the same features recomputed offline, value by value.

    ``served`` is a normalized request log (``pipelines.monitoring.requests``) with the served
    feature columns; ``events`` are the raw events the offline builder sees. Every
    sampled row is recomputed with ``EventIndex`` at its request time (the code that
    built the training set), so a difference means the online path served something
    training never saw: a stale snapshot, a bug in an online store, a wrong time.
    Returns one row per feature: rows compared, mismatches, mismatch rate and the
    largest absolute difference.
    """
    from pipelines.features.definitions import FEATURE_SETS, EventIndex, to_ms

    rows = served.dropna(subset=[feature_names[0]]) if feature_names else served
    if sample is not None and len(rows) > sample:
        rows = rows.sample(n=sample, random_state=seed)
    if rows.empty:
        return pd.DataFrame(
            columns=["feature", "rows", "mismatches", "mismatch_rate", "max_abs_diff"]
        )
    index = EventIndex(events, FEATURE_SETS[feature_set_name])
    offline = index.lookup(
        rows["user"].to_numpy(dtype=object),
        rows["item"].to_numpy(dtype=object),
        rows["surface"].to_numpy(dtype=object),
        rows["device"].to_numpy(dtype=object),
        to_ms(rows["request_time"]),
    )
    out = []
    for name in feature_names:
        online = rows[name].to_numpy(dtype=np.float64)
        expected = offline[name].to_numpy(dtype=np.float64)
        diff = np.abs(online - expected)
        bad = ~(diff <= tolerance * np.maximum(1.0, np.abs(expected)))
        out.append(
            {
                "feature": name,
                "rows": len(rows),
                "mismatches": int(bad.sum()),
                "mismatch_rate": round(float(bad.mean()), 6),
                "max_abs_diff": float(np.nanmax(diff)) if len(diff) else 0.0,
            }
        )
    return pd.DataFrame(out)
