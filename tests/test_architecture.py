"""The package's architecture: layers (import-linter), no cycles, no private imports, sizes."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from tests.support.project import REPO

LINT = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 600
# Modules allowed past MAX_LINES, each with its reason (docs/architecture.md).
LONG_MODULES: dict[str, str] = {
    "pipelines/registry/registry.py": "one Registry class over GTO tags; to split by action",
    "pipelines/simulation/simulate.py": "the closed loop's steps in one Simulation; to split",
    "pipelines/features/online_store.py": "store, two backends and ingest; backends to split out",
    "pipelines/serving/predictor.py": "request path: predict, batch, rank; operations to split",
    "pipelines/core/settings.py": "every params.yaml section's model, kept in one file",
    "pipelines/review/review.py": "collectors of every review section; to split by section",
    "pipelines/features/definitions.py": "declarations plus EventIndex; EventIndex to split out",
    "pipelines/monitoring/drift.py": "the drift decision: statistics, limits, report",
    "pipelines/review/render.py": "markdown and HTML renderings of one review",
}


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layer_contract_is_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_layer_contract_fails_on_a_forbidden_import(tmp_path: Path) -> None:
    """Feature code importing serving breaks the contract, and the report names the chain."""
    shutil.copytree(
        REPO / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "pipelines" / "features" / "definitions.py"
    target.write_text(target.read_text() + "\nfrom pipelines.serving import predictor  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "BROKEN" in result.stdout
    assert "pipelines.features.definitions -> pipelines.serving.predictor" in result.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative enough here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.find_modules_directly_imported_by(node) & modules:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("pipelines", cache_dir=None)
    modules = {m for m in graph.modules if m.startswith("pipelines.")}
    assert _cycles(graph, modules) == []


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = []
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines"):
                offenders += [
                    f"{path.relative_to(REPO)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert offenders == []


def test_modules_stay_small_or_say_why() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "pipelines").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in LONG_MODULES} == {}


def test_module_docstrings_are_short() -> None:
    """What a module is for, in a few lines; explanations belong in docs/."""
    wordy = {}
    for path in (REPO / "pipelines").rglob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(doc.splitlines()) > 12:
            wordy[str(path.relative_to(REPO))] = len(doc.splitlines())
    assert wordy == {}
