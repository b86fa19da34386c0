"""False alarms and detection of the drift rule on time-disjoint windows of the generator.

Point-in-time features of the ``full`` preset (seed 42, 14 days, ~1.5M rows) are
judged the way the monitor judges live traffic: a reference built from one period
(exact bins, hourly windows: ``pipelines.stages.drift_reference``) and a later,
disjoint window (``pipelines.monitoring.drift.compare_reference``). Written to
benchmarks/results/drift_calibration.{json,md}:

1. **Undrifted time windows** (scenario ``none``): every consecutive day pair of days
   8-13 (reference day d, live day d+1) and every hour of days 9-13 against the
   previous day's reference; next to them, the same days split **at random by row**
   (the iid view that hides clustered variation).
2. **Named scenarios** starting on day 10: reference day 9, live = day 10 (the first
   day) and each of its hours.
3. **Detection against shift size** over repeated trials: mean shifts of 0.05-0.5 SD in
   the served feature ``user_ctr_7d`` (reference: day 8 with its hours; live: rows of
   day 9) and in an iid N(0, 1) column (reference: 100k rows in 24 windows); null-rate
   increases of 2, 5 and 10 percentage points in ``user_ctr_7d``; no change in 20 iid
   N(0, 1) columns (false positives).
4. **Determinism**: the same inputs judged twice give identical JSON.
5. **Cost**: building a reference and judging a window.

    python benchmarks/drift_calibration.py [--trials 30] [--cache DIR]

``--cache DIR`` keeps the generated feature tables as parquet (same rows either way).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import machine  # noqa: E402

from pipelines.features.definitions import CTR_V1  # noqa: E402
from pipelines.features.offline import point_in_time_features  # noqa: E402
from pipelines.monitoring.drift import DriftSettings, compare_reference  # noqa: E402
from pipelines.simulation.generate import generate_events  # noqa: E402
from pipelines.stages.drift_reference import build_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["surface", "device", *CTR_V1.names]
GROWING = {g: "grows by construction (count over all history)" for g in CTR_V1.growing}
SCENARIO_DAY = 10
SHIFT_COLUMN = "user_ctr_7d"
SIZES = (1_000, 10_000, 100_000)
SHIFTS = (0.05, 0.1, 0.25, 0.5)
NULL_STEPS = (0.02, 0.05, 0.1)


def features(scenario: str, start_day: int, cache: Path | None) -> pd.DataFrame:
    """Point-in-time features of the full preset with ``ts`` and ``day`` (0 = first day)."""
    path = cache / f"{scenario}_{start_day}.parquet" if cache else None
    if path is not None and path.is_file():
        table = pd.read_parquet(path)
    else:
        events = generate_events("full", 42, scenario=scenario, scenario_start_day=start_day)
        table = point_in_time_features(events)[["ts", *COLUMNS]]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(path)
    day0 = table["ts"].min().floor("D")
    table = table.copy()
    table["day"] = ((table["ts"] - day0) // pd.Timedelta(days=1)).astype(int)
    return table


def reference(rows: pd.DataFrame, policy: DriftSettings) -> dict[str, Any]:
    return build_reference(rows[COLUMNS], rows["ts"], "1h", policy.bins, growing=GROWING)


def judge(ref: dict[str, Any], rows: pd.DataFrame, policy: DriftSettings, times: bool = True):
    return compare_reference(
        ref, rows[COLUMNS], rows["ts"] if times else None, policy, CTR_V1.names
    )


def part_time_windows(base: pd.DataFrame, policy: DriftSettings) -> dict[str, Any]:
    print("[1/5] undrifted day pairs and hours, time-disjoint and random splits", flush=True)
    days, hours, random_days, random_hours = [], [], [], []
    for d in range(8, 13):
        ref_rows, live_rows = base[base.day == d], base[base.day == d + 1]
        ref = reference(ref_rows, policy)
        rep = judge(ref, live_rows, policy)
        top = sorted(rep.decided, key=lambda c: -(c.psi or 0) / (c.threshold or 1))[:3]
        days.append(
            {
                "reference_day": d,
                "live_day": d + 1,
                "live_rows": len(live_rows),
                "flagged": [c.column for c in rep.drifted],
                "dataset_drift": rep.dataset_drift,
                "closest": [
                    {"column": c.column, "psi": c.psi, "threshold": c.threshold} for c in top
                ],
            }
        )
        for start, part in live_rows.groupby(live_rows["ts"].dt.floor("1h")):
            r = judge(ref, part, policy)
            hours.append({"hour": start.isoformat(), "rows": len(part), "flagged": _cols(r)})
        # the iid view: the two days' rows shuffled into a reference half and a live half
        both = pd.concat([ref_rows, live_rows])
        mask = np.random.default_rng(d).random(len(both)) < len(ref_rows) / len(both)
        r_ref, r_live = both[mask], both[~mask]
        ref_iid = reference(r_ref, policy)
        random_days.append({"live_day": d + 1, "flagged": _cols(judge(ref_iid, r_live, policy))})
        for _, part in r_live.groupby(np.arange(len(r_live)) % 24):
            random_hours.append(_cols(judge(ref_iid, part, policy, times=False)))
        print(f"  day {d}->{d + 1}: flagged {days[-1]['flagged']}", flush=True)
    return {
        "day_pairs": days,
        "day_alarms": sum(bool(x["flagged"]) for x in days),
        "hours": hours,
        "hour_alarms": sum(bool(h["flagged"]) for h in hours),
        "hour_flag_counts": _counts([h["flagged"] for h in hours]),
        "random_day_alarms": sum(bool(x["flagged"]) for x in random_days),
        "random_hour_alarms": sum(bool(h) for h in random_hours),
        "random_hours": len(random_hours),
    }


def part_scenarios(base: pd.DataFrame, cache: Path | None, policy: DriftSettings) -> list[dict]:
    print(f"[2/5] named scenarios from day {SCENARIO_DAY}", flush=True)
    ref = reference(base[base.day == SCENARIO_DAY - 1], policy)
    out = []
    for scenario in ("surface_shift", "ctr_drop", "new_items"):
        table = features(scenario, SCENARIO_DAY, cache)
        live = table[table.day == SCENARIO_DAY]
        rep = judge(ref, live, policy)
        hours = [judge(ref, p, policy) for _, p in live.groupby(live["ts"].dt.floor("1h"))]
        top = sorted(rep.drifted, key=lambda c: -(c.psi or 0))[:3]
        out.append(
            {
                "scenario": scenario,
                "live_rows": len(live),
                "flagged": [f"{c.column}:{'/'.join(c.reasons)}" for c in rep.drifted],
                "drift_share": round(rep.drift_share, 3),
                "dataset_drift": rep.dataset_drift,
                "largest": [f"{c.column} {c.psi:.3f} (limit {c.threshold:.3f})" for c in top],
                "first_hour_flagged": _cols(hours[0]),
                "hours_flagged": sum(bool(h.drifted) for h in hours),
                "hours": len(hours),
            }
        )
        print(f"  {scenario}: {out[-1]['flagged']}", flush=True)
    return out


def part_accuracy(base: pd.DataFrame, trials: int, policy: DriftSettings) -> list[dict]:
    print(f"[3/5] detection against shift size ({trials} trials per cell)", flush=True)
    rng = np.random.default_rng(7)
    ref_rows = base[base.day == 8]
    pool = base[base.day == 9].reset_index(drop=True)
    ref_feature = build_reference(ref_rows[[SHIFT_COLUMN]], ref_rows["ts"], "1h", policy.bins)
    iid_times = pd.Series(
        pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(100_000) % 24, "h")
    )
    iid_ref = build_reference(
        pd.DataFrame({"x": rng.normal(size=100_000)}), iid_times, "1h", policy.bins
    )
    cols20 = [f"x{i}" for i in range(20)]
    iid20_ref = build_reference(
        pd.DataFrame(rng.normal(size=(100_000, 20)), columns=cols20), iid_times, "1h", policy.bins
    )
    # a full run makes 40 tests (20 columns, their null rates); one column makes 2
    single = DriftSettings(**{**policy.model_dump(), "family_alpha": policy.family_alpha / 20})
    sd = float(ref_rows[SHIFT_COLUMN].std())
    rows: list[dict] = []

    def cell(condition: str, run) -> None:
        row: dict[str, Any] = {"condition": condition}
        for n in SIZES:
            hits = sum(run(n) for _ in range(trials))
            row[str(n)] = {"flagged": hits, "trials": trials}
        rows.append(row)
        print(f"  {condition}: {[row[str(n)]['flagged'] for n in SIZES]}", flush=True)

    def live_feature(n: int) -> pd.DataFrame:
        return pool.iloc[rng.choice(len(pool), size=n, replace=False)][[SHIFT_COLUMN]].copy()

    def flagged(ref, frame, pol) -> bool:
        return bool(compare_reference(ref, frame, None, pol).drifted)

    for k in SHIFTS:
        cell(
            f"mean shift {k} SD in {SHIFT_COLUMN}",
            lambda n, k=k: flagged(ref_feature, live_feature(n) + k * sd, single),
        )
    for k in SHIFTS:
        cell(
            f"mean shift {k} SD in iid N(0,1)",
            lambda n, k=k: flagged(iid_ref, pd.DataFrame({"x": rng.normal(size=n) + k}), single),
        )

    def with_nulls(n: int, share: float) -> pd.DataFrame:
        frame = live_feature(n)
        frame.loc[rng.random(n) < share, SHIFT_COLUMN] = np.nan
        return frame

    for share in NULL_STEPS:
        cell(
            f"null rate +{share * 100:.0f} pp in {SHIFT_COLUMN}",
            lambda n, s=share: flagged(ref_feature, with_nulls(n, s), single),
        )
    cell(
        "no change, any of 20 iid N(0,1) columns",
        lambda n: flagged(
            iid20_ref, pd.DataFrame(rng.normal(size=(n, 20)), columns=cols20), policy
        ),
    )
    return rows


def part_determinism(base: pd.DataFrame, policy: DriftSettings) -> dict[str, Any]:
    print("[4/5] determinism", flush=True)
    rows = base[base.day == 11]
    live = base[base.day == 12]
    first = judge(reference(rows, policy), live, policy).to_dict()
    second = judge(reference(rows.sample(frac=1.0, random_state=3), policy), live, policy).to_dict()
    a, b = json.dumps(first, sort_keys=True), json.dumps(second, sort_keys=True)
    return {"identical": a == b, "bytes": len(a)}


def part_cost(base: pd.DataFrame, policy: DriftSettings) -> dict[str, Any]:
    print("[5/5] cost", flush=True)
    ref_rows = base[(base.day >= 1) & (base.day <= 9)]
    started = time.perf_counter()
    ref = reference(ref_rows, policy)
    build_s = time.perf_counter() - started
    live = base[base.day >= 10]
    started = time.perf_counter()
    judge(ref, live, policy)
    judge_s = time.perf_counter() - started
    return {
        "reference_rows": len(ref_rows),
        "reference_windows": len(ref["windows"]),
        "reference_json_bytes": len(json.dumps(ref, separators=(",", ":"))),
        "build_seconds": round(build_s, 2),
        "live_rows": len(live),
        "judge_seconds": round(judge_s, 2),
    }


def _cols(report) -> list[str]:
    return [c.column for c in report.drifted]


def _counts(lists: list[list[str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for names in lists:
        for n in names:
            out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _pct(hits: int, total: int) -> str:
    return f"{hits / total:.1%} ({hits}/{total})" if total else "-"


def markdown(result: dict[str, Any]) -> str:
    m, t = result["machine"], result["time_windows"]
    lines = [
        "# Drift calibration on time-disjoint windows",
        "",
        f"`{result['command']}` — {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
        f"Python {m['python']}, {m['date']}; {result['seconds']:.0f} s.",
        "",
        "## Undrifted windows (scenario none, full preset)",
        "",
        "| windows | time-disjoint (reference = previous day) | random split by row (iid view) |",
        "|---|---:|---:|",
        f"| consecutive day pairs, days 8-13 | {_pct(t['day_alarms'], len(t['day_pairs']))} "
        f"| {_pct(t['random_day_alarms'], len(t['day_pairs']))} |",
        f"| hours of days 9-13 | {_pct(t['hour_alarms'], len(t['hours']))} "
        f"| {_pct(t['random_hour_alarms'], t['random_hours'])} |",
        "",
        "Columns behind hourly alarms: "
        + (", ".join(f"{k} {v}" for k, v in t["hour_flag_counts"].items()) or "none"),
        "",
        "| day pair | live rows | flagged | closest to its limit (PSI / limit) |",
        "|---|---:|---|---|",
    ]
    for d in t["day_pairs"]:
        closest = ", ".join(
            f"{c['column']} {c['psi']:.4f} / {c['threshold']:.4f}" for c in d["closest"]
        )
        flagged = ", ".join(d["flagged"]) or "none"
        lines.append(
            f"| {d['reference_day']} -> {d['live_day']} | {d['live_rows']:,} | {flagged} | "
            f"{closest} |"
        )
    lines += [
        "",
        f"## Named scenarios (from day {SCENARIO_DAY}; reference day {SCENARIO_DAY - 1})",
        "",
        "| scenario | first-day rows | flagged on the first day (reason) | drift share | "
        "dataset drift | largest PSI | first hour flagged | hours flagged |",
        "|---|---:|---|---:|---|---|---|---:|",
    ]
    for s in result["scenarios"]:
        lines.append(
            f"| {s['scenario']} | {s['live_rows']:,} | {', '.join(s['flagged'])} | "
            f"{s['drift_share']:.0%} | {s['dataset_drift']} | {'; '.join(s['largest'])} | "
            f"{', '.join(s['first_hour_flagged']) or 'none'} | {s['hours_flagged']}/{s['hours']} |"
        )
    lines += [
        "",
        "## Detection against shift size (share of trials flagged)",
        "",
        "| condition | " + " | ".join(f"{n:,} rows" for n in SIZES) + " |",
        "|---|" + "---:|" * len(SIZES),
    ]
    for row in result["accuracy"]:
        cells = [_pct(row[str(n)]["flagged"], row[str(n)]["trials"]) for n in SIZES]
        lines.append(f"| {row['condition']} | " + " | ".join(cells) + " |")
    d, c = result["determinism"], result["cost"]
    lines += [
        "",
        f"**Determinism**: the same rows (reference rows in another order) judged twice give "
        f"identical JSON: {d['identical']} ({d['bytes']:,} bytes).",
        "",
        f"**Cost**: reference of {c['reference_rows']:,} rows in {c['reference_windows']} hourly "
        f"windows built in {c['build_seconds']} s ({c['reference_json_bytes']:,} bytes of JSON); "
        f"{c['live_rows']:,} live rows judged in {c['judge_seconds']} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    policy = DriftSettings()
    base = features("none", 0, args.cache)
    result: dict[str, Any] = {
        "command": "python benchmarks/drift_calibration.py" + f" --trials {args.trials}",
        "machine": machine(),
        "policy": policy.model_dump(mode="json"),
    }
    result["time_windows"] = part_time_windows(base, policy)
    result["scenarios"] = part_scenarios(base, args.cache, policy)
    result["accuracy"] = part_accuracy(base, args.trials, policy)
    result["determinism"] = part_determinism(base, policy)
    result["cost"] = part_cost(base, policy)
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drift_calibration.json").write_text(
        json.dumps(result, indent=2, default=str) + "\n"
    )
    (RESULTS / "drift_calibration.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
