"""The settings model: one per params.yaml section, unknown keys refused, docs generated from it."""

from __future__ import annotations

import pytest
import yaml

from pipelines.core.config import ConfigError
from pipelines.core.settings import (
    DriftSettings,
    Settings,
    load_settings,
    problems,
    settings_from,
    settings_markdown,
)
from tests.support.project import REPO


def test_project_params_are_valid_and_shared_keys_follow_their_owner() -> None:
    settings = load_settings(REPO)
    assert settings.monitor.canary.artifact == settings.release.artifact
    assert settings.monitor.canary.health_report == settings.release.canary_health_file
    assert settings.monitor.signals.freshness_sla_seconds == settings.serving.freshness_sla_seconds
    assert settings.monitor.quality.reference_metrics == settings.evaluate.metrics_file
    assert settings.reference_profile == f"{settings.profile.out_dir}/profile.bin"


def test_every_problem_is_named_by_key() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0
    params["serving"]["workerz"] = 2
    params["monitor"]["drift"]["psi_severe"] = 0.0001
    params["release"]["canary_health_file"] = "health.json"
    params["generate"]["preset"] = "huge"
    params["base"]["raw_dir"] = "../elsewhere"
    found = dict(problems(params, REPO))
    assert found["train.learning_rate"] == "must be > 0.0, got 0"
    assert "not a known key" in found["serving.workerz"]
    assert "psi_severe must be >= psi_threshold" in found["monitor.drift"]
    assert "{version}" in found["release.canary_health_file"]
    assert "unknown preset 'huge'" in found["generate.preset"]
    assert "without '..'" in found["base.raw_dir"]
    with pytest.raises(ConfigError, match="6 invalid value"):
        settings_from(params, root=REPO)


def test_a_section_alone_raises_a_config_error_with_its_full_key() -> None:
    with pytest.raises(ConfigError, match=r"monitor\.drift\.binz: is not a known key"):
        DriftSettings(binz=3)
    with pytest.raises(ConfigError, match=r"monitor\.drift\.family_alpha: must be < 1"):
        DriftSettings(family_alpha=1.5)
    assert DriftSettings(bins=20).bins == 20


def test_defaults_need_no_file_but_dvc_keys_must_be_in_it() -> None:
    assert problems({}) == []  # every key has its default in the model
    missing = dict(problems({}, REPO))
    assert missing["train.max_iter"].startswith("is missing")  # dvc.yaml interpolates it
    assert Settings().train.max_iter >= 1


def test_settings_doc_is_generated_from_the_model() -> None:
    doc = (REPO / "docs" / "settings.md").read_text()
    assert doc == settings_markdown(), "docs/settings.md is stale: run `mlops params docs`"
