"""The Spark engine (``features.engine: spark``) on a real local session.

Rows, values and dtypes equal the numpy engine's: hypothesis cases are batched,
many to one Spark query (``tests/support/spark.py``), so the property, leakage
and CTR-bound checks cost a few queries instead of one per example.
"""

from __future__ import annotations

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
