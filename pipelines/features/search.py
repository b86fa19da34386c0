"""Point-in-time searches of ``evaluate``, compiled by numba: each query searches only its
entity's events, and a window's start is found by galloping back from the query time.
The feature values are computed from the searches' results by two more kernels
(``derive``, ``assemble``), one pass over the rows instead of a numpy call per feature.

The results equal ``np.searchsorted`` on the whole sorted array clipped to the entity's
slice (tests check it); why this layout is faster is in docs/serving.md. numba compiles
the kernels once per process and caches the machine code beside this file (``__pycache__``)
or in its user cache; where neither is writable it compiles in memory instead.
Smaller calls keep the GIL (``RELEASE_GIL_QUERIES``; docs/serving.md, "Tail latency").
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import os
from collections.abc import Hashable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
from numba import njit

# A call of at least this many queries runs without the GIL (the event loop goes on
# meanwhile); a smaller one keeps it, as the compiled trees do for as few rows: it takes
# microseconds, and taking the GIL back from a busy thread can take up to the 5 ms switch
# interval.
RELEASE_GIL_QUERIES = 64
# A call of at least this many queries, made where a core is idle (``spare_core``), runs
# about half of its searches on a helper thread (docs/serving.md, "Performance").
SPLIT_QUERIES = 512
_SPARE_CORE: contextvars.ContextVar[bool] = contextvars.ContextVar("spare_core", default=False)
_helper: cf.ThreadPoolExecutor | None = None
HELPER_THREAD = "spare-core"  # the helper thread's name prefix


def helper() -> cf.ThreadPoolExecutor:
    """The process's thread for the second half of a split call (these searches, the
    compiled trees), made on first use. A call splits only where a core is idle, so one
    thread serves both: they never run at once."""
    global _helper  # noqa: PLW0603 - the process's helper, made once
    if _helper is None:
        _helper = cf.ThreadPoolExecutor(1, thread_name_prefix=HELPER_THREAD)
    return _helper


def _forget_helper() -> None:
    """In a forked child: the helper's thread did not come along, so make a new one."""
    global _helper  # noqa: PLW0603 - the process's helper, rebound whole
    _helper = None


os.register_at_fork(after_in_child=_forget_helper)


def compile_kernel(nogil: bool) -> Any:
    """numba's ``njit`` (``nogil``: the kernel runs without the GIL), cached as the module
    docstring says."""

    def compiled(fn: Any) -> Any:
        try:
            return njit(nogil=nogil, cache=True)(fn)
        except RuntimeError:  # numba found no writable cache location: compile in memory
            return njit(nogil=nogil)(fn)

    return compiled


Located = tuple[np.ndarray, np.ndarray, np.ndarray]
Search = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]
K = TypeVar("K", bound=Hashable)


@contextlib.contextmanager
def spare_core(idle: bool = True) -> Iterator[None]:
    """Within it, in this thread, a large call may split onto ``helper()`` (``locate_all``,
    ``CompiledModel.predict``): the caller knows a core is idle (the Predictor: at most one
    other call in its worker)."""
    token = _SPARE_CORE.set(idle)
    try:
        yield
    finally:
        _SPARE_CORE.reset(token)


def core_is_spare() -> bool:
    """Whether this thread runs inside ``spare_core``."""
    return _SPARE_CORE.get()


def locate_all(searches: Mapping[K, Search]) -> dict[K, Located]:
    """``locate`` of each search (arguments in ``locate``'s order). Under ``spare_core``,
    with ``SPLIT_QUERIES`` queries or more, about half of the work runs on a helper thread
    meanwhile: the kernels let go of the GIL, so the two halves run on two cores."""
    keys = list(searches)
    n = len(searches[keys[0]][2]) if keys else 0
    if len(keys) < 2 or n < SPLIT_QUERIES or not core_is_spare():
        return {key: locate(*searches[key]) for key in keys}
    # Longest first to the lighter side; a query's cost: a binary search per window and
    # one for its time, each about log2 of the array's length.
    cost = {k: (1 + len(s[4])) * np.log2(len(s[0]) + 2) for k, s in searches.items()}
    mine: list[K] = []
    theirs: list[K] = []
    load = [0.0, 0.0]
    for key in sorted(keys, key=cost.__getitem__, reverse=True):
        side = 0 if load[0] <= load[1] else 1
        (mine, theirs)[side].append(key)
        load[side] += cost[key]
    later = helper().submit(lambda: [locate(*searches[key]) for key in theirs])
    out = {key: locate(*searches[key]) for key in mine}
    out.update(zip(theirs, later.result(), strict=True))
    return {key: out[key] for key in keys}


def locate(
    arr: np.ndarray,
    starts: np.ndarray,
    codes: np.ndarray,
    t_rel: np.ndarray,
    windows: np.ndarray,
    stride: int,
) -> Located:
    """Where each query's events lie in ``arr`` (composite ``code * stride + time``, sorted).

    Per query i of entity code ``codes[i]`` at relative time ``t_rel[i]``: ``lo[i]``, the
    start of the entity's events; ``hi[i]``, its first event at or after the time (events
    before it count); ``first[i, k]``, its first event after ``t_rel[i] - windows[k]`` (the
    window holds ``hi - first``). An unknown entity (code -1) gets an empty slice.
    """
    kernel = _locate_released if len(codes) >= RELEASE_GIL_QUERIES else _locate_held
    return kernel(arr, starts, codes, t_rel, windows, stride)  # type: ignore[no-any-return]


@compile_kernel(nogil=False)
def _search(
    arr: np.ndarray,
    starts: np.ndarray,
    codes: np.ndarray,
    t_rel: np.ndarray,
    windows: np.ndarray,
    stride: int,
) -> Located:
    n, n_windows = len(codes), len(windows)
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    first = np.empty((n, n_windows), np.int64)
    for i in range(n):
        code = codes[i]
        if code < 0:
            lo[i] = hi[i] = starts[0]
            first[i, :] = starts[0]
            continue
        base = code * stride
        floor, a, b = starts[code], starts[code], starts[code + 1]
        key = base + t_rel[i]
        while a < b:  # binary search of [start, end): first event >= the query time
            m = (a + b) >> 1
            if arr[m] < key:
                a = m + 1
            else:
                b = m
        lo[i], hi[i] = floor, a
        for k in range(n_windows):
            key = base + max(t_rel[i] - windows[k], -1)
            b, step = hi[i], 1
            while True:  # doubling steps back from hi: the answer lies in [a, b]
                a = b - step
                if a <= floor:
                    a = floor
                    break
                if arr[a] <= key:
                    a += 1
                    break
                b, step = a, step * 2
            while a < b:  # first event > key
                m = (a + b) >> 1
                if arr[m] <= key:
                    a = m + 1
                else:
                    b = m
            first[i, k] = a
    return lo, hi, first


# Two entry points with their own names, so numba caches each one's machine code apart.
@compile_kernel(nogil=True)
def _locate_released(*args: Any) -> Located:
    return _search(*args)  # type: ignore[no-any-return]


@compile_kernel(nogil=False)
def _locate_held(*args: Any) -> Located:
    return _search(*args)  # type: ignore[no-any-return]


KERNELS = (_locate_held, _locate_released)

# The aggregations ``assemble`` computes (a row of ``spec``: column, aggregation, count
# columns a and b, latest-event columns a and b, ttl; -1 where unused).
COUNT, CTR, SECONDS_SINCE = 0, 1, 2


@compile_kernel(nogil=False)
def derive(
    arr: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    first: np.ndarray,
    codes: np.ndarray,
    pruned: np.ndarray,
    stride: int,
    no_event: int,
    counts: np.ndarray,
    count_cols: np.ndarray,
    all_col: int,
    lasts: np.ndarray,
    last_col: int,
) -> None:
    """From one (entity, source)'s ``locate`` results, per query: its events in window k
    (``hi - first[:, k]``) into ``counts[:, count_cols[k]]``; over all history (``hi - lo``
    plus the entity's ``pruned`` count, if any) into ``counts[:, all_col]``; the time of
    its latest event before the query (or ``no_event``) into ``lasts[:, last_col]``. A
    column of -1 is not wanted."""
    for i in range(len(hi)):
        for k in range(len(count_cols)):
            counts[i, count_cols[k]] = hi[i] - first[i, k]
        if all_col >= 0:
            total = hi[i] - lo[i]
            if len(pruned) > 0 and codes[i] >= 0:
                total += pruned[codes[i]]
            counts[i, all_col] = total
        if last_col >= 0:
            if hi[i] > lo[i]:
                lasts[i, last_col] = arr[hi[i] - 1] - max(codes[i], 0) * stride
            else:
                lasts[i, last_col] = no_event


@compile_kernel(nogil=False)
def assemble(
    out: np.ndarray,
    spec: np.ndarray,
    defaults: np.ndarray,
    counts: np.ndarray,
    lasts: np.ndarray,
    t_rel: np.ndarray,
    prior_clicks: float,
    prior_strength: float,
) -> None:
    """Each feature column of ``spec`` from ``derive``'s counts and latest times: a count;
    a CTR (clicks capped at impressions, smoothed); seconds since the latest event; the
    feature's default where its window holds no event or its latest event is past the ttl.
    The same arithmetic, in the same order, as numpy's on whole columns."""
    for f in range(spec.shape[0]):
        j, agg, a, b = spec[f, 0], spec[f, 1], spec[f, 2], spec[f, 3]
        la, lb, ttl = spec[f, 4], spec[f, 5], spec[f, 6]
        default = defaults[f]
        for i in range(len(t_rel)):
            ca = counts[i, a]
            empty = ca == 0
            if agg == CTR:  # a: impressions, b: clicks
                # Clicks count at click time, so a window can hold clicks of impressions
                # older than the window: capped at the window's impressions, CTR <= 1.
                cb = counts[i, b]
                empty = empty and cb == 0
                value = (min(cb, ca) + prior_clicks) / (ca + prior_strength)
            elif agg == SECONDS_SINCE:
                value = (t_rel[i] - lasts[i, la]) / 1000.0
            else:
                value = float(ca)
            if ttl >= 0:
                last = lasts[i, la] if lb < 0 else max(lasts[i, la], lasts[i, lb])
                empty = empty or t_rel[i] - last >= ttl
            out[i, j] = default if empty else value


def warm_up() -> None:
    """Compile (or load from the cache) every kernel now, so that no request waits for them."""
    one = np.zeros(1, np.int64)
    for kernel in KERNELS:
        kernel(one, np.zeros(2, np.int64), one, one, one, 1)
    grid = np.zeros((1, 1), np.int64)
    derive(one, one, one, grid, one, one, 1, 0, grid, one, 0, grid, 0)
    spec = np.zeros((1, 7), np.int64)
    assemble(np.zeros((1, 1)), spec, np.zeros(1), grid, grid, one, 0.0, 1.0)
