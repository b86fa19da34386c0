"""``mlops monitor ...``: drift, the drift report, replayed traffic, the canary guard
(docs/monitoring.md; exit codes in docs/cli.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipelines.cli.common import EXIT_BREACH, EXIT_INSUFFICIENT, fail, registered_version

app = typer.Typer(
    help="Monitoring: drift and alerts, the drift report, replayed traffic, the canary guard.",
    no_args_is_help=True,
)


# Options shared by the commands that read the request log (one definition, same help).
LOG_DIR_OPTION = typer.Option(
    None, help="Request-log shard folder (default: serving.request_log_dir)."
)
LOG_FILE_OPTION = typer.Option(None, help="A request log as one parquet or JSONL file instead.")
CLICKS_OPTION = typer.Option(None, help="Click parquet file/folder (default: monitor.clicks_path).")
SINCE_OPTION = typer.Option(None, help="Only requests at or after this UTC time.")
UNTIL_OPTION = typer.Option(None, help="Only requests before this UTC time.")
LAST_OPTION = typer.Option(
    None, help="Only the last span of the log, ending at its newest request (e.g. 1D, 6h)."
)


def _load(
    log_dir: Path | None,
    log_file: Path | None,
    since: str | None,
    until: str | None,
    last: str | None = None,
):
    """Config, the normalized request log and the clicks (None when there are none)."""
    from pipelines.core.config import ConfigError
    from pipelines.monitoring import report as monitor_report
    from pipelines.monitoring.monitor import MonitorConfig
    from pipelines.monitoring.requests import RequestLogError

    try:
        cfg = MonitorConfig.load()
        log, source = monitor_report.load_log(
            cfg, str(log_dir or ""), str(log_file or ""), since or "", until or "", last or ""
        )
    except (ConfigError, RequestLogError, FileNotFoundError) as exc:
        fail(str(exc))
    return cfg, log, source


def _clicks(cfg, clicks: Path | None):
    from pipelines.monitoring import report as monitor_report

    try:
        return monitor_report.load_clicks(cfg, str(clicks or ""))
    except ValueError as exc:
        fail(str(exc))


@app.command("drift")
def drift(
    log_dir: Path | None = LOG_DIR_OPTION,
    log_file: Path | None = LOG_FILE_OPTION,
    clicks: Path | None = CLICKS_OPTION,
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    last: str | None = LAST_OPTION,
    retrain: str | None = typer.Option(
        None, help="On a retraining trigger run: none, repro or exp (default: monitor.retrain.run)."
    ),
    alerts: bool = typer.Option(True, help="Send alerts for breaches (webhook + log)."),
    webhook: str | None = typer.Option(
        None, help="Webhook URL (default: monitor.alerts.webhook_url)."
    ),
    profiles: bool = typer.Option(
        False, help="Also write one whylogs profile per window (monitor.live_profile_dir)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
    alert_log: Path | None = typer.Option(
        None,
        help="File the alert JSON lines are appended to (default: <monitor.out_dir>/alerts.log).",
    ),
    show_alerts: bool = typer.Option(False, help="Also print the alert JSON lines (stderr)."),
) -> None:
    """Drift, serving signals and online quality of a window of traffic; alert and trigger."""
    from pipelines.monitoring.console import format_result, route_alert_log
    from pipelines.monitoring.monitor import check, save_result
    from pipelines.monitoring.requests import write_window_profiles

    if retrain not in (None, "none", "repro", "exp"):
        fail(f"--retrain must be none, repro or exp, got {retrain!r}")
    cfg, log, source = _load(log_dir, log_file, since, until, last)
    click_table = _clicks(cfg, clicks)
    route_alert_log(alert_log or cfg.out_dir / "alerts.log", echo=show_alerts)
    try:
        result = check(
            cfg,
            log,
            click_table,
            alerts=cfg.alert_sink(webhook) if alerts else None,
            retrain_run=retrain,
        )
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    path = save_result(cfg, result)
    if profiles:
        written = write_window_profiles(log, cfg.live_profile_dir, cfg.window, cfg.feature_names)
        typer.echo(f"wrote {len(written)} window profile(s) to {cfg.live_profile_dir}")
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(format_result(result, source, len(log)))
    typer.echo(f"result: {path.relative_to(cfg.root)} (and latest.json)")
    if result.breached:
        raise typer.Exit(EXIT_BREACH)


@app.command("report")
def monitor_report_cmd(
    log_dir: Path | None = LOG_DIR_OPTION,
    log_file: Path | None = LOG_FILE_OPTION,
    clicks: Path | None = CLICKS_OPTION,
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    last: str | None = LAST_OPTION,
    events: Path | None = typer.Option(
        None, help="Raw events parquet: also compute value-level skew."
    ),
    out: Path | None = typer.Option(
        None, help="Executed notebook path (default: monitor.report_out)."
    ),
) -> None:
    """Execute the drift report notebook (papermill) and render it to HTML."""
    from pipelines.monitoring import report as monitor_report
    from pipelines.monitoring.monitor import MonitorConfig

    cfg, _, _ = _load(log_dir, log_file, since, until, last)  # fail fast, before starting a kernel
    params = {
        "log_dir": str(log_dir or ""),
        "log_file": str(log_file or ""),
        "clicks_path": str(clicks or ""),
        "since": since or "",
        "until": until or "",
        "last": last or "",
        "events_path": str(events or ""),
    }
    output = monitor_report.render(cfg, params, out.resolve() if out else None)
    assert isinstance(cfg, MonitorConfig)
    typer.echo(f"report: {output} and {output.with_suffix('.html')}")


@app.command("replay")
def monitor_replay(
    scenario: str = typer.Option(
        "none",
        help="Drift scenario (none, surface_shift, ctr_drop, new_items).",
    ),
    scenario_start_day: int = typer.Option(0, help="First day the scenario applies."),
    preset: str | None = typer.Option(None, help="Size preset (default: generate.preset)."),
    seed: int | None = typer.Option(
        None, help="Seed (default: base.seed: the world the model was trained on)."
    ),
    last_days: int = typer.Option(
        2, help="Replay the last N days as requests; earlier days are history."
    ),
    model_dir: Path | None = typer.Option(None, help="Model folder (default: train.out_dir)."),
    out: Path | None = typer.Option(None, help="Shard folder (default: serving.request_log_dir)."),
    events_out: Path | None = typer.Option(
        None,
        help="Also write the generated events here (parquet), e.g. for the report's value skew.",
    ),
) -> None:
    """Write the request log and clicks the service would have produced for generated traffic."""
    import pandas as pd

    from pipelines.core import config
    from pipelines.core.settings import load_settings
    from pipelines.monitoring.monitor import MonitorConfig
    from pipelines.monitoring.quality import clicks_from_events
    from pipelines.monitoring.requests import write_request_log_shard
    from pipelines.simulation.generate import generate_events
    from pipelines.simulation.replay import ReplayModel, replay

    try:
        settings = load_settings()
    except config.ConfigError as exc:
        fail(str(exc))
    cfg = MonitorConfig.load(params=settings.model_dump(mode="json"))
    try:
        events = generate_events(
            preset or settings.generate.preset,
            seed if seed is not None else settings.base.seed,
            settings.generate.start.isoformat(),
            scenario,
            scenario_start_day,
        )
    except ValueError as exc:
        fail(str(exc))
    model_path = model_dir or cfg.root / settings.train.out_dir
    if not (model_path / "model.joblib").is_file():
        fail(f"no model in {model_path}; run `dvc repro train` first")
    start = events["ts"].max().floor("D") - pd.Timedelta(days=last_days - 1)
    requests = events[events["ts"] >= start]
    log = replay(events, requests, ReplayModel.load(model_path))
    folder = out or cfg.request_log_dir
    shard = write_request_log_shard(log, folder, f"replay-{scenario}")
    clicks = clicks_from_events(requests)
    cfg.clicks_path.mkdir(parents=True, exist_ok=True)
    clicks_file = cfg.clicks_path / f"clicks-replay-{scenario}.parquet"
    clicks.to_parquet(clicks_file, index=False)
    typer.echo(
        f"wrote {len(log):,} requests to {shard} and {len(clicks):,} clicks to {clicks_file}"
    )
    if events_out:
        events_out.parent.mkdir(parents=True, exist_ok=True)
        events.to_parquet(events_out, index=False)
        typer.echo(f"wrote {len(events):,} events to {events_out}")


@app.command("canary")
def canary_check(
    log_dir: Path | None = LOG_DIR_OPTION,
    log_file: Path | None = LOG_FILE_OPTION,
    clicks: Path | None = CLICKS_OPTION,
    since: str | None = SINCE_OPTION,
    version: str | None = typer.Option(
        None,
        help="Registry version of the canary, e.g. v1.2.0 or ctr-model@v1.2.0 "
        "(default: the one in stage 'canary').",
    ),
    service_url: str | None = typer.Option(
        None, help="Service base URL for the kill switch (default: monitor.canary.service_url)."
    ),
    dry_run: bool = typer.Option(
        False, help="Judge only: no kill switch, registry record, report or alert."
    ),
    webhook: str | None = typer.Option(
        None, help="Webhook URL (default: monitor.alerts.webhook_url)."
    ),
) -> None:
    """Compare canary with prod; roll back a breaching canary, certify a healthy one."""
    from pipelines.monitoring.canary import guard

    version = registered_version(version)
    cfg, log, source = _load(log_dir, log_file, since, None)
    click_table = _clicks(cfg, clicks)
    outcome = guard(
        log,
        cfg.canary,
        cfg.root,
        click_table,
        version=version,
        service_url=service_url,
        alerts=None if dry_run else cfg.alert_sink(webhook),
        act=not dry_run,
    )
    report = outcome.report
    typer.echo(
        f"== canary {outcome.version or report.canary_model} vs prod {report.prod_model} "
        f"({report.rows['canary']:,} canary / {report.rows['prod']:,} prod rows from {source})"
    )
    for c in report.checks:
        typer.echo(
            f"  {c.status:8s} {c.name:16s} canary {c.canary} prod {c.prod} limit {c.limit} "
            f"{c.detail}"
        )
    typer.echo(f"decision: {report.decision}")
    for key, value in outcome.actions.items():
        typer.echo(f"  {key}: {value if not isinstance(value, dict) else json.dumps(value)}")
    for err in outcome.errors:
        typer.secho(f"  problem: {err}", fg=typer.colors.YELLOW, err=True)
    if report.decision == "breach":
        raise typer.Exit(EXIT_BREACH)
    if report.decision == "insufficient_data":
        raise typer.Exit(EXIT_INSUFFICIENT)
