"""Start and stop ``bentoml serve`` on a free loopback port: the one launcher of the project.

``mlops simulate`` serves from source through it; the tests and benchmarks serve bentos.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback right now (another process may take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A running ``bentoml serve`` (arbiter + workers) started in its own process group.

    ``port=None`` picks a free loopback port. Between picking a port and binding it,
    another process can take it; so can the arbiter's own control port, which BentoML
    picks the same way. Such a start fails at once with "Address already in use" and
    is retried (``attempts`` times in all) rather than failing the caller.
    """

    def __init__(
        self,
        target: str,
        port: int | None,
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        ready_timeout: float = 180.0,
        attempts: int = 3,
    ) -> None:
        """Serve ``target`` (a bento tag, or ``module:Service`` from source in ``cwd``)."""
        self.log_path = log_path
        # each worker acknowledges here once it has loaded its release (pipelines.serving.pod)
        self.state_dir = Path(env["CTR_STATE_DIR"]) if env.get("CTR_STATE_DIR") else None
        env = {**env, "OMP_NUM_THREADS": "1"}
        for attempt in range(1, attempts + 1):
            self.url = f"http://127.0.0.1:{port or free_port()}"
            with log_path.open("wb") as log:
                serve = ["serve", target, "--host", "127.0.0.1", "--port", self.port]
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "bentoml", *serve],
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(ready_timeout):
                return
            if "Address already in use" not in self.tail() or attempt == attempts:
                raise RuntimeError(f"bentoml serve exited {self.proc.returncode}:\n{self.tail()}")

    @property
    def port(self) -> str:
        return self.url.rsplit(":", 1)[1]

    def _wait_ready(self, timeout: float) -> bool:
        """True once /readyz answers 200; False if the process exited first."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def worker_pids(self) -> list[int]:
        """The service worker processes (children of the arbiter running the service)."""
        return worker_pids(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory of the arbiter and every process under it, in MiB."""
        import psutil

        total = 0
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / (1 << 20)

    def wait_workers(
        self, count: int, timeout: float = 120.0, exclude: Sequence[int] = ()
    ) -> float:
        """Seconds until ``count`` workers (none of ``exclude``) run and answer /readyz and,
        when the pod's state folder is known, have loaded their release."""
        import httpx

        from pipelines.serving.pod import loaded_workers

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            pids = [p for p in self.worker_pids() if p not in exclude]
            if self.state_dir is not None:
                pids = [p for p in pids if p in loaded_workers(self.state_dir)]
            if len(pids) >= count:
                try:
                    if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{count} workers not loaded after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> int | None:
        """SIGTERM to the arbiter (clean shutdown, request log flushed); SIGKILL if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def worker_pids(arbiter: int) -> list[int]:
    """The BentoML service worker processes under the arbiter process ``arbiter``."""
    import psutil

    try:
        children = psutil.Process(arbiter).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        try:
            if "_bentoml_impl.worker.service" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(pids)
