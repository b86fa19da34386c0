"""The ``package`` stage: BentoML models + release file + bento, exported as one archive.

BentoML keeps models and bentos under ``BENTOML_HOME``; the project pins it to
``.bentoml/`` in the repository (``base.bentoml_home``) so runs are isolated and
reproducible. The exported ``.bento`` archive is the DVC-tracked artifact: it can
be imported and served on any machine without rebuilding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines.io import atomic_dir, atomic_path, md5_file, write_json


def use_bentoml_home(path: Path) -> None:
    """Point BentoML at the project's store; must run before ``import bentoml``."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(path.resolve())
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def _save_model(name: str, version: str, files: dict[str, Path], metadata: dict[str, Any]) -> str:
    import bentoml

    tag = f"{name}:{version}"
    try:
        bentoml.models.get(tag)
        return tag  # content-addressed version: identical files are already stored
    except bentoml.exceptions.NotFound:
        pass
    with bentoml.models.create(tag, labels={"project": "mlops-notebooks"}, metadata=metadata) as m:
        for target, source in files.items():
            shutil.copyfile(source, m.path_of(target))
    return tag


def package_stage(
    root: Path,
    model_dir: Path,
    raw_dir: Path,
    metrics_file: Path,
    release_file: Path,
    bento_dir: Path,
    service_name: str,
    bentoml_home: Path,
    freshness_sla_seconds: float,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    """Store model and feature snapshot, write the release, build and export the bento."""
    use_bentoml_home(bentoml_home)
    import bentoml

    model_file = model_dir / "model.joblib"
    model_md5 = md5_file(model_file)
    card = json.loads((model_dir / "model_card.json").read_text())
    model_tag = _save_model(
        "ctr_model",
        f"m{model_md5[:12]}",
        {name: model_dir / name for name in ("model.joblib", "baseline.json", "model_card.json")},
        {"model_md5": model_md5, "feature_set": card["feature_set"]},
    )
    events_file = raw_dir / "events.parquet"
    events_md5 = md5_file(events_file)
    features_tag = _save_model(
        "ctr_features",
        f"f{events_md5[:12]}",
        {"events.parquet": events_file},
        {"events_md5": events_md5, "feature_set": card["feature_set"]},
    )
    metrics = json.loads(metrics_file.read_text())
    release = {
        "service_name": service_name,
        "model_version": model_tag.split(":")[1],
        "model_tag": model_tag,
        "model_md5": model_md5,
        "features_tag": features_tag,
        "feature_set": card["feature_set"],
        "features": card["features"],
        "freshness_sla_seconds": freshness_sla_seconds,
        "metrics": {k: metrics.get(k) for k in ("auc", "log_loss", "calibration_error", "n")},
        "lineage": lineage,
    }
    write_json(release_file, release)

    code = hashlib.md5()
    for path in sorted([root / "bentos/service.py", *(root / "pipelines").glob("*.py")]):
        code.update(path.read_bytes())
    stable = {k: v for k, v in release.items() if k != "lineage"}
    code.update(json.dumps(stable, sort_keys=True).encode())
    version = f"b{code.hexdigest()[:12]}"
    bento_tag = f"{service_name}:{version}"
    try:
        bentoml.bentos.delete(bento_tag)  # rebuilding the same inputs replaces the old build
    except bentoml.exceptions.NotFound:
        pass
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "build",
            "-f",
            "bentos/bentofile.yaml",
            "--version",
            version,
            ".",
        ],
        cwd=root,
        env={**os.environ, "BENTOML_HOME": os.environ["BENTOML_HOME"]},
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        raise RuntimeError(
            f"`bentoml build` failed for {bento_tag}:\n"
            f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
        )
    print(f"built bento {bento_tag}")
    bento = bentoml.get(bento_tag)
    with atomic_dir(bento_dir) as tmp:
        archive = Path(
            bentoml.export_bento(bento_tag, str(tmp.resolve() / f"{service_name}.bento"))
        )
        summary = {
            "bento_tag": bento_tag,
            "archive": str(bento_dir / archive.name),
            "archive_md5": md5_file(archive),
            "archive_bytes": archive.stat().st_size,
            "model_tag": model_tag,
            "features_tag": features_tag,
            "bento_path": str(bento.path),
        }
        write_json(tmp / "bento.json", summary)
        dockerfile = Path(bento.path) / "env" / "docker" / "Dockerfile"
        if dockerfile.is_file():
            shutil.copyfile(dockerfile, tmp / "Dockerfile")
    return summary


def import_bento(archive: Path, bentoml_home: Path) -> str:
    """Import an exported bento archive into a BentoML store; returns its tag."""
    with tempfile.TemporaryDirectory():
        env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "True"}
        out = subprocess.run(
            [sys.executable, "-m", "bentoml", "import", str(archive)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout.strip()


__all__ = ["atomic_path", "import_bento", "package_stage", "use_bentoml_home"]
