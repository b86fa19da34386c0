"""``python -m pipelines.cli``: the ``mlops`` command."""

from pipelines.cli.main import app

app()
