"""The DuckDB store: the default, one file per notebook folder.

DuckDB pays about 1 ms of CPU per committed transaction, so committing each effect on its
own would cost more than most effects. Instead every write is appended, as one framed
record (length, CRC32, marshal payload), to a write-ahead journal owned by this process
(one ``os.write`` — durable against a crash of the process as soon as it returns), and a
background thread merges the journal into DuckDB in batches, storing the journal offset
in the same transaction. A journal left behind by a dead process (its ``flock`` is free)
is merged by the next process that opens the store; merging is idempotent.

DuckDB lets one process hold a database file at a time, so the connection is closed
whenever this process has been idle for ``idle_close`` seconds (after merging
everything), and handed over sooner when another process asks for it (``_handoff.py``:
the holder merges what it has, closes the file, and the oldest waiter gets it). A waiter
raises ``StoreLockedError`` naming the holder once the line ahead of it has not moved for
``lock_timeout`` seconds. ``fsync``: ``False`` (the journal is never synced: what is not
merged yet does not survive an OS crash), ``"group"`` (one ``fdatasync`` per batch of
concurrent writes, ``_syncer.py``) or ``True`` (one per write); see the guide's "What
survives what".

Deletions (``delete_effects``, ``delete_run``, ``prune_effects``) flush the journal and
commit directly. ``reset_run`` (continue-as-new) is one journal record, applied in one
transaction in journal order, so a crash leaves all of it or none.

Layout next to ``store.duckdb``: ``store.duckdb.d/journal/*.wal`` (journals),
``locks/`` (one ``flock`` file per executing run), ``claims/`` (one ``flock`` file per
claimed shared effect), ``inbox/`` (touched when a signal is sent, so a waiting process
polls a ``stat`` instead of the database), ``work`` (touched when a run may have become
claimable, for idle workers), ``deletions`` (touched before records are deleted, so other
processes drop their read caches) and ``key`` (the signing key for pickled payloads,
unless ``DURABLE_NB_KEY`` is set), ``queue/`` (requests for the file) and ``holder`` (the
``flock`` held with the file open).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from .._journal import SHARED_SCOPE, TOP_SCOPE_PREFIX, run_scope
from ..errors import (
    ArgumentError,
    RunLockedError,
    StoreError,
    StoreFormatError,
    StoreLockedError,
    StoreUnavailableError,
    StoreVersionError,
)
from . import _migrations, _rows
from ._base import RunQuery, StoreBase
from ._duckdb_schema import (
    BOOKKEEPING,
    EFFECT_TYPES,
    EVENT_TYPES,
    MIGRATIONS,
    RUN_TYPES,
    SCHEMA_VERSION,
    SIGNAL_TYPES,
)
from ._handoff import Busy, Queue, open_in_turn
from ._keyfilter import KeyFilter
from ._lockfiles import EffectClaims, file_token, lock_run, say_holder, touch, unlock
from ._protocol import CLAIMABLE_STATUSES, RunLease, run_scopes
from ._wal import (
    ROTATE_SIZE,
    Damage,
    Journal,
    Op,
    any_dead_journal,
    dead_journals,
    frame,
    keep_damaged,
    makes_work,
    read_frames,
    sync_dir,
)

if TYPE_CHECKING:
    from .._codecs import Payload
    from ._protocol import EffectKey, EffectRecord, EventRecord, RunRecord, SignalRecord

__all__ = ["SCHEMA_VERSION", "DuckDBStore"]

_VALUES_BATCH = 64  # rows per table up to which a merge avoids Arrow
_RECENT_MAX_RECORDS = 4096
_RECENT_MAX_BYTES = 64 * 1024
_WORK_POLL = 0.05  # seconds between looks at the ``work`` file while waiting for work
# seconds records wait in the journal before a process that does not hold the file opens it
# to merge them (while it holds it, it merges every ``merge_interval``): every open costs
# 10-60 ms of connecting and a hand-off, and appends never need the file
_REOPEN_AFTER = 1.0
# seconds a process keeps the file after opening it before handing it over: what it opened
# it for often takes several statements (a run's start reads its history, then writes)
_MIN_HOLD = 0.1
#: journal records merged in one transaction at most (a busy writer's backlog is merged in
#: several, with a chance to hand the file over between them)
_MERGE_CHUNK = 5000
#: read keys remembered with their last write (``_written``) past which merged ones are dropped
_WRITTEN_PRUNE = 8192
_LOCK_RE = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
# what a merge may meet on a full or failing disk: retried on a fresh connection
_IO_ERRORS = (duckdb.IOException, duckdb.TransactionException, duckdb.FatalException, OSError)
# what DuckDB says of a truncated or corrupted database file
_DAMAGED_RE = re.compile(r"Could not read enough bytes|[Cc]orrupt|checksum", re.IGNORECASE)
# the tables a merge writes, by journal record kind: (table, (column, type) pairs)
_TABLES = {
    "E": ("dn_effects", tuple(zip(_rows.EFFECT_COLUMNS, EFFECT_TYPES, strict=True))),
    "R": ("dn_runs", tuple(zip(_rows.RUN_COLUMNS, RUN_TYPES, strict=True))),
    "S": ("dn_signals", tuple(zip(_rows.SIGNAL_COLUMNS, SIGNAL_TYPES, strict=True))),
    "V": ("dn_events", tuple(zip(_rows.EVENT_COLUMNS, EVENT_TYPES, strict=True))),
}

# DuckDB scans an index only for a query whose one filter is on the indexed column (a filter
# on all five key columns scans the table: 7 ms at 1M effects, ~70 ms at 10M). A point
# lookup therefore selects by one indexed column in a materialized CTE and checks the rest
# of the key on the few rows it found: by input hash, or by scope for the records of a
# run's kv and stream scopes, whose input hash is empty.
_GET_BY_INPUT = (
    "WITH c AS MATERIALIZED (SELECT * FROM dn_effects WHERE input_hash = $4) "
    "SELECT * FROM c WHERE scope = $1 AND identity = $2 AND version = $3 AND occurrence = $5"
)
_GET_BY_SCOPE = (
    "WITH c AS MATERIALIZED (SELECT * FROM dn_effects WHERE scope = $1) SELECT * FROM c "
    "WHERE identity = $2 AND version = $3 AND input_hash = $4 AND occurrence = $5"
)


def _table_name(prefix: str, parts: tuple[object, ...]) -> str:
    import xxhash

    return f"dn_{prefix}_{xxhash.xxh3_128_hexdigest(repr(parts).encode())}"


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
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


def _synced_dir(folder: Path) -> bool:
    """Sync ``folder``'s entries; ``False`` if that failed (then keep what depends on it:
    an offset kept for a removed journal costs nothing)."""
    try:
        sync_dir(folder)
    except OSError:
        return False
    return True


def _in_scopes(scopes: set[str], key: EffectKey, rec: EffectRecord) -> bool:
    return key[0] in scopes


#: the read of every run record (``list_runs``, ``claim_run``), in ``_read_keys``' terms
_ALL_RUNS = ("runs", "")


def _read_keys(kind: str, row: tuple[Any, ...]) -> tuple[tuple[str, str], ...]:
    """The reads whose answer a journal record changes: ``("R", run id)`` (``get_run``),
    ``("E", scope)`` (``load_effects``), ``("S", run id)`` (``list_signals``), ``("V", run
    id)`` (``load_events``) and :data:`_ALL_RUNS`. A read merges first only if one of its
    keys has a record waiting to be merged."""
    if kind == "E":
        return (("E", row[0]),)
    if kind == "R":
        return (("R", row[0]), _ALL_RUNS)
    if kind in "SV":
        return ((kind, row[0]),)
    run_id = row[0][0]  # "X": a reset rewrites the run, forgets its steps, consumes signals
    return (("R", run_id), _ALL_RUNS, ("E", run_scope(run_id)), ("S", run_id))


class _Release:
    """A run lease let go by its holder, kept until the merge of this process's records up
    to ``position`` (what the next holder must read) commits; ``done`` is settled then, or
    once the merge fails (the holder need not wait for a failing disk)."""

    __slots__ = ("done", "fd", "position")

    def __init__(self, position: int, fd: int) -> None:
        self.position = position
        self.fd = fd
        self.done: Future[None] = Future()

    def settle(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class DuckDBStore(StoreBase):
    """A DuckDB file plus a per-process write-ahead journal. See the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str] = ".durable_nb/store.duckdb",
        *,
        key: bytes | None = None,
        lock_timeout: float = 10.0,
        idle_close: float = 0.5,
        merge_interval: float = 0.05,
        fsync: bool | str = False,
    ) -> None:
        from .._codecs import Signer

        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise ArgumentError(
                f"path must be a file path for the DuckDB store, got {path!r}; "
                "use MemoryStore() for an in-memory store"
            )
        for name, value in (
            ("lock_timeout", lock_timeout),
            ("idle_close", idle_close),
            ("merge_interval", merge_interval),
        ):
            if not isinstance(value, (int, float)) or value < 0:
                raise ArgumentError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not (isinstance(fsync, bool) or fsync == "group"):
            raise ArgumentError(
                f"fsync must be False (survives a crash of the process), True (an fdatasync "
                f'per write) or "group" (one fdatasync per batch of writes), got {fsync!r}'
            )
        self._path = Path(path).absolute()
        self._aux = self._path.with_name(self._path.name + ".d")
        self._lock_timeout = float(lock_timeout)
        self._idle_close = float(idle_close)
        self._merge_interval = float(merge_interval)
        self._fsync = fsync
        try:
            for sub in ("journal", "locks", "inbox", "claims", "queue"):
                (self._aux / sub).mkdir(parents=True, exist_ok=True)
            probe = self._aux / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreUnavailableError(
                f"cannot create or write the store directory {str(self._path.parent)!r}: {e}; "
                "choose a writable location with DURABLE_NB_STORE=/path/to/store.duckdb "
                "or `%durable store PATH`"
            ) from e
        self._signer = Signer(key if key is not None else self._load_key())

        self._dblock = threading.RLock()
        self._wlock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._queue = Queue(self._aux / "queue")  # processes waiting for the file
        self._db_depth = 0  # nested uses of the connection (under ``_dblock``)
        # seconds each open of the file waited for another process (for benchmarks)
        self._file_waits: deque[float] = deque(maxlen=100_000)
        self._opens = 0  # times this process opened the file (for benchmarks)
        self._opened_at = 0.0
        self._pending_since = 0.0  # when the oldest pending record was written
        self._pending: list[Op] = []
        self._unmerged: dict[EffectKey, tuple[EffectRecord, Op]] = {}
        # small records read or written lately: a rerun of a notebook cell replays from memory
        # (microseconds) instead of a DuckDB point query (about 0.5 ms)
        self._recent: OrderedDict[EffectKey, EffectRecord] = OrderedDict()
        self._last_activity = time.monotonic()
        self._closed = False
        self._run_locks: dict[str, int] = {}
        # positions count the bytes this process journaled (over every journal it rotated):
        # how far it appended and merged, its rotated journals' sizes, each read key's last
        # write (dropped once merged)
        self._appended = 0
        self._merged = 0
        self._rotated = 0
        self._written: dict[tuple[str, str], int] = {}
        self._releases: dict[str, _Release] = {}  # run id -> its lease, let go once merged
        self._merge_error: BaseException | None = None  # the last failed merge, until one works
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._file_fd: int | None = None  # holds that inode (see _pin)
        # scope -> the pending reset record that forgets it: until that record is merged,
        # DuckDB still holds the scope's old records, which reads must not return
        self._dropped: dict[str, Op] = {}
        self._cache_epoch = 0  # bumped whenever records leave ``_recent``
        self._deletions_token: object = None  # of the ``deletions`` file, when last checked
        # str, not Path: checked on every cache hit while the file is closed (0.8 us vs 3 us)
        self._deletions_file = str(self._aux / "deletions")
        self._work_file = str(self._aux / "work")
        self._filters: dict[str, KeyFilter] = {}
        self._filters_lock = threading.Lock()
        self._claims = EffectClaims(self._aux / "claims")
        self._work = threading.Condition(threading.Lock())
        self._work_seq = 0  # bumped when this process made work (queued, signalled, released)
        self._local = threading.local()  # per thread: the work token its last look saw

        with self._dblock:
            self._connect()  # validates the file, migrates, recovers dead journals
        self._journal = Journal(self._aux / "journal", fsync=self._fsync)

        self._wake = threading.Event()
        self._merger = threading.Thread(
            target=self._merge_loop, name=f"durable_nb-merge-{self._path.name}", daemon=True
        )
        self._merger.start()

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        return str(self._path)

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"DuckDBStore({str(self._path)!r})"

    # ------------------------------------------------------------------ key
    def _load_key(self) -> bytes:
        env = os.environ.get("DURABLE_NB_KEY")
        if env:
            return env.encode()
        kpath = self._aux / "key"
        try:
            return kpath.read_bytes()
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        # written whole under a private name, then linked into place: a process opening the
        # store at the same moment reads either no key file or the whole key, never an empty
        # one; of two processes creating it, the first link wins and the other reads it
        tmp = self._aux / f"key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            try:
                os.link(tmp, kpath)
            except FileExistsError:
                return kpath.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)
        return key

    # ------------------------------------------------------------------ connection
    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Open the database (caller holds ``_dblock``), waiting while another process has it."""
        if self._con is not None:
            return self._con
        self._check_same_file()
        con, waited = open_in_turn(
            self._queue, self._open_file, self._lock_timeout, self._locked_error
        )
        if waited is not None:
            self._file_waits.append(waited)
        self._opens += 1
        self._opened_at = time.monotonic()
        try:
            try:
                con.execute("SET wal_autocheckpoint_entries=1000")
            except duckdb.CatalogException:
                pass  # older DuckDB (1.1 has not this setting) checkpoints by WAL size only
            self._migrate(con)
            if self._file_id is None:
                self._file_id, self._file_fd = _pin(self._path)
        except BaseException as e:
            con.close()
            self._queue.drop_baton()
            if isinstance(e, duckdb.Error) and _DAMAGED_RE.search(str(e)):
                raise StoreFormatError(_damaged(self._path, str(e), opening=True)) from e
            raise
        self._con = con
        # each time we (re)open the file, merge what processes that died meanwhile left behind
        try:
            self._recover_journals()
        except BaseException:
            self._con = None
            con.close()
            self._queue.drop_baton()
            raise
        # while the file was closed, other processes may have deleted records we cache
        with self._wlock:
            self._validate_cache()
        return con

    def _open_file(self) -> duckdb.DuckDBPyConnection:
        """One attempt to open the file; :class:`Busy` if another process has it."""
        try:
            return duckdb.connect(str(self._path))
        except duckdb.IOException as e:
            msg = str(e)
            m = _LOCK_RE.search(msg)
            if m is not None:
                raise Busy(f"PID {m['pid']}, {m['exe']}") from e
            if "Trying to read a database file with version number" in msg:
                raise StoreVersionError(
                    f"the store {str(self._path)!r} was written by a newer DuckDB than "
                    f"the duckdb {duckdb.__version__} installed here, which cannot read "
                    "its file format; upgrade duckdb (pip install -U duckdb) to use it"
                ) from e
            if "not a valid DuckDB database file" in msg:
                raise StoreFormatError(
                    f"{str(self._path)!r} is not a DuckDB database (it may be damaged "
                    "or another kind of file); move it away or choose another store path"
                ) from e
            if _DAMAGED_RE.search(msg):
                raise StoreFormatError(_damaged(self._path, msg, opening=True)) from e
            raise StoreUnavailableError(f"cannot open the store {str(self._path)!r}: {msg}") from e
        except duckdb.Error as e:
            raise StoreFormatError(
                f"cannot open {str(self._path)!r} as a DuckDB database: {e}; "
                "move it away or choose another store path"
            ) from e

    def _locked_error(self, busy: Busy) -> StoreLockedError:
        return StoreLockedError(
            f"the store {str(self._path)!r} is in use by another process ({busy.holder}) "
            f"and stayed busy for {self._lock_timeout:g}s; wait until that kernel or script "
            "is idle, stop it, or use another store (DURABLE_NB_STORE)"
        )

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
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
                f"the DuckDB database {str(self._path)!r}",
                list(tables),
                "choose another store path",
            )
        _migrations.check_version(
            current, written_by, SCHEMA_VERSION, f"the store {str(self._path)!r}"
        )
        if current == SCHEMA_VERSION:
            return
        with _transaction(con):
            _migrations.migrate(con.execute, MIGRATIONS, current, BOOKKEEPING)

    def _close_connection(self) -> None:
        with self._dblock:
            if self._con is not None:
                con, self._con = self._con, None
                try:
                    con.close()  # checkpoints: reads and writes the file
                except duckdb.Error as e:
                    if _DAMAGED_RE.search(str(e)):
                        raise StoreFormatError(_damaged(self._path, str(e))) from e
                    raise StoreUnavailableError(
                        f"cannot checkpoint the store {str(self._path)!r}: {e}; what was "
                        "recorded is in its DuckDB WAL and merged when it is opened next"
                    ) from e
                finally:
                    self._queue.drop_baton()

    def _drop_connection(self) -> None:
        """Close the connection after a failed write, whatever state it is in."""
        with self._dblock:
            con, self._con = self._con, None
            if con is not None:
                try:
                    with contextlib.suppress(duckdb.Error):
                        con.close()
                finally:
                    self._queue.drop_baton()

    @contextlib.contextmanager
    def _db(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._using():
            self._check_open()
            self._check_same_file()
            self._last_activity = time.monotonic()
            try:
                yield self._connect()
            except duckdb.Error as e:
                if not _DAMAGED_RE.search(str(e)):
                    raise
                raise StoreFormatError(_damaged(self._path, str(e))) from e

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Hold ``_dblock``; leaving the outermost use, hand the file over if another
        process asked for it (``_handoff.py``)."""
        with self._dblock:
            self._db_depth += 1
            try:
                yield
            finally:
                self._db_depth -= 1
                if self._db_depth == 0:
                    self._hand_over_if_asked()

    def _hand_over_if_asked(self) -> None:
        """Merge what is pending and close the file if another process waits for it
        (caller holds ``_dblock``, outside any use of the connection)."""
        if (
            self._con is None
            or time.monotonic() - self._opened_at < _MIN_HOLD
            or not self._queue.waiting()
        ):
            return
        with contextlib.suppress(StoreError):
            self._merge_pending()  # what is not merged stays in the journal for next time
        self._close_connection()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {str(self._path)!r} is closed; open a new one")

    def _check_same_file(self) -> None:
        """Before reopening or merging: the file at the store's path must be the one this
        process opened first. If it was deleted (the store directory removed under a running
        kernel) or replaced, writing would recreate an empty store or write to an unlinked
        file: refused, loudly, instead."""
        if self._file_id is None or _file_id(self._path) == self._file_id:
            return
        raise StoreUnavailableError(
            f"the store file {str(self._path)!r} was deleted or replaced since this process "
            "opened it; nothing more is written to it. Records this process wrote meanwhile "
            f"are in its journal {str(self._journal.path)!r} if that still exists (merged "
            "into whichever store is opened at that path next). Open the store again: "
            "restart the kernel or use `%durable store PATH`"
        )

    # ------------------------------------------------------------------ journal
    def _append(
        self,
        ops: list[tuple[str, tuple[Any, ...]]],
        effects: Sequence[EffectRecord] = (),
        *,
        drops: str | None = None,
    ) -> None:
        """Write records to the journal in one ``os.write``; durable on return.

        ``effects`` (aligned with the first ops) stay readable from memory until merged.
        ``drops``: the scope the last op (a reset) forgets; reads stop seeing its records now.
        """
        ends: list[int] = []
        buf = frame(ops, ends)
        with self._wlock:
            self._check_open()
            end = self._journal.append(buf)
            position = self._journal.position
            start = end - len(buf)
            # each its own end: a merge in chunks may stop inside this write
            written = [Op(kind, row, start + e) for (kind, row), e in zip(ops, ends, strict=True)]
            self._appended = self._rotated + end
            for kind, row in ops:
                for read in _read_keys(kind, row):
                    self._written[read] = self._appended
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.extend(written)
            for rec, op in zip(effects, written, strict=False):
                self._unmerged[rec.key] = (rec, op)
                self._remember(rec)
            if drops is not None:
                for key in [k for k in self._unmerged if k[0] == drops]:
                    del self._unmerged[key]
                for key in [k for k in self._recent if k[0] == drops]:
                    del self._recent[key]
                self._cache_epoch += 1
                self._dropped[drops] = written[-1]
            self._last_activity = time.monotonic()
            if len(self._pending) >= 2000:
                self._wake.set()
        # fsync="group": on disk before returning, in one fdatasync with concurrent writes
        self._journal.wait_synced(position)
        if any(makes_work(kind, row) for kind, row in ops):
            self._notify_work()  # in-process waiters; other processes hear of it after the merge

    def _recover_journals(self) -> None:
        """Merge journals whose writer died (caller holds ``_dblock`` and a connection)."""
        con = self._connect()
        offsets = dict(con.execute("SELECT wal_id, merged_offset FROM dn_journal").fetchall())
        folder = self._aux / "journal"
        for wal_id, path in dead_journals(folder):
            damage: list[Damage] = []
            ops, end = read_frames(path, int(offsets.get(wal_id, 0)), damage)
            if ops:
                # committed (and fdatasynced by DuckDB) before the journal is removed
                dropped = self._apply([Op(k, r, end) for k, r in ops], wal_id, end)
                if dropped:
                    with self._wlock:
                        self._forget_recent(partial(_in_scopes, dropped))
                if any(makes_work(k, r) for k, r in ops):
                    self._announce_work()
            if damage:
                keep_damaged(path, damage, len(ops))  # renamed: its offset goes with the rest
            else:
                path.unlink()
        live = {p.stem for p in folder.glob("*.wal")}
        gone = [wal_id for wal_id in offsets if wal_id not in live]
        # a journal's offset is forgotten only once its removal is on disk: after a power loss
        # it must not come back without its offset and be merged again from the start
        if gone and _synced_dir(folder):
            for wal_id in gone:
                con.execute("DELETE FROM dn_journal WHERE wal_id = ?", [wal_id])

    def _apply(self, ops: list[Op], wal_id: str, end: int) -> set[str]:
        """Merge journal records into DuckDB in one transaction (caller holds ``_dblock``);
        returns the scopes that resets among them forgot.

        Records are applied in journal order. Between two resets, rows go in grouped by table
        (last write wins per key, which is what applying them one by one would leave): small
        groups as one multi-row VALUES statement (about 60 us a row, and no pyarrow import on
        the way to a run's end), large ones as an Arrow table (8-30 us a row).
        """
        con = self._connect()
        self._check_same_file()  # never merge into a file unlinked under us
        dropped: set[str] = set()
        if any(op.kind == "X" for op in ops):
            self._announce_deletion()
        with _transaction(con):
            batch: dict[str, dict[Any, tuple[Any, ...]]] = {"E": {}, "R": {}, "S": {}, "V": {}}
            for op in ops:
                if op.kind == "X":
                    self._insert_batch(con, batch)
                    batch = {"E": {}, "R": {}, "S": {}, "V": {}}
                    dropped.add(self._apply_reset(con, op.row[0], op.row[1]))
                elif op.kind == "E":
                    batch["E"][op.row[:5]] = op.row
                elif op.kind == "R":
                    batch["R"][op.row[0]] = op.row
                else:
                    batch[op.kind][op.row[:2]] = op.row
            self._insert_batch(con, batch)
            con.execute("INSERT OR REPLACE INTO dn_journal VALUES (?, ?)", [wal_id, end])
        return dropped

    @staticmethod
    def _insert_batch(
        con: duckdb.DuckDBPyConnection, batch: dict[str, dict[Any, tuple[Any, ...]]]
    ) -> None:
        for kind, (table, typed) in _TABLES.items():
            rows = list(batch[kind].values())
            if not rows:
                continue
            if len(rows) <= _VALUES_BATCH:
                row_sql = "(" + ", ".join(f"CAST(? AS {t})" for _, t in typed) + ")"
                con.execute(
                    f"INSERT OR REPLACE INTO {table} VALUES " + ", ".join([row_sql] * len(rows)),
                    [v for r in rows for v in r],
                )
                continue
            import pyarrow as pa

            arrow = pa.table({f"c{i}": [r[i] for r in rows] for i in range(len(typed))})
            con.register("dn_batch", arrow)
            try:
                con.execute(
                    f"INSERT OR REPLACE INTO {table} SELECT "
                    + ", ".join(f"CAST(c{i} AS {t})" for i, (_, t) in enumerate(typed))
                    + " FROM dn_batch"
                )
            finally:
                con.unregister("dn_batch")

    def _apply_reset(
        self, con: duckdb.DuckDBPyConnection, row: tuple[Any, ...], consumed: Sequence[str]
    ) -> str:
        """One ``reset_run`` inside the caller's transaction; returns the scope it forgot."""
        run_id: str = row[0]
        scope = run_scope(run_id)
        old = con.execute(
            "SELECT args_table, result_table, error_table FROM dn_runs WHERE run_id = ?",
            [run_id],
        ).fetchall()
        names = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM dn_effects WHERE scope = ? AND table_name IS NOT NULL",
                [scope],
            ).fetchall()
        ]
        con.execute("DELETE FROM dn_effects WHERE scope = ?", [scope])
        if consumed:
            con.execute(
                "DELETE FROM dn_signals WHERE run_id = ? AND list_contains(?, signal_id)",
                [run_id, list(consumed)],
            )
        self._insert_batch(con, {"E": {}, "R": {run_id: row}, "S": {}, "V": {}})
        keep = {row[i] for i in _rows.RUN_TABLE_COLUMNS}
        names += [n for n in (old[0] if old else ()) if n and n not in keep]
        for name in names:
            con.execute(f'DROP TABLE IF EXISTS "{name}"')
        return scope

    def _merge(self, upto: int | None = None) -> None:
        """Merge this process's journal records up to position ``upto`` (default: all written
        so far) now, after a merge in progress, in transactions of at most ``_MERGE_CHUNK``
        records: between two, a process waiting for the file gets it (``_using``), so a
        writer that records faster than one merge takes never holds the file for long."""
        with self._wlock:
            if upto is None:
                upto = self._appended  # later writes may wait
            if self._merged >= upto:
                return
        while True:
            with self._using():  # no merge is under way in another thread meanwhile
                with self._wlock:
                    if self._merged >= upto or not self._pending:
                        return
                self._merge_pending()

    def _caught_up(self, *reads: tuple[str, str]) -> None:
        """Before a read from DuckDB: merge what this process wrote that changes its answer
        (``_read_keys``), and nothing if nothing is pending for it (a new run's start reads
        three times: no commit, no wait for the merge thread's backlog)."""
        with self._wlock:
            upto = max(self._written.get(r, 0) for r in reads)
            if upto <= self._merged:
                return
        self._merge(upto)

    def _merge_pending(self) -> None:
        with self._dblock:
            with self._wlock:
                ops = self._pending[:_MERGE_CHUNK]
                del self._pending[:_MERGE_CHUNK]
            if not ops:
                return
            try:
                self._apply(ops, self._journal.wal_id, ops[-1].end)
            except BaseException as e:
                with self._wlock:
                    self._pending[:0] = ops
                if not isinstance(e, _IO_ERRORS):
                    raise
                # a full disk or an I/O error: the records stay in the journal and pending;
                # a fresh connection retries them (DuckDB rolls back what it did not commit)
                self._drop_connection()
                raise StoreUnavailableError(
                    f"cannot merge the journal {str(self._journal.path)!r} into the store "
                    f"{str(self._path)!r}: {e}; nothing recorded is lost (it is in the journal), "
                    "and the merge is retried in the background — free disk space or fix the "
                    "disk; no restart is needed"
                ) from e
            self._merge_error = None
            with self._wlock:
                self._merged = self._rotated + ops[-1].end
                due = [k for k, r in self._releases.items() if r.position <= self._merged]
                released = [self._releases.pop(k) for k in due]
                for r in released:
                    unlock(r.fd)
                work = False
                for op in ops:
                    if op.kind == "E":
                        entry = self._unmerged.get(op.row[:5])
                        if entry is not None and entry[1] is op:
                            del self._unmerged[op.row[:5]]
                        continue
                    if op.kind == "X":
                        scope = run_scope(op.row[0][0])
                        if self._dropped.get(scope) is op:
                            del self._dropped[scope]
                    work = work or makes_work(op.kind, op.row)
                if not self._pending:
                    self._written.clear()  # every write is merged
                    if self._journal.size > ROTATE_SIZE:
                        self._rotate_wal()
                elif len(self._written) > _WRITTEN_PRUNE:
                    self._written = {k: v for k, v in self._written.items() if v > self._merged}
            for r in released:
                r.settle()
            if released or work:
                self._announce_work()

    def _rotate_wal(self) -> None:
        """Start a fresh journal once the old one is fully merged (holds both locks)."""
        size = self._journal.size
        try:
            old_id = self._journal.rotate()
        except OSError:
            return  # no room for a new file: the old one goes on, and rotates next time
        self._rotated += size
        assert self._con is not None
        if _synced_dir(self._aux / "journal"):  # see _recover_journals
            self._con.execute("DELETE FROM dn_journal WHERE wal_id = ?", [old_id])

    def _merge_loop(self) -> None:
        backoff = 0.0  # after a failed merge: wait longer, up to a second, before retrying
        while not self._closed:
            self._wake.wait(max(self._merge_interval, backoff))
            self._wake.clear()
            if self._closed:
                break
            try:
                if self._pending and (
                    self._con is not None
                    or self._releases  # a run's next holder waits for its records
                    or time.monotonic() - self._pending_since >= _REOPEN_AFTER
                    or len(self._pending) >= 2000
                ):
                    self._merge()
                elif self._con is not None and self._queue.waiting():
                    with self._using():
                        pass  # leaving hands the file over
                elif (
                    self._con is not None
                    and time.monotonic() - self._last_activity > self._idle_close
                ):
                    with self._dblock:
                        if not self._pending and (
                            time.monotonic() - self._last_activity > self._idle_close
                        ):
                            self._close_connection()
            except StoreLockedError:
                self._settle_releases()
                continue  # another process holds the file; the journal keeps our records
            except Exception as e:  # a full disk, an I/O error: the records wait in the journal
                self._merge_error = e
                self._settle_releases()
                backoff = min(max(backoff * 2, self._merge_interval, 0.01), 1.0)
                continue
            backoff = 0.0

    def _settle_releases(self) -> None:
        """A merge failed: whoever waits for a lease to be let go stops waiting (as a failed
        ``release()`` returns); the leases are let go after the next merge that works."""
        with self._wlock:
            waiting = list(self._releases.values())
        for r in waiting:
            r.settle()

    # ------------------------------------------------------------------ tables
    def _write_table(self, name: str, table: object) -> None:
        if self._dropped:
            # a pending reset drops its run's tables when merged; merge it before writing a
            # table that may carry the same name, or the reset would drop the new one
            self.flush()
        with self._db() as con:
            con.register("dn_value", table)
            try:
                con.execute(f'CREATE OR REPLACE TABLE "{name}" AS SELECT * FROM dn_value')
            except (duckdb.IOException, duckdb.TransactionException) as e:
                self._drop_connection()
                raise StoreUnavailableError(
                    f"cannot write a table to the store {str(self._path)!r}: {e}; nothing of "
                    "this write was recorded — free disk space or fix the disk, then call again"
                ) from e
            finally:
                with contextlib.suppress(duckdb.Error):
                    con.unregister("dn_value")

    def _read_payload(self, codec: Any, data: Any, table_name: Any) -> Payload | None:
        from .._codecs import Payload

        if codec is None:
            return None
        table = None
        if table_name:
            with self._db() as con:
                table = con.sql(f'SELECT * FROM "{table_name}"').to_arrow_table()
        return Payload(codec, bytes(data) if data is not None else b"", table)

    # ------------------------------------------------------------------ read cache
    def _remember(self, rec: EffectRecord) -> None:
        """Keep a small record in the read cache (caller holds ``_wlock``)."""
        if rec.payload.table is None and len(rec.payload.data) <= _RECENT_MAX_BYTES:
            self._recent[rec.key] = rec
            self._recent.move_to_end(rec.key)
            if len(self._recent) > _RECENT_MAX_RECORDS:
                self._recent.popitem(last=False)

    def _forget_recent(self, matches: Callable[[EffectKey, EffectRecord], bool]) -> None:
        """Drop merged records from the read cache (caller holds ``_wlock``).

        Records still in ``_unmerged`` stay: they were written after the deletion's flush
        and are merged after it, so DuckDB will hold them too.
        """
        for key in [
            k for k, r in self._recent.items() if k not in self._unmerged and matches(k, r)
        ]:
            del self._recent[key]
        self._cache_epoch += 1

    def _validate_cache(self) -> None:
        """Empty the read cache if another process deleted records (caller holds ``_wlock``)."""
        token = file_token(self._deletions_file)
        if token != self._deletions_token:
            self._forget_recent(lambda k, r: True)
            self._deletions_token = token

    def _announce_deletion(self) -> None:
        """Before committing a deletion (caller holds ``_dblock``): tell other processes to
        drop their read caches. Touching before the commit errs on the safe side: a crash in
        between costs them a cache, never a stale read."""
        with self._wlock:
            self._validate_cache()
            touch(self._deletions_file)
            self._deletions_token = file_token(self._deletions_file)

    def _delete_effects_where(
        self, where: str, params: list[Any], matches: Callable[[EffectKey, EffectRecord], bool]
    ) -> int:
        with self._db() as con:  # holding the connection, no merge can slip in between
            self.flush()
            # nothing to delete (a gc that prunes nothing): no write transaction, and other
            # processes keep their read caches
            if not con.execute(
                f"SELECT 1 FROM dn_effects WHERE {where} LIMIT 1", params
            ).fetchall():
                return 0
            names = [
                r[0]
                for r in con.execute(
                    f"SELECT table_name FROM dn_effects WHERE {where} AND table_name IS NOT NULL",
                    params,
                ).fetchall()
            ]
            self._announce_deletion()
            with _transaction(con):
                row = con.execute(f"SELECT count(*) FROM dn_effects WHERE {where}", params)
                count = int(row.fetchall()[0][0])
                con.execute(f"DELETE FROM dn_effects WHERE {where}", params)
                for name in names:
                    con.execute(f'DROP TABLE IF EXISTS "{name}"')
            with self._wlock:
                self._forget_recent(matches)
        return count

    # ------------------------------------------------------------------ effects
    # the key filters of notebook and shared scopes (``_keyfilter.py``): a miss there is
    # answered without a query
    def _key_filter(self, scope: str) -> KeyFilter | None:
        if not (scope.startswith(TOP_SCOPE_PREFIX) or scope == SHARED_SCOPE):
            return None
        f = self._filters.get(scope)
        if f is None:
            with self._filters_lock:
                f = self._filters.get(scope)
                if f is None:
                    try:
                        f = KeyFilter(self._aux / "keys", scope, fsync=bool(self._fsync))
                    except OSError as e:
                        raise StoreUnavailableError(
                            f"cannot write the key filter of the store {str(self._path)!r} "
                            f"({e}); free some disk space or check the permissions of "
                            f"{str(self._aux)!r}"
                        ) from e
                    self._filters[scope] = f
        return f

    def _filter_absent(self, key: EffectKey) -> bool:
        """Whether the scope's key filter says the key is certainly not recorded; completes
        the filter first if this store has records it has never seen (an older store)."""
        f = self._key_filter(key[0])
        if f is None:
            return False
        if not f.complete:
            with self._db() as con:
                cur = con.execute(
                    "SELECT identity, version, input_hash, occurrence FROM dn_effects "
                    "WHERE scope = ?",
                    [key[0]],
                )
                while rows := cur.fetchmany(10_000):
                    f.add((r[0], r[1], r[2], r[3]) for r in rows)
            f.mark_complete()
        return f.absent(key[1:])

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        by_scope: dict[str, list[tuple[str, str, str, int]]] = {}
        for rec in records:
            scope = rec.scope
            if scope.startswith(TOP_SCOPE_PREFIX) or scope == SHARED_SCOPE:  # filtered scopes
                key = (rec.identity, rec.version, rec.input_hash, rec.occurrence)
                by_scope.setdefault(scope, []).append(key)
        for scope, keys in by_scope.items():
            f = self._key_filter(scope)
            if f is not None:  # before the journal: a record that exists has its slots
                try:
                    f.add(keys)
                except OSError as e:
                    raise StoreUnavailableError(
                        f"cannot write the key filter of the store {str(self._path)!r} ({e}); "
                        "free some disk space; nothing was recorded"
                    ) from e
        ops: list[tuple[str, tuple[Any, ...]]] = []
        for rec in records:
            name = None
            if rec.payload.table is not None:
                name = _table_name("e", rec.key)
                self._write_table(name, rec.payload.table)
            ops.append(("E", _rows.effect_row(rec, name)))
        self._append(ops, records)

    def get_effect(self, key: EffectKey) -> EffectRecord | None:
        with self._wlock:
            if self._con is None:  # another process may have had the file meanwhile
                self._validate_cache()
            rec = self._recent.get(key)
            if rec is None and (entry := self._unmerged.get(key)) is not None:
                rec = entry[0]
            if rec is not None:
                return rec
            if key[0] in self._dropped:
                return None  # a reset forgot the scope; what DuckDB still has is stale
            epoch = self._cache_epoch
        try:
            if self._filter_absent(key):
                return None
        except StoreUnavailableError:
            pass  # no filter: the query answers
        with self._db() as con:
            row = con.execute(_GET_BY_INPUT if key[3] else _GET_BY_SCOPE, list(key)).fetchall()
        if not row:
            return None
        rec = _rows.effect_from_row(row[0], self._read_payload)
        with self._wlock:
            # unless a write or a deletion of the key came in meanwhile
            if epoch == self._cache_epoch and key not in self._recent and key not in self._unmerged:
                self._remember(rec)
        return rec

    def get_effects(self, keys: Sequence[EffectKey]) -> list[EffectRecord | None]:
        """The records of many keys (a map's items): one query for the keys the read cache
        leaves open, not one each (nor a key filter look-up each: the query answers a miss
        as fast)."""
        out: list[EffectRecord | None] = [None] * len(keys)
        open_: dict[EffectKey, int] = {}
        with self._wlock:
            if self._con is None:
                self._validate_cache()
            for n, key in enumerate(keys):
                rec = self._recent.get(key)
                if rec is None and (entry := self._unmerged.get(key)) is not None:
                    rec = entry[0]
                if rec is not None:
                    out[n] = rec
                elif key[0] not in self._dropped:
                    open_[key] = n
        groups: dict[tuple[str, str, str], list[str]] = {}
        for k in open_:  # a map's keys share scope, identity and version
            groups.setdefault(k[:3], []).append(k[3])
        for head, hashes in groups.items():
            with self._db() as con:  # one semi-join per group, the hashes as one list
                rows = con.execute(
                    "SELECT * FROM dn_effects WHERE scope = ? AND identity = ? AND version = ? "
                    "AND input_hash IN (SELECT unnest(?::VARCHAR[]))",
                    [*head, sorted(set(hashes))],
                ).fetchall()
            for row in rows:
                rec = _rows.effect_from_row(row, self._read_payload)
                if rec.key in open_:
                    out[open_[rec.key]] = rec
        return out

    def load_effects(self, scope: str) -> list[EffectRecord]:
        self._caught_up(("E", scope))
        with self._db() as con:
            rows = con.execute(
                "SELECT * FROM dn_effects WHERE scope = ? ORDER BY seq, started_at", [scope]
            ).fetchall()
        return [_rows.effect_from_row(r, self._read_payload) for r in rows]

    def _effect_scopes(self, prefix: str) -> list[str]:
        self.flush()
        with self._db() as con:
            rows = con.execute(
                "SELECT DISTINCT scope FROM dn_effects WHERE starts_with(scope, ?) ORDER BY scope",
                [prefix],
            ).fetchall()
        return sorted(str(r[0]) for r in rows)

    def delete_effects(self, scope: str) -> int:
        return self._delete_effects_where("scope = ?", [scope], lambda k, r: k[0] == scope)

    def _prune_effects(self, scope_prefix: str, older_than: float) -> int:
        return self._delete_effects_where(
            "starts_with(scope, ?) AND started_at < ?",
            [scope_prefix, older_than],
            lambda k, r: k[0].startswith(scope_prefix) and r.started_at < older_than,
        )

    # ------------------------------------------------------------------ effect claims
    def _claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        """A claim is a ``flock`` on a file per key (``_lockfiles.EffectClaims``)."""
        self._check_open()
        return self._claims.claim(key, owner, seconds)

    def release_effect(self, key: EffectKey, owner: str) -> None:
        self._claims.release(key, owner)

    # ------------------------------------------------------------------ runs
    def _run_row(self, run: RunRecord) -> tuple[Any, ...]:
        """The journal row of a run; stores its table payloads first."""
        names: list[str | None] = []
        for part in _rows.RUN_PAYLOADS:
            p: Payload | None = getattr(run, part)
            name = None
            if p is not None and p.table is not None:
                # per generation: a reset writes new tables without touching the ones the
                # old record (still current until the reset is merged) points to
                name = _table_name("r", (run.run_id, part, run.generation))
                self._write_table(name, p.table)
            names.append(name)
        return _rows.run_row(run, names)

    def put_run(self, run: RunRecord) -> None:
        self._append([("R", self._run_row(run))])

    def get_run(self, run_id: str) -> RunRecord | None:
        self._caught_up(("R", run_id))
        with self._db() as con:
            row = con.execute("SELECT * FROM dn_runs WHERE run_id = ?", [run_id]).fetchall()
        return _rows.run_from_row(row[0], self._read_payload) if row else None

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        clause, params = query.sql("?")
        self._caught_up(_ALL_RUNS)
        with self._db() as con:
            rows = con.execute("SELECT * FROM dn_runs" + clause, params).fetchall()
        return [_rows.run_from_row(r, self._read_payload) for r in rows]

    def delete_run(self, run_id: str) -> bool:
        scopes = list(run_scopes(run_id))
        with self._db() as con:  # holding the connection, no merge can slip in between
            self.flush()
            row = con.execute(
                "SELECT result_table, args_table, error_table FROM dn_runs WHERE run_id = ?",
                [run_id],
            ).fetchall()
            names = [n for n in (row[0] if row else ()) if n]
            names += [
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM dn_effects "
                    "WHERE list_contains(?, scope) AND table_name IS NOT NULL",
                    [scopes],
                ).fetchall()
            ]
            self._announce_deletion()
            with _transaction(con):
                con.execute("DELETE FROM dn_runs WHERE run_id = ?", [run_id])
                con.execute("DELETE FROM dn_signals WHERE run_id = ?", [run_id])
                con.execute("DELETE FROM dn_events WHERE run_id = ?", [run_id])
                con.execute("DELETE FROM dn_effects WHERE list_contains(?, scope)", [scopes])
                for name in names:
                    con.execute(f'DROP TABLE IF EXISTS "{name}"')
            with self._wlock:
                self._forget_recent(lambda k, r: k[0] in scopes)
        return bool(row)

    def _reset_run(self, run: RunRecord, consumed_signals: tuple[str, ...]) -> None:
        row = self._run_row(run)
        # one journal record, merged in one transaction: after a crash all of it or none
        self._append([("X", (row, consumed_signals))], drops=run_scope(run.run_id))

    def acquire_run(self, run_id: str, owner: str) -> RunLease:
        self._check_open()
        with self._wlock:  # let go by a run of this process, not merged yet: still ours
            kept = self._releases.pop(run_id, None)
        if kept is not None:
            kept.settle()
            fd = kept.fd
        else:
            fd = lock_run(self._aux / "locks", run_id, owner)
            try:
                # a previous holder that died may have left records in its journal: merge
                # them before this process reads the run's history (a live one merged its
                # records before it let go)
                if any_dead_journal(self._aux / "journal"):
                    with self._using():
                        self._check_open()
                        if self._con is None:
                            self._connect()  # opening recovers dead journals already
                        else:
                            self._recover_journals()
            except BaseException:
                os.close(fd)
                raise
        say_holder(fd, owner)
        self._run_locks[run_id] = fd

        def release() -> None:  # on the caller's thread: merges what the next holder reads
            later = let_go()
            if later is not None:
                with contextlib.suppress(StoreError):  # the merge thread lets go after its
                    self._merge(later[1])  # next merge that works

        def let_go() -> tuple[Future[None], int] | None:
            with self._wlock:
                if self._run_locks.get(run_id) == fd:
                    del self._run_locks[run_id]
                # the next holder reads the run from DuckDB: it is let go once what this
                # process wrote so far is merged (by whichever thread merges it)
                position = self._appended
                if not self._closed and self._merged < position:
                    self._releases[run_id] = rel = _Release(position, fd)
                    self._wake.set()
                    return rel.done, position
            unlock(fd)  # everything merged (or close() merged, or failed to, already)
            self._announce_work()
            return None

        def release_later() -> Future[None] | None:
            later = let_go()
            return None if later is None else later[0]

        return RunLease(run_id, owner, release, _release_later=release_later)

    def _claim_run(self, owner: str, wanted: list[str]) -> tuple[RunRecord, RunLease] | None:
        # what wait_for_work compares with: work that arrives after this look wakes it
        self._local.work_token = self._work_token()
        if not wanted:
            return None
        self._caught_up(_ALL_RUNS)
        with self._db() as con:
            ids = [
                r[0]
                for r in con.execute(
                    "SELECT run_id FROM dn_runs "
                    "WHERE list_contains(?, workflow) AND list_contains(?, status) "
                    "ORDER BY created_at, run_id",
                    [wanted, list(CLAIMABLE_STATUSES)],
                ).fetchall()
            ]
        for run_id in ids:
            if run_id in self._run_locks:
                continue  # this process executes it
            try:
                lease = self.acquire_run(run_id, owner)
            except RunLockedError:
                continue
            # the holder we just missed may have finished (or forgotten) it before letting go
            run = self.get_run(run_id)
            if run is None or run.status not in CLAIMABLE_STATUSES or run.workflow not in wanted:
                lease.release()
                continue
            return run, lease
        return None

    # ------------------------------------------------------------------ waiting for work
    def _work_token(self) -> tuple[int, object]:
        with self._work:
            return (self._work_seq, file_token(self._work_file))

    def _notify_work(self) -> None:
        with self._work:
            self._work_seq += 1
            self._work.notify_all()

    def _announce_work(self) -> None:
        """A run may have become claimable: wake waiters here and in other processes."""
        with contextlib.suppress(OSError):
            touch(self._work_file)
        self._notify_work()

    def wait_for_work(self, timeout: float) -> None:
        """Waits on this process's own wake-ups and looks at the ``work`` file (touched by
        every process after it merged a queued run or a signal, or let go of a lease) every
        50 ms, so an idle worker does not hold the database file. A holder that dies lets go
        of its lease silently: its run is noticed at the next ``claim_run``."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ArgumentError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self._check_open()
        deadline = time.monotonic() + timeout
        seen = getattr(self._local, "work_token", None)
        with self._work:
            while True:
                token = (self._work_seq, file_token(self._work_file))
                if seen is None:
                    seen = token
                elif token != seen:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._work.wait(min(remaining, _WORK_POLL))
        self._local.work_token = token

    # ------------------------------------------------------------------ signals, events
    def _inbox_path(self, run_id: str) -> Path:
        import xxhash

        return self._aux / "inbox" / xxhash.xxh3_128_hexdigest(run_id.encode())

    def add_signal(self, signal: SignalRecord) -> None:
        self._append([("S", _rows.signal_row(signal))])
        # merged before the inbox is touched, so a waiting process that sees the touch and
        # opens the file also sees the signal; the journal write above already made it durable
        try:
            self.flush()
        except StoreLockedError:
            pass  # merged by the background thread as soon as the file is free
        finally:
            with open(self._inbox_path(signal.run_id), "ab") as f:
                f.write(b".")

    def list_signals(self, run_id: str) -> list[SignalRecord]:
        self._caught_up(("S", run_id))
        with self._db() as con:
            rows = con.execute(
                "SELECT * FROM dn_signals WHERE run_id = ? ORDER BY sent_at, signal_id", [run_id]
            ).fetchall()
        return [_rows.signal_from_row(r) for r in rows]

    def inbox_token(self, run_id: str) -> object:
        try:
            st = os.stat(self._inbox_path(run_id))
        except FileNotFoundError:
            return None
        return (st.st_size, st.st_mtime_ns)

    def append_events(self, events: Sequence[EventRecord]) -> None:
        self._append([("V", _rows.event_row(e)) for e in events])

    def load_events(self, run_id: str) -> list[EventRecord]:
        self._caught_up(("V", run_id))
        with self._db() as con:
            rows = con.execute(
                "SELECT * FROM dn_events WHERE run_id = ? ORDER BY ts, event_id", [run_id]
            ).fetchall()
        return [_rows.event_from_row(r) for r in rows]

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        """Return once every record written before the call is merged into DuckDB (one
        that the merge thread is merging right now included)."""
        self._check_open()
        self._merge()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._merge()
        finally:
            self._closed = True
            self._wake.set()
            self._notify_work()  # waiters return
            if self._merger.is_alive() and self._merger is not threading.current_thread():
                self._merger.join(timeout=5)
            try:
                self._close_connection()
            finally:
                if self._file_fd is not None:
                    os.close(self._file_fd)
                    self._file_fd = None
            with self._wlock:
                self._journal.close(merged=not self._pending)
                releases = list(self._releases.values())
                self._releases.clear()
            for fd in [*self._run_locks.values(), *(r.fd for r in releases)]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._run_locks.clear()
            for r in releases:
                r.settle()
            with self._filters_lock:
                for f in self._filters.values():
                    f.close()
                self._filters.clear()
            self._claims.close()
            self._queue.close()
