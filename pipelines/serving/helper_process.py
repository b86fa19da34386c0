"""Background helper processes of a serving worker (the profile of a closed window), started
detached, at the lowest priority, without the worker waiting for them.

docs/serving.md ("Tail latency") has the measurements behind each choice.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# The launcher, argv = [stderr file, command...]: it starts the helper and exits at once, so
# the helper is not a child of the worker (BentoML stops a worker's children with it). It
# makes its own session (BentoML also stops the worker's process group), puts that
# session's scheduler group at nice 19 (autogroup: a nice counts only inside its group,
# and a new group would get as much CPU as the service's) and itself at nice 19 before
# the helper starts, which inherits it. Not the idle scheduling class: beside busy helpers
# in it a serving thread woke later than beside helpers at nice 19
# (benchmarks/helper_priority.py).
LAUNCHER = (
    "import os, subprocess, sys\n"
    "os.setsid()\n"
    "try:\n"
    "    with open('/proc/self/autogroup', 'w') as group:\n"
    "        group.write('19')\n"
    "except OSError:\n"
    "    pass\n"
    "os.nice(19 - os.nice(0))\n"
    "with open(sys.argv[1], 'wb') as err:\n"
    "    subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, "
    "stdout=subprocess.DEVNULL, stderr=err)\n"
)


def package_root() -> str:
    """The folder holding the ``pipelines`` package, so the helper imports this very code."""
    here = str(Path(__file__).resolve().parents[2])
    extra = os.environ.get("PYTHONPATH")
    return here if not extra else f"{here}{os.pathsep}{extra}"


def spawn_detached(command: list[str], stderr: Path) -> int:
    """Start ``command`` through the launcher; the launcher's pid, for ``reap``.

    The worker does not wait for the launcher (``posix_spawn``, no fork of the worker's
    memory), whose Python starts without site-packages (``-S``: it needs none) and is the
    only part at normal priority; ``reap`` collects it later.
    """
    argv = [sys.executable, "-S", "-c", LAUNCHER, str(stderr), *command]
    env = {**os.environ, "PYTHONPATH": package_root()}
    return os.posix_spawn(sys.executable, argv, env)


def reap(pids: list[int], wait_s: float = 0.0) -> tuple[list[int], list[tuple[int, int]]]:
    """The launchers of ``pids`` still running, and the (pid, exit code) of those that
    failed; waits up to ``wait_s`` for them to exit (a worker that is stopping, so that
    its helpers are detached before it exits: a launcher still its child could be
    stopped with it; its window would then be profiled at the next start)."""
    deadline = time.monotonic() + wait_s
    running, failed = list(pids), []
    while True:
        still = []
        for pid in running:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                continue
            if not done:
                still.append(pid)
            elif (code := os.waitstatus_to_exitcode(status)) != 0:
                failed.append((pid, code))
        running = still
        if not running or time.monotonic() >= deadline:
            return running, failed
        time.sleep(0.01)
