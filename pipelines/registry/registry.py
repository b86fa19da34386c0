"""The model registry: GTO git tags with ordered stages, quality gates, approvals and rollback.

Every registry change is an annotated git tag written by GTO, so the registry
travels with the repository and needs no server:

Details: docs/registry.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from pipelines.core import config
from pipelines.core.dvcfiles import artifacts, lock_outs
from pipelines.core.io import atomic_path, md5_file, write_json
from pipelines.core.lineage import (
    dvc_filesystem,
    object_locations,
    read_dvc_json,
    version_lineage,
)
from pipelines.core.settings import settings_from
from pipelines.core.vcs import git, git_show
from pipelines.registry.gates import GateReport, evaluate_gates

STAGES = ("staging", "canary", "prod")
PROMOTABLE = ("canary", "prod")
BUMPS = ("major", "minor", "patch")


class RegistryError(RuntimeError):
    """A registry operation was refused; the registry is unchanged. The message says why."""


_git = partial(git, error=RegistryError)  # git failures surface as registry errors


class GateFailure(RegistryError):
    """The candidate failed one or more quality gates; ``report`` holds every result."""

    def __init__(self, message: str, report: GateReport, report_paths: tuple[Path, Path]):
        super().__init__(message)
        self.report = report
        self.report_paths = report_paths


# --- small helpers ---------------------------------------------------------------------------


def normalize_version(version: str) -> str:
    """``1.2.0`` or ``v1.2.0`` -> ``v1.2.0``; anything else is a clear error."""
    from gto.versions import SemVer

    value = version.strip()
    value = value if value.startswith("v") else f"v{value}"
    if not SemVer.is_valid(value):
        raise RegistryError(
            f"'{version}' is not a version: use semantic versions like v1.2.0 "
            "(see `mlops model status` for the registered ones)"
        )
    return value


def format_message(title: str, fields: dict[str, Any]) -> str:
    """Annotated-tag message: a title line, a blank line, then the fields as YAML."""
    body = yaml.safe_dump(
        {k: v for k, v in fields.items() if v is not None},
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
    return f"{title}\n\n{body}"


def parse_message(message: str) -> tuple[str, dict[str, Any]]:
    """Inverse of ``format_message``; tags made by plain ``gto`` give ``(message, {})``."""
    title, _, body = message.strip().partition("\n\n")
    try:
        fields = yaml.safe_load(body) if body else {}
    except yaml.YAMLError:
        fields = {}
    return title.strip(), fields if isinstance(fields, dict) else {}


@dataclasses.dataclass
class Event:
    """One registry change (one annotated GTO tag): who, when, what and why."""

    timestamp: dt.datetime
    event: str  # GTO's name: registration, assignment, unassignment, deregistration
    version: str | None
    stage: str | None
    author: str
    author_email: str
    tag: str
    commit: str
    title: str
    fields: dict[str, Any]

    @property
    def action(self) -> str:
        return str(self.fields.get("action") or self.event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp.isoformat(),
            "event": self.event,
            "action": self.action,
            "version": self.version,
            "stage": self.stage,
            "author": f"{self.author} <{self.author_email}>",
            "approver": self.fields.get("approver"),
            "reason": self.fields.get("reason"),
            "emergency": bool(self.fields.get("emergency", False)),
            "tag": self.tag,
            "commit": self.commit,
            "title": self.title,
            "fields": self.fields,
        }


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """The project's model registry (GTO tags in the project's git repository)."""

    def __init__(self, root: Path | None = None):
        self.root = (root or config.project_root()).resolve()
        self.params = config.load_params(self.root / "params.yaml")
        self.project = settings_from(self.params, self.root / "params.yaml")
        self.settings = self.project.release
        self.artifact = self.settings.artifact
        top = _git(self.root, "rev-parse", "--show-toplevel", check=False)
        if not top or Path(top).resolve() != self.root:
            raise RegistryError(
                f"{self.root} is not the root of a git repository; the registry lives in git "
                "tags, so run `git init` and commit the project first"
            )
        self._check_stage_config()

    # -- configuration checks

    def _check_stage_config(self) -> None:
        from gto.config import read_registry_config

        gto_file = self.root / ".gto"
        stages = read_registry_config(str(gto_file)).stages if gto_file.is_file() else None
        if list(stages or []) != list(STAGES):
            raise RegistryError(
                f"{gto_file} must declare the stages in order {list(STAGES)} (found {stages}); "
                "restore it from git"
            )

    def artifact_path(self) -> str:
        """The model path declared for the artifact under ``artifacts:`` in dvc.yaml."""
        declared = artifacts(self.root).get(self.artifact)
        if not declared or not declared.get("path"):
            raise RegistryError(
                f"artifact '{self.artifact}' (params.yaml release.artifact) is not declared under "
                "`artifacts:` in dvc.yaml; declare it with its `path` and `type: model`"
            )
        return str(declared["path"])

    # -- reading state

    def events(self) -> list[Event]:
        """Every registry change for the artifact, oldest first (GTO's history)."""
        import gto.api

        raw = gto.api.history(str(self.root), artifact=self.artifact, ascending=True)
        events = []
        for e in raw:
            title, fields = parse_message(e["message"] or "")
            events.append(
                Event(
                    e["timestamp"],
                    e["event"],
                    e["version"],
                    e["stage"],
                    e["author"],
                    e["author_email"],
                    e["ref"],
                    e["commit"],
                    title,
                    fields,
                )
            )
        return events

    def versions(self) -> dict[str, str]:
        """Registered (not deregistered) versions -> their commit, highest version first."""
        from gto.exceptions import ArtifactNotFound
        from gto.registry import GitRegistry

        with GitRegistry.from_url(str(self.root)) as reg:
            try:
                artifact = reg.find_artifact(self.artifact)
            except ArtifactNotFound:
                return {}
            return {v.version: v.commit_hexsha for v in artifact.get_versions(active_only=True)}

    def holders(self) -> dict[str, str | None]:
        """Which version holds each stage now (latest assignment wins, as ``gto show``)."""
        from gto.constants import VersionSort
        from gto.exceptions import ArtifactNotFound
        from gto.registry import GitRegistry

        result: dict[str, str | None] = dict.fromkeys(STAGES)
        with GitRegistry.from_url(str(self.root)) as reg:
            try:
                artifact = reg.find_artifact(self.artifact)
            except ArtifactNotFound:
                return result
            vstages = artifact.get_vstages(
                registered_only=True, versions_per_stage=1, sort=VersionSort.Timestamp
            )
        for stage, held in vstages.items():
            if held:
                result[stage] = held[0].version
        return result

    def resolve(self, version: str) -> tuple[str, str]:
        """``(version, commit)`` of a registered version, else an error listing the known ones."""
        version = normalize_version(version)
        versions = self.versions()
        if version not in versions:
            known = ", ".join(sorted(versions, key=_semver_key)) or "none yet"
            raise RegistryError(
                f"unknown version {version} of {self.artifact}; registered versions: {known}. "
                "Register one with `mlops model register`."
            )
        return version, versions[version]

    def status(self) -> dict[str, Any]:
        """Current holder of each stage and every registered version, with who and why."""
        events = self.events()
        holders = self.holders()
        registrations = {e.version: e for e in events if e.event == "registration"}
        stages = {}
        for stage, version in holders.items():
            last = next(
                (
                    e
                    for e in reversed(events)
                    if e.event == "assignment" and e.stage == stage and e.version == version
                ),
                None,
            )
            stages[stage] = (
                None
                if version is None
                else {
                    "version": version,
                    "since": last.timestamp.isoformat() if last else None,
                    "by": f"{last.author} <{last.author_email}>" if last else None,
                    "approver": last.fields.get("approver") if last else None,
                    "reason": last.fields.get("reason") if last else None,
                    "emergency": bool(last.fields.get("emergency")) if last else False,
                    "tag": last.tag if last else None,
                    "bento_tag": registrations[version].fields.get("bento_tag")
                    if version in registrations
                    else None,
                }
            )
        versions = []
        for version, commit in sorted(self.versions().items(), key=lambda kv: _semver_key(kv[0])):
            reg = registrations.get(version)
            versions.append(
                {
                    "version": version,
                    "commit": commit,
                    "registered_at": reg.timestamp.isoformat() if reg else None,
                    "registered_by": f"{reg.author} <{reg.author_email}>" if reg else None,
                    "stages": [s for s, v in holders.items() if v == version],
                    "bento_tag": reg.fields.get("bento_tag") if reg else None,
                    "gate_report": reg.fields.get("gate_report") if reg else None,
                }
            )
        return {
            "artifact": self.artifact,
            "stages": stages,
            "versions": versions,
            "incomplete": self.incomplete(events),
        }

    # -- interrupted registrations

    def incomplete(self, events: list[Event] | None = None) -> list[dict[str, Any]]:
        """Registered versions that never entered a stage: a register interrupted between
        its version tag and its staging tag (the two are separate git tags)."""
        events = self.events() if events is None else events
        assigned = {e.version for e in events if e.event == "assignment"}
        versions = self.versions()
        found = []
        for e in events:
            if e.event != "registration" or e.version in assigned or e.version not in versions:
                continue
            found.append(
                {
                    "version": e.version,
                    "commit": e.commit,
                    "tag": e.tag,
                    "registered_at": e.timestamp.isoformat(),
                    "problem": "registered but never staged (registration interrupted "
                    "between its version tag and its staging tag)",
                    "fix": "`mlops model repair` (or the next `mlops model register`) stages it",
                }
            )
        return found

    def repair(self) -> list[dict[str, Any]]:
        """Complete interrupted registrations: stage each registered-but-unstaged version.

        A version tag is written only after every gate passed and the bento was pushed,
        so the missing step is exactly the staging tag; it is added with a message that
        says it completes an interrupted registration. Returns what was repaired.
        """
        events = self.events()
        todo = self.incomplete(events)
        if not todo:
            return []
        self._check_identity()
        registrations = {e.version: e for e in events if e.event == "registration"}
        done = []
        for item in todo:
            version = item["version"]
            self._after_last_event(self.events())
            tag = self._stage_registered(
                version,
                registrations[version].fields.get("gate_report"),
                repaired=True,
            )
            done.append({"version": version, "tag": tag})
        return done

    def _stage_registered(self, version: str, gate_report: Any, repaired: bool = False) -> str:
        """The staging tag that ends a registration (or completes an interrupted one)."""
        import gto.api

        fields: dict[str, Any] = {
            "action": "stage",
            "stage": "staging",
            "version": version,
            "reason": "passed every quality gate on registration",
        }
        if repaired:
            fields["reason"] += "; completes a registration interrupted before its staging tag"
            fields["repaired"] = True
        fields["gate_report"] = gate_report
        staged = gto.api.assign(
            str(self.root),
            self.artifact,
            "staging",
            version=version,
            force=True,
            message=format_message(f"Stage {self.artifact} {version} to staging", fields),
        )
        return str(staged.tag)

    # -- writing: common guards

    def _check_identity(self) -> str:
        ident = subprocess.run(
            ["git", "var", "GIT_COMMITTER_IDENT"], cwd=self.root, capture_output=True, text=True
        )
        if ident.returncode != 0:
            raise RegistryError(
                "git does not know who you are, and every registry tag records who made it: "
                "set `git config user.name` and `git config user.email` (or GIT_COMMITTER_NAME/"
                "GIT_COMMITTER_EMAIL)"
            )
        return ident.stdout.rsplit(">", 1)[0] + ">"

    def _after_last_event(self, events: list[Event]) -> None:
        """Wait until the clock is past the newest tag's second.

        Git tag times have one-second resolution and GTO orders stage
        assignments by them; two changes in the same second would make "which
        version holds prod" ambiguous.
        """
        if not events:
            return
        newest = max(e.timestamp for e in events).timestamp()
        while time.time() < int(newest) + 1:
            time.sleep(0.05)

    def unassign(self, version: str, stage: str, title: str, fields: dict[str, Any]) -> str:
        """Take ``version`` out of ``stage`` with an annotated tag; returns the tag name.

        The message is a title line and YAML fields (``mlops model history`` parses them back).
        The tag is created locally; pushing tags is left to whoever pushes the repository.
        """
        import gto.api

        self._after_last_event(self.events())
        try:
            event = gto.api.unassign(
                str(self.root),
                self.artifact,
                stage=stage,
                version=version,
                message=format_message(title, fields),
            )
        except Exception as exc:  # GTO raises several types; one clear error is enough here
            raise RegistryError(
                f"could not take {self.artifact} {version} out of {stage} in {self.root}: {exc}"
            ) from exc
        return str(event.tag)

    def _delete_tags(self, tags: list[str]) -> None:
        for tag in tags:
            _git(self.root, "tag", "-d", tag, check=False)

    # -- register

    def next_version(self, bump: str = "minor") -> str:
        """The version ``register`` would use: v1.0.0 first, then the latest bumped."""
        from gto.versions import SemVer

        if bump not in BUMPS:
            raise RegistryError(f"--bump must be one of {', '.join(BUMPS)}, got '{bump}'")
        versions = sorted(self.versions(), key=_semver_key)
        if not versions:
            return "v1.0.0"
        return (
            SemVer(versions[-1])
            .bump(
                bump_major=bump == "major", bump_minor=bump == "minor", bump_patch=bump == "patch"
            )
            .version
        )

    def head(self) -> str:
        """The current commit (empty in a repository without commits)."""
        return _git(self.root, "rev-parse", "--verify", "-q", "HEAD", check=False)

    def _dirty_files(self) -> list[str]:
        out = _git(self.root, "status", "--porcelain", "--untracked-files=no")
        return [line[3:] for line in out.splitlines() if line.strip()]

    def _prod_reference(self) -> dict[str, Any] | None:
        prod = self.holders().get("prod")
        if prod is None:
            return None
        _, commit = self.resolve(prod)
        raw = git_show(self.root, commit, self.project.evaluate.metrics_file)
        if raw is None:
            raise RegistryError(
                f"prod version {prod} (commit {commit[:12]}) has no "
                f"{self.project.evaluate.metrics_file} "
                "in git, so the regression gate cannot compare against it"
            )
        return {"version": prod, "commit": commit, "metrics": json.loads(raw)}

    def check_gates(self, version: str | None = None, bump: str = "minor") -> GateReport:
        """Evaluate every gate for the working tree without changing anything."""
        version = normalize_version(version) if version else self.next_version(bump)
        head = _git(self.root, "rev-parse", "HEAD")
        return evaluate_gates(
            self.root, self.params, self.artifact, version, head, self._prod_reference()
        )

    def register(
        self, version: str | None = None, bump: str = "minor", reason: str | None = None
    ) -> dict[str, Any]:
        """Gate, push and register the model of the current commit; it enters ``staging``.

        Refuses (registry unchanged) on a dirty working tree, an undeclared
        artifact, a version that is not new, a commit or model already registered,
        a failing gate, or a DVC remote that does not hold the bento archive.
        On success the gate report is committed and the new commit is tagged
        ``<artifact>@<version>`` and ``<artifact>#staging#N``.
        """
        import gto.api

        author = self._check_identity()
        head = _git(self.root, "rev-parse", "--verify", "-q", "HEAD", check=False)
        if not head:
            raise RegistryError("the repository has no commits; commit the pipeline outputs first")
        repaired = self.repair()  # an earlier register interrupted before its staging tag
        dirty = self._dirty_files()
        if dirty:
            shown = ", ".join(dirty[:10]) + (
                f" and {len(dirty) - 10} more" if len(dirty) > 10 else ""
            )
            raise RegistryError(
                f"the working tree has uncommitted changes ({shown}); a registered version must "
                "be exactly a commit. Commit them (after `dvc repro`) or stash them, then retry."
            )
        model_path = self.artifact_path()
        versions = self.versions()
        if version:
            version = normalize_version(version)
            if version in versions:
                raise RegistryError(
                    f"{self.artifact} {version} is already registered "
                    f"(commit {versions[version][:12]}); choose a new version"
                )
            latest = max(versions, key=_semver_key) if versions else None
            if latest and _semver_key(version) < _semver_key(latest):
                raise RegistryError(
                    f"{version} is lower than the latest registered version "
                    f"{latest}; versions only go up"
                )
        else:
            version = self.next_version(bump)
        for known, commit in versions.items():
            if commit == head:
                raise RegistryError(
                    f"commit {head[:12]} is already registered as {known}; "
                    "rerun the pipeline and commit before registering again"
                )
        model_md5 = lock_outs(
            (self.root / "dvc.lock").read_text() if (self.root / "dvc.lock").is_file() else None
        )
        model_md5_value = next(
            (paths[model_path] for paths in model_md5.values() if model_path in paths), None
        )
        if not model_md5_value:
            raise RegistryError(
                f"dvc.lock records no output {model_path}: run `dvc repro` and "
                "commit dvc.lock before registering"
            )
        registrations = {str(e.version): e for e in self.events() if e.event == "registration"}
        for known, event in registrations.items():
            if known in versions and event.fields.get("model_md5") == model_md5_value:
                raise RegistryError(
                    f"this model ({model_path} md5 {model_md5_value}) is already registered as "
                    f"{known}; change data, code or params and rerun `dvc repro` for a new version"
                )

        report = evaluate_gates(
            self.root, self.params, self.artifact, version, head, self._prod_reference()
        )
        report_dir = self.root / self.settings.gate_reports_dir
        json_path, md_path = report.write(report_dir)
        rel_json, rel_md = (str(p.relative_to(self.root)) for p in (json_path, md_path))
        if not report.passed:
            lines = [f"  - {r.gate}: {r.detail}" for r in report.failures]
            raise GateFailure(
                f"{self.artifact} {version} failed {len(report.failures)} of "
                f"{len(report.results)} quality gates:\n"
                + "\n".join(lines)
                + f"\nfull report: {rel_md} (and .json). Registry unchanged.",
                report,
                (json_path, md_path),
            )

        bento = self._bento_summary()
        self._push_and_verify(bento, model_md5_value)

        _git(self.root, "add", "--", rel_json, rel_md)
        try:
            _git(
                self.root,
                "commit",
                "-q",
                "-m",
                f"Gate report: {self.artifact} {version} passed {len(report.results)} gates",
                "-m",
                f"Registered as {self.artifact}@{version} (model {model_path} md5 "
                f"{model_md5_value}).",
                "--",
                rel_json,
                rel_md,
            )
        except RegistryError as exc:  # e.g. a commit hook refused: unstage, keep the files
            _git(self.root, "reset", "-q", "--", rel_json, rel_md, check=False)
            raise RegistryError(f"{exc}. Registry unchanged.") from exc
        commit = _git(self.root, "rev-parse", "HEAD")
        fields = {
            "action": "register",
            "version": version,
            "reason": reason,
            "gates": report.to_dict()["summary"],
            "gate_report": rel_json,
            "gate_report_md": rel_md,
            "gate_report_md5": md5_file(json_path),
            "compared_with_prod": report.prod["version"] if report.prod else "none",
            "pipeline_commit": head,
            "model_path": model_path,
            "model_md5": model_md5_value,
            "bento_tag": bento["bento_tag"],
            "bento_archive": bento["archive"],
            "bento_archive_md5": bento["archive_md5"],
            "dvc_remote": "pushed; bento archive verified on the remote",
        }
        self._after_last_event(self.events())
        created: list[str] = []
        try:
            event = gto.api.register(
                str(self.root),
                self.artifact,
                ref=commit,
                version=version,
                message=format_message(f"Register {self.artifact} {version}", fields),
            )
            created.append(event.tag)
            created.append(self._stage_registered(version, rel_json))
        except Exception as exc:
            self._delete_tags(created)
            _git(self.root, "reset", "-q", "--soft", "HEAD~1", check=False)
            _git(self.root, "reset", "-q", "--", rel_json, rel_md, check=False)
            raise RegistryError(
                f"GTO could not tag {self.artifact} {version}: {exc}; registry unchanged"
            ) from exc
        return {
            "artifact": self.artifact,
            "version": version,
            "commit": commit,
            "pipeline_commit": head,
            "tags": created,
            "report": report,
            "report_paths": [rel_json, rel_md],
            "bento_tag": bento["bento_tag"],
            "author": author,
            "repaired": repaired,
        }

    def _bento_summary(self) -> dict[str, Any]:
        bento_dir = self.root / self.project.package.bento_dir
        summary_file = bento_dir / "bento.json"
        if not summary_file.is_file():
            raise RegistryError(
                f"{summary_file.relative_to(self.root)} is missing: run "
                "`dvc repro package` (or `dvc checkout`)"
            )
        bento = json.loads(summary_file.read_text())
        archive = self.root / bento["archive"]
        if not archive.is_file() or md5_file(archive) != bento["archive_md5"]:
            raise RegistryError(
                f"bento archive {bento['archive']} is missing or differs from "
                "bento.json; run `dvc checkout` or `dvc repro package`"
            )
        return dict(bento)

    def _push_and_verify(self, bento: dict[str, Any], model_md5: str) -> None:
        """``dvc push`` every output, then check the remote really holds the bento archive."""
        push = subprocess.run(
            [sys.executable, "-m", "dvc", "push", "-q"],
            cwd=self.root,
            capture_output=True,
            text=True,
        )
        if push.returncode != 0:
            raise RegistryError(
                "`dvc push` failed, so this version's bento could not be made retrievable for "
                f"rollback: {(push.stderr or push.stdout).strip()[-800:]}. Configure a default "
                "remote (`dvc remote add -d NAME URL`) and retry. Registry unchanged."
            )
        outs = lock_outs((self.root / "dvc.lock").read_text())
        bento_dir = self.project.package.bento_dir
        bento_dir_md5 = next((p[bento_dir] for p in outs.values() if bento_dir in p), None)
        needed = [h for h in (bento_dir_md5, bento["archive_md5"], model_md5) if h]
        found = object_locations(self.root, needed)
        missing = [h for h in needed if "remote" not in found[h]]
        if missing:
            raise RegistryError(
                f"after `dvc push` the DVC remote still lacks {', '.join(missing)} (bento "
                f"{bento['bento_tag']}); check the remote configuration. Registry unchanged."
            )

    # -- promote

    def promote(
        self,
        version: str,
        to: str,
        approver: str | None = None,
        reason: str | None = None,
        emergency: bool = False,
    ) -> dict[str, Any]:
        """Move a registered version to ``canary`` or ``prod``, in order, with approvals."""
        import gto.api

        if to not in PROMOTABLE:
            raise RegistryError(
                f"--to must be one of {', '.join(PROMOTABLE)} (got '{to}'); versions enter "
                "staging when `mlops model register` accepts them"
            )
        author = self._check_identity()
        version, commit = self.resolve(version)
        events = self.events()
        holders = self.holders()
        mine = [e for e in events if e.version == version and e.event == "assignment"]
        reached = {e.stage for e in mine}
        if emergency and not (reason and reason.strip()):
            raise RegistryError("--emergency needs --reason: say why the normal path is skipped")
        if to in self.settings.approval_required_for:
            missing = [
                flag
                for flag, value in (("--approver", approver), ("--reason", reason))
                if not (value and value.strip())
            ]
            if missing:
                raise RegistryError(
                    f"promotion to {to} needs {' and '.join(missing)} (params.yaml "
                    "release.approval_required_for); they are recorded in the registry tag"
                )
        if holders.get(to) == version:
            raise RegistryError(f"{self.artifact} {version} is already in {to}")
        fields: dict[str, Any] = {"action": "promote", "stage": to, "version": version}
        skipped: list[str] = []
        if to == "canary":
            if "staging" not in reached:
                raise RegistryError(
                    f"{version} was never in staging; register it with `mlops model register` first"
                )
            if "prod" in reached:
                raise RegistryError(
                    f"out of order: {version} has already been in prod, and stages only move "
                    "forward (staging -> canary -> prod); register a new version instead"
                )
            fields["from_stage"] = "staging"
        else:
            canary = [e for e in mine if e.stage == "canary"]
            if not canary:
                if not emergency:
                    raise RegistryError(
                        f"out of order: {version} has not been in canary (stages go staging -> "
                        f"canary -> prod). Run `mlops model promote {version} --to canary` "
                        "first, or skip canary with --emergency --reason '...' "
                        "(recorded in the registry)"
                    )
                skipped.append("canary")
            evidence = self.canary_evidence(version, canary[-1].timestamp if canary else None)
            fields["from_stage"] = "canary" if canary else "staging"
            fields["canary_evidence"] = evidence
            if evidence.get("present") and not evidence.get("healthy") and not emergency:
                raise RegistryError(
                    f"canary health report {evidence['file']} says {version} is NOT healthy "
                    f"(reasons: {evidence.get('reasons') or 'none given'}); fix and re-canary, "
                    "or override with --emergency --reason '...'"
                )
            if (
                not evidence.get("present")
                and canary
                and self.settings.require_canary_health
                and not emergency
            ):
                raise RegistryError(
                    f"no canary health report at {evidence['file']} (params.yaml "
                    "release.require_canary_health is true); wait for canary monitoring to write "
                    "it, or override with --emergency --reason '...'"
                )
            if holders.get("prod"):
                fields["replaces"] = holders["prod"]
        fields.update(
            {
                "approver": approver,
                "reason": reason,
                "emergency": emergency,
                "skipped_stages": skipped or None,
                "requested_by": author,
            }
        )
        title = f"Promote {self.artifact} {version} to {to}" + (" (EMERGENCY)" if emergency else "")
        self._after_last_event(events)
        try:
            event = gto.api.assign(
                str(self.root),
                self.artifact,
                to,
                version=version,
                force=True,
                message=format_message(title, fields),
            )
        except Exception as exc:
            raise RegistryError(f"GTO could not assign {to} to {version}: {exc}") from exc
        return {
            "artifact": self.artifact,
            "version": version,
            "commit": commit,
            "stage": to,
            "tag": event.tag,
            "fields": fields,
        }

    def canary_evidence(self, version: str, canary_since: dt.datetime | None) -> dict[str, Any]:
        """Read the canary health report for ``version`` (schema in docs/registry.md)."""
        rel = self.settings.canary_health_file.format(version=version, artifact=self.artifact)
        path = self.root / rel
        if not path.is_file():
            return {
                "file": rel,
                "present": False,
                "canary_since": canary_since.isoformat() if canary_since else None,
            }
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(
                f"canary health report {rel} is not valid JSON ({exc}); fix or remove it"
            ) from exc
        if not isinstance(report, dict) or not isinstance(report.get("healthy"), bool):
            raise RegistryError(
                f"canary health report {rel} must be a JSON object with a boolean "
                "'healthy' (see docs/registry.md)"
            )
        if report.get("version") != version:
            raise RegistryError(
                f"canary health report {rel} is for version "
                f"{report.get('version')!r}, not {version}"
            )
        checked = report.get("checked_at")
        if checked and canary_since:
            try:
                when = dt.datetime.fromisoformat(str(checked).replace("Z", "+00:00"))
            except ValueError as exc:
                raise RegistryError(
                    f"canary health report {rel}: checked_at {checked!r} is not an ISO-8601 time"
                ) from exc
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            if when < canary_since:
                raise RegistryError(
                    f"canary health report {rel} was checked at {checked}, before "
                    f"{version} entered canary ({canary_since.isoformat()}); "
                    "it is stale"
                )
        return {
            "file": rel,
            "present": True,
            "healthy": report["healthy"],
            "checked_at": checked,
            "reasons": report.get("reasons"),
            "requests": report.get("requests"),
            "md5": md5_file(path),
            "canary_since": canary_since.isoformat() if canary_since else None,
        }

    # -- rollback

    def previous_prod(self) -> tuple[str, str]:
        """``(current, previous)`` prod versions; previous skips versions rolled back since."""
        current = self.holders().get("prod")
        if current is None:
            raise RegistryError(
                f"nothing is in prod for {self.artifact}, so there is nothing to roll back"
            )
        events = self.events()
        versions = self.versions()
        prod = [e for e in events if e.stage == "prod"]
        assigned = [e for e in prod if e.event == "assignment"]
        latest_current = max(i for i, e in enumerate(assigned) if e.version == current)
        for e in reversed(assigned[:latest_current]):
            if e.version == current or e.version not in versions:
                continue
            rolled_back = any(
                u.event == "unassignment" and u.version == e.version and u.timestamp >= e.timestamp
                for u in prod
            )
            if not rolled_back:
                return current, str(e.version)
        raise RegistryError(
            f"{current} is in prod and no earlier prod version is available to roll back to "
            "(none before it, or all were rolled back themselves); promote a known-good version "
            "with `mlops model promote VERSION --to prod --emergency --reason ...`"
        )

    def materialize_bento(self, version: str, dest_dir: Path) -> dict[str, Any]:
        """Fetch ``version``'s bento archive from DVC (cache, else remote) into ``dest_dir``.

        The archive is read at the version's commit by its ``dvc.lock`` hash, so
        nothing is rebuilt; its md5 is checked against the ``bento.json`` of that run.
        """
        version, commit = self.resolve(version)
        params_at = yaml.safe_load(git_show(self.root, commit, "params.yaml") or b"") or {}
        bento_dir = str(config.get(params_at, "package.bento_dir"))
        fs = dvc_filesystem(self.root, commit)
        bento, err = read_dvc_json(fs, f"{bento_dir}/bento.json")
        if bento is None:
            raise RegistryError(
                f"cannot read {bento_dir}/bento.json of {version} (commit "
                f"{commit[:12]}) from the DVC cache or remote: {err}. "
                "Registry unchanged."
            )
        archive = str(bento["archive"])
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / f"{Path(archive).stem}@{version}.bento"
        try:
            with atomic_path(target, suffix=".bento") as tmp:
                fs.get_file(archive, str(tmp))
                got = md5_file(tmp)
                if got != bento["archive_md5"]:
                    raise RegistryError(
                        f"fetched {archive} of {version} has md5 {got}, expected "
                        f"{bento['archive_md5']}"
                    )
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                f"the bento archive of {version} ({archive}, md5 {bento['archive_md5']}) is in "
                f"neither the DVC cache nor the remote: {type(exc).__name__}: {exc}. "
                "Registry unchanged."
            ) from exc
        return {
            "version": version,
            "commit": commit,
            "bento_tag": bento["bento_tag"],
            "archive": str(target.relative_to(self.root))
            if target.is_relative_to(self.root)
            else str(target),
            "archive_md5": bento["archive_md5"],
            "source": archive,
        }

    def import_bento(self, archive: Path, bento_tag: str) -> str:
        """Import a materialized archive into the project's BentoML store (no rebuild)."""
        home = (self.root / self.project.base.bentoml_home).resolve()
        env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
        result = subprocess.run(
            [sys.executable, "-m", "bentoml", "import", str(archive.resolve())],
            env=env,
            capture_output=True,
            text=True,
        )
        output = result.stdout + result.stderr
        if result.returncode == 0 and f'Bento(tag="{bento_tag}") imported' in output:
            return "imported"
        if f"Item '{bento_tag}' already exists" in output:
            return "already in the store"
        raise RegistryError(f"`bentoml import {archive}` failed: {output.strip()[-800:]}")

    def rollback(
        self, reason: str | None = None, out_dir: Path | None = None, import_bento: bool = True
    ) -> dict[str, Any]:
        """Return prod to the previous prod version, re-deploying its stored bento.

        Order matters for "registry unchanged on failure": the archive is fetched
        (and imported) first; only then are the tags written: ``#prod!`` (unassign) on
        the version rolled back, then ``#prod`` on the previous version a second later.
        """
        import gto.api

        author = self._check_identity()
        current, previous = self.previous_prod()
        dest = out_dir or self.root / self.settings.deploy_dir
        deployed = self.materialize_bento(previous, dest)
        archive = Path(deployed["archive"])
        archive = archive if archive.is_absolute() else self.root / archive
        store = self.import_bento(archive, deployed["bento_tag"]) if import_bento else "skipped"
        reason = reason or "rollback requested"
        effect = {
            "prod_before": current,
            "prod_after": previous,
            "bento_tag": deployed["bento_tag"],
            "archive": deployed["archive"],
            "archive_md5": deployed["archive_md5"],
            "bentoml_store": store,
        }
        fields = {
            "action": "rollback",
            "stage": "prod",
            "version": previous,
            "rolled_back_from": current,
            "reason": reason,
            "requested_by": author,
            "effect": effect,
        }
        self._after_last_event(self.events())
        created: list[str] = []
        try:
            # Unassign first, then assign one second later: `dvc artifacts get --stage prod`
            # takes the newest tag that names the stage, so the assignment must be newest.
            removed = gto.api.unassign(
                str(self.root),
                self.artifact,
                stage="prod",
                version=current,
                message=format_message(
                    f"Take {self.artifact} {current} out of prod (rolled back to {previous})",
                    {**fields, "action": "rollback-unassign", "version": current},
                ),
            )
            created.append(removed.tag)
            self._after_last_event(self.events())
            assigned = gto.api.assign(
                str(self.root),
                self.artifact,
                "prod",
                version=previous,
                force=True,
                message=format_message(
                    f"Roll back {self.artifact} prod {current} -> {previous}", fields
                ),
            )
            created.append(assigned.tag)
        except Exception as exc:
            self._delete_tags(created)
            raise RegistryError(
                f"GTO could not record the rollback: {exc}; registry unchanged"
            ) from exc
        record = {
            "artifact": self.artifact,
            **effect,
            "version": previous,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "by": author,
            "reason": reason,
            "tags": created,
        }
        write_json(dest / "deployed.json", record)
        return record

    # -- lineage and history

    def parse_spec(self, spec: str) -> tuple[str, str]:
        """``MODEL``, ``MODEL@vX.Y.Z``, ``MODEL@latest`` or ``MODEL#stage`` -> (version, commit)."""
        from gto.constants import parse_shortcut

        shortcut = parse_shortcut(spec)
        if shortcut.name != self.artifact:
            raise RegistryError(
                f"unknown model '{shortcut.name}'; this project registers "
                f"'{self.artifact}' (params.yaml release.artifact)"
            )
        if shortcut.version:
            return self.resolve(shortcut.version)
        if shortcut.stage:
            if shortcut.stage not in STAGES:
                raise RegistryError(
                    f"unknown stage '{shortcut.stage}'; stages: {', '.join(STAGES)}"
                )
            held = self.holders().get(shortcut.stage)
            if held is None:
                raise RegistryError(f"no version of {self.artifact} is in {shortcut.stage}")
            return self.resolve(held)
        if "@" in spec and not shortcut.latest:
            raise RegistryError(f"'{spec}' is not MODEL, MODEL@vX.Y.Z, MODEL@latest or MODEL#stage")
        versions = self.versions()
        if not versions:
            raise RegistryError(
                f"no version of {self.artifact} is registered yet; run `mlops model register`"
            )
        prod = self.holders().get("prod")
        return self.resolve(
            prod if prod and not shortcut.latest else max(versions, key=_semver_key)
        )

    def lineage(self, spec: str) -> dict[str, Any]:
        """The full lineage record of a registered version (see ``version_lineage``)."""
        version, commit = self.parse_spec(spec)
        events = [e.to_dict() for e in self.events() if e.version == version]
        for e in events:
            e.pop("fields", None)
        record = version_lineage(self.root, commit, self.artifact, events)
        record["version"] = version
        record["git"]["tag"] = f"{self.artifact}@{version}"
        record["stages"] = [s for s, v in self.holders().items() if v == version]
        registration = next(
            (e for e in self.events() if e.event == "registration" and e.version == version), None
        )
        if registration:
            record["git"]["pipeline_commit"] = registration.fields.get("pipeline_commit")
            record["gate_report"] = registration.fields.get("gate_report")
        return record


def _semver_key(version: str) -> Any:
    """Sort key for ``vX.Y.Z`` versions (semver order, pre-releases before releases)."""
    from gto.versions import SemVer

    return SemVer.parse(version)
