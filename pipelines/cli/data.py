"""``mlops data ...``: generate, pull or regenerate the raw events (README "Run it")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

from pipelines.cli.common import fail
from pipelines.core import config
from pipelines.core.settings import load_settings

app = typer.Typer(help="Raw event data: generate, pull or regenerate.", no_args_is_help=True)


@app.command("generate")
def data_generate(
    out: Path | None = typer.Option(None, help="Output folder (default: base.raw_dir)."),
    preset: str | None = typer.Option(None, help="Size preset (default: generate.preset)."),
    seed: int | None = typer.Option(None, help="Seed (default: base.seed)."),
    scenario: str | None = typer.Option(None, help="Drift scenario (default: generate.scenario)."),
    scenario_start_day: int | None = typer.Option(None, help="First day the scenario applies."),
) -> None:
    """Generate sample impression events deterministically from params.yaml."""
    from pipelines.simulation.generate import generate_events, write_events

    try:
        settings = load_settings()
    except config.ConfigError as exc:
        fail(str(exc))
    gen = settings.generate
    out = out or config.project_root() / settings.base.raw_dir
    events = generate_events(
        preset or gen.preset,
        seed if seed is not None else settings.base.seed,
        gen.start.isoformat(),
        scenario or gen.scenario,
        scenario_start_day if scenario_start_day is not None else gen.scenario_start_day,
    )
    path = write_events(events, out)
    typer.echo(
        f"wrote {len(events):,} events ({events['ts'].min()} .. {events['ts'].max()}) to {path}"
    )


@app.command("obtain")
def data_obtain() -> None:
    """Pull data/ from the DVC remote; if the remote is empty, regenerate it and verify data.dvc."""
    from pipelines.core.dvcfiles import dvc_dir_md5, dvc_file_hash

    root = config.project_root()
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run(
        [*dvc, "status", "data.dvc", "--json"], cwd=root, capture_output=True, text=True
    )
    if status.returncode == 0 and json.loads(status.stdout or "{}") == {}:
        typer.echo("data/ already matches data.dvc")
        return
    pulled = subprocess.run([*dvc, "pull", "data.dvc"], cwd=root, capture_output=True, text=True)
    if pulled.returncode == 0:
        typer.echo("pulled data/ from the DVC remote")
        return
    typer.echo("DVC remote has no copy of data/; regenerating it from params.yaml (generate.*)")
    data_generate(None, None, None, None, None)
    expected = dvc_file_hash(root / "data.dvc")
    actual = dvc_dir_md5(root / "data")
    if actual != expected:
        fail(
            f"regenerated data/ (md5 {actual}) does not match data.dvc (md5 {expected}). "
            "Either params.yaml "
            "`generate`/`base.seed` changed since data.dvc was written, or the generator changed. "
            "Restore them, or accept the new data with `dvc add data` and commit data.dvc."
        )
    # Verified: record it in the DVC cache and the remote so the next clone can pull.
    subprocess.run([*dvc, "commit", "-f", "data.dvc"], cwd=root, capture_output=True, check=True)
    subprocess.run([*dvc, "push", "data.dvc"], cwd=root, capture_output=True)
    typer.echo(f"regenerated data/ matches data.dvc (md5 {expected}) and was pushed to the remote")
