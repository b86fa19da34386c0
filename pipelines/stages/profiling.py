"""The ``profile`` stage: whylogs reference profile of training features and predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.io import atomic_dir, write_json
from pipelines.features.definitions import get_feature_set
from pipelines.modeling.model import load_model, predict
from pipelines.stages.dataset import load_split


def reference_frame(dataset_dir: Path, model_dir: Path, split: str = "train") -> pd.DataFrame:
    """Features (as served), request fields and the model's prediction for one split."""
    model, baseline, card = load_model(model_dir)
    feature_set = get_feature_set(card["feature_set"])
    table = load_split(dataset_dir, split)
    frame = table[["surface", "device", *feature_set.names]].copy()
    frame["prediction"] = predict(model, table[feature_set.names].to_numpy(dtype=np.float64))
    frame["baseline_prediction"] = baseline.predict(
        table["item_id"].to_numpy(), table["surface"].to_numpy()
    )
    return frame


def profile_stage(dataset_dir: Path, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``profile.bin`` (whylogs), ``summary.csv`` and ``meta.json`` to ``out_dir``."""
    from pipelines.core import profiles as wl

    frame = reference_frame(dataset_dir, model_dir)
    view = wl.profile(frame)
    summary = wl.summary(view)
    meta = {
        "rows": len(frame),
        "columns": list(frame.columns),
        "split": "train",
        "mean_prediction": round(float(frame["prediction"].mean()), 6),
    }
    with atomic_dir(out_dir) as tmp:
        wl.write_profile(view, tmp / "profile.bin")
        summary.to_csv(tmp / "summary.csv")
        write_json(tmp / "meta.json", meta)
    return {"meta": meta, "summary": summary, "frame": frame}
