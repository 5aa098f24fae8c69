"""How a process opens, holds and hands over the DuckDB store's file.

DuckDB lets one process hold a database file at a time. :class:`DuckFile` opens it when a
merge or a read needs it, waiting in line behind other processes (``_handoff.py``); checks
and migrates its schema; pins the file's identity, so a store directory removed or a file
replaced under a running process is refused instead of recreated empty; and closes it when
another process asks for it (after its owner merged what it has pending: ``hand_over``) or
when its owner found it idle. ``lock`` guards the connection: every use of it holds the
lock, and leaving the outermost use hands the file over if someone asked.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from ..errors import (
    StoreError,
    StoreFormatError,
    StoreLockedError,
    StoreUnavailableError,
    StoreVersionError,
)
from . import _migrations
from ._duckdb_schema import BOOKKEEPING, MIGRATIONS, SCHEMA_VERSION
from ._handoff import Busy, Queue, open_in_turn
from ._wal import Journal

__all__ = ["DuckFile", "transaction"]

# seconds a process keeps the file after opening it before handing it over: what it opened
# it for often takes several statements (a run's start reads its history, then writes)
_MIN_HOLD = 0.1
_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
# what DuckDB says of a truncated or corrupted database file
_DAMAGED_RE = re.compile(r"Could not read enough bytes|[Cc]orrupt|checksum", re.IGNORECASE)

Connection = duckdb.DuckDBPyConnection


@contextlib.contextmanager
def transaction(con: Connection) -> Iterator[None]:
    """Commit what the block executes, or roll it all back if the block raises."""
    con.execute("BEGIN")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _pin(path: Path) -> tuple[tuple[int, int], int | None]:
    """The identity (device, inode) of the file at ``path`` and, on Linux, an ``O_PATH``
    descriptor that keeps its inode from being freed, so the number cannot be reused by a
    file put in its place while the store is closed. ``O_PATH``: closing it releases none of
    the POSIX locks DuckDB holds on the file (an ordinary descriptor's close would)."""
    flag = getattr(os, "O_PATH", None)
    if flag is None:
        st = os.stat(path)
        return (st.st_dev, st.st_ino), None
    fd = os.open(path, flag | os.O_CLOEXEC)
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino), fd


def _damaged(path: Path, msg: str, *, opening: bool = False) -> str:
    return (
        f"the store file {str(path)!r} is damaged or truncated ({msg})"
        + ("; it was not changed. " if opening else ". ")
        + "Restore it from a backup, or move it away (with its .wal file) to start a new store "
        f"at that path — the journals in {str(path) + '.d/journal'!r} are merged into it"
    )


class DuckFile:
    """This process's hold on the DuckDB file at ``path``; see the module docstring.

    ``on_open(con)`` runs each time the file is opened, before anyone uses it (the store
    merges what dead processes left and checks its read cache); ``hand_over()`` before the
    file is handed to a process that asked for it (the store merges a chunk of its journal).
    """

    def __init__(
        self,
        path: Path,
        queue: Path,
        lock_timeout: float,
        *,
        on_open: Callable[[Connection], None],
        hand_over: Callable[[], None],
    ) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.con: Connection | None = None
        self.queue = Queue(queue)  # processes waiting for the file
        #: this process's journal, named when the file turns out replaced (set by the store)
        self.journal: Journal | None = None
        self.used_at = time.monotonic()  # the last use of the file or write to the journal
        # seconds each open of the file waited for another process (for benchmarks)
        self.waits: deque[float] = deque(maxlen=100_000)
        self.opens = 0  # times this process opened the file (for benchmarks)
        self._lock_timeout = lock_timeout
        self._on_open = on_open
        self._hand_over = hand_over
        self._depth = 0  # nested uses of the connection (under ``lock``)
        self._opened_at = 0.0
        self._id: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._pin_fd: int | None = None  # holds that inode (see _pin)

    def connect(self) -> Connection:
        """Open the database (caller holds ``lock``), waiting while another process has it."""
        if self.con is not None:
            return self.con
        self.check_same_file()
        con, waited = open_in_turn(self.queue, self._open, self._lock_timeout, self._locked)
        if waited is not None:
            self.waits.append(waited)
        self.opens += 1
        self._opened_at = time.monotonic()
        try:
            try:
                con.execute("SET wal_autocheckpoint_entries=1000")
            except duckdb.CatalogException:
                pass  # older DuckDB (1.1 has not this setting) checkpoints by WAL size only
            self._migrate(con)
            if self._id is None:
                self._id, self._pin_fd = _pin(self.path)
        except BaseException as e:
            con.close()
            self.queue.drop_baton()
            if isinstance(e, duckdb.Error) and _DAMAGED_RE.search(str(e)):
                raise StoreFormatError(_damaged(self.path, str(e), opening=True)) from e
            raise
        self.con = con
        try:
            self._on_open(con)
        except BaseException:
            self.con = None
            con.close()
            self.queue.drop_baton()
            raise
        return con

    def _open(self) -> Connection:
        """One attempt to open the file; :class:`Busy` if another process has it."""
        try:
            return duckdb.connect(str(self.path))
        except duckdb.IOException as e:
            msg = str(e)
            m = _LOCK_RE.search(msg)
            if m is not None:
                raise Busy(f"PID {m['pid']}, {m['exe']}") from e
            if "Trying to read a database file with version number" in msg:
                raise StoreVersionError(
                    f"the store {str(self.path)!r} was written by a newer DuckDB than "
                    f"the duckdb {duckdb.__version__} installed here, which cannot read "
                    "its file format; upgrade duckdb (pip install -U duckdb) to use it"
                ) from e
            if "not a valid DuckDB database file" in msg:
                raise StoreFormatError(
                    f"{str(self.path)!r} is not a DuckDB database (it may be damaged "
                    "or another kind of file); move it away or choose another store path"
                ) from e
            if _DAMAGED_RE.search(msg):
                raise StoreFormatError(_damaged(self.path, msg, opening=True)) from e
            raise StoreUnavailableError(f"cannot open the store {str(self.path)!r}: {msg}") from e
        except duckdb.Error as e:
            raise StoreFormatError(
                f"cannot open {str(self.path)!r} as a DuckDB database: {e}; "
                "move it away or choose another store path"
            ) from e

    def _locked(self, busy: Busy) -> StoreLockedError:
        return StoreLockedError(
            f"the store {str(self.path)!r} is in use by another process ({busy.holder}) "
            f"and stayed busy for {self._lock_timeout:g}s; wait until that kernel or script "
            "is idle, stop it, or use another store (DURABLE_NB_STORE)"
        )

    def _migrate(self, con: Connection) -> None:
        tables = {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        }
        current, written_by = 0, "?"
        if "dn_meta" in tables:
            meta = dict(con.execute("SELECT key, value FROM dn_meta").fetchall())
            current, written_by = int(meta.get("schema_version", 0)), meta.get("written_by", "?")
        elif tables:
            raise _migrations.not_a_store(
                f"the DuckDB database {str(self.path)!r}",
                list(tables),
                "choose another store path",
            )
        _migrations.check_version(
            current, written_by, SCHEMA_VERSION, f"the store {str(self.path)!r}"
        )
        if current == SCHEMA_VERSION:
            return
        with transaction(con):
            _migrations.migrate(con.execute, MIGRATIONS, current, BOOKKEEPING)

    def close(self) -> None:
        """Close the connection (DuckDB checkpoints) and let go of the baton."""
        with self.lock:
            if self.con is not None:
                con, self.con = self.con, None
                try:
                    con.close()  # checkpoints: reads and writes the file
                except duckdb.Error as e:
                    if _DAMAGED_RE.search(str(e)):
                        raise StoreFormatError(_damaged(self.path, str(e))) from e
                    raise StoreUnavailableError(
                        f"cannot checkpoint the store {str(self.path)!r}: {e}; what was "
                        "recorded is in its DuckDB WAL and merged when it is opened next"
                    ) from e
                finally:
                    self.queue.drop_baton()

    def drop(self) -> None:
        """Close the connection after a failed write, whatever state it is in."""
        with self.lock:
            con, self.con = self.con, None
            if con is not None:
                try:
                    with contextlib.suppress(duckdb.Error):
                        con.close()
                finally:
                    self.queue.drop_baton()

    def shut(self) -> None:
        """For good (the store closes): the connection, the pin, the baton."""
        try:
            self.close()
        finally:
            if self._pin_fd is not None:
                os.close(self._pin_fd)
                self._pin_fd = None
            self.queue.close()

    @contextlib.contextmanager
    def db(self) -> Iterator[Connection]:
        """The connection, opened if need be, for the block's statements."""
        with self.using():
            self.check_same_file()
            self.used_at = time.monotonic()
            try:
                yield self.connect()
            except duckdb.Error as e:
                if not _DAMAGED_RE.search(str(e)):
                    raise
                raise StoreFormatError(_damaged(self.path, str(e))) from e

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold ``lock``; leaving the outermost use, hand the file over if another process
        asked for it (``_handoff.py``)."""
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._hand_over_if_asked()

    def _hand_over_if_asked(self) -> None:
        """Merge what is pending and close the file if another process waits for it
        (caller holds ``lock``, outside any use of the connection)."""
        if (
            self.con is None
            or time.monotonic() - self._opened_at < _MIN_HOLD
            or not self.queue.waiting()
        ):
            return
        with contextlib.suppress(StoreError):
            self._hand_over()  # what is not merged stays in the journal for next time
        self.close()

    def check_same_file(self) -> None:
        """Before reopening or merging: the file at the store's path must be the one this
        process opened first. If it was deleted (the store directory removed under a running
        kernel) or replaced, writing would recreate an empty store or write to an unlinked
        file: refused, loudly, instead."""
        if self._id is None or _file_id(self.path) == self._id:
            return
        raise StoreUnavailableError(
            f"the store file {str(self.path)!r} was deleted or replaced since this process "
            "opened it; nothing more is written to it. Records this process wrote meanwhile "
            f"are in its journal {str(self.journal and self.journal.path)!r} if that still exists (merged "
            "into whichever store is opened at that path next). Open the store again: "
            "restart the kernel or use `%durable store PATH`"
        )
