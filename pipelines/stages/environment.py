"""Stages run in the locked environment or not at all.

Standard library only, and importable by any Python 3: the stage runner calls
``ensure_locked_environment`` before it imports anything else, so a foreign
interpreter gets a clear message instead of a ``ModuleNotFoundError``. See the
README, "Reproducibility".
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

REEXEC_MARK = "MLOPS_STAGE_REEXEC"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_PYTHON = re.compile(r"--python-version[ =](\d+)\.(\d+)")


class EnvironmentMismatch(RuntimeError):
    """The running interpreter is not the project's locked environment."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(lock_file: Path) -> tuple[dict[str, str], tuple[int, int] | None]:
    """``({distribution: version}, (major, minor))`` pinned by ``requirements.lock``."""
    pins: dict[str, str] = {}
    python = None
    for line in lock_file.read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[_normalize(match.group(1))] = match.group(2)
        elif python is None:
            found = _PYTHON.search(line)
            if found:
                python = (int(found.group(1)), int(found.group(2)))
    return pins, python


def mismatches(lock_file: Path) -> list[str]:
    """What differs between this interpreter and the lock (empty: it is the locked env)."""
    from importlib import metadata

    pins, python = locked_pins(lock_file)
    problems = []
    if python is not None and tuple(sys.version_info[:2]) != python:
        problems.append(
            f"Python {sys.version_info[0]}.{sys.version_info[1]} (lock: {python[0]}.{python[1]})"
        )
    installed: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            installed.setdefault(_normalize(name), dist.version)
    missing = sorted(name for name in pins if name not in installed)
    if missing:
        problems.append(
            f"{len(missing)} of {len(pins)} locked packages not installed "
            f"(e.g. {', '.join(missing[:5])})"
        )
    for name, version in sorted(pins.items()):
        have = installed.get(name)
        if have is not None and have != version:
            problems.append(f"{name} {have} (lock: {version})")
    return problems


def project_python(root: Path) -> Path:
    """The interpreter of the project's virtual environment (``make setup`` creates it)."""
    return root / ".venv" / "bin" / "python"


def ensure_locked_environment(root: Path, argv: list[str], module: str) -> None:
    """Return when this interpreter matches ``root/requirements.lock``; else switch or stop.

    A foreign interpreter (the ``python3`` first on PATH when the venv is not
    activated) hands the command over to the project's ``.venv/bin/python`` when
    it exists; otherwise the stage stops with the fix. Outside a project (no
    lock file) there is nothing to check.
    """
    lock = root / "requirements.lock"
    if not lock.is_file():
        return
    problems = mismatches(lock)
    if not problems:
        return
    venv_python = project_python(root)
    here = Path(sys.prefix).resolve()
    if (
        venv_python.is_file()
        and os.environ.get(REEXEC_MARK) != "1"
        and (root / ".venv").resolve() != here
    ):
        env = dict(os.environ)
        env[REEXEC_MARK] = "1"
        env["PATH"] = f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        os.execve(str(venv_python), [str(venv_python), "-m", module, *argv], env)
    shown = "; ".join(problems[:6]) + (
        f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    )
    raise EnvironmentMismatch(
        f"this stage runs only in the project's locked environment (requirements.lock), but "
        f"it was started with {sys.executable}: {shown}.\n"
        f"Fix: run `make setup` in {root} (it creates .venv from requirements.lock), then "
        "`.venv/bin/dvc repro` or `make run`; activating the venv is not needed."
    )
