"""``mlops review``: what a change does to params, metrics, plots, data hashes and notebooks.

Reviewers of a pull request should read what the change *does*, not raw
``.ipynb`` JSON. DVC, nbdime and nbconvert already do the hard parts; this module
collects their answers for the working tree against a base revision and renders
them twice:

Details: docs/review.md.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.core.dvcfiles import artifacts, dvcfile_outs, lock_out_entries, stage_names
from pipelines.core.settings import ReviewSettings
from pipelines.core.vcs import git, git_run, git_show
from pipelines.registry.gates import GateReport
from pipelines.review.plots import PlotDiff, plot_diffs

WORKSPACE = "workspace"  # DVC's name for the working tree in its diff output


class ReviewError(RuntimeError):
    """The review could not be built; the message names the cause and the fix."""


# --------------------------------------------------------------------------- settings


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ParamChange:
    """One parameter whose value differs between the base and the working tree."""

    file: str
    name: str
    old: Any
    new: Any


@dataclass(frozen=True)
class MetricChange:
    """One metric at both revisions, with its delta and how to read it."""

    file: str
    name: str
    old: Any
    new: Any
    diff: float | None
    direction: str | None  # "higher" / "lower" is better, None when not configured
    tolerance: float | None = None  # |diff| up to this is noise (review.metric_tolerance)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    @property
    def within_tolerance(self) -> bool:
        """Changed, but by no more than the tolerance: reported, never as better or worse."""
        return (
            self.changed
            and self.diff is not None
            and self.tolerance is not None
            and abs(self.diff) <= self.tolerance
        )

    @property
    def significant(self) -> bool:
        """Changed past its tolerance (or new, removed, or not numeric)."""
        return self.changed and not self.within_tolerance

    @property
    def verdict(self) -> str:
        """``better``/``worse``, ``changed`` (no direction known), ``within tolerance``,
        ``new``/``removed`` or ``""``."""
        if self.old is None and self.new is not None:
            return "new"
        if self.new is None and self.old is not None:
            return "removed"
        if not self.changed:
            return ""
        if self.within_tolerance:
            return "within tolerance"
        if self.diff is None or self.direction is None:
            return "changed"
        up = self.diff > 0
        return "better" if up == (self.direction == "higher") else "worse"


@dataclass(frozen=True)
class HashChange:
    """One DVC-tracked output (``dvc.lock`` stage out or ``.dvc`` file) at both revisions."""

    source: str  # stage name, or the .dvc file
    path: str
    label: str  # e.g. "artifact ctr-model (model)", "raw data"
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    @property
    def status(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "changed" if md5_of(self.old) != md5_of(self.new) else "unchanged"


@dataclass(frozen=True)
class NotebookDiff:
    """nbdime's diff of one changed source notebook: plain text and HTML renderings."""

    path: str
    status: str  # added / modified / deleted
    text: str
    html: str


@dataclass(frozen=True)
class ExecutedNotebook:
    """The HTML rendering of an executed stage notebook (a DVC out under ``reports/``)."""

    stage: str
    path: str
    changed: bool
    exists: bool


@dataclass
class GateSection:
    """The release-gate report at ``review.gate_report``, or why it cannot be shown."""

    path: str
    report: GateReport | None
    problem: str | None = None

    @property
    def verdict(self) -> str | None:
        return None if self.report is None else ("pass" if self.report.passed else "fail")


@dataclass
class Review:
    """Everything the two renderings show."""

    base: str
    base_commit: str
    head: str
    head_commit: str | None
    dirty: bool
    created_at: str
    stale: dict[str, str]
    params: list[ParamChange]
    metrics: list[MetricChange]
    plots: list[PlotDiff]
    hashes: list[HashChange]
    notebooks: list[NotebookDiff]
    executed: list[ExecutedNotebook]
    gates: GateSection | None
    settings: ReviewSettings
    warnings: list[str] = field(default_factory=list)
    # Stages whose inputs this change touched (None: not known, every changed hash counts).
    branch_stages: set[str] | None = None

    def caused_by_branch(self, h: HashChange) -> bool:
        """A changed output of a stage whose inputs match the base was produced again
        here (fresh clone, other machine), not changed by this branch."""
        return (
            self.branch_stages is None
            or h.source.endswith(".dvc")
            or (h.source in self.branch_stages)
        )

    @property
    def changed_hashes(self) -> list[HashChange]:
        return [h for h in self.hashes if h.status != "unchanged" and self.caused_by_branch(h)]

    @property
    def rerun_here(self) -> list[HashChange]:
        """Outputs that differ from the base although their stage's inputs do not."""
        return [h for h in self.hashes if h.status != "unchanged" and not self.caused_by_branch(h)]

    @property
    def changed_metrics(self) -> list[MetricChange]:
        """Metrics that moved past their tolerance."""
        return [m for m in self.metrics if m.significant]

    @property
    def noise_metrics(self) -> list[MetricChange]:
        """Metrics that moved, but within their tolerance."""
        return [m for m in self.metrics if m.within_tolerance]


# --------------------------------------------------------------------------- git and dvc


_git = partial(git, error=ReviewError)


def _git_show(root: Path, commit: str, path: str) -> str | None:
    """A file's text at ``commit``, or None when it does not exist there."""
    raw = git_show(root, commit, path)
    return None if raw is None else raw.decode()


def resolve_base(root: Path, base: str) -> str:
    """The commit ``base`` names; a clear error when it does not exist here."""
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False) != "true":
        raise ReviewError(f"{root} is not a git work tree; `mlops review` compares git revisions")
    result = git_run(root, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    if result.returncode != 0:
        raise ReviewError(
            f"base revision '{base}' does not exist in {root}; pass an existing branch, tag or "
            f"commit with --base (in CI, fetch it first, e.g. `git fetch origin {base}`)"
        )
    return result.stdout.strip()


class _DvcJob:
    """``dvc ARGS --json`` running in the background (stdout to a temp file, so no pipe stalls).

    The review's four DVC queries are independent and only ``dvc status`` takes
    the repo lock, so they run side by side while the notebooks are diffed.
    """

    def __init__(self, root: Path, *args: str) -> None:
        self.root, self.args = root, args
        self.stdout = tempfile.TemporaryFile(mode="w+")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", *args, "--json"],
            cwd=root,
            stdout=self.stdout,
            stderr=self.stderr,
            text=True,
        )

    def result(self) -> Any:
        code = self.proc.wait()
        self.stdout.seek(0)
        self.stderr.seek(0)
        out, err = self.stdout.read(), self.stderr.read()
        self.stdout.close()
        self.stderr.close()
        what = f"`dvc {' '.join(self.args)}`"
        if code != 0:
            raise ReviewError(
                f"{what} failed (exit {code}) in {self.root}:\n{(err or out).strip()[-2000:]}"
            )
        try:
            return json.loads(out or "{}")
        except json.JSONDecodeError as exc:
            raise ReviewError(f"{what} printed no JSON: {out[:500]!r}") from exc


def stale_stages(status: dict[str, Any]) -> dict[str, str]:
    """``{stage: what changed}`` from ``dvc status --json``: outputs not matching the work tree."""
    out: dict[str, str] = {}
    for stage, items in (status or {}).items():
        parts: list[str] = []
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict):
                for kind, detail in item.items():
                    names = sorted(_leaf_keys(detail)) if isinstance(detail, dict) else []
                    parts.append(f"{kind} ({', '.join(names)})" if names else kind)
        out[stage] = "; ".join(parts) or "changed"
    return out


def _leaf_keys(node: dict[str, Any]) -> Iterable[str]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value)
        else:
            yield key


def param_changes(data: dict[str, Any]) -> list[ParamChange]:
    """Changed parameters from ``dvc params diff BASE --json``."""
    return [
        ParamChange(file, name, v.get("old"), v.get("new"))
        for file, params in sorted(data.items())
        for name, v in sorted(params.items())
    ]


def metric_changes(
    data: dict[str, Any], direction: Mapping[str, str], settings: ReviewSettings | None = None
) -> list[MetricChange]:
    """Every metric at both revisions with its delta, from ``dvc metrics diff BASE --all --json``.

    ``direction`` maps a metric's last name part (``auc`` for ``per_surface.feed.auc``)
    to ``higher`` or ``lower`` is better, so a delta can be read as better or worse;
    ``settings`` gives each metric's tolerance (``review.metric_tolerance``,
    ``review.relative_tolerance``): a delta within it is not read as either.
    """
    out = []
    for file, metrics in sorted(data.items()):
        for name, v in sorted(metrics.items(), key=lambda kv: (kv[0].count("."), kv[0])):
            old, new = v.get("old"), v.get("new")
            diff = v.get("diff")
            if diff is None and is_number(old) and is_number(new):
                diff = new - old
            out.append(
                MetricChange(
                    file,
                    name,
                    old,
                    new,
                    diff if is_number(diff) else None,
                    direction.get(name.rsplit(".", 1)[-1]),
                    settings.tolerance(name, old if is_number(old) else None)
                    if settings is not None
                    else None,
                )
            )
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def md5_of(entry: dict[str, Any] | None) -> str | None:
    if not entry:
        return None
    return entry.get("md5") or entry.get("etag") or entry.get("checksum")


def hash_changes(root: Path, base: str) -> list[HashChange]:
    """Data, model and report hashes from ``dvc.lock`` and ``.dvc`` files, base vs working tree."""
    old = lock_out_entries(_git_show(root, base, "dvc.lock"))
    lock = root / "dvc.lock"
    new = lock_out_entries(lock.read_text() if lock.is_file() else None)
    tracked_now = _git(root, "ls-files", "--cached", "--others", "--exclude-standard")
    tracked_then = _git(root, "ls-tree", "-r", "--name-only", base)
    dvcfiles = sorted(
        {
            p
            for p in (tracked_now + "\n" + tracked_then).splitlines()
            if p.endswith(".dvc") and not p.startswith(".dvc/")
        }
    )
    for name in dvcfiles:
        old.update(dvcfile_outs(name, _git_show(root, base, name)))
        file = root / name
        new.update(dvcfile_outs(name, file.read_text() if file.is_file() else None))
    labels = _artifact_labels(root)
    rows = []
    for source, path in sorted(old.keys() | new.keys(), key=_stage_order(root)):
        if source.endswith(".dvc"):
            out_path = str(Path(source).parent / path) if Path(source).parent != Path(".") else path
            label = labels.get(out_path, "raw data" if source == "data.dvc" else "tracked data")
        else:
            out_path, label = path, labels.get(path, "")
        rows.append(
            HashChange(source, out_path, label, old.get((source, path)), new.get((source, path)))
        )
    return rows


def _stage_order(root: Path) -> Any:
    """Sort key: .dvc files first, then stages in dvc.yaml order, then path."""
    order = {name: i for i, name in enumerate(stage_names(root))}

    def key(item: tuple[str, str]) -> tuple[int, str, str]:
        source, path = item
        rank = -1 if source.endswith(".dvc") else order.get(source, len(order))
        return rank, source, path

    return key


def _artifact_labels(root: Path) -> dict[str, str]:
    return {
        str(spec.get("path")): f"{spec.get('type') or 'artifact'} {name}"
        for name, spec in artifacts(root).items()
        if isinstance(spec, dict) and spec.get("path")
    }


def branch_stages(base_lock: str | None, head_lock: str | None) -> set[str]:
    """Stages whose inputs differ between two ``dvc.lock`` texts: their command, params,
    a dep no stage produces (code, notebook, data), or a dep an affected stage produced.

    A stage whose inputs all match is not changed by the branch even when its outputs'
    hashes differ: it was run again here (a fresh clone without DVC's cache or remote,
    another machine), and so was any stage downstream of it for that reason alone.
    """
    import yaml

    def stages(text: str | None) -> dict[str, Any]:
        data = yaml.safe_load(text) if text else None
        found = data.get("stages") if isinstance(data, dict) else None
        return found if isinstance(found, dict) else {}

    def deps(stage: dict[str, Any]) -> dict[str, str | None]:
        return {str(d.get("path")): md5_of(d) for d in stage.get("deps") or []}

    base, head = stages(base_lock), stages(head_lock)
    producer = {
        str(out.get("path")): name for name, st in head.items() for out in st.get("outs") or []
    }
    affected: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, stage in head.items():
            if name in affected:
                continue
            old = base.get(name)
            if old is None or any(stage.get(k) != old.get(k) for k in ("cmd", "params")):
                affected.add(name)
                grew = True
                continue
            new_deps, old_deps = deps(stage), deps(old)
            if new_deps.keys() != old_deps.keys() or any(
                new_deps[p] != old_deps[p] and producer.get(p, p) in affected | {p}
                for p in new_deps
            ):
                affected.add(name)
                grew = True
    return affected


def executed_notebooks(
    hashes: list[HashChange], reports_dir: str, root: Path, stages: set[str] | None = None
) -> list[ExecutedNotebook]:
    """The executed notebooks' HTML renderings recorded in ``dvc.lock``; ``changed`` only
    for the stages in ``stages`` (those the branch changed), when given."""
    prefix = reports_dir.rstrip("/") + "/"
    return [
        ExecutedNotebook(
            h.source,
            h.path,
            h.status != "unchanged" and (stages is None or h.source in stages),
            (root / h.path).is_file(),
        )
        for h in hashes
        if h.new is not None and h.path.startswith(prefix) and h.path.endswith(".html")
    ]


# --------------------------------------------------------------------------- notebooks


def changed_notebooks(root: Path, base: str, notebooks_dir: str) -> list[tuple[str, str]]:
    """``[(path, status)]`` of source notebooks that differ from ``base`` (incl. new files)."""
    names = _git(
        root, "diff", "--no-ext-diff", "--name-status", "--no-renames", base, "--", notebooks_dir
    )
    status_names = {"A": "added", "D": "deleted", "M": "modified", "T": "modified"}
    out = {}
    for line in names.splitlines():
        code, _, path = line.partition("\t")
        if path.endswith(".ipynb"):
            out[path] = status_names.get(code[:1], "modified")
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", notebooks_dir)
    for path in untracked.splitlines():
        if path.endswith(".ipynb"):
            out[path] = "added"
    return sorted(out.items())


def _read_notebook(text: str | None, where: str) -> Any:
    import nbformat

    if text is None:
        return nbformat.v4.new_notebook()
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several types for malformed JSON
        raise ReviewError(f"{where} is not a readable notebook: {exc}") from exc
    # Review the source as it is committed: nbstripout strips outputs on `git add`.
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


_TRAILING = re.compile(r"(?:\s|\x1b\[[0-9;]*m)+\Z")  # blank lines and colour resets at the end


def notebook_diff(root: Path, base: str, path: str, status: str) -> NotebookDiff:
    """nbdime's structural diff of one notebook, as plain text and as coloured HTML."""
    from nbconvert.filters.ansi import ansi2html
    from nbdime import diff_notebooks
    from nbdime.prettyprint import PrettyPrintConfig, pretty_print_diff

    file = root / path
    a = _read_notebook(_git_show(root, base, path), f"{base}:{path}")
    b = _read_notebook(file.read_text() if file.is_file() else None, path)
    diff = diff_notebooks(a, b)
    rendered = []
    for color in (False, True):
        buf = io.StringIO()
        # difflib instead of git/diff subprocesses: same output everywhere, no external tools.
        pretty_print_diff(
            a, diff, "", PrettyPrintConfig(out=buf, use_color=color, use_git=False, use_diff=False)
        )
        text = _TRAILING.sub("", buf.getvalue())
        rendered.append(
            text + ("\x1b[0m" if color else "") if text else "(no changes in cells or metadata)"
        )
    return NotebookDiff(path, status, rendered[0], ansi2html(rendered[1]))


# --------------------------------------------------------------------------- gates


def read_gate_report(root: Path, rel_path: str) -> GateSection | None:
    """The gate report ``mlops model register --dry-run`` wrote at ``rel_path``, if any."""
    path = root / rel_path
    if not path.is_file():
        return None
    try:
        return GateSection(rel_path, GateReport.from_dict(json.loads(path.read_text())))
    except json.JSONDecodeError as exc:
        return GateSection(rel_path, None, f"not valid JSON ({exc}); regenerate it")
    except (KeyError, TypeError, AttributeError) as exc:
        return GateSection(
            rel_path, None, f"not a gate report ({type(exc).__name__}: {exc}); regenerate it"
        )


# --------------------------------------------------------------------------- build + write


def build_review(root: Path, base: str, settings: ReviewSettings, reports_dir: str) -> Review:
    """Collect every section of the review for the working tree at ``root`` against ``base``."""
    base_commit = resolve_base(root, base)
    jobs = {
        "status": _DvcJob(root, "status"),
        "params": _DvcJob(root, "params", "diff", base),
        "metrics": _DvcJob(root, "metrics", "diff", base, "--all"),
        "plots": _DvcJob(root, "plots", "diff", base, "--split"),
    }
    try:
        head = _git(root, "rev-parse", "--abbrev-ref", "HEAD", check=False)
        head_commit = _git(root, "rev-parse", "HEAD", check=False) or None
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no").strip())
        hashes = hash_changes(root, base)
        lock = root / "dvc.lock"
        stages = branch_stages(
            _git_show(root, base, "dvc.lock"), lock.read_text() if lock.is_file() else None
        )
        notebooks = [
            notebook_diff(root, base, p, s)
            for p, s in changed_notebooks(root, base, settings.notebooks_dir)
        ]
        results = {name: job.result() for name, job in jobs.items()}
    finally:
        for job in jobs.values():
            if job.proc.poll() is None:
                job.proc.kill()
                job.proc.wait()
    review = Review(
        base=base,
        base_commit=base_commit,
        head=head or "HEAD",
        head_commit=head_commit,
        dirty=dirty,
        created_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        stale=stale_stages(results["status"]),
        params=param_changes(results["params"]),
        metrics=metric_changes(results["metrics"], settings.metric_direction, settings),
        plots=plot_diffs(results["plots"]),
        hashes=hashes,
        notebooks=notebooks,
        executed=executed_notebooks(hashes, reports_dir, root, stages),
        gates=read_gate_report(root, settings.gate_report),
        settings=settings,
        branch_stages=stages,
    )
    if review.rerun_here:
        review.warnings.append(
            f"{len(review.rerun_here)} output(s) differ from {base} although their stages' "
            "inputs (command, params, code, data) match it: "
            + ", ".join(f"{h.path} ({h.source})" for h in review.rerun_here)
            + ". They were produced again here (a fresh clone without DVC's cache or "
            "remote, or another machine), not changed by this branch, and are not counted "
            "below; `dvc pull` before `dvc repro` gives the recorded outputs"
        )
    missing = [e.path for e in review.executed if not e.exists]
    if missing:
        review.warnings.append(
            "executed notebooks recorded in dvc.lock are missing from the working tree: "
            + ", ".join(missing)
            + "; run `dvc pull` or `dvc repro`"
        )
    return review
