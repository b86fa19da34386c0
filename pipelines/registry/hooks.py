"""The two registry calls the canary guard makes, through the project's GTO registry.

``version_in_stage`` asks ``pipelines.registry.registry.Registry`` which version holds a
stage (GTO's "latest assignment wins", as ``mlops model status`` shows it);
``record_canary_rollback`` takes the canary version out of the ``canary`` stage
with an annotated GTO tag in the registry's message format (a title line, then
YAML fields that ``mlops model history`` parses back). Kept in one small module so the
guard depends on the registry through exactly these two calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


class RegistryError(RuntimeError):
    """A registry call failed; the message names the repository, artifact and version."""


def _registry(repo: Path) -> Any:
    from pipelines.registry.registry import Registry
    from pipelines.registry.registry import RegistryError as _Error

    try:
        return Registry(repo)
    except (_Error, OSError, ValueError) as exc:
        raise RegistryError(f"cannot open the model registry in {repo}: {exc}") from exc


def version_in_stage(repo: Path, stage: str) -> str | None:
    """The version of the release artifact (``release.artifact``) holding ``stage``, or None."""
    registry = _registry(repo)
    try:
        return registry.holders().get(stage)
    except Exception as exc:  # GTO raises several types; one clear error is enough here
        raise RegistryError(
            f"cannot read stage {stage!r} of {registry.artifact} from the registry in {repo}: {exc}"
        ) from exc


def record_canary_rollback(repo: Path, version: str, title: str, fields: dict[str, Any]) -> str:
    """Take ``version`` out of ``canary`` with an annotated tag; returns the tag name.

    The tag (``<artifact>#canary!#N``) is created locally; pushing tags is left to
    whoever pushes the repository.
    """
    import gto.api

    from pipelines.registry.registry import format_message

    registry = _registry(repo)
    events = registry.events()
    if events:  # git tag times have 1 s resolution: stay after the newest registry change
        newest = max(e.timestamp for e in events).timestamp()
        while time.time() < int(newest) + 1:
            time.sleep(0.05)
    try:
        event = gto.api.unassign(
            str(repo),
            registry.artifact,
            stage="canary",
            version=version,
            message=format_message(title, fields),
        )
    except Exception as exc:
        raise RegistryError(
            f"could not record the canary rollback of {registry.artifact} {version} in {repo}: "
            f"{exc}"
        ) from exc
    return str(event.tag)
