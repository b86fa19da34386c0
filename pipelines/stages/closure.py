"""Import closures: what a stage or the bento really runs, so its deps cannot be incomplete.

``python -m pipelines.stages.closure requirements [--check]`` writes (or checks)
``bentos/requirements.txt`` from the service's closure and ``requirements.lock``;
``python -m pipelines.stages.closure stages`` prints each stage's closure and
whether its ``dvc.yaml`` deps cover it. See the README, "Reproducibility".
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "pipelines"
SERVICE = "bentos/service.py"
BENTO_REQUIREMENTS = "bentos/requirements.txt"
RUNNER = "pipelines/stages/runner.py"
_MAGIC = re.compile(r"^\s*[%!]")


@dataclass
class Closure:
    """Project files reached by imports from some roots, and the third-party names imported."""

    files: set[str] = field(default_factory=set)
    third_party: set[str] = field(default_factory=set)


def _code_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = [
            "".join(c.get("source", ""))
            for c in nb.get("cells", [])
            if c.get("cell_type") == "code"
        ]
        lines = [line for cell in cells for line in cell.splitlines() if not _MAGIC.match(line)]
        return "\n".join(lines)
    return path.read_text(encoding="utf-8")


def _imported_names(code: str) -> set[str]:
    """Every absolute module name imported anywhere in ``code`` (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_file(root: Path, dotted: str) -> str | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def import_closure(root: Path, starts: Iterable[str]) -> Closure:
    """Follow imports from ``starts`` (relative .py/.ipynb paths) through ``pipelines``."""
    closure = Closure()
    todo = list(starts)
    stdlib = set(sys.stdlib_module_names)
    while todo:
        rel = todo.pop()
        if rel in closure.files:
            continue
        closure.files.add(rel)
        for name in _imported_names(_code_of(root / rel)):
            top = name.split(".")[0]
            if top != PACKAGE:
                if top not in stdlib and top != "__future__":
                    closure.third_party.add(top)
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # parent packages run their __init__
                found = _module_file(root, ".".join(parts[:depth]))
                if found and found not in closure.files:
                    todo.append(found)
    return closure


def stage_closures(root: Path) -> dict[str, Closure]:
    """Closure of each ``dvc.yaml`` stage: its notebook (the runner's argument) and the runner."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    result = {}
    for name, stage in stages.items():
        notebooks = re.findall(r"(\S+\.ipynb)", stage["cmd"])
        result[name] = import_closure(root, [notebooks[0], RUNNER])
    return result


def uncovered(files: Iterable[str], deps: Iterable[str]) -> list[str]:
    """Files that are neither a dep nor inside a dep folder."""
    dep_list = [d.rstrip("/") for d in deps]
    return sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in dep_list))


def resolved_stage_deps(root: Path) -> dict[str, list[str]]:
    """``{stage: [dep paths]}`` with ``${...}`` resolved, as DVC sees them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {
            stage.name: [dep.def_path for dep in stage.deps]
            for stage in repo.index.stages
            if getattr(stage, "name", None)
        }


# --- bento requirements -----------------------------------------------------------------------


def lock_graph(lock_text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """``({dist: version}, {dist: dists it requires})`` from uv's annotated lock."""
    versions: dict[str, str] = {}
    requires: dict[str, set[str]] = {}
    current = None
    in_via = False
    for line in lock_text.splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)", line)
        if pin:
            current = _normalize(pin.group(1))
            versions[current] = pin.group(2)
            in_via = False
            continue
        stripped = line.strip()
        if current is None or not stripped.startswith("#"):
            continue
        text = stripped.lstrip("#").strip()
        if text.startswith("via"):
            in_via = True
            text = text[3:].strip()
        if in_via and text:
            parent = _normalize(text.split()[0].split("[")[0])
            requires.setdefault(parent, set()).add(current)
    return versions, requires


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions_of(import_names: Iterable[str]) -> set[str]:
    """Installed distributions that provide these top-level import names."""
    from importlib import metadata

    mapping = metadata.packages_distributions()
    found: set[str] = set()
    for name in import_names:
        dists = mapping.get(name)
        if not dists:  # an extension module not listed in its distribution's RECORD
            try:
                dists = [metadata.distribution(_normalize(name)).metadata["Name"]]
            except metadata.PackageNotFoundError:
                dists = []
        if not dists:
            raise LookupError(
                f"import {name!r} is provided by no installed distribution; add it to "
                "pyproject.toml and run `make lock`"
            )
        found.update(_normalize(d) for d in dists)
    return found


# Imported by libraries at run time, never by name in the service's code: pandas reads the
# feature snapshot (parquet) through pyarrow; uvicorn, under BentoML, serves with uvloop's
# event loop and httptools' parser when they are installed.
RUNTIME_IMPORTS = frozenset({"pyarrow", "uvloop", "httptools"})


def bento_requirements(root: Path) -> str:
    """``bentos/requirements.txt``: the service closure's distributions and their dependencies,
    every one pinned to ``requirements.lock``."""
    closure = import_closure(root, [SERVICE])
    versions, requires = lock_graph((root / "requirements.lock").read_text())
    direct = distributions_of(set(closure.third_party) | RUNTIME_IMPORTS)
    missing = sorted(d for d in direct if d not in versions)
    if missing:
        raise LookupError(f"{', '.join(missing)} imported by the service but not in the lock")
    wanted: set[str] = set()
    todo = sorted(direct)
    while todo:
        dist = todo.pop()
        if dist in wanted:
            continue
        wanted.add(dist)
        todo.extend(sorted(requires.get(dist, set()) - wanted))
    lines = [
        "# Generated by `python -m pipelines.stages.closure requirements` from the import",
        f"# closure of {SERVICE} and requirements.lock; a test checks it is current.",
        f"# Imported directly: {', '.join(sorted(direct))}.",
        *(f"{dist}=={versions[dist]}" for dist in sorted(wanted)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stages.closure")
    sub = parser.add_subparsers(dest="command", required=True)
    req = sub.add_parser("requirements", help=f"write {BENTO_REQUIREMENTS} from the closure")
    req.add_argument("--check", action="store_true", help="only check that it is current")
    sub.add_parser("stages", help="each stage's closure and the files its deps miss")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if args.command == "requirements":
        text = bento_requirements(root)
        target = root / BENTO_REQUIREMENTS
        if args.check:
            if target.read_text() != text:
                print(
                    f"{BENTO_REQUIREMENTS} is out of date; run "
                    "`python -m pipelines.stages.closure requirements`",
                    file=sys.stderr,
                )
                return 1
            return 0
        target.write_text(text)
        print(f"wrote {BENTO_REQUIREMENTS} ({text.count(chr(10)) - 3} pinned distributions)")
        return 0
    deps = resolved_stage_deps(root)
    bad = 0
    for name, closure in stage_closures(root).items():
        missing = uncovered(closure.files, deps.get(name, []))
        bad += bool(missing)
        print(f"{name}: {len(closure.files)} files; not covered by deps: {missing or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
