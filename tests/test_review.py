"""Notebook hygiene (nbstripout, nbdime) and the ``mlops review`` report on a real change."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli.main import app
from pipelines.core.settings import load_settings
from pipelines.registry.gates import GateReport, GateResult
from pipelines.review import render as rr
from pipelines.review import review as rv
from tests.support.chromium import screenshot
from tests.support.project import REPO, run, set_param
from tests.support.review_scenario import BRANCH, NOTE, make_change

SETTINGS = load_settings(REPO).review


def _with_outputs(src: Path, dest: Path) -> Path:
    """A copy of a source notebook that carries an output, as after running it in Jupyter."""
    nb = nbformat.read(src, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="trained\n")]
    code.execution_count = 3
    nbformat.write(nb, dest)
    return dest


# --------------------------------------------------------------------------- hygiene


def test_notebooks_check_fails_on_a_notebook_with_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    clean = shutil.copy(REPO / "notebooks/train.ipynb", tmp_path / "clean.ipynb")
    dirty = _with_outputs(REPO / "notebooks/train.ipynb", tmp_path / "dirty.ipynb")
    runner = CliRunner()

    failed = runner.invoke(app, ["notebooks", "check", str(clean), str(dirty)])
    assert failed.exit_code == 1
    assert "source notebooks carry outputs" in failed.output and str(dirty) in failed.output
    assert str(clean) not in failed.output
    assert "nbstripout" in failed.output  # says how to fix it

    assert runner.invoke(app, ["notebooks", "check", str(clean)]).exit_code == 0
    committed = runner.invoke(app, ["notebooks", "check"])  # the repo's own stage notebooks
    assert committed.exit_code == 0, committed.output


@pytest.mark.slow
def test_git_setup_strips_outputs_on_commit_and_diffs_with_nbdime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for rel in (".gitattributes", "params.yaml", "notebooks/train.ipynb"):
        shutil.copy(REPO / rel, repo / rel)
    attributes = (repo / ".gitattributes").read_text()
    run(["git", "init", "-q", "-b", "main"], repo)
    # What `make setup` did before: nbstripout's default install into .git/info/attributes,
    # whose `diff=ipynb` would shadow nbdime's driver.
    run([sys.executable, "-m", "nbstripout", "--install"], repo)
    monkeypatch.chdir(repo)

    for _ in range(2):  # idempotent
        result = CliRunner().invoke(app, ["notebooks", "git-setup"])
        assert result.exit_code == 0, result.output
    assert "nbdime" in result.output

    attrs = run(
        ["git", "check-attr", "filter", "diff", "merge", "--", "notebooks/train.ipynb"], repo
    )
    assert "filter: nbstripout" in attrs.stdout
    assert "diff: jupyternotebook" in attrs.stdout and "merge: jupyternotebook" in attrs.stdout
    assert (repo / ".gitattributes").read_text() == attributes
    info = (repo / ".git/info/attributes").read_text()
    assert "nbstripout" not in info and "diff=ipynb" not in info
    assert "--keep-id" in run(["git", "config", "filter.nbstripout.clean"], repo).stdout
    driver = run(["git", "config", "diff.jupyternotebook.command"], repo).stdout
    assert sys.executable in driver  # works without .venv/bin on PATH
    assert sys.executable in run(["git", "config", "difftool.nbdime.cmd"], repo).stdout

    # Commit a notebook that carries outputs: the filter strips them and keeps the cell ids.
    source = nbformat.read(REPO / "notebooks/train.ipynb", as_version=4)
    _with_outputs(REPO / "notebooks/train.ipynb", repo / "notebooks/train.ipynb")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "notebook"], repo)
    committed = nbformat.reads(run(["git", "show", "HEAD:notebooks/train.ipynb"], repo).stdout, 4)
    assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")
    assert [c.id for c in committed.cells] == [c.id for c in source.cells]

    # `git diff` of a notebook goes through nbdime, even with a bare PATH.
    source.cells[1].source = source.cells[1].source.replace(
        "learning_rate = 0.1", "learning_rate = 0.3"
    )
    nbformat.write(source, repo / "notebooks/train.ipynb")
    env = {**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    diff = run(["git", "diff", "--", "notebooks/train.ipynb"], repo, env=env).stdout
    diff = re.sub(r"\x1b\[[0-9;]*m", "", diff)
    assert diff.startswith("nbdiff ") and "## modified /cells/1/source:" in diff
    assert re.search(r"^-\s*learning_rate = 0\.1$", diff, re.M), diff
    assert re.search(r"^\+\s*learning_rate = 0\.3$", diff, re.M), diff
    assert "/id:" not in diff and '"cell_type"' not in diff  # no id churn, not raw JSON


# --------------------------------------------------------------------------- report pieces


def test_metric_changes_label_deltas_by_direction() -> None:
    data = {
        "m.json": {
            "auc": {"old": 0.70, "new": 0.72, "diff": 0.02},
            "log_loss": {"old": 0.30, "new": 0.31, "diff": 0.01},
            "per_surface.feed.auc": {"old": 0.66, "new": 0.61, "diff": -0.05},
            "click_rate": {"old": 0.1, "new": 0.1, "diff": 0.0},
            "mean_prediction": {"old": 0.12, "new": 0.13, "diff": 0.01},
            "lift": {"old": None, "new": 0.02},
        }
    }
    got = {m.name: m for m in rv.metric_changes(data, SETTINGS.metric_direction)}
    assert got["auc"].verdict == "better" and rr.fmt_delta(got["auc"]) == "+0.0200 (+2.9%)"
    assert got["log_loss"].verdict == "worse"
    assert got["per_surface.feed.auc"].verdict == "worse"  # direction by last name part
    assert got["click_rate"].verdict == "" and rr.fmt_delta(got["click_rate"]) == ""
    assert got["mean_prediction"].verdict == "changed"  # no direction configured
    assert got["lift"].verdict == "new"


def test_deltas_within_tolerance_are_not_better_or_worse(tmp_path: Path) -> None:
    """review.metric_tolerance / relative_tolerance in params.yaml: a delta no larger is noise."""
    assert SETTINGS.metric_tolerance["brier"] == 0.0005 and SETTINGS.relative_tolerance == 0.005
    data = {
        "m.json": {
            "auc": {"old": 0.6866, "new": 0.6870, "diff": 0.0004},  # tolerance 0.001
            "brier": {"old": 0.09451, "new": 0.09452, "diff": 0.00001},  # shown as +0.0000
            "log_loss": {"old": 0.3290, "new": 0.3384, "diff": 0.0094},  # past it: worse
            "mean_prediction": {"old": 0.1264, "new": 0.1265, "diff": 0.0001},  # 0.5% = 0.00063
            "click_rate": {"old": 0.1129, "new": 0.1200, "diff": 0.0071},  # 6%: changed
            "per_surface.feed.auc": {"old": 0.6463, "new": 0.6455, "diff": -0.0008},
            "n": {"old": 14520, "new": 14520, "diff": 0},
        }
    }
    got = {m.name: m for m in rv.metric_changes(data, SETTINGS.metric_direction, SETTINGS)}
    for name in ("auc", "brier", "mean_prediction", "per_surface.feed.auc"):
        assert got[name].changed and got[name].within_tolerance, name
        assert got[name].verdict == "within tolerance", name
    assert got["log_loss"].verdict == "worse" and got["click_rate"].verdict == "changed"
    assert got["n"].verdict == "" and not got["n"].within_tolerance

    r = _review(tmp_path, metrics=list(got.values()))
    assert [m.name for m in r.changed_metrics] == ["click_rate", "log_loss"]
    md = rr.render_markdown(r)
    assert "2 of 7 metrics changed past tolerance (4 within) (log_loss +0.0094 worse)" in md
    brier = next(line for line in md.splitlines() if line.startswith("| `brier` |"))
    assert "≈ within tolerance" in brier and "worse" not in brier
    assert "0 of 1 nested metrics changed past tolerance" in md
    flagged = [line for line in md.splitlines() if "🔴" in line or "🟢" in line]
    assert flagged == [next(line for line in md.splitlines() if line.startswith("| `log_loss`"))]
    page = rr.render_html(r, link_from=tmp_path, root=tmp_path)
    assert 'class="better">0</span> / <span class="worse">1</span>' in page


def _lock(stages: dict[str, tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]]) -> str:
    """A dvc.lock text: ``{stage: (params, [(dep, md5)], [(out, md5)])}``."""
    return yaml.safe_dump(
        {
            "schema": "2.0",
            "stages": {
                name: {
                    "cmd": f"run {name}",
                    "deps": [{"path": p, "md5": h} for p, h in deps],
                    "params": {"params.yaml": params},
                    "outs": [{"path": p, "md5": h} for p, h in outs],
                }
                for name, (params, deps, outs) in stages.items()
            },
        }
    )


def test_stages_rerun_only_because_the_clone_is_fresh_are_not_changes_of_the_branch(
    tmp_path: Path,
) -> None:
    """Same inputs as the base, other output hashes (a fresh clone re-ran the stage):
    neither that stage nor the stages fed by it count as changed by the branch."""
    nb = [("notebooks/x.ipynb", "n1")]
    base = _lock(
        {
            "build_dataset": ({}, [("data", "raw1"), *nb], [("build/dataset", "d1")]),
            "train": ({"train.lr": 0.1}, [("build/dataset", "d1"), *nb], [("build/model", "m1")]),
            "evaluate": ({"bins": 10}, [("build/model", "m1")], [("metrics.json", "e1")]),
            "profile": ({}, [("build/model", "m1")], [("monitors/ref", "p1")]),
        }
    )
    fresh = {  # build_dataset re-ran with other output bytes, so train did too
        "build_dataset": ({}, [("data", "raw1"), *nb], [("build/dataset", "d2")]),
        "train": ({"train.lr": 0.1}, [("build/dataset", "d2"), *nb], [("build/model", "m2")]),
        "evaluate": ({"bins": 12}, [("build/model", "m2")], [("metrics.json", "e2")]),
        "profile": ({}, [("build/model", "m2")], [("monitors/ref", "p2")]),
    }
    assert rv.branch_stages(base, _lock(fresh)) == {"evaluate"}  # only its param changed
    fresh["train"] = ({"train.lr": 0.2}, *fresh["train"][1:])  # type: ignore[assignment]
    assert rv.branch_stages(base, _lock(fresh)) == {"train", "evaluate", "profile"}
    fresh["build_dataset"] = ({}, [("data", "raw2"), *nb], [("build/dataset", "d2")])
    assert rv.branch_stages(base, _lock(fresh)) == {"build_dataset", "train", "evaluate", "profile"}
    assert rv.branch_stages(None, _lock(fresh)) == set(fresh)  # no lock at the base

    def change(source: str, path: str) -> rv.HashChange:
        return rv.HashChange(source, path, "", {"md5": "a"}, {"md5": "b"})

    hashes = [change("build_dataset", "build/dataset"), change("evaluate", "metrics.json")]
    r = _review(tmp_path, hashes=hashes, branch_stages={"evaluate"})
    assert [h.path for h in r.changed_hashes] == ["metrics.json"]
    assert [h.path for h in r.rerun_here] == ["build/dataset"]
    assert "1 DVC output with new hashes" in rr.render_markdown(r)
    executed = rv.executed_notebooks(
        [change("build_dataset", "reports/b.html"), change("evaluate", "reports/e.html")],
        "reports",
        tmp_path,
        {"evaluate"},
    )
    assert [(e.stage, e.changed) for e in executed] == [
        ("build_dataset", False),
        ("evaluate", True),
    ]


def _review(tmp_path: Path, **overrides: object) -> rv.Review:
    fields: dict[str, object] = dict(
        base="main",
        base_commit="a" * 40,
        head="feature",
        head_commit="b" * 40,
        dirty=False,
        created_at="2026-11-27 12:00 UTC",
        stale={},
        params=[],
        metrics=[],
        plots=[],
        hashes=[],
        notebooks=[],
        executed=[],
        gates=None,
        settings=SETTINGS,
    )
    fields.update(overrides)
    return rv.Review(**fields)  # type: ignore[arg-type]


def test_gate_report_and_stale_outputs_are_shown(tmp_path: Path) -> None:
    assert rv.read_gate_report(tmp_path, "gates.json") is None  # no file: no section
    assert "Quality gates" not in rr.render_markdown(_review(tmp_path))

    report = GateReport(  # what `mlops model register --dry-run` writes
        "ctr-model",
        "v1.1.0",
        "abc123",
        {"version": "v1.0.0", "commit": "def456"},
        [
            GateResult("auc_floor", True, "value 0.66, threshold 0.6", 0.66, 0.6, 0.06),
            GateResult("no_regression_vs_prod", False, "auc -0.024 below prod (tolerance 0.005)"),
        ],
        {},
    )
    (tmp_path / "gates.json").write_text(json.dumps(report.to_dict()))
    gates = rv.read_gate_report(tmp_path, "gates.json")
    assert gates is not None and gates.verdict == "fail"
    status = {"train": [{"changed deps": {"params.yaml": {"train.max_leaf_nodes": "modified"}}}]}
    r = _review(tmp_path, gates=gates, stale=rv.stale_stages(status))
    md = rr.render_markdown(r)
    assert "### Quality gates (`gates.json`)" in md and "Overall: **fail**" in md
    assert "| auc_floor | ✅ pass | value 0.66, threshold 0.6 |" in md
    assert "| no_regression_vs_prod | ❌ fail | auc -0.024 below prod (tolerance 0.005) |" in md
    assert "`train`: changed deps (train.max_leaf_nodes)" in md and "dvc repro" in md
    page = rr.render_html(r, link_from=tmp_path, root=tmp_path)
    assert "no_regression_vs_prod" in page and "Pipeline outputs do not match" in page

    (tmp_path / "gates.json").write_text("{not json")
    broken = rv.read_gate_report(tmp_path, "gates.json")
    assert broken is not None and "not valid JSON" in rr.render_markdown(
        _review(tmp_path, gates=broken)
    )


def test_notebook_diffs_are_fenced_and_cut_to_fit_a_comment(tmp_path: Path) -> None:
    body = ["## modified /cells/0/source:", "+  ```python", "+  x = 1", "+  ```"]
    body += [f"+  line {i}" for i in range(SETTINGS.max_diff_lines + 50)]
    nb = rv.NotebookDiff("notebooks/eda.ipynb", "modified", "\n".join(body), "")
    md = rr.render_markdown(_review(tmp_path, notebooks=[nb]))
    assert "````diff\n## modified /cells/0/source:\n+  ```python" in md  # outer fence is longer
    assert f"… {len(body) - SETTINGS.max_diff_lines} more lines in the HTML report." in md

    huge = rv.NotebookDiff(
        "notebooks/eda.ipynb", "modified", "\n".join(["+" + "x" * 2000] * 100), ""
    )
    md = rr.render_markdown(_review(tmp_path, notebooks=[huge]))
    assert len(md) < rr.MAX_COMMENT_CHARS and "100 more lines in the HTML report." in md


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_review_reports_a_real_change_and_renders_in_chromium(
    project_copy: Path, tmp_path: Path
) -> None:
    root = project_copy
    base_metrics = json.loads(run(["git", "show", "main:build/eval/metrics.json"], root).stdout)
    base_lock = yaml.safe_load(run(["git", "show", "main:dvc.lock"], root).stdout)
    make_change(root)

    result = run([sys.executable, "-m", "pipelines.cli", "review", "--base", "main"], root)
    assert "reports/review/review.md" in result.stdout
    md = (root / "reports/review/review.md").read_text()
    page_path = root / "reports/review/review.html"
    page = page_path.read_text()

    # The changed param, with both values.
    assert "| `train.learning_rate` | 0.1 | 0.2 |" in md
    assert f"Review of `{BRANCH}` against `main`" in md
    assert "do not match the working tree" not in md  # dvc repro ran: nothing stale
    assert "Quality gates" not in md  # no gate report in this project

    # Metric deltas, computed from the two metrics files.
    metrics = json.loads((root / "build/eval/metrics.json").read_text())
    for name in ("auc", "log_loss"):
        old, new = base_metrics[name], metrics[name]
        assert old != new
        row = next(line for line in md.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"| {old:.4f} | {new:.4f} | {new - old:+.4f} (" in row, row
        assert ("better" if (new > old) == (name == "auc") else "worse") in row

    # Better or worse only past review.metric_tolerance / relative_tolerance (params.yaml).
    rows = re.findall(
        r"^\| `([\w.]+)` \| ([-\d.,]+) \| [-\d.,]+ \| ([-+\d.,]+) \(.*\| (.+) \|$", md, re.M
    )
    assert rows
    for name, old, delta, mark in rows:
        tolerance = SETTINGS.tolerance(name, float(old.replace(",", "")))
        assert tolerance is not None
        past = abs(float(delta.replace(",", ""))) > tolerance
        assert past == ("within tolerance" not in mark), (name, delta, mark)
    assert "differ from main although" not in md  # every changed output is the branch's

    # Data and model hashes from dvc.lock: the model changed, the dataset did not.
    lock = yaml.safe_load((root / "dvc.lock").read_text())

    def md5(lockfile: dict, stage: str, path: str) -> str:
        return next(o["md5"] for o in lockfile["stages"][stage]["outs"] if o["path"] == path)

    old_model, new_model = md5(base_lock, "train", "build/model"), md5(lock, "train", "build/model")
    assert old_model != new_model
    model_row = next(line for line in md.splitlines() if "`build/model`" in line)
    assert old_model[:8] in model_row and new_model[:8] in model_row
    assert "| `train` |" in model_row and "model ctr-model" in model_row
    unchanged = next(line for line in md.splitlines() if line.startswith("Unchanged:"))
    assert "`build/dataset`" in unchanged and "`data`" in unchanged
    assert "`reports/train.html` | re-run in this change" in md
    assert "| `build_dataset` | `reports/build_dataset.html` |  |" in md

    # nbdime's diff of the changed source notebook.
    assert "`notebooks/train.ipynb` (modified)" in md
    assert "## inserted before /cells/1:" in md and f"+      {NOTE}" in md
    assert NOTE in page and "ansi-green-fg" in page

    # The HTML page: self-contained, plots drawn, executed notebooks linked.
    assert "<script" not in page
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", page)
    assert page.count('src="data:image/svg+xml;base64,') >= 3
    assert 'href="../train.html"' in page and (root / "reports/train.html").is_file()

    png = tmp_path / "review.png"
    screenshot(page_path.as_uri(), png, tmp_path / "chromium-profile")
    from PIL import Image

    with Image.open(png) as shot:
        assert shot.size == (1280, 2400)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert png.stat().st_size > 50_000
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank page

    # A bad base revision is a clear error, and nothing is overwritten.
    before = md
    bad = run(
        [sys.executable, "-m", "pipelines.cli", "review", "--base", "no-such-branch"],
        root,
        check=False,
    )
    assert bad.returncode == 1
    assert "base revision 'no-such-branch' does not exist" in bad.stderr
    assert (root / "reports/review/review.md").read_text() == before

    # Edit params without `dvc repro`: dvc status names the stale stage.
    set_param(root, "train.max_leaf_nodes", 15)
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout)
    assert rv.stale_stages(status)["train"].startswith("changed deps (train.max_leaf_nodes)")
