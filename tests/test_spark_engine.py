"""The Spark engine (``features.engine: spark``) on a real local session.

Rows, values and dtypes equal the numpy engine's: hypothesis cases are batched,
many to one Spark query (``tests/support/spark.py``), so the property, leakage
and CTR-bound checks cost a few queries instead of one per example.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipelines.features.definitions import to_ms
from pipelines.features.offline import build_point_in_time
from tests.support.spark import batch, local_session
from tests.support.strategies import (
    FEATURE_SETS,
    assert_frames_identical,
    event_logs,
    hand_checked_edges,
    labels_for,
    with_future_event,
)

CASES = 16  # hypothesis cases per Spark query
BATCHED = settings(
    max_examples=2,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a query costs seconds
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def spark():  # type: ignore[no-untyped-def]
    return local_session()


@BATCHED
@given(
    data=st.data(),
    which=st.sampled_from(sorted(FEATURE_SETS)),
    plan=st.sampled_from(["auto", "always", "never"]),
)
def test_spark_engine_equals_numpy_and_never_leaks(
    spark: object, data: st.DataObject, which: str, plan: str
) -> None:
    """Per batch: Spark rows == numpy rows, a future event changes no earlier row, CTR <= 1."""
    fs = FEATURE_SETS[which]
    cases, pasts = [], []
    for _ in range(CASES):
        events = data.draw(event_logs())
        labels = data.draw(labels_for(events))
        cases.append((events, labels))
        future, t_new = with_future_event(data, events, labels)
        # Label rows not later than the new event: they must not change.
        earlier = labels[to_ms(labels["ts"]) <= t_new].reset_index(drop=True)
        cases.append((future, earlier))
        pasts.append((events, earlier))
    events, labels = batch(cases)
    shuffled = events.sample(frac=1.0, random_state=data.draw(st.integers(0, 99)))
    spark_rows = build_point_in_time(shuffled, labels, fs, engine="spark", range_join=plan)
    numpy_rows = build_point_in_time(events, labels, fs, engine="numpy")
    assert_frames_identical(numpy_rows, spark_rows, f"plan={plan}")
    # Leakage: each case's earlier labels against its own past-only log, the same values.
    sizes = np.cumsum([0] + [len(lab) for _, lab in cases])
    for k, (past, earlier) in enumerate(pasts):
        after = spark_rows.iloc[sizes[2 * k + 1] : sizes[2 * k + 2]].reset_index(drop=True)
        before = build_point_in_time(past, earlier, fs, engine="numpy")
        assert_frames_identical(before, after, f"case {k}")
    ctr = [f.name for f in fs.features if f.agg == "ctr"]
    assert ((spark_rows[ctr] >= 0) & (spark_rows[ctr] <= 1)).all().all()


def test_spark_window_edges_by_hand(spark: object) -> None:
    """The hand-checked edges of tests/test_feature_parity.py, on Spark."""
    events, labels, expected = hand_checked_edges()
    rows = build_point_in_time(events, labels, FEATURE_SETS["edge"], engine="spark")
    assert {name: rows[name].tolist() for name in expected} == expected
    assert rows["hour_of_day"].dtype == np.int64 and rows["u_impr_2s"].dtype == np.float64


def test_spark_statement_has_no_sliding_frame() -> None:
    """Spark re-aggregates a sliding frame's whole buffer each time it moves (one item with
    100k impressions in a day: 223.5 s against 4.8 s, benchmarks/spark_hot_key.py), so the
    Spark statement counts windows with running frames only; DuckDB keeps its sliding ones."""
    import re

    from pipelines.features.definitions import CTR_V1
    from pipelines.features.sql import point_in_time_sql

    spark_sql = point_in_time_sql(CTR_V1, dialect="spark")
    duckdb_sql = point_in_time_sql(CTR_V1, dialect="duckdb")
    sliding = re.compile(r"RANGE BETWEEN \d+ PRECEDING")
    assert not sliding.search(spark_sql)
    assert sliding.search(duckdb_sql)
    assert "x__impressions__86400000" in spark_sql  # the item 24 h window's exits


@pytest.mark.slow
def test_build_dataset_stage_on_spark_writes_the_numpy_dataset(
    spark: object, tmp_path: pytest.TempPathFactory
) -> None:
    """The build_dataset stage with engine spark on the small preset: the same files' content."""
    from pathlib import Path

    from pipelines.core.domain import PRESETS
    from pipelines.core.settings import BuildDatasetSettings
    from pipelines.simulation.generate import generate_events
    from pipelines.stages import dataset

    root = Path(str(tmp_path))
    (root / "data").mkdir()
    generate_events(PRESETS["small"], seed=42).to_parquet(root / "data" / "events.parquet")
    policy = BuildDatasetSettings()
    dataset.run(root / "data", root / "numpy", "ctr_v1", policy, "numpy")
    dataset.run(root / "data", root / "spark", "ctr_v1", policy, "spark", "local[2]")
    for split in ("train", "valid", "test"):
        a = pd.read_parquet(root / "numpy" / f"{split}.parquet")
        b = pd.read_parquet(root / "spark" / f"{split}.parquet")
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    meta_a = (root / "numpy" / "meta.json").read_text().replace('"numpy"', '"ENGINE"')
    meta_b = (root / "spark" / "meta.json").read_text().replace('"spark"', '"ENGINE"')
    assert meta_a == meta_b


def test_without_pyspark_the_engine_says_make_setup_spark() -> None:
    """The default install has no pyspark: choosing engine spark names the fix."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pyspark'] = None\n"
        "import pandas as pd\n"
        "from pipelines.features.offline import build_point_in_time\n"
        "labels = pd.DataFrame({'user_id': ['u'], 'item_id': ['i'], 'surface': ['feed'],"
        " 'device': ['mobile'], 'ts': [pd.Timestamp('2026-03-01', tz='UTC')]})\n"
        "build_point_in_time(labels.assign(clicked=0, click_ts=pd.NaT), labels, engine='spark')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "SparkUnavailableError" in done.stderr and "make setup-spark" in done.stderr


# --- The training set built on Spark (pipelines/features/spark_dataset.py) --------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def spark_built(spark: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Small-preset events shuffled into three parquet files; the dataset `mlops features
    build` wrote from them over a previous output; the numpy stage's table and meta."""
    from typer.testing import CliRunner

    from pipelines.cli.main import app
    from pipelines.core.settings import load_settings
    from pipelines.features.definitions import get_feature_set
    from pipelines.simulation.generate import generate_events
    from pipelines.stages import dataset
    from tests.support.project import REPO

    root = tmp_path_factory.mktemp("spark_dataset")
    (root / "events").mkdir()
    events = generate_events("small", 42).sample(frac=1.0, random_state=0)
    for k, rows in enumerate(np.array_split(np.arange(len(events)), 3)):
        events.iloc[rows].to_parquet(root / "events" / f"part-{k}.parquet", index=False)
    stale = root / "out" / "split=train" / "day=2020-01-01"  # a previous output to replace
    stale.mkdir(parents=True)
    (stale / "old.parquet").write_bytes(b"previous run")
    args = ["features", "build", "--events", str(root / "events"), "--out", str(root / "out")]
    result = CliRunner().invoke(
        app, [*args, "--master", "local[2]"], env={"MLOPS_PROJECT_ROOT": str(REPO)}
    )
    settings = load_settings(REPO)
    table, meta = dataset.build_training_set(
        dataset.load_raw_events(root / "events"),
        get_feature_set(settings.features.feature_set),
        settings.build_dataset,
        "numpy",
    )
    return {"root": root, "cli": result, "table": table, "meta": meta}


def test_spark_dataset_equals_the_numpy_stage_per_split(spark_built: dict[str, Any]) -> None:
    """`mlops features build`: split=/day= partitions whose rows, read back, equal the numpy
    stage's table per split (values, dtypes, order); _meta.json equals its meta.json."""
    from pipelines.features.spark_dataset import read_split

    cli, table, out = spark_built["cli"], spark_built["table"], spark_built["root"] / "out"
    assert cli.exit_code == 0, cli.output
    assert f"train {spark_built['meta']['rows']['train']:,} row(s) over 3 day(s)" in cli.stdout
    assert str(out) in cli.stdout.splitlines()[-1]
    listed = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert listed == {"_SUCCESS", "_meta.json", "split=train", "split=valid", "split=test"}
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp
    for split in ("train", "valid", "test"):
        expected = table[table["split"] == split].drop(columns="split").reset_index(drop=True)
        got = read_split(out, split)
        assert len(got) > 1000
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        days = {p.name for p in (out / f"split={split}").iterdir()}
        assert days == {f"day={d}" for d in expected["ts"].dt.strftime("%Y-%m-%d").unique()}
    # pandas alone: the partition columns come back as categories, the rest as written
    whole = pd.read_parquet(out)
    assert isinstance(whole["split"].dtype, pd.CategoricalDtype) and len(whole) == len(table)
    meta = json.loads((out / "_meta.json").read_text())
    assert meta.pop("feature_engine") == "spark"
    assert meta == {k: v for k, v in spark_built["meta"].items() if k != "feature_engine"}


def _mutations() -> dict[str, Any]:
    """One change per RawEvents rule (row 3 is clicked, row 4 is not)."""

    def setter(column: str, value: Any, row: int = 3) -> Any:
        def change(frame: pd.DataFrame) -> None:
            frame.loc[row, column] = value

        return change

    def duplicate(frame: pd.DataFrame) -> None:
        frame.loc[4, "event_id"] = frame.loc[3, "event_id"]

    def click_before(frame: pd.DataFrame) -> None:
        frame.loc[3, "click_ts"] = frame.loc[3, "ts"] - pd.Timedelta(seconds=1)

    def click_unclicked(frame: pd.DataFrame) -> None:
        frame.loc[4, "click_ts"] = frame.loc[4, "ts"] + pd.Timedelta(seconds=1)

    return {
        "valid": lambda frame: None,
        "empty user_id": setter("user_id", ""),
        "empty event_id": setter("event_id", ""),
        "unknown surface": setter("surface", "homepage"),
        "unknown device": setter("device", "fridge"),
        "position 0": setter("position", 0),
        "position 101": setter("position", 101),
        "clicked 2": setter("clicked", 2),
        "duplicate event_id": duplicate,
        "click_ts before ts": click_before,
        "click_ts without a click": click_unclicked,
        "clicked without click_ts": setter("click_ts", pd.NaT),
        "ts before 2020": setter("ts", pd.Timestamp("2019-12-31", tz="UTC")),
    }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_spark_contract_check_agrees_with_the_raw_events_contract(
    spark: Any, mutation: str
) -> None:
    """The Spark check (aggregates, never collecting rows) accepts and refuses the events
    the pandas path does (the pandera RawEvents contract, then the engines' time range),
    one case per rule."""
    from pipelines.features.contracts import RAW_EVENTS, ContractViolation, validate
    from pipelines.features.definitions import check_times
    from pipelines.features.spark_dataset import check_raw_events
    from pipelines.simulation.generate import generate_events

    frame = generate_events("small", 7).head(40).reset_index(drop=True)
    frame.loc[3, ["clicked", "click_ts"]] = [1, frame.loc[3, "ts"] + pd.Timedelta(seconds=9)]
    frame.loc[4, ["clicked", "click_ts"]] = [0, pd.NaT]
    _mutations()[mutation](frame)
    verdicts = []

    def pandas_path() -> None:
        checked = validate(RAW_EVENTS, frame.copy(), "pandas")
        check_times(to_ms(checked["ts"]), "impression times (ts)")

    for check in (pandas_path, lambda: check_raw_events(spark.createDataFrame(frame), "spark")):
        try:
            check()
            verdicts.append("accepted")
        except (ContractViolation, ValueError):
            verdicts.append("refused")
    expected = "accepted" if mutation == "valid" else "refused"
    assert verdicts == [expected, expected], verdicts


def test_spark_dataset_contract_violation_leaves_the_previous_output(
    spark: object, spark_built: dict[str, Any]
) -> None:
    """A clicked row whose click_ts is before its ts: the function raises the violation with
    the count, an example and what to do; the CLI says it in one line and exits 1; a
    missing events path likewise; the previous output is untouched, no temp is left."""
    from typer.testing import CliRunner

    from pipelines.cli.main import app
    from pipelines.core.settings import BuildDatasetSettings
    from pipelines.features.contracts import ContractViolation
    from pipelines.features.definitions import CTR_V1
    from pipelines.features.spark_dataset import build_dataset_spark
    from tests.support.project import REPO

    root = spark_built["root"]
    out = root / "out"
    before = _files(out)
    events = pd.read_parquet(root / "events")
    row = events.index[events["clicked"] == 1][10]
    events.loc[row, "click_ts"] = events.loc[row, "ts"] - pd.Timedelta(seconds=5)
    (root / "bad").mkdir()
    events.to_parquet(root / "bad" / "events.parquet", index=False)
    with pytest.raises(ContractViolation) as info:
        build_dataset_spark(
            spark,  # type: ignore[arg-type]
            str(root / "bad"),
            str(out),
            CTR_V1,
            BuildDatasetSettings(),
        )
    report = info.value.report
    assert "column 'click_ts': check later than ts failed 1 time(s)" in report
    assert events.loc[row, "event_id"] in report and "What to do" in report
    runner = CliRunner()
    for source, message in [
        (root / "bad", "Contract RawEvents violated"),
        (root / "no", "no events"),
    ]:
        result = runner.invoke(
            app,
            ["features", "build", "--events", str(source), "--out", str(out)],
            env={"MLOPS_PROJECT_ROOT": str(REPO)},
        )
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert _files(out) == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


# --- The reference profile per partition, merged (pipelines/features/spark_profile.py) --------

PROFILED = ["surface", "device", *FEATURE_SETS["ctr_v1"].names, "user_ctr_24h_seen"]


@pytest.fixture(scope="module")
def project_rows() -> dict[str, pd.DataFrame]:
    """Point-in-time rows of the small preset (``ts``, ``day``); a surface shift from day 4."""
    from pipelines.features.offline import point_in_time_features
    from pipelines.simulation.generate import generate_events

    out = {}
    for scenario in ("none", "surface_shift"):
        events = generate_events("small", 42, scenario=scenario, scenario_start_day=4)
        table = point_in_time_features(events)
        day = (table["ts"] - table["ts"].min().floor("D")) // pd.Timedelta(days=1)
        # a column with nulls: the user's CTR, undefined (null) before their first impression
        seen = table["user_ctr_24h"].where(table["user_impr_24h"] > 0)
        out[scenario] = table.assign(day=day, user_ctr_24h_seen=seen)[
            ["ts", "day", *PROFILED]
        ].reset_index(drop=True)
    return out


@pytest.fixture(scope="module")
def train_rows(project_rows: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Training days 1-3, as the drift tests and the profile stage's reference use them."""
    rows = project_rows["none"]
    return rows[rows["day"].between(1, 3)].reset_index(drop=True)


@pytest.fixture(scope="module")
def spark_profiles(spark: object, train_rows: pd.DataFrame) -> dict[str, object]:
    """The training rows' profile: in memory, and on Spark per partition and per day."""
    from pyspark.sql import functions as F

    from pipelines.core import profiles as wl
    from pipelines.features.spark_profile import partition_profiles, spark_profile

    frame = spark.createDataFrame(train_rows).repartition(5)  # type: ignore[attr-defined]
    frame.cache().count()
    parts = partition_profiles(frame, columns=PROFILED)
    return {
        "memory": wl.profile(train_rows[PROFILED]),
        "partitions": spark_profile(frame, columns=PROFILED),
        "days": spark_profile(frame, by=F.to_date("ts"), columns=PROFILED),
        "parts": [wl.profile_from_bytes(p) for p in parts],
    }


def _exact_stats(view: object) -> pd.DataFrame:
    """Per column: counts, null and type counts, min and max (exact in whylogs)."""
    from pipelines.core import profiles as wl

    table = wl.summary(view)  # type: ignore[arg-type]
    keep = ["counts/n", "counts/null", "distribution/min", "distribution/max"]
    types = view.to_pandas().filter(like="types/")  # type: ignore[attr-defined]
    return table[keep].join(types).sort_index().astype(float)


def test_spark_profile_equals_the_in_memory_profile(
    spark_profiles: dict[str, object], train_rows: pd.DataFrame
) -> None:
    """Per partition or per day, merged: counts, nulls, types, min/max, frequent items equal
    the in-memory profile exactly; quantiles agree within the KLL sketch's rank error."""
    from pipelines.core import profiles as wl

    memory = spark_profiles["memory"]
    expected = _exact_stats(memory)
    assert expected.loc["surface", "counts/n"] == len(train_rows) > 20_000
    assert expected["counts/null"].sum() > 0  # the data has nulls (no click yet)
    ranks = np.linspace(0.01, 0.99, 99)
    for mode in ("partitions", "days"):
        merged = spark_profiles[mode]
        pd.testing.assert_frame_equal(_exact_stats(merged), expected, check_exact=True)
        ours, theirs = wl.column_sketches(memory), wl.column_sketches(merged)  # type: ignore[arg-type]
        assert set(ours) == set(theirs) == set(PROFILED)
        for name in PROFILED:
            a, b = ours[name], theirs[name]
            assert (a.kind, a.count, a.nulls) == (b.kind, b.count, b.nulls), name
            if a.kind == "categorical":
                assert a.items() == b.items() == train_rows[name].value_counts().to_dict()
                continue
            assert a.bounds() == b.bounds(), name
            # KLL: each sketch's CDF is within rank_error (99% bound) of the exact CDF, so two
            # sketches of the same rows differ by at most twice that at any point.
            assert a.rank_error > 0 and b.rank_error == pytest.approx(a.rank_error)
            points = np.unique(a.quantiles(ranks))
            values = np.sort(train_rows[name].dropna().to_numpy(np.float64))
            exact = np.searchsorted(values, points, side="right") / len(values)
            assert np.max(np.abs(b.cdf(points) - exact)) <= b.rank_error, name
            assert np.max(np.abs(b.cdf(points) - a.cdf(points))) <= 2 * a.rank_error, name
        # frequent items of numeric columns too, where the sketch is exact (few distinct values)
        fi_a = memory.to_pandas()["frequent_items/frequent_strings"]  # type: ignore[attr-defined]
        fi_b = merged.to_pandas()["frequent_items/frequent_strings"]  # type: ignore[attr-defined]
        for name in ("surface_code", "device_code", "hour_of_day"):
            assert {i.value: i.est for i in fi_a[name]} == {i.value: i.est for i in fi_b[name]}
            assert {i.value: i.est for i in fi_b[name]} == {
                str(k): v for k, v in train_rows[name].value_counts().items()
            }


def test_merging_partition_profiles_is_order_independent(
    spark_profiles: dict[str, object],
) -> None:
    """Any order of the partition profiles merges to the same counts, nulls, min and max."""
    from pipelines.core import profiles as wl

    parts = spark_profiles["parts"]
    assert len(parts) == 5  # type: ignore[arg-type]
    expected = _exact_stats(spark_profiles["memory"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = rng.permutation(len(parts))  # type: ignore[arg-type]
        merged = wl.merge_profiles([parts[i] for i in order])  # type: ignore[index]
        pd.testing.assert_frame_equal(_exact_stats(merged), expected, check_exact=True)
    # a tree of merges (what a distributed reduce does) gives the same too
    pairs = [wl.merge_profiles(parts[i : i + 2]) for i in range(0, 5, 2)]  # type: ignore[index]
    pd.testing.assert_frame_equal(
        _exact_stats(wl.merge_profiles(pairs[::-1])), expected, check_exact=True
    )


def _reference_from_sketches(reference: dict, view: object) -> dict:
    """``reference`` with each judged column's pooled counts read from a profile's sketches."""
    import copy

    from pipelines.core import profiles as wl

    sketches = wl.column_sketches(view)  # type: ignore[arg-type]
    out = copy.deepcopy(reference)
    for name, entry in out["columns"].items():
        if entry.get("not_judged"):
            continue
        sketch = sketches[name]
        assert sketch.count + sketch.nulls == entry["rows"], name  # the same rows
        if entry["kind"] == "categorical":
            items = sketch.items()
            counts = [items.get(c, 0) for c in entry["categories"]]
        else:
            cdf = sketch.cdf(entry["edges"]) if entry["edges"] else np.empty(0)
            counts = np.diff(np.concatenate([[0.0], cdf, [1.0]])) * sketch.count
        entry["counts"] = [float(c) for c in counts]
    return out


def test_drift_verdicts_agree_with_merged_and_in_memory_reference(
    spark_profiles: dict[str, object],
    train_rows: pd.DataFrame,
    project_rows: dict[str, pd.DataFrame],
) -> None:
    """The drift decision (``compare_reference``) on a day of project data gives the same
    verdict per column with reference counts read from the merged Spark profile, from the
    in-memory profile and from exact counts (what the monitor uses), with and without drift."""
    from pipelines.features.definitions import CTR_V1
    from pipelines.monitoring.drift import compare_reference
    from pipelines.stages.drift_reference import build_reference, filling_columns

    day0 = project_rows["none"]["ts"].min().floor("D")
    exact = build_reference(
        train_rows[PROFILED],
        train_rows["ts"],
        "1h",
        growing={name: "grows by construction" for name in CTR_V1.growing},
        filled_from=filling_columns(CTR_V1, day0, PROFILED),
    )
    references = {
        "exact": exact,
        "memory": _reference_from_sketches(exact, spark_profiles["memory"]),
        "partitions": _reference_from_sketches(exact, spark_profiles["partitions"]),
        "days": _reference_from_sketches(exact, spark_profiles["days"]),
    }
    flagged = {}
    for scenario in ("none", "surface_shift"):
        rows = project_rows[scenario]
        live = rows[rows["day"] == 4]
        verdicts = {}
        for name, reference in references.items():
            report = compare_reference(reference, live[PROFILED], live["ts"])
            verdicts[name] = (
                {c.column: (c.status, tuple(c.reasons)) for c in report.columns},
                report.dataset_drift,
            )
            psis = {c.column: (c.psi, c.threshold) for c in report.columns if c.psi is not None}
            if name == "exact":
                exact_psi = psis
            else:  # sketch-read counts move PSI by a few % of PSI or of its limit (measured <3%)
                for column, (value, _) in psis.items():
                    exact_value, limit = exact_psi[column]
                    assert abs(value - exact_value) <= 0.1 * max(exact_value, limit), (
                        scenario,
                        name,
                        column,
                    )
        assert verdicts["partitions"] == verdicts["memory"] == verdicts["exact"], scenario
        assert verdicts["days"] == verdicts["exact"], scenario
        flagged[scenario] = sorted(
            c for c, (status, reasons) in verdicts["exact"][0].items() if "distribution" in reasons
        )
    assert "surface" in flagged["surface_shift"] and "surface" not in flagged["none"]


def test_spark_profile_of_an_empty_frame_and_lazy_whylogs(spark: object) -> None:
    """An empty frame gives the empty profile of its columns; importing the module (as a
    Spark worker does to unpickle the partition function) does not import whylogs."""
    import subprocess
    import sys

    from pipelines.core import profiles as wl
    from pipelines.features.spark_profile import spark_profile

    frame = spark.createDataFrame([], "x DOUBLE, s STRING")  # type: ignore[attr-defined]
    view = spark_profile(frame)
    assert wl.summary(view)["counts/n"].to_dict() == {"s": 0, "x": 0}
    code = (
        "import sys, pipelines.features.spark_profile\n"
        "assert 'whylogs' not in sys.modules, 'whylogs imported at module import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
