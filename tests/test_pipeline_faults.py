"""Pipeline faults: bad params refused up front, a killed stage, corrupt raw data.

Each test runs the real ``dvc repro`` in a private copy of the small project.
The longer sweep (every stage, several kill points) is
``benchmarks/pipeline_faults.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.core.settings import problems
from tests.support.faults import (
    dvc_status,
    kill_repro_during,
    snapshot,
    stage_outputs,
    stray_temporaries,
)
from tests.support.project import REPO, project_env, run, set_param

pytestmark = pytest.mark.slow


def _all_outputs(root: Path) -> list[str]:
    return sorted({p for paths in stage_outputs(root).values() for p in paths})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("build_dataset.warmup_hours", -1, "build_dataset.warmup_hours: must be >= 0, got -1"),
        ("train.max_iter", "many", "train.max_iter: must be a whole number, got 'many' (str)"),
    ],
)
def test_bad_params_value_is_refused_before_the_stage_runs(
    project_copy: Path, key: str, value: object, message: str
) -> None:
    """A bad value stops `dvc repro` at the first stage, before papermill, outputs untouched."""
    root = project_copy
    before = snapshot(root, _all_outputs(root))
    set_param(root, key, value)
    result = run([sys.executable, "-m", "dvc", "repro"], root, check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "nothing was run" in result.stderr
    assert not (root / "reports" / "failed").exists()  # no notebook was executed
    assert not list((root / "reports").glob(".*.ipynb.*"))
    assert snapshot(root, _all_outputs(root)) == before
    # `mlops params check` (what `make run` calls first) says the same.
    check = run([sys.executable, "-m", "pipelines.cli", "params", "check"], root, check=False)
    assert check.returncode == 1 and message in check.stderr


def test_missing_key_surface_and_type_problems_are_all_named() -> None:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert problems(params) == []
    del params["train"]["max_leaf_nodes"]
    params["base"]["seed"] = True
    params["release"]["approval_required_for"] = ["production"]
    params["monitor"] = {"surfaces": ["feed", "homepage"], "drift": {"bins": 0}}
    found = dict(problems(params, REPO))  # with the project's dvc.yaml: keys it reads are required
    assert found["train.max_leaf_nodes"].startswith("is missing")
    assert "whole number" in found["base.seed"]
    assert "unknown stage 'production'" in found["release.approval_required_for"]
    assert "is not a known key" in found["monitor.surfaces"]
    assert "must be >= 2" in found["monitor.drift.bins"]


def test_repro_killed_during_train_keeps_old_outputs_and_recovers(project_copy: Path) -> None:
    """SIGKILL on `dvc repro` mid-train: old outputs intact, no temp tracked, rerun is clean."""
    root = project_copy
    env = project_env(root)
    outputs = _all_outputs(root)
    before = snapshot(root, outputs)
    lock_before = (root / "dvc.lock").read_text()
    set_param(root, "train.learning_rate", 0.2)

    kill = kill_repro_during(root, "train", delay_s=1.0, env=env, targets=("train",))
    assert kill.exit_code is not None and kill.exit_code < 0, kill  # died by the signal

    assert snapshot(root, outputs) == before  # nothing half-written replaced an output
    assert (root / "dvc.lock").read_text() == lock_before
    for out_dir in ("build/model", "build/dataset", "build/bento", "monitors/reference"):
        assert not [p for p in (root / out_dir).rglob(".*") if p.name != ".gitignore"], out_dir

    # Rerun the killed stage (the benchmark reruns the whole pipeline): it completes, its
    # outputs and dvc.lock agree, and downstream stages see only the new model as changed.
    rerun = run([sys.executable, "-m", "dvc", "repro", "train"], root, timeout=600, env=env)
    assert "Running stage 'train'" in rerun.stdout
    status = dvc_status(root, env)
    assert "train" not in status and "build_dataset" not in status
    for stage, changes in status.items():
        assert changes == [{"changed deps": {"build/model": "modified"}}], (stage, changes)
    assert stray_temporaries(root, stage_outputs(root)["train"]) == []  # leftovers cleaned
    after = snapshot(root, outputs)
    assert after["build/model/model_card.json"] != before["build/model/model_card.json"]


def test_corrupt_raw_data_names_the_file_and_keeps_outputs(project_copy: Path) -> None:
    root = project_copy
    outputs = _all_outputs(root)
    before = snapshot(root, outputs)
    raw = root / "data" / "events.parquet"
    data = raw.read_bytes()
    raw.unlink()  # DVC may hard/symlink the cache: never write through into it
    raw.write_bytes(data[: len(data) // 3])  # truncated, as an interrupted copy leaves it
    result = run(
        [sys.executable, "-m", "dvc", "repro", "build_dataset"], root, check=False, timeout=300
    )
    assert result.returncode != 0
    assert "raw event file data/events.parquet" in result.stderr
    assert (
        "corrupt or truncated" in result.stderr
        and "git checkout data.dvc && dvc checkout --force data.dvc" in result.stderr
    )
    assert snapshot(root, outputs) == before
    # `dvc repro` verified the data source first and recorded the corrupt data/ in data.dvc
    # (DVC's behaviour for a changed data source): the advised recovery undoes both.
    run(["git", "checkout", "data.dvc"], root)
    run([sys.executable, "-m", "dvc", "checkout", "--force", "data.dvc"], root)
    assert dvc_status(root, project_env(root)) == {}
