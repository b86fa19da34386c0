"""Wall time of `make run` on a fresh clone, phase by phase.

Clones the current commit into a temporary folder and runs `make setup`, `make data`
and `make run` there (the last one finds setup and data done, so its time is the
pipeline itself plus the summary). Writes benchmarks/results/pipeline_wall_time.{json,md}.

    python benchmarks/pipeline_wall_time.py [--keep]

The uv download cache (~/.cache/uv) is shared with the machine, so `setup` is
faster on a machine that installed the same lock before; the result says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    uv_cache_warm = (Path.home() / ".cache" / "uv").is_dir()
    tmp = Path(tempfile.mkdtemp(prefix="mlops-walltime-"))
    clone = tmp / "clone"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "BENTOML"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    phases = {
        "setup": timed(["make", "setup"], clone, env),
        "data": timed(["make", "data"], clone, env),
        "pipeline (make run after setup and data)": timed(["make", "run"], clone, env),
    }
    total = round(sum(phases.values()), 1)
    result = {
        "benchmark": "make run on a fresh clone",
        "commit": commit,
        "phases_seconds": phases,
        "total_seconds": total,
        "uv_cache_warm": uv_cache_warm,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_wall_time.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in phases.items())
    (RESULTS / "pipeline_wall_time.md").write_text(
        f"# `make run` wall time on a fresh clone\n\n"
        f"Measured {m['date']} on {m['cores']} cores ({m['cpu']}, {m['memory_gib']} GiB), "
        f"Python {m['python']}, commit `{commit[:10]}`, uv download cache "
        f"{'warm' if uv_cache_warm else 'cold'}.\n"
        "Reproduce: `python benchmarks/pipeline_wall_time.py`.\n\n"
        f"| phase | seconds |\n|---|---|\n{rows}\n| **total** | **{total:.1f}** |\n"
    )
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
