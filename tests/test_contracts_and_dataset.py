"""Contracts reject broken tables with readable reports; the dataset is split by time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.domain import Preset
from pipelines.core.settings import BuildDatasetSettings
from pipelines.features.contracts import (
    RAW_EVENTS,
    ContractViolation,
    feature_table_schema,
    validate,
)
from pipelines.features.definitions import CTR_V1
from pipelines.simulation.generate import generate_events, write_events
from pipelines.stages.dataset import (
    build_training_set,
    load_raw_events,
    write_training_set,
)

TINY = Preset(n_users=200, n_items=60, days=6, events=15_000)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return generate_events(TINY, seed=21)


def test_raw_contract_report_names_column_check_and_rows(events: pd.DataFrame) -> None:
    bad = events.head(100).copy()
    bad.loc[3, "surface"] = "email"
    bad.loc[4, "device"] = "fridge"
    bad.loc[7, "clicked"] = 1  # clicked without a click time
    bad.loc[8, "user_id"] = ""
    bad = bad.drop(columns=["position"]).assign(extra=1)
    with pytest.raises(ContractViolation) as info:
        validate(RAW_EVENTS, bad, "data/events.parquet")
    report = str(info.value)
    assert "Contract RawEvents violated by data/events.parquet (100 rows checked)" in report
    assert "column 'surface'" in report and "row 3: 'email'" in report
    assert "row 4: 'fridge'" in report
    assert "click_ts must be set exactly when clicked == 1" in report and "row 7" in report
    assert "column 'user_id'" in report and "row 8: ''" in report
    assert "missing column(s): 'position'" in report and "unexpected column(s): 'extra'" in report
    assert "What to do" in report


def test_duplicate_event_ids_and_bad_types_are_reported(events: pd.DataFrame) -> None:
    bad = events.head(20).copy()
    bad.loc[5, "event_id"] = bad.loc[4, "event_id"]
    bad["position"] = bad["position"].astype(object)
    bad.loc[2, "position"] = "third"
    with pytest.raises(ContractViolation) as info:
        validate(RAW_EVENTS, bad, "batch.parquet")
    assert "event_id" in str(info.value) and "position" in str(info.value)


def test_feature_table_contract_catches_out_of_range_values(events: pd.DataFrame) -> None:
    table = build_training_set(
        events, CTR_V1, BuildDatasetSettings(warmup_hours=24, valid_days=1, test_days=1)
    )[0]
    broken = table.copy()
    broken.loc[0, "user_ctr_24h"] = 1.5
    broken.loc[1, "item_impr_24h"] = np.nan
    with pytest.raises(ContractViolation, match="user_ctr_24h") as info:
        validate(feature_table_schema(), broken, "features")
    assert "item_impr_24h" in str(info.value)


def test_split_is_by_time_with_warmup_dropped(events: pd.DataFrame) -> None:
    table, meta = build_training_set(
        events, CTR_V1, BuildDatasetSettings(warmup_hours=24, valid_days=1, test_days=2)
    )
    first = events["ts"].min().floor("D")
    assert table["ts"].min() >= first + pd.Timedelta(hours=24)
    spans = table.groupby("split")["ts"].agg(["min", "max"])
    assert spans.loc["train", "max"] < spans.loc["valid", "min"]
    assert spans.loc["valid", "max"] < spans.loc["test", "min"]
    assert meta["rows"]["test"] > meta["rows"]["valid"] > 0
    assert meta["warmup_rows_dropped"] == (events["ts"] < first + pd.Timedelta(hours=24)).sum()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (dict(warmup_hours=-1, valid_days=1, test_days=1), "warmup_hours: must be >= 0"),
        (dict(warmup_hours=0, valid_days=0, test_days=1), "valid_days: must be >= 1"),
        (dict(warmup_hours=0, valid_days=1, test_days=1.5), "test_days: must be a whole number"),
    ],
)
def test_invalid_split_params_are_refused(policy: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BuildDatasetSettings(**policy)  # type: ignore[arg-type]


def test_split_leaving_no_training_window_is_refused(events: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="no training window left"):
        build_training_set(
            events, CTR_V1, BuildDatasetSettings(warmup_hours=24, valid_days=3, test_days=3)
        )


def test_write_is_atomic_and_load_validates(events: pd.DataFrame, tmp_path: Path) -> None:
    table, meta = build_training_set(
        events, CTR_V1, BuildDatasetSettings(warmup_hours=24, valid_days=1, test_days=1)
    )
    out = tmp_path / "dataset"
    write_training_set(table, meta, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    assert json.loads((out / "meta.json").read_text())["feature_set"] == "ctr_v1"
    raw = tmp_path / "raw"
    write_events(events.head(50).assign(surface="email"), raw)
    with pytest.raises(ContractViolation, match="raw/events.parquet"):
        load_raw_events(raw)
    with pytest.raises(FileNotFoundError, match="make data"):
        load_raw_events(tmp_path / "empty")
