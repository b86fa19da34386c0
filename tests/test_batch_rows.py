"""``/predict_batch``'s rows read straight into columns agree with one ``PredictRequest`` per
row: whatever the reader takes has the values pydantic gives it, and whatever pydantic refuses
the reader leaves to pydantic (which then reports it)."""

from __future__ import annotations

import datetime as dt
import random
from typing import Annotated, Any

import numpy as np
import orjson
import pytest
from pydantic import Field, TypeAdapter, ValidationError

from pipelines.serving.request_log import REQUEST_TIME_MAX_MS, REQUEST_TIME_MIN_MS
from pipelines.serving.schema import PredictRequest, RequestRows, batch_rows, read_batch

ONE_PER_ROW = TypeAdapter(Annotated[list[PredictRequest], Field(min_length=1, max_length=50)])
ROW = {"user": "u00001", "item": "i00007", "surface": "feed", "device": "mobile"}


def per_row(value: Any) -> RequestRows | None:
    """The columns of one validated object per row, or None when pydantic refuses."""
    try:
        return RequestRows.of(ONE_PER_ROW.validate_python(value))
    except ValidationError:
        return None


def read_body(value: Any, max_rows: int = 50) -> RequestRows | None:
    """The reader's columns of ``{"requests": value}`` sent as JSON, or None."""
    return read_batch(orjson.dumps({"requests": value}), max_rows)


def same(a: RequestRows, b: RequestRows) -> bool:
    return (
        (a.users, a.items, a.surfaces, a.devices) == (b.users, b.items, b.surfaces, b.devices)
        and np.array_equal(a.given, b.given)
        and np.array_equal(a.t_ms[a.given], b.t_ms[b.given])
    )


def agree(value: Any) -> RequestRows | None:
    """The reader's columns after checking them against pydantic's."""
    fast, slow = read_body(value, 50), per_row(value)
    if fast is not None:
        assert slow is not None, f"read, but pydantic refuses: {value!r}"
        assert same(fast, slow), value
    return fast


def stamp(rng: random.Random) -> str:
    """A time in the storable range, written in one of the layouts the reader takes."""
    lo, hi = REQUEST_TIME_MIN_MS * 1000, REQUEST_TIME_MAX_MS * 1000
    near_edge = rng.random() < 0.1
    us = rng.choice([lo, hi]) + rng.randint(-3000, 3000) if near_edge else rng.randint(lo, hi)
    zone = rng.choice([None, dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30))])
    zone = zone or rng.choice([None, dt.timezone(-dt.timedelta(hours=rng.randint(0, 23)))])
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)
    local = moment.astimezone(zone).replace(tzinfo=None) if zone else moment.replace(tzinfo=None)
    text = local.isoformat(timespec=rng.choice(["seconds", "milliseconds", "microseconds"]))
    if rng.random() < 0.3 and "." in text:  # 1 to 6 fraction digits
        text = text[: rng.randint(text.index(".") + 2, len(text))]
    elif rng.random() < 0.2 and "." in text:  # 7 to 9 digits (pandas writes nanoseconds)
        text += "".join(rng.choice("0123456789") for _ in range(rng.choice([1, 3, 3])))
    text = text.replace("T", rng.choice("TTTt _"))
    if zone is None:
        return text
    offset = local.replace(tzinfo=zone).isoformat()[19:].split("+")[-1].split("-")[-1]
    sign = "-" if zone.utcoffset(None) < dt.timedelta(0) else "+"
    utc = rng.choice("Zz") if zone is dt.UTC and rng.random() < 0.5 else None
    return text + (utc or sign + offset[-5:])


def test_usual_rows_are_read_with_the_values_of_one_object_per_row() -> None:
    rng = random.Random(7)
    start = dt.datetime(2026, 10, 13, tzinfo=dt.UTC)
    times = [start + dt.timedelta(seconds=rng.randint(0, 10**6)) for _ in range(40)]
    times[::3] = [t + dt.timedelta(microseconds=rng.randint(1, 999_999)) for t in times[::3]]
    texts = [t.isoformat() for t in times]  # two layouts: with and without microseconds
    texts[1::4] = [t.isoformat(timespec="milliseconds")[:-6] + "Z" for t in times[1::4]]
    rows = [
        {**ROW, "user": f"u{i:05d}", "item": f"i.{i}:x-{i}_", "timestamp": text}
        for i, text in enumerate(texts)
    ]
    rows[3].pop("timestamp")
    rows[5]["timestamp"] = None
    rows[6]["surface"], rows[7]["device"] = "recs", "tablet"
    read = agree(rows)
    assert read is not None and read.given.tolist().count(False) == 2
    untimed = agree([dict(ROW), {**ROW, "timestamp": None}])
    assert untimed is not None and not untimed.given.any()
    assert untimed.times(123).tolist() == [123, 123]
    # every row is read on its own: one batch may mix any of the layouts
    varied = [{**ROW, "timestamp": "2026-10-13T00:00:01." + "1" * k} for k in range(1, 10)]
    varied += [{**ROW, "timestamp": "2026-10-13 00:00:01" + z} for z in ("", "z", "-03:30")]
    assert agree(varied) is not None


def test_every_time_the_reader_takes_has_pydantics_value() -> None:
    rng = random.Random(11)
    taken = 0
    for _ in range(3000):
        text = stamp(rng)
        read = agree([{**ROW, "timestamp": text}])
        inside = per_row([{**ROW, "timestamp": text}]) is not None
        # a valid time in a layout the reader knows is read, not left to pydantic
        assert (read is not None) == inside, text
        taken += read is not None
    assert taken > 2500


@pytest.mark.parametrize(
    "text",
    [
        "2026-02-29T00:00:00",  # not a leap year
        "2024-02-29T23:59:59.999999Z",
        "2100-02-29T00:00:00",
        "2000-02-29T00:00:00",
        "2026-04-31T00:00:00",
        "2026-13-01T00:00:00",
        "2026-00-01T00:00:00",
        "2026-01-00T00:00:00",
        "2026-01-01T24:00:00",
        "2026-01-01T23:60:00",
        "2026-01-01T23:59:60",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01T00:00:00+23:59",
        "2026-01-01T00:00:00-00:00",
        "2026-01-01T00:00:00+05:60",
        "2026-01-01T00:00:00.1234567",
        "2026-10-14T23:57:07.015275696+00:00",
        "2026-10-14T23:59:59.999999999Z",
        "2026-01-01T00:00:00.1234567891",
        "2026-01-01T00:00:00.",
        "2026-01-01t00:00:00",
        "2026-01-01 00:00:00",
        "2026-01-01T00:00",
        "2026-01-01",
        "2026-01-01T00:00:00z",
        "2026-01-01T00:00:00+0500",
        "1677-09-21T00:12:43.145",
        "1677-09-21T00:12:43.146",
        "2262-04-11T23:47:16.854999",
        "2262-04-11T23:47:16.855",
        "9999-12-31T23:59:59",
        "0000-01-01T00:00:00",
        "２０２６-01-01T00:00:00",
        "1700000000",
        "now",
        "",
    ],
)
def test_edge_times_agree(text: str) -> None:
    agree([{**ROW, "timestamp": text}])
    agree([{**ROW, "timestamp": "2026-06-01T12:00:00Z"}, {**ROW, "timestamp": text}])


@pytest.mark.parametrize(
    "rows",
    [
        [{**ROW, "user": "a b"}],
        [{**ROW, "user": "a\nb"}],
        [{**ROW, "user": ""}],
        [{**ROW, "user": "u" * 129}],
        [{**ROW, "item": "i" * 128}],
        [{**ROW, "user": 5}],
        [{**ROW, "user": None}],
        [{**ROW, "surface": "Feed"}],
        [{**ROW, "device": ["mobile"]}],
        [{**ROW, "extra": 1}],
        [{k: v for k, v in ROW.items() if k != "device"}],
        [{**ROW, "timestamp": 1_700_000_000}],
        [{**ROW, "timestamp": True}],
        [ROW, ["u1", "i1", "feed", "mobile"]],
        [ROW, "u1"],
        [],
        [ROW] * 51,
    ],
)
def test_other_shapes_are_left_to_pydantic(rows: list[Any]) -> None:
    assert read_body(rows, 50) is None or rows == [{**ROW, "item": "i" * 128}]
    agree(rows)


_ONE = orjson.dumps(ROW).decode()


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff",
        b"[]",
        b'{"requests": null}',
        f'{{"requests": [{_ONE}], "extra": 1}}'.encode(),
        f'{{"requests": [{_ONE}]}} trailing'.encode(),
        f'{{"requests": [{_ONE}], "requests": []}}'.encode(),
    ],
)
def test_other_bodies_are_left_to_bentoml(body: bytes) -> None:
    assert read_batch(body, 50) is None


def test_a_repeated_key_is_read_as_pydantic_reads_it() -> None:
    """JSON lets an object repeat a key; both readers keep its last value."""
    rows = b'[{"user": "u1", "item": "i1", "surface": "feed", "device": "mobile", "user": "u2",'
    rows += b' "timestamp": "2026-10-13T00:00:01", "timestamp": null}]'
    read = read_batch(b'{"requests": ' + rows + b"}", 50)
    validated = RequestRows.of(ONE_PER_ROW.validate_json(rows))
    assert read is not None and same(read, validated) and read.users == ["u2"]
    assert not read.given.any()


def test_the_endpoint_type_validates_row_by_row_into_columns() -> None:
    """What the service does with a body ``read_batch`` leaves: the same columns, or errors."""
    rows_type = TypeAdapter(batch_rows(3))
    body = [{**ROW, "timestamp": "2026-10-13T00:00:01.08+00:00"}, {**ROW, "timestamp": None}]
    read = rows_type.validate_json(orjson.dumps(body))
    assert isinstance(read, RequestRows) and same(read, agree(body))  # type: ignore[arg-type]
    spaced = rows_type.validate_json(orjson.dumps([{**ROW, "timestamp": "2026-10-13 00:00:01"}]))
    assert isinstance(spaced, RequestRows) and spaced.t_ms.tolist() == [1791849601000]
    bad = [ROW, {**ROW, "user": "a b"}, {**ROW, "timestamp": "2026-02-30T00:00:00"}]
    with pytest.raises(ValidationError) as caught:
        rows_type.validate_json(orjson.dumps(bad))
    assert [e["loc"] for e in caught.value.errors()] == [(1, "user")]  # stops at the first
    with pytest.raises(ValidationError, match="at most 3 items"):
        rows_type.validate_json(orjson.dumps([ROW] * 4))
    assert "PredictRequest" in orjson.dumps(rows_type.json_schema()).decode()
