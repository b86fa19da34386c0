"""Project paths and ``params.yaml`` access.

Paths are written once, in ``params.yaml`` (and interpolated into ``dvc.yaml``);
code receives them as parameters. This module only knows where the project
root is and how to read the params file with clear errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A parameter is missing or invalid; the message names the key and the fix."""


def project_root(start: Path | None = None) -> Path:
    """Return the project root: the nearest folder upwards holding ``params.yaml``.

    ``MLOPS_PROJECT_ROOT`` overrides the search (used by the service inside a bento).
    """
    env = os.environ.get("MLOPS_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file():
            return folder
    raise ConfigError(
        f"no params.yaml found in {here} or any parent folder; run from inside the project "
        "or set MLOPS_PROJECT_ROOT"
    )


def load_params(path: Path | None = None) -> dict[str, Any]:
    """Load ``params.yaml`` as a dict, failing with the file name on a YAML error."""
    path = path or project_root() / "params.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def get(params: dict[str, Any], dotted: str) -> Any:
    """Read ``section.key`` from params, naming the missing key when absent."""
    node: Any = params
    walked: list[str] = []
    for part in dotted.split("."):
        walked.append(part)
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"params.yaml has no '{'.'.join(walked)}' (needed: '{dotted}'); "
                "add it or restore the file from git"
            )
        node = node[part]
    return node
