"""The ``profile`` stage: the references live traffic is compared with.

``drift_reference.json`` (exact binned statistics per time window, what drift is judged
on; ``pipelines.stages.drift_reference``) and a whylogs profile (``profile.bin``) of the
training features, request fields and the model's predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.io import atomic_dir, write_json
from pipelines.features.definitions import get_feature_set
from pipelines.modeling.model import load_model, predict
from pipelines.stages.dataset import load_split
from pipelines.stages.drift_reference import build_reference, filling_columns

REFERENCE_WINDOW = "1h"  # training windows the between-window variation is measured on


def reference_frame(dataset_dir: Path, model_dir: Path, split: str = "train") -> pd.DataFrame:
    """Features (as served), request fields, the model's prediction and ``ts`` for one split."""
    model, baseline, card = load_model(model_dir)
    feature_set = get_feature_set(card["feature_set"])
    table = load_split(dataset_dir, split)
    frame = table[["surface", "device", *feature_set.names]].copy()
    frame["surface"] = frame["surface"].astype(str)
    frame["device"] = frame["device"].astype(str)
    frame["prediction"] = predict(model, table[feature_set.names].to_numpy(dtype=np.float64))
    frame["baseline_prediction"] = baseline.predict(
        table["item_id"].to_numpy(), table["surface"].to_numpy()
    )
    frame["ts"] = table["ts"].to_numpy()
    return frame


def drift_reference(
    frame: pd.DataFrame, feature_set_name: str, data_start: pd.Timestamp
) -> dict[str, Any]:
    """The drift reference of a reference frame (``reference_frame``), see drift_reference."""
    feature_set = get_feature_set(feature_set_name)
    columns = [c for c in frame.columns if c != "ts"]
    filling = filling_columns(feature_set, data_start, columns)
    if filling:  # the model reads every feature: its output settles once all are full
        latest = max(filling.values(), key=lambda v: v[0])
        reason = f"the model's inputs fill until {latest[0].isoformat()} ({latest[1]})"
        filling["prediction"] = filling["baseline_prediction"] = (latest[0], reason)
    growing = {
        name: "grows by construction (count over all history)" for name in feature_set.growing
    }
    return build_reference(
        frame[columns], frame["ts"], REFERENCE_WINDOW, growing=growing, filled_from=filling
    )


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


def profile_stage(
    dataset_dir: Path, model_dir: Path, out_dir: Path, warmup_hours: float = 24
) -> dict[str, Any]:
    """Write the reference to ``out_dir``: ``drift_reference.json``, ``reference.parquet``,
    ``summary.csv`` and ``meta.json``, a pure function of the inputs.

    ``warmup_hours`` (``build_dataset.warmup_hours``) places the start of the raw data
    before the training window, so features whose window is still filling are known.
    ``profile.bin``, the whylogs view, is derived from ``reference.parquet``: written here
    too, but ignored by DVC (``.dvcignore``), because whylogs' sketches are randomised;
    when it is missing (a fresh checkout) ``profiles.reference_profile`` rebuilds it.
    """
    from pipelines.core import profiles as wl

    frame = reference_frame(dataset_dir, model_dir)
    card_set = load_model(model_dir)[2]["feature_set"]
    first = pd.Timestamp(frame["ts"].min())
    data_start = (first - pd.Timedelta(hours=warmup_hours)).floor("D")
    reference = drift_reference(frame, card_set, data_start)
    frame = frame.drop(columns="ts")
    summary = exact_summary(frame)
    meta = {
        "rows": len(frame),
        "columns": list(frame.columns),
        "split": "train",
        "mean_prediction": round(float(frame["prediction"].mean()), 6),
    }
    with atomic_dir(out_dir) as tmp:
        with (tmp / "drift_reference.json").open("w") as handle:  # compact: counts per window
            json.dump(reference, handle, sort_keys=True, separators=(",", ":"))
        frame.to_parquet(tmp / wl.REFERENCE_FRAME, index=False)
        summary.to_csv(tmp / "summary.csv")
        write_json(tmp / "meta.json", meta)
        wl.write_profile(wl.profile(frame), tmp / "profile.bin")
    not_judged = {c: e["not_judged"] for c, e in reference["columns"].items() if e["not_judged"]}
    return {"meta": meta, "summary": summary, "frame": frame, "not_judged": not_judged}
