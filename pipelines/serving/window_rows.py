"""The served rows of a request-log profile window, kept column-wise and written to parquet
a row group at a time while the window is open (see ``WindowRows``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Rows converted and written per row group while the window is open: a few milliseconds of
# the writer thread each, instead of one burst of seconds when a large window closes
# (benchmarks/request_path.py, "profile-window handoff"; docs/serving.md, "Tail latency").
SPILL_ROWS = 16_384
PART_SUFFIX = ".part"  # an open window's row groups, renamed to .parquet when it closes


class WindowRows:
    """The served rows of the open profile window.

    Rows wait in a handful of growing lists (strings and numpy arrays, which the garbage
    collector does not track) instead of one ``request_log.LogBatch`` per call: held for a
    whole window, those made every full collection scan hundreds of thousands of objects
    (pauses up to 384 ms at 300 calls/s). ``spill`` writes the waiting rows to a parquet
    file as one row group, so a window never holds more than about ``SPILL_ROWS`` rows and
    closing it only writes the rest and the footer.

    The feature columns are those of the first call with feature vectors (fixed once a row
    group is written); rows served without them (a feature-store outage) or with other
    names (a release changed mid-window) have NaN there.
    """

    def __init__(self) -> None:
        self.surfaces: list[str] = []
        self.devices: list[str] = []
        self.routes: list[str] = []
        self.probability: list[np.ndarray] = []
        self.features: list[np.ndarray | int] = []  # a call's matrix, or its row count
        self.feature_names: list[str] | None = None
        self.written = 0  # rows already in row groups
        self._writer: pq.ParquetWriter | None = None

    def __len__(self) -> int:
        return self.written + len(self.surfaces)

    @property
    def waiting(self) -> int:
        """Rows not yet written to a row group."""
        return len(self.surfaces)

    def add(self, batch: Any) -> None:
        """Append the rows of one call (a ``request_log.LogBatch``)."""
        self.surfaces.extend(batch.surfaces)
        self.devices.extend(batch.devices)
        self.routes.extend(batch.routes)
        self.probability.append(np.asarray(batch.probability, dtype=np.float64))
        if batch.features is not None and self.feature_names is None and not self.written:
            self.feature_names = list(batch.feature_names)
        same = batch.features is not None and list(batch.feature_names) == self.feature_names
        self.features.append(batch.features if same else len(batch.surfaces))

    def table(self) -> pa.Table:
        """The waiting rows as an Arrow table, built without pandas: columns named like the
        training reference profile (surface, device, features, prediction, route)."""
        columns: dict[str, pa.Array] = {
            "surface": pa.array(self.surfaces, pa.large_string()),
            "device": pa.array(self.devices, pa.large_string()),
        }
        if self.feature_names:
            parts = [
                np.full((f, len(self.feature_names)), np.nan) if isinstance(f, int) else f
                for f in self.features
            ]
            X = np.concatenate(parts) if parts else np.empty((0, len(self.feature_names)))
            for j, name in enumerate(self.feature_names):
                columns[name] = pa.array(np.ascontiguousarray(X[:, j], dtype=np.float64))
        prediction = np.concatenate(self.probability) if self.probability else np.empty(0)
        columns["prediction"] = pa.array(prediction)
        columns["route"] = pa.array(self.routes, pa.large_string())
        return pa.table(columns)

    def frame(self) -> pd.DataFrame:
        """The waiting rows as the profiling helper reads them back (``table()``)."""
        return self.table().to_pandas()

    def spill(self, path: Path) -> None:
        """Write the waiting rows to ``path`` as one row group (the first call creates it)."""
        if not self.surfaces:
            return
        table = self.table()
        if self._writer is None:
            self._writer = pq.ParquetWriter(path, table.schema)
        self._writer.write_table(table)
        self.written += len(self.surfaces)
        self.surfaces, self.devices, self.routes = [], [], []
        self.probability, self.features = [], []

    def finish(self, path: Path) -> None:
        """Write the rest and close ``path``: a complete parquet file of the window."""
        if self._writer is None and not self.surfaces:
            pq.write_table(self.table(), path)  # an empty window keeps its columns
            return
        self.spill(path)
        self.abandon()

    def abandon(self) -> None:
        """Close the file without more rows (after a failed write: the caller removes it)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def remove_stale_parts(folder: Path, pattern: str, older_than_s: float) -> None:
    """Remove the row groups of windows whose writer died (no footer: unreadable) once no
    live writer can still own them (untouched for ``older_than_s``); their rows are in the
    request log."""
    too_old = time.time() - older_than_s
    for part in folder.glob(pattern):
        try:
            if part.stat().st_mtime < too_old:
                part.unlink()
        except FileNotFoundError:
            pass


def window_frame(batches: list[Any]) -> pd.DataFrame:
    """Served rows of a window with columns named like the training reference profile."""
    rows = WindowRows()
    for batch in batches:
        rows.add(batch)
    return rows.frame()
