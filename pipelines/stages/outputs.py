"""Previous stage outputs back from DVC's cache, so a failed or killed stage leaves them usable.

Stage outputs are not ``persist``-ent (that keeps DVC's run-cache working), so
``dvc repro`` deletes a stage's outputs before running its command. The runner
puts the versions recorded in ``dvc.lock`` straight back from the local cache
before it starts the notebook; the stage then replaces them atomically, or
fails and leaves them as they were. Standard library only.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.core.io import atomic_dir, atomic_path


def _lock_stages(root: Path) -> dict[str, Any]:
    import yaml

    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    return dict((yaml.safe_load(lock.read_text()) or {}).get("stages") or {})


def stage_for_output(root: Path, output: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The stage whose recorded outputs include ``output`` (relative path), and its outs."""
    for name, stage in _lock_stages(root).items():
        outs = list(stage.get("outs") or [])
        if any(o.get("path") == output for o in outs):
            return name, outs
    return None, []


def cache_dir(root: Path) -> Path:
    """DVC's local cache folder (``cache.dir`` of the project config, else ``.dvc/cache``)."""
    found = root / ".dvc" / "cache"
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        try:
            parser.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if parser.has_option("cache", "dir"):
            custom = Path(parser.get("cache", "dir").strip("'\""))
            found = custom if custom.is_absolute() else (root / ".dvc" / custom).resolve()
    return found


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def restore_outputs(root: Path, outs: list[dict[str, Any]]) -> list[str]:
    """Put every missing output of ``outs`` (dvc.lock entries) back from the cache.

    Returns the paths restored. An output whose objects are not all in the cache
    is left alone (``dvc pull`` fetches it).
    """
    cache = cache_dir(root)
    restored = []
    for out in outs:
        rel, md5 = out.get("path"), out.get("md5")
        if not rel or not md5:
            continue
        target = root / rel
        if target.exists():
            continue
        if md5.endswith(".dir"):
            manifest = _object(cache, md5)
            if not manifest.is_file():
                continue
            entries = json.loads(manifest.read_text())
            if not all(_object(cache, e["md5"]).is_file() for e in entries):
                continue
            with atomic_dir(target) as tmp:
                for entry in entries:
                    dest = tmp / entry["relpath"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(_object(cache, entry["md5"]), dest)
                    os.chmod(dest, 0o644)
        else:
            source = _object(cache, md5)
            if not source.is_file():
                continue
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        restored.append(str(rel))
    return restored


def restore_previous_outputs(root: Path, output: str) -> list[str]:
    """Restore the outputs of the stage that writes ``output``, as ``dvc.lock`` records them."""
    _, outs = stage_for_output(root, output)
    return restore_outputs(root, outs) if outs else []
