"""Run one stage notebook with papermill and render it to HTML, all-or-nothing.

Usage (the ``cmd`` of every stage in ``dvc.yaml``)::

    python3 -m pipelines.stages.runner notebooks/train.ipynb reports/train.ipynb -p max_iter 200 ...

Every parameter of the notebook's ``parameters`` cell must be passed: its defaults are
for runs by hand (small-preset sample, ``notebooks.scratch_dir``), never for the pipeline.
Details: docs/architecture.md, README "Notebooks and JupyterLab".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.core.timings import TIMINGS_ENV
from pipelines.stages.environment import EnvironmentMismatch, ensure_locked_environment

KERNEL = os.environ.get("MLOPS_KERNEL", "mlops-notebooks")
# Notebook and cell metadata that changes from run to run without changing the result.
VOLATILE_NOTEBOOK_KEYS = ("start_time", "end_time", "duration", "environment_variables")
VOLATILE_CELL_KEYS = ("start_time", "end_time", "duration")
# Warnings kept out of the executed notebooks, each because it would make a report depend on
# the machine rather than on deps and params. pandera imports pyspark.pandas whenever pyspark
# is installed (the optional spark extra), and pyspark warns about pandas 3 naming the
# venv's absolute path: reports would differ by clone folder and by the extra installed.
KERNEL_WARNING_FILTERS = ("ignore:PySpark does not yet fully support pandas:FutureWarning",)


def _kernel_manager_class() -> type:
    """A quiet kernel: local IPC sockets, and no interrupt when a finished run shuts it down.

    Over TCP the kernel warns that its transport is unencrypted; jupyter_client
    interrupts a kernel before asking it to shut down, which makes the kernel print
    "KeyboardInterrupt caught in kernel" after every stage. Interrupting a running
    cell (a timeout) still works.
    """
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class QuietKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        async def _async_interrupt_kernel(self) -> None:
            if getattr(self, "shutting_down", False):
                return  # the notebook has finished: nothing to interrupt
            await super()._async_interrupt_kernel()

    return QuietKernelManager


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to a standalone HTML page (nbconvert)."""
    import nbformat
    from nbconvert import HTMLExporter

    from pipelines.core.io import atomic_path

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_path(html) as tmp:
        tmp.write_text(body, encoding="utf-8")


def scrub_notebook(path: Path, output: Path) -> list[dict[str, Any]]:
    """Remove volatile metadata from an executed notebook in place; returns the cell timings.

    papermill records start/end times and durations per cell and per notebook,
    the temporary path it wrote to and a random id for the parameters cell it
    injects; nbclient records execution timestamps.
    None of them is a result, so they go to the timings file instead.
    """
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    for key in VOLATILE_NOTEBOOK_KEYS:
        meta.pop(key, None)
    if "output_path" in meta:
        meta["output_path"] = output.as_posix()
    cells = []
    for index, cell in enumerate(nb.cells):
        cell_meta = cell.metadata.get("papermill", {})
        if cell_meta.get("duration") is not None:
            cells.append({"cell": index, "seconds": round(float(cell_meta["duration"]), 3)})
        for key in VOLATILE_CELL_KEYS:
            cell_meta.pop(key, None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill gives the cell a random id
    nbformat.write(nb, path)
    return cells


def run_notebook(
    source: Path, output: Path, parameters: dict[str, Any], cwd: Path
) -> dict[str, Any]:
    """Execute ``source`` into ``output`` (+ ``.html``); returns the run's timings."""
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
                log_output=False,
                kernel_manager_class=_kernel_manager_class(),
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
        cells = scrub_notebook(tmp_nb, output)
        html_tmp = tmp_nb.with_suffix(".html")
        render_html(tmp_nb, html_tmp)
        os.replace(html_tmp, output.with_suffix(".html"))
    return {"seconds": round(time.perf_counter() - started, 3), "cells": cells}


def notebook_parameters(path: Path) -> list[str]:
    """Names assigned in the notebook's ``parameters`` cell (papermill's tag), in order."""
    import ast

    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return [
                target.id
                for node in ast.parse(cell.source).body
                if isinstance(node, ast.Assign)
                for target in node.targets
                if isinstance(target, ast.Name)
            ]
    return []


def check_parameters(notebook: Path, passed: dict[str, Any]) -> None:
    """Refuse a stage command that leaves a parameter to its default or passes an unknown one.

    The defaults point at the by-hand scratch folder; a pipeline run that fell back
    on one would read or write there instead of the stage's DVC outputs.
    """
    declared = notebook_parameters(notebook)
    missing = [name for name in declared if name not in passed]
    unknown = sorted(set(passed) - set(declared))
    problems = []
    if missing:
        problems.append(f"not passed: {', '.join(missing)}")
    if unknown:
        problems.append(f"not in its parameters cell: {', '.join(unknown)}")
    if problems:
        print(
            f"error: stage command for {notebook}: {'; '.join(problems)}. A stage passes every "
            "parameter with `-p NAME VALUE` (dvc.yaml); the defaults are for runs by hand",
            file=sys.stderr,
        )
        raise SystemExit(2)


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


def check_kernel() -> None:
    """The notebook kernel must run this interpreter's environment, not another clone's."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        print(
            f"error: Jupyter kernel {KERNEL!r} is not installed in {sys.prefix}; "
            "run `make setup` (it registers the kernel inside .venv)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    kernel_bin = os.path.realpath(Path(spec.argv[0]).parent)
    if kernel_bin != os.path.realpath(Path(sys.executable).parent):
        print(
            f"error: Jupyter kernel {KERNEL!r} ({spec.resource_dir}) runs {spec.argv[0]}, "
            f"not this environment's {sys.executable}; remove that kernel "
            f"(`jupyter kernelspec remove {KERNEL}`) and run `make setup`",
            file=sys.stderr,
        )
        raise SystemExit(2)


def timings_file(output: Path) -> Path:
    """Where a stage's wall times go: ``reports/timings/<stage>.json``, not a DVC output."""
    return output.parent / "timings" / f"{output.stem}.json"


def write_timings(path: Path, run: dict[str, Any]) -> None:
    """Merge the runner's timings with what the notebook recorded (``pipelines.core.timings``)."""
    from pipelines.core.io import atomic_path

    recorded = json.loads(path.read_text()) if path.is_file() else {}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**recorded, **run}, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ensure_locked_environment(Path.cwd(), raw_argv, "pipelines.stages.runner")
    except EnvironmentMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    import yaml

    from pipelines.stages.outputs import restore_previous_outputs

    parser = argparse.ArgumentParser(
        prog="python3 -m pipelines.stages.runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("notebook", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE")
    )
    args = parser.parse_args(raw_argv)
    if not args.notebook.is_file():
        parser.error(f"notebook {args.notebook} does not exist")
    params = {name: yaml.safe_load(value) for name, value in args.parameter}
    root = Path.cwd()
    # First of all: DVC deleted this stage's outputs; put the recorded ones back, so a
    # refusal below or a failure of the notebook leaves them as they were.
    restored = restore_previous_outputs(root, args.output.as_posix())
    if restored:
        print(f"previous outputs kept until this stage succeeds: {', '.join(restored)}")
    check_parameters(args.notebook, params)
    check_project_params(root)
    check_kernel()
    timings = timings_file(args.output)
    timings.unlink(missing_ok=True)
    os.environ[TIMINGS_ENV] = str(timings.resolve())
    os.environ["PYTHONWARNINGS"] = ",".join(
        f for f in (os.environ.get("PYTHONWARNINGS"), *KERNEL_WARNING_FILTERS) if f
    )  # the kernel inherits this environment
    run = run_notebook(args.notebook, args.output, params, root)
    write_timings(timings, {"stage_seconds": run["seconds"], "cells": run["cells"]})
    print(f"{args.notebook} -> {args.output} (+ .html) in {run['seconds']:.1f}s")


if __name__ == "__main__":
    main()
