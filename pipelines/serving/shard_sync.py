"""fsync of the open request-log shard on its own thread, and the lines it has not covered yet.

The writer thread hands every line to the OS as soon as it takes it, so a killed worker
loses only what is still queued. An fsync in that thread stopped the hand-over for as long
as the disk took (up to a second on a busy one), and every row answered meanwhile was lost
to a SIGKILL. Details: docs/serving.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import os


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardSync:
    """One fsync at a time on a helper thread, and the (line, rows) written since the last
    fsync that finished (a deleted shard takes those lines with it)."""

    def __init__(self) -> None:
        self._unsynced: list[tuple[bytes, int]] = []
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="request-log-fsync")
        self._pending: tuple[cf.Future[None], int, int] | None = None
        self._generation = 0  # a new shard (or a lost one) makes a running fsync moot

    def start(self, fileno: int) -> None:
        """fsync the shard in the background, unless the previous fsync is still running
        (settling a finished one first: its ``OSError`` is raised here)."""
        self.settle()
        if self._pending is None:
            fd = os.dup(fileno)  # closing or rotating the shard meanwhile is safe
            future = self._pool.submit(_fsync_and_close, fd)
            self._pending = (future, len(self._unsynced), self._generation)

    def settle(self) -> None:
        """Drop the lines a finished fsync covered; raise its ``OSError``."""
        if self._pending is None or not self._pending[0].done():
            return
        future, covered, generation = self._pending
        self._pending = None
        future.result()
        if generation == self._generation:
            del self._unsynced[:covered]

    def written(self, lines: list[tuple[bytes, int]]) -> None:
        """These lines are in the shard now, not yet covered by an fsync."""
        self._unsynced.extend(lines)

    def now(self, fileno: int) -> None:
        """fsync in this thread (a shard being closed), then start over."""
        os.fsync(fileno)
        self.forget()

    def forget(self) -> list[tuple[bytes, int]]:
        """The shard is closed or gone: its unsynced lines, handed back; start over."""
        lines, self._unsynced = self._unsynced, []
        self._generation += 1
        return lines

    def close(self) -> None:
        self._pool.shutdown(wait=True)
