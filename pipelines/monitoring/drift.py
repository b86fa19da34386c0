"""Drift of live traffic against the training period, from exact binned statistics.

The reference (``pipelines.stages.drift_reference.build_reference``, written by the
``profile`` stage) holds, per column, exact bin counts of the training period and the
same counts per time window. A live window is judged column by column
(docs/monitoring.md, "Drift" has the method and its assumptions):

Details: docs/monitoring.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.settings import DriftSettings
from pipelines.stages.drift_reference import build_reference, category_codes, numeric_bin

REQUEST_COLUMNS: tuple[str, ...] = ("surface", "device")
PREDICTION_COLUMN = "prediction"
_SMOOTH = 0.5  # pseudo-count per bin, so an empty bin gives a finite PSI

# Reason codes of a flagged column. Only ``distribution`` drift counts towards dataset
# and prediction drift (retraining); the others are data problems (alert, no retrain).
DISTRIBUTION = "distribution"
GROWING_FALL = "growing_fall"
NULL_RATE = "null_rate"
MISSING_COLUMN = "missing_column"
NEW_COLUMN = "new_column"
TYPE_CHANGE = "type_change"
DATA_PROBLEMS = (NULL_RATE, MISSING_COLUMN, NEW_COLUMN, TYPE_CHANGE, GROWING_FALL)


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


def critical_psi(
    n_bins: int, n_reference: int, n_live: int, alpha: float, between: float = 0.0
) -> float:
    """PSI that no change exceeds with probability ``alpha``.

    Under no change ``PSI`` is about ``chi2(n_bins - 1)`` times
    ``1/n_reference + 1/n_live + between/(n_bins - 1)``: sampling noise of both samples
    plus ``between``, the mean PSI between windows of the reference beyond sampling.
    """
    from scipy import stats

    if n_bins < 2 or n_reference < 1 or n_live < 1:
        return math.inf
    scale = 1.0 / n_reference + 1.0 / n_live + between / (n_bins - 1)
    return float(stats.chi2.ppf(1.0 - alpha, n_bins - 1) * scale)


def bin_samples(reference: np.ndarray, live: np.ndarray, bins: int) -> Binned:
    """Exact counts of two raw numeric samples over reference-quantile bins."""
    reference = np.asarray(reference, np.float64)
    live = np.asarray(live, np.float64)
    reference, live = reference[~np.isnan(reference)], live[~np.isnan(live)]
    if len(reference) == 0:
        raise ValueError("the reference sample is empty")
    edges = np.unique(np.quantile(reference, [i / bins for i in range(1, bins)]))
    ref_counts = np.bincount(numeric_bin(reference, edges), minlength=len(edges) + 1)
    live_counts = np.bincount(numeric_bin(live, edges), minlength=len(edges) + 1)
    labels = [f"bin {i}" for i in range(len(edges) + 1)]
    return Binned(labels, ref_counts.astype(np.float64), live_counts.astype(np.float64))


@dataclass
class ColumnDrift:
    """The verdict and evidence for one column.

    ``status``: ``drift``, ``no_drift``, ``no_data`` (too few live values for a
    distribution verdict) or ``not_judged`` (the reference has no valid rows; ``note``
    says why). ``reasons`` lists the reason codes that flagged it.
    """

    column: str
    role: str  # request | feature | prediction | other
    kind: str  # numeric | categorical | missing
    n_reference: int
    n_live: int
    psi: float | None
    hellinger: float | None
    critical_psi: float | None  # limit from sampling noise alone
    between_windows: float | None  # mean PSI between reference blocks beyond sampling
    threshold: float | None
    drifted: bool
    status: str
    severity: str  # none | moderate | high
    reasons: list[str] = field(default_factory=list)
    note: str = ""
    null_rate_reference: float | None = None
    null_rate_live: float | None = None
    null_rate_limit: float | None = None
    reference_summary: str = ""
    live_summary: str = ""
    bins: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class DriftReport:
    """Per-column verdicts plus the dataset-level verdict for one live window."""

    columns: list[ColumnDrift]
    policy: DriftSettings
    n_live_rows: int
    window: dict[str, str | None] = field(default_factory=dict)
    not_monitored: dict[str, str] = field(default_factory=dict)
    reference_blocks: str = ""

    @property
    def decided(self) -> list[ColumnDrift]:
        """Columns with a distribution verdict (the denominator of the drift share)."""
        return [c for c in self.columns if c.status in ("drift", "no_drift") and c.psi is not None]

    @property
    def drifted(self) -> list[ColumnDrift]:
        """Every flagged column, whatever the reason."""
        return [c for c in self.columns if c.drifted]

    @property
    def distribution_drifted(self) -> list[ColumnDrift]:
        return [c for c in self.columns if DISTRIBUTION in c.reasons]

    @property
    def severe_drift(self) -> list[ColumnDrift]:
        """Distribution drift with PSI at or above ``psi_severe`` (a large shift of one input)."""
        return [
            c
            for c in self.distribution_drifted
            if c.psi is not None and c.psi >= self.policy.psi_severe
        ]

    @property
    def data_problems(self) -> list[ColumnDrift]:
        return [c for c in self.columns if any(r in DATA_PROBLEMS for r in c.reasons)]

    @property
    def drift_share(self) -> float:
        decided = self.decided
        return len(self.distribution_drifted) / len(decided) if decided else 0.0

    @property
    def dataset_drift(self) -> bool:
        return bool(self.decided) and self.drift_share >= self.policy.share_threshold

    @property
    def prediction_drift(self) -> bool:
        return any(DISTRIBUTION in c.reasons and c.role == "prediction" for c in self.columns)

    def table(self) -> pd.DataFrame:
        """One row per column, flagged first, then by PSI over its limit."""
        rows = [{k: v for k, v in asdict(c).items() if k != "bins"} for c in self.columns]
        frame = pd.DataFrame(rows)
        if frame.empty:
            return frame
        frame["reasons"] = [",".join(r) for r in frame["reasons"]]
        ratio = frame["psi"].astype(float) / frame["threshold"].astype(float)
        return (
            frame.assign(_ratio=ratio)
            .sort_values(["drifted", "_ratio"], ascending=[False, False], na_position="last")
            .drop(columns="_ratio")
        )

    def summary(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "live_rows": self.n_live_rows,
            "columns_compared": len(self.decided),
            "columns_without_data": [c.column for c in self.columns if c.status == "no_data"],
            "columns_not_judged": {
                c.column: c.note for c in self.columns if c.status == "not_judged"
            },
            "not_monitored": dict(self.not_monitored),
            "drifted_columns": [c.column for c in self.distribution_drifted],
            "severe_drift_columns": [c.column for c in self.severe_drift],
            "data_problems": {c.column: c.reasons for c in self.data_problems},
            "drift_share": round(self.drift_share, 4),
            "dataset_drift": self.dataset_drift,
            "prediction_drift": self.prediction_drift,
            "reference_blocks": self.reference_blocks,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: summary, policy and every column with its bins."""
        return {
            **self.summary(),
            "policy": self.policy.model_dump(mode="json"),
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
    """Which part of the request/response a column describes."""
    if name == PREDICTION_COLUMN:
        return "prediction"
    if name in REQUEST_COLUMNS:
        return "request"
    if feature_names is None or name in feature_names:
        return "feature"
    return "other"


@dataclass
class _Blocks:
    """Reference windows grouped into consecutive blocks as long as the live window."""

    counts: np.ndarray  # blocks x bins
    nulls: np.ndarray  # blocks
    rows: np.ndarray  # blocks (values + nulls)


def _blocks(entry: dict[str, Any], size: int) -> _Blocks:
    counts = np.asarray(entry["window_counts"], dtype=np.float64)
    rows = np.asarray(entry["window_rows"], dtype=np.float64)
    nulls = np.asarray(entry["window_nulls"], dtype=np.float64)
    used = rows > 0
    counts, rows, nulls = counts[used], rows[used], nulls[used]
    n = len(rows) // size
    if n == 0:
        return _Blocks(
            np.empty((0, counts.shape[1] if counts.ndim == 2 else 0)), rows[:0], rows[:0]
        )
    cut = n * size
    return _Blocks(
        counts[:cut].reshape(n, size, -1).sum(axis=1),
        nulls[:cut].reshape(n, size).sum(axis=1),
        rows[:cut].reshape(n, size).sum(axis=1),
    )


def between_psi(counts: np.ndarray, keep: np.ndarray) -> float:
    """The largest PSI of a block against the rest of the reference, beyond sampling noise.

    ``counts`` is blocks x bins; ``keep`` selects the bins in use. Each block's PSI has
    expectation ``(k - 1) * (1/n_block + 1/n_rest)`` under pure sampling; what remains
    is variation between windows (about 0 for independent rows). The largest block is
    taken, not the mean, because that variation is uneven (night hours differ from the
    day more than noon does).
    """
    counts = counts[:, keep]
    sizes = counts.sum(axis=1)
    counts = counts[sizes >= 1]
    if len(counts) < 2:
        return 0.0
    rest = counts.sum(axis=0) - counts
    nb, nr = counts.sum(axis=1), rest.sum(axis=1)
    ok = nr >= 1
    k = counts.shape[1]
    p = (rest[ok] + _SMOOTH) / (nr[ok, None] + _SMOOTH * k)
    q = (counts[ok] + _SMOOTH) / (nb[ok, None] + _SMOOTH * k)
    values = np.sum((q - p) * np.log(q / p), axis=1)
    excess = values - (k - 1) * (1.0 / nb[ok] + 1.0 / nr[ok])
    return max(float(np.max(excess)), 0.0) if len(excess) else 0.0


def between_null_var(blocks: _Blocks) -> float:
    """Largest squared gap of a block's null rate from the rest, beyond binomial sampling."""
    rows, nulls = blocks.rows, blocks.nulls
    used = rows >= 1
    rows, nulls = rows[used], nulls[used]
    if len(rows) < 2:
        return 0.0
    total_rows, total_nulls = rows.sum(), nulls.sum()
    rest = total_rows - rows
    ok = rest >= 1
    p = total_nulls / total_rows
    gap = nulls[ok] / rows[ok] - (total_nulls - nulls[ok]) / rest[ok]
    excess = gap * gap - p * (1 - p) * (1 / rows[ok] + 1 / rest[ok])
    return max(float(np.max(excess)), 0.0) if len(excess) else 0.0


def _live_bins(
    entry: dict[str, Any], values: pd.Series
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Reference counts, live counts and bin labels; an ``<other>`` bin only when used."""
    ref = np.asarray(entry["counts"], dtype=np.float64)
    if entry["kind"] == "categorical":
        cats = entry["categories"]
        idx = category_codes(values, cats)
        live = np.bincount(idx, minlength=len(cats) + 1).astype(np.float64)
        labels = [*cats, "<other>"]
        if entry.get("other_bin"):
            return labels, ref, live
        ref = np.append(ref, 0.0)
        return labels, ref, live
    edges = np.asarray(entry["edges"], dtype=np.float64)
    live = np.bincount(
        numeric_bin(values.to_numpy(np.float64), edges), minlength=len(edges) + 1
    ).astype(np.float64)
    labels = [f"<= {edges[0]:.6g}"] if len(edges) else ["all"]
    labels += [f"({a:.6g}, {b:.6g}]" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if len(edges):
        labels.append(f"> {edges[-1]:.6g}")
    return labels, ref, live


def _summary(entry: dict[str, Any], counts: np.ndarray, labels: list[str]) -> str:
    total = max(float(counts.sum()), 1.0)
    if entry["kind"] == "categorical":
        top = sorted(zip(labels, counts, strict=True), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{k} {v / total:.1%}" for k, v in top if v > 0)
    cum = np.cumsum(counts) / total
    i = int(np.searchsorted(cum, 0.5))
    return f"median in {labels[min(i, len(labels) - 1)]}"


def _non_numeric(series: pd.Series) -> bool:
    """True when a column that should hold numbers holds values that are not numbers."""
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return False
    present = series.dropna()
    return bool(len(present)) and bool(pd.to_numeric(present, errors="coerce").isna().any())


def compare_reference(
    reference: dict[str, Any],
    live: pd.DataFrame,
    times: pd.Series | None = None,
    policy: DriftSettings | None = None,
    feature_names: list[str] | None = None,
    window: dict[str, str | None] | None = None,
    absent: tuple[str, ...] | list[str] = (),
) -> DriftReport:
    """Judge a live frame (one row per served request) against a drift reference.

    ``live`` has the reference's columns (``pipelines.monitoring.requests.live_frame``);
    ``times`` (each row's request time) sets the length of the reference blocks the
    between-window variation is measured on (the live window's span, in reference
    windows, at most ``windows / min_reference_blocks``). ``absent`` names columns the
    traffic did not carry at all (``missing_column``). Columns of ``live`` that the
    reference lacks are ``new_column``.
    """
    from scipy import stats

    policy = policy or DriftSettings()
    cols: dict[str, dict[str, Any]] = reference["columns"]
    n_windows = len(reference["windows"])
    unit = pd.Timedelta(reference["window"])
    stamps: pd.Series | None = None
    if times is not None and len(times):
        stamps = pd.to_datetime(pd.Series(times), utc=True).reset_index(drop=True)
        span = stamps.max().floor(reference["window"]) - stamps.min().floor(reference["window"])
        units = int(span / unit) + 1
    else:
        units = n_windows
    size = max(1, min(units, n_windows // policy.min_reference_blocks))
    not_monitored = {
        c: "listed in monitor.drift.ignore_columns" for c in policy.ignore_columns if c in cols
    }
    names = [c for c in cols if c not in policy.ignore_columns]
    n_live_rows = len(live)

    # Work out which tests run first: their number sets the per-test alpha.
    plans: dict[str, dict[str, Any]] = {}
    tests = 0
    for name in names:
        entry = cols[name]
        plan: dict[str, Any] = {"entry": entry}
        plans[name] = plan
        if name in absent or name not in live.columns:
            plan["missing"] = True
            continue
        series = live[name]
        if entry["kind"] == "numeric" and _non_numeric(series):
            plan["type_change"] = True
            continue
        if entry["kind"] == "numeric":
            series = pd.to_numeric(series, errors="coerce")
        if stamps is not None and entry.get("judged_from") and len(stamps) == len(series):
            # the reference judges a column only once its window has filled; live rows too
            filled = (stamps >= pd.Timestamp(entry["judged_from"])).to_numpy()
            plan["unfilled"] = int((~filled).sum())
            series = series[filled]
        plan["series"] = series
        if entry.get("not_judged"):
            continue
        n_ref = entry["rows"] - entry["nulls"]
        plan["null_test"] = entry["rows"] >= policy.min_rows and len(series) >= policy.min_rows
        valid = int(series.notna().sum())
        plan["dist_test"] = n_ref >= policy.min_rows and valid >= policy.min_rows
        tests += int(plan["null_test"]) + int(plan["dist_test"])
    alpha = policy.family_alpha / max(tests, 1)
    z = float(stats.norm.ppf(1 - alpha / 2))

    columns: list[ColumnDrift] = []
    for name in names:
        plan = plans[name]
        entry = plan["entry"]
        base = ColumnDrift(
            column=name,
            role=column_role(name, feature_names),
            kind=entry["kind"],
            n_reference=int(entry["rows"] - entry["nulls"]),
            n_live=0,
            psi=None,
            hellinger=None,
            critical_psi=None,
            between_windows=None,
            threshold=None,
            drifted=False,
            status="no_data",
            severity="none",
            note=entry.get("growing") or "",
        )
        columns.append(base)
        if plan.get("missing"):
            base.kind, base.status, base.drifted, base.severity = "missing", "drift", True, "high"
            base.reasons.append(MISSING_COLUMN)
            base.note = "the column is in the reference but not in live traffic"
            continue
        if plan.get("type_change"):
            base.status, base.drifted, base.severity = "drift", True, "high"
            base.reasons.append(TYPE_CHANGE)
            example = live[name].dropna()
            base.note = f"numeric in the reference, live values such as {example.iloc[0]!r} are not"
            continue
        series = plan["series"]
        if entry.get("not_judged"):
            base.status, base.note = "not_judged", f"not judged: {entry['not_judged']}"
            continue
        if plan.get("unfilled"):
            base.note = (
                f"{plan['unfilled']:,} live rows before {entry['judged_from']} not judged: "
                "the column's window was still filling (as in the reference)"
            )
        blocks = _blocks(entry, size)
        null = series.isna().to_numpy()
        values = series[~null]
        base.n_live = int(len(values))
        if plan["null_test"]:
            p_ref = entry["nulls"] / max(entry["rows"], 1)
            p_live = float(null.mean())
            pooled = (entry["nulls"] + null.sum()) / (entry["rows"] + len(null))
            sd = math.sqrt(
                pooled * (1 - pooled) * (1 / entry["rows"] + 1 / len(null))
                + between_null_var(blocks)
            )
            limit = max(policy.null_rate_threshold, z * sd)
            base.null_rate_reference, base.null_rate_live = round(p_ref, 6), round(p_live, 6)
            base.null_rate_limit = round(limit, 6)
            if abs(p_live - p_ref) > limit:
                base.reasons.append(NULL_RATE)
        if plan["dist_test"]:
            labels, ref_counts, live_counts = _live_bins(entry, values)
            keep = (ref_counts + live_counts) > 0
            ref_k, live_k = ref_counts[keep], live_counts[keep]
            block_counts = blocks.counts
            if block_counts.shape[1] < len(keep):  # reference without an <other> bin
                pad = np.zeros((len(block_counts), len(keep) - block_counts.shape[1]))
                block_counts = np.hstack([block_counts, pad])
            between = between_psi(block_counts, keep) if len(block_counts) >= 2 else 0.0
            n_ref, n_live = float(ref_k.sum()), float(live_k.sum())
            if entry.get("growing"):
                f_ref = np.cumsum(ref_k)[:-1] / n_ref
                f_live = np.cumsum(live_k)[:-1] / n_live
                fall = float(np.max(f_live - f_ref, initial=0.0))
                crit = math.sqrt(math.log(1 / alpha) / 2 * (1 / n_ref + 1 / n_live))
                threshold = max(policy.growing_min_fall, crit)
                base.psi = round(psi(ref_k, live_k), 6)
                base.critical_psi, base.threshold = round(crit, 6), round(threshold, 6)
                base.note = (
                    f"{entry['growing']}; judged on its fall only: live share below the "
                    f"reference's quantiles exceeds it by {fall:.4f} (limit {threshold:.4f})"
                )
                if fall > threshold:
                    base.reasons.append(GROWING_FALL)
            else:
                value = psi(ref_k, live_k)
                crit = critical_psi(int(keep.sum()), int(n_ref), int(n_live), alpha)
                limit = critical_psi(int(keep.sum()), int(n_ref), int(n_live), alpha, between)
                threshold = max(policy.psi_threshold, limit)
                base.psi, base.critical_psi = round(value, 6), round(crit, 6)
                base.between_windows, base.threshold = round(between, 6), round(threshold, 6)
                if value > threshold:
                    base.reasons.append(DISTRIBUTION)
                if (
                    entry["kind"] == "categorical"
                    and not entry.get("other_bin")
                    and live_k[-1:].size
                ):
                    unseen = sorted(set(values.astype(str)) - set(entry["categories"]))
                    if unseen:
                        base.note = f"categories unseen in training: {unseen[:5]}"
            base.hellinger = round(hellinger(ref_k, live_k), 6)
            base.reference_summary = _summary(entry, ref_counts, labels)
            base.live_summary = _summary(entry, live_counts, labels)
            base.bins = {
                "labels": [lab for lab, k in zip(labels, keep, strict=True) if k],
                "reference": [round(float(x) / max(n_ref, 1), 6) for x in ref_k],
                "live": [round(float(x) / max(n_live, 1), 6) for x in live_k],
            }
            base.status = "no_drift"
        if base.reasons:
            base.status, base.drifted = "drift", True
            high = (base.psi or 0) >= policy.psi_severe or any(
                r in DATA_PROBLEMS for r in base.reasons
            )
            base.severity = "high" if high else "moderate"
    for name in live.columns:
        if name in cols or name in policy.ignore_columns:
            continue
        columns.append(
            ColumnDrift(
                column=name,
                role=column_role(name, feature_names),
                kind="categorical" if not pd.api.types.is_numeric_dtype(live[name]) else "numeric",
                n_reference=0,
                n_live=int(live[name].notna().sum()),
                psi=None,
                hellinger=None,
                critical_psi=None,
                between_windows=None,
                threshold=None,
                drifted=True,
                status="drift",
                severity="high",
                reasons=[NEW_COLUMN],
                note="in live traffic but not in the reference (retrain to monitor it)",
            )
        )
    blocks_text = f"{size} x {reference['window']} ({n_windows // size} blocks)"
    return DriftReport(columns, policy, n_live_rows, window or {}, not_monitored, blocks_text)


def compare_frames(
    reference: pd.DataFrame,
    live: pd.DataFrame,
    policy: DriftSettings | None = None,
    feature_names: list[str] | None = None,
    reference_times: pd.Series | None = None,
    live_times: pd.Series | None = None,
    window: str = "1h",
    growing: dict[str, str] | None = None,
) -> DriftReport:
    """Build a reference from ``reference`` and judge ``live`` (tests, benchmarks, notebooks).

    Without ``reference_times`` every reference row falls in one window (no
    between-window variation is known: the limits assume independent rows).
    """
    policy = policy or DriftSettings()
    if reference_times is None:
        reference_times = pd.Series(pd.Timestamp("2026-01-01", tz="UTC"), index=reference.index)
    ref = build_reference(
        reference, reference_times, window, policy.bins, policy.max_categories, growing
    )
    return compare_reference(ref, live, live_times, policy, feature_names)


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
