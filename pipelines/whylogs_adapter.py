"""The one place that imports whylogs.

whylogs 1.6.4 (its last release) still refers to ``np.unicode_``, removed in
NumPy 2; the shim below restores the alias before whylogs is imported. Keeping
every whylogs call here means the library can be replaced in one file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

if not hasattr(np, "unicode_"):
    np.unicode_ = np.str_  # type: ignore[attr-defined]  # shim for whylogs on NumPy 2

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")

import whylogs as why  # noqa: E402
from whylogs.core import DatasetProfileView  # noqa: E402


def profile(frame: pd.DataFrame) -> DatasetProfileView:
    """Profile a DataFrame (numeric sketches, frequent items, counts) and return its view."""
    return why.log(frame).view()


def write_profile(view: DatasetProfileView, path: Path) -> None:
    """Write a profile view in whylogs' binary format, atomically."""
    from pipelines.io import atomic_path

    with atomic_path(path) as tmp:
        view.write(str(tmp))


def read_profile(path: Path) -> DatasetProfileView:
    """Read a profile view written by ``write_profile``."""
    return DatasetProfileView.read(str(path))


def summary(view: DatasetProfileView) -> pd.DataFrame:
    """Per-column summary statistics (count, mean, stddev, quantiles, nulls)."""
    table = view.to_pandas()
    wanted = [
        "counts/n",
        "counts/null",
        "distribution/mean",
        "distribution/stddev",
        "distribution/min",
        "distribution/q_25",
        "distribution/median",
        "distribution/q_75",
        "distribution/max",
        "cardinality/est",
    ]
    return table[[c for c in wanted if c in table.columns]]
