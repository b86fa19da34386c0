"""``mlops params check``: validate params.yaml before anything runs (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.common import fail
from pipelines.core import config

app = typer.Typer(help="params.yaml validation.", no_args_is_help=True)


@app.command("check")
def params_check(
    path: Annotated[
        Path | None, typer.Option(help="params file (default: the project's params.yaml).")
    ] = None,
) -> None:
    """Validate params.yaml (every section, every key) before running anything.

    `make run` calls it before `dvc repro`; every stage runs the same check at start.
    """
    from pipelines.core.params_check import check_params

    try:
        check_params(path)
    except config.ConfigError as exc:
        fail(str(exc))
    typer.echo(f"{path or 'params.yaml'}: every value is valid")
