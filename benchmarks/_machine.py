"""Machine description recorded beside every benchmark result, the host's speed during a run,
and the one way results are saved."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


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


class SpeedProbe(threading.Thread):
    """The host's speed as the run sees it: every 20 ms, the CPU time of a fixed integer sum
    (``sum(range(20_000))``, the interpreter's own loop) and of a pass over 4 MiB (beyond a
    core's cache), about 2% of one CPU. Slower than it runs alone, beside an idle CPU, it
    points at the host rather than the service."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, python ms, memory ms)
        self.stopped = threading.Event()
        self._memory = np.ones(1 << 19)

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            t, c0 = time.monotonic(), time.thread_time()
            sum(range(20_000))
            c1 = time.thread_time()
            self._memory.sum()
            c2 = time.thread_time()
            self.samples.append((t, 1000 * (c1 - c0), 1000 * (c2 - c1)))

    def by_second(self, begin: float, seconds: int) -> list[float | None]:
        """The median CPU ms of the integer sum in each second from ``begin``."""
        got: list[list[float]] = [[] for _ in range(seconds)]
        for t, python_ms, _ in self.samples:
            k = int(t - begin)
            if 0 <= k < seconds:
                got[k].append(python_ms)
        return [round(float(np.median(g)), 4) if g else None for g in got]

    def slowest_second(self, begin: float, end: float) -> float | None:
        """The highest of ``by_second``'s medians from ``begin`` to ``end``."""
        seconds = [x for x in self.by_second(begin, int(end - begin)) if x is not None]
        return max(seconds, default=None)

    def inside(self, spans: list[tuple[float, float]]) -> dict[str, float | None]:
        """Median CPU ms of each probe that started inside ``spans`` (the samples are in time
        order, so each span is two binary searches)."""
        got = np.asarray(self.samples, dtype=float).reshape(-1, 3)
        keep = np.zeros(len(got), dtype=bool)
        for a, b in spans:
            keep[np.searchsorted(got[:, 0], a) : np.searchsorted(got[:, 0], b)] = True
        if not keep.any():
            return {"probes": 0, "python_ms": None, "memory_ms": None}
        python_ms, memory_ms = np.median(got[keep, 1:], axis=0)
        return {
            "probes": int(keep.sum()),
            "python_ms": round(float(python_ms), 4),
            "memory_ms": round(float(memory_ms), 4),
        }

    @classmethod
    def alone(cls, seconds: float) -> tuple[SpeedProbe, float, float]:
        """The probe run for ``seconds`` with nothing else started (the host's own variation);
        the stopped probe and the span it ran (monotonic)."""
        probe, began = cls(), time.monotonic()
        probe.start()
        time.sleep(seconds)
        probe.stopped.set()
        return probe, began, time.monotonic()


def run_facts(started_at: str, load_before: tuple[float, ...]) -> dict[str, Any]:
    """What a report opens with: the machine, when the run started, and the load average
    before it and now (at its end)."""
    return {
        "machine": machine(),
        "started_at": started_at,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def run_line(report: dict[str, Any], python: bool = False) -> str:
    """How a report's text opens: when the run started, the machine (and its Python) and the
    load average before and after, from ``run_facts``; the caller goes on after it."""
    m = report["machine"]
    return (
        f"{report['started_at']}; {m['cores']} cores ({m['cpu']})"
        + (f", Python {m['python']}" if python else "")
        + f"; load average {report['load_average_before'][0]:.2f} before, "
        f"{report['load_average_after'][0]:.2f} after"
    )


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
