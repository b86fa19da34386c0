"""``search.locate`` as ``evaluate`` computed it before: whole-array ``np.searchsorted``.

The reference of ``tests/test_features.py`` and the "before" row of
``benchmarks/request_path.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def whole_array_locate(*args: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``locate(arr, starts, codes, t_rel, windows, stride)`` by ``np.searchsorted`` over the
    whole sorted array (queries visited in sorted order), one search per window, clipped to
    the entity's slice; an unknown entity (code -1) gets an empty slice."""
    arr, starts, codes, t_rel, windows, stride = args
    safe = np.maximum(codes, 0)
    base = safe * stride
    lo = starts[safe]
    keys = base + t_rel
    order = np.argsort(keys, kind="stable")
    hi = np.empty(len(codes), np.int64)
    hi[order] = np.searchsorted(arr, keys[order], side="left")
    hi = np.where(codes >= 0, hi, lo)
    first = np.empty((len(codes), len(windows)), np.int64)
    for k, window in enumerate(windows):
        found = np.empty(len(codes), np.int64)
        found[order] = np.searchsorted(arr, (base + np.maximum(t_rel - window, -1))[order], "right")
        first[:, k] = np.clip(found, lo, hi)
    return lo, hi, first
