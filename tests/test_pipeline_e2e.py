"""End to end: `dvc repro` on the small preset in a fresh git + DVC copy of the repo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from tests.support.project import run, set_param

pytestmark = pytest.mark.slow
STAGES = ["build_dataset", "train", "evaluate", "profile", "package"]


def test_every_stage_output_exists(small_project: Path) -> None:
    root = small_project
    for stage in STAGES:
        nb = nbformat.read(root / "reports" / f"{stage}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), stage
        html = (root / "reports" / f"{stage}.html").read_text()
        assert "<html" in html and len(html) > 10_000, stage
    for split in ("train", "valid", "test"):
        assert (root / "build/dataset" / f"{split}.parquet").stat().st_size > 0
    card = json.loads((root / "build/model/model_card.json").read_text())
    assert card["feature_set"] == "ctr_v1" and card["data_hashes"]["raw_data (data.dvc)"]
    metrics = json.loads((root / "build/eval/metrics.json").read_text())
    assert 0.5 < metrics["auc"] <= 1 and set(metrics["per_surface"]) == {"feed", "search", "recs"}
    for plot in ("roc", "precision_recall", "calibration"):
        assert (root / "build/eval/plots" / f"{plot}.csv").read_text().count("\n") > 5
    assert (root / "monitors/reference/profile.bin").stat().st_size > 1000
    bento = json.loads((root / "build/bento/bento.json").read_text())
    assert Path(root / bento["archive"]).stat().st_size > 10_000
    assert "FROM" in (root / "build/bento/Dockerfile").read_text()
    release = json.loads((root / "build/release/release.json").read_text())
    # a pure function of the inputs: no commit or time, nothing from package's own last run
    assert "git" not in release["lineage"] and "created_at" not in release["lineage"]
    assert set(release["lineage"]["dvc_lock_outs"]) == {
        "build_dataset",
        "train",
        "evaluate",
        "profile",
    }
    assert release["lineage"]["raw_data_md5"].endswith(".dir")
    assert release["lineage"]["params"]["train"]["train.max_iter"] == 60


def test_status_clean_and_second_repro_runs_nothing(small_project: Path) -> None:
    status = run([sys.executable, "-m", "dvc", "status", "--json"], small_project)
    assert json.loads(status.stdout) == {}
    again = run([sys.executable, "-m", "dvc", "repro"], small_project)
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout


def test_dvc_metrics_and_plots_show(small_project: Path, tmp_path: Path) -> None:
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], small_project)
    metrics = json.loads(shown.stdout)
    assert any("auc" in json.dumps(v) for v in metrics.values())
    out = tmp_path / "plots"
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], small_project)
    page = (out / "index.html").read_text()
    for curve in ("roc", "precision_recall", "calibration"):  # each declared once, each drawn
        assert page.count(f"vegaEmbed('#build_eval_plots_{curve}_csv'") == 1, curve


def test_changing_a_train_param_reruns_only_train_and_downstream(project_copy: Path) -> None:
    set_param(project_copy, "train.learning_rate", 0.2)
    result = run([sys.executable, "-m", "dvc", "repro"], project_copy)
    ran = [s for s in STAGES if f"Running stage '{s}'" in result.stdout]
    assert ran == ["train", "evaluate", "profile", "package"], result.stdout[-2000:]
    assert "Stage 'build_dataset' didn't change" in result.stdout


def test_contract_violation_stops_stage_and_keeps_outputs(project_copy: Path) -> None:
    import pandas as pd

    root = project_copy
    before = {p: p.read_bytes() for p in sorted((root / "build/dataset").iterdir())}
    report_before = (root / "reports/build_dataset.ipynb").read_bytes()
    events = pd.read_parquet(root / "data/events.parquet")
    events.loc[5, "surface"] = "email"
    events.loc[9, "position"] = -3
    events.to_parquet(root / "data/events.parquet", index=False)
    result = run([sys.executable, "-m", "dvc", "repro"], root, check=False)
    assert result.returncode != 0
    err = result.stdout + result.stderr
    assert "Contract RawEvents violated" in err
    assert "column 'surface'" in err and "'email'" in err and "row 5" in err
    assert "column 'position'" in err
    assert {p: p.read_bytes() for p in sorted((root / "build/dataset").iterdir())} == before
    assert (root / "reports/build_dataset.ipynb").read_bytes() == report_before
    assert (root / "reports/failed/build_dataset.ipynb").is_file()
