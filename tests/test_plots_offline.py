"""`dvc plots show` / `dvc plots diff` pages render with no network (.dvc/plots/offline.html),
each plot declared once in dvc.yaml, and the pages git-ignored."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.chromium import DevToolsPage
from tests.support.project import REPO, run

TEMPLATE = REPO / ".dvc" / "plots" / "offline.html"
RENDERED = "document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length"


def test_each_plot_is_declared_once_and_plot_pages_are_ignored() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "plots" not in dvc, "curves are declared by the stage that writes them, once"
    files = [next(iter(p)) for p in dvc["stages"]["evaluate"]["plots"]]
    assert len(files) == len(set(files)) == 3
    titles = [next(iter(p.values()))["title"] for p in dvc["stages"]["evaluate"]["plots"]]
    assert titles == ["ROC", "Precision-recall", "Calibration"]
    ignored = run(["git", "check-ignore", "plots/index.html", "dvc_plots/index.html"], REPO)
    assert ignored.stdout.split() == ["plots/index.html", "dvc_plots/index.html"]


def test_the_template_inlines_vega_and_loads_nothing() -> None:
    page = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # no CDN tags from DVC
    assert not re.search(r"<(?:script|link)[^>]+(?:src|href)=", page)
    for lib in ("vega@5.", "vega-lite@5.", "vega-embed@6."):
        assert f"<script>/* {lib}" in page
    config = run([sys.executable, "-m", "dvc", "config", "plots.html_template"], REPO)
    assert config.stdout.strip() == "plots/offline.html"  # relative to .dvc/
    for name in ("vega", "vega-lite", "vega-embed"):  # BSD-3-Clause texts, kept beside it
        licence = (TEMPLATE.parent / "vendor" / f"LICENSE-{name}").read_text()
        assert "Redistribution and use in source and binary forms" in licence


def _rendered(page_file: Path, profile: Path, png: Path | None = None) -> int:
    """How many vega views the page draws in Chromium with every host name unresolvable."""
    with DevToolsPage(profile, offline=True) as page:
        page.goto(page_file.as_uri())
        page.wait_for("document.readyState === 'complete'", 60)
        try:
            count = int(page.wait_for(f"{RENDERED} >= 3 && {RENDERED}", 30))
        except AssertionError:
            count = int(page.evaluate(RENDERED) or 0)
        if png is not None:
            page.screenshot(png)
        assert not page.errors or count == 0, page.errors
    return count


@pytest.mark.slow
def test_plots_show_and_diff_render_offline_in_chromium(
    small_project: Path, tmp_path: Path
) -> None:
    root = small_project
    shown = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], root).stdout)
    assert sorted(shown["data"]) == sorted(
        f"build/eval/plots/{n}.csv" for n in ("roc", "precision_recall", "calibration")
    )
    pages = {}
    for name, args in (("show", ["show"]), ("diff", ["diff", "HEAD"])):
        out = tmp_path / name
        run([sys.executable, "-m", "dvc", "plots", *args, "-o", str(out)], root)
        html = (out / "index.html").read_text(encoding="utf-8")
        assert "cdn.jsdelivr" not in html and "vegaEmbed(" in html
        pages[name] = out / "index.html"

    png = tmp_path / "plots.png"  # the diff page; the show page is the same template
    assert _rendered(pages["diff"], tmp_path / "chromium-diff", png) == 3
    from PIL import Image

    with Image.open(png) as shot:
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # axes, lines and labels, not a blank page

    # The same page with DVC's default <script src> tags (CDN) draws nothing offline.
    from dvc_render.vega import VegaRenderer

    html = pages["show"].read_text(encoding="utf-8")
    cdn = re.sub(r"<script>/\* vega.*?</script>", "", html, flags=re.S)
    cdn = cdn.replace("<title>", VegaRenderer.SCRIPTS + "<title>", 1)
    (tmp_path / "cdn.html").write_text(cdn, encoding="utf-8")
    assert _rendered(tmp_path / "cdn.html", tmp_path / "chromium-cdn") == 0
