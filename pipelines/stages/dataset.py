"""The ``build_dataset`` stage: raw events -> point-in-time training set, split by time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.core.io import atomic_dir, write_json
from pipelines.core.settings import BuildDatasetSettings
from pipelines.features.contracts import (
    RAW_EVENTS,
    feature_table_schema,
    training_set_schema,
    validate,
)
from pipelines.features.definitions import FeatureSet, get_feature_set
from pipelines.features.offline import point_in_time_features
from pipelines.features.splits import split_boundaries, training_set_meta


class RawDataError(ValueError):
    """A raw event file cannot be read (truncated, not parquet, unreadable)."""


def read_raw_file(path: Path) -> pd.DataFrame:
    """Read one raw parquet file, naming the file and the fix when it is corrupt.

    A truncated download or a file overwritten with something else otherwise
    surfaces as a bare Arrow error without the file name.
    """
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise RawDataError(
            f"raw event file {path} ({path.stat().st_size:,} bytes) is not readable parquet: "
            f"{type(exc).__name__}: {exc}. It is corrupt or truncated; restore it with "
            "`git checkout data.dvc && dvc checkout --force data.dvc` (`dvc repro` records a "
            "changed data/ in data.dvc before this stage runs, so data.dvc comes from git "
            "first), then rerun. Outputs of the previous "
            "run were left untouched."
        ) from None


def load_raw_events(raw_dir: Path) -> pd.DataFrame:
    """Read every ``*.parquet`` in ``raw_dir`` and check it against the RawEvents contract."""
    files = sorted(raw_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no raw event files (*.parquet) in {raw_dir}; "
            "run `make data` to pull or regenerate them"
        )
    frames = [read_raw_file(path) for path in files]
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    where = str(files[0]) if len(files) == 1 else f"{raw_dir}/*.parquet"
    events = validate(RAW_EVENTS, events, where)
    return events.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def build_training_set(
    events: pd.DataFrame,
    feature_set: FeatureSet,
    policy: BuildDatasetSettings,
    engine: str = "numpy",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Point-in-time features for every impression, labelled and split by time.

    Each row's features use only events strictly before its own timestamp (see
    ``pipelines.features.definitions``). Rows in the warm-up window are dropped because their
    history is still filling; the rest are assigned to train/valid/test by time.
    ``engine`` (``features.engine``) picks the offline engine; both give identical rows.
    """
    bounds = split_boundaries(events["ts"], policy)
    table = point_in_time_features(events, feature_set, engine=engine)
    validate(feature_table_schema(feature_set), table, "the point-in-time feature table")
    ts = table["ts"]
    split = pd.Series("train", index=table.index, dtype="str")
    split[ts >= bounds["valid_start"]] = "valid"
    split[ts >= bounds["test_start"]] = "test"
    table["split"] = split
    table = table[ts >= bounds["train_start"]].reset_index(drop=True)
    table = validate(training_set_schema(feature_set), table, "the training set")
    counts = table["split"].value_counts()
    clicks = table.groupby("split")["clicked"].sum()
    meta = training_set_meta(
        feature_set, engine, bounds, counts.to_dict(), clicks.to_dict(), len(events)
    )
    return table, meta


def write_training_set(table: pd.DataFrame, meta: dict[str, Any], out_dir: Path) -> None:
    """Write ``train/valid/test.parquet`` and ``meta.json``, replacing ``out_dir`` atomically."""
    with atomic_dir(out_dir) as tmp:
        for name, part in table.groupby("split", sort=False):
            part.drop(columns=["split"]).to_parquet(tmp / f"{name}.parquet", index=False)
        write_json(tmp / "meta.json", meta)


def load_split(out_dir: Path, split: str) -> pd.DataFrame:
    """Read one split of a written training set."""
    path = out_dir / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `dvc repro build_dataset`")
    return pd.read_parquet(path)


def run(
    raw_dir: Path,
    out_dir: Path,
    feature_set: str,
    policy: BuildDatasetSettings,
    engine: str,
    spark_master: str = "local[*]",
) -> tuple[pd.DataFrame, dict[str, Any], FeatureSet]:
    """The ``build_dataset`` stage: raw events -> point-in-time training set in ``out_dir``.

    With engine ``spark`` the features are computed on a session on ``spark_master``
    (``features.spark_master``); the written files are identical to the other engines'.
    """
    fs = get_feature_set(feature_set)
    if engine == "spark":
        from pipelines.features.spark_engine import spark_session

        spark_session(spark_master)  # the active session the engine then uses
    table, meta = build_training_set(load_raw_events(raw_dir), fs, policy, engine)
    write_training_set(table, meta, out_dir)
    return table, meta, fs
