"""What undoing a change costs: a comment-only edit to modeling code, then its revert.

Makes a small-preset project (tests/support/project.py), runs the pipeline once, then
times three `dvc repro` runs in one go: after a comment added to
pipelines/modeling/model.py (train, evaluate, profile and package rerun, with identical
outputs), after reverting it (DVC's run-cache restores every stage), and a no-op.
Writes benchmarks/results/going_back.{json,md}.

    python benchmarks/going_back.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import machine  # noqa: E402

from tests.support.project import init_project, project_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def outs(lock_text: str) -> dict[str, str]:
    import yaml

    stages = yaml.safe_load(lock_text)["stages"]
    return {o["path"]: o["md5"] for st in stages.values() for o in st.get("outs", [])}


def repro(root: Path) -> tuple[float, list[str], list[str]]:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=root,
        env=project_env(root),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seconds = round(time.perf_counter() - started, 1)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    cached = [line.split("'")[1] for line in out.splitlines() if "is cached - skipping" in line]
    return seconds, ran, cached


def main() -> None:
    root = init_project(Path(tempfile.mkdtemp(prefix="mlops-going-back-")) / "project")
    first = repro(root)
    model = root / "pipelines/modeling/model.py"
    original = model.read_text()
    model.write_text(original + "\n# a comment-only change\n")
    edited = repro(root)
    lock_after_edit = (root / "dvc.lock").read_text()
    model.write_text(original)
    reverted = repro(root)
    noop = repro(root)
    rows = {
        "first run": first,
        "comment added to pipelines/modeling/model.py": edited,
        "comment reverted": reverted,
        "nothing changed": noop,
    }
    result = {
        "machine": machine(),
        "preset": "small",
        "runs": {
            k: {"seconds": s, "ran": r, "restored_from_run_cache": c}
            for k, (s, r, c) in rows.items()
        },
        "outputs_identical_after_edit": outs(lock_after_edit)
        == outs((root / "dvc.lock").read_text()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "going_back.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Going back: undoing a change restores outputs from DVC's run-cache",
        "",
        f"{m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['date']}; small preset;"
        " `python benchmarks/going_back.py`.",
        "",
        "| `dvc repro` after | seconds | stages run | stages restored from run-cache |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['seconds']} | {', '.join(v['ran']) or '-'} | "
            f"{', '.join(v['restored_from_run_cache']) or '-'} |"
            for k, v in result["runs"].items()
        ),
        "",
    ]
    (RESULTS / "going_back.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
