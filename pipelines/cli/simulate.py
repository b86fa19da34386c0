"""``mlops simulate``: the closed loop end to end (docs/monitoring.md "Closed loop")."""

from __future__ import annotations

from pathlib import Path

import typer

from pipelines.cli.common import fail, registered_version

app = typer.Typer()


@app.command("simulate")
def simulate(
    scenario: str = typer.Option(
        "surface_shift",
        help="Drift scenario of pipelines.simulation.generate: surface_shift, ctr_drop, "
        "new_items; or none, the undrifted control run (stops at the drift step, exit 3).",
    ),
    scenario_start_day: int | None = typer.Option(
        None, help="First day of the drift (default: simulate.scenario_start_day)."
    ),
    requests: int | None = typer.Option(
        None, help="Requests before the canary (default: simulate.requests)."
    ),
    canary_requests: int | None = typer.Option(
        None, help="Requests during the canary (default: simulate.canary_requests)."
    ),
    canary_share: float | None = typer.Option(
        None, help="Share of users on the candidate (default: simulate.canary_share)."
    ),
    bad_canary: bool = typer.Option(
        False,
        "--bad-canary",
        help="Make the candidate fail in serving (/admin/fault) to show the automatic rollback.",
    ),
    candidate: str | None = typer.Option(
        None,
        help="Canary this already registered version (e.g. v1.1.0 or ctr-model@v1.1.0) "
        "instead of retraining and registering one.",
    ),
    url: str | None = typer.Option(
        None,
        help="Use a running service at this URL instead of starting one (needs --release-file).",
    ),
    release_file: Path | None = typer.Option(
        None, help="With --url: the release file that service reads (its CTR_RELEASE_FILE)."
    ),
    log_dir: Path | None = typer.Option(
        None, help="With --url: its request-log folder (default: serving.request_log_dir)."
    ),
    webhook: str | None = typer.Option(
        None, help="Alert webhook URL (default: monitor.alerts.webhook_url)."
    ),
) -> None:
    """Replay a drift scenario through the running service and close the loop.

    traffic -> drift -> alert -> retrain (dvc repro) -> register (gates) -> canary ->
    canary check -> promote to prod, or automatic rollback of a bad canary.
    The command commits the retrained outputs and writes registry tags in this
    repository: run it on a branch or a copy when that is not wanted. Exit codes: 0 the
    loop closed (promoted, or rolled back with --bad-canary), 1 a step failed, 2 the
    canary was rolled back although not forced to fail, 3 the loop stopped early.
    """
    from pipelines.core import config
    from pipelines.core.settings import SimulateSettings, load_settings
    from pipelines.simulation.simulate import Simulation, render_summary

    candidate = registered_version(candidate)
    try:
        root = config.project_root()
        overrides = {
            "scenario_start_day": scenario_start_day,
            "requests": requests,
            "canary_requests": canary_requests,
            "canary_share": canary_share,
        }
        section = load_settings(root).simulate.model_dump()
        section.update({k: v for k, v in overrides.items() if v is not None})
        settings = SimulateSettings(**section)
        sim = Simulation(
            root,
            scenario,
            settings,
            bad_canary=bad_canary,
            candidate=candidate,
            url=url,
            release_file=release_file.resolve() if release_file else None,
            log_dir=log_dir.resolve() if log_dir else None,
            webhook=webhook,
            echo=typer.echo,
        )
    except (config.ConfigError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    result = sim.run()
    for line in render_summary(result):
        typer.echo(line)
    if result.exit_code == 1:
        fail(result.message)
    if result.exit_code:
        typer.secho(f"note: {result.message}", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(result.exit_code)
