"""Quality gates a model version must pass before ``mlops model register`` records it.

Gates are configured in ``params.yaml`` under ``release.gates``:

Details: docs/registry.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipelines.core.config import ConfigError
from pipelines.core.dvcfiles import stage_names
from pipelines.core.settings import settings_from

FLOOR_BOUNDS = ("min", "max")
REGRESSION_BOUNDS = ("max_drop", "max_rise")


@dataclasses.dataclass
class GateResult:
    """One check: which gate, whether it passed, and the numbers behind it."""

    gate: str
    passed: bool
    detail: str
    observed: Any = None
    threshold: Any = None
    margin: float | None = None  # headroom when passed, minus the shortfall when failed


@dataclasses.dataclass
class GateReport:
    """All gate results for one candidate version, with what it was compared against."""

    artifact: str
    version: str
    commit: str
    prod: dict[str, Any] | None
    results: list[GateResult]
    config: dict[str, Any]
    created_at: str = dataclasses.field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateReport:
        """A report as ``to_dict`` wrote it (the JSON of ``write``); KeyError when it is not."""
        return cls(
            artifact=str(data["artifact"]),
            version=str(data["version"]),
            commit=str(data["commit"]),
            prod=data.get("compared_with_prod"),
            results=[GateResult(**r) for r in data["results"]],
            config=data.get("config") or {},
            created_at=str(data.get("created_at", "")),
        )

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "version": self.version,
            "commit": self.commit,
            "created_at": self.created_at,
            "passed": self.passed,
            "summary": f"{sum(r.passed for r in self.results)}/{len(self.results)} gates passed",
            "compared_with_prod": self.prod,
            "config": self.config,
            "results": [dataclasses.asdict(r) for r in self.results],
        }

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        prod = (
            f"{self.prod['version']} (commit {self.prod['commit'][:12]})"
            if self.prod
            else "none (no version in prod yet)"
        )
        lines = [
            f"# Gate report: {self.artifact} {self.version} - {verdict}",
            "",
            f"- candidate commit: `{self.commit}`",
            f"- compared with prod: {prod}",
            f"- evaluated at: {self.created_at}",
            f"- {self.to_dict()['summary']}",
            "",
            "| gate | result | observed | threshold | margin | detail |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            margin = "" if r.margin is None else f"{r.margin:+.4f}"
            lines.append(
                f"| {r.gate} | {'pass' if r.passed else '**FAIL**'} | {_fmt(r.observed)} | "
                f"{_fmt(r.threshold)} | {margin} | {r.detail.replace('|', '/')} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``<artifact>@<version>.json`` and ``.md`` into ``folder``; return both paths."""
        from pipelines.core.io import atomic_path

        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.artifact}@{self.version}"
        json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        with atomic_path(md_path) as tmp:
            tmp.write_text(self.to_markdown())
        return json_path, md_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _metric(metrics: dict[str, Any], name: str, surface: str | None = None) -> float | None:
    node = metrics.get("per_surface", {}).get(surface, {}) if surface else metrics
    value = node.get(name) if isinstance(node, dict) else None
    return float(value) if isinstance(value, int | float) else None


def floor_gates(metrics: dict[str, Any], floors: dict[str, Any]) -> list[GateResult]:
    """Absolute limits: ``{metric: {min: x}}`` or ``{metric: {max: x}}`` on the overall metrics."""
    results = []
    for name, bounds in floors.items():
        if not isinstance(bounds, dict) or not set(bounds) <= set(FLOOR_BOUNDS) or not bounds:
            raise ConfigError(
                f"params.yaml release.gates.floors.{name} must be a mapping with 'min' and/or "
                f"'max', got {bounds!r}"
            )
        value = _metric(metrics, name)
        for bound, limit in bounds.items():
            gate = f"floor: {name} {'>=' if bound == 'min' else '<='} {limit}"
            if value is None:
                results.append(
                    GateResult(
                        gate,
                        False,
                        f"metric '{name}' is missing from the metrics file",
                        None,
                        limit,
                    )
                )
                continue
            margin = value - limit if bound == "min" else limit - value
            passed = margin >= 0
            if passed:
                detail = f"{value:.4f}, headroom {margin:.4f}"
            else:
                side = "below the minimum" if bound == "min" else "above the maximum"
                detail = f"{value:.4f} is {side} {limit} by {-margin:.4f}"
            results.append(GateResult(gate, passed, detail, value, limit, round(margin, 6)))
    return results


def regression_gates(
    candidate: dict[str, Any],
    prod: dict[str, Any] | None,
    prod_version: str | None,
    rules: dict[str, Any],
) -> list[GateResult]:
    """No regression against prod beyond tolerance, overall and per surface.

    ``{auc: {max_drop: 0.01}}``: the candidate's AUC may be at most 0.01 below
    prod's; ``{calibration_error: {max_rise: 0.01}}``: at most 0.01 above.
    Surfaces are prod's surfaces: a surface prod serves must still be measured.
    """
    if prod is None:
        return [
            GateResult(
                "regression vs prod", True, "no version in prod yet: nothing to compare against"
            )
        ]
    results = []
    scopes: list[str | None] = [None, *sorted(prod.get("per_surface", {}))]
    for name, rule in rules.items():
        if (
            not isinstance(rule, dict)
            or len(rule) != 1
            or next(iter(rule)) not in REGRESSION_BOUNDS
        ):
            raise ConfigError(
                f"params.yaml release.gates.regression.{name} must be {{max_drop: x}} (higher is "
                f"better) or {{max_rise: x}} (lower is better), got {rule!r}"
            )
        kind, tolerance = next(iter(rule.items()))
        for surface in scopes:
            where = f"on {surface}" if surface else "overall"
            gate = f"regression: {name} {where}"
            old, new = _metric(prod, name, surface), _metric(candidate, name, surface)
            if old is None:
                continue  # prod never measured it: nothing to regress from
            if new is None:
                results.append(
                    GateResult(
                        gate,
                        False,
                        f"candidate has no {name} {where}; prod {prod_version} has {old:.4f}",
                        None,
                        tolerance,
                    )
                )
                continue
            worse = old - new if kind == "max_drop" else new - old
            margin = tolerance - worse
            verb = "dropped" if kind == "max_drop" else "rose"
            if worse <= 0:
                detail = f"{new:.4f} vs prod {prod_version} {old:.4f}: no regression"
            else:
                detail = (
                    f"{verb} by {worse:.4f} vs prod {prod_version} "
                    f"({old:.4f} -> {new:.4f}); allowed {tolerance}"
                )
                if margin < 0:
                    detail += f", exceeded by {-margin:.4f}"
            results.append(
                GateResult(
                    gate, margin >= 0, detail, round(new - old, 6), tolerance, round(margin, 6)
                )
            )
    return results


def contracts_gate(root: Path) -> GateResult:
    """Every stage is up to date and its outputs present (``dvc status`` is clean).

    Each stage validates its pandera contracts before writing outputs, so an
    up-to-date stage is one whose contracts passed on the current inputs.
    """
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True
    )
    if status.returncode != 0:
        return GateResult(
            "contracts: pipeline up to date",
            False,
            f"`dvc status` failed: {status.stderr.strip()[-500:]}",
        )
    changes = json.loads(status.stdout or "{}")
    if not changes:
        return GateResult(
            "contracts: pipeline up to date",
            True,
            "dvc status clean: every stage ran with the current data, code and "
            "params, its contracts passed and its outputs are present",
            "clean",
        )
    problems = []
    missing = []
    for stage, entries in changes.items():
        for entry in entries:
            if isinstance(entry, str):
                problems.append(f"{stage}: {entry}")
                continue
            for kind, paths in entry.items():
                if not isinstance(paths, dict):
                    problems.append(f"{stage}: {kind}")
                    continue
                for path, state in paths.items():
                    if kind == "changed outs" and state in ("deleted", "not in cache"):
                        missing.append(f"{path} (output of {stage}: {state})")
                    else:
                        problems.append(f"{stage}: {kind.replace('changed ', '')} {path} {state}")
    detail = []
    if missing:
        detail.append(
            "missing DVC outputs: "
            + ", ".join(missing)
            + " - restore them with `dvc checkout` (or `dvc pull`), or rerun `dvc repro`"
        )
    if problems:
        detail.append(
            "stages out of date: " + "; ".join(problems) + " - run `dvc repro` and commit dvc.lock"
        )
    return GateResult(
        "contracts: pipeline up to date",
        False,
        ". ".join(detail),
        f"{len(missing)} missing, {len(problems)} changed",
    )


def reference_profile_gate(root: Path, path: str) -> GateResult:
    """The whylogs reference profile exists and is not empty (monitoring needs it)."""
    from pipelines.core import profiles as wl

    file = root / path
    if not file.is_file() and file.with_name(wl.REFERENCE_FRAME).is_file():
        wl.reference_profile(file)  # derived from the tracked reference rows (profile stage)
    size = file.stat().st_size if file.is_file() else 0
    if size > 0:
        return GateResult("reference profile present", True, f"{path} ({size:,} bytes)", size)
    return GateResult(
        "reference profile present",
        False,
        f"{path} is {'empty' if file.is_file() else 'missing'}; run `dvc repro profile`",
        size,
    )


def notebooks_gate(root: Path, reports_dir: str, stages: list[str]) -> GateResult:
    """Each stage's executed notebook and HTML exist, have outputs and no error outputs."""
    problems = []
    for stage in stages:
        nb_path = root / reports_dir / f"{stage}.ipynb"
        html = root / reports_dir / f"{stage}.html"
        if not nb_path.is_file():
            problems.append(f"{nb_path.relative_to(root)} missing")
            continue
        if not html.is_file() or html.stat().st_size == 0:
            problems.append(f"{html.relative_to(root)} missing")
        try:
            nb = json.loads(nb_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            problems.append(f"{nb_path.relative_to(root)} unreadable ({exc})")
            continue
        code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
        if not any(c.get("outputs") for c in code):
            problems.append(f"{nb_path.relative_to(root)} has no outputs (not executed)")
        if any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])):
            problems.append(f"{nb_path.relative_to(root)} contains an error output")
    if problems:
        return GateResult(
            "executed notebooks present",
            False,
            "; ".join(problems) + " - run `dvc repro`",
            len(stages) - len(problems),
        )
    return GateResult(
        "executed notebooks present",
        True,
        f"{len(stages)} executed notebooks with HTML in {reports_dir}/",
        len(stages),
    )


def evaluate_gates(
    root: Path,
    params: dict[str, Any],
    artifact: str,
    version: str,
    commit: str,
    prod: dict[str, Any] | None,
) -> GateReport:
    """Run every gate for the candidate in the working tree at ``commit``.

    ``prod`` is ``{"version", "commit", "metrics"}`` of the current prod version
    (metrics as stored in git at its commit), or None when nothing is in prod.
    """
    settings = settings_from(params)
    gates = settings.release.gates.model_dump(exclude_none=True)
    metrics_file = root / settings.evaluate.metrics_file
    results: list[GateResult] = []
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        results += floor_gates(metrics, gates.get("floors") or {})
        results += regression_gates(
            metrics,
            prod["metrics"] if prod else None,
            prod["version"] if prod else None,
            gates.get("regression") or {},
        )
    else:
        results.append(
            GateResult(
                "metrics present",
                False,
                f"{metrics_file.relative_to(root)} missing; run `dvc repro`",
            )
        )
    results.append(contracts_gate(root))
    results.append(reference_profile_gate(root, settings.reference_profile))
    stages = stage_names(root)
    results.append(notebooks_gate(root, settings.base.reports_dir, stages))
    prod_info = {k: prod[k] for k in ("version", "commit")} if prod else None
    return GateReport(
        artifact, version, commit, prod_info, results, {k: v for k, v in gates.items()}
    )
