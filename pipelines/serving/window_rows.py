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


class _Buffer:
    """A float64 array that grows in place (capacity doubled when full): appending a call's
    rows copies them into it, so a window holds one array per column, not one per call."""

    def __init__(self, width: int | None = None) -> None:
        self.data = np.empty((1024,) if width is None else (1024, width))
        self.size = 0

    def _reserve(self, n: int) -> None:
        if self.size + n > len(self.data):
            grown = np.empty((max(2 * len(self.data), self.size + n), *self.data.shape[1:]))
            grown[: self.size] = self.data[: self.size]
            self.data = grown

    def extend(self, values: np.ndarray) -> None:
        self._reserve(len(values))
        self.data[self.size : self.size + len(values)] = values
        self.size += len(values)

    def fill(self, n: int, value: float) -> None:
        self._reserve(n)
        self.data[self.size : self.size + n] = value
        self.size += n

    def view(self) -> np.ndarray:
        return self.data[: self.size]

    def clear(self) -> None:
        self.size = 0


# Row groups are read back once, whole, by the profiling helper: no column statistics, and
# dictionary pages only for the label columns (on the float columns they cost a third of
# the write and saved a few percent).
_WRITE_OPTIONS: dict[str, Any] = {
    "use_dictionary": ["surface", "device", "route"],
    "write_statistics": False,
}


class WindowRows:
    """The served rows of the open profile window.

    Rows wait column-wise, in three lists of strings and growing float arrays
    (``_Buffer``: a call's rows are copied in), which the garbage collector does not track
    and ``spill`` turns into a row group without joining thousands of per-call pieces:
    holding one ``request_log.LogBatch`` per call made every full collection scan hundreds
    of thousands of objects (pauses up to 384 ms at 300 calls/s), and joining one small
    array per call held the GIL for tens of milliseconds at each row group of one-row
    calls (docs/serving.md, "Tail latency"). ``spill`` writes the waiting rows to a parquet
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
        self._keys = _Buffer()  # the waiting rows' keys (sampled windows)
        self._kept_keys = _Buffer()  # keys below ``limit`` kept so far
        self._rng = np.random.default_rng(seed)
        self.surfaces: list[str] = []
        self.devices: list[str] = []
        self.routes: list[str] = []
        self._probability = _Buffer()
        self._features: _Buffer | None = None  # once the feature names are known
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
            self._keys.extend(keys)
            self._kept_keys.extend(keys)
        if batch.features is not None and self.feature_names is None and not self.written:
            self.feature_names = list(batch.feature_names)
            self._features = _Buffer(len(self.feature_names))
            self._features.fill(self.waiting, np.nan)  # the rows before, without vectors
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
        self._probability.extend(probability)
        if self._features is not None:
            if features is None:
                self._features.fill(len(probability), np.nan)
            else:
                self._features.extend(features)
        if self._kept_keys.size > 2 * self.sample_rows > 0:
            self._tighten()

    def _tighten(self) -> None:
        """Lower the limit to the ``sample_rows``-th smallest key kept so far (the rows at or
        above it already kept stay: ``read_window`` leaves them out)."""
        kept = self._kept_keys.view()
        self.limit = float(np.partition(kept, self.sample_rows)[self.sample_rows])
        below = kept[kept < self.limit]  # a copy: the buffer is refilled with it
        self._kept_keys.clear()
        self._kept_keys.extend(below)

    def table(self) -> pa.Table:
        """The waiting rows as an Arrow table, built without pandas: columns named like the
        training reference profile (surface, device, features, prediction, route). Its
        arrays are copies: the buffers are reused after a spill."""
        columns: dict[str, pa.Array] = {
            "surface": pa.array(self.surfaces, pa.large_string()),
            "device": pa.array(self.devices, pa.large_string()),
        }
        if self.feature_names and self._features is not None:
            X = self._features.view()
            for j, name in enumerate(self.feature_names):
                columns[name] = pa.array(np.array(X[:, j]))
        columns["prediction"] = pa.array(np.array(self._probability.view()))
        columns["route"] = pa.array(self.routes, pa.large_string())
        if self.sample_rows:
            columns[SAMPLE_KEY] = pa.array(np.array(self._keys.view()))
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
            self._writer = pq.ParquetWriter(path, table.schema, **_WRITE_OPTIONS)
        self._writer.write_table(table)
        self.written += len(self.surfaces)
        self.surfaces, self.devices, self.routes = [], [], []
        for buffer in (self._probability, self._keys, self._features):
            if buffer is not None:
                buffer.clear()

    def finish(self, path: Path) -> None:
        """Write the rest and close ``path``: a complete parquet file of the window, whose
        metadata holds the rows it answered and the sample size."""
        self.spill(path)
        if self._writer is None:  # an empty window: no row group, its columns kept
            self._writer = pq.ParquetWriter(path, self.table().schema, **_WRITE_OPTIONS)
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
