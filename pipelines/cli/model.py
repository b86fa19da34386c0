"""``mlops model ...``: the release commands over the git-tag registry (docs/registry.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.common import (
    fail,
    forms,
    open_registry,
    resolve_version,
    serve_hint,
    version_name,
    version_number,
)

app = typer.Typer(
    help="Model releases: register, promote, roll back, inspect (git-tag registry).",
    no_args_is_help=True,
)
VERSION_HELP = f"The version: {forms('MODEL')}."


def _guard(action: Callable[[], Any]) -> Any:
    """Run a registry action, turning its refusals into a clean CLI error."""
    from gto.exceptions import GTOException

    from pipelines.core.config import ConfigError
    from pipelines.core.lineage import LineageError
    from pipelines.registry.registry import RegistryError

    try:
        return action()
    except (RegistryError, ConfigError, LineageError, GTOException) as exc:
        fail(str(exc))


def _gate_lines(report: Any) -> list[str]:
    return [f"  {'PASS' if r.passed else 'FAIL'}  {r.gate}: {r.detail}" for r in report.results]


@app.command("register")
def register(
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            help="Version to register, e.g. v1.2.0 or ctr-model@v1.2.0 "
            "(default: v1.0.0 first, then the latest bumped by --bump).",
        ),
    ] = None,
    bump: Annotated[
        str, typer.Option(help="Part to bump when --version is not given: major, minor or patch.")
    ] = "minor",
    reason: Annotated[
        str | None, typer.Option(help="Why this version is registered (kept in the tag).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only evaluate the gates; change nothing.")
    ] = False,
) -> None:
    """Gate and register the model of the current commit (run after `dvc repro` + commit).

    Checks a clean working tree, evaluates the quality gates from params.yaml
    (release.gates), pushes DVC outputs so the bento is retrievable for rollback,
    commits the gate report and tags `<model>@<version>` and `<model>#staging#N`.
    """
    version = version_number(version) if version else None
    reg = open_registry()
    if dry_run:
        report = _guard(lambda: reg.check_gates(version, bump))
        # The dry-run report is what `mlops review` shows as the gate verdicts of a change.
        folder = reg.root / reg.settings.gate_reports_dir
        written = report.write(folder)
        for path in written:
            path.replace(folder / f"dry-run{path.suffix}")
        typer.echo(
            f"gates for {report.artifact} {report.version} (dry run, registry unchanged; "
            f"report: {reg.settings.gate_reports_dir}/dry-run.json):"
        )
        typer.echo("\n".join(_gate_lines(report)))
        if not report.passed:
            raise typer.Exit(1)
        return
    for item in _guard(reg.repair):
        typer.echo(
            f"completed an interrupted registration: {item['version']} staged ({item['tag']})"
        )
        if reg.versions().get(item["version"]) == reg.head():
            typer.echo("this commit is that version; nothing else to register")
            return
    result = _guard(lambda: reg.register(version, bump, reason))
    for item in result.get("repaired", []):
        typer.echo(
            f"completed an interrupted registration: {item['version']} staged ({item['tag']})"
        )
    typer.echo("\n".join(_gate_lines(result["report"])))
    typer.echo(
        f"registered {result['artifact']} {result['version']} at commit "
        f"{result['commit'][:12]} (pipeline run {result['pipeline_commit'][:12]}); "
        f"stage: staging"
    )
    typer.echo(f"tags: {', '.join(result['tags'])}")
    typer.echo(
        f"gate report: {', '.join(result['report_paths'])} | bento {result['bento_tag']} "
        "pushed to the DVC remote"
    )
    typer.echo(f"next: mlops model promote {result['version']} --to canary")


@app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help=VERSION_HELP)],
    to: Annotated[str, typer.Option("--to", help="Target stage: canary or prod.")],
    approver: Annotated[str | None, typer.Option(help="Who approved (required for prod).")] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why (required for prod and with --emergency).")
    ] = None,
    emergency: Annotated[
        bool,
        typer.Option(
            "--emergency",
            help="Skip canary / canary health evidence; needs --reason and is recorded "
            "as an emergency.",
        ),
    ] = False,
) -> None:
    """Promote a version one stage forward: staging -> canary -> prod.

    Promotion to prod needs --approver and --reason and canary evidence (the
    version went through canary, and its canary health report says healthy when
    the report exists). The annotated tag records who, when and why.
    """
    name = version_name(version)
    reg = open_registry()
    version = resolve_version(reg, name)
    result = _guard(lambda: reg.promote(version, to, approver, reason, emergency))
    f = result["fields"]
    typer.echo(
        f"promoted {result['artifact']} {result['version']} to {result['stage']} "
        f"(tag {result['tag']})" + (" as an EMERGENCY" if emergency else "")
    )
    if f.get("skipped_stages"):
        typer.echo(f"skipped: {', '.join(f['skipped_stages'])} (reason: {f['reason']})")
    evidence = f.get("canary_evidence")
    if evidence:
        typer.echo(
            "canary evidence: "
            + (
                f"{evidence['file']} healthy={evidence['healthy']}"
                if evidence["present"]
                else f"no health report at {evidence['file']}; canary since "
                f"{evidence.get('canary_since')}"
            )
        )
    if f.get("replaces"):
        typer.echo(f"replaces {f['replaces']} in prod; `mlops model rollback` returns to it")


@app.command("rollback")
def rollback(
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the tag).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the bento archive (default: params.yaml release.deploy_dir)."
        ),
    ] = None,
    import_bento: Annotated[
        bool,
        typer.Option(
            "--import/--no-import",
            help="Import the archive into the project's BentoML store, ready to serve.",
        ),
    ] = True,
) -> None:
    """Return prod to the previous prod version, re-deploying its stored bento (no rebuild).

    Fetches the previous version's bento archive from DVC by its recorded hash,
    verifies it, imports it into the BentoML store, then tags the previous
    version `#prod` and the rolled-back one `#prod!`, with the reason.
    """
    reg = open_registry()
    record = _guard(lambda: reg.rollback(reason, out, import_bento))
    typer.echo(
        f"rolled back {reg.artifact} prod: {record['prod_before']} -> "
        f"{record['prod_after']} (tags {', '.join(record['tags'])})"
    )
    typer.echo(
        f"bento {record['bento_tag']}: {record['archive']} (md5 {record['archive_md5']}, "
        f"BentoML store: {record['bentoml_store']})"
    )
    typer.echo(serve_hint(reg.root / reg.project.base.bentoml_home, record["bento_tag"]))


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Which version holds each stage, and every registered version."""
    reg = open_registry()
    state = _guard(reg.status)
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    typer.echo(f"{state['artifact']}:")
    for stage, held in state["stages"].items():
        if held is None:
            typer.echo(f"  {stage:<8} -")
            continue
        extra = f" approved by {held['approver']}" if held.get("approver") else ""
        extra += " EMERGENCY" if held.get("emergency") else ""
        typer.echo(
            f"  {stage:<8} {held['version']:<9} since {held['since']} by {held['by']}"
            f"{extra}: {held.get('reason') or ''}  [{held['bento_tag']}]"
        )
    typer.echo("versions:")
    for v in state["versions"]:
        typer.echo(
            f"  {v['version']:<9} commit {v['commit'][:12]} registered {v['registered_at']}"
            f" by {v['registered_by']}  stages: {', '.join(v['stages']) or '-'}"
        )
    for item in state.get("incomplete", []):
        typer.echo(f"INCOMPLETE: {item['version']} {item['problem']}; fix: {item['fix']}")


@app.command("repair")
def repair() -> None:
    """Complete registrations interrupted between the version tag and the staging tag.

    `mlops model status` lists them as INCOMPLETE; `mlops model register` also completes them first.
    """
    reg = open_registry()
    done = _guard(reg.repair)
    if not done:
        typer.echo("registry consistent: nothing to repair")
        return
    for item in done:
        typer.echo(
            f"completed the registration of {reg.artifact} {item['version']}: "
            f"staged ({item['tag']})"
        )


@app.command("history")
def history(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    version: Annotated[
        str | None, typer.Option("--version", help="Only this version's events: " + VERSION_HELP)
    ] = None,
) -> None:
    """Every registry change, oldest first: when, what, who, approver and why."""
    name = version_name(version) if version else None
    reg = open_registry()
    events = [e.to_dict() for e in _guard(reg.events)]
    if name:
        # A number needs no lookup (a deregistered version still has its history).
        wanted = name.version or resolve_version(reg, name)
        events = [e for e in events if e["version"] == wanted]
    if as_json:
        typer.echo(json.dumps(events, indent=2, default=str))
        return
    if not events:
        typer.echo(f"no registry events for {reg.artifact} yet")
    for e in events:
        who = e["author"] + (f", approved by {e['approver']}" if e["approver"] else "")
        flag = " EMERGENCY" if e["emergency"] else ""
        typer.echo(
            f"{e['timestamp']}  {e['action']:<17} {e['version'] or '':<9} "
            f"{e['stage'] or '':<8} {who}{flag}: {e['reason'] or e['title']}  [{e['tag']}]"
        )


@app.command("lineage")
def lineage(
    version: Annotated[
        str | None,
        typer.Argument(help=VERSION_HELP + " Default: the model, i.e. prod, else the latest."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the lineage chain of a registered version, from git commit to bento tag.

    git commit -> raw data hash -> dataset hash -> feature set -> params -> model
    hash -> metrics -> executed notebooks -> registry events -> bento tag, each
    hash read from git and DVC at the version's commit.
    """
    from pipelines.core.lineage import lineage_text

    name = version_name(version) if version else None
    reg = open_registry()
    record = _guard(lambda: reg.lineage(name.spec if name else reg.artifact))
    if as_json:
        typer.echo(json.dumps(record, indent=2, default=str))
    else:
        typer.echo(lineage_text(record))
