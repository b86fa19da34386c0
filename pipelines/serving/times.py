"""ISO 8601 request times read into epoch milliseconds by one compiled pass over their
characters (``/predict_batch``'s rows; docs/serving.md, "Batch rows").

``read_times`` takes one layout: date, 'T' (or 't', ' ', '_', as pydantic takes), time to
the second, 1-9 digits of fraction (pydantic keeps the first 6: microseconds), then nothing
(UTC), 'Z' ('z') or an offset in hours and minutes. Each time it takes has the value
pydantic gives it; any other text makes it answer None, and the rows are then validated
one ``PredictRequest`` at a time, which reports the error.
"""

from __future__ import annotations

import numpy as np

from pipelines.features.search import compile_kernel
from pipelines.serving.request_log import REQUEST_TIME_MAX_MS, REQUEST_TIME_MIN_MS


def read_times(stamps: list[str]) -> np.ndarray | None:
    """Epoch ms of ISO 8601 times (floored, as ``schema.epoch_ms``); None unless every one
    has the layout above and is a valid time in the storable range."""
    n = len(stamps)
    try:
        chars = np.frombuffer("".join(stamps).encode("ascii"), np.uint8)
    except UnicodeEncodeError:
        return None
    ends = np.cumsum(np.fromiter(map(len, stamps), np.int64, n))
    t_ms = np.empty(n, np.int64)
    if not _read(chars, ends, t_ms, REQUEST_TIME_MIN_MS, REQUEST_TIME_MAX_MS):
        return None
    return t_ms


_MONTH_DAYS = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


@compile_kernel(nogil=False)
def _digits(chars: np.ndarray, start: int, count: int) -> int:
    """The number written by ``count`` ASCII digits from ``start``; -1 if one is not a digit."""
    value = 0
    for k in range(start, start + count):
        d = int(chars[k]) - 48
        if d < 0 or d > 9:
            return -1
        value = value * 10 + d
    return value


@compile_kernel(nogil=False)
def _read(chars: np.ndarray, ends: np.ndarray, t_ms: np.ndarray, lo: int, hi: int) -> bool:
    """Fill ``t_ms`` with the time of each row ``chars[ends[i-1]:ends[i]]``; False at the
    first row that is not one: not the layout ``YYYY-MM-DD{T,t, ,_}hh:mm:ss`` with 1-9
    digits of fraction (microseconds: the first six count) and nothing (UTC), ``Z``/``z``
    or ``+hh:mm``/``-hh:mm``; a day, hour, minute, second or offset out of range; a time
    outside ``lo`` .. ``hi``."""
    start = 0
    for i in range(len(ends)):
        end = ends[i]
        if end - start < 19:
            return False
        c = chars[start + 10]
        if (
            chars[start + 4] != 45  # '-'
            or chars[start + 7] != 45
            or not (c == 84 or c == 116 or c == 32 or c == 95)  # 'T' 't' ' ' '_'
            or chars[start + 13] != 58  # ':'
            or chars[start + 16] != 58
        ):
            return False
        year = _digits(chars, start, 4)
        month = _digits(chars, start + 5, 2)
        day = _digits(chars, start + 8, 2)
        hour = _digits(chars, start + 11, 2)
        minute = _digits(chars, start + 14, 2)
        second = _digits(chars, start + 17, 2)
        if min(year, month, day, hour, minute, second) < 0:
            return False
        pos = start + 19
        micro = 0
        if pos < end and chars[pos] == 46:  # '.': 1 to 9 digits
            pos += 1
            first = pos
            while pos < end and pos - first < 9 and 48 <= chars[pos] <= 57:
                if pos - first < 6:
                    micro = micro * 10 + (int(chars[pos]) - 48)
                pos += 1
            if pos == first:
                return False
            for _ in range(pos - first, 6):
                micro *= 10
        offset = 0  # minutes east of UTC
        if pos < end:
            c = chars[pos]
            if c == 90 or c == 122:  # 'Z' 'z'
                pos += 1
            elif (c == 43 or c == 45) and end - pos == 6 and chars[pos + 3] == 58:
                zone_h = _digits(chars, pos + 1, 2)
                zone_m = _digits(chars, pos + 4, 2)
                if zone_h < 0 or zone_m < 0 or zone_h > 23 or zone_m > 59:
                    return False
                offset = (zone_h * 60 + zone_m) * (1 if c == 43 else -1)
                pos += 6
        if pos != end:
            return False
        if month < 1 or month > 12 or hour > 23 or minute > 59 or second > 59:
            return False
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        month_days = _MONTH_DAYS[month] + (month == 2 and leap)
        if day < 1 or day > month_days:
            return False
        # Days from 1970-01-01, proleptic Gregorian (days_from_civil, H. Hinnant; years >= 0).
        y = year - (month <= 2)
        era, yoe = y // 400, y % 400
        doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
        days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
        seconds = ((days * 24 + hour) * 60 + minute - offset) * 60 + second
        t = (seconds * 1_000_000 + micro) // 1000
        if t < lo or t > hi:
            return False
        t_ms[i] = t
        start = end
    return True


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, so that no request waits."""
    read_times(["1970-01-01T00:00:00Z"])
