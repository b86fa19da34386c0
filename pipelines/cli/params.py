"""``mlops params check|docs``: validate params.yaml; write docs/settings.md from the model."""

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
    from pipelines.core.settings import load_settings, settings_from

    try:
        if path is None:
            load_settings()
        else:
            settings_from(config.load_params(path), path, path.resolve().parent)
    except config.ConfigError as exc:
        fail(str(exc))
    typer.echo(f"{path or 'params.yaml'}: every value is valid")


@app.command("docs")
def params_docs(
    out: Annotated[Path, typer.Option(help="where to write the table.")] = Path("docs/settings.md"),
) -> None:
    """Write the settings reference (every key, type, default, limits) from the settings model."""
    from pipelines.core.io import atomic_path
    from pipelines.core.settings import settings_markdown

    with atomic_path(out) as tmp:
        tmp.write_text(settings_markdown())
    typer.echo(f"wrote {out}")
