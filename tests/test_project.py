"""Project wiring: pins, data obtain (pull or regenerate + verify), CLI help, config errors."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from pipelines.core.config import ConfigError, get, load_params
from tests.support.project import REPO, run, set_param


def _pins(text: str) -> dict[str, str]:
    return {m[1].lower(): m[2] for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", text, re.M)}


def test_bento_requirements_match_the_lock_file() -> None:
    lock = _pins((REPO / "requirements.lock").read_text())
    bento = _pins((REPO / "bentos/requirements.txt").read_text())
    assert bento and all(lock.get(name) == version for name, version in bento.items()), {
        n: (v, lock.get(n)) for n, v in bento.items() if lock.get(n) != v
    }


def test_every_direct_dependency_is_pinned_in_the_lock() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    lock = _pins((REPO / "requirements.lock").read_text())
    for spec in wanted:
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower().replace("_", "-")
        assert name in lock, f"{name} is not pinned in requirements.lock; run `make lock`"


def test_missing_param_names_the_key(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="params.yaml has no 'train.momentum'"):
        get(params, "train.momentum")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_params(bad)


def test_cli_help_lists_commands() -> None:
    result = run([sys.executable, "-m", "pipelines.cli", "--help"], REPO)
    for command in ("data", "summary", "notebooks", "features"):
        assert command in result.stdout


@pytest.mark.slow
def test_data_obtain_pulls_or_regenerates_and_verifies(project_copy: Path) -> None:
    root = project_copy
    dvc = [sys.executable, "-m", "dvc"]
    cli = [sys.executable, "-m", "pipelines.cli", "data", "obtain"]
    assert "already matches" in run(cli, root).stdout
    # Remote empty, data gone, cache gone: regenerate deterministically, verify, push.
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    result = run(cli, root)
    assert "regenerated data/ matches data.dvc" in result.stdout
    assert run([*dvc, "status", "data.dvc", "--json"], root).stdout.strip() == "{}"
    # Now the remote has it: a fresh loss is fixed by a pull.
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    assert "pulled data/ from the DVC remote" in run(cli, root).stdout
    # Params that no longer reproduce data.dvc are refused with an explanation.
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(root / ".dvc-remote")
    set_param(root, "base.seed", 7)
    failed = run(cli, root, check=False)
    assert failed.returncode == 1
    assert "does not match data.dvc" in failed.stderr and "dvc add data" in failed.stderr
