"""Release governance on real GTO git tags in a temporary copy of the project.

The flow test walks register -> canary -> prod -> a second version (one real
downstream ``dvc repro``) -> regression refused -> register -> canary -> prod ->
rollback from the DVC remote, then checks history and lineage against git and
``dvc.lock``. The refusal test checks that bad input is a clear error and leaves
the registry (git tags and HEAD) unchanged. Gate arithmetic is tested directly.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.registry.gates import floor_gates, regression_gates
from pipelines.registry.registry import format_message, normalize_version, parse_message
from tests.support.project import project_env, run, set_param

ART = "ctr-model"
OWNER = "Release Owner <owner@example.com>"


# --- helpers ---------------------------------------------------------------------------------


class Mlops:
    """The ``mlops`` app run in-process inside a project copy (cwd and env of that copy).

    In-process saves the ~1.5 s interpreter + GTO import per command; one test
    also runs the module as a subprocess to cover the real entry point.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        monkeypatch.chdir(root)
        monkeypatch.delenv("MLOPS_PROJECT_ROOT", raising=False)
        for key, value in project_env(root).items():
            if os.environ.get(key) != value:
                monkeypatch.setenv(key, value)
        self.runner = CliRunner()

    def __call__(self, *args: str) -> str:
        """Run a command that must succeed; return its stdout."""
        from pipelines.cli.main import app

        result = self.runner.invoke(app, list(args))
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result.stdout

    def refused(self, *args: str) -> str:
        """Run a command that must fail cleanly and leave the registry unchanged."""
        from pipelines.cli.main import app

        before = registry_state(self.root)
        result = self.runner.invoke(app, list(args))
        assert result.exit_code == 1, (args, result.output, result.exception)
        assert result.stderr.startswith("error: "), result.stderr
        assert registry_state(self.root) == before, args
        return result.stderr.replace("\n", " ")


def git(root: Path, *args: str) -> str:
    return run(["git", *args], root).stdout.strip()


def tags(root: Path) -> set[str]:
    return set(git(root, "tag").split())


def registry_state(root: Path) -> tuple[set[str], str]:
    return tags(root), git(root, "rev-parse", "HEAD")


def edit_params(root: Path, change: Any) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)


def tag_fields(root: Path, tag: str) -> dict[str, Any]:
    return parse_message(git(root, "tag", "-l", "--format=%(contents)", tag))[1]


def cache_object(root: Path, base: str, md5: str) -> Path:
    return root / base / "files" / "md5" / md5[:2] / md5[2:]


# --- pure functions --------------------------------------------------------------------------


def test_floor_and_regression_gate_arithmetic() -> None:
    metrics = {
        "auc": 0.70,
        "calibration_error": 0.02,
        "per_surface": {
            "feed": {"auc": 0.66, "calibration_error": 0.01},
            "search": {"auc": 0.69, "calibration_error": 0.03},
        },
    }
    floors = floor_gates(metrics, {"auc": {"min": 0.72}, "calibration_error": {"max": 0.05}})
    assert [r.passed for r in floors] == [False, True]
    assert floors[0].margin == pytest.approx(-0.02)
    assert "below the minimum 0.72 by 0.0200" in floors[0].detail
    assert not floor_gates({}, {"auc": {"min": 0.5}})[0].passed  # a missing metric fails

    prod = {
        "auc": 0.70,
        "calibration_error": 0.02,
        "per_surface": {
            "feed": {"auc": 0.68, "calibration_error": 0.01},
            "search": {"auc": 0.69, "calibration_error": 0.02},
            "recs": {"auc": 0.65, "calibration_error": 0.02},
        },
    }
    rules = {"auc": {"max_drop": 0.01}, "calibration_error": {"max_rise": 0.005}}
    results = {r.gate: r for r in regression_gates(metrics, prod, "v1.0.0", rules)}
    failed = sorted(g for g, r in results.items() if not r.passed)
    assert failed == [
        "regression: auc on feed",
        "regression: auc on recs",
        "regression: calibration_error on recs",
        "regression: calibration_error on search",
    ]
    assert results["regression: auc on feed"].margin == pytest.approx(-0.01)
    assert "dropped by 0.0200 vs prod v1.0.0" in results["regression: auc on feed"].detail
    assert "candidate has no auc on recs" in results["regression: auc on recs"].detail
    assert results["regression: auc overall"].passed
    assert regression_gates(metrics, None, None, rules)[0].passed  # nothing in prod yet


def test_tag_messages_round_trip_and_versions() -> None:
    fields = {
        "action": "promote",
        "approver": OWNER,
        "reason": "canary: healthy\n24h",
        "emergency": False,
        "canary_evidence": {"present": True, "healthy": True},
    }
    title, parsed = parse_message(format_message("Promote ctr-model v1.0.0 to prod", fields))
    assert title == "Promote ctr-model v1.0.0 to prod" and parsed == fields
    assert parse_message("plain gto message") == ("plain gto message", {})
    assert normalize_version("1.2.3") == normalize_version("v1.2.3") == "v1.2.3"
    from pipelines.registry.registry import RegistryError

    with pytest.raises(RegistryError, match="not a version"):
        normalize_version("banana")


# --- the release flow ------------------------------------------------------------------------


@pytest.mark.slow
def test_release_flow_register_promote_rollback_history_lineage(
    project_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project_copy
    mlops = Mlops(root, monkeypatch)
    (root / "monitors/canary").mkdir(parents=True, exist_ok=True)

    # 1. register v1.0.0: gates pass, report committed and referenced, bento on the remote
    out = mlops("model", "register", "--reason", "first model")
    assert "registered ctr-model v1.0.0" in out and "FAIL" not in out
    assert tags(root) == {f"{ART}@v1.0.0", f"{ART}#staging#1"}
    reg = tag_fields(root, f"{ART}@v1.0.0")
    assert reg["gate_report"] == "reports/gates/ctr-model@v1.0.0.json"
    assert reg["reason"] == "first model"
    report = json.loads(git(root, "show", f"{ART}@v1.0.0:{reg['gate_report']}"))
    assert report["passed"] and report["compared_with_prod"] is None
    assert git(root, "status", "--porcelain") == ""
    bento_v1 = json.loads((root / "build/bento/bento.json").read_text())
    assert reg["bento_tag"] == bento_v1["bento_tag"]
    assert cache_object(root, ".dvc-remote", bento_v1["archive_md5"]).is_file()

    # 2. stage order: prod before canary is refused; canary health must say healthy
    err = mlops.refused(
        "model", "promote", "v1.0.0", "--to", "prod", "--approver", OWNER, "--reason", "go"
    )
    assert "out of order" in err and "--to canary" in err
    mlops("model", "promote", "v1.0.0", "--to", "canary", "--reason", "5% canary")
    health = root / "monitors/canary/health_v1.0.0.json"
    health.write_text(
        json.dumps({"version": "v1.0.0", "healthy": False, "reasons": ["p99 latency above guard"]})
    )
    err = mlops.refused(
        "model", "promote", "v1.0.0", "--to", "prod", "--approver", OWNER, "--reason", "go"
    )
    assert "NOT healthy" in err and "p99 latency above guard" in err
    health.write_text(json.dumps({"version": "v1.0.0", "healthy": True, "requests": 5000}))
    mlops(
        "model",
        "promote",
        "v1.0.0",
        "--to",
        "prod",
        "--approver",
        OWNER,
        "--reason",
        "canary healthy",
    )
    state = json.loads(mlops("model", "status", "--json"))
    assert state["stages"]["prod"]["version"] == "v1.0.0"
    assert state["stages"]["prod"]["approver"] == OWNER

    # 3. a second version: new learning rate, downstream stages rerun, committed
    set_param(root, "train.learning_rate", 0.03)
    run([sys.executable, "-m", "dvc", "repro"], root)
    commit_all(root, "learning rate 0.03")

    # 4. with zero tolerance the regression gate refuses it, naming each regression
    def tolerance(value: float) -> Any:
        def change(p: dict[str, Any]) -> None:
            p["release"]["gates"]["regression"] = {
                "auc": {"max_drop": value},
                "calibration_error": {"max_rise": value},
            }

        return change

    edit_params(root, tolerance(0.0))
    commit_all(root, "zero regression tolerance")
    prod_m = json.loads(git(root, "show", f"{ART}@v1.0.0:build/eval/metrics.json"))
    cand_m = json.loads((root / "build/eval/metrics.json").read_text())
    worse = []
    for metric, sign in (("auc", -1), ("calibration_error", 1)):
        for scope in [None, *prod_m["per_surface"]]:
            old = prod_m[metric] if scope is None else prod_m["per_surface"][scope][metric]
            new = cand_m[metric] if scope is None else cand_m["per_surface"][scope][metric]
            if sign * (new - old) > 0:
                worse.append(
                    f"regression: {metric} {'overall' if scope is None else 'on ' + scope}"
                )
    assert worse, "the two models should differ somewhere; the test needs a regression"
    err = mlops.refused("model", "register")
    assert f"failed {len(worse)} of" in err and "Registry unchanged" in err
    for gate in worse:
        assert gate in err
    assert "exceeded by" in err
    edit_params(root, tolerance(0.05))
    commit_all(root, "accept small regressions")

    # 5. register v1.1.0 against prod v1.0.0, then canary and prod
    mlops("model", "register", "--reason", "learning rate 0.03")
    reg2 = tag_fields(root, f"{ART}@v1.1.0")
    assert reg2["compared_with_prod"] == "v1.0.0"
    assert reg2["bento_tag"] != bento_v1["bento_tag"]
    mlops("model", "promote", "v1.1.0", "--to", "canary")
    out = mlops(
        "model", "promote", "1.1.0", "--to", "prod", "--approver", OWNER, "--reason", "better AUC"
    )
    assert "replaces v1.0.0" in out
    assert json.loads(mlops("model", "status", "--json"))["stages"]["prod"]["version"] == "v1.1.0"

    # 6. rollback must fetch v1.0.0's archive from the DVC remote: drop the local copies
    archive_md5 = reg["bento_archive_md5"]
    cache_object(root, ".dvc/cache", archive_md5).unlink()
    store = root / ".bentoml/bentos" / bento_v1["bento_tag"].replace(":", "/")
    shutil.rmtree(store)
    remote_obj = cache_object(root, ".dvc-remote", archive_md5)
    hidden = remote_obj.with_name("hidden")
    remote_obj.rename(hidden)
    err = mlops.refused("model", "rollback", "--reason", "calibration worse")
    assert "neither the DVC cache nor the remote" in err and "Registry unchanged" in err
    hidden.rename(remote_obj)
    out = mlops("model", "rollback", "--reason", "calibration worse")
    assert "v1.1.0 -> v1.0.0" in out and "imported" in out
    deployed = json.loads((root / "build/deploy/deployed.json").read_text())
    assert deployed["prod_before"] == "v1.1.0" and deployed["prod_after"] == "v1.0.0"
    archive = root / deployed["archive"]
    from pipelines.core.io import md5_file

    assert md5_file(archive) == archive_md5
    assert (store / "bento.yaml").is_file()  # imported back into the BentoML store, not rebuilt
    state = json.loads(mlops("model", "status", "--json"))
    assert state["stages"]["prod"]["version"] == "v1.0.0"
    assert state["stages"]["prod"]["reason"] == "calibration worse"
    # no earlier good prod version is left to return to
    assert "no earlier prod version" in mlops.refused("model", "rollback")

    # 7. history: every step, with who and why
    history = json.loads(mlops("model", "history", "--json"))
    steps = [(e["action"], e["version"], e["stage"]) for e in history]
    assert steps == [
        ("register", "v1.0.0", None),
        ("stage", "v1.0.0", "staging"),
        ("promote", "v1.0.0", "canary"),
        ("promote", "v1.0.0", "prod"),
        ("register", "v1.1.0", None),
        ("stage", "v1.1.0", "staging"),
        ("promote", "v1.1.0", "canary"),
        ("promote", "v1.1.0", "prod"),
        ("rollback-unassign", "v1.1.0", "prod"),
        ("rollback", "v1.0.0", "prod"),
    ]
    assert {e["author"] for e in history} == {"Test User <test@localhost>"}
    assert [
        e["approver"] for e in history if e["action"] == "promote" and e["stage"] == "prod"
    ] == [OWNER, OWNER]
    assert history[3]["fields"]["canary_evidence"]["healthy"] is True
    assert history[7]["fields"]["canary_evidence"]["present"] is False
    assert history[9]["reason"] == "calibration worse"
    assert history[9]["fields"]["effect"]["archive_md5"] == archive_md5
    text = mlops("model", "history")
    assert text.count("approved by Release Owner") == 2 and "calibration worse" in text

    # 8. lineage of v1.0.0 matches git + dvc.lock at its tag, and every hash resolves
    record = json.loads(mlops("model", "lineage", f"{ART}@v1.0.0", "--json"))
    lock = yaml.safe_load(git(root, "show", f"{ART}@v1.0.0:dvc.lock"))["stages"]
    outs = {o["path"]: o["md5"] for s in lock.values() for o in s["outs"]}
    data_dvc = yaml.safe_load(git(root, "show", f"{ART}@v1.0.0:data.dvc"))
    assert record["git"]["commit"] == git(root, "rev-list", "-n1", f"{ART}@v1.0.0")
    assert record["raw_data"]["md5"] == data_dvc["outs"][0]["md5"]
    assert record["dataset"]["md5"] == outs["build/dataset"]
    assert record["model"]["md5"] == outs["build/model"]
    assert record["metrics"]["md5"] == outs["build/eval/metrics.json"]
    assert record["bento"]["dir_md5"] == outs["build/bento"]
    assert (
        record["feature_set"]["name"]
        == lock["build_dataset"]["params"]["params.yaml"]["features.feature_set"]
    )
    assert record["params"]["train"]["train.learning_rate"] == 0.1
    # the rows it was trained on: the whole window (under train.max_train_rows)
    assert record["model"]["training_sample"]["kind"] == "none", record["model"]
    assert {n["path"]: n["md5"] for n in record["notebooks"]} == {
        p: m for p, m in outs.items() if p.startswith("reports/")
    }
    assert record["metrics"]["values"]["auc"] == prod_m["auc"]
    assert record["bento"]["tag"] == bento_v1["bento_tag"]
    assert record["bento"]["archive_md5"] == archive_md5
    assert all(record["checks"].values()), record["checks"]
    assert all(record["locations"].values()), record["locations"]
    assert [e["tag"] for e in record["registry_events"]][:2] == [
        f"{ART}@v1.0.0",
        f"{ART}#staging#1",
    ]
    assert record["stages"] == ["prod"]
    # every command names a version the same ways: the bare number is the same record
    assert json.loads(mlops("model", "lineage", "v1.0.0", "--json")) == record
    assert json.loads(mlops("model", "lineage", f"{ART}#prod", "--json"))["version"] == "v1.0.0"
    assert json.loads(mlops("model", "history", "--version", f"{ART}@v1.0.0", "--json")) == [
        e for e in history if e["version"] == "v1.0.0"
    ]
    text = mlops("model", "lineage", ART)  # MODEL alone means the prod version
    labels = [
        "git commit",
        "raw data",
        "dataset",
        "feature set",
        "params",
        "model",
        "training rows",
        "metrics",
        "notebook",
        "registry",
        "bento",
        "checks",
    ]
    positions = [text.index(f"  {label}") for label in labels]
    assert positions == sorted(positions) and "all passed" in text
    assert text.splitlines()[0].startswith("ctr-model v1.0.0")
    # DVC's own artifact client reads the same GTO tags: prod is v1.0.0's model again
    got = root.parent / "prod-model"
    run(
        [
            sys.executable,
            "-m",
            "dvc",
            "artifacts",
            "get",
            ".",
            ART,
            "--stage",
            "prod",
            "-o",
            str(got),
        ],
        root,
    )
    assert md5_file(got / "model.joblib") == record["model"]["model_file_md5"]
    # the module entry point (what the `mlops` console script runs) sees the same registry
    shown = run([sys.executable, "-m", "pipelines.cli", "model", "status", "--json"], root).stdout
    assert json.loads(shown)["stages"]["prod"]["version"] == "v1.0.0"
    # the release record embedded in the bento (served at /metadata) is the same lineage
    release = json.loads((root / "build/release/release.json").read_text())
    assert release["lineage"]["dataset_md5"] == outs["build/dataset"]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_input_is_a_clear_error_and_leaves_the_registry_unchanged(
    project_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project_copy
    mlops = Mlops(root, monkeypatch)
    refused, ok = mlops.refused, mlops

    # empty registry
    assert "nothing is in prod" in refused("model", "rollback")
    assert "unknown version v1.0.0" in refused("model", "promote", "v1.0.0", "--to", "canary")
    assert "no version of ctr-model is registered yet" in refused("model", "lineage", ART)

    # a dirty working tree
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nlocal edit\n")
    assert "uncommitted changes (README.md)" in refused("model", "register")
    git(root, "checkout", "--", "README.md")

    # a missing DVC output (the reference profile) fails two gates, naming it
    reference = root / "monitors/reference"
    aside = root / "reference.aside"
    reference.rename(aside)
    err = refused("model", "register")
    assert "missing DVC outputs: monitors/reference (output of profile: deleted)" in err
    assert "reference profile present: monitors/reference/profile.bin is missing" in err
    aside.rename(reference)

    # a failing floor says which gate and by how much
    def floor(value: float) -> Any:
        return lambda p: p["release"]["gates"]["floors"]["auc"].update(min=value)

    edit_params(root, floor(0.99))
    commit_all(root, "impossible AUC floor")
    auc = json.loads((root / "build/eval/metrics.json").read_text())["auc"]
    err = refused("model", "register")
    assert "failed 1 of" in err and "floor: auc >= 0.99" in err
    assert f"is below the minimum 0.99 by {0.99 - auc:.4f}" in err
    assert json.loads((root / "reports/gates/ctr-model@v1.0.0.json").read_text())["passed"] is False
    shutil.rmtree(root / "reports/gates")
    edit_params(root, floor(0.62))
    commit_all(root, "restore AUC floor")

    # register works; the same commit or model cannot be registered twice
    ok("model", "register", "--version", "1.0.0")
    assert "already registered as v1.0.0" in refused("model", "register")
    assert "already registered" in refused("model", "register", "--version", "v1.0.0")

    # promotion input
    assert "not a version" in refused("model", "promote", "banana", "--to", "canary")
    assert "--to must be one of canary, prod" in refused(
        "model", "promote", "v1.0.0", "--to", "staging"
    )
    assert "needs --approver and --reason" in refused("model", "promote", "v1.0.0", "--to", "prod")
    assert "out of order" in refused(
        "model", "promote", "v1.0.0", "--to", "prod", "--approver", OWNER, "--reason", "ship it"
    )
    assert "--emergency needs --reason" in refused(
        "model", "promote", "v1.0.0", "--to", "prod", "--approver", OWNER, "--emergency"
    )
    assert "unknown model 'other-model'" in refused("model", "lineage", "other-model@v1.0.0")

    # the emergency path skips canary, and says so in the registry
    out = ok(
        "model",
        "promote",
        "v1.0.0",
        "--to",
        "prod",
        "--approver",
        OWNER,
        "--emergency",
        "--reason",
        "hotfix for broken prod",
    )
    assert "EMERGENCY" in out and "skipped: canary" in out
    last = json.loads(ok("model", "history", "--json"))[-1]
    assert last["emergency"] is True and last["fields"]["skipped_stages"] == ["canary"]
    assert last["reason"] == "hotfix for broken prod" and last["approver"] == OWNER
    assert "ctr-model v1.0.0 is already in prod" in refused(
        "model", "promote", "v1.0.0", "--to", "prod", "--approver", OWNER, "--reason", "again"
    )
    assert "already been in prod" in refused("model", "promote", "v1.0.0", "--to", "canary")
    assert "no earlier prod version" in refused("model", "rollback")


def test_every_registry_command_has_help() -> None:
    from pipelines.cli.main import app

    runner = CliRunner()
    for command in ("register", "promote", "rollback", "status", "history", "lineage"):
        result = runner.invoke(app, ["model", command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout, command


@pytest.mark.slow
def test_register_interrupted_before_its_staging_tag_is_detected_and_completed(
    project_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = project_copy
    mlops = Mlops(root, monkeypatch)
    mlops("model", "register", "--reason", "first model")
    # The state a kill between the two GTO tags leaves: version tag, no staging tag.
    git(root, "tag", "-d", f"{ART}#staging#1")
    state = json.loads(mlops("model", "status", "--json"))
    assert [i["version"] for i in state["incomplete"]] == ["v1.0.0"]
    assert state["stages"]["staging"] is None
    assert "INCOMPLETE: v1.0.0 registered but never staged" in mlops("model", "status")
    out = mlops("model", "repair")
    assert "completed the registration of ctr-model v1.0.0" in out
    state = json.loads(mlops("model", "status", "--json"))
    assert state["incomplete"] == [] and state["stages"]["staging"]["version"] == "v1.0.0"
    assert "repaired" in tag_fields(root, state["stages"]["staging"]["tag"])
    assert "nothing to repair" in mlops("model", "repair")
    mlops("model", "promote", "v1.0.0", "--to", "canary")  # the release flow goes on from staging
    # The next `mlops model register` completes an interrupted registration by itself too.
    for tag in [t for t in tags(root) if "#" in t]:  # back to: version tag only
        git(root, "tag", "-d", tag)
    out = mlops("model", "register")
    assert "completed an interrupted registration: v1.0.0" in out
    assert "nothing else to register" in out
    assert json.loads(mlops("model", "status", "--json"))["incomplete"] == []
