"""The sample data generator: deterministic, realistic, contract-valid, with drift hooks."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.core.domain import PRESETS, SCENARIOS, Preset
from pipelines.core.io import md5_file
from pipelines.features.contracts import RAW_EVENTS, validate
from pipelines.simulation.generate import generate_events, write_events

TINY = Preset(n_users=300, n_items=80, days=4, events=12_000)


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = write_events(generate_events(TINY, seed=7), tmp_path / "a")
    b = write_events(generate_events(TINY, seed=7), tmp_path / "b")
    c = write_events(generate_events(TINY, seed=8), tmp_path / "c")
    assert md5_file(a) == md5_file(b) != md5_file(c)


def test_events_satisfy_raw_contract_and_are_time_sorted() -> None:
    events = generate_events(TINY, seed=1)
    validate(RAW_EVENTS, events, "generated events")
    assert events["ts"].is_monotonic_increasing
    assert set(events["surface"]) == {"feed", "search", "recs"}
    assert str(events["user_id"].dtype) == "str"  # pandas 3 string dtype


def test_realistic_structure() -> None:
    events = generate_events("small", seed=3)
    rate = events.groupby("position")["clicked"].mean()
    assert rate.loc[1] > rate.loc[5] > rate.loc[10]  # position bias
    by_surface = events.groupby("surface")["clicked"].mean()
    assert by_surface["search"] > by_surface["feed"]
    hourly = events["ts"].dt.hour.value_counts()
    assert hourly.loc[20] > 3 * hourly.loc[3]  # daily cycle
    delay = (events["click_ts"] - events["ts"]).dropna().dt.total_seconds()
    assert (delay > 0).all() and delay.median() > 5  # delayed clicks


def test_drift_scenarios_change_the_process_from_their_start_day() -> None:
    base = generate_events(TINY, seed=5)
    shifted = generate_events(TINY, seed=5, scenario="surface_shift", scenario_start_day=2)
    day = (shifted["ts"] - shifted["ts"].min().floor("D")).dt.days
    recs_after = (shifted.loc[day >= 2, "surface"] == "recs").mean()
    recs_before = (shifted.loc[day < 2, "surface"] == "recs").mean()
    assert recs_after > recs_before + 0.2
    dropped = generate_events(TINY, seed=5, scenario="ctr_drop")
    assert dropped["clicked"].mean() < base["clicked"].mean() * 0.8
    assert set(SCENARIOS) >= {"none", "surface_shift", "ctr_drop", "new_items"}


def test_unknown_preset_or_scenario_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        generate_events("huge")
    with pytest.raises(ValueError, match="unknown drift scenario 'meteor'"):
        generate_events(TINY, scenario="meteor")


@pytest.mark.slow
def test_full_preset_reproduces_data_dvc(tmp_path: Path) -> None:
    """`make data` regenerates data/ when the remote is empty: it must hash to data.dvc."""
    import yaml

    from pipelines.core.config import load_params
    from pipelines.core.dvcfiles import dvc_dir_md5
    from tests.support.project import REPO

    params = load_params(REPO / "params.yaml")
    events = generate_events(
        params["generate"]["preset"],
        params["base"]["seed"],
        str(params["generate"]["start"]),
        params["generate"]["scenario"],
        params["generate"]["scenario_start_day"],
    )
    path = write_events(events, tmp_path / "data")
    assert 1_000_000 <= len(events) <= 2_000_000 and PRESETS["full"].days == 14
    recorded = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert recorded["size"] == path.stat().st_size
    assert dvc_dir_md5(path.parent) == recorded["md5"]
