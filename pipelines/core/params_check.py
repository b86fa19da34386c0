"""Validate ``params.yaml`` before any stage does work.

Every stage starts through ``pipelines.stages.runner`` and ``make run`` calls
``mlops params check`` before ``dvc repro``: a wrong value (negative window,
unknown feature set or surface, missing key, wrong type, non-positive
hyperparameter, ...) is refused in well under a second with a message that
names the key, the value found and what is allowed, instead of failing minutes
later deep inside a notebook (or, worse, silently training something odd).

The schema lists every key the pipeline, the registry and the review read.
Keys marked optional are checked only when present (sections still growing on
other branches); keys not listed are allowed, so new sections never break it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.config import ConfigError, load_params, project_root

Check = Callable[[Any], str | None]  # returns what is wrong, or None when the value is fine


class ParamsError(ConfigError):
    """``params.yaml`` holds one or more invalid values; ``problems`` lists them by key."""

    def __init__(self, path: Path, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} invalid value(s), nothing was run:"]
        lines += [f"  - {key}: {what}" for key, what in problems]
        lines.append(
            "What to do: fix these keys in params.yaml (the comments there say what each one "
            "means) or restore it with `git checkout params.yaml`, then rerun."
        )
        super().__init__("\n".join(lines))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    """A whole number within bounds (YAML ``true`` or ``1.5`` are refused)."""

    def check(value: Any) -> str | None:
        if not _is_int(value):
            return f"must be a whole number, got {_shown(value)}"
        if minimum is not None and value < minimum:
            return f"must be >= {minimum}, got {value}"
        if maximum is not None and value > maximum:
            return f"must be <= {maximum}, got {value}"
        return None

    return check


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Check:
    """A finite number within bounds; ``exclusive_minimum`` makes the lower bound strict."""

    def check(value: Any) -> str | None:
        if not _is_number(value):
            return f"must be a finite number, got {_shown(value)}"
        if minimum is not None:
            if exclusive_minimum and value <= minimum:
                return f"must be > {minimum}, got {value}"
            if not exclusive_minimum and value < minimum:
                return f"must be >= {minimum}, got {value}"
        if maximum is not None and value > maximum:
            return f"must be <= {maximum}, got {value}"
        return None

    return check


def text(pattern: str | None = None, hint: str = "") -> Check:
    """A non-empty string, optionally matching ``pattern`` (``hint`` says what is expected)."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be a non-empty string, got {_shown(value)}"
        if pattern is not None and not re.fullmatch(pattern, value):
            return f"{hint or f'must match {pattern}'}, got {value!r}"
        return None

    return check


def relpath() -> Check:
    """A path inside the project: relative, without ``..`` (outputs must stay in the repo)."""
    base = text()

    def check(value: Any) -> str | None:
        problem = base(value)
        if problem:
            return problem
        path = Path(value)
        if path.is_absolute() or ".." in path.parts:
            return f"must be a path relative to the project root without '..', got {value!r}"
        return None

    return check


def one_of(choices: Callable[[], Iterable[str]], what: str) -> Check:
    """A value from a registry that lives in code (choices are looked up lazily)."""

    def check(value: Any) -> str | None:
        known = sorted(choices())
        if value not in known:
            return f"unknown {what} {value!r}; known: {', '.join(map(str, known))}"
        return None

    return check


def boolean() -> Check:
    def check(value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"

    return check


def date() -> Check:
    """A calendar date such as ``"2026-10-01"``."""

    def check(value: Any) -> str | None:
        if isinstance(value, dt.date):
            return None
        if isinstance(value, str):
            try:
                dt.date.fromisoformat(value)
                return None
            except ValueError:
                pass
        return f'must be a date like "2026-10-01", got {_shown(value)}'

    return check


def mapping() -> Check:
    def check(value: Any) -> str | None:
        return None if isinstance(value, dict) else f"must be a mapping, got {_shown(value)}"

    return check


def list_of(item: Check) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, list):
            return f"must be a list, got {_shown(value)}"
        for i, element in enumerate(value):
            problem = item(element)
            if problem:
                return f"item {i}: {problem}"
        return None

    return check


def online_url() -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not re.match(r"^(sqlite:///.+|redis://.+)$", value):
            return f"must be sqlite:///<path> or redis://host:port/db, got {_shown(value)}"
        return None

    return check


def metric_directions() -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must map metric names to 'higher' or 'lower', got {_shown(value)}"
        bad = {k: v for k, v in value.items() if v not in ("higher", "lower")}
        return f"values must be 'higher' or 'lower', got {bad}" if bad else None

    return check


def _surfaces() -> tuple[str, ...]:
    from pipelines.simulation.generate import SURFACES

    return SURFACES


def _presets() -> Iterable[str]:
    from pipelines.simulation.generate import PRESETS

    return PRESETS


def _scenarios() -> Iterable[str]:
    from pipelines.simulation.generate import SCENARIOS

    return SCENARIOS


def _feature_sets() -> Iterable[str]:
    from pipelines.features.definitions import FEATURE_SETS

    return FEATURE_SETS


def _engines() -> Iterable[str]:
    from pipelines.features.offline import ENGINES

    return ENGINES


def _stages() -> Iterable[str]:
    return ("staging", "canary", "prod")


@dataclass(frozen=True)
class Rule:
    key: str
    check: Check
    required: bool = True


SCHEMA: tuple[Rule, ...] = (
    # base
    Rule("base.seed", integer(0)),
    Rule("base.raw_dir", relpath()),
    Rule("base.reports_dir", relpath()),
    Rule("base.bentoml_home", relpath()),
    # generate
    Rule("generate.preset", one_of(_presets, "preset")),
    Rule("generate.start", date()),
    Rule("generate.scenario", one_of(_scenarios, "drift scenario")),
    Rule("generate.scenario_start_day", integer(0)),
    # features
    Rule("features.feature_set", one_of(_feature_sets, "feature set")),
    Rule("features.engine", one_of(_engines, "offline engine")),
    Rule("features.online.url", online_url()),
    Rule("features.online.allowed_lateness_seconds", number(0)),
    Rule("features.online.serve", boolean(), required=False),
    Rule("features.online.serving_timeout_ms", number(0, exclusive_minimum=True), required=False),
    Rule("features.online.retry_seconds", number(0), required=False),
    Rule("features.online.max_ingest_rows", integer(1), required=False),
    # build_dataset
    Rule("build_dataset.out_dir", relpath()),
    Rule("build_dataset.warmup_hours", integer(0)),
    Rule("build_dataset.valid_days", integer(1)),
    Rule("build_dataset.test_days", integer(1)),
    # train
    Rule("train.out_dir", relpath()),
    Rule("train.max_iter", integer(1)),
    Rule("train.learning_rate", number(0, exclusive_minimum=True)),
    Rule("train.max_leaf_nodes", integer(2)),
    Rule("train.min_samples_leaf", integer(1)),
    Rule("train.l2_regularization", number(0)),
    # evaluate
    Rule("evaluate.metrics_file", relpath()),
    Rule("evaluate.plots_dir", relpath()),
    Rule("evaluate.calibration_bins", integer(2, 1000)),
    # profile
    Rule("profile.out_dir", relpath()),
    # package
    Rule(
        "package.service_name",
        text(r"[a-z0-9][a-z0-9_.-]*", "must be a BentoML name (lowercase letters, digits, _ . -)"),
    ),
    Rule("package.release_file", relpath()),
    Rule("package.bento_dir", relpath()),
    # serving (keys beyond the SLA are optional: the section is still growing)
    Rule("serving.freshness_sla_seconds", number(0, exclusive_minimum=True)),
    Rule("serving.candidate_share", number(0, 1), required=False),
    Rule("serving.shadow_sample_rate", number(0, 1), required=False),
    Rule("serving.latency_budget_ms", number(0, exclusive_minimum=True), required=False),
    Rule("serving.max_batch_size", integer(1), required=False),
    Rule("serving.max_body_mb", number(0, exclusive_minimum=True), required=False),
    Rule("serving.workers", integer(1), required=False),
    Rule("serving.header_timeout_seconds", number(0, exclusive_minimum=True), required=False),
    Rule("serving.body_timeout_seconds", number(0, exclusive_minimum=True), required=False),
    Rule("serving.refused_log_per_second", number(0, exclusive_minimum=True), required=False),
    Rule("serving.public_metrics", boolean(), required=False),
    # release
    Rule("release.artifact", text(r"[a-z0-9][a-z0-9-]*", "must be a GTO artifact name")),
    Rule("release.gate_reports_dir", relpath()),
    Rule("release.deploy_dir", relpath()),
    Rule(
        "release.canary_health_file",
        text(r".*\{version\}.*", "must contain {version} (one health report per version)"),
    ),
    Rule("release.require_canary_health", boolean()),
    Rule("release.approval_required_for", list_of(one_of(_stages, "stage"))),
    Rule("release.gates", mapping()),
    Rule("release.gates.floors", mapping()),
    Rule("release.gates.regression", mapping()),
    Rule("release.gates.reference_profile", relpath()),
    # review
    Rule("review.out_dir", relpath()),
    Rule("review.notebooks_dir", relpath()),
    Rule("review.gate_report", relpath()),
    Rule("review.max_diff_lines", integer(1)),
    Rule("review.metric_direction", metric_directions()),
    # monitor (optional: checked when the section is there)
    Rule("monitor.drift.bins", integer(2, 1000), required=False),
    Rule("monitor.quality.calibration_bins", integer(2, 1000), required=False),
)

_MISSING = object()


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _surface_keys(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Every key named ``surface``/``surfaces`` (or ``*_surface(s)``) anywhere in params."""
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if re.fullmatch(r"(.*_)?surfaces?", str(key)):
                yield dotted, value
            yield from _surface_keys(value, dotted)


def problems(params: Any) -> list[tuple[str, str]]:
    """Every invalid or missing value in ``params`` as ``(key, what is wrong)``, in file order."""
    if not isinstance(params, dict):
        return [("<file>", f"must be a mapping of sections, got {_shown(params)}")]
    found: list[tuple[str, str]] = []
    for rule in SCHEMA:
        value = _lookup(params, rule.key)
        if value is _MISSING:
            if rule.required:
                found.append((rule.key, "is missing; add it (see the other keys of its section)"))
            continue
        problem = rule.check(value)
        if problem:
            found.append((rule.key, problem))
    for key, value in _surface_keys(params):
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in _surfaces() and v not in (None, "none", "all")]
        if bad:
            found.append((key, f"unknown surface(s) {bad}; known: {', '.join(_surfaces())}"))
    return found


def check_params(path: Path | None = None) -> dict[str, Any]:
    """Load and validate ``params.yaml``; return it, or raise ParamsError listing every problem."""
    path = path or project_root() / "params.yaml"
    params = load_params(path)
    found = problems(params)
    if found:
        raise ParamsError(path, found)
    return params
