"""The ``package`` stage: BentoML models + release file + bento, exported as one archive.

The release (``pipelines.modeling.release``) names the prod model (this run's ``build/model``),
an optional candidate and the previous prod model, each stored in BentoML as
``ctr_model:m<md5[:12]>`` with its file hashes, metrics and lineage in the metadata;
every model of the release ships in the bento.

BentoML keeps models and bentos under ``BENTOML_HOME``; the project pins it to
``.bentoml/`` in the repository (``base.bentoml_home``) so runs are isolated and
reproducible. The exported ``.bento`` archive is the DVC-tracked artifact: it can
be imported and served on any machine without rebuilding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import lineage
from pipelines.core.config import ConfigError, load_params
from pipelines.core.io import atomic_dir, atomic_path, md5_file, write_json
from pipelines.core.settings import settings_from
from pipelines.modeling import compiled as compiled_trees
from pipelines.modeling.release import (
    FeatureRef,
    ModelRef,
    OnlineStoreRef,
    ServingSettings,
    build_release,
    file_sha256,
    online_store_ref,
    sign_release_dict,
)


def use_bentoml_home(path: Path) -> None:
    """Point BentoML at the project's store; must run before ``import bentoml``."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(path.resolve())
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


MODEL_NAME = "ctr_model"
FEATURES_NAME = "ctr_features"
MODEL_FILES = ("model.joblib", "baseline.json", "model_card.json")
COMPILED_FILES = (compiled_trees.LIBRARY, compiled_trees.META)  # optional: compiled trees


def save_bento_model(
    name: str, version: str, files: dict[str, Path], metadata: dict[str, Any]
) -> str:
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


def _canonical(metadata: Any) -> str:
    return json.dumps(dict(metadata), sort_keys=True, default=str)


def save_model_dir(
    model_dir: Path,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    registry_version: str | None = None,
    compiled_dir: Path | None = None,
) -> ModelRef:
    """Store a ``train`` output folder as a BentoML model (version = md5 of model.joblib).

    The metadata keeps the file hashes, metrics and lineage, so a later release can
    use this version as candidate or previous without its original folder.
    ``compiled_dir`` adds the compiled library (``model.so``, ``compiled.json``); a
    stored copy of the same model whose files differ from these is replaced.
    """
    import bentoml

    sources = {name: model_dir / name for name in MODEL_FILES}
    if compiled_dir is not None:
        sources.update({name: compiled_dir / name for name in COMPILED_FILES})
    files = {name: md5_file(path) for name, path in sources.items()}
    tag = f"{MODEL_NAME}:m{files['model.joblib'][:12]}"
    card = json.loads((model_dir / "model_card.json").read_text())
    metadata = {
        "model_md5": files["model.joblib"],
        "feature_set": card["feature_set"],
        "files": files,
        # BentoML metadata takes no None values: nested records travel as JSON text
        "metrics_json": json.dumps(metrics or {}, default=str),
        "lineage_json": json.dumps(lineage or {}, default=str),
        **({"registry_version": registry_version} if registry_version else {}),
    }
    try:
        model = bentoml.models.get(tag)
        folder = Path(model.path)
        stored = {
            n: md5_file(folder / n)
            for n in (*MODEL_FILES, *COMPILED_FILES)
            if (folder / n).is_file()
        }
        # The same model with (or without) a compiled library, or with other metrics or
        # lineage (the reports around it changed): replaced, so the release records this
        # run's lineage whatever the local store held before.
        if stored != files or _canonical(model.info.metadata) != _canonical(metadata):
            bentoml.models.delete(tag)
    except bentoml.exceptions.NotFound:
        pass
    tag = save_bento_model(MODEL_NAME, tag.split(":")[1], sources, metadata)
    return model_ref(tag)


def compile_for_release(
    model_dir: Path, dataset_dir: Path | None, scratch: Path, stored: Path | None
) -> tuple[Path | None, dict[str, Any]]:
    """Compile the model (or reuse the library stored with it) and check it on the test set.

    Returns the folder holding ``model.so`` and ``compiled.json`` (None when it is not
    shipped) and the record the release keeps in the prod model's lineage: build
    platform and toolchain, rows checked, largest |compiled - scikit-learn| difference.
    A library is shipped only when it matches within ``compiled.TOLERANCE`` on every
    test row; otherwise (or without a compiler) the scikit-learn model serves alone.
    """
    import joblib

    model_file = model_dir / "model.joblib"
    record: dict[str, Any] = {"library": compiled_trees.LIBRARY, "shipped": False}
    try:
        if stored is not None and compiled_trees.reusable(stored, model_file):
            for name in COMPILED_FILES:
                shutil.copyfile(stored / name, scratch / name)
            meta = json.loads((scratch / compiled_trees.META).read_text())
        else:
            meta = compiled_trees.compile_model(model_file, scratch)
        record.update({k: meta[k] for k in ("platform", "compiler", "treelite", "tl2cgen")})
        if dataset_dir is None:
            raise compiled_trees.CompileError("no test set given to verify the library on")
        from pipelines.stages.dataset import load_split

        card = json.loads((model_dir / "model_card.json").read_text())
        X = load_split(dataset_dir, "test")[card["features"]].to_numpy(np.float64)
        worst = compiled_trees.max_abs_difference(
            joblib.load(model_file), compiled_trees.CompiledModel.load(scratch), X
        )
        record.update(test_rows=len(X), max_abs_diff=worst, tolerance=compiled_trees.TOLERANCE)
        if not worst <= compiled_trees.TOLERANCE:
            raise compiled_trees.CompileError(
                f"compiled probabilities differ from scikit-learn's by up to {worst:.3g} on the "
                f"test set (tolerance {compiled_trees.TOLERANCE:g})"
            )
    except compiled_trees.CompileError as exc:
        record["reason"] = str(exc)
        print(f"warning: the compiled library is not shipped, scikit-learn serves: {exc}")
        return None, record
    record["shipped"] = True
    return scratch, record


def model_ref(tag: str) -> ModelRef:
    """Describe a stored model for a release, checking its files against the recorded md5."""
    import bentoml

    try:
        stored = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound as exc:
        raise ConfigError(
            f"model {tag} is not in the BentoML store {os.environ.get('BENTOML_HOME')}; "
            "store it with pipelines.stages.packaging.save_model_dir or fix the tag in params.yaml"
        ) from exc
    meta: dict[str, Any] = dict(stored.info.metadata)
    folder = Path(stored.path)
    actual = {
        name: md5_file(folder / name)
        for name in (*MODEL_FILES, *COMPILED_FILES)
        if (folder / name).is_file()
    }
    recorded = meta.get("files") or {"model.joblib": meta.get("model_md5")}
    for name, md5 in recorded.items():
        if md5 and actual.get(name) != md5:
            raise ConfigError(
                f"model {tag}: {folder / name} has md5 {actual.get(name)}, stored as {md5}; "
                "the stored copy is damaged, delete it (`bentoml models delete`) and store it again"
            )
    if "model.joblib" not in actual or "baseline.json" not in actual:
        raise ConfigError(f"model {tag} lacks model.joblib or baseline.json in {folder}")
    return ModelRef(
        tag=str(stored.tag),
        version=str(stored.tag.version),
        registry_version=meta.get("registry_version"),
        feature_set=meta["feature_set"],
        files=actual,
        sha256={name: file_sha256(folder / name) for name in actual},
        metrics=json.loads(meta.get("metrics_json", "{}")),
        lineage=json.loads(meta.get("lineage_json", "{}")),
    )


def _resolve(setting: str, key: str) -> ModelRef | None:
    if setting in ("", "none", None):
        return None
    if ":" not in setting:
        raise ConfigError(
            f"serving.{key} must be a model tag like {MODEL_NAME}:m1234abcd5678 "
            f"or none, got {setting!r}"
        )
    return model_ref(setting)


def previous_prod_tag(old: dict[str, Any] | None, new_prod: str) -> str | None:
    """The prod of the release being replaced, or its own previous when prod is unchanged."""
    if not old:
        return None
    old_prod = (old.get("prod") or {}).get("tag") or old.get("model_tag")
    if old_prod and old_prod != new_prod:
        return str(old_prod)
    return (old.get("previous") or {}).get("tag")


def resolve_tiers(
    policy: ServingSettings, prod_tag: str, old_release: dict[str, Any] | None
) -> tuple[ModelRef | None, ModelRef | None]:
    """Candidate and previous model for a release from params and the release it replaces.

    ``previous_model: auto`` takes the prod of the old release (when it is still in
    the store; otherwise the release has no previous tier and says so).
    """
    candidate = _resolve(policy.candidate_model, "candidate_model")
    if policy.previous_model == "auto":
        tag = previous_prod_tag(old_release, prod_tag)
        try:
            previous = model_ref(tag) if tag else None
        except ConfigError as exc:
            print(f"note: no previous tier: {exc}")
            previous = None
    else:
        previous = _resolve(policy.previous_model, "previous_model")
    return candidate, previous


def package_stage(
    root: Path,
    model_dir: Path,
    raw_dir: Path,
    metrics_file: Path,
    release_file: Path,
    bento_dir: Path,
    service_name: str,
    bentoml_home: Path,
    policy: ServingSettings,
    lineage: dict[str, Any],
    online_store: OnlineStoreRef | None = None,
    dataset_dir: Path | None = None,
) -> dict[str, Any]:
    """Store models and feature snapshot in BentoML, write the release, build and export a bento.

    ``online_store`` (from ``features.online`` when ``serve: true``) is recorded in the
    release: the service then reads features from it, with the snapshot as fallback.
    The prod model ships compiled (``compile_for_release``, checked on ``dataset_dir``'s
    test split); the check is recorded in its lineage under ``compiled``.
    """
    use_bentoml_home(bentoml_home)
    import bentoml

    metrics = json.loads(metrics_file.read_text())
    metrics = {k: metrics.get(k) for k in ("auc", "log_loss", "calibration_error", "n")}
    try:
        stored: Path | None = Path(
            bentoml.models.get(f"{MODEL_NAME}:m{md5_file(model_dir / 'model.joblib')[:12]}").path
        )
    except bentoml.exceptions.NotFound:
        stored = None
    with tempfile.TemporaryDirectory(prefix="compiled-") as scratch:
        compiled_dir, compiled_record = compile_for_release(
            model_dir, dataset_dir, Path(scratch), stored
        )
        prod = save_model_dir(model_dir, metrics, lineage, compiled_dir=compiled_dir)
    prod = prod.model_copy(update={"lineage": {**prod.lineage, "compiled": compiled_record}})
    # The stage never reads its own previous release: its outputs stay a pure function
    # of its inputs (README "Reproducibility"). A previous tier is named by tag.
    candidate, previous = resolve_tiers(policy, prod.tag, None)
    events_file = raw_dir / "events.parquet"
    epoch = source_date_epoch(events_file)
    events_md5 = md5_file(events_file)
    features_tag = save_bento_model(
        FEATURES_NAME,
        f"f{events_md5[:12]}",
        {"events.parquet": events_file},
        {"events_md5": events_md5, "feature_set": prod.feature_set},
    )
    card = json.loads((model_dir / "model_card.json").read_text())
    features = FeatureRef(
        tag=features_tag,
        feature_set=prod.feature_set,
        names=card["features"],
        files={"events.parquet": events_md5},
        sha256={"events.parquet": file_sha256(events_file)},
    )
    release = build_release(
        service_name,
        policy,
        features,
        prod,
        candidate,
        previous,
        online_store=online_store,
        created_at=iso_time(epoch),
    )
    # The bento ships the release file, so it is written before the build and put
    # back as it was if the build fails (a failed stage leaves its outputs intact).
    old_text = release_file.read_text() if release_file.is_file() else None
    write_json(release_file, sign_release_dict(release.to_json_dict()))  # signed when keyed
    try:
        bento_tag, bento = _build_bento(root, service_name, release.release_id, release_file)
    except Exception:
        if old_text is None:
            release_file.unlink(missing_ok=True)
        else:
            with atomic_path(release_file) as tmp:
                tmp.write_text(old_text)
        raise
    print(
        f"built bento {bento_tag} (release {release.release_id}: "
        + ", ".join(f"{role} {ref.tag}" for role, ref in release.tiers().items())
        + ")"
    )
    with atomic_dir(bento_dir) as tmp:
        archive = tmp / f"{service_name}.bento"
        export_deterministic(bento_tag, archive, epoch)
        summary = {
            "bento_tag": bento_tag,
            "archive": str(bento_dir / archive.name),
            "archive_md5": md5_file(archive),
            "archive_bytes": archive.stat().st_size,
            "release_id": release.release_id,
            "routing": policy.routing,
            "model_tag": prod.tag,
            "tiers": {role: ref.tag for role, ref in release.tiers().items()},
            "features_tag": features_tag,
            "source_date_epoch": epoch,
        }
        write_json(tmp / "bento.json", summary)
        dockerfile = Path(bento.path) / "env" / "docker" / "Dockerfile"
        if dockerfile.is_file():
            shutil.copyfile(dockerfile, tmp / "Dockerfile")
    return summary


def run(
    root: Path,
    model_dir: Path,
    raw_dir: Path,
    metrics_file: Path,
    release_file: Path,
    bento_dir: Path,
    service_name: str,
    bentoml_home: Path,
    params_file: Path,
    dataset_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``package`` stage: serving settings and lineage from the project, then package.

    Returns the bento summary and the lineage record embedded in the release.
    """
    card = json.loads((model_dir / "model_card.json").read_text())
    settings = settings_from(load_params(params_file), params_file)
    online = online_store_ref(settings.features, card["feature_set"])
    record = lineage.collect(root, model_dir / "model.joblib", card["feature_set"])
    bento = package_stage(
        root,
        model_dir,
        raw_dir,
        metrics_file,
        release_file,
        bento_dir,
        service_name,
        bentoml_home,
        settings.serving,
        record,
        online_store=online,
        dataset_dir=dataset_dir,
    )
    return bento, record


def _build_bento(
    root: Path, service_name: str, release_id: str, release_file: Path
) -> tuple[str, Any]:
    """``bentoml build`` from a staging copy of the shipped files; the version hashes them.

    BentoML refuses build files whose absolute path has a dot-directory (a clone
    under ``~/.cache/...``), so the files the bentofile includes are copied into a
    fresh folder outside any dot-directory and built there.
    """
    import bentoml

    with tempfile.TemporaryDirectory(prefix="bento-build-", dir=staging_parent()) as staging:
        stage_dir = Path(staging)
        shipped = stage_build_context(root, stage_dir, release_file)
        code = hashlib.md5()
        for rel in shipped:
            code.update(rel.encode() + b"\0" + (stage_dir / rel).read_bytes())
        code.update(release_id.encode())
        version = f"b{code.hexdigest()[:12]}"
        bento_tag = f"{service_name}:{version}"
        try:
            bentoml.bentos.delete(bento_tag)  # rebuilding the same inputs replaces the old build
        except bentoml.exceptions.NotFound:
            pass
        build = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-f", BENTOFILE, "--version", version, "."],
            cwd=stage_dir,
            env={**os.environ, "BENTOML_HOME": os.environ["BENTOML_HOME"]},
            capture_output=True,
            text=True,
        )
    if build.returncode != 0:
        raise RuntimeError(
            f"`bentoml build` failed for {bento_tag}:\n{build.stdout[-3000:]}\n"
            f"{build.stderr[-3000:]}"
        )
    return bento_tag, bentoml.get(bento_tag)


BENTOFILE = "bentos/bentofile.yaml"
# Where the bento carries its release file (bentofile include; bentos/service.py reads it).
SHIPPED_RELEASE = "build/release/release.json"


def shipped_files(root: Path) -> list[str]:
    """Relative paths the bentofile ships (its ``include`` globs) plus its requirements file."""
    import yaml

    spec = yaml.safe_load((root / BENTOFILE).read_text())
    found: set[str] = {BENTOFILE}
    for pattern in spec.get("include") or []:
        found.update(
            p.relative_to(root).as_posix()
            for p in root.glob(pattern)
            if p.is_file() and "__pycache__" not in p.parts
        )
    requirements = (spec.get("python") or {}).get("requirements_txt")
    if requirements:
        found.add(str(requirements))
    return sorted(found)


def stage_build_context(root: Path, dest: Path, release_file: Path | None = None) -> list[str]:
    """Copy the shipped files into ``dest`` (a build context BentoML accepts anywhere).

    ``release_file`` is shipped as ``SHIPPED_RELEASE`` wherever it was written (a
    notebook run by hand writes it under the scratch folder).
    """
    files = sorted(set(shipped_files(root)) | ({SHIPPED_RELEASE} if release_file else set()))
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = release_file if release_file and rel == SHIPPED_RELEASE else root / rel
        shutil.copyfile(source, target)
    return files


def staging_parent() -> str:
    """A temporary folder whose absolute path has no dot-directory (BentoML requires it)."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        path = Path(candidate).resolve()
        if path.is_dir() and os.access(path, os.W_OK) and not _hidden(path):
            return str(path)
    raise ConfigError(
        f"no temporary folder outside a dot-directory to build the bento in (TMPDIR is "
        f"{tempfile.gettempdir()}); set TMPDIR to a writable folder such as /tmp"
    )


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def source_date_epoch(events_file: Path) -> int:
    """The time a build records (SOURCE_DATE_EPOCH): the newest event of its raw data.

    It is taken from an input, not the clock or the checkout, so the bento and the
    release file are a pure function of the stage's inputs.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    newest = pc.max(pq.read_table(events_file, columns=["ts"])["ts"]).as_py()
    return int(newest.timestamp()) if newest is not None else 0


def iso_time(epoch: int) -> str:
    """``epoch`` as an ISO 8601 UTC timestamp with seconds."""
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


_CREATION_TIME = re.compile(r"^(\s*(?:- )?creation_time:\s*).*$", re.M)


def export_deterministic(bento_tag: str, archive: Path, epoch: int) -> None:
    """Export a bento as BentoML does (xz tar), with every time set to ``epoch``.

    ``bentoml export`` stamps files with their mtime, owner and the build's clock
    (``creation_time`` of the bento and of each model). The archive is repacked with
    entries sorted, times ``epoch``, owner root and ``creation_time`` ``epoch``, so
    the same inputs give the same bytes; ``bentoml import`` reads it as usual.
    """
    import bentoml

    with tempfile.TemporaryDirectory(prefix="bento-export-") as scratch:
        exported = Path(bentoml.export_bento(bento_tag, str(Path(scratch) / "raw.bento")))
        stamp = iso_time(epoch)
        with (
            tarfile.open(exported, "r:xz") as src,
            tarfile.open(archive, "w:xz", format=tarfile.PAX_FORMAT) as out,
        ):
            for member in sorted(src.getmembers(), key=lambda m: m.name):
                handle = src.extractfile(member) if member.isfile() else None
                data = handle.read() if handle is not None else None
                name = posixpath.basename(member.name)
                if data is not None and name in ("bento.yaml", "model.yaml"):
                    text = _CREATION_TIME.sub(lambda m: f"{m.group(1)}'{stamp}'", data.decode())
                    data = text.encode()
                info = tarfile.TarInfo(member.name)
                info.type = member.type
                info.linkname = member.linkname
                info.mode = 0o755 if member.isdir() or member.mode & 0o100 else 0o644
                info.mtime = epoch
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if data is not None:
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))
                else:
                    out.addfile(info)


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


__all__ = [
    "atomic_path",
    "import_bento",
    "model_ref",
    "package_stage",
    "save_model_dir",
    "use_bentoml_home",
]
