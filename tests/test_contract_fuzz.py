"""Bad input at scale: hypothesis fuzzes RawEvents batches through the contract and the store.

Batches mix valid rows with random types, nulls, odd strings, extreme numbers
and times, and missing or extra columns. The promises: ``contracts.validate``
either returns a frame that meets the contract or raises ``ContractViolation``
(never another exception); the online store's ``ingest`` either refuses the
batch whole with ``ContractViolation`` (malformed columns) or accounts for
every row: new impressions + click updates + duplicates + rejected = rows.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.features.contracts import RAW_EVENTS, ContractViolation, validate
from pipelines.features.online_store import OnlineStore

COLUMNS = list(RAW_EVENTS.columns)
BASE_MS = 1_790_000_000_000  # 2026-09-21
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

odd_values = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.sampled_from([float("inf"), -float("inf"), 0, -1, 2**63 - 1, -(2**63), 1e308]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "feed\x00", "\x1f", "NaT", "null", "1e9", "2026-13-40", "é" * 40]),
    st.booleans(),
    st.sampled_from(
        [pd.Timestamp("1970-01-01", tz="UTC"), pd.Timestamp("2200-01-01", tz="UTC"), pd.NaT]
    ),
)


@st.composite
def valid_rows(draw: st.DrawFn, i: int) -> dict[str, Any]:
    ts = BASE_MS + draw(st.integers(0, 10 * 86_400_000))
    clicked = draw(st.integers(0, 1))
    return {
        "event_id": draw(st.sampled_from([f"e{i}", f"e{i % 3}"])),  # some repeats
        "ts": pd.Timestamp(ts, unit="ms", tz="UTC"),
        "user_id": draw(st.sampled_from(["u1", "u2", "u3"])),
        "item_id": draw(st.sampled_from(["i1", "i2"])),
        "surface": draw(st.sampled_from(["feed", "search", "recs"])),
        "device": draw(st.sampled_from(["mobile", "desktop", "tablet"])),
        "position": draw(st.integers(1, 100)),
        "clicked": clicked,
        "click_ts": pd.Timestamp(ts + 5_000, unit="ms", tz="UTC") if clicked else None,
    }


@st.composite
def batches(draw: st.DrawFn, allow_bad_columns: bool = True) -> pd.DataFrame:
    n = draw(st.integers(0, 25))
    rows = []
    for i in range(n):
        row = draw(valid_rows(i))
        for col in draw(st.lists(st.sampled_from(COLUMNS), max_size=3, unique=True)):
            row[col] = draw(odd_values)  # corrupt a few cells of this row
        rows.append(row)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if draw(st.booleans()):  # whole columns of one odd type
        col = draw(st.sampled_from(COLUMNS))
        frame[col] = draw(st.lists(odd_values, min_size=n, max_size=n)) if n else []
    if allow_bad_columns and draw(st.integers(0, 4)) == 0:
        frame = frame.drop(columns=draw(st.lists(st.sampled_from(COLUMNS), max_size=2)))
    if allow_bad_columns and draw(st.integers(0, 4)) == 0:
        frame["extra"] = draw(odd_values)
    return frame


@FUZZ
@given(batches())
def test_validate_returns_a_valid_frame_or_raises_contract_violation(batch: pd.DataFrame) -> None:
    try:
        out = validate(RAW_EVENTS, batch, "fuzzed batch")
    except ContractViolation as exc:
        assert exc.report.startswith("Contract RawEvents violated by fuzzed batch")
        assert "What to do" in exc.report
        return
    assert len(out) == len(batch)  # nothing silently dropped
    assert set(out.columns) == set(COLUMNS)
    assert out["surface"].isin(["feed", "search", "recs"]).all()
    assert out["position"].between(1, 100).all()


def _ingest(batch: pd.DataFrame) -> Any:
    store = OnlineStore.open("sqlite:///", "ctr_v1", 3600.0, 300.0)  # in-memory SQLite
    try:
        return store.ingest(batch, "fuzzed batch"), store.stats()
    finally:
        store.close()


@FUZZ
@given(batches())
def test_store_ingest_accounts_for_every_row_or_refuses_the_batch(batch: pd.DataFrame) -> None:
    try:
        report, stats = _ingest(batch)
    except ContractViolation as exc:
        # Only a malformed batch (columns) or a column of an uncoercible type is refused whole.
        assert "RawEvents" in exc.report and "fuzzed batch" in exc.report
        return
    assert report.rows == len(batch)
    accounted = report.impressions + report.click_updates + report.duplicates + report.rejected
    assert accounted == report.rows, report.to_dict()
    assert len(report.rejected_rows) == report.rejected
    assert all(isinstance(r, str) and r for r in report.rejected_rows.get("reason", []))
    assert stats["counters"]["rows"] == report.rows
