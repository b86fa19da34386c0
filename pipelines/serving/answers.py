"""A batch's answer as one JSON array of objects, assembled by one compiled pass from the
call's columns, each encoded once by orjson, and the pieces every row shares
(``Predictor._answers_json``; docs/serving.md, "Batch answers").
"""

from __future__ import annotations

import numpy as np
import orjson

from pipelines.features.search import compile_kernel

_COMMA = 44


def column_json(values: object) -> bytes:
    """orjson's encoding of a column (a list, or a numpy array: NaN as null)."""
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)


@compile_kernel(nogil=False)
def _assemble(
    shared: np.ndarray,
    shared_ends: np.ndarray,
    values: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out`` = ``[`` row 0 ``,`` row 1 ... ``]``; row ``i`` is shared piece 0, value
    ``(0, i)``, shared piece 1, value ``(1, i)`` ... the last shared piece. Unsigned
    positions: numba then checks no index for wraparound (three times faster)."""
    one = np.uint64(1)
    out[0] = 91  # '['
    pos = one
    columns, n = starts.shape
    for i in range(n):
        if i:
            out[pos] = _COMMA
            pos += one
        first = np.uint64(0)
        for k in range(columns + 1):
            last = np.uint64(shared_ends[k])
            b = first
            while b < last:
                out[pos] = shared[b]
                pos += one
                b += one
            first = last
            if k < columns:
                b, end = np.uint64(starts[k, i]), np.uint64(ends[k, i])
                while b < end:
                    out[pos] = values[b]
                    pos += one
                    b += one
    out[pos] = 93  # ']'


def join_rows(shared: list[bytes], columns: list[bytes], n: int) -> bytes | None:
    """The array of ``n`` objects whose row ``i`` is ``shared[0] + v0[i] + shared[1] + ...
    + shared[-1]``, ``vk`` being the values of the encoded JSON array ``columns[k]``; None
    when a column is not ``n`` values free of commas (numbers, null, booleans, ids)."""
    assert len(shared) == len(columns) + 1
    if n == 0:
        return b"[]"
    inner = [memoryview(c)[1:-1] for c in columns]
    values = np.frombuffer(b"".join(inner), np.uint8)
    starts = np.empty((len(columns), n), np.int64)
    ends = np.empty((len(columns), n), np.int64)
    offset = 0
    for k, part in enumerate(inner):
        size = len(part)
        commas = np.flatnonzero(values[offset : offset + size] == _COMMA) + offset
        if len(commas) != n - 1 or (n == 1 and size == 0):
            return None
        starts[k, 0], starts[k, 1:] = offset, commas + 1
        ends[k, :-1], ends[k, -1] = commas, offset + size
        offset += size
    pieces = np.frombuffer(b"".join(shared), np.uint8)
    shared_ends = np.cumsum(np.fromiter(map(len, shared), np.int64, len(shared)))
    size = 2 + (n - 1) + n * len(pieces) + len(values) - (n - 1) * len(columns)  # no commas
    out = np.empty(size, np.uint8)
    _assemble(pieces, shared_ends, values, starts, ends, out)
    return out.tobytes()


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, so that no request waits."""
    join_rows([b"{", b"}"], [b"[1,2]"], 2)
