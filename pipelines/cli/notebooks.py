"""``mlops notebooks ...``: notebook hygiene, the git set-up for notebooks (nbstripout,
nbdime; docs/review.md), the sample the notebooks' defaults read and JupyterLab
(``make lab``; README "Notebooks and JupyterLab")."""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import typer

from pipelines.cli.common import fail
from pipelines.core import config
from pipelines.core.settings import load_settings
from pipelines.core.vcs import git

app = typer.Typer(
    help="Stage notebooks: hygiene, git set-up, the by-hand sample, JupyterLab.",
    no_args_is_help=True,
)

ATTRIBUTES = ".gitattributes"


class GitSetupError(RuntimeError):
    """The repository could not be configured; the message says what failed and what to do."""


_git = partial(git, error=GitSetupError)


@dataclass(frozen=True)
class GitNotebookSetup:
    """What :func:`configure` left in place (for the command's summary line)."""

    git_dir: Path
    filter_clean: str
    diff_command: str
    merge_driver: str


def _tool(root: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise GitSetupError(
            f"`python -m {' '.join(args)}` failed in {root}: "
            f"{(result.stderr or result.stdout).strip()}; is the dev environment installed "
            "(`make setup`)?"
        )


def configure(root: Path) -> GitNotebookSetup:
    """Install nbstripout's filter and nbdime's diff/merge drivers for the repository at ``root``.

    Idempotent: running it again changes nothing. Only the repository's own git
    config and its ``.gitattributes`` are touched, never the user's global config.
    """
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False) != "true":
        raise GitSetupError(f"{root} is not inside a git work tree; run `git init` first")
    root = Path(_git(root, "rev-parse", "--show-toplevel"))
    # An earlier `nbstripout --install` (its default) wrote .git/info/attributes, whose
    # `*.ipynb diff=ipynb` outranks .gitattributes; move the filter to .gitattributes.
    info_attrs = root / _git(root, "rev-parse", "--git-path", "info/attributes")
    if info_attrs.is_file() and "filter=nbstripout" in info_attrs.read_text():
        _tool(root, "nbstripout", "--uninstall")
    # The tools' own installers write their git config (and leave the committed
    # .gitattributes alone, which already names their filter and drivers); skipped
    # once done, since each costs a Python start-up.
    if not _git(root, "config", "--get", "filter.nbstripout.smudge", check=False):
        _tool(root, "nbstripout", "--install", "--attributes", ATTRIBUTES)
    if not _git(root, "config", "--get", "merge.jupyternotebook.name", check=False):
        _tool(root, "nbdime", "config-git", "--enable")
    python = shlex.quote(sys.executable)
    # --keep-id: nbstripout otherwise renumbers cell ids 0, 1, 2, ..., so inserting one
    # cell would show every later cell's id as changed in nbdime's diff.
    filter_clean = f"{python} -m nbstripout --keep-id"
    diff_command = f"{python} -m nbdime.vcs.git.diffdriver diff"
    merge_driver = f"{python} -m nbdime.vcs.git.mergedriver merge %O %A %B %L %P"
    _git(root, "config", "filter.nbstripout.clean", filter_clean)
    _git(root, "config", "diff.jupyternotebook.command", diff_command)
    _git(root, "config", "merge.jupyternotebook.driver", merge_driver)
    # `git difftool/mergetool --tool=nbdime` (nbdime's side-by-side web view), same reason.
    _git(
        root,
        "config",
        "difftool.nbdime.cmd",
        f'{python} -m nbdime.vcs.git.difftool diff "$LOCAL" "$REMOTE" "$BASE"',
    )
    _git(
        root,
        "config",
        "mergetool.nbdime.cmd",
        f'{python} -m nbdime.vcs.git.mergetool merge "$BASE" "$LOCAL" "$REMOTE" "$MERGED"',
    )
    return GitNotebookSetup(
        git_dir=Path(_git(root, "rev-parse", "--absolute-git-dir")),
        filter_clean=filter_clean,
        diff_command=diff_command,
        merge_driver=merge_driver,
    )


@app.command("check")
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
        fail(
            "source notebooks carry outputs: "
            + ", ".join(map(str, dirty))
            + "; strip them with `nbstripout <file>` (installed by `make setup` as a git filter)"
        )
    typer.echo(f"{len(files)} source notebook(s) have no outputs")


@app.command("git-setup")
def notebooks_git_setup() -> None:
    """Configure this repo's git: nbstripout strips outputs on commit, nbdime diffs and merges."""
    try:
        done = configure(config.project_root())
    except GitSetupError as exc:
        fail(str(exc))
    typer.echo(
        f"git configured for notebooks in {done.git_dir}: nbstripout filter, nbdime diff "
        "and merge drivers (see .gitattributes)"
    )


def write_sample(root: Path, force: bool = False) -> tuple[Path, bool]:
    """The sample events the notebooks' defaults read: ``notebooks.sample_preset`` under
    ``notebooks.scratch_dir/data``, generated like ``data/`` (base.seed, generate.start, no
    drift scenario). Returns the file and whether it was written (kept when present)."""
    from pipelines.simulation.generate import generate_events, write_events

    settings = load_settings(root)
    folder = root / settings.notebooks.scratch_dir / "data"
    existing = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if existing and not force:
        return existing[0], False
    events = generate_events(
        settings.notebooks.sample_preset,
        settings.base.seed,
        settings.generate.start.isoformat(),
        "none",
        0,
    )
    return write_events(events, folder), True


@app.command("sample")
def notebooks_sample(
    force: bool = typer.Option(False, "--force", help="Regenerate even if the sample exists."),
) -> None:
    """Write the small-preset sample events that the stage notebooks' defaults read."""
    root = config.project_root()
    try:
        path, written = write_sample(root, force)
    except config.ConfigError as exc:
        fail(str(exc))
    rel = path.relative_to(root)
    typer.echo(f"{'wrote' if written else 'kept'} the notebooks' sample events: {rel}")


KERNEL = "mlops-notebooks"  # registered inside .venv by `make setup`


def lab_command(root: Path, port: int, browser: bool = False) -> list[str]:
    """The JupyterLab server of ``make lab``: loopback only, the project root as its root
    folder, the project kernel as default. The token comes from ``JUPYTER_TOKEN``
    (:func:`lab_env`), so it is not visible in the process list."""
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--ServerApp.open_browser={browser}",
        f"--MappingKernelManager.default_kernel_name={KERNEL}",
        # Jupyter refuses to start as root unless told; containers and CI run as root.
        *(["--ServerApp.allow_root=True"] if os.geteuid() == 0 else []),
    ]


def lab_env(token: str) -> dict[str, str]:
    """The environment of :func:`lab_command`: the token, and the project root for notebooks."""
    if not token:
        raise ValueError("JupyterLab needs a non-empty token")
    return {**os.environ, "JUPYTER_TOKEN": token}


@app.command("lab")
def notebooks_lab(
    port: int = typer.Option(8888, min=1, max=65535, help="Loopback port to listen on."),
    browser: bool = typer.Option(False, "--browser", help="Open a web browser."),
    sample: bool = typer.Option(
        True, "--sample/--no-sample", help="Write the notebooks' sample events first if missing."
    ),
) -> None:
    """Start JupyterLab on 127.0.0.1 with a token, at the project root, kernel mlops-notebooks."""
    root = config.project_root()
    if sample:
        try:
            path, written = write_sample(root)
        except config.ConfigError as exc:
            fail(str(exc))
        if written:
            typer.echo(f"wrote the notebooks' sample events: {path.relative_to(root)}")
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_urlsafe(24)
    typer.echo(f"JupyterLab: http://127.0.0.1:{port}/lab?token={token}  (Ctrl-C stops it)")
    sys.stdout.flush()
    cmd = lab_command(root, port, browser)
    os.execve(cmd[0], cmd, lab_env(token))
