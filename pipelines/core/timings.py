"""Wall times of a stage, kept out of its hashed outputs (``reports/timings/<stage>.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

TIMINGS_ENV = "MLOPS_TIMINGS_FILE"


def record(name: str, seconds: float) -> None:
    """Add ``name: seconds`` to the running stage's timings file (no-op outside a stage run)."""
    target = os.environ.get(TIMINGS_ENV)
    if not target:
        return
    from pipelines.core.io import atomic_path

    path = Path(target)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = round(float(seconds), 3)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
