"""The two registry calls the monitors make, written directly against GTO's git tags.

Kept in one small module so a richer registry layer can take over by replacing
these functions: the canary guard only needs to know which version is in the
``canary`` stage and to record that it was taken out of it, with the evidence,
as an annotated git tag (who, when, why) that ``gto history`` shows.
"""

from __future__ import annotations

from pathlib import Path


class RegistryError(RuntimeError):
    """A registry call failed; the message names the repository, artifact and version."""


def version_in_stage(repo: Path, artifact: str, stage: str) -> str | None:
    """The version of ``artifact`` currently assigned to ``stage`` in ``repo``, or None."""
    import gto.api

    try:
        found = gto.api.find_versions_in_stage(str(repo), artifact, stage)
    except Exception as exc:  # GTO raises several types; one clear error is enough here
        raise RegistryError(
            f"cannot read stage {stage!r} of {artifact!r} from the GTO registry in {repo}: {exc}"
        ) from exc
    if not found:
        return None
    first = found[0] if isinstance(found, list) else found
    return str(first.version)


def record_canary_rollback(repo: Path, artifact: str, version: str, message: str) -> str:
    """Take ``version`` out of the ``canary`` stage with an annotated tag holding ``message``.

    Returns the tag name (``<artifact>#canary!#N``). The tag is created locally;
    pushing it is left to whoever pushes the repository's tags.
    """
    import gto.api

    before = _tags(repo)
    try:
        gto.api.unassign(str(repo), artifact, stage="canary", version=version, message=message)
    except Exception as exc:
        raise RegistryError(
            f"could not record the canary rollback of {artifact} {version} in {repo}: {exc}"
        ) from exc
    created = sorted(_tags(repo) - before)
    return created[0] if created else ""


def _tags(repo: Path) -> set[str]:
    import subprocess

    out = subprocess.run(
        ["git", "tag", "--list"], cwd=repo, capture_output=True, text=True, check=False
    ).stdout
    return set(out.split())
