"""The dependency-audit verdict: a vulnerability fails, a report where nothing could be
audited is called so (and fails only when audits are required), a clean one passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli.audit import main, read_report

SKIPPED = {"name": "a2wsgi", "skip_reason": "Dependency not found on PyPI: a2wsgi (1.10.10)"}
CLEAN = {"name": "numpy", "version": "2.4.0", "vulns": []}
VULNERABLE = {
    "name": "jinja2",
    "version": "3.1.2",
    "vulns": [{"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"], "aliases": []}],
}


def _report(tmp_path: Path, *deps: dict) -> Path:
    path = tmp_path / "audit.json"
    path.write_text(json.dumps({"dependencies": list(deps), "fixes": []}))
    return path


def test_vulnerability_fails_and_names_the_fix(tmp_path: Path, capsys) -> None:
    path = _report(tmp_path, CLEAN, VULNERABLE)
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "vulnerable" in err and "jinja2 3.1.2: GHSA-h5c8-rqwp-cp95 (fixed in 3.1.3)" in err


def test_nothing_audited_is_said_loudly_and_fails_only_when_required(
    tmp_path: Path, capsys
) -> None:
    path = _report(tmp_path, SKIPPED, SKIPPED)
    assert read_report(path).status == "not audited"
    assert main([str(path)]) == 0
    assert "no advisory service answered" in capsys.readouterr().err
    assert main([str(path), "--require-audited"]) == 3


def test_clean_and_partly_audited(tmp_path: Path) -> None:
    assert main([str(_report(tmp_path, CLEAN))]) == 0
    partly = _report(tmp_path, CLEAN, SKIPPED)
    assert read_report(partly).status == "partly audited"
    assert main([str(partly), "--require-audited"]) == 3


def test_malformed_report_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    path.write_text("not json")
    with pytest.raises(SystemExit, match="is not a pip-audit JSON report"):
        read_report(path)
