"""Verdict on a pip-audit JSON report: vulnerable, clean, or not audited.

Run by ``make check`` and ``make audit``; see docs/reliability.md "Supply chain"."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AuditVerdict:
    """What a pip-audit report found: vulnerable packages, audited and skipped counts."""

    vulnerable: list[dict[str, Any]] = field(default_factory=list)
    audited: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.vulnerable:
            return "vulnerable"
        if self.skipped and not self.audited:
            return "not audited"
        if self.skipped:
            return "partly audited"
        return "clean"

    def lines(self) -> list[str]:
        out = [
            f"dependency audit: {self.status} ({self.audited} packages audited, "
            f"{len(self.skipped)} could not be audited, {len(self.vulnerable)} vulnerable)"
        ]
        for dep in self.vulnerable:
            for vuln in dep["vulns"]:
                fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version"
                out.append(
                    f"  {dep['name']} {dep.get('version', '?')}: {vuln['id']} (fixed in {fixes}); "
                    "upgrade the pin in pyproject.toml and run `make lock`, or accept it in "
                    "AUDIT_IGNORE (Makefile) with the reason in docs/reliability.md"
                )
        if self.skipped:
            reasons = sorted(set(self.skipped))
            out.append(f"  not audited, e.g.: {reasons[0]}")
            if not self.audited:
                out.append(
                    "  no advisory service answered (PyPI JSON API or OSV unreachable): "
                    "run `make audit` where one is reachable"
                )
        return out


def read_report(path: Path) -> AuditVerdict:
    """Parse a ``pip-audit -f json`` report; a missing or malformed file is a clear error."""
    try:
        report = json.loads(path.read_text())
        deps = report["dependencies"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {path} is not a pip-audit JSON report ({exc})") from exc
    verdict = AuditVerdict()
    for dep in deps:
        if dep.get("skip_reason"):
            verdict.skipped.append(str(dep["skip_reason"]))
            continue
        verdict.audited += 1
        if dep.get("vulns"):
            verdict.vulnerable.append(dep)
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="pip-audit -f json output")
    parser.add_argument(
        "--require-audited",
        action="store_true",
        help="also fail when a package could not be audited",
    )
    args = parser.parse_args(argv)
    verdict = read_report(args.report)
    stream = sys.stderr if verdict.status != "clean" else sys.stdout
    print("\n".join(verdict.lines()), file=stream)
    if verdict.vulnerable:
        return 1
    if verdict.skipped and args.require_audited:
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
