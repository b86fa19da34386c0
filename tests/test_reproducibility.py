"""Reproducibility: complete deps, the locked environment, identical outputs in any folder.

The fast tests check the import closures against ``dvc.yaml`` and the bentofile and
the interpreter check of the stage runner. The slow ones run the small-preset
pipeline in a clean clone under a dot-directory with spaces and compare every
``dvc.lock`` hash with the original's, then go back to an earlier params value.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.stages import closure
from pipelines.stages.runner import scrub_notebook
from tests.support.project import REPO, project_env, run, set_param


def test_stage_deps_cover_the_import_closure_of_each_stage() -> None:
    deps = closure.resolved_stage_deps(REPO)
    closures = closure.stage_closures(REPO)
    assert set(closures) == {"build_dataset", "train", "evaluate", "profile", "package"}
    for name, found in closures.items():
        assert "pipelines/stages/runner.py" in found.files
        assert closure.uncovered(found.files, deps[name]) == [], name


def test_closure_check_fails_when_a_stage_misses_a_module() -> None:
    found = closure.import_closure(REPO, ["notebooks/train.ipynb", closure.RUNNER])
    assert "pipelines/modeling/model.py" in found.files
    assert closure.uncovered(found.files, ["pipelines/core", "pipelines/stages"]) != []
    assert "pipelines/modeling/model.py" in closure.uncovered(
        found.files, ["pipelines/core", "pipelines/stages", "pipelines/features"]
    )


def test_bento_include_covers_the_service_closure_and_nothing_above_serving() -> None:
    spec = yaml.safe_load((REPO / "bentos/bentofile.yaml").read_text())
    found = closure.import_closure(REPO, [closure.SERVICE])
    patterns = spec["include"]

    def included(rel: str) -> bool:
        # bentofile globs: `**/` matches any depth, including none
        return any(
            fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.replace("**/", "")) for p in patterns
        )

    assert [f for f in sorted(found.files) if not included(f)] == []
    for layer in ("cli", "registry", "monitoring", "review", "stages"):
        assert not any(f.startswith(f"pipelines/{layer}/") for f in found.files), layer


def test_bento_requirements_are_generated_from_the_closure_and_the_lock() -> None:
    text = (REPO / closure.BENTO_REQUIREMENTS).read_text()
    assert text == closure.bento_requirements(REPO), (
        "bentos/requirements.txt is stale: run `python -m pipelines.stages.closure requirements`"
    )
    pins = dict(line.split("==") for line in text.splitlines() if "==" in line)
    versions, _ = closure.lock_graph((REPO / "requirements.lock").read_text())
    direct = closure.distributions_of(closure.import_closure(REPO, [closure.SERVICE]).third_party)
    for dist in direct | {"bentoml"}:
        assert pins.get(dist) == versions[dist], dist
    assert {"orjson", "whylogs", "scikit-learn", "pandas"} <= set(pins)
    assert not {"dvc", "papermill", "pytest", "gto"} & set(pins)  # pipeline/dev tools stay out


def _foreign_python(tmp_path: Path) -> str:
    """An interpreter outside the locked environment: a bare virtual environment."""
    uv = Path(sys.executable).parent / "uv"
    run([str(uv), "venv", "-q", "--python", sys.executable, str(tmp_path / "foreign")], tmp_path)
    return str(tmp_path / "foreign/bin/python")


def _mini_project(dest: Path) -> Path:
    shutil.copytree(
        REPO / "pipelines", dest / "pipelines", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copyfile(REPO / "requirements.lock", dest / "requirements.lock")
    return dest


def _run_stage_with(python: str, root: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Start the stage runner in ``root`` with ``python``, outside any activated environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return subprocess.run(
        [python, "-m", "pipelines.stages.runner", "notebooks/x.ipynb", "reports/x.ipynb"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_runner_refuses_a_foreign_interpreter_and_names_the_fix(tmp_path: Path) -> None:
    root = _mini_project(tmp_path / "project")
    foreign = _foreign_python(tmp_path)
    result = _run_stage_with(foreign, root, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "locked environment (requirements.lock)" in result.stderr
    assert "not installed" in result.stderr and "make setup" in result.stderr
    assert "Traceback" not in result.stderr


def test_runner_hands_over_to_the_project_venv(tmp_path: Path) -> None:
    """With .venv present, a foreign `python3` re-runs the stage with .venv/bin/python."""
    root = _mini_project(tmp_path / "project")
    foreign = _foreign_python(tmp_path)
    (root / ".venv").symlink_to(Path(sys.prefix))  # this test run's locked environment
    result = _run_stage_with(foreign, root, timeout=120)
    # past the environment check: the runner's own argument check answers
    assert "notebook notebooks/x.ipynb does not exist" in result.stderr, result.stderr
    assert "locked environment" not in result.stderr


def test_scrub_removes_times_and_temporary_paths(tmp_path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.metadata["papermill"] = {
        "start_time": "2026-01-01T00:00:00",
        "end_time": "2026-01-01T00:00:01",
        "duration": 1.25,
        "status": "completed",
    }
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00"}
    nb.cells.append(cell)
    injected = nbformat.v4.new_code_cell("max_iter = 60")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.append(injected)
    nb.metadata["papermill"] = {
        "start_time": "x",
        "end_time": "y",
        "duration": 3.0,
        "output_path": "reports/.train.ipynb.abc123.ipynb",
        "parameters": {"max_iter": 60},
        "environment_variables": {"HOME": "/root"},
    }
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    cells = scrub_notebook(path, Path("reports/train.ipynb"))
    assert cells == [{"cell": 0, "seconds": 1.25}]
    text = path.read_text()
    assert "2026-01-01" not in text and "abc123" not in text and "/root" not in text
    meta = json.loads(text)["metadata"]["papermill"]
    assert meta == {"output_path": "reports/train.ipynb", "parameters": {"max_iter": 60}}
    assert json.loads(text)["cells"][1]["id"] == "injected-parameters"  # not a random id


# --- the pipeline, twice ----------------------------------------------------------------------


def _lock_outs(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
    }


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two pipeline runs (the fixture's and the clone's) on 2 cores
def test_clean_clone_in_a_dot_directory_with_spaces_reproduces_the_lock(
    small_project: Path, tmp_path: Path
) -> None:
    """A clean clone elsewhere reruns the pipeline and gets every dvc.lock hash unchanged.

    The clone sits under a dot-directory and a folder with spaces (BentoML's build
    refuses hidden paths; the package stage builds from a staging copy). Then a
    params change and its revert: going back restores from DVC's run-cache.
    """
    clone = tmp_path / ".cache" / "a clone" / "project"
    clone.parent.mkdir(parents=True)
    run(["git", "clone", "-q", str(small_project), str(clone)], tmp_path)
    env = project_env(clone)
    run([sys.executable, "-m", "pipelines.cli", "data", "obtain"], clone, env=env)
    assert not (clone / "build/model").exists()  # nothing but the data came along
    run([sys.executable, "-m", "dvc", "repro"], clone, timeout=1800, env=env)

    assert _lock_outs(clone) == _lock_outs(small_project)
    status = run(["git", "status", "--porcelain"], clone, env=env).stdout
    assert status == "", status  # dvc.lock, metrics and plots exactly as committed
    timings = json.loads((clone / "reports/timings/train.json").read_text())
    assert timings["fit_seconds"] >= 0 and timings["stage_seconds"] > 0
    card = json.loads((clone / "build/model/model_card.json").read_text())
    assert "fit_seconds" not in card
    nb = (clone / "reports/train.ipynb").read_text()
    assert "start_time" not in nb and str(clone) not in nb
    for report in sorted((clone / "reports").glob("*.ipynb")):
        # nothing of the machine: e.g. a library warning naming the environment's path
        assert sys.prefix not in report.read_text(), f"{report.name} names {sys.prefix}"

    # Going back is free: a params value set back restores from the run-cache.
    set_param(clone, "evaluate.calibration_bins", 7)
    changed = run([sys.executable, "-m", "dvc", "repro"], clone, timeout=900, env=env)
    assert "Running stage 'evaluate'" in changed.stdout
    run(["git", "checkout", "params.yaml"], clone, env=env)
    back = run([sys.executable, "-m", "dvc", "repro"], clone, timeout=900, env=env)
    assert "Stage 'evaluate' is cached - skipping run" in back.stdout, back.stdout
    assert "Running stage" not in back.stdout
    assert run(["git", "status", "--porcelain"], clone, env=env).stdout == ""
