"""Pipeline fault injection: kill `dvc repro` in every stage, bad params, corrupt raw data.

Builds a small-preset project (git + DVC, one full `dvc repro`) in a temporary
folder, then for each stage and each kill delay: changes a param that reruns
that stage, SIGKILLs `dvc repro` (process group and the Jupyter kernel) that
many seconds after the stage's notebook started, checks that every output is
byte-identical and no temporary sits inside an output, reruns `dvc repro` and
times the recovery until `dvc status` is clean. Also times how fast a bad
params value is refused and checks a truncated raw file is named.
Stops by itself after --budget seconds (remaining scenarios are skipped and
reported). Writes benchmarks/results/pipeline_faults.{json,md}.

    python benchmarks/pipeline_faults.py [--delays 0.5 3] [--budget 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

from tests.support.faults import (  # noqa: E402
    dvc_status,
    kill_repro_during,
    snapshot,
    stage_outputs,
    stray_temporaries,
)
from tests.support.project import init_project, project_env, run, set_param  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# A param per stage that reruns it (and what follows); values alternate so each run changes it.
TRIGGERS = {
    "build_dataset": ("build_dataset.warmup_hours", [23, 24]),
    "train": ("train.learning_rate", [0.12, 0.1]),
    "evaluate": ("evaluate.calibration_bins", [9, 10]),
    "profile": ("base.seed", None),  # profile has no params: rerun it with `dvc repro -f -s`
    "package": ("serving.freshness_sla_seconds", [301, 300]),
}


def kill_scenario(root: Path, stage: str, delay: float, flip: int) -> dict[str, object]:
    env = project_env(root)
    outputs = sorted({p for paths in stage_outputs(root).values() for p in paths})
    before = snapshot(root, outputs)
    lock_before = (root / "dvc.lock").read_text()
    key, values = TRIGGERS[stage]
    targets: tuple[str, ...] = ()
    if values is None:
        targets = ("-f", "-s", stage)
    else:
        set_param(root, key, values[flip % 2])
    kill = kill_repro_during(root, stage, delay, env=env, targets=targets)
    intact = snapshot(root, outputs) == before and (root / "dvc.lock").read_text() == lock_before
    inside = [
        str(p.relative_to(root))
        for rel in outputs
        if (root / rel).is_dir()
        for p in (root / rel).rglob(".*")
        if p.name != ".gitignore"
    ]
    started = time.perf_counter()
    rerun = run([sys.executable, "-m", "dvc", "repro", *targets], root, check=False, env=env)
    if targets:  # a forced single-stage rerun leaves nothing else to do
        rerun = run([sys.executable, "-m", "dvc", "repro"], root, check=False, env=env)
    recover_s = time.perf_counter() - started
    clean = rerun.returncode == 0 and dvc_status(root, env) == {}
    leftovers = stray_temporaries(root, outputs)
    return {
        "scenario": f"kill {stage} +{delay:g}s",
        "stage": stage,
        "delay_s": delay,
        "killed_after_s": round(kill.killed_after_s, 1),
        "signal_exit": kill.exit_code,
        "outputs_intact": intact,
        "temporaries_inside_outputs": inside,
        "temporaries_after_rerun": leftovers,
        "recovered": clean,
        "recover_s": round(recover_s, 1),
        "survived": bool(intact and not inside and clean and not leftovers),
    }


def bad_params_scenario(root: Path) -> dict[str, object]:
    env = project_env(root)
    text = (root / "params.yaml").read_text()
    set_param(root, "build_dataset.warmup_hours", -5)
    started = time.perf_counter()
    result = run([sys.executable, "-m", "dvc", "repro"], root, check=False, env=env)
    seconds = time.perf_counter() - started
    (root / "params.yaml").write_text(text)
    named = "build_dataset.warmup_hours: must be >= 0" in result.stderr
    return {
        "scenario": "params: build_dataset.warmup_hours = -5",
        "refused_in_s": round(seconds, 1),
        "message_names_key": named,
        "notebook_executed": (root / "reports" / "failed").exists(),
        "survived": bool(result.returncode != 0 and named and dvc_status(root, env) == {}),
    }


def corrupt_raw_scenario(root: Path) -> dict[str, object]:
    env = project_env(root)
    outputs = sorted({p for paths in stage_outputs(root).values() for p in paths})
    before = snapshot(root, outputs)
    raw = root / "data" / "events.parquet"
    data = raw.read_bytes()
    raw.unlink()
    raw.write_bytes(data[: len(data) // 3])
    started = time.perf_counter()
    result = run([sys.executable, "-m", "dvc", "repro"], root, check=False, env=env)
    seconds = time.perf_counter() - started
    named = "raw event file data/events.parquet" in result.stderr
    intact = snapshot(root, outputs) == before
    run(["git", "checkout", "data.dvc"], root, env=env)
    run([sys.executable, "-m", "dvc", "checkout", "--force", "data.dvc"], root, env=env)
    return {
        "scenario": "raw data: events.parquet truncated to 1/3",
        "failed_in_s": round(seconds, 1),
        "message_names_file": named,
        "outputs_intact": intact,
        "recovered": dvc_status(root, env) == {},
        "survived": bool(result.returncode != 0 and named and intact),
    }


def write_results(results: dict[str, object]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline_faults.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["scenarios"]
    assert isinstance(rows, list)
    m = results["machine"]
    assert isinstance(m, dict)
    lines = [
        "# Pipeline fault injection",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, Python {m['python']}; "
        f"date {m['date']}. Command: `python benchmarks/pipeline_faults.py`.",
        "",
        f"Faults injected: {results['injected']}; survived: {results['survived']}; "
        f"skipped (time budget): {results['skipped']}.",
        "",
        "| scenario | killed / failed after | outputs intact | recovered (s) | survived |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        after = r.get("killed_after_s", r.get("refused_in_s", r.get("failed_in_s")))
        lines.append(
            f"| {r['scenario']} | {after} s | {r.get('outputs_intact', '-')} | "
            f"{r.get('recover_s', '-')} | {r['survived']} |"
        )
    (RESULTS / "pipeline_faults.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 1.5])
    parser.add_argument("--budget", type=float, default=1500.0, help="seconds for all scenarios")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.budget
    with tempfile.TemporaryDirectory(prefix="mlops-faults-") as tmp:
        root = init_project(Path(tmp) / "project")
        run([sys.executable, "-m", "dvc", "repro"], root, env=project_env(root))
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", "pipeline outputs"], root)
        scenarios: list[dict[str, object]] = [bad_params_scenario(root)]
        skipped = 0
        flip = 0
        for stage in TRIGGERS:
            for delay in args.delays:
                if time.perf_counter() > deadline:
                    skipped += 1
                    continue
                result = kill_scenario(root, stage, delay, flip)
                flip += 1
                print(json.dumps(result), flush=True)
                scenarios.append(result)
        scenarios.append(corrupt_raw_scenario(root))
    results = {
        "machine": machine(),
        "injected": len(scenarios),
        "survived": sum(bool(s["survived"]) for s in scenarios),
        "skipped": skipped,
        "scenarios": scenarios,
    }
    write_results(results)
    print((RESULTS / "pipeline_faults.md").read_text())


if __name__ == "__main__":
    main()
