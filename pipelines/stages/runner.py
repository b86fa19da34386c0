"""Run one stage notebook with papermill and render it to HTML, all-or-nothing.

Usage (the ``cmd`` of every stage in ``dvc.yaml``)::

    python -m pipelines.stages.runner notebooks/train.ipynb reports/train.ipynb -p max_iter 200

Parameters follow papermill's ``-p NAME VALUE`` (values parsed as YAML literals).
The executed notebook and its HTML rendering replace the previous ones only when
every cell succeeded. On failure the executed copy goes to ``reports/failed/``,
the error (for a contract violation, its full report) is printed, and the
process exits non-zero so DVC stops the pipeline with earlier outputs intact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

KERNEL = os.environ.get("MLOPS_KERNEL", "mlops-notebooks")


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to a standalone HTML page (nbconvert)."""
    import nbformat
    from nbconvert import HTMLExporter

    from pipelines.core.io import atomic_path

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_path(html) as tmp:
        tmp.write_text(body, encoding="utf-8")


def run_notebook(source: Path, output: Path, parameters: dict[str, Any], cwd: Path) -> float:
    """Execute ``source`` into ``output`` (+ ``.html``); returns the wall time in seconds."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from pipelines.core.io import atomic_path

    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with atomic_path(output, suffix=".ipynb") as tmp_nb:
        try:
            pm.execute_notebook(
                str(source),
                str(tmp_nb),
                parameters=parameters,
                kernel_name=KERNEL,
                cwd=str(cwd),
                progress_bar=sys.stderr.isatty(),
                language="python",
            )
        except PapermillExecutionError as exc:
            failed = output.parent / "failed" / output.name
            failed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_nb, failed)
            render_html(failed, failed.with_suffix(".html"))
            print(
                f"\nstage notebook {source} failed in cell {exc.exec_count}: {exc.ename}",
                file=sys.stderr,
            )
            print(exc.evalue, file=sys.stderr)
            print(
                f"\nexecuted copy with the error: {failed} (and .html); previous outputs "
                f"are unchanged",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        html_tmp = tmp_nb.with_suffix(".html")
        render_html(tmp_nb, html_tmp)
        os.replace(html_tmp, output.with_suffix(".html"))
    return time.perf_counter() - started


def check_project_params(cwd: Path) -> None:
    """Refuse to start when ``params.yaml`` (in ``cwd``, where DVC runs stages) is invalid.

    Runs before papermill starts a kernel, so a bad value costs well under a
    second and no output is touched. Outside a project (no params.yaml) there is
    nothing to check: the notebook's own parameter defaults apply.
    """
    from pipelines.core.config import ConfigError
    from pipelines.core.settings import load_settings

    if not (cwd / "params.yaml").is_file():
        return
    try:
        load_settings(cwd)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.stages.runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"notebook {args.notebook} does not exist")
    params = {name: yaml.safe_load(value) for name, value in args.parameter}
    check_project_params(Path.cwd())
    seconds = run_notebook(args.notebook, args.output, params, Path.cwd())
    print(f"{args.notebook} -> {args.output} (+ .html) in {seconds:.1f}s")


if __name__ == "__main__":
    main()
