"""What every ``mlops`` command shares: exit codes, ``fail``, version names (docs/cli.md)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer

EXIT_OK = 0
EXIT_ERROR = 1  # bad input, bad configuration, a refused action, a command-line usage error
EXIT_BREACH = 2  # a monitor verdict: drift/signal/quality breach, canary rolled back
EXIT_INSUFFICIENT = 3  # a monitor verdict: not enough data to judge, the loop stopped early

STAGE_NAMES = ("staging", "canary", "prod")
_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
_MODEL = re.compile(r"^[a-z0-9]([a-z0-9_/-]*[a-z0-9])?$")


def serve_hint(bentoml_home: Path, bento_tag: str) -> str:
    """The command that serves a bento from the project's BentoML store (an absolute home:
    a relative one names another store from any other folder)."""
    home = shlex.quote(str(bentoml_home.resolve()))  # a folder name may hold a space
    return f"serve it: BENTOML_HOME={home} .venv/bin/bentoml serve {bento_tag} --port 3000"


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code`` (1 unless a verdict)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class VersionNameError(ValueError):
    """A string that does not name a model version; the message lists the accepted forms."""


@dataclass(frozen=True)
class VersionName:
    """A parsed version name: exactly one of ``version``, ``stage``, ``latest`` or none of
    them (the model alone: its prod version, else its latest)."""

    text: str
    model: str
    version: str | None = None
    stage: str | None = None
    latest: bool = False

    @property
    def spec(self) -> str:
        """The GTO shortcut the registry resolves (``MODEL@vX.Y.Z``, ``MODEL#stage``, ...)."""
        if self.version:
            return f"{self.model}@{self.version}"
        if self.stage:
            return f"{self.model}#{self.stage}"
        return f"{self.model}@latest" if self.latest else self.model


def forms(model: str) -> str:
    """The accepted forms, for help texts and errors."""
    return f"v1.2.0, 1.2.0, {model}@v1.2.0, {model}@latest or {model}#prod"


def parse_version_name(text: str, model: str) -> VersionName:
    """Parse any accepted way of naming a version of ``model`` (the registry's artifact).

    ``v1.2.0``/``1.2.0`` (that version), ``MODEL@v1.2.0``, ``MODEL@latest`` (the highest
    registered), ``MODEL#stage`` (the version holding the stage) and ``MODEL`` (prod, else
    latest). Only the syntax is checked here; the registry says whether the version exists.
    """
    value = text.strip()
    name, sep, rest = value, "", ""
    for mark in ("@", "#"):
        if mark in value:
            name, sep, rest = value.partition(mark)
            break
    why = None
    if not sep and _SEMVER.match(value):
        return VersionName(text, model, version=_v(value))
    if not _MODEL.match(name):
        why = "not a version number or a model name"
    elif name != model:
        why = f"unknown model '{name}' (this project registers '{model}': release.artifact)"
    elif sep == "@" and rest == "latest":
        return VersionName(text, model, latest=True)
    elif sep == "@" and _SEMVER.match(rest):
        return VersionName(text, model, version=_v(rest))
    elif sep == "@":
        why = f"'{rest}' is not a semantic version like v1.2.0"
    elif sep == "#" and rest in STAGE_NAMES:
        return VersionName(text, model, stage=rest)
    elif sep == "#":
        why = f"unknown stage '{rest}' (stages: {', '.join(STAGE_NAMES)})"
    else:
        return VersionName(text, model)
    raise VersionNameError(
        f"'{text}' is not a version name: {why}. Name a version as {forms(model)} "
        "(`mlops model status` lists the registered ones)"
    )


def _v(value: str) -> str:
    return value if value.startswith("v") else f"v{value}"


def registry_model() -> str:
    """The registered artifact's name (params.yaml release.artifact)."""
    from pipelines.core import config
    from pipelines.core.settings import load_settings

    try:
        return load_settings().release.artifact
    except config.ConfigError as exc:
        fail(str(exc))


def version_name(text: str, model: str | None = None) -> VersionName:
    """:func:`parse_version_name` for a command: a bad name is ``fail``'s error, exit 1."""
    try:
        return parse_version_name(text, model or registry_model())
    except VersionNameError as exc:
        fail(str(exc))


def version_number(text: str, model: str | None = None) -> str:
    """A version given by number (``v1.2.0``, ``MODEL@v1.2.0``): what a new version needs."""
    name = version_name(text, model)
    if name.version is None:
        fail(
            f"'{text}' names a version by stage or as the latest; give its number "
            f"instead, e.g. v1.2.0 or {name.model}@v1.2.0"
        )
    return name.version


def resolve_version(registry: Any, name: VersionName) -> str:
    """The registered ``vX.Y.Z`` that ``name`` names (parse it before opening the registry,
    so a bad name is the same error in every command)."""
    from gto.exceptions import GTOException

    from pipelines.registry.registry import RegistryError

    try:
        return str(registry.parse_spec(name.spec)[0])
    except (RegistryError, GTOException) as exc:
        fail(str(exc))


def open_registry() -> Any:
    """The project's registry, or ``fail`` with why it cannot be opened."""
    from pipelines.core.config import ConfigError
    from pipelines.registry.registry import Registry, RegistryError

    try:
        return Registry()
    except (RegistryError, ConfigError) as exc:
        fail(str(exc))


def registered_version(text: str | None) -> str | None:
    """For options naming an existing version: its ``vX.Y.Z`` (the registry is opened only
    for a stage, ``@latest`` or a bare model name)."""
    if text is None:
        return None
    name = version_name(text)
    return name.version or resolve_version(open_registry(), name)
