"""The ``evaluate`` stage: score the test window with the model and the rule baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.core.config import ConfigError
from pipelines.core.io import write_json
from pipelines.features.definitions import get_feature_set
from pipelines.modeling.evaluation import curves, evaluate, write_plots
from pipelines.modeling.model import load_model, predict
from pipelines.stages.dataset import load_split


def run(
    dataset_dir: Path, model_dir: Path, metrics_file: Path, plots_dir: Path, n_bins: int
) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Score the test split with the model and the baseline; write metrics and curves."""
    if not isinstance(n_bins, int) or n_bins < 2:
        raise ConfigError(f"evaluate.calibration_bins must be a whole number >= 2, got {n_bins!r}")
    model, baseline, card = load_model(model_dir)
    feature_set = get_feature_set(card["feature_set"])
    test = load_split(dataset_dir, "test")
    y = test["clicked"].to_numpy()
    p = predict(model, test[feature_set.names].to_numpy(dtype=np.float64))
    p_base = baseline.predict(test["item_id"].to_numpy(), test["surface"].to_numpy())
    metrics = evaluate(y, p, test["surface"].to_numpy(), p_base, n_bins)
    plots = curves(y, p, n_bins)
    write_plots(plots, plots_dir)
    write_json(metrics_file, metrics)
    return metrics, plots
