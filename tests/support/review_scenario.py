"""The change a reviewer sees in the review tests and in the sample of docs/review.md.

``make_change`` turns a project copy (on ``main``, pipeline run and committed)
into a pull-request branch: a higher learning rate, a note about it in the train
notebook, and ``dvc repro`` of the stages downstream of ``train``, committed.

Run as a script it rebuilds the sample report in docs/review.md from scratch
(small preset, about three minutes on two cores)::

    .venv/bin/python -m tests.support.review_scenario
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import nbformat

from tests.support.project import REPO, init_project, run, set_param

BRANCH = "raise-learning-rate"
NOTE = "Learning rate raised to 0.2: the boosted trees reach a low training loss in fewer rounds."
SAMPLE_START = "<!-- review-sample:start -->"
SAMPLE_END = "<!-- review-sample:end -->"


def make_change(root: Path) -> None:
    """Branch, change ``train.learning_rate`` and the train notebook, reproduce, commit."""
    run(["git", "switch", "-q", "-c", BRANCH], root)
    set_param(root, "train.learning_rate", 0.2)
    path = root / "notebooks" / "train.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_markdown_cell(NOTE)
    cell.id = "lr-note"
    nb.cells.insert(1, cell)
    nbformat.write(nb, path)
    run([sys.executable, "-m", "dvc", "repro"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "Raise the learning rate to 0.2"], root)


def review(root: Path, *args: str) -> str:
    """Run ``mlops review`` in ``root`` and return the markdown it wrote."""
    run([sys.executable, "-m", "pipelines.cli", "review", *args], root)
    return (root / "reports" / "review" / "review.md").read_text()


def write_sample(markdown: str, doc: Path) -> None:
    """Replace the sample between the markers in ``doc`` with ``markdown``."""
    text = doc.read_text()
    pattern = re.compile(re.escape(SAMPLE_START) + ".*?" + re.escape(SAMPLE_END), re.S)
    block = f"{SAMPLE_START}\n{markdown.rstrip()}\n{SAMPLE_END}"
    new, count = pattern.subn(lambda _: block, text)
    if count != 1:
        raise SystemExit(f"{doc} needs one {SAMPLE_START} ... {SAMPLE_END} block")
    doc.write_text(new)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = init_project(Path(tmp) / "project")
        run([sys.executable, "-m", "dvc", "repro"], root)
        run(["git", "add", "-A"], root)
        run(["git", "commit", "-qm", "pipeline outputs"], root)
        make_change(root)
        markdown = review(root, "--base", "main")
    write_sample(markdown, REPO / "docs" / "review.md")
    print(f"wrote the sample report into {REPO / 'docs' / 'review.md'}")


if __name__ == "__main__":
    main()
