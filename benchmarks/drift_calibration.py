"""Calibration and accuracy of the drift decision rule, and what drift monitoring costs.

Three parts, written to benchmarks/results/drift_calibration.{json,md}:

1. **Calibration on the generator's scenarios.** Point-in-time features of one
   stationary stream (scenario ``none``, preset ``full``, seed 42) are split at
   random into a reference half and a live half. Live samples of 1k, 10k, 100k and
   all rows of the unchanged half are judged by the project's rule (PSI above
   ``max(psi_threshold, critical_psi)``), by whylogs' own sketch-based tests
   (KS / chi-square p < 0.05) and by the exact tests on the raw values (scipy
   two-sample KS / chi-square contingency, p < 0.05). Then samples of the same
   stream generated under ``surface_shift``, ``ctr_drop`` and ``new_items`` (same
   seed, scenario from day 0) are judged by the rule.
2. **Detector accuracy** over repeated trials: mean shifts of 0.05, 0.1, 0.25 and
   0.5 standard deviations in one numeric feature (``user_ctr_7d``), a category-mix
   change (5 percentage points of traffic moved from feed to recs) and no change,
   at 1k, 10k and 100k live rows. Shifted conditions profile the one column and
   judge it with the per-column alpha of a full run (family_alpha / 20 columns);
   "no change" profiles every column and counts a false positive when any column
   is flagged (the dataset-level false-positive rate).
3. **Cost**: whylogs profiling throughput (rows/s) and drift computation time for
   one million live rows of all 20 columns.

    python benchmarks/drift_calibration.py [--preset full] [--trials 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import machine  # noqa: E402

from pipelines.core import profiles as wl  # noqa: E402
from pipelines.features.definitions import CTR_V1  # noqa: E402
from pipelines.features.offline import point_in_time_features
from pipelines.monitoring.drift import DriftPolicy, bin_sketches, compare, judge, psi  # noqa: E402
from pipelines.simulation.generate import generate_events  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["surface", "device", *CTR_V1.names]
CATEGORICAL = {"surface", "device"}
SHIFT_COLUMN = "user_ctr_7d"
SIZES = (1_000, 10_000, 100_000)


def features(preset: str, scenario: str, seed: int = 42) -> pd.DataFrame:
    """Point-in-time feature rows after the 24 h warm-up, as the training set has them."""
    events = generate_events(preset, seed, scenario=scenario)
    table = point_in_time_features(events)
    table = table[table["ts"] >= table["ts"].min().floor("D") + pd.Timedelta(hours=24)]
    return table[COLUMNS].reset_index(drop=True)


def exact_pvalue(ref: pd.Series, live: pd.Series) -> float:
    """Two-sample KS (numeric) or chi-square contingency (categorical) on raw values."""
    if ref.name in CATEGORICAL:
        cats = sorted(set(ref) | set(live))
        table = np.array(
            [[int((ref == c).sum()) for c in cats], [int((live == c).sum()) for c in cats]]
        )
        return float(stats.chi2_contingency(table)[1])
    return float(stats.ks_2samp(ref.to_numpy(), live.to_numpy()).pvalue)


def exact_psi(ref_sketch: Any, ref: pd.Series, live: pd.Series, bins: int) -> float:
    """PSI over the same reference-quantile edges, counting raw values exactly."""
    if ref.name in CATEGORICAL:
        cats = sorted(set(ref))
        return psi(
            np.array([(ref == c).sum() for c in cats], float),
            np.array([(live == c).sum() for c in cats], float),
        )
    edges = np.unique(ref_sketch.quantiles([i / bins for i in range(1, bins)]))
    count = lambda x: np.bincount(np.searchsorted(edges, x, "left"), minlength=len(edges) + 1)  # noqa: E731
    return psi(count(ref.to_numpy()).astype(float), count(live.to_numpy()).astype(float))


def part_calibration(preset: str, policy: DriftPolicy) -> dict[str, Any]:
    print(f"[1/3] features for preset {preset!r}: none + 3 scenarios", flush=True)
    base = features(preset, "none")
    in_ref = np.random.default_rng(0).random(len(base)) < 0.5
    ref, pool = base[in_ref].reset_index(drop=True), base[~in_ref].reset_index(drop=True)
    ref_view = wl.profile(ref)
    ref_sketch = wl.column_sketches(ref_view)
    out: dict[str, Any] = {"reference_rows": len(ref), "no_change": [], "scenarios": []}
    for n in sorted({min(n, len(pool)) for n in (*SIZES, len(pool))}):
        live = pool.sample(n=min(n, len(pool)), random_state=1)
        view = wl.profile(live)
        report = compare(ref_view, view, policy, CTR_V1.names)
        cols = {c.column: c for c in report.columns}
        exact = {c: exact_pvalue(ref[c], live[c]) for c in COLUMNS}
        live_sketch = wl.column_sketches(view)
        sketch_gap = max(
            abs(
                psi(*_counts(bin_sketches(ref_sketch[c], live_sketch[c], policy.bins, 50)))
                - exact_psi(ref_sketch[c], ref[c], live[c], policy.bins)
            )
            for c in COLUMNS
        )
        row = {
            "live_rows": len(live),
            "flagged_by_rule": [c.column for c in report.drifted],
            "flagged_by_whylogs_p05": sorted(
                c
                for c, d in cols.items()
                if d.whylogs_pvalue is not None and d.whylogs_pvalue < 0.05
            ),
            "flagged_by_exact_tests_p05": sorted(c for c, p in exact.items() if p < 0.05),
            "max_psi": round(max(c.psi or 0 for c in report.columns), 6),
            "threshold_min": round(min(c.threshold or 1 for c in report.decided), 6),
            "max_sketch_vs_exact_psi_gap": round(sketch_gap, 6),
            "whylogs_pvalues": {c: _r(d.whylogs_pvalue) for c, d in cols.items()},
            "exact_pvalues": {c: _r(p) for c, p in exact.items()},
        }
        out["no_change"].append(row)
        print(
            f"  no change, {len(live):>7,} rows: rule {len(row['flagged_by_rule'])}, whylogs "
            f"{len(row['flagged_by_whylogs_p05'])}, exact {len(row['flagged_by_exact_tests_p05'])} "
            f"of {len(COLUMNS)} columns flagged",
            flush=True,
        )
    for scenario in ("surface_shift", "ctr_drop", "new_items"):
        drifted = features(preset, scenario)
        for n in (10_000, 100_000):
            live = drifted.sample(n=min(n, len(drifted)), random_state=2)
            report = compare(ref_view, wl.profile(live), policy, CTR_V1.names)
            top = sorted(report.drifted, key=lambda c: -(c.psi or 0))
            out["scenarios"].append(
                {
                    "scenario": scenario,
                    "live_rows": len(live),
                    "flagged": [c.column for c in top],
                    "drift_share": round(report.drift_share, 3),
                    "dataset_drift": report.dataset_drift,
                    "top_psi": {c.column: c.psi for c in top[:5]},
                }
            )
            print(
                f"  {scenario:13s} {len(live):>7,} rows: {len(top)} columns flagged, "
                f"share {report.drift_share:.0%}",
                flush=True,
            )
    out["_pool"] = pool  # reused by part 2, dropped before writing
    out["_ref_view"] = ref_view
    return out


def _counts(binned: Any) -> tuple[np.ndarray, np.ndarray]:
    return binned.reference, binned.live


def _r(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def part_accuracy(
    pool: pd.DataFrame,
    ref_view: Any,
    policy: DriftPolicy,
    trials: int,
    null_trials: int,
    n_ref: int,
) -> list[dict]:
    print(f"[2/3] detector accuracy, {trials} trials per cell", flush=True)
    rng = np.random.default_rng(7)
    ref = wl.column_sketches(ref_view)
    # The textbook case beside the served feature: a continuous, bell-shaped column.
    ref["N(0,1)"] = wl.column_sketches(
        wl.profile(pd.DataFrame({"N(0,1)": rng.normal(size=n_ref)}))
    )["N(0,1)"]
    alpha = policy.family_alpha / len(COLUMNS)
    sd = {SHIFT_COLUMN: float(pool[SHIFT_COLUMN].std()), "N(0,1)": 1.0}
    conditions: list[tuple[str, str | None, float]] = [("no change (any of 20 columns)", None, 0.0)]
    for column in (SHIFT_COLUMN, "N(0,1)"):
        for shift in (0.05, 0.1, 0.25, 0.5):
            conditions.append((f"mean shift {shift} SD in {column}", column, shift))
    conditions.append(("category mix: 5 pp feed -> recs", "surface", 0.05))
    rows = []
    for label, column, shift in conditions:
        for n in SIZES:
            hits, seconds = 0, 0.0
            # false positives are rare events: the no-change cells get more trials
            cell_trials = trials if column is not None else (null_trials if n < 100_000 else trials)
            for _ in range(cell_trials):
                idx = rng.choice(len(pool), size=n, replace=n > len(pool))
                live = pool.iloc[idx]
                started = time.perf_counter()
                if column is None:
                    report = compare(ref_view, wl.profile(live), policy, CTR_V1.names)
                    hit = bool(report.drifted)
                else:
                    if column == "surface":
                        values = live["surface"].to_numpy().copy()
                        feed = np.flatnonzero(values == "feed")
                        values[rng.choice(feed, size=int(round(shift * n)), replace=False)] = "recs"
                    elif column == "N(0,1)":
                        values = rng.normal(size=n) + shift
                    else:
                        values = live[column].to_numpy() + shift * sd[column]
                    sketch = wl.column_sketches(wl.profile(pd.DataFrame({column: values})))[column]
                    hit = judge(ref[column], sketch, policy, alpha)["drifted"]
                seconds += time.perf_counter() - started
                hits += hit
            rate = hits / cell_trials
            rows.append(
                {
                    "condition": label,
                    "live_rows": n,
                    "trials": cell_trials,
                    "flagged": hits,
                    "flag_rate": round(rate, 3),
                    "mean_seconds": round(seconds / trials, 3),
                }
            )
            print(f"  {label:40s} {n:>7,} rows: flagged {hits}/{cell_trials}", flush=True)
    return rows


def part_cost(pool: pd.DataFrame, ref_view: Any, policy: DriftPolicy) -> dict[str, Any]:
    print("[3/3] cost on one million live rows", flush=True)
    reps = int(np.ceil(1_000_000 / len(pool)))
    million = pd.concat([pool] * reps, ignore_index=True).iloc[:1_000_000]
    started = time.perf_counter()
    view = wl.profile(million)
    profile_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = wl.drift_scores(view, ref_view)
    whylogs_s = time.perf_counter() - started
    started = time.perf_counter()
    report = compare(ref_view, view, policy, CTR_V1.names)
    compare_s = time.perf_counter() - started
    assert len(scores) >= len(COLUMNS) and report.columns
    result = {
        "rows": len(million),
        "columns": len(COLUMNS),
        "profile_seconds": round(profile_s, 2),
        "profile_rows_per_second": round(len(million) / profile_s),
        "whylogs_drift_scores_seconds": round(whylogs_s, 3),
        "drift_compare_seconds_including_whylogs_scores": round(compare_s, 3),
    }
    print(f"  {result}", flush=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Drift detector calibration, accuracy and cost",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}; "
        f"date {m['date']}. Command: `python benchmarks/drift_calibration.py --preset "
        f"{result['preset']} --trials {result['trials']} --null-trials {result['null_trials']}`.",
        "",
        f"Rule: PSI over {result['policy']['bins']} reference-quantile bins above "
        f"max(psi_threshold = {result['policy']['psi_threshold']}, critical_psi at "
        f"family_alpha = {result['policy']['family_alpha']} / columns).",
        "",
        "## 1. No change: columns flagged (of 20)",
        "",
        f"Reference: {result['calibration']['reference_rows']:,} rows (random half of one "
        "stationary stream); live: samples of the other half.",
        "",
        "| live rows | project rule | whylogs p < 0.05 (sketch KS / chi-square) | "
        "exact tests p < 0.05 | max PSI | smallest limit | sketch vs exact PSI gap |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["calibration"]["no_change"]:
        lines.append(
            f"| {row['live_rows']:,} | {len(row['flagged_by_rule'])} | "
            f"{len(row['flagged_by_whylogs_p05'])} {_names(row['flagged_by_whylogs_p05'])} | "
            f"{len(row['flagged_by_exact_tests_p05'])} "
            f"{_names(row['flagged_by_exact_tests_p05'])} | "
            f"{row['max_psi']:.5f} | {row['threshold_min']:.5f} | "
            f"{row['max_sketch_vs_exact_psi_gap']:.5f} |"
        )
    lines += [
        "",
        "## 1b. Named drift scenarios (scenario from day 0, same seed)",
        "",
        "| scenario | live rows | columns flagged | drift share | dataset drift | largest PSI |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in result["calibration"]["scenarios"]:
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(row["top_psi"].items())[:3])
        lines.append(
            f"| {row['scenario']} | {row['live_rows']:,} | {len(row['flagged'])} | "
            f"{row['drift_share']:.0%} | {row['dataset_drift']} | {top} |"
        )
    lines += [
        "",
        "## 2. Detector accuracy (share of trials flagged)",
        "",
        f"Mean shifts add k standard deviations to every live value of `{SHIFT_COLUMN}` (a "
        "served feature: smoothed ratios, so many repeated values) or of a continuous N(0, 1) "
        "column (the textbook case; reference of the same size as the feature reference). "
        "Shifted columns are judged with the per-column alpha of a full run (family_alpha / 20). "
        'For "no change" a trial is a false positive when any of the 20 columns is flagged.',
        "",
        "| condition | " + " | ".join(f"{n:,} rows" for n in SIZES) + " |",
        "|---|" + "---:|" * len(SIZES),
    ]
    by_cond: dict[str, dict[int, str]] = {}
    for row in result["accuracy"]:
        by_cond.setdefault(row["condition"], {})[row["live_rows"]] = (
            f"{row['flag_rate']:.1%} ({row['flagged']}/{row['trials']})"
        )
    for cond, cells in by_cond.items():
        lines.append(f"| {cond} | " + " | ".join(cells[n] for n in SIZES) + " |")
    c = result["cost"]
    lines += [
        "",
        "## 3. Cost",
        "",
        f"Profiling {c['rows']:,} live rows x {c['columns']} columns with whylogs: "
        f"{c['profile_seconds']} s ({c['profile_rows_per_second']:,} rows/s). whylogs' drift "
        f"scores: {c['whylogs_drift_scores_seconds']} s; the full drift comparison (PSI, limits "
        f"and whylogs' scores): {c['drift_compare_seconds_including_whylogs_scores']} s.",
        "",
    ]
    return "\n".join(lines)


def _names(cols: list[str]) -> str:
    return f"({', '.join(cols)})" if cols else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="full")
    parser.add_argument("--trials", type=int, default=30, help="trials per shifted cell")
    parser.add_argument(
        "--null-trials", type=int, default=200, help="trials of the no-change cells below 100k rows"
    )
    args = parser.parse_args()
    policy = DriftPolicy()
    started = time.perf_counter()
    calibration = part_calibration(args.preset, policy)
    pool, ref_view = calibration.pop("_pool"), calibration.pop("_ref_view")
    accuracy = part_accuracy(
        pool, ref_view, policy, args.trials, args.null_trials, calibration["reference_rows"]
    )
    cost = part_cost(pool, ref_view, policy)
    result = {
        "machine": machine(),
        "preset": args.preset,
        "trials": args.trials,
        "null_trials": args.null_trials,
        "policy": {k: v for k, v in policy.__dict__.items() if k != "ignore_columns"},
        "calibration": calibration,
        "accuracy": accuracy,
        "cost": cost,
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "drift_calibration.md").write_text(markdown(result))
    print(f"wrote {RESULTS / 'drift_calibration.md'} in {result['seconds']} s")


if __name__ == "__main__":
    main()
