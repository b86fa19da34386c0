"""pandera contracts for every table boundary, and readable violation reports.

``validate`` runs a schema lazily (all failures at once) and raises
``ContractViolation`` whose message names the table, where it came from, each
failed column and check with a count and example rows, and what to do.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from pipelines.core.domain import DEVICES, SURFACES
from pipelines.features.definitions import CTR_V1, FeatureSet

SPLITS = ("train", "valid", "test")
_TS = pd.DatetimeTZDtype("ms", "UTC")


class ContractViolation(ValueError):
    """A table broke its contract; ``report`` is the human-readable explanation."""

    def __init__(self, contract: str, where: str, report: str, failure_cases: pd.DataFrame):
        super().__init__(report)
        self.contract = contract
        self.where = where
        self.report = report
        self.failure_cases = failure_cases


def _click_time_consistent(df: pd.DataFrame) -> pd.Series:
    has_click_ts = df["click_ts"].notna()
    clicked = df["clicked"] == 1
    after = ~has_click_ts | (df["click_ts"] > df["ts"])
    return (has_click_ts == clicked) & after


RAW_EVENTS = pa.DataFrameSchema(
    name="RawEvents",
    columns={
        "event_id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "ts": pa.Column(_TS, coerce=True),
        "user_id": pa.Column(str, pa.Check.str_length(min_value=1)),
        "item_id": pa.Column(str, pa.Check.str_length(min_value=1)),
        "surface": pa.Column(str, pa.Check.isin(SURFACES)),
        "device": pa.Column(str, pa.Check.isin(DEVICES)),
        "position": pa.Column(int, pa.Check.in_range(1, 100), coerce=True),
        "clicked": pa.Column(int, pa.Check.isin([0, 1]), coerce=True),
        "click_ts": pa.Column(_TS, nullable=True, coerce=True),
    },
    checks=pa.Check(
        _click_time_consistent,
        name="click_ts_set_iff_clicked_and_after_ts",
        error="click_ts must be set exactly when clicked == 1 and be later than ts",
    ),
    strict=True,
    ordered=False,
)


def feature_table_schema(feature_set: FeatureSet = CTR_V1) -> pa.DataFrameSchema:
    """Contract for a feature table: every declared feature present, typed and in range."""
    columns: dict[str, pa.Column] = {}
    for f in feature_set.features:
        checks: list[pa.Check] = []
        if f.agg == "ctr":
            checks.append(pa.Check.in_range(0.0, 1.0))
        elif f.agg in ("count", "seconds_since"):
            checks.append(pa.Check.ge(0))
        elif f.name == "hour_of_day":
            checks.append(pa.Check.in_range(0, 23))
        elif f.name == "surface_code":
            checks.append(pa.Check.in_range(0, len(SURFACES) - 1))
        elif f.name == "device_code":
            checks.append(pa.Check.in_range(0, len(DEVICES) - 1))
        columns[f.name] = pa.Column(f.dtype, checks, nullable=False)
    return pa.DataFrameSchema(columns, name=f"FeatureTable[{feature_set.name}]", strict=False)


def training_set_schema(feature_set: FeatureSet = CTR_V1) -> pa.DataFrameSchema:
    """Contract for the point-in-time training set: features, label, split and keys."""
    base = feature_table_schema(feature_set)
    return base.add_columns(
        {
            "event_id": pa.Column(str, unique=True),
            "ts": pa.Column(_TS),
            "user_id": pa.Column(str),
            "item_id": pa.Column(str),
            "surface": pa.Column(str, pa.Check.isin(SURFACES)),
            "device": pa.Column(str, pa.Check.isin(DEVICES)),
            "clicked": pa.Column(int, pa.Check.isin([0, 1]), coerce=True),
            "split": pa.Column(str, pa.Check.isin(SPLITS)),
        }
    ).set_name(f"TrainingSet[{feature_set.name}]")  # type: ignore[attr-defined]


def _format(contract: str, where: str, cases: pd.DataFrame, n_rows: int, examples: int) -> str:
    lines = [f"Contract {contract} violated by {where} ({n_rows} rows checked):"]
    cases = cases.copy()
    context = cases.get("schema_context", pd.Series("Column", index=cases.index)).astype(str)
    table_level = context.eq("DataFrameSchema")
    cases["column"] = cases["column"].astype(object).where(~table_level, "<row>")
    cases["column"] = cases["column"].fillna("<table>").astype(str)
    cases["check"] = cases["check"].astype(str)
    for (column, check), group in cases.groupby(["column", "check"], sort=True):
        if check in ("column_in_dataframe", "column_in_schema"):
            what = "missing" if check == "column_in_dataframe" else "unexpected"
            names = ", ".join(repr(v) for v in group["failure_case"].unique())
            lines.append(f"  - {what} column(s): {names}")
            continue
        rows = group.drop_duplicates("index") if column == "<row>" else group
        shown = []
        for _, row in rows.head(examples).iterrows():
            index = row.get("index")
            at = f"row {int(index)}" if pd.notna(index) else "table"
            shown.append(at if column == "<row>" else f"{at}: {row['failure_case']!r}")
        label = "row check" if column == "<row>" else f"column '{column}': check"
        lines.append(f"  - {label} {check} failed {len(rows)} time(s); e.g. " + "; ".join(shown))
    lines.append(
        "What to do: fix the rows above at their source (or the contract in "
        "pipelines/features/contracts.py if the rule itself is wrong) and rerun; "
        "outputs of the previous successful run were left untouched."
    )
    return "\n".join(lines)


def validate(
    schema: pa.DataFrameSchema, df: pd.DataFrame, where: str, examples: int = 3
) -> pd.DataFrame:
    """Validate ``df`` against ``schema``; return the (coerced) frame or raise ContractViolation."""
    try:
        return schema.validate(df, lazy=True)
    except SchemaErrors as exc:
        cases = exc.failure_cases
        name = schema.name or "contract"
        raise ContractViolation(
            name, where, _format(name, where, cases, len(df), examples), cases
        ) from None
    except SchemaError as exc:  # raised for table-level problems even in lazy mode
        cases = pd.DataFrame(
            [
                {
                    "column": getattr(exc, "column_name", None),
                    "check": str(exc.check),
                    "failure_case": str(exc),
                    "index": None,
                }
            ]
        )
        name = schema.name or "contract"
        raise ContractViolation(
            name, where, _format(name, where, cases, len(df), examples), cases
        ) from None
