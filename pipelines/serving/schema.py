"""The service's request and answer models, and the rows of a batch read as columns.

``read_batch`` reads ``/predict_batch``'s rows straight into columns when they have the
usual shape, and otherwise ``batch_rows`` validates one ``PredictRequest`` per row: either
way the same rows are accepted, with the same values, and the same errors refused
(docs/serving.md, "Batch rows").
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from pipelines.serving.request_log import REQUEST_TIME_MAX_MS, REQUEST_TIME_MIN_MS
from pipelines.serving.times import read_times

Surface = Literal["feed", "search", "recs"]
Device = Literal["mobile", "desktop", "tablet"]
Route = Literal["prod", "canary", "ab-variant", "fallback", "baseline"]
ModelRuntime = Literal["compiled", "sklearn", "rule"]
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# Request times pandas can hold, to the millisecond the log stores: ``floor(ms) >= MIN``
# iff ``t >= epoch + MIN ms`` and ``floor(ms) <= MAX`` iff ``t < epoch + (MAX + 1) ms``.
# pydantic-core checks the bounds itself (a time without a zone is compared as UTC): a
# Python validator per row cost more than the rest of a 1000-row batch's validation
# (benchmarks/request_path.py).
_TIME_LO = _EPOCH + dt.timedelta(milliseconds=REQUEST_TIME_MIN_MS)
_TIME_HI = _EPOCH + dt.timedelta(milliseconds=REQUEST_TIME_MAX_MS + 1)
RequestTime = Annotated[
    dt.datetime,
    Field(
        ge=_TIME_LO,
        lt=_TIME_HI,
        description=(
            "time of the request (ISO 8601; without a zone it is UTC), within the range the "
            f"request log can store: {_TIME_LO.isoformat(timespec='milliseconds')} .. "
            f"{(_TIME_HI - dt.timedelta(milliseconds=1)).isoformat(timespec='milliseconds')}"
            "; default: when the request arrives"
        ),
    ),
]
RequestTimeMs = Annotated[
    int,
    Field(
        strict=True,
        ge=REQUEST_TIME_MIN_MS,
        le=REQUEST_TIME_MAX_MS,
        description="time of the request in epoch milliseconds (UTC), within the range the "
        "request log can store",
    ),
]
_EPOCH_NAIVE = _EPOCH.replace(tzinfo=None)
_MS = dt.timedelta(milliseconds=1)


class PredictRequest(BaseModel):
    """One scoring request; ``timestamp`` defaults to the time the request arrives.

    A timestamp without a zone is read as UTC. Unknown fields are refused so a
    typo (``surfce``) is reported instead of silently ignored.
    """

    model_config = ConfigDict(extra="forbid")

    user: Id
    item: Id
    surface: Surface
    device: Device
    timestamp: RequestTime | None = None


class PredictResponse(BaseModel):
    """Click probability and how it was produced."""

    request_id: str
    probability: float
    model_version: str
    route: Route
    degraded: bool
    degraded_reason: str | None = None
    feature_age_seconds: float | None
    features_fresh: bool
    runtime: ModelRuntime  # compiled library, scikit-learn model, or rule baseline


class ColumnsRequest(BaseModel):
    """Impressions as columns (``/predict_columns``): row i is the i-th value of each.

    The service builds a subclass whose columns hold at most ``serving.max_batch_size``
    values (``columns_request_model``). Request times are epoch milliseconds; without
    ``timestamp_ms`` every row is scored at the time the call arrives.
    """

    model_config = ConfigDict(extra="forbid")

    user: list[Id] = Field(min_length=1)
    item: list[Id] = Field(min_length=1)
    surface: list[Surface] = Field(min_length=1)
    device: list[Device] = Field(min_length=1)
    timestamp_ms: list[RequestTimeMs] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> ColumnsRequest:
        sizes = {name: len(column) for name, column in self if column is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns must have one value per row; lengths: {sizes}")
        return self


def columns_request_model(max_rows: int) -> type[ColumnsRequest]:
    """``ColumnsRequest`` with at most ``max_rows`` rows (validation stops at the first bad
    value)."""
    limit = Field(min_length=1, max_length=max_rows, fail_fast=True)
    return create_model(
        "ColumnsRequest",
        __base__=ColumnsRequest,
        user=(Annotated[list[Id], limit], ...),
        item=(Annotated[list[Id], limit], ...),
        surface=(Annotated[list[Surface], limit], ...),
        device=(Annotated[list[Device], limit], ...),
        timestamp_ms=(Annotated[list[RequestTimeMs], limit] | None, None),
    )


class ColumnsResponse(BaseModel):
    """The answers of ``/predict_batch`` as columns: value i of each belongs to row i."""

    request_id: list[str]
    probability: list[float]
    model_version: list[str]
    route: list[Route]
    degraded: list[bool]
    degraded_reason: list[str | None]
    feature_age_seconds: list[float | None]
    features_fresh: list[bool]
    runtime: list[ModelRuntime]


class RankedItem(BaseModel):
    """One candidate of a ranking; route fields only when rows were answered differently."""

    item: str
    probability: float
    route: Route | None = None
    model_version: str | None = None
    runtime: ModelRuntime | None = None
    degraded_reason: str | None = None


class RankResponse(BaseModel):
    """The candidates sorted by click probability, highest first, and how they were scored."""

    request_id: str
    user: str
    surface: Surface
    device: Device
    model_version: str
    route: Route
    runtime: ModelRuntime
    degraded: bool
    degraded_reason: str | None = None
    feature_age_seconds: float | None
    features_fresh: bool
    items: list[RankedItem]


class RankRequest(BaseModel):
    """One user on one surface and device, with the candidate items to rank.

    The service builds a subclass whose ``items`` limit is ``serving.max_rank_items``
    (``rank_request_model``); items must be distinct.
    """

    model_config = ConfigDict(extra="forbid")

    user: Id
    surface: Surface
    device: Device
    timestamp: RequestTime | None = None
    items: list[Id] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _distinct(cls, items: list[str]) -> list[str]:
        if len(set(items)) != len(items):
            repeated = sorted(i for i, k in Counter(items).items() if k > 1)
            raise ValueError(f"items must be distinct; repeated: {repeated[:5]}")
        return items


def rank_request_model(max_items: int) -> type[RankRequest]:
    """``RankRequest`` with at most ``max_items`` items (validation stops at the first bad one)."""
    return create_model(
        "RankRequest",
        __base__=RankRequest,
        items=(Annotated[list[Id], Field(min_length=1, max_length=max_items, fail_fast=True)], ...),
    )


def epoch_ms(stamp: dt.datetime) -> int:
    """Epoch milliseconds, floored as the range check and the log assume (a time without a
    zone is UTC); integer arithmetic, so a pre-1970 time is not truncated towards zero."""
    return (stamp - (_EPOCH_NAIVE if stamp.tzinfo is None else _EPOCH)) // _MS


# --- the rows of a batch, as columns ------------------------------------------------
@dataclass(slots=True, eq=False)
class RequestRows:
    """Validated impressions as columns; ``t_ms[i]`` (epoch ms) holds where ``given[i]``,
    other rows are scored when the call is (``times``)."""

    users: list[str]
    items: list[str]
    surfaces: list[str]
    devices: list[str]
    t_ms: np.ndarray
    given: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def of(cls, requests: Sequence[PredictRequest]) -> RequestRows:
        """The columns of validated requests."""
        stamps = [r.timestamp for r in requests]
        n = len(stamps)
        return cls(
            [r.user for r in requests],
            [r.item for r in requests],
            [r.surface for r in requests],
            [r.device for r in requests],
            np.fromiter((0 if s is None else epoch_ms(s) for s in stamps), np.int64, n),
            np.fromiter((s is not None for s in stamps), bool, n),
        )

    def times(self, now_ms: int) -> np.ndarray:
        """Request times in epoch ms, ``now_ms`` for rows that gave none."""
        return np.where(self.given, self.t_ms, now_ms)


# The Id pattern over the ids of a column joined by newlines (not an id character).
_IDS = re.compile(r"[A-Za-z0-9_.:-]{1,128}(?:\n[A-Za-z0-9_.:-]{1,128})*")


def _ids(column: list[str]) -> bool:
    joined = "\n".join(column)
    return _IDS.fullmatch(joined) is not None and joined.count("\n") == len(column) - 1


class _Row(msgspec.Struct, forbid_unknown_fields=True):
    """A row of the usual ``/predict_batch`` body as msgspec decodes it: the four fields, an
    optional timestamp, nothing else; its ids and time are checked a column at a time."""

    user: str
    item: str
    surface: Surface
    device: Device
    timestamp: str | None = None


@functools.cache
def _batch_decoder(max_rows: int) -> msgspec.json.Decoder[Any]:
    """The decoder of ``{"requests": [1 to max_rows rows]}``, made once per limit."""
    rows = Annotated[list[_Row], msgspec.Meta(min_length=1, max_length=max_rows)]
    body = msgspec.defstruct("_Batch", [("requests", rows)], forbid_unknown_fields=True)
    return msgspec.json.Decoder(body)


def read_batch(body: bytes, max_rows: int) -> RequestRows | None:
    """``/predict_batch``'s JSON body as columns when it has the usual shape: 1 to
    ``max_rows`` rows of the four fields and an optional timestamp, valid ids, times in
    ``read_times``' layout or null. None otherwise: validating one ``PredictRequest`` per
    row then decides, and reports what is wrong."""
    try:
        rows = _batch_decoder(max_rows).decode(body).requests
    except msgspec.MsgspecError:  # not JSON, or not the usual shape
        return None
    users, items = [r.user for r in rows], [r.item for r in rows]
    surfaces, devices = [r.surface for r in rows], [r.device for r in rows]
    stamps = [r.timestamp for r in rows]
    if not (_ids(users) and _ids(items)):
        return None
    n = len(rows)
    given = np.fromiter(map(operator.is_not, stamps, [None] * n), bool, n)
    t_ms = np.zeros(n, np.int64)
    missing = n - int(given.sum())
    if missing < n:
        read = read_times(stamps if missing == 0 else [s for s in stamps if s is not None])
        if read is None:
            return None
        t_ms[given] = read
    return RequestRows(users, items, surfaces, devices, t_ms, given)


def batch_rows(max_rows: int) -> Any:
    """The type of ``/predict_batch``'s rows: a list of 1 to ``max_rows`` ``PredictRequest``
    objects, validated row by row (stopping at the first bad row: a batch of bad rows costs
    one error, not one per field), then given to the endpoint as ``RequestRows``. The
    service reads the usual body with ``read_batch`` first."""
    return Annotated[
        list[PredictRequest],
        Field(min_length=1, max_length=max_rows, fail_fast=True),
        AfterValidator(RequestRows.of),
    ]
