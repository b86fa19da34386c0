"""What the request-log line costs the served batch path: a bento as built against copies of
it whose writer thread builds a smaller line, or none, and against the floors of the path,
side by side.

Each variant is the same exported bento imported into a BentoML home of its own, with
its source edited in that copy only. ``pipelines/serving/request_log.py``:

* ``no features``: the line without its feature matrix (null in its place);
* ``no line``: a line holding only the row count: what the whole line costs;
* ``not written``: the whole line built, but not written to the shard: what the write costs.

``bentos/service.py`` (``/predict_batch`` only), the floors under the scoring:

* ``rows read, fixed answer``: the body parsed and read into columns as served, then a
  fixed answer of the same size and shape (no scoring, no log line);
* ``body only, fixed answer``: the body received but not parsed, the same fixed answer:
  what BentoML, the middleware and HTTP cost such a call.

The variants lose request-log data or answer wrongly; they exist to be measured, never to
be served. Each serves one worker with a profile window of an hour (no profiling helper
during a round); wrk at concurrency 1 drives ``/predict_columns`` and ``/predict_batch``
with 1000-row calls, the variants alternating within each round, and the bare BentoML
service of ``serving_cost.py`` (the scikit-learn model on precomputed features) in the
same rounds, on its one batch endpoint.

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
from serving_latency import bare_bodies, discard, full_bodies, service_env, stop_all  # noqa: E402

from benchmarks._loadgen import lines, wrk, wrk_script  # noqa: E402
from benchmarks._machine import run_facts, run_line, save_results  # noqa: E402
from pipelines.stages.packaging import import_bento  # noqa: E402
from tests.support.loadtest import workload_frame  # noqa: E402

PHASES = (("columns_c1", "/predict_columns", "columns"), ("rows_c1", "/predict_batch", "rows"))
BARE = "bare BentoML"
_LINE = "        head = memoryview(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY))[:-1]\n"
_FEATURES = "        if self.features is None:\n"
_WRITE = "                self._file.write(data)\n"
LOG = "pipelines/serving/request_log.py"
SERVICE = "bentos/service.py"
# One answer row as the bento writes it, for the fixed answers of the floors.
_ROW = (
    '{"request_id":"5b455b699ded14dc-0","probability":0.200168,"model_version":"m0f30dacced5e",'
    '"route":"prod","degraded":false,"degraded_reason":null,"feature_age_seconds":0.0,'
    '"features_fresh":true,"runtime":"compiled"}'
)
_FIXED = (  # the fixed answer, built once when the service module loads
    "class BatchInput(bentoml.IODescriptor):\n",
    f"_FIXED = b'[' + b','.join([b'{_ROW}'] * {ROWS}) + b']'\n\n\n"
    "class BatchInput(bentoml.IODescriptor):\n",
)
_ANSWER_FIXED = (
    "        rows: RequestRows = requests  # read as columns (pipelines/serving/schema.py)\n",
    '        return Response(_FIXED, media_type="application/json")\n',
)
_BODY_ONLY = (
    "            rows = read_batch(await request.body(), MAX_BATCH)\n",
    "            await request.body()\n            return cls.model_construct(requests=None)\n",
)
_ROWS_READ = ((SERVICE, *_FIXED), (SERVICE, *_ANSWER_FIXED))
# variant: edits of (file under the bento's src, its text, the replacement); each text
# must be there once
EDITS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "as built": (),
    "no features": ((LOG, _FEATURES, "        if True:\n"),),
    "no line": (
        (LOG, _LINE, '        return orjson.dumps({"n": len(self.request_ids)}) + b"\\n"\n'),
    ),
    "not written": ((LOG, _WRITE, "                pass\n"),),
    "rows read, fixed answer": _ROWS_READ,
    "body only, fixed answer": (*_ROWS_READ, (SERVICE, *_BODY_ONLY)),
}
# the variants that edit the service (its batch endpoint)
FLOORS = tuple(v for v, edits in EDITS.items() if any(e[0] == SERVICE for e in edits))
# per service: (phase, endpoint, bodies); the floors answer rows only; the bare service
# has one batch endpoint and form
JOBS = {
    **{variant: PHASES[1:] if variant in FLOORS else PHASES for variant in EDITS},
    BARE: (("bare", "/predict_batch", "bare"),),
}


def variant_home(bento: Path, home: Path, edits: tuple[tuple[str, str, str], ...]) -> str:
    """Import ``bento`` into ``home`` and apply ``edits`` to its source; the tag."""
    tag = import_bento(bento, home).split('"')[1]
    for path, text, replacement in edits:
        source = home / "bentos" / tag.replace(":", "/") / "src" / path
        now = source.read_text()
        if now.count(text) != 1:
            raise SystemExit(f"{source}: the text to edit is not there once: {text!r}")
        source.write_text(now.replace(text, replacement))
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
        for k, (variant, edits) in enumerate(EDITS.items()):
            folder = work / f"variant{k}"
            tag = variant_home(args.bento.resolve(), folder / "home", edits)
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
        stop_all(procs)
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
    out = [
        "# What the request-log line costs the batch path",
        "",
        run_line(report) + f". Bento {report['bento']} as built and "
        "with its request log or its batch endpoint edited (benchmarks/log_line_cost.py); "
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
            if not got:  # the floors answer rows only
                continue
            mean[variant] = sum(r["rows_per_s"] for r in got) / len(got)
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
