"""Stage notebooks: thin, parameterized, stripped; runnable by hand with their defaults
(small-preset sample, scratch folder) from any folder, and checked with nbval."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from pipelines.core import notebook as nb_paths
from pipelines.core.settings import load_settings
from pipelines.stages.runner import KERNEL_WARNING_FILTERS, notebook_parameters
from tests.support.project import REPO, project_env, run

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
STAGE_ORDER = ["build_dataset", "train", "evaluate", "profile", "package"]
SETTINGS = load_settings(REPO)
SCRATCH = SETTINGS.notebooks.scratch_dir
# Path parameters that stay pointed at the project's file in a run by hand: read, never written.
SHARED_INPUTS = {"params_file": "the serving policy is read from params.yaml, as in the pipeline"}
SANITIZE = REPO / "tests" / "support" / "nbval_sanitize.cfg"


def test_every_stage_has_a_notebook() -> None:
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(STAGE_ORDER)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin_stripped_and_parameterized(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "mlops-notebooks"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), (
        "first code cell must be tagged parameters"
    )
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    for node in ast.parse(code[0].source).body:  # literals only
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), ast.dump(node)
    assert "enter_project(" in code[1].source, "the first step resolves paths from the root"
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, "commit notebooks without outputs"
        tree = ast.parse(cell.source)
        assert not any(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in ast.walk(tree)), (
            "logic belongs in pipelines/, not in a stage notebook"
        )


def _defaults(path: Path) -> dict[str, Any]:
    cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    return {
        node.targets[0].id: node.value.value  # type: ignore[attr-defined]
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
    }


def _stage_parameters() -> dict[str, dict[str, Any]]:
    """``{stage: {parameter: value}}`` as each stage's cmd in dvc.yaml passes them,
    ``${key}`` resolved from params.yaml."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())

    def resolve(value: str) -> Any:
        value = value.strip("'")  # shell quoting, as for `local[*]`
        match = re.fullmatch(r"\$\{([\w.]+)\}", value)
        if not match:
            return yaml.safe_load(value)
        node: Any = params
        for part in match.group(1).split("."):
            node = node[part]
        return node

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {
        name: {k: resolve(v) for k, v in re.findall(r"-p (\w+) (\S+)", stage["cmd"])}
        for name, stage in stages.items()
    }


def _pipeline_paths() -> set[str]:
    """Every path the pipeline reads or writes (stage deps and outs, resolved)."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    return {
        str(entry["path"])
        for stage in lock.values()
        for entry in (stage.get("deps") or []) + (stage.get("outs") or [])
    }


def test_defaults_mirror_params_yaml_and_write_only_to_the_scratch_folder() -> None:
    """The relation README "Notebooks and JupyterLab" states: the pipeline passes every
    parameter; a path default points under notebooks.scratch_dir, away from every
    pipeline path; every other default equals what the pipeline passes from params.yaml."""
    passed = _stage_parameters()
    pipeline_paths = _pipeline_paths()
    for stage in STAGE_ORDER:
        defaults = _defaults(REPO / "notebooks" / f"{stage}.ipynb")
        assert list(defaults) == notebook_parameters(REPO / "notebooks" / f"{stage}.ipynb")
        assert set(defaults) == set(passed[stage]), f"{stage}: dvc.yaml must pass every parameter"
        for name, default in defaults.items():
            value = passed[stage][name]
            if name.endswith(("_dir", "_file", "_home")) and name not in SHARED_INPUTS:
                assert default.startswith(SCRATCH + "/"), (stage, name, default)
                assert not any(
                    default == p or default.startswith(p + "/") or p.startswith(default + "/")
                    for p in pipeline_paths
                ), (stage, name, default)
            else:
                assert default == value, (
                    f"{stage}: default {name} = {default!r}, params.yaml gives {value!r}; "
                    "change the notebook's parameters cell to match"
                )


def test_runner_refuses_a_stage_command_that_leaves_a_parameter_to_its_default(
    tmp_path: Path,
) -> None:
    out = tmp_path / "train.ipynb"
    cmd = [sys.executable, "-m", "pipelines.stages.runner", "notebooks/train.ipynb", str(out)]
    result = run([*cmd, "-p", "max_iter", "5", "-p", "colour", "red"], REPO, check=False)
    assert result.returncode == 2, result.stderr
    assert "not passed: dataset_dir, out_dir" in result.stderr
    assert "not in its parameters cell: colour" in result.stderr
    assert not out.exists()


def test_enter_project_resolves_paths_from_the_root_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLOPS_PROJECT_ROOT", raising=False)
    for start in (REPO / "notebooks", REPO / "monitors", tmp_path):  # tmp_path: outside
        monkeypatch.chdir(start)
        assert nb_paths.enter_project("params.yaml") == REPO
        assert Path.cwd() == REPO
    monkeypatch.chdir(tmp_path)
    with pytest.raises(nb_paths.NotebookInputError) as err:
        nb_paths.enter_project(f"{SCRATCH}/no-such-dataset")
    assert "mlops notebooks sample" in str(err.value)
    with pytest.raises(nb_paths.NotebookInputError, match="dvc repro"):
        nb_paths.enter_project("build/no-such-output")


def test_notebook_check_command_flags_outputs(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi")]
    dirty = tmp_path / "dirty.ipynb"
    nbformat.write(nb, dirty)
    result = run(
        [sys.executable, "-m", "pipelines.cli", "notebooks", "check", str(dirty)], REPO, check=False
    )
    assert result.returncode == 1 and "carry outputs" in result.stderr
    clean = run([sys.executable, "-m", "pipelines.cli", "notebooks", "check"], REPO)
    assert "have no outputs" in clean.stdout


def _nbval(root: Path, *args: str) -> str:
    """pytest with nbval in ``root`` (a project copy); its output (asserting it passed)."""
    env = project_env(root)
    # the warning filters the stage runner gives its kernels, so outputs compare like for like
    env["PYTHONWARNINGS"] = ",".join(
        f for f in (env.get("PYTHONWARNINGS"), *KERNEL_WARNING_FILTERS) if f
    )
    result = run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--no-header", *args],
        root,
        check=False,
        timeout=1500,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    return result.stdout


def _dvc_status(root: Path) -> Any:
    return json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout)


@pytest.mark.slow
def test_source_notebooks_run_by_hand_with_their_defaults_under_nbval_lax(
    project_copy: Path,
) -> None:
    """Each stage notebook runs top to bottom with its defaults, in stage order, its kernel
    started in notebooks/ as JupyterLab does; the pipeline's outputs stay as they were."""
    root = project_copy
    assert _dvc_status(root) == {}
    run([sys.executable, "-m", "pipelines.cli", "notebooks", "sample"], root)
    out = _nbval(root, "--nbval-lax", *(f"notebooks/{s}.ipynb" for s in STAGE_ORDER))
    assert re.search(r"\b\d+ passed\b", out) and "failed" not in out, out[-3000:]
    for made in (
        "dataset/meta.json",
        "model/model.joblib",
        "eval/metrics.json",
        "bento/bento.json",
    ):
        assert (root / SCRATCH / made).is_file(), made
    assert (root / SCRATCH / "reference").is_dir()
    assert _dvc_status(root) == {}  # nothing the pipeline tracks was touched
    status = run(["git", "status", "--porcelain"], root).stdout
    assert status == "", status  # the scratch folder is ignored; no source notebook written


@pytest.mark.slow
def test_executed_reports_reproduce_under_nbval(project_copy: Path) -> None:
    """The executed notebooks of the small-preset pipeline (reports/) are re-executed by
    nbval and every output compared, after the sanitizers in tests/support/nbval_sanitize.cfg
    (each with its reason); images are not compared (nbval's default)."""
    root = project_copy
    reports = [f"reports/{s}.ipynb" for s in STAGE_ORDER]
    assert all((root / r).is_file() for r in reports)
    out = _nbval(root, "--nbval", "--nbval-sanitize-with", str(SANITIZE), *reports)
    assert re.search(r"\b\d+ passed\b", out) and "failed" not in out, out[-3000:]
    # The re-execution wrote the stages' outputs again: byte for byte what dvc.lock records.
    assert _dvc_status(root) == {}
