"""Stage notebooks: thin, parameterized, stripped, and runnable with their defaults."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat
import pytest

from tests.support.project import REPO, run

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
STAGE_ORDER = ["build_dataset", "train", "evaluate", "profile", "package"]


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
    for node in ast.parse(code[0].source).body:  # literals only
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant), ast.dump(node)
    for cell in code:
        assert not cell.outputs and cell.execution_count is None, "commit notebooks without outputs"
        tree = ast.parse(cell.source)
        assert not any(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in ast.walk(tree)), (
            "logic belongs in pipelines/, not in a stage notebook"
        )


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


@pytest.mark.slow
def test_notebooks_run_with_their_default_parameters(project_copy: Path) -> None:
    """Defaults in each parameters cell run the stage on the small preset."""
    for stage in STAGE_ORDER:
        out = project_copy / "reports" / "defaults" / f"{stage}.ipynb"
        run(
            [sys.executable, "-m", "pipelines.stages.runner", f"notebooks/{stage}.ipynb", str(out)],
            project_copy,
        )
        assert out.with_suffix(".html").is_file()
    assert (project_copy / "build/bento/ctr_service.bento").is_file()
