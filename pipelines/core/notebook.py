"""Where a notebook runs: the project root, whatever folder Jupyter started its kernel in.

JupyterLab and ``jupyter execute`` start a notebook's kernel in the notebook's own
folder (``notebooks/``, ``monitors/``), the pipeline runner in the project root. A
notebook calls :func:`enter_project` first, so its relative paths (the parameters)
mean the same in all three. Details: README "Notebooks and JupyterLab".
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.core.config import ConfigError, project_root


class NotebookInputError(FileNotFoundError):
    """A path a notebook reads does not exist; the message says which command makes it."""


def _package_root() -> Path | None:
    """The clone this package is installed from (editable install), if it is a project."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "params.yaml").is_file() else None


def find_root() -> Path:
    """``MLOPS_PROJECT_ROOT``, else the nearest folder upwards holding ``params.yaml``, else
    the clone the ``pipelines`` package is installed from (a kernel started outside it)."""
    try:
        return project_root()
    except ConfigError:
        root = _package_root()
        if root is None:
            raise
        return root


def enter_project(*inputs: str | Path, scratch_dir: str = "build/scratch") -> Path:
    """Make the project root the working directory and check that ``inputs`` exist there.

    Returns the root. A missing input is an error naming what produces it: the
    upstream notebook run with its defaults for paths under ``scratch_dir``, the
    pipeline (``dvc repro`` / ``dvc pull``) for the others.
    """
    root = find_root()
    os.chdir(root)
    missing = [Path(p) for p in inputs if not (root / p).exists()]
    if missing:
        names = ", ".join(p.as_posix() for p in missing)
        scratch = [p for p in missing if p.as_posix().startswith(scratch_dir.rstrip("/") + "/")]
        if scratch:
            fix = (
                f"the defaults read the small-preset sample and write under {scratch_dir}/: "
                "run `.venv/bin/mlops notebooks sample` once (`make lab` does), then the "
                "stage notebooks in order with their defaults (build_dataset, train, "
                "evaluate, profile, package)"
            )
        else:
            fix = "these are pipeline outputs: run `dvc repro` (or `dvc pull`)"
        raise NotebookInputError(f"not found in {root}: {names}; {fix}")
    return root
