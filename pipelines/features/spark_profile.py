"""The whylogs reference profile of a Spark DataFrame, built partition by partition.

Each partition (or each group, e.g. each day) is profiled on its executor with the
adapter's ``profiles.profile``, shipped to the driver in whylogs' binary format and
merged with ``profiles.merge_profiles``. whylogs is imported on the executors only
when a partition is profiled (through the adapter, which holds the NumPy 2 shim).

Details: docs/feature_store.md ("Scaling out", "Reference profile on a cluster").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover - types only; pyspark and whylogs load at run time
    from pyspark.sql import Column, DataFrame
    from whylogs.core import DatasetProfileView

PROFILE_SCHEMA = "profile BINARY"


def _profile_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """One serialized profile per partition: its Arrow batches profiled and merged."""
    from pipelines.core import profiles

    merged = None
    for batch in batches:
        if len(batch) == 0:
            continue
        view = profiles.profile(batch)
        merged = view if merged is None else profiles.merge_profiles([merged, view])
    if merged is not None:
        yield pd.DataFrame({"profile": [profiles.profile_bytes(merged)]})


def _profile_group(group: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One serialized profile of one group (``applyInPandas``)."""
    from pipelines.core import profiles

    return pd.DataFrame({"profile": [profiles.profile_bytes(profiles.profile(group[columns]))]})


def partition_profiles(
    frame: DataFrame,
    by: str | Column | None = None,
    columns: Sequence[str] | None = None,
) -> list[bytes]:
    """Serialized whylogs profiles of ``frame``: one per partition, or one per ``by`` group.

    ``columns`` (default: all) are profiled; ``by`` may be a column outside them (for
    example ``F.to_date("ts")`` to profile each day of a frame whose ``ts`` is not profiled).
    """
    names = list(columns) if columns is not None else list(frame.columns)
    if by is None:
        rows = frame.select(*names).mapInPandas(_profile_partition, PROFILE_SCHEMA).collect()
    else:

        def one_group(group: pd.DataFrame) -> pd.DataFrame:
            return _profile_group(group, names)

        grouped = frame.groupBy(by)
        rows = grouped.applyInPandas(one_group, PROFILE_SCHEMA).collect()
    return [bytes(row["profile"]) for row in rows]


def spark_profile(
    frame: DataFrame,
    by: str | Column | None = None,
    columns: Sequence[str] | None = None,
) -> DatasetProfileView:
    """The whylogs profile of a Spark DataFrame, merged from per-partition profiles.

    Counts, nulls, types, min/max and frequent items (below the sketch's capacity)
    equal ``profiles.profile`` of the same rows in one frame; quantiles agree within
    the KLL sketch's rank error. An empty frame gives the empty profile of its columns.
    """
    from pipelines.core import profiles

    names = list(columns) if columns is not None else list(frame.columns)
    parts = partition_profiles(frame, by, names)
    if not parts:
        empty: Any = frame.select(*names).limit(0).toPandas()
        return profiles.profile(empty)
    return profiles.merge_profiles([profiles.profile_from_bytes(p) for p in parts])
