"""The served rows of a request-log profile window, kept column-wise (see ``WindowRows``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class WindowRows:
    """The served rows of the open profile window, kept column-wise.

    A handful of growing lists (strings and numpy arrays, which the garbage collector
    does not track) instead of one ``request_log.LogBatch`` per call, each about ten tracked
    containers: held for a whole window, those made every full collection scan
    hundreds of thousands of objects (pauses up to 384 ms at 300 calls/s;
    docs/serving.md, "Tail latency").
    """

    def __init__(self) -> None:
        self.surfaces: list[str] = []
        self.devices: list[str] = []
        self.routes: list[str] = []
        self.probability: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.feature_names: list[str] | None = None
        self.all_have_features = True

    def __len__(self) -> int:
        return len(self.surfaces)

    def add(self, batch: Any) -> None:
        """Append the rows of one call (a ``request_log.LogBatch``)."""
        self.surfaces.extend(batch.surfaces)
        self.devices.extend(batch.devices)
        self.routes.extend(batch.routes)
        self.probability.append(np.asarray(batch.probability, dtype=np.float64))
        if batch.features is None:
            self.all_have_features = False
        elif self.all_have_features:
            if self.feature_names is None:
                self.feature_names = list(batch.feature_names)
            self.features.append(batch.features)

    def frame(self) -> pd.DataFrame:
        """Served rows with columns named like the training reference profile."""
        frame = pd.DataFrame({"surface": self.surfaces, "device": self.devices})
        if self.all_have_features and self.features:
            X = np.concatenate(self.features)
            frame = pd.concat([frame, pd.DataFrame(X, columns=self.feature_names)], axis=1)
        frame["prediction"] = np.concatenate(self.probability) if self.probability else np.empty(0)
        frame["route"] = self.routes
        return frame

    def table(self) -> pa.Table:
        """``frame()`` as an Arrow table, built without pandas: what the writer thread hands
        to the profiling helper, while the worker serves (benchmarks/request_path.py,
        "profile-window handoff"). ``pd.read_parquet`` of it equals ``frame()``."""
        columns: dict[str, pa.Array] = {
            "surface": pa.array(self.surfaces, pa.large_string()),
            "device": pa.array(self.devices, pa.large_string()),
        }
        if self.all_have_features and self.features:
            X = np.concatenate(self.features)
            for j, name in enumerate(self.feature_names or []):
                columns[name] = pa.array(np.ascontiguousarray(X[:, j]))
        prediction = np.concatenate(self.probability) if self.probability else np.empty(0)
        columns["prediction"] = pa.array(prediction)
        columns["route"] = pa.array(self.routes, pa.large_string())
        return pa.table(columns)

    def write(self, path: Any) -> None:
        """Write the window's rows as parquet (``table()``)."""
        pq.write_table(self.table(), path)


def window_frame(batches: list[Any]) -> pd.DataFrame:
    """Served rows of a window with columns named like the training reference profile."""
    rows = WindowRows()
    for batch in batches:
        rows.add(batch)
    return rows.frame()
