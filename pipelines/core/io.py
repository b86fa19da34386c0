"""Atomic file and folder writes, so a failed stage never leaves half an output."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def clean_stale_temps(target: Path) -> list[Path]:
    """Remove temporaries a killed writer of ``target`` left beside it; restore a lost target.

    ``atomic_path``/``atomic_dir`` write to ``.<name>.*`` beside the target and
    rename at the end. A SIGKILL before the rename leaves that temporary behind
    (never the target half-written). Each writer calls this first, so leftovers
    never accumulate, and, if a kill hit ``atomic_dir`` between moving the old
    folder aside and moving the new one in, the old folder is put back.
    DVC's per-repo lock means one writer per target at a time.
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    for stale in target.parent.glob(f".{glob_escape(target.name)}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def glob_escape(name: str) -> str:
    """Escape glob metacharacters in a file name."""
    import glob

    return glob.escape(name)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should be readable like any file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` as a whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs should be readable like any folder
    try:
        yield tmp
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_text(data: Any) -> str:
    """Pretty, key-sorted JSON (stable diffs for metrics files), as ``write_json`` writes it."""
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write ``json_text(data)`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes, the same digest DVC records for a file output."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
