"""Helpers shared by the serving tests: extra model versions and releases built from them."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipelines.core.io import md5_file
from pipelines.core.settings import ServingSettings, TrainSettings
from pipelines.features.definitions import get_feature_set
from pipelines.modeling.model import train_stage
from pipelines.modeling.release import FeatureRef, ModelRef, build_release, file_sha256
from pipelines.stages.dataset import load_split


def train_variant(root: Path, out_dir: Path, max_iter: int, learning_rate: float) -> Path:
    """Train another model version on a project's dataset (what a new train run would give)."""
    dataset = root / "build/dataset"
    meta = json.loads((dataset / "meta.json").read_text())
    train_stage(
        load_split(dataset, "train"),
        load_split(dataset, "valid"),
        get_feature_set(meta["feature_set"]),
        TrainSettings(max_iter=max_iter, learning_rate=learning_rate),
        7,
        meta,
        {"dataset": "test variant"},
        out_dir,
    )
    return out_dir


def model_ref_for_dir(model_dir: Path) -> ModelRef:
    """A release entry for a model folder, tagged like packaging tags it."""
    files = {n: md5_file(model_dir / n) for n in ("model.joblib", "baseline.json")}
    version = f"m{files['model.joblib'][:12]}"
    card = json.loads((model_dir / "model_card.json").read_text())
    return ModelRef(
        tag=f"ctr_model:{version}",
        version=version,
        feature_set=card["feature_set"],
        files=files,
        sha256={n: file_sha256(model_dir / n) for n in files},
        lineage={"model_dir": str(model_dir)},
    )


def feature_ref_for_dir(raw_dir: Path) -> FeatureRef:
    md5 = md5_file(raw_dir / "events.parquet")
    from pipelines.features.definitions import CTR_V1

    return FeatureRef(
        tag=f"ctr_features:f{md5[:12]}",
        feature_set="ctr_v1",
        names=CTR_V1.names,
        files={"events.parquet": md5},
        sha256={"events.parquet": file_sha256(raw_dir / "events.parquet")},
    )


def last_event_time(raw_dir: Path) -> pd.Timestamp:
    """The snapshot's as-of time: requests at or before it have fresh features."""
    return pd.read_parquet(raw_dir / "events.parquet", columns=["ts"])["ts"].max()


def release_for(
    policy: ServingSettings,
    raw_dir: Path,
    prod: Path,
    candidate: Path | None = None,
    previous: Path | None = None,
):  # noqa: ANN201 - returns (Release, resolver)
    """A release over model folders plus the tag -> folder resolver ``Runtime.load`` needs."""
    refs = {"prod": prod, "candidate": candidate, "previous": previous}
    built = {k: model_ref_for_dir(v) if v is not None else None for k, v in refs.items()}
    features = feature_ref_for_dir(raw_dir)
    release = build_release(
        "ctr_service", policy, features, built["prod"], built["candidate"], built["previous"]
    )
    folders = {ref.tag: refs[k] for k, ref in built.items() if ref is not None}
    folders[features.tag] = raw_dir

    def model_path(tag: str) -> Path:
        return Path(folders[tag])

    return release, model_path
