"""Training past memory: the day-stratified negative sample, its correction, its record."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from pipelines.core.domain import Preset
from pipelines.core.settings import BuildDatasetSettings, TrainSettings
from pipelines.features.definitions import CTR_V1
from pipelines.modeling.compiled import CompiledModel, compile_model, max_abs_difference
from pipelines.modeling.model import load_model, predict, train_stage
from pipelines.modeling.sampling import read_training_rows
from pipelines.simulation.generate import generate_events
from pipelines.stages.dataset import build_training_set

TINY = Preset(n_users=400, n_items=100, days=6, events=60_000)
META = {"windows": {"train_start": "a", "valid_start": "b", "test_start": "c"}}


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    table = build_training_set(
        generate_events(TINY, seed=37),
        CTR_V1,
        BuildDatasetSettings(warmup_hours=24, valid_days=1, test_days=1),
    )[0]
    path = tmp_path_factory.mktemp("dataset") / "train.parquet"
    table[table.split == "train"].to_parquet(path, index=False)
    return path, table[table.split == "valid"]


def test_a_split_under_the_limit_is_read_whole(split: tuple[Path, pd.DataFrame]) -> None:
    path, _ = split
    whole = pd.read_parquet(path)
    rows, record = read_training_rows(path, len(whole), seed=42)
    pd.testing.assert_frame_equal(rows, whole)
    assert record == {"kind": "none", "rows": len(whole), "max_train_rows": len(whole)}
    rows, record = read_training_rows(path, 0, seed=42)  # 0: never sample
    assert record["kind"] == "none" and len(rows) == len(whole)


def test_the_sample_keeps_every_click_and_the_same_share_of_each_day(
    split: tuple[Path, pd.DataFrame],
) -> None:
    path, _ = split
    whole = pd.read_parquet(path)
    clicks = int(whole["clicked"].sum())
    target = clicks + (len(whole) - clicks) // 4
    rows, record = read_training_rows(path, target, seed=42)
    rate = record["negative_rate"]
    assert record["kind"] == "negative_downsampling" and rate == pytest.approx(0.25, abs=1e-3)
    assert int(rows["clicked"].sum()) == clicks == record["clicks_kept"]
    assert len(rows) == record["rows_after"]
    assert abs(len(rows) - target) < 4 * np.sqrt(target)  # binomial spread around the target
    assert list(rows.dtypes) == list(whole.dtypes)  # the same frame a whole read gives
    assert len(record["per_day"]) >= 3
    for day, counts in record["per_day"].items():  # every day at the same rate
        n = counts["non_clicks"]
        assert abs(counts["kept"] - rate * n) < 5 * np.sqrt(n * rate * (1 - rate)) + 1, day
    # rows are whole rows of the file, in file order
    merged = rows.merge(whole.reset_index(), how="left", on=list(whole.columns))
    assert merged["index"].is_monotonic_increasing
    # deterministic, and independent of how many rows are read at a time
    again, _ = read_training_rows(path, target, seed=42, batch_rows=1000)
    pd.testing.assert_frame_equal(rows, again)
    other, _ = read_training_rows(path, target, seed=7)
    assert not other.equals(rows)
    with pytest.raises(ValueError, match="clicks alone exceed train.max_train_rows"):
        read_training_rows(path, clicks, seed=42)


def test_a_model_trained_on_the_sample_is_corrected_to_the_true_click_rate(
    split: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    path, valid = split
    whole = pd.read_parquet(path)
    clicks = int(whole["clicked"].sum())
    rows, record = read_training_rows(path, clicks + (len(whole) - clicks) // 5, seed=42)
    params = TrainSettings(max_iter=40)
    full = train_stage(whole, valid, CTR_V1, params, 42, META, {}, tmp_path / "full")
    card = train_stage(rows, valid, CTR_V1, params, 42, META, {}, tmp_path / "s", record)
    train_stage(rows, valid, CTR_V1, params, 42, META, {}, tmp_path / "raw")  # uncorrected
    X = valid[CTR_V1.names].to_numpy(np.float64)
    observed = float(valid["clicked"].mean())
    mean = {
        name: float(predict(load_model(tmp_path / name)[0], X).mean())
        for name in ("full", "s", "raw")
    }
    # without the correction the sample's 5x click rate shows; with it, the true rate
    assert mean["raw"] > 2.5 * observed, (mean, observed)
    assert abs(mean["s"] - observed) < 0.15 * observed, (mean, observed)
    assert abs(mean["s"] - mean["full"]) < 0.1 * mean["full"], mean
    assert card["valid_metrics"]["auc"] > full["valid_metrics"]["auc"] - 0.03
    # the rule baseline counts each kept non-click for 1 / rate of them
    baseline = load_model(tmp_path / "s")[1]
    assert baseline.global_ctr == pytest.approx(whole["clicked"].mean(), rel=0.05)
    assert card["click_rate_train"] == pytest.approx(whole["clicked"].mean(), rel=0.05)
    # recorded in the card (JSON and markdown) with the rate
    assert card["training_sample"] == record and full["training_sample"]["kind"] == "none"
    assert "of the non-clicks on every day" in (tmp_path / "s/model_card.md").read_text()
    # the compiled trees carry the correction too (they start from the same baseline score)
    model = joblib.load(tmp_path / "s/model.joblib")
    compile_model(tmp_path / "s/model.joblib", tmp_path / "compiled")
    compiled = CompiledModel.load(tmp_path / "compiled")
    assert max_abs_difference(model, compiled, X) < 1e-9
