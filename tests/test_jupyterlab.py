"""``make lab``: a real JupyterLab server (loopback, token, project root, project kernel),
stage and monitoring notebooks run through its kernels, and the UI in headless Chromium.

One server for the module, in a copy of the small-preset project. Through the server's
kernels the test runs ``build_dataset`` (defaults: the small-preset sample, written to
the scratch folder) and ``monitors/drift_report.ipynb`` (defaults: the request log);
every stage notebook runs with its defaults under nbval in tests/test_notebooks.py.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.support.chromium import DevToolsPage
from tests.support.jupyter import LabServer, run_notebook, start_lab, text_of
from tests.support.loadtest import free_port
from tests.support.project import REPO, run

pytestmark = pytest.mark.slow
KERNEL = "mlops-notebooks"


def test_make_lab_runs_the_tested_command() -> None:
    dry = run(["make", "-n", "lab", "PORT=8123"], REPO)
    assert "mlops notebooks lab --port 8123" in dry.stdout, dry.stdout


@pytest.fixture(scope="module")
def lab(small_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    base = tmp_path_factory.mktemp("lab")
    root = base / "project"
    shutil.copytree(small_project, root, symlinks=True)
    run([sys.executable, "-m", "pipelines.cli", "notebooks", "sample"], root)
    server = start_lab(root, free_port(), secrets.token_hex(16), base / "jupyter")
    try:
        yield server
    finally:
        server.stop()


def test_lab_serves_the_project_root_on_loopback_with_a_token(lab: LabServer) -> None:
    info = json.loads(next(lab.runtime_dir.glob("jpserver-*.json")).read_text())
    assert info["url"].startswith(f"http://127.0.0.1:{lab.port}/")
    assert info["token"] == lab.token and Path(info["root_dir"]) == lab.root
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token: no files
        lab.request("GET", "/api/contents/notebooks", token=False)
    assert refused.value.code == 403
    listing = lab.request("GET", "/api/contents/notebooks")
    assert {"train.ipynb", "build_dataset.ipynb"} <= {e["name"] for e in listing["content"]}
    specs = lab.request("GET", "/api/kernelspecs")
    assert specs["default"] == KERNEL
    assert specs["kernelspecs"][KERNEL]["spec"]["display_name"] == f"Python 3 ({KERNEL})"
    page = lab.request("GET", "/lab")  # page config lists the prebuilt extensions
    assert "nbdime-jupyterlab" in page


def test_notebooks_run_through_the_server_kernel_with_their_defaults(lab: LabServer) -> None:
    root = lab.root
    model_md5 = (root / "build/model/model.joblib").read_bytes()
    cells = run_notebook(lab, "notebooks/build_dataset.ipynb")
    assert "wrote" in text_of(cells[-1]) and "build/scratch/dataset" in text_of(cells[-1])
    assert (root / "build/scratch/dataset/meta.json").is_file()
    assert (root / "build/model/model.joblib").read_bytes() == model_md5
    status = run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout
    assert json.loads(status) == {}, status  # the pipeline's outputs are untouched

    # The monitoring notebook: with its defaults, the latest day of the request log.
    run([sys.executable, "-m", "pipelines.cli", "monitor", "replay", "--last-days", "2"], root)
    from pipelines.monitoring.requests import read_request_log

    times = read_request_log(root / "monitors/requests")["request_time"]
    report = run_notebook(lab, "monitors/drift_report.ipynb")
    first = text_of(report[1])
    assert "requests from" in first and "monitors/requests" in first, first
    shown = int(re.search(r"([\d,]+) requests from", first)[1].replace(",", ""))
    in_last_day = int((times > times.max() - pd.Timedelta("1D")).sum())
    assert shown == in_last_day < len(times), (first, len(times))


def test_notebook_and_kernel_render_in_jupyterlab(lab: LabServer, tmp_path: Path) -> None:
    url = f"{lab.url}/lab/tree/notebooks/train.ipynb?token={lab.token}"
    with DevToolsPage(tmp_path / "chromium", size=(1400, 1000), offline=True) as page:
        page.goto(url)
        page.wait_for(
            "[...document.querySelectorAll('.jp-Notebook .jp-Cell')].length >= 4", timeout=180
        )
        kernel = page.wait_for(
            "(() => { const k = document.querySelector('.jp-Toolbar-kernelName');"
            " return k && k.textContent.includes('mlops-notebooks') && k.textContent; })()",
            timeout=120,
        )
        tab = page.evaluate(
            "[...document.querySelectorAll('.lm-TabBar-tabLabel')].map(e => e.textContent)"
        )
        first_cell = page.evaluate(
            "document.querySelector('.jp-Notebook .jp-Cell .jp-InputArea').innerText"
        )
        png = tmp_path / "jupyterlab.png"
        page.screenshot(png)
        (tmp_path / "jupyterlab.html").write_text(page.dom())
    assert kernel.strip() == f"Python 3 ({KERNEL})"
    assert "train.ipynb" in tab
    assert "Train the click model" in first_cell
    from PIL import Image

    with Image.open(png) as shot:
        assert shot.size == (1400, 1000)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # the UI drew, not a blank page
