"""Release integrity: release_id verified as the content hash, sha256 per artifact, HMAC signing,
no internal paths in what public callers see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines.core.config import ConfigError
from pipelines.core.settings import ServingSettings
from pipelines.modeling.release import (
    SIGNING_KEY_ENV,
    load_release,
    release_id,
    sign_release_dict,
)
from pipelines.serving.predictor import Predictor, PredictRequest, Runtime
from pipelines.serving.security import public_metadata
from tests.support.serving import last_event_time, release_for

KEY = "release-signing-key-for-tests-7c1d"


@pytest.fixture(scope="module")
def built(small_project: Path) -> tuple[dict, object]:
    release, model_path = release_for(
        ServingSettings(latency_budget_ms=5000),
        small_project / "data",
        small_project / "build/model",
    )
    return release.to_json_dict(), model_path


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_release_id_is_verified_as_the_content_hash_on_load(built, tmp_path: Path) -> None:
    data, _ = built
    assert load_release(write(tmp_path / "ok.json", data)).release_id == data["release_id"]
    md5 = json.loads(json.dumps(data))
    md5["prod"]["files"]["model.joblib"] = "0" * 32
    tag = json.loads(json.dumps(data))
    tag["prod"]["tag"] = "ctr_model:mdifferent0000"
    policy = json.loads(json.dumps(data))
    policy["policy"]["candidate_share"] = 0.5
    for name, changed in (("md5", md5), ("tag", tag), ("policy", policy)):
        with pytest.raises(ConfigError, match="release_id .* does not match its content"):
            load_release(write(tmp_path / f"{name}.json", changed))
    # created_at and the lineage are not content: they may differ
    relabelled = {**data, "created_at": "2030-01-01T00:00:00+00:00"}
    assert load_release(write(tmp_path / "relabelled.json", relabelled))


def test_every_artifact_carries_a_sha256_that_is_checked(built, tmp_path: Path) -> None:
    data, model_path = built
    for ref in (data["prod"], data["feature_source"]):
        assert set(ref["sha256"]) == set(ref["files"])
        assert all(len(h) == 64 for h in ref["sha256"].values())
    assert len(data["baseline"]["sha256"]) == 64
    # Same md5, different sha256: only the sha256 check can refuse it.
    changed = json.loads(json.dumps(data))
    changed["prod"]["sha256"]["model.joblib"] = "f" * 64
    changed["release_id"] = release_id(changed)
    runtime = Runtime.load(load_release(write(tmp_path / "r.json", changed)), model_path)
    assert runtime.tiers["prod"].model is None
    assert "sha256" in runtime.tiers["prod"].refused


def test_signed_release_is_verified_before_anything_loads(
    built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, _ = built
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    with pytest.raises(ConfigError, match="not signed"):
        load_release(write(tmp_path / "unsigned.json", data))
    signed = sign_release_dict(data)
    assert signed["signature"]["alg"] == "hmac-sha256"
    assert load_release(write(tmp_path / "signed.json", signed)).release_id == data["release_id"]
    # Tampered and re-hashed so the id matches: only the signature catches it.
    tampered = json.loads(json.dumps(signed))
    tampered["prod"]["tag"] = "ctr_model:mattacker00000"
    tampered["release_id"] = release_id(tampered)
    with pytest.raises(ConfigError, match="signature does not match"):
        load_release(write(tmp_path / "tampered.json", tampered))
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-key-of-another-team-xx")
    with pytest.raises(ConfigError, match="signature does not match"):
        load_release(write(tmp_path / "other.json", signed))
    # The key can also come from a file (a mounted secret); the signature is not the key.
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    monkeypatch.setenv(SIGNING_KEY_ENV + "_FILE", str(key_file))
    assert load_release(tmp_path / "signed.json")
    assert KEY not in (tmp_path / "signed.json").read_text()


def test_refusals_name_no_internal_path(built, small_project: Path, tmp_path: Path) -> None:
    data, model_path = built
    release = load_release(write(tmp_path / "r.json", data))
    broken = tmp_path / "store" / "models" / "ctr_model" / "broken"
    shutil.copytree(small_project / "build/model", broken)
    (broken / "model.joblib").unlink()  # the refusal used to name the full path

    def resolve(tag: str) -> Path:
        return broken if tag == release.prod.tag else model_path(tag)

    at = (last_event_time(small_project / "data") - pd.Timedelta(hours=1)).isoformat()
    predictor = Predictor(Runtime.load(release, resolve))
    answer = predictor.predict(
        [
            PredictRequest(
                user="u00001", item="i00001", surface="feed", device="mobile", timestamp=at
            )
        ]
    )[0]
    meta = predictor.metadata()
    # what a public caller sees, and the load problems (also shown to operators)
    shown = json.dumps(
        [public_metadata(meta), meta["problems"], meta["tiers"], answer.degraded_reason]
    )
    predictor.close()
    assert "refused" in shown
    for secret in (str(tmp_path), str(small_project), "/models/"):
        assert secret not in shown


def test_a_stored_model_takes_the_lineage_of_the_run_that_packages_it(
    small_project: Path, tmp_path: Path
) -> None:
    """The same model files packaged again with another lineage (reports around it changed)
    record the new lineage: the release depends on the run, not on what the store held.
    In a child process, for a store of its own (BENTOML_HOME is read at import)."""
    script = f"""
from pathlib import Path
from pipelines.stages.packaging import model_ref, save_model_dir, use_bentoml_home
use_bentoml_home(Path({str(tmp_path / "bentoml")!r}))
model_dir = Path({str(small_project / "build/model")!r})
first = save_model_dir(model_dir, {{"auc": 0.7}}, {{"commit": "a"}})
again = save_model_dir(model_dir, {{"auc": 0.7}}, {{"commit": "a"}})
assert again.tag == first.tag and again.lineage == {{"commit": "a"}}, again.lineage
changed = save_model_dir(model_dir, {{"auc": 0.7}}, {{"commit": "b"}})
assert changed.tag == first.tag
assert changed.lineage == {{"commit": "b"}} == model_ref(first.tag).lineage, changed.lineage
"""
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
