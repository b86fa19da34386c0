"""What DVC recorded: ``dvc.yaml``, ``dvc.lock`` and ``.dvc`` files, read in one place."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.io import md5_file


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


def lock_stages(lock_text: str | None) -> dict[str, Any]:
    """The ``stages`` mapping of a ``dvc.lock`` text (empty when there is none)."""
    return ((yaml.safe_load(lock_text) if lock_text else None) or {}).get("stages") or {}


def lock_outs(lock_text: str | None) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from the text of a ``dvc.lock``."""
    return {
        name: {o["path"]: o.get("md5", "") for o in stage.get("outs") or []}
        for name, stage in lock_stages(lock_text).items()
    }


def lock_deps(lock_text: str | None) -> dict[str, dict[str, str]]:
    """``{stage: {dep path: md5}}`` from the text of a ``dvc.lock``."""
    return {
        name: {d["path"]: d.get("md5", "") for d in stage.get("deps") or []}
        for name, stage in lock_stages(lock_text).items()
    }


def lock_params(lock_text: str | None) -> dict[str, dict[str, Any]]:
    """``{stage: {param: value}}`` from the text of a ``dvc.lock``."""
    result: dict[str, dict[str, Any]] = {}
    for name, stage in lock_stages(lock_text).items():
        merged: dict[str, Any] = {}
        for values in (stage.get("params") or {}).values():
            merged.update(values)
        result[name] = merged
    return result


def read_text(path: Path) -> str | None:
    """A file's text, or None when it does not exist."""
    return path.read_text() if path.is_file() else None


def dvc_lock_outs(root: Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from ``dvc.lock`` (stages recorded so far)."""
    return lock_outs(read_text(root / "dvc.lock"))


def dvc_lock_params(root: Path) -> dict[str, dict[str, Any]]:
    """``{stage: {param: value}}`` as recorded by DVC when each stage last ran."""
    return lock_params(read_text(root / "dvc.lock"))


def lock_out_entries(lock_text: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(stage, out path): out entry}`` (md5, size, ...) from the text of a ``dvc.lock``."""
    return {
        (name, out["path"]): out
        for name, stage in lock_stages(lock_text).items()
        for out in stage.get("outs") or []
    }


def dvcfile_outs(name: str, text: str | None) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(file name, out path): out entry}`` from the text of a ``.dvc`` file."""
    data = (yaml.safe_load(text) if text else None) or {}
    return {(name, out["path"]): out for out in data.get("outs") or []}


def dvc_yaml(root: Path) -> dict[str, Any]:
    """``dvc.yaml`` of ``root`` as a mapping (empty when there is none)."""
    text = read_text(root / "dvc.yaml")
    data = yaml.safe_load(text) if text else None
    return data if isinstance(data, dict) else {}


def stage_names(root: Path) -> list[str]:
    """The pipeline's stages in ``dvc.yaml`` order."""
    return list(dvc_yaml(root).get("stages") or {})


def artifacts(root: Path) -> dict[str, Any]:
    """The ``artifacts:`` block of ``dvc.yaml`` (the model registry's declarations)."""
    return dvc_yaml(root).get("artifacts") or {}
