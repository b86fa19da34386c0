"""Batch scoring of two builds of the service, side by side: rows/s of the batch endpoints.

``tail_ab.py`` compares two bentos on ``/predict``; this one on ``/predict_columns`` and
``/predict_batch`` (1000-row calls, wrk at concurrency 1 and 2), in rounds that alternate
the two builds, since a change of a few percent is within what this host's noise does to
two runs; each build is started first for half of the rounds. Both serve one worker with
a profile window of an hour, so that no profiling helper takes a core during a round (the
window is production's concern, measured by ``serving_cost.py``). Reports each phase per
round, the mean per build and the ratio.

Usage::

    python benchmarks/batch_ab.py --project . --home .bentoml \\
        --tags ctr_service:<before> ctr_service:<after>
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serving_cost import (  # noqa: E402
    ab_arguments,
    batches,
    column_batches,
    serve_tags,
    start_orders,
)
from serving_latency import discard, full_bodies, stop_all  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import run_facts, run_line, save_results  # noqa: E402
from tests.support.loadtest import workload_frame  # noqa: E402

ROWS = 1000
PHASES = (  # name, endpoint, bodies, concurrency
    ("columns_c1", "/predict_columns", "columns", 1),
    ("columns_c2", "/predict_columns", "columns", 2),
    ("rows_c1", "/predict_batch", "rows", 1),
    ("rows_c2", "/predict_batch", "rows", 2),
)


def batch_phase(load: tuple[Any, ...], **labels: Any) -> dict[str, Any]:
    """One wrk phase of ``ROWS``-row calls (``load``: wrk's arguments): ``labels``, then
    rows/s and p50 / p99 ms; printed as it ends."""
    got = wrk(*load)
    out = {**labels, "rows_per_s": round(got["req_per_s"] * ROWS)}
    out.update(p50_ms=got["p50_ms"], p99_ms=got["p99_ms"])
    print(*labels.values(), out["rows_per_s"], got["p50_ms"], flush=True)
    return out


def main() -> None:
    parser = ab_arguments(__doc__.split("\n\n")[0], rounds=3, seconds=6.0, name="batch_ab")
    args = parser.parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="batch-ab-"))
    script = wrk_script(work)
    single = full_bodies(workload_frame(args.project / "data", 20 * ROWS))
    bodies = {
        "columns": lines(work / "columns.txt", column_batches(single, ROWS)),
        "rows": lines(work / "rows.txt", batches(single, ROWS, "requests")),
    }
    rounds: list[dict[str, Any]] = []
    r = 0
    try:
        for order, count in start_orders(args.tags, args.rounds):
            procs, urls, _ = serve_tags(args.home, order, work, profile_window_seconds=3600)
            try:
                for url in urls.values():  # warm up
                    wrk(url, "/predict_columns", bodies["columns"], 2, 2, script)
                for _ in range(count):
                    for tag in order if r % 2 == 0 else order[::-1]:
                        for name, path, kind, conc in PHASES:
                            rounds.append(
                                batch_phase(
                                    (urls[tag], path, bodies[kind], conc, args.seconds, script),
                                    round=r,
                                    tag=tag,
                                    phase=name,
                                    started_first=order[0],
                                )
                            )
                    r += 1
            finally:
                stop_all(procs)
    finally:
        discard(work)
    report = {
        **run_facts(started_at, load_before),
        "tags": args.tags,
        "rows_per_call": ROWS,
        "rounds": rounds,
        "command": "python benchmarks/batch_ab.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, args.name, report, markdown))


def markdown(report: dict[str, Any]) -> str:
    before, after = report["tags"]
    out = [
        "# Batch scoring, two bentos side by side",
        "",
        run_line(report) + f". {report['rows_per_call']}-row calls, "
        "wrk closed loop, one worker each; rows/s per round (p50 ms).",
        "",
        f"| phase | {before} | {after} | after / before (mean of rounds) |",
        "|---|---|---|---|",
    ]
    for name, *_ in PHASES:
        got = {
            tag: [r for r in report["rounds"] if r["phase"] == name and r["tag"] == tag]
            for tag in (before, after)
        }
        mean = {tag: sum(r["rows_per_s"] for r in v) / max(len(v), 1) for tag, v in got.items()}
        cells = [
            ", ".join(f"{r['rows_per_s']:,} ({r['p50_ms']})" for r in got[tag])
            for tag in (before, after)
        ]
        ratio = mean[after] / mean[before] if mean[before] else float("nan")
        out.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    out += ["", started_first(report["rounds"]), "", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(out)


def started_first(rounds: list[dict[str, Any]]) -> str:
    """Which bento was started first in which rounds (each, for half of them)."""
    firsts: dict[str, list[int]] = {}
    for r in rounds:
        if r.get("started_first") is not None and r["round"] not in firsts.get(
            r["started_first"], []
        ):
            firsts.setdefault(r["started_first"], []).append(r["round"])
    return "Started first: " + "; ".join(
        f"{tag} in round{'s' if len(v) > 1 else ''} {', '.join(map(str, v))}"
        for tag, v in firsts.items()
    )


if __name__ == "__main__":
    main()
