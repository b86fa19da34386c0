"""Operator state shared by the worker processes of one pod, through ``state_dir``.

One worker takes an admin call (reload, kill switch, fault) and records it in
``state_dir/pod.json`` with a new generation. Every worker's follower thread applies it
and acknowledges the generation in ``state_dir/workers/``; the admin call answers once
every live worker has, so the next request sees the change whichever worker takes it.
Details: docs/serving.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.io import write_json

logger = logging.getLogger("ctr.serving")
_instances = itertools.count()


@dataclass
class PodState:
    """What every worker of the pod must apply; overrides hold for ``release_id`` only."""

    generation: int = 0
    reload_generation: int = 0
    release_id: str | None = None
    candidate_share: float | None = None
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PodState:
        known = {k: data[k] for k in asdict(cls()) if k in data}
        return cls(**known)


def read_state(state_dir: Path) -> PodState:
    """The pod's recorded state (the initial one if nothing was recorded yet)."""
    try:
        return PodState.from_dict(json.loads((state_dir / "pod.json").read_text()))
    except (OSError, ValueError, TypeError):
        return PodState()


def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


class Pod:
    """This worker's view of the pod: record changes, follow the others', acknowledge.

    ``apply(state)`` brings the worker in line with ``state`` and returns an error text
    or None; it runs in the follower thread, or in the caller's for the worker's own change.
    ``report()``, if given, is this worker's health (request log, feature store), published
    with its acknowledgement every ``report_seconds``: whichever worker answers /metadata
    shows every worker's.
    """

    def __init__(
        self,
        state_dir: Path,
        apply: Callable[[PodState], str | None],
        poll_seconds: float = 0.2,
        report: Callable[[], dict[str, Any]] | None = None,
        report_seconds: float = 1.0,
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "pod.json"
        self.acks = state_dir / "workers"
        self.acks.mkdir(parents=True, exist_ok=True)
        self._apply = apply
        self._ack_path = self.acks / f"{os.getpid()}-{next(_instances)}.json"
        self._applied = -1
        self._mutex = threading.Lock()  # one apply at a time in this worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll = poll_seconds
        self._report = report
        self._report_seconds = report_seconds
        self._reported_at = 0.0  # monotonic
        self._ack: dict[str, Any] = {}

    @property
    def applied(self) -> int:
        """The last generation this worker applied."""
        return self._applied

    # --- reading and writing the shared state ------------------------------------
    def read(self) -> PodState:
        return read_state(self.state_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.state_dir / "pod.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def change(self, edit: Callable[[PodState], None]) -> int:
        """Record a change (``edit`` mutates the state), apply it here; its generation."""
        with self._mutex:
            with self._locked():
                state = self.read()
                edit(state)
                state.generation += 1
                write_json(self.path, asdict(state))
            self._follow(state)
        return state.generation

    # --- following ---------------------------------------------------------------
    def start(self) -> None:
        """Apply the current state once, then follow changes in a background thread."""
        self.follow_now()
        self._thread = threading.Thread(target=self._loop, name="pod-follower", daemon=True)
        self._thread.start()

    def follow_now(self) -> None:
        """Apply the recorded state if this worker has not yet (a small file read)."""
        with self._mutex:
            state = self.read()
            if state.generation != self._applied or self._applied < 0:
                self._follow(state)

    def _follow(self, state: PodState) -> None:
        try:
            error = self._apply(state)
        except Exception as exc:  # a follower must keep following
            logger.exception("applying pod generation %d failed", state.generation)
            error = f"{type(exc).__name__}: {exc}"
        self._applied = state.generation
        self._ack = {"pid": os.getpid(), "generation": state.generation, "error": error}
        self._publish()

    def _publish(self) -> None:
        """Write the acknowledgement, with this worker's report when there is one."""
        ack = dict(self._ack)
        if self._report is not None:
            try:
                ack["report"] = self._report()
            except Exception as exc:  # a failing report must not stop acknowledgements
                ack["report"] = {"error": f"{type(exc).__name__}: {exc}"}
            self._reported_at = time.monotonic()
        write_json(self._ack_path, ack)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll):
            self.follow_now()
            if self._report is not None and self._ack:
                if time.monotonic() - self._reported_at >= self._report_seconds:
                    with self._mutex:
                        try:
                            self._publish()
                        except OSError:
                            logger.exception("publishing this worker's report failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._ack_path.unlink(missing_ok=True)

    def status(self) -> dict[str, Any]:
        """The recorded generation, this worker's, and every live worker's acknowledgement."""
        return {
            "recorded": self.read().generation,
            "applied_here": self._applied,
            "workers": acknowledgements(self.state_dir),
        }

    # --- waiting for the others ----------------------------------------------------
    def wait(self, generation: int, timeout: float, workers: int = 1) -> dict[str, Any]:
        """Wait until every live worker, and at least ``workers`` of them (one restarting
        after a crash registers once it has loaded), applied ``generation``, or ``timeout``.

        ``complete`` says whether that happened; if not, the change is recorded all the
        same and a lagging or restarting worker applies it as soon as it follows."""
        deadline = time.monotonic() + timeout
        while True:
            settled, report = verdict(acknowledgements(self.state_dir), generation, workers)
            if settled or time.monotonic() >= deadline:
                return report
            time.sleep(0.05)


def verdict(
    acks: list[dict[str, Any]], generation: int, workers: int
) -> tuple[bool, dict[str, Any]]:
    """Who of ``acks`` applied ``generation``: settled once none lags and at least
    ``workers`` did (the bool), and the report (``complete`` if moreover none failed)."""
    done, pending, failed = [], [], {}
    for ack in acks:
        if ack["generation"] < generation:
            pending.append(ack["pid"])
            continue
        done.append(ack["pid"])
        if ack.get("error"):
            failed[str(ack["pid"])] = ack["error"]
    settled = not pending and len(done) >= workers
    return settled, {
        "complete": settled and not failed,
        "generation": generation,
        "expected": workers,
        "applied": len(done),
        "pending": pending,
        "failed": failed,
    }


def acknowledgements(state_dir: Path) -> list[dict[str, Any]]:
    """The last acknowledgement of every live worker of the pod (a worker acknowledges
    once it has loaded its release); those of dead workers are removed."""
    acks = []
    for path in sorted((state_dir / "workers").glob("*.json")):
        try:
            ack = json.loads(path.read_text())
            pid, generation = int(ack["pid"]), int(ack["generation"])
        except (OSError, ValueError, TypeError, KeyError):
            continue  # being replaced right now; read again next round
        if not _alive(pid):
            path.unlink(missing_ok=True)  # a killed worker: its restart registers anew
            continue
        acks.append({**ack, "pid": pid, "generation": generation})
    return acks


def loaded_workers(state_dir: Path) -> set[int]:
    """Process ids of the live workers that have loaded their release."""
    return {ack["pid"] for ack in acknowledgements(state_dir)}


__all__ = ["Pod", "PodState", "acknowledgements", "loaded_workers", "read_state", "verdict"]
