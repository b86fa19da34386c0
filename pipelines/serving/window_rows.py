"""The served rows of a request-log profile window, kept column-wise and written to parquet
a row group at a time while the window is open (see ``WindowRows``); ``profile_file`` is
the helper process's job on a closed window."""

from __future__ import annotations

import itertools
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
SAMPLE_KEY = "sample_key"  # a sampled window's column of row keys (uniform on [0, 1))
_SAMPLE_ROWS = b"profile_sample_rows"  # file metadata: the sample's size (0 = every row)
_WINDOW_ROWS = b"window_rows"  # file metadata: rows the window answered


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

    With ``sample_rows`` > 0 the window's profile describes a uniform sample of at most that
    many of its rows (bottom-k sampling): each row draws a key, and ``read_window`` keeps the
    ``sample_rows`` smallest. Each time it has kept twice that many rows under its limit, the
    window lowers the limit to the ``sample_rows``-th smallest key kept, and it keeps no row
    at or above the limit (none can be among them), so a window of N rows writes about
    ``sample_rows * (2 + log2(N / sample_rows))`` rows instead of N.
    """

    def __init__(self, sample_rows: int = 0, seed: int | None = None) -> None:
        self.sample_rows = sample_rows  # 0: every row
        self.answered = 0  # rows the window answered, kept or not
        self.limit = 1.0  # rows whose key is at or above it are not kept
        self.keys: list[np.ndarray] = []  # the waiting rows' keys (sampled windows)
        self._kept_keys: list[np.ndarray] = []  # keys below ``limit`` kept so far
        self._kept = 0
        self._rng = np.random.default_rng(seed)
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
        """Append the rows of one call (a ``request_log.LogBatch``); a sampled window keeps
        those whose key is below its limit."""
        n = len(batch.surfaces)
        self.answered += n
        keep: np.ndarray | None = None
        if self.sample_rows:
            keys = self._rng.random(n)
            keep = keys < self.limit
            if keep.all():
                keep = None
            else:
                keys = keys[keep]
            self.keys.append(keys)
            self._kept_keys.append(keys)
            self._kept += len(keys)
        if batch.features is not None and self.feature_names is None and not self.written:
            self.feature_names = list(batch.feature_names)
        same = batch.features is not None and list(batch.feature_names) == self.feature_names
        labels: list[Any] = [batch.surfaces, batch.devices, batch.routes]
        probability = np.asarray(batch.probability, dtype=np.float64)
        features = batch.features if same else None
        if keep is not None:
            labels = [list(itertools.compress(column, keep)) for column in labels]
            probability = probability[keep]
            features = None if features is None else features[keep]
        self.surfaces.extend(labels[0])
        self.devices.extend(labels[1])
        self.routes.extend(labels[2])
        self.probability.append(probability)
        self.features.append(len(probability) if features is None else features)
        if self._kept > 2 * self.sample_rows > 0:
            self._tighten()

    def _tighten(self) -> None:
        """Lower the limit to the ``sample_rows``-th smallest key kept so far (the rows at or
        above it already kept stay: ``read_window`` leaves them out)."""
        kept = np.concatenate(self._kept_keys)
        self.limit = float(np.partition(kept, self.sample_rows)[self.sample_rows])
        self._kept_keys = [kept[kept < self.limit]]
        self._kept = len(self._kept_keys[0])

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
        if self.sample_rows:
            columns[SAMPLE_KEY] = pa.array(np.concatenate(self.keys) if self.keys else np.empty(0))
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
        self.probability, self.features, self.keys = [], [], []
        if len(self._kept_keys) > 1:  # one array, not one per call, for the rest of the window
            self._kept_keys = [np.concatenate(self._kept_keys)]

    def finish(self, path: Path) -> None:
        """Write the rest and close ``path``: a complete parquet file of the window, whose
        metadata holds the rows it answered and the sample size."""
        self.spill(path)
        if self._writer is None:  # an empty window: no row group, its columns kept
            self._writer = pq.ParquetWriter(path, self.table().schema)
        self._writer.add_key_value_metadata(
            {_WINDOW_ROWS: str(self.answered), _SAMPLE_ROWS: str(self.sample_rows)}
        )
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


def read_window(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of a closed window its profile describes (a sampled window's ``sample_rows``
    smallest keys, in served order; without the key column) and its counts:
    ``window_rows`` answered, ``profiled_rows`` in the frame."""
    with pq.ParquetFile(path) as file:
        table = file.read()
        meta = file.metadata.metadata or {}  # the footer's key-value pairs (``finish``)
    k = int(meta.get(_SAMPLE_ROWS, b"0"))
    if SAMPLE_KEY in table.column_names:
        keys = table.column(SAMPLE_KEY).to_numpy()
        if k and len(keys) > k:
            table = table.take(np.sort(np.argpartition(keys, k)[:k]))
        table = table.drop_columns([SAMPLE_KEY])
    answered = int(meta.get(_WINDOW_ROWS, table.num_rows))
    return table.to_pandas(), {"window_rows": answered, "profiled_rows": table.num_rows}


def window_frame(batches: list[Any]) -> pd.DataFrame:
    """Served rows of a window with columns named like the training reference profile."""
    rows = WindowRows()
    for batch in batches:
        rows.add(batch)
    return rows.frame()


WINDOW_PREFIX = ".window-"  # a window waiting for its profile: .window-<stamp>-<worker>.parquet


def window_profile_path(frame_file: Path) -> Path:
    """Where the profile of a saved window goes: profile-<stamp>-<worker>.bin beside it."""
    stem = frame_file.name[len(WINDOW_PREFIX) :].removesuffix(".parquet")
    return frame_file.with_name(f"profile-{stem}.bin")


def profile_file(frame_file: Path) -> None:
    """Profile a saved window, write its profile, then remove the window (helper process).

    The helper holds a lock on the window while it works: another helper started for the
    same window (a recovery) leaves it alone, and a window whose profile was written is gone.
    """
    import fcntl

    try:
        handle = frame_file.open("rb")
    except FileNotFoundError:
        return  # profiled already
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another helper has it
        if not frame_file.exists():
            return
        from pipelines.core import profiles as wl

        try:
            frame, counts = read_window(frame_file)
            profile = wl.profile(frame, {k: str(v) for k, v in counts.items()})
            wl.write_profile(profile, window_profile_path(frame_file))
        except BaseException:
            # kept for a human (no longer pending): <window>.parquet.failed
            frame_file.rename(frame_file.with_name(frame_file.name + ".failed"))
            raise
        frame_file.unlink()
        frame_file.with_suffix(".err").unlink(missing_ok=True)  # this helper's stderr
