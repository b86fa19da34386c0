"""Vocabulary codes of request-time keys (user, item, surface ids) by one compiled pass over
their UTF-8 bytes: an open-addressing table of the vocabulary, built once, probed by a
numba kernel instead of a dict lookup per key (``EventIndex.entity_codes``; docs/serving.md,
"Entity codes").
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.features.search import compile_kernel

_NEWLINE = 10


# Positions are unsigned throughout: numba then checks no index for wraparound.
_ONE = np.uint64(1)


@compile_kernel(nogil=False)
def _hash(data: np.ndarray, start: np.uint64, end: np.uint64) -> np.uint64:
    """FNV-1a of ``data[start:end]``, its high bits folded onto the low ones."""
    h = np.uint64(14695981039346656037)
    k = start
    while k < end:
        h = (h ^ np.uint64(data[k])) * np.uint64(1099511628211)
        k += _ONE
    return h ^ (h >> np.uint64(29))


@compile_kernel(nogil=False)
def _same(
    a: np.ndarray, a0: np.uint64, a1: np.uint64, b: np.ndarray, b0: np.uint64, b1: np.uint64
) -> bool:
    if a1 - a0 != b1 - b0:
        return False
    while a0 < a1:
        if a[a0] != b[b0]:
            return False
        a0 += _ONE
        b0 += _ONE
    return True


@compile_kernel(nogil=False)
def _entry(ends: np.ndarray, code: np.int64) -> tuple[np.uint64, np.uint64]:
    """Where vocabulary entry ``code`` lies in the blob."""
    first = np.uint64(0) if code == 0 else np.uint64(ends[np.uint64(code - 1)])
    return first, np.uint64(ends[np.uint64(code)])


@compile_kernel(nogil=False)
def _probe(
    data: np.ndarray,
    start: np.uint64,
    end: np.uint64,
    blob: np.ndarray,
    ends: np.ndarray,
    slots: np.ndarray,
    pos: np.uint64,
) -> np.uint64:
    """The slot of key ``data[start:end]`` probing from slot ``pos``: the slot holding its
    code, or the empty slot (-1) where it would go."""
    mask = np.uint64(len(slots) - 1)
    while True:
        code = np.int64(slots[pos])
        if code < 0:
            return pos
        c0, c1 = _entry(ends, code)
        if _same(blob, c0, c1, data, start, end):
            return pos
        pos = (pos + _ONE) & mask


@compile_kernel(nogil=False)
def _fill(blob: np.ndarray, ends: np.ndarray, slots: np.ndarray) -> None:
    """Place each vocabulary entry ``blob[ends[i-1]:ends[i]]`` (code ``i``); a repeated entry
    takes the later code, as a dict built from the same pairs would."""
    mask = np.uint64(len(slots) - 1)
    start = np.uint64(0)
    for i in range(len(ends)):
        end = np.uint64(ends[i])
        slots[_probe(blob, start, end, blob, ends, slots, _hash(blob, start, end) & mask)] = i
        start = end


@compile_kernel(nogil=False)
def _lookup(
    data: np.ndarray, blob: np.ndarray, ends: np.ndarray, slots: np.ndarray, out: np.ndarray
) -> None:
    """``out[i]``: the code of the ``i``-th newline-separated key of ``data``, -1 if unknown.

    In passes (hash every key, read every first slot, read every slot's entry, compare),
    so that the cache misses of one pass are independent loads the CPU overlaps: about
    twice as fast as one key at a time when the table is out of cache (docs/serving.md)."""
    n = len(out)
    mask = np.uint64(len(slots) - 1)
    size = np.uint64(len(data))
    starts = np.empty(n, np.uint64)
    stops = np.empty(n, np.uint64)
    pos = np.empty(n, np.uint64)
    start = np.uint64(0)
    for i in range(n):
        end = start
        while end < size and data[end] != _NEWLINE:
            end += _ONE
        starts[i], stops[i] = start, end
        pos[i] = _hash(data, start, end) & mask
        start = end + _ONE
    for i in range(n):
        out[i] = slots[pos[i]]
    first = np.zeros(n, np.uint64)
    last = np.zeros(n, np.uint64)
    for i in range(n):
        if out[i] >= 0:
            first[i], last[i] = _entry(ends, out[i])
    for i in range(n):
        if out[i] >= 0 and not _same(blob, first[i], last[i], data, starts[i], stops[i]):
            at = _probe(data, starts[i], stops[i], blob, ends, slots, (pos[i] + _ONE) & mask)
            out[i] = slots[at]


class KeyCodes:
    """The codes of a vocabulary of strings (its positions), looked up a column at a time."""

    def __init__(self, vocabulary: Sequence[str]) -> None:
        encoded = [v.encode("utf-8", "surrogatepass") for v in vocabulary]
        self._blob = np.frombuffer(b"".join(encoded) or b"\0", np.uint8)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        self._slots = np.full(1 << max(4, (2 * len(encoded)).bit_length()), -1, np.int32)
        _fill(self._blob, self._ends, self._slots)

    def codes(self, keys: list[str]) -> np.ndarray | None:
        """Each key's code (-1 for one not in the vocabulary); None when a key holds a
        newline or cannot be encoded (the caller looks those up otherwise)."""
        n = len(keys)
        try:
            joined = "\n".join(keys)
        except TypeError:  # not all strings
            return None
        if n == 0 or joined.count("\n") != n - 1:
            return None
        try:
            data = np.frombuffer(joined.encode("utf-8"), np.uint8)
        except UnicodeEncodeError:  # a lone surrogate: not a key any request can send
            return None
        out = np.empty(n, np.int64)
        _lookup(data, self._blob, self._ends, self._slots, out)
        return out


class Vocabulary:
    """The codes of a vocabulary's values (their positions, -1 for others) for request-time
    keys: ``KeyCodes`` for many string keys, a dict lookup per key for one key, for keys
    the table leaves, and for a vocabulary that is not all strings. Both are built on
    first use."""

    def __init__(self, values: Sequence[Any]) -> None:
        self._values = list(values)
        self._table: KeyCodes | None = None
        self._dict: dict[Any, int] | None = None
        self._strings = all(isinstance(v, str) for v in self._values)

    def codes(self, keys: Sequence[Any]) -> np.ndarray:
        """Each key's code, -1 for a key not in the vocabulary."""
        keys = keys if isinstance(keys, list) else list(keys)
        if len(keys) > 1 and self._strings:
            if self._table is None:
                self._table = KeyCodes(self._values)
            found = self._table.codes(keys)
            if found is not None:
                return found
        if self._dict is None:  # the later of repeated values wins, as in the table
            self._dict = dict(zip(self._values, range(len(self._values)), strict=True))
        get = self._dict.get
        return np.fromiter(map(get, keys, itertools.repeat(-1, len(keys))), np.int64, len(keys))


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, so that no request waits."""
    KeyCodes(["a", "b"]).codes(["b", "c"])
