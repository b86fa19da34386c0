"""``mlops review``: the pull-request review report (docs/review.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli.common import fail
from pipelines.core import config

app = typer.Typer()


@app.command("review")
def review(
    base: Annotated[str, typer.Option(help="Git revision to compare the working tree with.")] = (
        "main"
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for review.md and review.html (default: review.out_dir)."),
    ] = None,
    details_url: Annotated[
        str | None,
        typer.Option(
            help="Where the HTML report is published (e.g. the CI run's artifacts); "
            "linked from review.md."
        ),
    ] = None,
) -> None:
    """Review report of the working tree against BASE: params, metrics, plots, hashes, notebooks.

    Writes review.md (a pull-request comment) and review.html (self-contained page).
    """
    from pipelines.review.render import write_review
    from pipelines.review.review import ReviewError

    try:
        md, page, result = write_review(config.project_root(), base, out, details_url)
    except (ReviewError, config.ConfigError) as exc:
        fail(str(exc))
    if result.stale:
        typer.secho(
            "warning: pipeline outputs are stale (run `dvc repro`): " + ", ".join(result.stale),
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"review of the working tree against {base} ({result.base_commit[:8]}): "
        f"{len(result.params)} params, {len(result.changed_metrics)} metrics, "
        f"{len(result.changed_hashes)} DVC outputs, {len(result.notebooks)} notebooks "
        "changed"
    )
    typer.echo(f"markdown (PR comment): {md}\nHTML report: {page}")
