"""``mlops features ...``: feature catalog, online store, offline/online parity
(docs/feature_store.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from pipelines.cli.common import fail
from pipelines.core import config
from pipelines.core.settings import load_settings

app = typer.Typer(
    help="Feature definitions, the online store and offline/online parity.", no_args_is_help=True
)


@app.command("catalog")
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
        fail(str(exc))


@app.command("ingest")
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
        fail(f"{file} does not exist")
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
                fail(f"{exc.report}\nNothing from {file} was ingested from this batch on.")
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


@app.command("materialize")
def features_materialize(
    events: Path = typer.Option(..., help="The event log: a .parquet file or a folder of them."),
    store: str | None = typer.Option(
        None, help="URL of an EMPTY store (default: features.online.url)."
    ),
    engine: str = typer.Option("pandas", help="pandas (one machine) or spark."),
    master: str = typer.Option("local[*]", help="Spark master URL (engine spark)."),
    chunk_rows: int = typer.Option(200_000, help="States / seen ids written per chunk."),
    rejected_out: Path | None = typer.Option(
        None, help="Where rejected rows go (default: <EVENTS>.rejected.parquet beside the input)."
    ),
) -> None:
    """Bulk-load an empty online store from a whole event log (same states as ingest)."""
    import time

    from pipelines.features.contracts import ContractViolation
    from pipelines.features.online_store import StoreError, read_events_file

    if engine not in ("pandas", "spark"):
        fail(f"--engine {engine!r} is not one of pandas, spark")
    if not events.exists():
        fail(f"{events} does not exist")
    start = time.perf_counter()
    online = _open_store(store)

    def progress(message: str) -> None:
        typer.echo(f"[{time.perf_counter() - start:6.1f} s] {message}")

    try:
        online.require_empty()
        if engine == "spark":
            from pipelines.features.spark_engine import spark_session
            from pipelines.features.spark_materialize import bulk_load_spark

            spark = spark_session(master)
            progress(f"reading {events} on Spark ({master})")
            report = bulk_load_spark(
                online, spark.read.parquet(str(events)), chunk_rows=chunk_rows, progress=progress
            )
        else:
            log = read_events_file(events)
            progress(f"read {len(log):,} row(s) from {events}")
            report = online.bulk_load(
                log, where=str(events), chunk_rows=chunk_rows, progress=progress
            )
        stats = online.stats()
    except (StoreError, ContractViolation) as exc:
        fail(str(exc))
    finally:
        online.close()
    if report.rejected:
        target = rejected_out or events.with_name(f"{events.stem}.rejected.parquet")
        frame = report.rejected_rows
        frame.astype({c: "str" for c in frame.columns if frame[c].dtype == object}).to_parquet(
            target, index=False
        )
        typer.secho(
            f"{report.rejected:,} rejected row(s); {len(frame):,} with their reasons written "
            f"to {target}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"materialized {report.entities_written:,} entity state(s) from {report.rows:,} row(s) "
        f"({report.impressions:,} event(s), {report.clicks:,} click(s), "
        f"{report.duplicates:,} duplicate(s), {report.rejected:,} rejected) in "
        f"{time.perf_counter() - start:.1f} s with {engine} into {stats['url']}; "
        f"watermark {stats['watermark']}"
    )


def _one_line(exc: BaseException) -> str:
    """A report of several lines (a contract violation) as one line; a Spark error's first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not lines[0].endswith(":"):
        return lines[0]
    return lines[0] + " " + "; ".join(line.removeprefix("- ") for line in lines[1:])


@app.command("build")
def features_build(
    events: str = typer.Option(
        ...,
        help="Raw events: a parquet file, folder or glob at any Hadoop path "
        "(a local path, file:, hdfs://, s3a://).",
    ),
    out: str = typer.Option(
        ..., help="Output folder (any Hadoop path); replaced only once the new one is complete."
    ),
    master: str | None = typer.Option(
        None, help="Spark master URL (default: features.spark_master)."
    ),
    feature_set: str | None = typer.Option(
        None, help="Feature set (default: features.feature_set)."
    ),
) -> None:
    """Build the training set on Spark, written partitioned by split and day."""
    import time

    from pipelines.core.config import ConfigError
    from pipelines.features.definitions import FeatureDefinitionError, get_feature_set

    start = time.perf_counter()

    def progress(message: str) -> None:
        typer.echo(f"[{time.perf_counter() - start:6.1f} s] {message}")

    try:
        settings = load_settings(config.project_root())
        fs = get_feature_set(feature_set or settings.features.feature_set)
    except (ConfigError, FeatureDefinitionError) as exc:
        fail(str(exc))
    master = master or settings.features.spark_master
    from pipelines.features.spark_engine import SparkUnavailableError, spark_session

    try:
        progress(f"starting Spark ({master})")
        spark = spark_session(master)
    except SparkUnavailableError as exc:
        fail(str(exc))
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    from pipelines.features.spark_dataset import META_FILE, build_dataset_spark

    try:
        result = build_dataset_spark(
            spark, events, out, fs, settings.build_dataset, progress=progress
        )
    except (ValueError, OSError) as exc:  # bad input, a contract violation, no training window
        fail(_one_line(exc))
    except (PySparkException, Py4JError) as exc:
        fail(f"Spark failed building from {events}: {_one_line(exc)}; {out} was left untouched")
    meta, days = result["meta"], result["days"]
    splits = ", ".join(
        f"{s} {meta['rows'][s]:,} row(s) over {len(days[s])} day(s)"
        + (f" ({days[s][0]}..{days[s][-1]})" if days[s] else "")
        for s in ("train", "valid", "test")
    )
    typer.echo(
        f"built {sum(meta['rows'].values()):,} training row(s) ({fs.name}) from "
        f"{meta['raw_events']:,} event(s) in {time.perf_counter() - start:.1f} s: {splits}; "
        f"{meta['warmup_rows_dropped']:,} warm-up row(s) dropped. Written to {out} "
        f"(split=/day= partitions, {out.rstrip('/')}/{META_FILE}); read a split back with "
        f"pipelines.features.spark_dataset.read_split({out!r}, 'train')"
    )


@app.command("lookup")
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


@app.command("parity")
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

    root = config.project_root()
    settings = load_settings(root)
    events_path = events or root / settings.base.raw_dir
    for path in (events_path, served):
        if path is not None and not path.exists():
            fail(f"{path} does not exist")
    try:  # recompute from the log exactly as the training pipeline would read it
        log = validate(RAW_EVENTS, read_events_file(events_path), str(events_path))
    except ContractViolation as exc:
        fail(exc.report)
    online = _open_store(store)
    try:
        report = parity_report(
            online,
            log,
            served=None if served is None else load_served(served),
            sample=sample,
            at=at,
            seed=seed,
            engine=engine or settings.features.engine,
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
        fail(
            f"offline/online parity broken: worst feature mismatch rate {worst:.4%} > "
            f"{max_mismatch_rate:.4%}; see the table above"
        )
