"""Pipeline fault injection: kill ``dvc repro`` mid-stage and check what it left behind.

Used by ``tests/test_pipeline_faults.py`` (one short scenario) and
``benchmarks/pipeline_faults.py`` (every stage, several kill points). The
promise under test: a stage killed with SIGKILL at any moment leaves the
previous outputs byte-identical, leaves no temporary inside a DVC-tracked
output, and the next ``dvc repro`` finishes with ``dvc status`` clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.dvcfiles import dvc_lock_outs
from pipelines.core.io import md5_file


def stage_outputs(root: Path) -> dict[str, list[str]]:
    """Output paths of every stage, as DVC resolved them into ``dvc.lock``."""
    return {name: list(outs) for name, outs in dvc_lock_outs(root).items()}


def snapshot(root: Path, paths: list[str]) -> dict[str, str]:
    """md5 of every file under ``paths`` (files or folders), keyed by relative path."""
    digests: dict[str, str] = {}
    for rel in paths:
        target = root / rel
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for path in files:
            if path.is_file():
                digests[str(path.relative_to(root))] = md5_file(path)
            else:
                digests[str(path.relative_to(root))] = "<missing>"
    return digests


def stray_temporaries(root: Path, paths: list[str]) -> list[str]:
    """Temporaries (``.<name>.*``) inside output folders or beside outputs, relative paths."""
    found: set[str] = set()
    for rel in paths:
        target = root / rel
        if target.is_dir():
            found.update(
                str(p.relative_to(root)) for p in target.rglob(".*") if p.name != ".gitignore"
            )
        if target.parent.is_dir():
            found.update(str(p.relative_to(root)) for p in target.parent.glob(f".{target.name}.*"))
    return sorted(found)


def dvc_status(root: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``dvc status --json`` as a dict (empty when every stage is up to date)."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out or "{}"))


@dataclass
class KillResult:
    """What one kill did: when it hit, which processes died, and the repro's output."""

    stage: str
    marker_seen_after_s: float
    killed_after_s: float
    killed_pids: list[int] = field(default_factory=list)
    exit_code: int | None = None
    stderr_tail: str = ""


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_repro_during(
    root: Path,
    stage: str,
    delay_s: float,
    env: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    targets: tuple[str, ...] = (),
) -> KillResult:
    """Run ``dvc repro <targets>``; SIGKILL it ``delay_s`` after ``stage``'s notebook started.

    The stage has started when its runner creates the temporary executed
    notebook (``reports/.<stage>.ipynb.*``). The whole process group of
    ``dvc repro`` gets SIGKILL, and so do the processes that left it (the
    Jupyter kernel runs in its own session), found by pid just before the kill.
    """
    import psutil

    reports = root / "reports"
    marker = f".{stage}.ipynb.*"
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *targets],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: float | None = None
    try:
        while seen is None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"dvc repro ended (exit {proc.returncode}) before stage {stage} started:\n"
                    + (proc.stderr.read() if proc.stderr else "")[-3000:]
                )
            if any(reports.glob(marker)):
                seen = time.perf_counter() - started
                break
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"stage {stage} did not start within {timeout_s:.0f}s")
            time.sleep(0.05)
        time.sleep(delay_s)
        victims = [proc.pid, *_descendants(proc.pid)]
        killed_at = time.perf_counter() - started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # repro already ended: the result says so (exit >= 0)
            pass
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(
            [p for p in (_process(pid) for pid in victims) if p is not None], timeout=10
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    stderr = proc.stderr.read() if proc.stderr else ""
    return KillResult(stage, seen, killed_at, victims, proc.returncode, stderr[-2000:])


def _process(pid: int) -> Any:
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
