"""The release file: which model versions a service runs and how traffic reaches them.

A release names up to three model tiers plus the rule baseline:

Details: docs/serving.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.core.config import ConfigError
from pipelines.core.settings import FeaturesSettings, ServingSettings

SCHEMA_VERSION = 2
SIGNING_KEY_ENV = "CTR_RELEASE_SIGNING_KEY"  # or <this>_FILE: a file holding the key
MIN_KEY_BYTES = 16


class ModelRef(BaseModel):
    """One model version as the service loads it."""

    tag: str
    version: str
    registry_version: str | None = None
    stage: str | None = None
    feature_set: str
    files: dict[str, str]  # file name inside the BentoML model -> md5
    sha256: dict[str, str] = Field(default_factory=dict)  # file name -> sha256 (checked too)
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
    sha256: dict[str, str] = Field(default_factory=dict)


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
    sha256: str | None = None


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


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_id(release: dict[str, Any]) -> str:
    """Content id of a release: same tiers, files and policy give the same id, whatever the time.

    Computed over the release as written (JSON), so ``load_release`` recomputes it from
    the file and refuses a file whose content no longer matches its id.
    """
    keys = ("policy", "feature_source", "prod", "candidate", "previous")
    stable: dict[str, Any] = {k: release.get(k) for k in keys}
    if release.get("online_store"):  # releases without a store keep their earlier ids
        stable["online_store"] = release["online_store"]
    for part in ("prod", "candidate", "previous", "feature_source"):
        entry = stable[part]
        if isinstance(entry, dict):  # empty sha256: files of releases made before it
            stable[part] = {
                k: v for k, v in entry.items() if k != "lineage" and not (k == "sha256" and not v)
            }
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    return f"r{digest.hexdigest()[:12]}"


def _legacy_release_id(release: dict[str, Any]) -> str:
    """The id releases built before the id was verified got: candidate and previous were
    hashed before their default stage was filled in."""
    old = dict(release)
    for role in ("candidate", "previous"):
        if old.get(role) and old[role].get("stage") == role:
            old[role] = {**old[role], "stage": None}
    return release_id(old)


def signing_key() -> bytes | None:
    """The release signing key from the environment (``CTR_RELEASE_SIGNING_KEY``, or a file
    named by ``CTR_RELEASE_SIGNING_KEY_FILE``); None when neither is set."""
    value = os.environ.get(SIGNING_KEY_ENV, "")
    key_file = os.environ.get(f"{SIGNING_KEY_ENV}_FILE", "")
    if not value and key_file:
        try:
            value = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{SIGNING_KEY_ENV}_FILE names {key_file}, which cannot be read: {exc}"
            ) from exc
    if not value:
        return None
    if len(value.encode()) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the release signing key is {len(value.encode())} bytes; use at least "
            f"{MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
        )
    return value.encode()


def _signed_bytes(data: dict[str, Any]) -> bytes:
    body = {k: v for k, v in data.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"key-id:" + key).hexdigest()[:8]


def sign_release_dict(data: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    """The release JSON with an HMAC-SHA256 ``signature`` over everything else in it.

    ``key`` defaults to the environment's signing key; without one, ``data`` is
    returned unsigned (signing is optional).
    """
    key = key if key is not None else signing_key()
    if key is None:
        return data
    mac = hmac.new(key, _signed_bytes(data), hashlib.sha256).hexdigest()
    return {**data, "signature": {"alg": "hmac-sha256", "key_id": _key_id(key), "value": mac}}


def reseal_release_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A release JSON edited on purpose (tests, benchmarks, an operator's tool) with its
    ``release_id`` recomputed and, when a signing key is set, signed again."""
    data = {k: v for k, v in data.items() if k != "signature"}
    data["release_id"] = release_id(data)
    return sign_release_dict(data)


def verify_signature(data: dict[str, Any], where: str, key: bytes | None) -> None:
    """With a key: refuse a release whose signature is missing or does not match."""
    if key is not None:
        sig = data.get("signature")
        if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
            raise ConfigError(
                f"release file {where} is not signed, and this service holds a signing key "
                f"({SIGNING_KEY_ENV}): refusing it. Build it with the key set, or sign it with "
                "`python -m pipelines.modeling.release sign FILE`."
            )
        expected = hmac.new(key, _signed_bytes(data), hashlib.sha256).hexdigest()
        if sig.get("alg") != "hmac-sha256" or not hmac.compare_digest(sig["value"], expected):
            raise ConfigError(
                f"release file {where}: signature does not match (signed with key id "
                f"{sig.get('key_id')}, this service holds key id {_key_id(key)}); the file was "
                "changed after signing or signed with another key: refusing it"
            )


def verify_release_dict(data: dict[str, Any], where: str, key: bytes | None) -> None:
    """Refuse a release whose id is not its content hash, or (with a key) whose
    signature is missing or wrong. Runs before any model of the release is read."""
    verify_signature(data, where, key)
    stored = data.get("release_id")
    actual = release_id(data)
    if stored not in (actual, _legacy_release_id(data)):
        raise ConfigError(
            f"release file {where}: release_id {stored} does not match its content ({actual}); "
            "the file was edited after it was built. Rebuild it (`dvc repro package` or "
            "pipelines.modeling.release.build_release) instead of editing it."
        )


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
    try:
        built = Release(
            service_name=service_name,
            release_id="",
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
                tag=prod.tag,
                file="baseline.json",
                md5=prod.files["baseline.json"],
                sha256=prod.sha256.get("baseline.json"),
            ),
            online_store=online_store,
        )
    except ValidationError as exc:
        raise ConfigError(f"release is invalid: {exc}") from exc
    return built.model_copy(update={"release_id": release_id(built.model_dump(mode="json"))})


def load_release(path: Path) -> Release:
    """Read, verify and validate a release file; the error says which file and what to do.

    Verified first (signature when a signing key is set, then ``release_id`` as the
    content hash), so a changed file is refused before any model is loaded.
    """
    if not path.is_file():
        raise FileNotFoundError(f"release file {path} is missing; run `dvc repro package`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"release file {path} is not JSON ({exc}); rebuild it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"release file {path} is not a JSON object; rebuild it")
    verify_signature(data, str(path), signing_key())
    try:
        release = Release.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"release file {path} is not a valid release (schema {SCHEMA_VERSION}): {exc}. "
            "Rebuild it with `dvc repro package`."
        ) from exc
    verify_release_dict(data, str(path), None)
    return release


def sign_release_file(path: Path) -> str:
    """Sign an existing release file in place with the environment's key; returns the key id."""
    from pipelines.core.io import write_json

    key = signing_key()
    if key is None:
        raise ConfigError(f"set {SIGNING_KEY_ENV} (or {SIGNING_KEY_ENV}_FILE) to sign releases")
    data = json.loads(path.read_text())
    verify_release_dict(data, str(path), None)  # never sign a file whose content was edited
    write_json(path, sign_release_dict(data, key))
    return _key_id(key)


if __name__ == "__main__":  # python -m pipelines.modeling.release sign FILE
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "sign":
        sys.exit("usage: python -m pipelines.modeling.release sign RELEASE.json")
    print(f"signed {sys.argv[2]} with key id {sign_release_file(Path(sys.argv[2]))}")
