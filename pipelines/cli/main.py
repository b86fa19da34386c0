"""``mlops``: the project's command line (data, summary, notebook hygiene, features)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.core import config
from pipelines.core.settings import load_settings

app = typer.Typer(
    help="Notebook-first research-to-production toolkit.",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Raw event data: generate, pull or regenerate.", no_args_is_help=True)
notebooks_app = typer.Typer(help="Stage notebook hygiene.", no_args_is_help=True)
features_app = typer.Typer(
    help="Feature definitions, the online store and offline/online parity.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(notebooks_app, name="notebooks")
app.add_typer(features_app, name="features")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@data_app.command("generate")
def data_generate(
    out: Path | None = typer.Option(None, help="Output folder (default: base.raw_dir)."),
    preset: str | None = typer.Option(None, help="Size preset (default: generate.preset)."),
    seed: int | None = typer.Option(None, help="Seed (default: base.seed)."),
    scenario: str | None = typer.Option(None, help="Drift scenario (default: generate.scenario)."),
    scenario_start_day: int | None = typer.Option(None, help="First day the scenario applies."),
) -> None:
    """Generate sample impression events deterministically from params.yaml."""
    from pipelines.simulation.generate import generate_events, write_events

    params = config.load_params()
    out = out or config.project_root() / config.get(params, "base.raw_dir")
    events = generate_events(
        preset or config.get(params, "generate.preset"),
        seed if seed is not None else config.get(params, "base.seed"),
        str(config.get(params, "generate.start")),
        scenario or config.get(params, "generate.scenario"),
        scenario_start_day
        if scenario_start_day is not None
        else config.get(params, "generate.scenario_start_day"),
    )
    path = write_events(events, out)
    typer.echo(
        f"wrote {len(events):,} events ({events['ts'].min()} .. {events['ts'].max()}) to {path}"
    )


@data_app.command("obtain")
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
        _fail(
            f"regenerated data/ (md5 {actual}) does not match data.dvc (md5 {expected}). "
            "Either params.yaml "
            "`generate`/`base.seed` changed since data.dvc was written, or the generator changed. "
            "Restore them, or accept the new data with `dvc add data` and commit data.dvc."
        )
    # Verified: record it in the DVC cache and the remote so the next clone can pull.
    subprocess.run([*dvc, "commit", "-f", "data.dvc"], cwd=root, capture_output=True, check=True)
    subprocess.run([*dvc, "push", "data.dvc"], cwd=root, capture_output=True)
    typer.echo(f"regenerated data/ matches data.dvc (md5 {expected}) and was pushed to the remote")


@app.command("summary")
def summary() -> None:
    """Print what the pipeline produced: key metrics, model and bento, where reports are."""
    root = config.project_root()
    params = config.load_params()
    metrics_file = root / config.get(params, "evaluate.metrics_file")
    bento_file = root / config.get(params, "package.bento_dir") / "bento.json"
    if not metrics_file.is_file() or not bento_file.is_file():
        _fail("no pipeline outputs yet; run `make run` (or `dvc repro`)")
    m = json.loads(metrics_file.read_text())
    b = json.loads(bento_file.read_text())
    reports = sorted((root / config.get(params, "base.reports_dir")).glob("*.html"))
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
    typer.echo(
        f"serve it: BENTOML_HOME={config.get(params, 'base.bentoml_home')} "
        f".venv/bin/bentoml serve {b['bento_tag']} --port 3000"
    )


@notebooks_app.command("check")
def notebooks_check(paths: list[Path] | None = typer.Argument(None)) -> None:
    """Fail if a source notebook carries outputs or execution counts (commit them stripped)."""
    import nbformat

    root = config.project_root()
    files = paths or sorted((root / "notebooks").rglob("*.ipynb"))
    dirty = []
    for path in files:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
                dirty.append(path)
                break
    if dirty:
        _fail(
            "source notebooks carry outputs: "
            + ", ".join(map(str, dirty))
            + "; strip them with `nbstripout <file>` (installed by `make setup` as a git filter)"
        )
    typer.echo(f"{len(files)} source notebook(s) have no outputs")


@notebooks_app.command("git-setup")
def notebooks_git_setup() -> None:
    """Configure this repo's git: nbstripout strips outputs on commit, nbdime diffs and merges."""
    from pipelines.cli.notebooks import GitSetupError, configure

    try:
        done = configure(config.project_root())
    except GitSetupError as exc:
        _fail(str(exc))
    typer.echo(
        f"git configured for notebooks in {done.git_dir}: nbstripout filter, nbdime diff "
        "and merge drivers (see .gitattributes)"
    )


@features_app.command("catalog")
def features_catalog(
    out: Path = typer.Option(None, help="Write markdown here instead of stdout."),
) -> None:
    """Print (or write) the markdown catalog of the declared feature sets."""
    from pipelines.features.definitions import FEATURE_SETS, feature_catalog_markdown

    text = "\n".join(feature_catalog_markdown(fs) for fs in FEATURE_SETS.values())
    if out:
        out.write_text(text)
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text)


def _open_store(store: str | None) -> Any:
    from pipelines.features.online_store import OnlineStore, StoreError

    root = config.project_root()
    try:
        return OnlineStore.from_settings(load_settings(root), root, url=store)
    except StoreError as exc:
        _fail(str(exc))


@features_app.command("ingest")
def features_ingest(
    file: Path = typer.Argument(
        ..., help="Events: .parquet, .csv, .jsonl, or a folder of .parquet."
    ),
    store: str | None = typer.Option(None, help="Store URL (default: features.online.url)."),
    batch_size: int = typer.Option(50_000, help="Rows per atomic batch."),
    rejected_out: Path | None = typer.Option(
        None, help="Where rejected rows go (default: <FILE>.rejected.parquet beside the input)."
    ),
    fail_on_reject: bool = typer.Option(False, help="Exit 1 if any row was rejected."),
) -> None:
    """Ingest a batch of raw events into the online store (incremental materialization)."""
    import pandas as pd

    from pipelines.features.contracts import ContractViolation
    from pipelines.features.online_store import read_events_file

    if not file.exists():
        _fail(f"{file} does not exist")
    events = read_events_file(file)
    online = _open_store(store)
    rejected = []
    totals: dict[str, float] = {}
    try:
        for start in range(0, max(len(events), 1), batch_size):
            chunk = events.iloc[start : start + batch_size]
            try:
                report = online.ingest(
                    chunk, where=f"{file} rows {start}..{start + len(chunk) - 1}"
                )
            except ContractViolation as exc:
                _fail(f"{exc.report}\nNothing from {file} was ingested from this batch on.")
            typer.echo(report.summary())
            if report.rejected:
                rejected.append(report.rejected_rows)
            for key in ("rows", "impressions", "clicks", "duplicates", "rejected", "late"):
                totals[key] = totals.get(key, 0) + getattr(report, key)
        stats = online.stats()
    finally:
        online.close()
    if rejected:
        target = rejected_out or file.with_name(f"{file.stem}.rejected.parquet")
        frame = pd.concat(rejected, ignore_index=True)
        frame.astype({c: "str" for c in frame.columns if frame[c].dtype == object}).to_parquet(
            target, index=False
        )
        typer.secho(
            f"{len(frame):,} rejected row(s) with their reasons written to {target}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"done: {int(totals.get('rows', 0)):,} row(s), "
        f"{int(totals.get('rejected', 0)):,} rejected, "
        f"{int(totals.get('late', 0)):,} late; store {stats['url']} watermark {stats['watermark']}"
    )
    if rejected and fail_on_reject:
        raise typer.Exit(1)


@features_app.command("lookup")
def features_lookup(
    user: str,
    item: str,
    surface: str,
    device: str,
    at: str | None = typer.Option(None, help="Query time (ISO 8601, default: now)."),
    store: str | None = typer.Option(None, help="Store URL (default: features.online.url)."),
) -> None:
    """Print one online feature vector with its as-of time, age and staleness."""
    import pandas as pd

    from pipelines.monitoring.parity import parse_time_ms

    online = _open_store(store)
    try:
        result = online.lookup(
            user, item, surface, device, None if at is None else parse_time_ms(at)
        )
    finally:
        online.close()
    row = result.features.iloc[0].to_dict()
    as_of = pd.Timestamp(result.as_of_ms, unit="ms", tz="UTC") if result.as_of_ms else None
    typer.echo(
        json.dumps(
            {
                "features": row,
                "as_of": str(as_of),
                "age_seconds": float(result.age_seconds[0]),
                "stale": bool(result.stale[0]),
                "exact": bool(result.exact[0]),
                "feature_set": result.feature_set,
                "fingerprint": result.fingerprint,
            },
            indent=2,
            default=float,
        )
    )


@features_app.command("parity")
def features_parity(
    store: str | None = typer.Option(None, help="Store URL (default: features.online.url)."),
    events: Path | None = typer.Option(None, help="The ingested events (default: base.raw_dir)."),
    served: Path | None = typer.Option(
        None,
        help="Served vectors to check instead of sampling the store: the service's request "
        "log folder (serving.request_log_dir), or parquet/jsonl with user_id, item_id, "
        "surface, device, ts and the feature columns.",
    ),
    sample: int = typer.Option(1000, help="Vectors to sample."),
    at: str | None = typer.Option(
        None, help="Query time for store samples (default: watermark + 1 ms)."
    ),
    seed: int = typer.Option(0, help="Sampling seed."),
    engine: str | None = typer.Option(None, help="Offline engine (default: features.engine)."),
    json_out: Path | None = typer.Option(None, help="Also write the report as JSON here."),
    max_mismatch_rate: float = typer.Option(0.0, help="Exit 1 if any feature mismatches more."),
) -> None:
    """Recompute sampled online vectors offline and report the mismatch rate per feature."""
    from pipelines.features.contracts import RAW_EVENTS, ContractViolation, validate
    from pipelines.features.online_store import read_events_file
    from pipelines.monitoring.parity import load_served, parity_report

    params = config.load_params()
    root = config.project_root()
    events_path = events or root / config.get(params, "base.raw_dir")
    for path in (events_path, served):
        if path is not None and not path.exists():
            _fail(f"{path} does not exist")
    try:  # recompute from the log exactly as the training pipeline would read it
        log = validate(RAW_EVENTS, read_events_file(events_path), str(events_path))
    except ContractViolation as exc:
        _fail(exc.report)
    online = _open_store(store)
    try:
        report = parity_report(
            online,
            log,
            served=None if served is None else load_served(served),
            sample=sample,
            at=at,
            seed=seed,
            engine=engine or str(config.get(params, "features.engine")),
        )
    finally:
        online.close()
    typer.echo(report.table())
    if json_out:
        from pipelines.core.io import write_json

        write_json(json_out, report.to_dict())
        typer.echo(f"wrote {json_out}")
    worst = max(report.mismatch_rate.values(), default=0.0)
    if worst > max_mismatch_rate:
        _fail(
            f"offline/online parity broken: worst feature mismatch rate {worst:.4%} > "
            f"{max_mismatch_rate:.4%}; see the table above"
        )


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
        _fail(str(exc))
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


params_app = typer.Typer(help="params.yaml validation.", no_args_is_help=True)
app.add_typer(params_app, name="params")


@params_app.command("check")
def params_check(
    path: Annotated[
        Path | None, typer.Option(help="params file (default: the project's params.yaml).")
    ] = None,
) -> None:
    """Validate params.yaml (every section, every key) before running anything.

    `make run` calls it before `dvc repro`; every stage runs the same check at start.
    """
    from pipelines.core.settings import settings_from

    try:
        if path is None:
            load_settings()
        else:
            settings_from(config.load_params(path), path, path.resolve().parent)
    except config.ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"{path or 'params.yaml'}: every value is valid")


@params_app.command("docs")
def params_docs(
    out: Annotated[Path, typer.Option(help="where to write the table.")] = Path("docs/settings.md"),
) -> None:
    """Write the settings reference (every key, type, default, limits) from the settings model."""
    from pipelines.core.io import atomic_path
    from pipelines.core.settings import settings_markdown

    with atomic_path(out) as tmp:
        tmp.write_text(settings_markdown())
    typer.echo(f"wrote {out}")


# Model registry commands (register, promote, rollback, status, history, lineage).
from pipelines.cli.model import add_commands as _add_registry_commands  # noqa: E402

_add_registry_commands(app)

# Monitoring commands (drift, monitor report/replay, canary check): pipelines/cli/monitor.py
from pipelines.cli.monitor import register as _register_monitoring  # noqa: E402

_register_monitoring(app)

# Closed loop end to end (`mlops simulate`): pipelines/simulation/simulate.py, docs/monitoring.md
from pipelines.cli.simulate import simulate as _simulate  # noqa: E402

app.command("simulate")(_simulate)


if __name__ == "__main__":
    app()
