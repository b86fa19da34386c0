"""The one place that imports whylogs.

whylogs 1.6.4 (its last release) still refers to ``np.unicode_``, removed in
NumPy 2; the shim below restores the alias before whylogs is imported. Keeping
every whylogs call here means the library can be replaced in one file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

if not hasattr(np, "unicode_"):
    np.unicode_ = np.str_  # type: ignore[attr-defined]  # shim for whylogs on NumPy 2

os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")

# whylogs imports scikit-learn only for its experimental embedding selectors (unused here):
# a process that has not loaded scikit-learn, such as the serving worker's profiling
# helper, imports whylogs without it, 0.9 s of CPU less; scikit-learn imports normally after.
_sklearn_absent = "sklearn" not in sys.modules
if _sklearn_absent:
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # whylogs falls back to stubs
try:
    import whylogs as why  # noqa: E402
    from whylogs.core import DatasetProfileView  # noqa: E402
finally:
    if _sklearn_absent:
        del sys.modules["sklearn"]


def profile(frame: pd.DataFrame, metadata: dict[str, str] | None = None) -> DatasetProfileView:
    """Profile a DataFrame (numeric sketches, frequent items, counts) and return its view,
    carrying ``metadata`` when given."""
    if metadata is None:
        return why.log(frame).view()
    from whylogs.core import DatasetProfile

    built = DatasetProfile(metadata=metadata)
    built.track(pandas=frame)
    return built.view()


def write_profile(view: DatasetProfileView, path: Path) -> None:
    """Write a profile view in whylogs' binary format, atomically."""
    from pipelines.core.io import atomic_path

    with atomic_path(path) as tmp:
        view.write(str(tmp))


def read_profile(path: Path) -> DatasetProfileView:
    """Read a profile view written by ``write_profile``."""
    return DatasetProfileView.read(str(path))


def profile_bytes(view: DatasetProfileView) -> bytes:
    """A profile view in whylogs' own binary format, in memory (to ship between processes)."""
    return bytes(view.serialize())


def profile_from_bytes(data: bytes) -> DatasetProfileView:
    """The profile view of ``profile_bytes``."""
    return DatasetProfileView.deserialize(data)


REFERENCE_FRAME = "reference.parquet"


def reference_profile(path: Path) -> DatasetProfileView:
    """The reference profile at ``path``, rebuilt from ``reference.parquet`` beside it if absent.

    The ``profile`` stage tracks the exact reference rows (deterministic) and keeps
    the randomised whylogs binary out of DVC, so a fresh checkout has only the rows.
    """
    if not path.is_file():
        source = path.with_name(REFERENCE_FRAME)
        if not source.is_file():
            raise FileNotFoundError(
                f"reference profile {path} is missing (and {source} too); run `dvc repro profile`"
            )
        write_profile(profile(pd.read_parquet(source)), path)
    return read_profile(path)


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


# --- Sketch access for drift (pipelines.monitoring.drift) --------------------------------------
#
# Drift is computed from profiles, not from raw rows, so it works on the reference
# profile written by the ``profile`` stage and on live profiles merged from many
# windows or workers. The classes below hand out plain numbers (quantiles, CDFs,
# category counts) so no other module touches whylogs or datasketches objects.


@dataclass(frozen=True)
class ColumnSketch:
    """One profiled column as drift sees it: its kind, its size and its distribution.

    ``kind`` is ``numeric`` (a KLL quantile sketch), ``categorical`` (strings: a
    frequent-items sketch) or ``empty`` (only nulls/NaN). ``count`` is the number
    of values the distribution describes; ``nulls`` counts null and NaN values.
    """

    name: str
    kind: Literal["numeric", "categorical", "empty"]
    count: int
    nulls: int
    rank_error: float  # the KLL sketch's normalized rank error (99% bound); 0 when exact
    _kll: Any = field(default=None, repr=False, compare=False)
    _items: tuple[tuple[str, int], ...] = field(default=(), repr=False, compare=False)

    def quantiles(self, ranks: Sequence[float]) -> np.ndarray:
        """Values at the given ranks (0..1) of a numeric column."""
        self._need_numeric()
        return np.asarray(self._kll.get_quantiles(list(ranks)), dtype=np.float64)

    def cdf(self, points: Sequence[float]) -> np.ndarray:
        """Share of values <= each point (points strictly increasing) of a numeric column."""
        self._need_numeric()
        if len(points) == 0:
            return np.empty(0)
        return np.asarray(self._kll.get_cdf(list(points), True)[:-1], dtype=np.float64)

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value seen by a numeric column."""
        self._need_numeric()
        return float(self._kll.get_min_value()), float(self._kll.get_max_value())

    def items(self) -> dict[str, int]:
        """Category -> estimated count of a categorical column (exact below ~1000 categories)."""
        if self.kind != "categorical":
            raise TypeError(f"column {self.name!r} is {self.kind}, not categorical")
        return dict(self._items)

    def _need_numeric(self) -> None:
        if self.kind != "numeric":
            raise TypeError(f"column {self.name!r} is {self.kind}, not numeric")


def column_sketches(view: DatasetProfileView) -> dict[str, ColumnSketch]:
    """Every column of a profile as a ``ColumnSketch``, keyed by column name."""
    from whylogs_sketching import frequent_items_error_type

    out: dict[str, ColumnSketch] = {}
    for name, column in view.get_columns().items():
        counts = column.get_metric("counts")
        types = column.get_metric("types")
        nulls = 0
        if counts is not None:
            summary = counts.to_summary_dict()
            nulls = int(summary.get("null", 0))  # whylogs counts NaN as null too
        is_string = types is not None and int(types.to_summary_dict().get("string", 0)) > 0
        dist = column.get_metric("distribution")
        kll = dist.kll.value if dist is not None else None
        if is_string:
            fi = column.get_metric("frequent_items")
            items: tuple[tuple[str, int], ...] = ()
            if fi is not None:
                raw = fi.frequent_strings.value.get_frequent_items(
                    frequent_items_error_type.NO_FALSE_NEGATIVES
                )
                items = tuple((str(value), int(est)) for value, est, _, _ in raw)
            total = int(types.to_summary_dict().get("string", 0))
            out[name] = ColumnSketch(name, "categorical", total, nulls, 0.0, None, items)
        elif kll is not None and not kll.is_empty():
            error = kll.normalized_rank_error(False) if kll.is_estimation_mode() else 0.0
            out[name] = ColumnSketch(name, "numeric", int(kll.get_n()), nulls, float(error), kll)
        else:
            out[name] = ColumnSketch(name, "empty", 0, nulls, 0.0)
    return out


def merge_profiles(views: Sequence[DatasetProfileView]) -> DatasetProfileView:
    """Merge profiles of several windows or workers into one (whylogs sketches merge exactly)."""
    if not views:
        raise ValueError("no profiles to merge")
    merged = views[0]
    for view in views[1:]:
        merged = merged.merge(view)
    return merged
