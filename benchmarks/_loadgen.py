"""Real load generators for the benchmarks: ``wrk`` (closed loop) and ``hey`` (fixed rate)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.loadtest import percentiles

# wrk: cycle through the bodies in BODIES (one JSON body per line); print JSON at the end.
WRK_LUA = r"""
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", os.getenv("WRK_PATH"), {["Content-Type"] = "application/json"},
                    bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "errors": %d, "non2xx": %d, ' ..
    '"p50_ms": %.3f, "p95_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def wrk_script(folder: Path) -> Path:
    """Write the Lua script ``wrk`` runs (bodies from the file named by ``BODIES``)."""
    script = folder / "bodies.lua"
    script.write_text(WRK_LUA)
    return script


def wrk(url: str, path: str, bodies: Path, conc: int, seconds: float, script: Path) -> dict:
    """Closed loop: ``conc`` connections send back to back for ``seconds``."""
    env = {**os.environ, "BODIES": str(bodies), "WRK_PATH": path}
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(conc), "-d", f"{seconds:g}s", "-s", str(script), url],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"^RESULT (\{.*\})$", out, re.M)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    result: dict[str, Any] = json.loads(found.group(1))
    result["req_per_s"] = round(result["requests"] / result["seconds"], 1)
    return result


def hey_command(url: str, body: Path, rate: float, conc: int, seconds: float) -> list[str]:
    """``hey`` sending ``body`` at ``rate`` requests/s in all (``conc`` workers), CSV out."""
    return [
        "hey",
        "-z",
        f"{seconds:g}s",
        "-c",
        str(conc),
        "-q",
        f"{rate / conc:.3f}",
        "-m",
        "POST",
        "-T",
        "application/json",
        "-D",
        str(body),
        "-o",
        "csv",
        url,
    ]


def hey_result(csv_text: str, rate: float, seconds: float) -> dict[str, Any]:
    """Counts and percentiles from ``hey``'s per-request CSV (response time, status code)."""
    rows = [line.split(",") for line in csv_text.splitlines()[1:] if line[:1].isdigit()]
    lat = np.array([float(r[0]) for r in rows]) * 1000.0
    codes = [r[6] for r in rows]
    out: dict[str, Any] = {
        "requests": len(rows),
        "target_rate": round(rate, 1),
        "achieved_rate": round(len(rows) / seconds, 1),
        "answered_200": sum(c == "200" for c in codes),
        "errors": sum(c != "200" for c in codes),
    }
    return {**out, **percentiles(lat)}


def hey(url: str, body: Path, rate: float, conc: int, seconds: float) -> dict[str, Any]:
    """Fixed rate (``rate`` in all, spread over ``conc`` workers); percentiles from the CSV."""
    command = hey_command(url, body, rate, conc, seconds)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return hey_result(out, rate, seconds)


def lines(path: Path, bodies: list[Any]) -> Path:
    """Write one JSON body per line (what the wrk script cycles through)."""
    path.write_text("\n".join(json.dumps(b) for b in bodies) + "\n")
    return path
