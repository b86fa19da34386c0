"""``mlops summary``: what the last pipeline run produced (README "Run it")."""

from __future__ import annotations

import json

import typer

from pipelines.cli.common import fail, serve_hint
from pipelines.core import config
from pipelines.core.settings import load_settings

app = typer.Typer()


@app.command("summary")
def summary() -> None:
    """Print what the pipeline produced: key metrics, model and bento, where reports are."""
    root = config.project_root()
    settings = load_settings(root)
    metrics_file = root / settings.evaluate.metrics_file
    bento_file = root / settings.package.bento_dir / "bento.json"
    if not metrics_file.is_file() or not bento_file.is_file():
        fail("no pipeline outputs yet; run `make run` (or `dvc repro`)")
    m = json.loads(metrics_file.read_text())
    b = json.loads(bento_file.read_text())
    reports = sorted((root / settings.base.reports_dir).glob("*.html"))
    typer.echo("\n== pipeline summary ==")
    typer.echo(
        f"test AUC {m['auc']:.4f} | log loss {m['log_loss']:.4f} | calibration error "
        f"{m['calibration_error']:.4f} | rule baseline AUC {m['baseline']['auc']:.4f} "
        f"| test rows {m['n']:,}"
    )
    per = " | ".join(
        f"{s} AUC {v.get('auc', float('nan')):.4f}" for s, v in m["per_surface"].items()
    )
    typer.echo(f"per surface: {per}")
    typer.echo(f"model {b['model_tag']} | features {b['features_tag']} | bento {b['bento_tag']}")
    typer.echo(f"bento archive: {b['archive']} ({b['archive_bytes'] / 1e6:.1f} MB)")
    typer.echo("reports: " + ", ".join(str(p.relative_to(root)) for p in reports))
    typer.echo(serve_hint(root / settings.base.bentoml_home, b["bento_tag"]))
