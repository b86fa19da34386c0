"""Machine description recorded beside every benchmark result."""

from __future__ import annotations

import datetime as dt
import os
import platform


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
