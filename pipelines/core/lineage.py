"""Lineage from git and DVC: the commit, the data/dataset/model hashes and the params.

Two views of the same record:

* ``collect`` runs inside the ``package`` stage and embeds the record in the
  release file (and so in the bento and the service's ``metadata`` endpoint).
* ``version_lineage`` rebuilds the chain for any git revision (a registered
  model version) from what git and DVC stored at that revision: ``data.dvc``,
  ``dvc.lock``, ``params.yaml``, the metrics file and the DVC-tracked release
  and bento files, adding the registry events. ``mlops model lineage`` prints it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from pipelines.core.dvcfiles import (
    dvc_file_hash,
    dvc_lock_outs,
    dvc_lock_params,
    lock_deps,
    lock_outs,
    lock_params,
)
from pipelines.core.io import md5_file
from pipelines.core.vcs import git_show


def collect(
    root: Path, model_file: Path, feature_set: str, stage: str = "package"
) -> dict[str, Any]:
    """The lineage record embedded in the bento and returned by the service.

    Hashes and params come from ``data.dvc`` and ``dvc.lock`` (what DVC recorded
    for the upstream stages of this run); the model hash is recomputed from the file.
    The record is a pure function of those inputs: no time, no commit (the commit
    that records these hashes is made after the run; the registry's git tags name
    it) and nothing from ``stage``'s own previous run.
    """
    outs = {name: paths for name, paths in dvc_lock_outs(root).items() if name != stage}
    params = {name: values for name, values in dvc_lock_params(root).items() if name != stage}
    return {
        "raw_data_md5": dvc_file_hash(root / "data.dvc"),
        "dataset_md5": next(iter(outs.get("build_dataset", {}).values()), None),
        "model_md5": md5_file(model_file),
        "dvc_lock_outs": outs,
        "feature_set": feature_set,
        "params": params,
    }


# --- lineage of a registered version, rebuilt from git + DVC at its revision ---------------

FEATURE_DEFINITION = (
    "pipelines/features/definitions.py"  # the one module that defines every feature
)


class LineageError(RuntimeError):
    """A revision lacks what lineage needs; the message says what and how to fix it."""


def _yaml_at(root: Path, rev: str, path: str) -> dict[str, Any]:
    raw = git_show(root, rev, path)
    data = yaml.safe_load(raw) if raw else None
    return data if isinstance(data, dict) else {}


def _param(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _producer(outs: dict[str, dict[str, str]], path: str) -> tuple[str | None, str | None]:
    """The stage that outputs ``path`` and the md5 ``dvc.lock`` recorded for it."""
    for stage, paths in outs.items():
        if path in paths:
            return stage, paths[path]
    return None, None


def object_locations(root: Path, oids: list[str]) -> dict[str, list[str]]:
    """Where DVC holds each object: ``cache`` (local), ``remote`` (the default remote), or neither.

    Rollback and lineage promise that every recorded hash can be fetched; this is
    the check behind that promise (it asks the remote directly, not DVC's index).
    """
    from dvc.repo import Repo

    found: dict[str, list[str]] = {oid: [] for oid in oids}
    with Repo(str(root)) as repo:
        try:
            remote = repo.cloud.get_remote_odb(None)
        except Exception:  # no default remote configured: report cache only
            remote = None
        for oid in oids:
            if repo.cache.local.exists(oid):
                found[oid].append("cache")
            if remote is not None and remote.exists(oid):
                found[oid].append("remote")
    return found


def dvc_filesystem(root: Path, rev: str) -> Any:
    """DVC's view of the repository at ``rev``: reads outputs from the cache, else the remote."""
    from dvc.api import DVCFileSystem

    return DVCFileSystem(str(root), rev=rev)


def read_dvc_json(fs: Any, path: str) -> tuple[dict[str, Any] | None, str | None]:
    """Read a DVC-tracked JSON file through ``fs``: ``(data, None)`` or ``(None, why not)``."""

    try:
        return json.loads(fs.read_bytes(path)), None
    except Exception as exc:  # missing from cache and remote, or not tracked at that revision
        return None, f"{path}: {type(exc).__name__}: {exc}"


def version_lineage(
    root: Path, commit: str, artifact: str, events: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The lineage chain of the model at ``commit``, from git and DVC alone.

    git commit -> raw data hash (``data.dvc``) -> dataset hash -> feature set ->
    params -> model hash -> metrics -> executed notebooks -> registry events ->
    bento tag. Every hash comes from files stored at ``commit``; ``checks`` says
    whether the record embedded in the bento agrees, and ``locations`` where DVC
    can fetch each object from.
    """
    import json

    lock_text = (git_show(root, commit, "dvc.lock") or b"").decode() or None
    if lock_text is None:
        raise LineageError(
            f"commit {commit[:12]} has no dvc.lock: the pipeline had not run there. "
            "Register versions only after `dvc repro` and a commit of its outputs."
        )
    params = _yaml_at(root, commit, "params.yaml")
    dvc_yaml = _yaml_at(root, commit, "dvc.yaml")
    outs, deps, stage_params = lock_outs(lock_text), lock_deps(lock_text), lock_params(lock_text)

    raw_dir = str(_param(params, "base.raw_dir") or "data")
    data_dvc = _yaml_at(root, commit, f"{raw_dir}.dvc")
    raw_md5 = ((data_dvc.get("outs") or [{}])[0]).get("md5")

    dataset_path = str(_param(params, "build_dataset.out_dir"))
    dataset_stage, dataset_md5 = _producer(outs, dataset_path)
    declared = (dvc_yaml.get("artifacts") or {}).get(artifact) or {}
    model_path = str(declared.get("path") or _param(params, "train.out_dir"))
    model_stage, model_md5 = _producer(outs, model_path)
    metrics_path = str(_param(params, "evaluate.metrics_file"))
    metrics_stage, metrics_md5 = _producer(outs, metrics_path)
    metrics_raw = git_show(root, commit, metrics_path)
    metrics = json.loads(metrics_raw) if metrics_raw else None
    release_path = str(_param(params, "package.release_file"))
    bento_dir = str(_param(params, "package.bento_dir"))
    _, release_md5 = _producer(outs, release_path)
    _, bento_dir_md5 = _producer(outs, bento_dir)
    reports_dir = str(_param(params, "base.reports_dir") or "reports")
    notebooks = [
        {"stage": stage, "path": path, "md5": md5}
        for stage, paths in outs.items()
        for path, md5 in sorted(paths.items())
        if path.startswith(f"{reports_dir}/") and path.endswith((".ipynb", ".html"))
    ]

    fs = dvc_filesystem(root, commit)
    errors: list[str] = []
    release, err = read_dvc_json(fs, release_path)
    errors += [err] if err else []
    bento, err = read_dvc_json(fs, f"{bento_dir}/bento.json")
    errors += [err] if err else []
    card, err = read_dvc_json(fs, f"{model_path}/model_card.json")
    errors += [err] if err else []
    embedded = (release or {}).get("lineage") or {}
    model_file_md5 = None
    archive_md5 = None
    try:
        model_file_md5 = fs.info(f"{model_path}/model.joblib").get("md5")
        if bento:
            archive_md5 = fs.info(str(bento["archive"])).get("md5")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")

    checks = {
        "metrics file matches dvc.lock": metrics_raw is not None
        and hashlib.md5(metrics_raw).hexdigest() == metrics_md5,
        "bento record: raw data hash": embedded.get("raw_data_md5") == raw_md5,
        "bento record: dataset hash": embedded.get("dataset_md5") == dataset_md5,
        "bento record: model hash": bool(release)
        and (release or {}).get("model_md5") == model_file_md5
        and embedded.get("model_md5") == model_file_md5,
        "bento record: upstream dvc.lock outs": all(
            outs.get(stage) == recorded
            for stage, recorded in (embedded.get("dvc_lock_outs") or {}).items()
            if stage in (dataset_stage, model_stage)
        )
        and bool(embedded.get("dvc_lock_outs")),
        "bento archive matches bento.json": bool(bento)
        and archive_md5 == (bento or {}).get("archive_md5"),
    }
    oids = [
        h
        for h in [
            raw_md5,
            dataset_md5,
            model_md5,
            release_md5,
            bento_dir_md5,
            archive_md5,
            *(n["md5"] for n in notebooks),
        ]
        if h
    ]
    locations = object_locations(root, oids)
    feature_set = stage_params.get(dataset_stage or "", {}).get("features.feature_set")
    surfaces = (metrics or {}).get("per_surface") or {}
    return {
        "artifact": artifact,
        "git": {
            "commit": commit,
        },
        "raw_data": {"path": raw_dir, "md5": raw_md5, "source": f"{raw_dir}.dvc"},
        "dataset": {"path": dataset_path, "md5": dataset_md5, "stage": dataset_stage},
        "feature_set": {
            "name": feature_set or (release or {}).get("feature_set"),
            "definition": FEATURE_DEFINITION,
            "definition_md5": deps.get(dataset_stage or "", {}).get(FEATURE_DEFINITION),
            "features": (release or {}).get("features"),
        },
        "params": stage_params,
        "model": {
            "path": model_path,
            "md5": model_md5,
            "stage": model_stage,
            "model_file_md5": model_file_md5,
            "model_tag": (release or {}).get("model_tag"),
            # how the training rows were read: whole, or a negative sample (its rate)
            "training_sample": (card or {}).get("training_sample"),
        },
        "metrics": {
            "path": metrics_path,
            "md5": metrics_md5,
            "stage": metrics_stage,
            "values": {
                k: (metrics or {}).get(k)
                for k in ("auc", "log_loss", "calibration_error", "auc_lift_over_baseline", "n")
            },
            "per_surface": {
                s: {k: v.get(k) for k in ("auc", "calibration_error", "n")}
                for s, v in sorted(surfaces.items())
            },
        },
        "notebooks": notebooks,
        "registry_events": events or [],
        "bento": {
            "tag": (bento or {}).get("bento_tag"),
            "archive": (bento or {}).get("archive"),
            "archive_md5": archive_md5,
            "dir": bento_dir,
            "dir_md5": bento_dir_md5,
            "features_tag": (bento or {}).get("features_tag"),
        },
        "embedded": {k: v for k, v in embedded.items() if k != "dvc_lock_outs"},
        "checks": checks,
        "locations": locations,
        "errors": errors,
    }


def lineage_text(record: dict[str, Any]) -> str:
    """The lineage chain as readable text, one link per line, in chain order."""

    def where(md5: str | None) -> str:
        if not md5:
            return "[not recorded]"
        found = record["locations"].get(md5) or ["MISSING"]
        return "[" + "+".join(found) + "]"

    def short(md5: str | None) -> str:
        return md5 if md5 else "-"

    r = record
    head = f"{r['artifact']} {r.get('version', '')}".strip()
    if r.get("stages"):
        head += f"  (now in: {', '.join(r['stages'])})"
    lines = [head]
    add = lines.append
    add(
        f"  git commit     {r['git']['commit']}"
        + (f"  tag {r['git']['tag']}" if r["git"].get("tag") else "")
    )
    add(
        f"  raw data       {r['raw_data']['path']}  md5 {short(r['raw_data']['md5'])}  "
        f"({r['raw_data']['source']}) {where(r['raw_data']['md5'])}"
    )
    add(
        f"  dataset        {r['dataset']['path']}  md5 {short(r['dataset']['md5'])}  "
        f"(dvc.lock {r['dataset']['stage']}) {where(r['dataset']['md5'])}"
    )
    fs = r["feature_set"]
    add(
        f"  feature set    {fs['name']}  definition {fs['definition']} "
        f"md5 {short(fs['definition_md5'])}"
    )
    for stage, values in r["params"].items():
        if values:
            shown = " ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in sorted(values.items()))
            add(f"  params         {stage}: {shown}")
    m = r["model"]
    add(
        f"  model          {m['path']}  md5 {short(m['md5'])} {where(m['md5'])}  "
        f"model.joblib md5 {short(m['model_file_md5'])}  {m['model_tag']}"
    )
    sample = m.get("training_sample") or {}
    if sample.get("kind") == "negative_downsampling":
        add(
            f"  training rows  sample: every click, {sample['negative_rate']:.4g} of the "
            f"non-clicks per day ({sample['rows_after']:,} of {sample['rows_before']:,})"
        )
    elif sample:
        add(f"  training rows  the whole training window ({sample.get('rows')} rows)")
    mt = r["metrics"]
    vals = " ".join(f"{k} {v}" for k, v in mt["values"].items() if v is not None)
    add(f"  metrics        {mt['path']}  md5 {short(mt['md5'])} [git]  {vals}")
    for surface, v in mt["per_surface"].items():
        add(
            f"                 {surface}: auc {v.get('auc')} calibration_error "
            f"{v.get('calibration_error')} n {v.get('n')}"
        )
    for nb in r["notebooks"]:
        add(f"  notebook       {nb['path']}  md5 {nb['md5']} {where(nb['md5'])}")
    for e in r["registry_events"]:
        why = e.get("reason") or ""
        extra = []
        if e.get("approver"):
            extra.append(f"approved by {e['approver']}")
        if e.get("emergency"):
            extra.append("EMERGENCY")
        add(
            f"  registry       {e['timestamp']}  {e['action']}"
            + (f" -> {e['stage']}" if e.get("stage") else "")
            + f"  by {e['author']}"
            + (f" ({'; '.join(extra)})" if extra else "")
            + (f": {why}" if why else "")
            + f"  [{e['tag']}]"
        )
    b = r["bento"]
    add(
        f"  bento          {b['tag']}  archive {b['archive']} md5 {short(b['archive_md5'])} "
        f"{where(b['archive_md5'])}"
    )
    bad = [name for name, ok in r["checks"].items() if not ok]
    add(
        "  checks         "
        + ("all passed: " + ", ".join(r["checks"]) if not bad else "FAILED: " + ", ".join(bad))
    )
    missing = [h for h, found in r["locations"].items() if not found]
    if missing:
        add(
            f"  unresolved     {len(missing)} hash(es) in neither cache nor remote: "
            + ", ".join(missing)
        )
    for err in r["errors"]:
        add(f"  error          {err}")
    return "\n".join(lines)
