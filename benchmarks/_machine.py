"""Machine description recorded beside every benchmark result, and the one way results are saved."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, object]:
    """Cores, CPU model, memory, Python and date of the run."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kb = 0
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
    }


def run_facts(started_at: str, load_before: tuple[float, ...]) -> dict[str, Any]:
    """What a report opens with: the machine, when the run started, and the load average
    before it and now (at its end)."""
    return {
        "machine": machine(),
        "started_at": started_at,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def save_results(
    out: Path, stem: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` (the rendered table) under ``out``; returns the
    markdown so the caller can print it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text)
    return text
