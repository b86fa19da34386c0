"""Lineage from git and DVC: the commit, the data/dataset/model hashes and the params."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipelines.io import md5_file


def git_info(root: Path) -> dict[str, Any]:
    """Current commit, branch and whether the work tree has uncommitted changes."""

    def run(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = run("rev-parse", "HEAD")
    return {
        "commit": commit or None,
        "branch": run("rev-parse", "--abbrev-ref", "HEAD") or None,
        "dirty": bool(run("status", "--porcelain", "--untracked-files=no")) if commit else None,
    }


def dvc_file_hash(dvc_file: Path) -> str | None:
    """The md5 that a ``.dvc`` file records for its (first) output."""
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def dvc_dir_md5(folder: Path) -> str:
    """The hash DVC records for a folder: md5 of its sorted JSON listing, plus ``.dir``.

    Computed here so a regenerated ``data/`` can be checked against ``data.dvc``
    before anything is written to the DVC cache (the test suite checks the formula
    against the hash DVC itself recorded).
    """
    entries = [
        {"md5": md5_file(path), "relpath": path.relative_to(folder).as_posix()}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dvc_lock_outs(root: Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from ``dvc.lock`` (stages recorded so far)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    return {
        name: {o["path"]: o.get("md5", "") for o in stage.get("outs") or []}
        for name, stage in stages.items()
    }


def dvc_lock_params(root: Path) -> dict[str, dict[str, Any]]:
    """``{stage: {param: value}}`` as recorded by DVC when each stage last ran."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    result: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        merged: dict[str, Any] = {}
        for values in (stage.get("params") or {}).values():
            merged.update(values)
        result[name] = merged
    return result


def collect(root: Path, model_file: Path, feature_set: str) -> dict[str, Any]:
    """The lineage record embedded in the bento and returned by the service.

    Hashes and params come from ``data.dvc`` and ``dvc.lock`` (what DVC recorded
    for the upstream stages of this run); the model hash is recomputed from the file.
    """
    outs = dvc_lock_outs(root)
    return {
        "git": git_info(root),
        "raw_data_md5": dvc_file_hash(root / "data.dvc"),
        "dataset_md5": next(iter(outs.get("build_dataset", {}).values()), None),
        "model_md5": md5_file(model_file),
        "dvc_lock_outs": outs,
        "feature_set": feature_set,
        "params": dvc_lock_params(root),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
