"""Group commit for the DuckDB store's journal (``DuckDBStore(path, fsync="group")``).

A background thread makes one ``fdatasync`` cover every write that arrived while the
previous one ran; a writer returns once a sync that started after its write finished. A
lone writer waits for one ``fdatasync``, as with ``fsync=True``; writers on several
threads share them, so the syncs per second stay bounded by the disk, not by the writers.
The delay is bounded too: a write waits for at most the sync in flight plus its own.

A failed ``fdatasync`` is not retried: after one, the kernel may have dropped the pages it
could not write and a second call would report success (PostgreSQL's "fsyncgate"). The
error is kept and every later write raises it, naming the journal.
"""

from __future__ import annotations

import os
import threading

from ..errors import StoreUnavailableError

__all__ = ["GroupSync"]


class GroupSync:
    """The syncer of one process's journal; positions count bytes written since it began."""

    def __init__(self, fd: int, path: str) -> None:
        self._cond = threading.Condition()
        self._busy = threading.Lock()  # held during an fdatasync: the file stays open
        self._fd = fd
        self._path = path
        self._written = 0
        self._synced = 0
        self._closed = False
        self._error: OSError | None = None
        self.syncs = 0  # fdatasync calls made (for benchmarks)
        self._thread = threading.Thread(target=self._loop, name="durable_nb-sync", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> int:
        """Note ``n`` bytes appended to the journal; returns the position to wait for."""
        with self._cond:
            self._written += n
            self._cond.notify_all()
            return self._written

    def wait(self, position: int) -> None:
        """Return once everything up to ``position`` is on disk."""
        with self._cond:
            while self._synced < position and self._error is None:
                if not self._thread.is_alive():
                    raise StoreUnavailableError(
                        f"the journal {self._path!r} was closed before it was synced"
                    )
                self._cond.wait(1.0)
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StoreUnavailableError(
                f"cannot sync the journal {self._path!r} to disk ({self._error}); what it "
                "holds since its last sync may not survive a power loss. Free disk space or "
                "fix the device, then open the store again: the journal is merged then"
            ) from self._error

    def switch(self, fd: int, path: str) -> None:
        """The journal moved to a new file (``fd``); everything written to the old one is
        merged into DuckDB, which synced it, so it counts as synced."""
        with self._busy, self._cond:
            self._fd, self._path = fd, path
            self._synced = self._written
            self._cond.notify_all()

    def close(self) -> None:
        """Sync what is left, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._synced >= self._written and not self._closed:
                    self._cond.wait()
                if self._synced >= self._written:  # closed, nothing left
                    return
                target = self._written
            with self._busy:
                try:
                    os.fdatasync(self._fd)
                except OSError as e:
                    with self._cond:
                        self._error = e
                        self._cond.notify_all()
                    return
            with self._cond:
                self._synced = max(self._synced, target)
                self.syncs += 1
                self._cond.notify_all()
