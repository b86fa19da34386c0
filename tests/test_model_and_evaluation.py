"""Model training, the rule baseline, metrics and curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.core.config import ConfigError
from pipelines.core.domain import Preset
from pipelines.core.settings import BuildDatasetSettings, TrainSettings
from pipelines.features.definitions import CTR_V1
from pipelines.modeling.evaluation import curves, evaluate, expected_calibration_error
from pipelines.modeling.model import RuleBaseline, load_model, predict, train_stage
from pipelines.simulation.generate import generate_events
from pipelines.stages.dataset import build_training_set

TINY = Preset(n_users=400, n_items=100, days=6, events=40_000)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return build_training_set(
        generate_events(TINY, seed=31),
        CTR_V1,
        BuildDatasetSettings(warmup_hours=24, valid_days=1, test_days=1),
    )[0]


def test_model_beats_chance_and_card_records_lineage(table: pd.DataFrame, tmp_path: Path) -> None:
    train, valid = table[table.split == "train"], table[table.split == "valid"]
    meta = {"windows": {"train_start": "a", "valid_start": "b", "test_start": "c"}}
    card = train_stage(
        train, valid, CTR_V1, TrainSettings(max_iter=40), 42, meta, {"raw": "abc"}, tmp_path / "m"
    )
    assert card["valid_metrics"]["auc"] > 0.6
    assert card["data_hashes"] == {"raw": "abc"} and card["features"] == CTR_V1.names
    model, baseline, loaded = load_model(tmp_path / "m")
    p = predict(model, valid[CTR_V1.names].to_numpy(np.float64))
    assert ((p > 0) & (p < 1)).all() and loaded == card
    assert "# Model card" in (tmp_path / "m/model_card.md").read_text()


def test_training_is_deterministic(table: pd.DataFrame, tmp_path: Path) -> None:
    train, valid = table[table.split == "train"], table[table.split == "valid"]
    meta = {"windows": {"train_start": "a", "valid_start": "b", "test_start": "c"}}
    a = train_stage(train, valid, CTR_V1, TrainSettings(max_iter=20), 42, meta, {}, tmp_path / "a")
    b = train_stage(train, valid, CTR_V1, TrainSettings(max_iter=20), 42, meta, {}, tmp_path / "b")
    assert a["valid_metrics"] == b["valid_metrics"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_iter", 0),
        ("learning_rate", 0.0),
        ("learning_rate", 2.0),
        ("max_leaf_nodes", 1),
        ("l2_regularization", -1.0),
    ],
)
def test_invalid_hyperparameters_are_refused(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainSettings(**{field: value})  # type: ignore[arg-type]


def test_baseline_shrinks_towards_surface_rate_and_round_trips(
    table: pd.DataFrame, tmp_path: Path
) -> None:
    train = table[table.split == "train"]
    baseline = RuleBaseline.fit(train)
    unknown = baseline.predict(["never-seen"], ["search"])[0]
    assert unknown == baseline.surface_ctr["search"]
    test = table[table.split == "test"]
    auc = roc_auc_score(
        test["clicked"], baseline.predict(test["item_id"].to_numpy(), test["surface"].to_numpy())
    )
    assert auc > 0.55
    baseline.save(tmp_path / "b.json")
    assert RuleBaseline.load(tmp_path / "b.json") == baseline


def test_metrics_and_curves() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.5, 20_000)
    y = (rng.random(20_000) < p).astype(int)
    surface = rng.choice(["feed", "search", "recs"], 20_000)
    metrics = evaluate(y, p, surface, np.full_like(p, y.mean()))
    assert metrics["calibration_error"] < 0.02  # perfectly calibrated by construction
    assert metrics["baseline"]["auc"] == 0.5 and metrics["auc_lift_over_baseline"] > 0.1
    assert set(metrics["per_surface"]) == {"feed", "search", "recs"}
    assert expected_calibration_error(y, np.clip(p * 1.5, 0, 1)) > 0.05
    c = curves(y, p)
    assert len(c["roc"]) <= 200 and c["roc"]["fpr"].is_monotonic_increasing
    assert list(c["calibration"].columns) == ["mean_predicted", "fraction_clicked", "n"]
