"""The ``mlops`` command line: its groups, its error and exit-code convention, version names.

In-process (typer's runner) in this checkout; the commands that reach the registry or
traffic run in tests/test_registry.py, tests/test_canary.py and tests/test_monitor_e2e.py.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import common
from pipelines.cli.common import VersionName, VersionNameError, parse_version_name
from pipelines.cli.main import GROUPS, MOVED, app
from tests.support.project import REPO, run

GROUP_COMMANDS = {
    "data": {"generate", "obtain"},
    "features": {"catalog", "ingest", "materialize", "build", "lookup", "parity"},
    "model": {"register", "promote", "rollback", "status", "history", "lineage", "repair"},
    "monitor": {"drift", "report", "replay", "canary"},
    "notebooks": {"check", "git-setup", "sample", "lab"},
    "params": {"check", "docs"},
}
TOP_LEVEL = {"review", "simulate", "summary"}

# Every place a command takes a version name, with the arguments around it.
VERSION_USES = [
    ["model", "promote", "{v}", "--to", "canary"],
    ["model", "lineage", "{v}"],
    ["model", "history", "--version", "{v}"],
    ["model", "register", "--version", "{v}", "--dry-run"],
    ["monitor", "canary", "--version", "{v}", "--dry-run"],
    ["simulate", "--candidate", "{v}"],
]
BAD_NAMES = ["banana", "v1.2", "ctr-model@v1.x", "ctr-model#live", "other-model@v1.0.0", "@v1.0.0"]


@pytest.fixture
def mlops(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLOPS_PROJECT_ROOT", str(REPO))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def _commands(help_text: str) -> set[str]:
    """Command names listed in a --help page (rich boxes or plain text)."""
    section = help_text[help_text.index("Commands") :]
    return {m.group(1) for m in re.finditer(r"^(?:│ |  )([a-z][\w-]*) ", section, re.MULTILINE)}


@pytest.mark.parametrize("group", sorted(GROUP_COMMANDS))
def test_each_group_help_lists_its_commands(mlops, group: str) -> None:
    result = mlops(group, "--help")
    assert result.exit_code == 0, result.output
    listed = _commands(result.stdout)
    assert listed == GROUP_COMMANDS[group], (group, listed)
    for command in GROUP_COMMANDS[group]:
        sub = mlops(group, command, "--help")
        assert sub.exit_code == 0 and "Usage" in sub.stdout, (group, command)


def test_top_level_help_lists_groups_and_commands_only(mlops) -> None:
    result = mlops("--help")
    assert result.exit_code == 0
    assert _commands(result.stdout) == set(GROUP_COMMANDS) | TOP_LEVEL


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_version_name_is_the_same_error_everywhere(mlops, name: str) -> None:
    errors = set()
    for use in VERSION_USES:
        result = mlops(*[name if a == "{v}" else a for a in use])
        assert result.exit_code == common.EXIT_ERROR, (use, result.output)
        assert result.stderr.startswith(f"error: '{name}' is not a version name: "), (use, name)
        errors.add(result.stderr)
    assert len(errors) == 1, errors
    assert "v1.2.0, 1.2.0, ctr-model@v1.2.0, ctr-model@latest or ctr-model#prod" in errors.pop()


def test_the_forms_of_a_version_name() -> None:
    parse = parse_version_name
    for text in ("v1.2.0", "1.2.0", " ctr-model@v1.2.0", "ctr-model@1.2.0"):
        assert parse(text, "ctr-model").version == "v1.2.0", text
    assert parse("v2.0.0-rc.1", "ctr-model").version == "v2.0.0-rc.1"
    assert parse("ctr-model@latest", "ctr-model") == VersionName(
        "ctr-model@latest", "ctr-model", latest=True
    )
    assert parse("ctr-model#canary", "ctr-model").spec == "ctr-model#canary"
    assert parse("ctr-model", "ctr-model").spec == "ctr-model"  # prod, else the latest
    assert parse("1.2.0", "ctr-model").spec == "ctr-model@v1.2.0"
    for bad in BAD_NAMES + ["", "latest", "prod", "ctr-model#prod#3", "ctr-model@"]:
        with pytest.raises(VersionNameError, match="is not a version name"):
            parse(bad, "ctr-model")


def test_a_new_version_needs_a_number(mlops) -> None:
    result = mlops("model", "register", "--version", "ctr-model#prod", "--dry-run")
    assert result.exit_code == common.EXIT_ERROR
    assert "give its number instead" in result.stderr


def test_usage_errors_exit_1_and_moved_commands_say_where_they_went(mlops) -> None:
    for args in (["nope"], ["model", "promote", "--bogus"], ["monitor", "drift", "--sinse", "x"]):
        result = mlops(*args)
        assert result.exit_code == common.EXIT_ERROR, (args, result.output)
    for old, new in MOVED.items():
        result = mlops(old)
        assert result.exit_code == common.EXIT_ERROR
        assert f"`mlops {old}` is now `mlops {new}`" in " ".join(result.output.split())


def test_exit_codes_match_the_simulation_and_the_docs() -> None:
    from pipelines.simulation import simulate

    assert (simulate.EXIT_OK, simulate.EXIT_FAILED) == (common.EXIT_OK, common.EXIT_ERROR)
    assert (simulate.EXIT_ROLLED_BACK, simulate.EXIT_STOPPED) == (
        common.EXIT_BREACH,
        common.EXIT_INSUFFICIENT,
    )
    doc = (REPO / "docs/cli.md").read_text()
    for code in (common.EXIT_OK, common.EXIT_ERROR, common.EXIT_BREACH, common.EXIT_INSUFFICIENT):
        assert f"| {code} |" in doc


def test_one_registration_style_and_one_fail_helper() -> None:
    cli = REPO / "pipelines/cli"
    mounted = {module.__name__.rsplit(".", 1)[1] for module, _ in GROUPS}
    for path in sorted(cli.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {
            t.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "_fail" not in functions, f"{path.name}: use pipelines.cli.common.fail"
        if "app" in names and path.stem != "main":
            assert path.stem in mounted, (
                f"{path.name} defines a typer app that main.py never mounts"
            )
        docstring = ast.get_docstring(tree) or ""
        assert len(docstring.splitlines()) <= 3, f"{path.name}: keep the module docstring short"


def test_module_entry_point_runs_the_same_app() -> None:
    bad = run([sys.executable, "-m", "pipelines.cli", "model", "lineage", "v1"], REPO, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: 'v1' is not a version name")


def test_docs_name_no_retired_command() -> None:
    """README, docs and scripts use the grouped commands (`mlops model register`, ...)."""

    files = [REPO / name for name in ("README.md", "Makefile", "params.yaml", ".gto")]
    files += [*(REPO / "docs").glob("*.md"), *(REPO / ".github").rglob("*.sh")]
    files += [*(REPO / "pipelines").rglob("*.py"), *(REPO / "monitors").glob("*.ipynb")]
    files += [*(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    old = re.compile(r"mlops (" + "|".join(MOVED) + r")\b")
    for path in files:
        if path.name == "cli.md":
            continue  # it lists the old spellings with their new ones
        hits = [m.group(0) for m in old.finditer(path.read_text())]
        assert not hits, f"{path.relative_to(REPO)} still says {sorted(set(hits))}"


def test_the_serve_hint_is_a_command_a_shell_runs_as_printed(tmp_path: Path) -> None:
    import shlex

    home = tmp_path / ".dot dir" / "project" / ".bentoml"
    words = shlex.split(common.serve_hint(home, "ctr_service:abc"))
    assert words[:2] == ["serve", "it:"]
    assert words[2] == f"BENTOML_HOME={home.resolve()}"  # absolute, one word with its space
    assert words[3:] == [".venv/bin/bentoml", "serve", "ctr_service:abc", "--port", "3000"]
