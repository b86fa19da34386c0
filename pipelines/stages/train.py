"""The ``train`` stage: fit the model and the rule baseline on the training window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.core.dvcfiles import dvc_file_hash, dvc_lock_outs
from pipelines.core.settings import TrainSettings
from pipelines.features.definitions import get_feature_set
from pipelines.modeling.model import train_stage
from pipelines.modeling.sampling import read_training_rows
from pipelines.stages.dataset import load_split


def run(
    dataset_dir: Path, out_dir: Path, params: TrainSettings, seed: int, root: Path
) -> dict[str, Any]:
    """Train on ``dataset_dir``'s train split, validate on its valid split; write ``out_dir``.

    The model card records the hashes of the raw data and the dataset (``root``'s DVC
    files) so the model can be traced back to its inputs.
    """
    meta = json.loads((dataset_dir / "meta.json").read_text())
    hashes: dict[str, str | None] = {
        "raw_data (data.dvc)": dvc_file_hash(root / "data.dvc"),
        "dataset (dvc.lock)": next(
            iter(dvc_lock_outs(root).get("build_dataset", {}).values()), None
        ),
    }
    path = dataset_dir / "train.parquet"
    if not path.is_file():
        load_split(dataset_dir, "train")  # the error that says what to run
    rows, sample = read_training_rows(path, params.max_train_rows, seed)
    return train_stage(
        rows,
        load_split(dataset_dir, "valid"),
        get_feature_set(meta["feature_set"]),
        params,
        seed,
        meta,
        hashes,
        out_dir,
        sample,
    )
