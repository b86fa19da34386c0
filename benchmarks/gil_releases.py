"""How often a scoring call lets go of the GIL, and where: gdb counts ``PyEval_SaveThread``.

Each time the scoring thread lets go of the GIL, a busy event loop can take it and the
scoring thread then waits to get it back, up to the interpreter's switch interval
(docs/serving.md, "Tail latency"). This loads the project's release in process as the
service does (``Predictor`` without a request log), warms it up, then runs ``--calls``
calls of ``--rows`` rows under gdb with a breakpoint on ``PyEval_SaveThread`` (the C
function behind ``Py_BEGIN_ALLOW_THREADS``) on the calling thread only, and attributes each
hit to the first frame below it. ``--code`` names the checkouts to import (this one, and
a worktree of an earlier commit to compare). Needs gdb (Debian: ``apt-get install gdb``).
Writes ``benchmarks/results/gil_releases.json`` and ``.md``.

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/gil_releases.py --project . --rows 1 1000 --code /tmp/before .
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._machine import machine, save_results  # noqa: E402
from pipelines.core.vcs import git  # noqa: E402

# The calls under gdb: SIGUSR1 before the measured calls, SIGUSR2 after them.
DRIVER = """
import os, signal, sys
from pathlib import Path
os.environ["BENTOML_HOME"] = str(Path(sys.argv[1]) / ".bentoml")
sys.path.insert(0, sys.argv[2])
import bentoml
from pipelines.modeling.release import load_release
from pipelines.serving.predictor import Predictor, PredictRequest, Runtime
from tests.support.loadtest import workload
project, rows, calls = Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])
release = load_release(project / "build/release/release.json")
predictor = Predictor(Runtime.load(release, lambda tag: Path(bentoml.models.get(tag).path)))
reqs = [PredictRequest.model_validate(b) for b in workload(project / "data", rows * (calls + 3))]
for k in range(3):
    predictor.predict(reqs[k * rows : (k + 1) * rows])
os.kill(os.getpid(), signal.SIGUSR1)
for k in range(3, calls + 3):
    predictor.predict(reqs[k * rows : (k + 1) * rows])
os.kill(os.getpid(), signal.SIGUSR2)
predictor.close()
"""
GDB = """set pagination off
set breakpoint pending on
handle SIGUSR1 stop nopass
handle SIGUSR2 stop nopass
run
break PyEval_SaveThread thread 1
commands
silent
printf "HIT\\n"
bt 4
continue
end
continue
delete
continue
"""
_FRAME = re.compile(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(\S+)")


def callers(output: str) -> collections.Counter[str]:
    """Hits by the first frame below ``PyEval_SaveThread`` (gdb's backtraces)."""
    found: collections.Counter[str] = collections.Counter()
    caller: str | None = None
    for line in output.splitlines():
        if line.startswith("HIT"):
            if caller is not None:
                found[caller] += 1
            caller = "?"
            continue
        m = _FRAME.match(line)
        if m and caller == "?" and m.group(1) == "1":
            caller = m.group(2).split("[")[0]  # numba's symbols carry their ABI tags
    if caller is not None:
        found[caller] += 1
    return found


def commit_of(checkout: Path) -> str:
    """The short commit a checkout is at (its label in the report)."""
    return git(checkout, "rev-parse", "--short", "HEAD", check=False) or str(checkout)


def count(gdb: str, project: Path, code: Path, rows: int, calls: int) -> collections.Counter[str]:
    """Releases by caller over ``calls`` calls of ``rows`` rows, importing ``code``."""
    with tempfile.TemporaryDirectory() as folder:
        driver, script = Path(folder) / "driver.py", Path(folder) / "commands.gdb"
        driver.write_text(DRIVER)
        script.write_text(GDB)
        cmd = [gdb, "-q", "-batch", "-x", str(script), "--args", sys.executable, str(driver)]
        cmd += [str(project), str(code), str(rows), str(calls)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if "exited normally" not in run.stdout:
        sys.exit(f"the driver did not finish under gdb:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    return callers(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=REPO)
    parser.add_argument("--rows", type=int, nargs="+", default=[1], help="rows per call")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument(
        "--code",
        type=Path,
        nargs="+",
        default=[REPO],
        help="checkouts whose pipelines/ to import (e.g. a worktree of an earlier commit too)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    args = parser.parse_args()
    gdb = shutil.which("gdb")
    if gdb is None:
        sys.exit("gdb is not installed: apt-get install gdb")
    runs = []
    for code in args.code:
        for rows in args.rows:
            print(f"gdb: {args.calls} calls of {rows} row(s), code at {code}", flush=True)
            found = count(gdb, args.project.resolve(), code.resolve(), rows, args.calls)
            runs.append(
                {
                    "commit": commit_of(code),
                    "rows_per_call": rows,
                    "releases_per_call": round(sum(found.values()) / args.calls, 2),
                    "by_caller_per_call": {
                        k: round(v / args.calls, 2) for k, v in found.most_common()
                    },
                }
            )
    report: dict[str, Any] = {
        "benchmark": "gil_releases",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "calls": args.calls,
        "runs": runs,
        "command": "python benchmarks/gil_releases.py " + " ".join(sys.argv[1:]),
    }
    print(save_results(args.out, "gil_releases", report, markdown))


def markdown(r: dict[str, Any]) -> str:
    out = [
        "# GIL releases of a `Predictor.predict` call, on the calling thread",
        "",
        f"{r['started_at']}; {r['machine']['cores']} cores ({r['machine']['cpu']}). "
        f"{r['calls']} calls per row, under gdb (breakpoint on `PyEval_SaveThread`), each "
        "hit attributed to the frame below it.",
        "",
        "| commit | rows per call | releases per call | by caller (per call) |",
        "|---|---|---|---|",
    ]
    for run in r["runs"]:
        by = ", ".join(f"`{k}` {v}" for k, v in run["by_caller_per_call"].items()) or "none"
        out.append(
            f"| {run['commit']} | {run['rows_per_call']} | {run['releases_per_call']} | {by} |"
        )
    out += ["", f"Reproduce: `{r['command']}`", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
