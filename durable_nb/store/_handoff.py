"""Fair hand-off of the DuckDB file between the processes that share a store.

DuckDB lets one process hold a database file at a time, and a busy process (one that
records an effect every 100 ms) is never idle long enough to close it on its own. So a
process that finds the file held asks for it: it creates a request file in
``store.duckdb.d/queue/`` (named by the time it asked, so requests sort oldest first) and
holds an exclusive ``flock`` on it while it waits, which the kernel drops if it dies. The
holder looks at the queue after each merge and each use of the connection; when someone
asks, it merges what it has pending and closes the file. Requests are served oldest first:
a waiter tries to open the file only when no older live request is ahead of it (or when the
requests ahead of it have not moved for :data:`PATIENCE` seconds, in case the first one is
stuck), and a process that wants the file back while others wait queues behind them. A
waiter gives up (``StoreLockedError``) only when the line ahead of it has not moved for
the store's ``lock_timeout``: a long line that moves is waited out.

A failed ``duckdb.connect`` costs about 5 ms of CPU, so waiters do not poll DuckDB: the
process that has the file open also holds the ``flock`` of ``store.duckdb.d/holder`` (the
baton), taken before connecting and dropped after closing, and a waiter tries to connect
only once it got the baton (a ``flock`` attempt costs microseconds). A program that opens
the file without taking part (the DuckDB CLI, an older durable_nb) leaves the baton free:
then the waiter's connect fails and it retries with backoff, as before.

Only merging the journal, and reads that miss the in-memory caches, need the file;
journal appends never do, so a writer keeps recording while it waits for its turn.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["PATIENCE", "Busy", "Queue", "Ticket", "open_in_turn"]

T = TypeVar("T")

# the baton of each store, per process: stores opened twice in one process share DuckDB's
# database instance, so they share the baton too (path -> [descriptor, holders])
_batons: dict[str, list[int]] = {}
_batons_lock = threading.Lock()

#: seconds a waiter defers to older requests before it tries to open the file anyway
PATIENCE = 2.0


class Ticket:
    """One request for the file: its name in the queue and the locked descriptor."""

    __slots__ = ("ahead", "fd", "moved_at", "name", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.name = path.name
        self.fd = fd
        self.ahead = 1 << 30  # live requests older than this one, when last counted
        self.moved_at = time.monotonic()  # when that count last went down


class Queue:
    """The request files of the processes waiting for the DuckDB file of one store."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._dir = str(folder)
        self._baton_path = str(folder.parent / "holder")
        self.has_baton = False

    def take_baton(self) -> bool:
        """Take the holder's ``flock`` if it is free or held by this process (before
        connecting)."""
        if self.has_baton:
            return True
        with _batons_lock:
            entry = _batons.get(self._baton_path)
            if entry is None:
                try:
                    fd = os.open(self._baton_path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError:
                    return True  # no baton to be had (read-only or deleted folder): connect
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    return not isinstance(e, BlockingIOError)
                entry = _batons[self._baton_path] = [fd, 0]
            entry[1] += 1
        self.has_baton = True
        return True

    def drop_baton(self) -> None:
        """Let go of the holder's ``flock`` (after closing the connection)."""
        if not self.has_baton:
            return
        self.has_baton = False
        with _batons_lock:
            entry = _batons.get(self._baton_path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _batons[self._baton_path]
                with contextlib.suppress(OSError):
                    os.close(entry[0])  # which drops the flock

    def close(self) -> None:
        self.drop_baton()

    def waiting(self, mine: Ticket | None = None) -> bool:
        """Whether any process (other than ``mine``) asked for the file.

        One ``listdir`` (microseconds); a request left by a dead waiter counts until the
        next waiter removes it, which costs the holder at most one needless hand-off."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return False
        return any(n != (mine.name if mine else None) for n in names)

    def ask(self) -> Ticket:
        """Join the queue."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        path = self._folder / name
        # locked before it enters the queue, so nobody takes it for a dead waiter's request
        staged = self._folder.parent / f".ask-{name}"
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(staged, path)
        except BaseException:
            os.close(fd)
            staged.unlink(missing_ok=True)
            raise
        return Ticket(path, fd)

    def my_turn(self, ticket: Ticket) -> bool:
        """Whether no live request older than ``ticket`` is waiting (stale ones are
        removed), or the line ahead has not moved for :data:`PATIENCE` seconds; updates
        ``ticket.ahead`` and ``ticket.moved_at``."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            names = []
        ahead = sum(1 for n in names if n < ticket.name and _alive(self._folder / n))
        now = time.monotonic()
        if ahead < ticket.ahead:
            ticket.moved_at = now
        ticket.ahead = ahead
        return ahead == 0 or now - ticket.moved_at >= PATIENCE

    def leave(self, ticket: Ticket) -> None:
        """Leave the queue (served, or given up): removed while still locked, so nobody
        mistakes it for a dead waiter's request."""
        with contextlib.suppress(OSError):
            ticket.path.unlink()
        with contextlib.suppress(OSError):
            os.close(ticket.fd)


def _alive(path: Path) -> bool:
    """Whether the request's waiter still holds it; a dead waiter's request is removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        # a dead waiter's: remove it while locked, unless it was replaced meanwhile
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        return False
    finally:
        os.close(fd)


class Busy(Exception):
    """Raised by the ``connect`` given to :func:`open_in_turn` when another process has the
    file; ``holder`` names it (``PID n, executable``)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def open_in_turn(
    queue: Queue,
    connect: Callable[[], T],
    lock_timeout: float,
    locked: Callable[[Busy], BaseException],
) -> tuple[T, float | None]:
    """Call ``connect`` once it is this process's turn; returns what it returned and how
    many seconds it waited in line (``None`` if it did not queue).

    ``connect`` raises :class:`Busy` while another process has the file; once the line
    ahead has not moved for ``lock_timeout`` seconds, ``locked(busy)`` is raised."""
    started = time.monotonic()
    deadline = started + lock_timeout
    delay = 0.002  # between looks at the queue and the baton (microseconds each)
    backoff = 0.005  # between connects while a program outside the queue has the file
    retry_at = 0.0
    ticket: Ticket | None = None
    try:
        while True:
            now = time.monotonic()
            if ticket is None and queue.waiting():
                ticket = _ask(queue)  # others wait already: in line behind them
            turn = ticket is None or queue.my_turn(ticket)
            if ticket is not None:  # a line that moves is waited out
                deadline = max(deadline, ticket.moved_at + lock_timeout)
            late = now >= deadline
            turn = turn or late
            if turn and now >= retry_at and not queue.take_baton() and not late:
                turn = False
                if ticket is None:
                    ticket = _ask(queue)  # the holder lets go after its current merge
            if turn and now >= retry_at:
                try:
                    return connect(), (None if ticket is None else time.monotonic() - started)
                except Busy as busy:
                    queue.drop_baton()
                    if late:
                        raise locked(busy) from busy.__cause__
                    if ticket is None:
                        ticket = _ask(queue)
                    # a holder outside the queue: each failed connect costs ~5 ms of CPU
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 0.1)
                except BaseException:
                    queue.drop_baton()
                    raise
            time.sleep(delay)
            # looking costs a flock per request ahead: the head looks most often
            delay = min(delay * 2, 0.01 if ticket is None or ticket.ahead == 0 else 0.02)
    finally:
        if ticket is not None:
            queue.leave(ticket)


def _ask(queue: Queue) -> Ticket | None:
    """Join the queue; ``None`` if it cannot be written (then just retry, as if no one
    else were waiting)."""
    try:
        return queue.ask()
    except OSError:
        return None
