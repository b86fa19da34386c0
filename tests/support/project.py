"""A project copy to run commands in: its source, environment, params and DVC setup.

Shared by the tests and benchmarks (``tests/conftest.py`` holds only fixtures).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SKIP_PARTS = {
    ".venv",
    ".bentoml",
    ".dvc-remote",
    ".git",
    "build",
    "reports",
    "data",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    ".mypy_cache",
}


def project_env(root: Path) -> dict[str, str]:
    """Environment for commands run inside a project copy (its own BentoML store)."""
    env = {**os.environ}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["BENTOML_HOME"] = str(root / ".bentoml")
    env["BENTOML_DO_NOT_TRACK"] = "True"
    env["WHYLOGS_NO_ANALYTICS"] = "True"
    env["OMP_NUM_THREADS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "Test User"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@localhost"
    env.pop("MLOPS_PROJECT_ROOT", None)
    return env


def run(
    cmd: list[str],
    cwd: Path,
    check: bool = True,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in a project copy; on failure show its output in the assertion."""
    result = subprocess.run(
        cmd, cwd=cwd, env=env or project_env(cwd), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def source_files() -> list[Path]:
    """Files of the repository as git sees them (tracked plus new, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [Path(p) for p in out if (REPO / p).is_file() and not SKIP_PARTS & set(Path(p).parts)]


def copy_source(dest: Path) -> Path:
    """Copy the repository's source (no data, outputs or caches) into ``dest``."""
    for rel in source_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    return dest


def set_param(root: Path, dotted: str, value: object) -> None:
    """Change one value in a copy's params.yaml, keeping its comments and layout."""
    section, key = dotted.split(".")
    path = root / "params.yaml"
    text = path.read_text()
    pattern = re.compile(
        rf"(^{section}:\n(?:[ \t].*\n|\n)*?[ \t]+{key}:)[ \t]*[^#\n]*?([ \t]*(?:#[^\n]*)?)$", re.M
    )
    new, count = pattern.subn(lambda m: f"{m.group(1)} {value}{m.group(2)}", text, count=1)
    assert count == 1, f"{dotted} not found in {path}"
    path.write_text(new)


def init_project(dest: Path, preset: str = "small") -> Path:
    """A source copy made a git + DVC project with ``preset`` data committed."""
    copy_source(dest)
    set_param(dest, "generate.preset", preset)
    set_param(dest, "train.max_iter", 60)
    run(["git", "init", "-q", "-b", "main"], dest)
    run([sys.executable, "-m", "pipelines.cli", "data", "generate"], dest)
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "test project"], dest)
    return dest
