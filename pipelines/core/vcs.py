"""Git, as every subsystem calls it: one runner, one error, file contents at a revision."""

from __future__ import annotations

import subprocess
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed; the message names the command, the folder and git's reason."""


def git_run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``git args`` in ``root``; the caller reads ``returncode``, ``stdout``, ``stderr``."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def git(root: Path, *args: str, check: bool = True, error: type[Exception] = GitError) -> str:
    """Stdout of ``git args`` in ``root`` (trailing whitespace removed, leading kept).

    A failure raises ``error`` (the caller's own error type) when ``check``; otherwise the
    output, usually empty, is returned. Leading spaces are kept: ``status --porcelain``
    lines start with one.
    """
    result = git_run(root, *args)
    if check and result.returncode != 0:
        raise error(f"`git {' '.join(args)}` failed in {root}: {result.stderr.strip()}")
    return result.stdout.rstrip()


def git_show(root: Path, rev: str, path: str) -> bytes | None:
    """Bytes of ``path`` at git revision ``rev``, or None when it is not there."""
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    return result.stdout if result.returncode == 0 else None
