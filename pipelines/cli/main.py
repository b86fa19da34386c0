"""The ``mlops`` app: one typer sub-app per command group, mounted here (docs/cli.md)."""

from __future__ import annotations

from typing import Any

import typer
from typer._click.exceptions import UsageError  # typer 0.29 vendors click: its own classes
from typer.core import TyperGroup

from pipelines.cli import (
    data,
    features,
    model,
    monitor,
    notebooks,
    params,
    review,
    simulate,
    summary,
)
from pipelines.cli.common import EXIT_ERROR

# Every module defines `app`; a group name mounts it as `mlops NAME ...`, None mounts its
# single command at the top level (`mlops review`).
GROUPS: tuple[tuple[Any, str | None], ...] = (
    (data, "data"),
    (features, "features"),
    (model, "model"),
    (monitor, "monitor"),
    (notebooks, "notebooks"),
    (params, "params"),
    (review, None),
    (simulate, None),
    (summary, None),
)

# Top-level names of commands that moved into a group: the error says where they went.
MOVED = {
    **{c: f"model {c}" for c in ("register", "promote", "rollback", "status", "history")},
    **{c: f"model {c}" for c in ("lineage", "repair")},
    "drift": "monitor drift",
    "canary": "monitor canary",
}


class MlopsGroup(TyperGroup):
    """The root group: command-line usage errors exit 1 like every other error (2 and 3
    are monitor verdicts), and a moved command names its new place."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        if args and args[0] in MOVED and args[0] not in self.commands:
            raise UsageError(
                f"`mlops {args[0]}` is now `mlops {MOVED[args[0]]}` (see docs/cli.md)", ctx
            )
        return super().resolve_command(ctx, args)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            exc.exit_code = EXIT_ERROR
            raise


app = typer.Typer(
    cls=MlopsGroup,
    help="Notebook-first research-to-production toolkit (commands: docs/cli.md).",
    no_args_is_help=True,
    add_completion=False,
)
for _module, _name in GROUPS:
    app.add_typer(_module.app, name=_name)


if __name__ == "__main__":
    app()
