"""The ``profile`` stage: whylogs reference profile of training features and predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.io import atomic_dir, write_json
from pipelines.modeling.model import load_model, predict
from pipelines.stages.dataset import get_feature_set, load_split


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


STATS = ("mean", "stddev", "min", "q_25", "median", "q_75", "max")


def exact_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-column statistics, exact (whylogs' quantile sketches are randomised)."""
    rows = {}
    for name in frame.columns:
        column = frame[name]
        row: dict[str, float] = {
            "counts/n": float(len(column)),
            "counts/null": float(column.isna().sum()),
        }
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            values = column.dropna().astype(np.float64)
            q25, median, q75 = (
                np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else [np.nan] * 3
            )
            row |= {
                "distribution/mean": float(values.mean()),
                "distribution/stddev": float(values.std()),
                "distribution/min": float(values.min()),
                "distribution/q_25": float(q25),
                "distribution/median": float(median),
                "distribution/q_75": float(q75),
                "distribution/max": float(values.max()),
            }
        row["cardinality/est"] = float(column.nunique(dropna=True))
        rows[name] = row
    order = ["counts/n", "counts/null", *(f"distribution/{k}" for k in STATS), "cardinality/est"]
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("column")
    return table.reindex(columns=order)


def profile_stage(dataset_dir: Path, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the reference (``reference.parquet``, ``summary.csv``, ``meta.json``) to ``out_dir``.

    Those three are a pure function of the inputs. ``profile.bin``, the whylogs view
    monitoring reads, is derived from ``reference.parquet``: written here too, but
    ignored by DVC (``.dvcignore``), because whylogs' sketches are randomised; when it
    is missing (a fresh checkout) ``profiles.reference_profile`` rebuilds it.
    """
    from pipelines.core import profiles as wl

    frame = reference_frame(dataset_dir, model_dir)
    summary = exact_summary(frame)
    meta = {
        "rows": len(frame),
        "columns": list(frame.columns),
        "split": "train",
        "mean_prediction": round(float(frame["prediction"].mean()), 6),
    }
    with atomic_dir(out_dir) as tmp:
        frame.to_parquet(tmp / wl.REFERENCE_FRAME, index=False)
        summary.to_csv(tmp / "summary.csv")
        write_json(tmp / "meta.json", meta)
        wl.write_profile(wl.profile(frame), tmp / "profile.bin")
    return {"meta": meta, "summary": summary, "frame": frame}
