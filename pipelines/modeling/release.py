"""The release file: which model versions a service runs and how traffic reaches them.

A release names up to three model tiers plus the rule baseline:

Details: docs/serving.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.core.config import ConfigError
from pipelines.core.settings import FeaturesSettings, ServingSettings

SCHEMA_VERSION = 2


class ModelRef(BaseModel):
    """One model version as the service loads it."""

    tag: str
    version: str
    registry_version: str | None = None
    stage: str | None = None
    feature_set: str
    files: dict[str, str]  # file name inside the BentoML model -> md5
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """What responses call this model: the registry version when known, else the tag."""
        return self.registry_version or self.version


class FeatureRef(BaseModel):
    """The online feature source of the release (a point-in-time snapshot by default)."""

    kind: Literal["snapshot"] = "snapshot"
    tag: str
    feature_set: str
    names: list[str]
    files: dict[str, str]


class OnlineStoreRef(BaseModel):
    """The online feature store the service reads, when ``features.online.serve`` is true.

    The packaged snapshot (``feature_source``) stays the fallback while the store cannot
    answer; the environment variable ``CTR_FEATURE_STORE_URL`` overrides ``url`` at
    deploy time (``none`` turns the store off). See docs/feature_store.md.
    """

    url: str
    feature_set: str
    allowed_lateness_seconds: float = Field(3600.0, ge=0)
    timeout_ms: float = Field(50.0, gt=0)  # per lookup: a slower store falls back
    retry_seconds: float = Field(1.0, ge=0)  # after a failure, the snapshot answers this long
    max_ingest_rows: int = Field(10_000, ge=1)  # largest batch the service's /admin/ingest takes


def online_store_ref(features: FeaturesSettings, feature_set: str) -> OnlineStoreRef | None:
    """The release's online store from ``features.online`` (None unless ``serve: true``)."""
    online = features.online
    if not online.serve:
        return None
    return OnlineStoreRef(
        url=online.url,
        feature_set=feature_set,
        allowed_lateness_seconds=online.allowed_lateness_seconds,
        timeout_ms=online.serving_timeout_ms,
        retry_seconds=online.retry_seconds,
        max_ingest_rows=online.max_ingest_rows,
    )


class BaselineRef(BaseModel):
    """The rule baseline: a file inside one model's BentoML folder."""

    tag: str
    file: str
    md5: str


class Release(BaseModel):
    """A complete release description; see the module docstring."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    service_name: str
    release_id: str
    created_at: str
    source: str = "package"
    policy: ServingSettings
    feature_source: FeatureRef
    prod: ModelRef
    candidate: ModelRef | None = None
    previous: ModelRef | None = None
    baseline: BaselineRef
    online_store: OnlineStoreRef | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Release:
        if self.policy.routing != "none" and self.candidate is None:
            raise ValueError(
                f"routing is {self.policy.routing!r} but the release has no candidate model; "
                "set serving.candidate_model to a model tag or serving.routing to none"
            )
        for ref in (self.prod, self.candidate, self.previous):
            if ref is not None and ref.feature_set != self.feature_source.feature_set:
                raise ValueError(
                    f"model {ref.tag} uses feature set {ref.feature_set!r} but the release "
                    f"serves {self.feature_source.feature_set!r}; rebuild that model on this "
                    "feature set"
                )
        if self.online_store and self.online_store.feature_set != self.feature_source.feature_set:
            raise ValueError(
                f"the online store serves {self.online_store.feature_set!r} but the release "
                f"serves {self.feature_source.feature_set!r}; set features.feature_set to one value"
            )
        return self

    def tiers(self) -> dict[str, ModelRef]:
        """The model tiers present, keyed by role."""
        found = {"prod": self.prod, "candidate": self.candidate, "previous": self.previous}
        return {role: ref for role, ref in found.items() if ref is not None}

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON written to disk: the schema plus the flat keys of the first format."""
        data = self.model_dump(mode="json")
        data.update(
            model_version=self.prod.version,
            model_tag=self.prod.tag,
            model_md5=self.prod.files.get("model.joblib"),
            features_tag=self.feature_source.tag,
            feature_set=self.feature_source.feature_set,
            features=self.feature_source.names,
            freshness_sla_seconds=self.policy.freshness_sla_seconds,
            metrics=self.prod.metrics,
            lineage=self.prod.lineage,
        )
        return data


def release_id(release: dict[str, Any]) -> str:
    """Content id of a release: same tiers and policy give the same id, whatever the time."""
    stable = {k: release[k] for k in ("policy", "feature_source", "prod", "candidate", "previous")}
    if release.get("online_store"):  # releases without a store keep their earlier ids
        stable["online_store"] = release["online_store"]
    for tier in ("prod", "candidate", "previous"):
        if stable[tier] is not None:
            stable[tier] = {k: v for k, v in stable[tier].items() if k != "lineage"}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    return f"r{digest.hexdigest()[:12]}"


def build_release(
    service_name: str,
    policy: ServingSettings,
    features: FeatureRef,
    prod: ModelRef,
    candidate: ModelRef | None = None,
    previous: ModelRef | None = None,
    source: str = "package",
    online_store: OnlineStoreRef | None = None,
    created_at: str | None = None,
) -> Release:
    """Assemble and validate a release; the baseline ships inside the prod model.

    ``created_at`` defaults to now; the ``package`` stage passes its source date so
    the file is a pure function of its inputs.
    """
    if "baseline.json" not in prod.files:
        raise ConfigError(f"prod model {prod.tag} has no baseline.json; rerun the train stage")
    prod = prod.model_copy(update={"stage": prod.stage or "prod"})
    if candidate is not None and candidate.tag == prod.tag:
        raise ConfigError(
            f"serving.candidate_model {candidate.tag} is the prod model itself; "
            "name a different version or set it to none"
        )
    if previous is not None and previous.tag == prod.tag:
        previous = None  # re-packaging the same model keeps no self-fallback
    draft = {
        "policy": policy.model_dump(),
        "feature_source": features.model_dump(),
        "prod": prod.model_dump(),
        "candidate": candidate.model_dump() if candidate else None,
        "previous": previous.model_dump() if previous else None,
        "online_store": online_store.model_dump() if online_store else None,
    }
    try:
        return Release(
            service_name=service_name,
            release_id=release_id(draft),
            created_at=created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            source=source,
            policy=policy,
            feature_source=features,
            prod=prod,
            candidate=candidate.model_copy(update={"stage": candidate.stage or "candidate"})
            if candidate
            else None,
            previous=previous.model_copy(update={"stage": previous.stage or "previous"})
            if previous
            else None,
            baseline=BaselineRef(
                tag=prod.tag, file="baseline.json", md5=prod.files["baseline.json"]
            ),
            online_store=online_store,
        )
    except ValidationError as exc:
        raise ConfigError(f"release is invalid: {exc}") from exc


def load_release(path: Path) -> Release:
    """Read and validate a release file; the error says which file and what to do."""
    if not path.is_file():
        raise FileNotFoundError(f"release file {path} is missing; run `dvc repro package`")
    try:
        return Release.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ConfigError(
            f"release file {path} is not a valid release (schema {SCHEMA_VERSION}): {exc}. "
            "Rebuild it with `dvc repro package`."
        ) from exc


def read_release_dict(path: Path) -> dict[str, Any] | None:
    """The raw JSON of an existing release file, or None (used to find the previous prod)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
