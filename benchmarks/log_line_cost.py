"""What the request-log line costs the served batch path: a bento as built against copies of
it whose writer thread builds a smaller line, or none, side by side.

Each variant is the same exported bento imported into a BentoML home of its own, with
``pipelines/serving/request_log.py`` edited in that copy only:

* ``no features``: the line without its feature matrix (null in its place);
* ``no line``: a line holding only the row count: what the whole line costs;
* ``not written``: the whole line built, but not written to the shard: what the write costs.

The variants lose request-log data; they exist to be measured, never to be served. Each
serves one worker with a profile window of an hour (no profiling helper during a round);
wrk at concurrency 1 drives ``/predict_columns`` and ``/predict_batch`` with 1000-row
calls, the variants alternating within each round, and the bare BentoML service of
``serving_cost.py`` (the scikit-learn model on precomputed features) in the same rounds,
on its one batch endpoint.

Usage::

    python benchmarks/log_line_cost.py --project . --bento build/bento/ctr_service.bento
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from batch_ab import ROWS, batch_phase  # noqa: E402
from serving_cost import (  # noqa: E402
    TOKEN,
    batches,
    column_batches,
    serve_bare,
    serve_tags,
)
from serving_latency import bare_bodies, discard, full_bodies, service_env, stop  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import run_facts, save_results  # noqa: E402
from pipelines.stages.packaging import import_bento  # noqa: E402
from tests.support.loadtest import workload_frame  # noqa: E402

PHASES = (("columns_c1", "/predict_columns", "columns"), ("rows_c1", "/predict_batch", "rows"))
BARE = "bare BentoML"
_LINE = '        return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\\n"\n'
_FEATURES = '"features": None if self.features is None else np.ascontiguousarray(self.features),'
_WRITE = "                self._file.write(data)\n"
# variant: (text of request_log.py, its replacement); the text must be there
EDITS: dict[str, tuple[str, str] | None] = {
    "as built": None,
    "no features": (_FEATURES, '"features": None,'),
    "no line": (_LINE, '        return orjson.dumps({"n": len(self.request_ids)}) + b"\\n"\n'),
    "not written": (_WRITE, "                pass\n"),
}
# per service: (phase, endpoint, bodies); the bare service has one batch endpoint and form
JOBS = {**{variant: PHASES for variant in EDITS}, BARE: (("bare", "/predict_batch", "bare"),)}


def variant_home(bento: Path, home: Path, edit: tuple[str, str] | None) -> str:
    """Import ``bento`` into ``home`` and apply ``edit`` to its request log; the tag."""
    tag = import_bento(bento, home).split('"')[1]
    if edit is not None:
        source = home / "bentos" / tag.replace(":", "/") / "src/pipelines/serving/request_log.py"
        text = source.read_text()
        if text.count(edit[0]) != 1:
            raise SystemExit(f"{source}: the text to edit is not there once: {edit[0]!r}")
        source.write_text(text.replace(edit[0], edit[1]))
    return tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--bento", type=Path, required=True, help="an exported bento")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase, round and variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="log-line-cost-"))
    script = wrk_script(work)
    rows = workload_frame(args.project / "data", 20 * ROWS)
    single = full_bodies(rows)
    bodies = {
        "columns": lines(work / "columns.txt", column_batches(single, ROWS)),
        "rows": lines(work / "rows.txt", batches(single, ROWS, "requests")),
        "bare": lines(
            work / "bare.txt", batches(bare_bodies(rows, args.project / "data"), ROWS, "rows")
        ),
    }
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    rounds: list[dict[str, Any]] = []
    tag = ""
    try:
        for k, (variant, edit) in enumerate(EDITS.items()):
            folder = work / f"variant{k}"
            tag = variant_home(args.bento.resolve(), folder / "home", edit)
            served, served_urls, releases = serve_tags(
                folder / "home", [tag], folder, profile_window_seconds=3600
            )
            procs += served
            urls[variant] = served_urls[tag]
            print(f"serving {variant!r} at {urls[variant]}", flush=True)
        env = service_env(folder, TOKEN)  # a home holding the model too
        proc, urls[BARE] = serve_bare(releases[tag]["prod"]["tag"], env, work)
        procs.append(proc)
        for variant, url in urls.items():  # warm up
            _, path, kind = JOBS[variant][0]
            wrk(url, path, bodies[kind], 1, 2, script)
        names = list(JOBS)
        for r in range(args.rounds):
            for variant in names[r % len(names) :] + names[: r % len(names)]:
                for phase, path, kind in JOBS[variant]:
                    load = (urls[variant], path, bodies[kind], 1, args.seconds, script)
                    rounds.append(batch_phase(load, round=r, variant=variant, phase=phase))
    finally:
        for proc in procs:
            stop(proc)
        discard(work)
    report = {
        **run_facts(started_at, load_before),
        "bento": tag,
        "rows_per_call": ROWS,
        "rounds": rounds,
        "command": "python benchmarks/log_line_cost.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, "log_line_cost", report, markdown))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        "# What the request-log line costs the batch path",
        "",
        f"{report['started_at']}; {m['cores']} cores ({m['cpu']}); load average "
        f"{report['load_average_before'][0]:.2f} before, "
        f"{report['load_average_after'][0]:.2f} after. Bento {report['bento']} as built and "
        f"with its request log edited (benchmarks/log_line_cost.py); "
        f"{report['rows_per_call']}-row calls, wrk at concurrency 1, one worker each. "
        "Rows/s per round (p50 ms), and the mean over rounds against the bento as built.",
        "",
        "| phase | variant | rounds | mean rows/s | against as built | against bare |",
        "|---|---|---|---|---|---|",
    ]
    bare = [r["rows_per_s"] for r in report["rounds"] if r["phase"] == "bare"]
    bare_mean = sum(bare) / len(bare) if bare else float("nan")
    for phase, *_ in PHASES:
        mean: dict[str, float] = {}
        for variant in EDITS:
            got = [r for r in report["rounds"] if r["phase"] == phase and r["variant"] == variant]
            mean[variant] = sum(r["rows_per_s"] for r in got) / max(len(got), 1)
            cells = ", ".join(f"{r['rows_per_s']:,} ({r['p50_ms']})" for r in got)
            base = mean.get("as built") or float("nan")
            out.append(
                f"| {phase} | {variant} | {cells} | {mean[variant]:,.0f} | "
                f"{mean[variant] / base:.2f} | {mean[variant] / bare_mean:.2f} |"
            )
    cells = ", ".join(
        f"{r['rows_per_s']:,} ({r['p50_ms']})" for r in report["rounds"] if r["phase"] == "bare"
    )
    out.append(f"| batch | {BARE} | {cells} | {bare_mean:,.0f} | | 1.00 |")
    out += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
