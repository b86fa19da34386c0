"""Shared fixtures.

``small_project`` is the expensive one: a copy of this repository in a temporary
folder, made a fresh git repo, with small-preset data added to DVC and the whole
pipeline run once by ``dvc repro``. Tests that need a trained model, a built
bento or a DVC history use it (read-only) or ``project_copy`` (their own copy).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.loadtest import free_port
from tests.support.project import init_project, run


@pytest.fixture(scope="session")
def small_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy on the small preset after one full ``dvc repro`` (treat as read-only)."""
    root = init_project(tmp_path_factory.mktemp("small") / "project")
    run([sys.executable, "-m", "dvc", "repro"], root, timeout=1800)  # 2 cores, shared
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline outputs"], root)
    return root


@pytest.fixture
def project_copy(small_project: Path, tmp_path: Path) -> Path:
    """A private copy of ``small_project`` (git history, DVC cache and outputs included)."""
    dest = tmp_path / "project"
    shutil.copytree(small_project, dest, symlinks=True, ignore=shutil.ignore_patterns(".bentoml"))
    shutil.copytree(small_project / ".bentoml", dest / ".bentoml", symlinks=True)
    return dest


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (installed by .ci/run), for one module."""
    from tests.support.store import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
