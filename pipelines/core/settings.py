"""One typed settings model per ``params.yaml`` section: types, limits and defaults in one place.

``load_settings`` validates the whole file (unknown keys refused) and lists every
problem by key; stages, the CLI, the service and ``mlops params check`` all read
settings through it. The settings table in docs/settings.md is generated from
these models (``mlops params docs``). See docs/settings.md.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.core.config import ConfigError, load_params, project_root
from pipelines.core.domain import PRESETS, SCENARIOS, STAGES, SURFACES


def _relative(value: str) -> str:
    path = PurePosixPath(value)
    if not value.strip() or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"must be a path relative to the project root without '..', got {value!r}")
    return value


RelPath = Annotated[str, AfterValidator(_relative)]


class Section(BaseModel):
    """A params.yaml section: unknown keys are refused; a bad value raises ParamsError by key."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False
    )
    path: ClassVar[str] = ""  # where the section sits in params.yaml

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            prefix = f"{self.path}." if self.path else ""
            raise ParamsError("params.yaml", _problems(exc, prefix)) from None


# --------------------------------------------------------------------------- pipeline


class BaseSettings(Section):
    """Shared seed and paths."""

    path: ClassVar[str] = "base"

    seed: int = Field(42, ge=0, description="seed of every random draw in the pipeline")
    raw_dir: RelPath = Field("data", description="raw events folder (tracked by data.dvc)")
    reports_dir: RelPath = Field("reports", description="executed notebooks and their HTML")
    bentoml_home: RelPath = Field(".bentoml", description="the project's BentoML store")


def _preset(value: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown preset {value!r}; known: {', '.join(sorted(PRESETS))}")
    return value


def _scenario(value: str) -> str:
    if value not in SCENARIOS:
        raise ValueError(f"unknown drift scenario {value!r}; known: {', '.join(sorted(SCENARIOS))}")
    return value


class GenerateSettings(Section):
    """Sample data (``mlops data obtain`` regenerates data/ from these values)."""

    path: ClassVar[str] = "generate"

    preset: Annotated[str, AfterValidator(_preset)] = Field("full", description="data size")
    start: dt.date = Field(
        dt.date(2026, 10, 1), strict=False, description="first day of the events"
    )
    scenario: Annotated[str, AfterValidator(_scenario)] = Field(
        "none", description="named drift scenario"
    )
    scenario_start_day: int = Field(0, ge=0, description="first day the scenario applies")


class OnlineStoreSettings(Section):
    """The online feature store (docs/feature_store.md)."""

    path: ClassVar[str] = "features.online"

    url: str = Field(
        "sqlite:///build/online/features.db",
        pattern=r"^(sqlite:///.+|redis://.+)$",
        description="sqlite:///<path> or redis://host:port/db",
    )
    allowed_lateness_seconds: float = Field(
        3600, ge=0, description="older events are applied and reported as late"
    )
    serve: bool = Field(False, description="the service reads features from the store")
    serving_timeout_ms: float = Field(50, gt=0, description="a slower lookup falls back")
    retry_seconds: float = Field(1, ge=0, description="snapshot answers this long after a failure")
    max_ingest_rows: int = Field(10_000, ge=1, description="largest /admin/ingest batch")


class FeaturesSettings(Section):
    """Feature set and offline engine."""

    path: ClassVar[str] = "features"

    feature_set: str = Field("ctr_v1", min_length=1, description="a set declared in pipelines")
    engine: Literal["numpy", "duckdb", "spark"] = Field("numpy", description="offline engine")
    spark_master: str = Field(
        "local[*]", min_length=1, description="Spark master or Spark Connect (sc://) URL"
    )
    online: OnlineStoreSettings = OnlineStoreSettings()


class BuildDatasetSettings(Section):
    """Point-in-time training set, split by time."""

    path: ClassVar[str] = "build_dataset"

    out_dir: RelPath = "build/dataset"
    warmup_hours: int = Field(24, ge=0, description="first hours only feed history")
    valid_days: int = Field(2, ge=1, description="days in the validation window")
    test_days: int = Field(2, ge=1, description="days in the test window")


class TrainSettings(Section):
    """Hyperparameters of the gradient-boosted trees."""

    path: ClassVar[str] = "train"

    out_dir: RelPath = "build/model"
    max_iter: int = Field(200, ge=1)
    learning_rate: float = Field(0.1, gt=0, le=1)
    max_leaf_nodes: int = Field(31, ge=2)
    min_samples_leaf: int = Field(100, ge=1)
    l2_regularization: float = Field(1.0, ge=0)
    max_train_rows: int = Field(
        20_000_000,
        ge=0,
        description="train-split rows read whole; beyond it every click and a day-stratified "
        "share of the non-clicks, this many rows in all, corrected for in the model "
        "(docs/feature_store.md, Training past memory); 0: never sample",
    )


class EvaluateSettings(Section):
    path: ClassVar[str] = "evaluate"

    metrics_file: RelPath = Field("build/eval/metrics.json", description="dvc metrics")
    plots_dir: RelPath = Field("build/eval/plots", description="dvc plots (CSV)")
    calibration_bins: int = Field(10, ge=2, le=1000)


class ProfileSettings(Section):
    path: ClassVar[str] = "profile"

    out_dir: RelPath = Field("monitors/reference", description="whylogs reference profile")

    @property
    def reference_profile(self) -> str:
        return f"{self.out_dir}/profile.bin"

    @property
    def drift_reference(self) -> str:
        return f"{self.out_dir}/drift_reference.json"


class PackageSettings(Section):
    path: ClassVar[str] = "package"

    service_name: str = Field(
        "ctr_service", pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="BentoML service name"
    )
    release_file: RelPath = "build/release/release.json"
    bento_dir: RelPath = "build/bento"


# --------------------------------------------------------------------------- serving

RoutingMode = Literal["none", "canary", "shadow", "ab"]


class ServingSettings(Section):
    """How the service routes, degrades and logs (docs/serving.md); embedded in releases."""

    model_config = ConfigDict(
        extra="forbid", frozen=False, validate_default=True, strict=True, allow_inf_nan=False
    )
    path: ClassVar[str] = "serving"

    routing: RoutingMode = Field("none", description="how the candidate gets traffic")
    candidate_share: float = Field(0.1, ge=0.0, le=1.0, description="canary / A-B user share")
    shadow_sample_rate: float = Field(0.2, ge=0.0, le=1.0)
    routing_salt: str = Field("ctr", min_length=1, description="reshuffles sticky assignment")
    candidate_model: str = "none"
    previous_model: str = "auto"
    latency_budget_ms: float = Field(40.0, gt=0, description="slower: the next tier answers")
    batch_row_budget_ms: float = Field(0.2, ge=0)
    breaker_cooldown_seconds: float = Field(10.0, ge=0)
    breaker_failures: int = Field(3, ge=1)
    freshness_sla_seconds: float = Field(300.0, gt=0)
    max_batch_size: int = Field(5000, ge=1)
    max_body_mb: float = Field(4.0, gt=0)
    workers: int = Field(2, ge=1, description=">= 2: a killed worker costs no answers")
    header_timeout_seconds: float = Field(10.0, gt=0, description="request head not complete: 408")
    body_timeout_seconds: float = Field(30.0, gt=0, description="request body not complete: 408")
    public_metrics: bool = Field(False, description="false: /metrics needs the admin token")
    refused_log_per_second: float = Field(5.0, gt=0, description="refusal log lines per second")
    admin_token_env: str = "CTR_ADMIN_TOKEN"
    request_log_dir: RelPath = "monitors/requests"
    profile_dir: RelPath = "monitors/live"
    state_dir: RelPath = "monitors/serving_state"
    log_flush_seconds: float = Field(1.0, gt=0)
    log_rotate_mb: float = Field(64.0, gt=0)
    log_queue_size: int = Field(100_000, ge=1)
    profile_window_seconds: float = Field(300.0, gt=0)
    profile_sample_rows: int = Field(
        100_000, ge=0, description="rows of a window's whylogs profile (uniform sample); 0 = all"
    )
    shadow_queue_size: int = Field(1000, ge=1)
    max_rank_items: int = Field(1000, ge=1, description="largest candidate list /rank takes")
    surface_priority: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {"search": 0, "feed": 1, "recs": 2},
        description="0 = critical, never shed; higher levels are shed first under overload",
    )
    shed_inflight: int = Field(
        8, ge=0, description="calls in flight per worker at which shedding starts; 0 = never"
    )

    @field_validator("surface_priority")
    @classmethod
    def _known_surfaces(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(SURFACES))
        if unknown:
            raise ValueError(f"unknown surfaces {unknown}; known: {', '.join(SURFACES)}")
        return value


# --------------------------------------------------------------------------- release


class MetricLimit(Section):
    path: ClassVar[str] = "release.gates"

    min: float | None = None
    max: float | None = None


class MetricRegression(Section):
    path: ClassVar[str] = "release.gates"

    max_drop: float | None = Field(None, ge=0)
    max_rise: float | None = Field(None, ge=0)


class GateSettings(Section):
    path: ClassVar[str] = "release.gates"

    floors: dict[str, MetricLimit] = {
        "auc": MetricLimit(min=0.62),
        "calibration_error": MetricLimit(max=0.03),
        "auc_lift_over_baseline": MetricLimit(min=0.0),
    }
    regression: dict[str, MetricRegression] = {
        "auc": MetricRegression(max_drop=0.01),
        "calibration_error": MetricRegression(max_rise=0.01),
    }


def _stage(value: str) -> str:
    if value not in STAGES:
        raise ValueError(f"unknown stage {value!r}; known: {', '.join(STAGES)}")
    return value


def _health_template(value: str) -> str:
    if "{version}" not in value:
        raise ValueError("must contain {version} (one health report per version)")
    return _relative(value)


class ReleaseSettings(Section):
    """Release governance on the GTO registry (docs/registry.md)."""

    path: ClassVar[str] = "release"

    artifact: str = Field("ctr-model", pattern=r"^[a-z0-9][a-z0-9-]*$")
    gate_reports_dir: RelPath = "reports/gates"
    deploy_dir: RelPath = "build/deploy"
    canary_health_file: Annotated[str, AfterValidator(_health_template)] = (
        "monitors/canary/health_{version}.json"
    )
    require_canary_health: bool = False
    approval_required_for: tuple[Annotated[str, AfterValidator(_stage)], ...] = Field(
        ("prod",), strict=False, description="promotions to these need an approver and reason"
    )
    gates: GateSettings = GateSettings()


# --------------------------------------------------------------------------- review


class ReviewSettings(Section):
    """Pull-request review report (docs/review.md)."""

    path: ClassVar[str] = "review"

    out_dir: RelPath = "reports/review"
    notebooks_dir: RelPath = "notebooks"
    gate_report: RelPath = "reports/gates/dry-run.json"
    max_diff_lines: int = Field(120, ge=1)
    metric_direction: dict[str, Literal["higher", "lower"]] = {
        "auc": "higher",
        "log_loss": "lower",
        "calibration_error": "lower",
        "average_precision": "higher",
        "brier": "lower",
        "auc_lift_over_baseline": "higher",
    }
    metric_tolerance: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {
            "auc": 0.001,
            "log_loss": 0.001,
            "calibration_error": 0.001,
            "average_precision": 0.001,
            "brier": 0.0005,
            "auc_lift_over_baseline": 0.001,
        },
        description="largest absolute delta per metric name that is noise, not better/worse",
    )
    relative_tolerance: float = Field(
        0.005,
        ge=0,
        description="the same, as a share of the base value, for metrics not in metric_tolerance",
    )

    def tolerance(self, name: str, base: float | None) -> float | None:
        """The noise band of metric ``name`` (its last dotted part) around ``base``."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf in self.metric_tolerance:
            return self.metric_tolerance[leaf]
        return None if base is None else abs(base) * self.relative_tolerance


class NotebooksSettings(Section):
    """Stage notebooks run by hand (JupyterLab, ``jupyter execute``): README "Notebooks"."""

    path: ClassVar[str] = "notebooks"

    scratch_dir: RelPath = Field(
        "build/scratch", description="where the notebooks' parameter defaults read and write"
    )
    sample_preset: Annotated[str, AfterValidator(_preset)] = Field(
        "small", description="data preset of the sample events under scratch_dir/data"
    )


# --------------------------------------------------------------------------- monitoring


class DriftSettings(Section):
    path: ClassVar[str] = "monitor.drift"

    bins: int = Field(10, ge=2, le=1000, description="reference-quantile bins")
    family_alpha: float = Field(0.05, gt=0, lt=1, description="false-alarm rate per window")
    psi_threshold: float = Field(0.005, ge=0, description="smallest PSI worth a flag")
    psi_severe: float = Field(0.1, ge=0, description="PSI from here on is severity high")
    share_threshold: float = Field(0.3, gt=0, le=1, description="share of columns: dataset drift")
    min_rows: int = Field(500, ge=1, description="fewer live values: no decision")
    max_categories: int = Field(50, ge=1)
    ignore_columns: tuple[str, ...] = Field(("baseline_prediction",), strict=False)
    null_rate_threshold: float = Field(
        0.02, ge=0, lt=1, description="smallest null-rate change worth an alert"
    )
    growing_min_fall: float = Field(
        0.05, gt=0, lt=1, description="smallest fall of a growing feature (share of mass)"
    )
    min_reference_blocks: int = Field(
        4, ge=2, description="fewest blocks the training windows are grouped into"
    )

    @model_validator(mode="after")
    def _severe_above_threshold(self) -> DriftSettings:
        if self.psi_severe < self.psi_threshold:
            raise ValueError(
                f"psi_severe must be >= psi_threshold, got {self.psi_severe} < {self.psi_threshold}"
            )
        return self


class SignalSettings(Section):
    path: ClassVar[str] = "monitor.signals"

    max_fallback_rate: float = Field(0.05, ge=0, le=1)
    max_stale_share: float = Field(0.05, ge=0, le=1)
    max_latency_p95_ms: float = Field(150, gt=0)
    min_rows: int = Field(100, ge=1)
    freshness_sla_seconds: float = Field(300.0, gt=0, description="default: serving's")


class QualitySettings(Section):
    path: ClassVar[str] = "monitor.quality"

    label_delay_minutes: float = Field(30, gt=0, description="later clicks count as no click")
    min_labels: int = Field(2000, ge=1)
    calibration_bins: int = Field(10, ge=2, le=1000)
    max_auc_drop: float = Field(0.05, ge=0)
    max_calibration_error: float = Field(0.05, ge=0)
    confidence_z: float = Field(2.33, ge=0)
    reference_metrics: RelPath = Field(
        "build/eval/metrics.json", description="default: evaluate.metrics_file"
    )


class CanarySettings(Section):
    path: ClassVar[str] = "monitor.canary"

    service_url: str = "http://127.0.0.1:3000"
    kill_switch_path: str = "/admin/canary"
    admin_token_env: str = Field("CTR_ADMIN_TOKEN", description="default: serving's")
    artifact: str = Field("ctr-model", description="default: release.artifact")
    min_rows: int = Field(300, ge=1)
    max_error_rate_increase: float = Field(0.01, ge=0)
    max_latency_p95_ratio: float = Field(1.5, gt=0)
    min_latency_p95_gap_ms: float = Field(5.0, ge=0)
    prediction_bins: int = Field(10, ge=2)
    max_prediction_psi: float = Field(0.1, ge=0)
    min_labels: int = Field(300, ge=1)
    max_auc_drop: float = Field(0.03, ge=0)
    max_log_loss_increase: float = Field(0.05, ge=0)
    confidence_z: float = Field(2.33, ge=0)
    require_labels: bool = False
    label_delay_minutes: float = Field(30.0, gt=0, description="default: quality's")
    health_report: str = Field(
        "monitors/canary/health_{version}.json", description="default: release.canary_health_file"
    )
    evidence_dir: RelPath = "monitors/canary/rollbacks"
    timeout_seconds: float = Field(15.0, gt=0)

    def health_path(self, root: Path, version: str | None) -> Path:
        """Where the health report of ``version`` goes (``health_report`` filled in)."""
        return root / self.health_report.format(
            version=version or "unknown", artifact=self.artifact
        )


class AlertSettings(Section):
    path: ClassVar[str] = "monitor.alerts"

    webhook_url: Annotated[str, BeforeValidator(lambda v: "" if v is None else v)] = Field(
        "", pattern=r"^(https?://.+)?$", description="empty: log only"
    )
    cooldown_minutes: float = Field(60, ge=0)
    timeout_seconds: float = Field(5, gt=0)
    state_db: RelPath = "monitors/alerts.sqlite"


class RetrainSettings(Section):
    path: ClassVar[str] = "monitor.retrain"

    trigger_dir: RelPath = "monitors/triggers"
    run: Literal["none", "repro", "exp"] = "none"
    on_dataset_drift: bool = True
    on_prediction_drift: bool = True
    on_severe_drift: bool = Field(True, description="one column drifts with PSI >= psi_severe")
    on_quality_breach: bool = True
    timeout_minutes: float = Field(120, gt=0)


class MonitorSettings(Section):
    """Drift, serving signals, online quality, canary guard, alerts and retraining."""

    path: ClassVar[str] = "monitor"

    clicks_path: RelPath = "monitors/clicks"
    out_dir: RelPath = "monitors/drift"
    live_profile_dir: RelPath = "monitors/drift/windows"
    window: str = Field("1h", min_length=1, description="pandas frequency of live windows")
    report_notebook: RelPath = "monitors/drift_report.ipynb"
    report_out: RelPath = "monitors/reports/drift_report.ipynb"
    drift: DriftSettings = DriftSettings()
    signals: SignalSettings = SignalSettings()
    quality: QualitySettings = QualitySettings()
    canary: CanarySettings = CanarySettings()
    alerts: AlertSettings = AlertSettings()
    retrain: RetrainSettings = RetrainSettings()


class SimulateSettings(Section):
    """The closed loop end to end (``mlops simulate``)."""

    path: ClassVar[str] = "simulate"

    out_dir: RelPath = "monitors/simulate"
    scenario_start_day: int = Field(2, ge=0)
    requests: int = Field(3000, ge=1)
    canary_requests: int = Field(3000, ge=1)
    canary_share: float = Field(0.3, gt=0, lt=1)
    batch_size: int = Field(500, ge=1)
    approver: str = Field("mlops simulate (automatic)", min_length=1)
    startup_timeout_seconds: float = Field(120, gt=0)
    log_wait_seconds: float = Field(30, gt=0)
    confirm_requests: int = Field(200, ge=1)


# --------------------------------------------------------------------------- the file


class Settings(Section):
    """The whole ``params.yaml``."""

    base: BaseSettings = BaseSettings()
    generate: GenerateSettings = GenerateSettings()
    features: FeaturesSettings = FeaturesSettings()
    build_dataset: BuildDatasetSettings = BuildDatasetSettings()
    train: TrainSettings = TrainSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    profile: ProfileSettings = ProfileSettings()
    package: PackageSettings = PackageSettings()
    serving: ServingSettings = ServingSettings()
    release: ReleaseSettings = ReleaseSettings()
    review: ReviewSettings = ReviewSettings()
    notebooks: NotebooksSettings = NotebooksSettings()
    monitor: MonitorSettings = MonitorSettings()
    simulate: SimulateSettings = SimulateSettings()

    @model_validator(mode="before")
    @classmethod
    def _shared_defaults(cls, data: Any) -> Any:
        """Keys a monitor section shares with its owner default to the owner's value."""
        if not isinstance(data, dict):
            return data
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        monitor = data.setdefault("monitor", {})
        if not isinstance(monitor, dict):
            return data
        serving, release = data.get("serving") or {}, data.get("release") or {}
        evaluate = data.get("evaluate") or {}
        shared = {
            "signals": {"freshness_sla_seconds": serving.get("freshness_sla_seconds")},
            "quality": {"reference_metrics": evaluate.get("metrics_file")},
            "canary": {
                "admin_token_env": serving.get("admin_token_env"),
                "artifact": release.get("artifact"),
                "health_report": release.get("canary_health_file"),
                "label_delay_minutes": (monitor.get("quality") or {}).get("label_delay_minutes"),
            },
        }
        for sub, values in shared.items():
            section = dict(monitor.get(sub) or {})
            for key, value in values.items():
                if value is not None:
                    section.setdefault(key, value)
            monitor[sub] = section
        return data

    @property
    def reference_profile(self) -> str:
        """The whylogs reference profile the ``profile`` stage writes."""
        return self.profile.reference_profile

    @property
    def drift_reference(self) -> str:
        """The exact per-window drift reference the ``profile`` stage writes."""
        return self.profile.drift_reference


class ParamsError(ConfigError):
    """``params.yaml`` holds one or more invalid values; ``problems`` lists them by key."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} invalid value(s), nothing was run:"]
        lines += [f"  - {key}: {what}" for key, what in problems]
        lines.append(
            "What to do: fix these keys in params.yaml (docs/settings.md says what each one "
            "means and allows) or restore it with `git checkout params.yaml`, then rerun."
        )
        super().__init__("\n".join(lines))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


_MESSAGES = {
    "int_type": "must be a whole number, got {shown}",
    "int_parsing": "must be a whole number, got {shown}",
    "int_from_float": "must be a whole number, got {shown}",
    "float_type": "must be a finite number, got {shown}",
    "float_parsing": "must be a finite number, got {shown}",
    "finite_number": "must be a finite number, got {shown}",
    "bool_type": "must be true or false, got {shown}",
    "string_type": "must be a string, got {shown}",
    "string_too_short": "must be a non-empty string, got {shown}",
    "dict_type": "must be a mapping, got {shown}",
    "tuple_type": "must be a list, got {shown}",
    "greater_than_equal": "must be >= {ge}, got {input}",
    "greater_than": "must be > {gt}, got {input}",
    "less_than_equal": "must be <= {le}, got {input}",
    "less_than": "must be < {lt}, got {input}",
    "string_pattern_mismatch": "must match {pattern}, got {input!r}",
    "literal_error": "must be one of {expected}, got {input!r}",
    "missing": "is missing; add it (docs/settings.md lists every key)",
    "extra_forbidden": "is not a known key; remove it or fix its spelling (docs/settings.md)",
}


def _problems(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for error in exc.errors():
        nested = (error.get("ctx") or {}).get("error")
        if isinstance(nested, ParamsError):  # a section's own check, keys already in full
            out.extend(nested.problems)
            continue
        parts = [str(p) for p in error["loc"] if not isinstance(p, int)]  # no list positions
        key = (prefix + ".".join(parts)).rstrip(".") or "<file>"
        template = _MESSAGES.get(error["type"])
        got = error.get("input")
        if template is None:
            what = error["msg"].removeprefix("Value error, ")
        else:
            what = template.format(input=got, shown=_shown(got), **(error.get("ctx") or {}))
        out.append((key, what))
    return out


def _dvc_keys(root: Path | None) -> list[str]:
    """Keys ``dvc.yaml`` interpolates or tracks: the file must hold them (no default applies)."""
    import re

    import yaml

    if root is None:
        return []
    try:
        text = (root / "dvc.yaml").read_text()
    except OSError:
        return []
    keys = set(re.findall(r"\$\{([a-z_]+(?:\.[a-z_]+)+)\}", text))
    for stage in (yaml.safe_load(text) or {}).get("stages", {}).values():
        for entry in stage.get("params") or []:
            if isinstance(entry, str):
                keys.add(entry)
    return sorted(keys)


def _missing(params: dict[str, Any], keys: list[str]) -> list[tuple[str, str]]:
    found = []
    for dotted in keys:
        node: Any = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                found.append((dotted, "is missing; add it (dvc.yaml reads it; docs/settings.md)"))
                break
            node = node[part]
    return found


def problems(params: Any, root: Path | None = None) -> list[tuple[str, str]]:
    """Every invalid, unknown or missing key of a parsed ``params.yaml``, as ``(key, what)``.

    With ``root``, keys that its ``dvc.yaml`` reads must be in the file; every other key
    has its default here.
    """
    if not isinstance(params, dict):
        return [("<file>", f"must be a mapping of sections, got {type(params).__name__}")]
    found = _missing(params, _dvc_keys(root))
    try:
        Settings.model_validate(params)
    except ValidationError as exc:
        found += [p for p in _problems(exc) if p[0] not in {k for k, _ in found}]
    return found


def settings_from(
    params: Any, where: Path | str = "params.yaml", root: Path | None = None
) -> Settings:
    """Validate a parsed params mapping; raise ParamsError listing every problem."""
    found = problems(params, root)
    if found:
        raise ParamsError(where, found)
    return Settings.model_validate(params)


def load_settings(root: Path | None = None) -> Settings:
    """Load and validate ``<root>/params.yaml`` (the project root by default)."""
    root = root or project_root()
    path = root / "params.yaml"
    return settings_from(load_params(path), path, root)


def _describe(field: Any) -> tuple[str, str]:
    """Type and limits of a field, as the settings table shows them."""
    ann = field.annotation
    if get_origin(ann) is Literal:
        return "one of", ", ".join(f"`{a}`" for a in get_args(ann))
    kind = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    limits = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                limits.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None):
            limits.append("non-empty")
        if getattr(meta, "pattern", None):
            limits.append(f"matches `{meta.pattern}`")
    return kind, ", ".join(limits)


def settings_markdown() -> str:
    """The settings reference (docs/settings.md): every key, its type, default and meaning."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `pipelines/core/settings.py` by `mlops params docs`; a test keeps it",
        "current. Every key of `params.yaml`, its type, default and what it means. Unknown keys",
        "are refused; `mlops params check` lists every problem by key.",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((name, ann))
                continue
            default = field.get_default(call_default_factory=True)
            shown = default.isoformat() if isinstance(default, dt.date) else default
            kind, limits = _describe(field)
            cells = [f"`{name}`", kind, f"`{shown!r}`", limits, field.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if rows:
            lines.extend(["", f"## `{prefix}`", ""])
            if model.__doc__ and model is not Settings:
                lines.extend([model.__doc__.strip().splitlines()[0], ""])
            lines.append("| key | type | default | limits | meaning |")
            lines.append("|---|---|---|---|---|")
            lines.extend(rows)
        for name, sub in nested:
            walk(sub, f"{prefix}.{name}" if prefix else name)

    walk(Settings, "")
    return "\n".join(lines) + "\n"
