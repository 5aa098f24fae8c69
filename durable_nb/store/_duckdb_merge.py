"""How a process's journal records get into the DuckDB file, and what waits for them.

Every write of the DuckDB store is a journal record first (``_wal.py``); :class:`Merger`
keeps those not merged yet (``pending``) and merges them into the file in a thread of its
own: every ``merge_interval`` while the file is open; when it is closed, once records have
waited ``_REOPEN_AFTER`` seconds or 2,000 of them pile up; at once when a run's lease waits
for them. A merge is one transaction of at most :data:`MERGE_CHUNK` records that also
stores the journal offset after its last record (a process that takes over a dead one's
journal resumes there); between two, a process waiting for the file gets it
(``DuckFile.using``), so a writer that records faster than one merge takes never holds the
file for long. Journals left by dead processes are merged whenever the file is opened
(:meth:`Merger.recover`).

What waits for a merge: a read from DuckDB waits only if this process wrote something that
changes its answer and is not merged yet (:meth:`Merger.caught_up`: pending records are
tracked per run and per scope, so a new run's start, which reads its record, steps and
signals, commits nothing); and a run's lease, which is let go only once the records its next
holder reads are in the file (:meth:`Merger.let_go`; a process that dies lets go of its
leases and its journal at once, and whoever takes the run over merges that journal first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import duckdb

from .._journal import run_scope
from ..errors import StoreLockedError, StoreUnavailableError
from . import _rows
from ._duckdb_file import Connection, DuckFile, transaction
from ._duckdb_schema import EFFECT_TYPES, EVENT_TYPES, RUN_TYPES, SIGNAL_TYPES
from ._lockfiles import unlock
from ._wal import (
    ROTATE_SIZE,
    Damage,
    Journal,
    Op,
    dead_journals,
    keep_damaged,
    makes_work,
    read_frames,
    sync_dir,
)

__all__ = ["ALL_RUNS", "MERGE_CHUNK", "Merger", "apply", "insert_batch"]

#: journal records merged in one transaction at most (a busy writer's backlog is merged in
#: several, with a chance to hand the file over between them)
MERGE_CHUNK = 5000
_VALUES_BATCH = 64  # rows per table up to which a merge avoids Arrow
# seconds records wait in the journal before a process that does not hold the file opens it
# to merge them (while it holds it, it merges every ``merge_interval``): every open costs
# 10-60 ms of connecting and a hand-off, and appends never need the file
_REOPEN_AFTER = 1.0
_MERGE_AT = 2000  # pending records that start a merge whatever the file's state
#: read keys remembered with their last write past which the merged ones are dropped
_WRITTEN_PRUNE = 8192
# what a merge may meet on a full or failing disk: retried on a fresh connection
_IO_ERRORS = (duckdb.IOException, duckdb.TransactionException, duckdb.FatalException, OSError)
# the tables a merge writes, by journal record kind: (table, (column, type) pairs)
_TABLES = {
    "E": ("dn_effects", tuple(zip(_rows.EFFECT_COLUMNS, EFFECT_TYPES, strict=True))),
    "R": ("dn_runs", tuple(zip(_rows.RUN_COLUMNS, RUN_TYPES, strict=True))),
    "S": ("dn_signals", tuple(zip(_rows.SIGNAL_COLUMNS, SIGNAL_TYPES, strict=True))),
    "V": ("dn_events", tuple(zip(_rows.EVENT_COLUMNS, EVENT_TYPES, strict=True))),
}
Batch = dict[str, dict[Any, tuple[Any, ...]]]

#: the read of every run record (``list_runs``, ``claim_run``), in :func:`read_keys`' terms
ALL_RUNS = ("runs", "")


def read_keys(kind: str, row: tuple[Any, ...]) -> tuple[tuple[str, str], ...]:
    """The reads whose answer a journal record changes: ``("R", run id)`` (``get_run``),
    ``("E", scope)`` (``load_effects``), ``("S", run id)`` (``list_signals``), ``("V", run
    id)`` (``load_events``) and :data:`ALL_RUNS`."""
    if kind == "E":
        return (("E", row[0]),)
    if kind == "R":
        return (("R", row[0]), ALL_RUNS)
    if kind in "SV":
        return ((kind, row[0]),)
    run_id = row[0][0]  # "X": a reset rewrites the run, forgets its steps, consumes signals
    return (("R", run_id), ALL_RUNS, ("E", run_scope(run_id)), ("S", run_id))


# ---------------------------------------------------------------------- the SQL of a merge
def apply(con: Connection, ops: Sequence[Op], wal_id: str, end: int) -> set[str]:
    """Merge journal records into DuckDB in one transaction that stores ``end`` as the
    journal's merged offset; returns the scopes that resets among them forgot.

    Records are applied in journal order. Between two resets, rows go in grouped by table
    (last write wins per key, which is what applying them one by one would leave): small
    groups as one multi-row VALUES statement (about 60 us a row, and no pyarrow import on
    the way to a run's end), large ones as an Arrow table (8-30 us a row).
    """
    dropped: set[str] = set()
    with transaction(con):
        batch: Batch = {"E": {}, "R": {}, "S": {}, "V": {}}
        for op in ops:
            if op.kind == "X":
                insert_batch(con, batch)
                batch = {"E": {}, "R": {}, "S": {}, "V": {}}
                dropped.add(_apply_reset(con, op.row[0], op.row[1]))
            elif op.kind == "E":
                batch["E"][op.row[:5]] = op.row
            elif op.kind == "R":
                batch["R"][op.row[0]] = op.row
            else:
                batch[op.kind][op.row[:2]] = op.row
        insert_batch(con, batch)
        con.execute("INSERT OR REPLACE INTO dn_journal VALUES (?, ?)", [wal_id, end])
    return dropped


def insert_batch(con: Connection, batch: Batch) -> None:
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


def _apply_reset(con: Connection, row: tuple[Any, ...], consumed: Sequence[str]) -> str:
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
    insert_batch(con, {"E": {}, "R": {run_id: row}, "S": {}, "V": {}})
    keep = {row[i] for i in _rows.RUN_TABLE_COLUMNS}
    names += [n for n in (old[0] if old else ()) if n and n not in keep]
    for name in names:
        con.execute(f'DROP TABLE IF EXISTS "{name}"')
    return scope


def _synced_dir(folder: Path) -> bool:
    """Sync ``folder``'s entries; ``False`` if that failed (then keep what depends on it:
    an offset kept for a removed journal costs nothing)."""
    try:
        sync_dir(folder)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------- the merger
class _Release:
    """A run lease let go by its holder, kept until the merge of this process's records up
    to ``position`` (what the next holder must read) commits; ``done`` is settled then, or
    once a merge fails (the holder need not wait for a failing disk)."""

    __slots__ = ("done", "fd", "position")

    def __init__(self, position: int, fd: int) -> None:
        self.position = position
        self.fd = fd
        self.done: Future[None] = Future()

    def settle(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Merger:
    """This process's journal records on their way into the file; see the module docstring.

    ``lock`` is the store's write lock, held by whoever changes what is pending (``append``
    is called with it held). The store is told, under that lock, of the records each merge
    committed (``merged``), and of the scopes a dead process's resets forgot (``forget``);
    ``announce_deletion`` runs before a merge commits resets (other processes drop their read
    caches), ``announce_work`` after a merge may have made a run claimable or let a run go.

    Positions count the bytes this process journaled, over every journal it rotated: how far
    it appended and merged, and each read key's last write (dropped once merged)."""

    def __init__(
        self,
        file: DuckFile,
        folder: Path,
        lock: threading.Lock,
        *,
        merge_interval: float,
        idle_close: float,
        merged: Callable[[list[Op]], None],
        forget: Callable[[set[str]], None],
        announce_deletion: Callable[[], None],
        announce_work: Callable[[], None],
    ) -> None:
        self.pending: list[Op] = []
        self._file = file
        self._journal: Journal  # this process's, once it has one (``start``)
        self._folder = folder  # of the journals (this process's and the dead ones')
        self._lock = lock
        self._merge_interval = merge_interval
        self._idle_close = idle_close
        self._merged_hook = merged
        self._forget = forget
        self._announce_deletion = announce_deletion
        self._announce_work = announce_work
        self._pending_since = 0.0  # when the oldest pending record was written
        self._appended = 0
        self._merged = 0
        self._rotated = 0
        self._written: dict[tuple[str, str], int] = {}
        self._releases: dict[str, _Release] = {}  # run id -> its lease, let go once merged
        self.error: BaseException | None = None  # the last failed merge, until one works
        self._closed = False
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"durable_nb-merge-{file.path.name}", daemon=True
        )

    def start(self, journal: Journal) -> None:
        """Merge ``journal`` from now on (dead processes' journals are merged before: the
        store opens the file before it creates its journal, so a store that cannot be
        opened leaves none behind)."""
        self._journal = journal
        self._thread.start()

    def append(
        self, ops: list[tuple[str, tuple[Any, ...]]], buf: bytes, ends: list[int]
    ) -> tuple[list[Op], int]:
        """Write records to the journal in one ``os.write`` (caller holds ``lock``; ``buf``
        and ``ends`` are ``frame(ops, ends)``, framed before taking it); returns them as
        pending and the position to wait for with ``Journal.wait_synced``."""
        end = self._journal.append(buf)
        start = end - len(buf)
        # each its own end: a merge in chunks may stop inside this write
        written = [Op(kind, row, start + e) for (kind, row), e in zip(ops, ends, strict=True)]
        self._appended = self._rotated + end
        for kind, row in ops:
            for read in read_keys(kind, row):
                self._written[read] = self._appended
        if not self.pending:
            self._pending_since = time.monotonic()
        self.pending.extend(written)
        self._file.used_at = time.monotonic()
        if len(self.pending) >= _MERGE_AT:
            self._wake.set()
        return written, self._journal.position

    # ------------------------------------------------------------------ merging
    def merge(self, upto: int | None = None) -> None:
        """Merge this process's records up to position ``upto`` (default: all written so
        far) now, after a merge in progress, a chunk at a time."""
        with self._lock:
            if upto is None:
                upto = self._appended  # later writes may wait
            if self._merged >= upto:
                return
        while True:
            with self._file.using():  # no merge is under way in another thread meanwhile
                with self._lock:
                    if self._merged >= upto or not self.pending:
                        return
                self.merge_chunk()

    def caught_up(self, *reads: tuple[str, str]) -> None:
        """Before a read from DuckDB: merge what this process wrote that changes its answer
        (:func:`read_keys`), and nothing if nothing pending does."""
        with self._lock:
            upto = max(self._written.get(r, 0) for r in reads)
            if upto <= self._merged:
                return
        self.merge(upto)

    def merge_chunk(self) -> None:
        """Merge the oldest ``MERGE_CHUNK`` pending records in one transaction."""
        with self._file.lock:
            with self._lock:
                ops = self.pending[:MERGE_CHUNK]
                del self.pending[:MERGE_CHUNK]
            if not ops:
                return
            try:
                self._apply(self._file.connect(), ops, self._journal.wal_id, ops[-1].end)
            except BaseException as e:
                with self._lock:
                    self.pending[:0] = ops
                if not isinstance(e, _IO_ERRORS):
                    raise
                # a full disk or an I/O error: the records stay in the journal and pending;
                # a fresh connection retries them (DuckDB rolls back what it did not commit)
                self._file.drop()
                raise StoreUnavailableError(
                    f"cannot merge the journal {str(self._journal.path)!r} into the store "
                    f"{str(self._file.path)!r}: {e}; nothing recorded is lost (it is in the "
                    "journal), and the merge is retried in the background — free disk space "
                    "or fix the disk; no restart is needed"
                ) from e
            self.error = None
            with self._lock:
                self._merged = self._rotated + ops[-1].end
                due = [k for k, r in self._releases.items() if r.position <= self._merged]
                released = [self._releases.pop(k) for k in due]
                for r in released:  # under the file's lock: nobody reads before the commit
                    unlock(r.fd)
                self._merged_hook(ops)
                if not self.pending:
                    self._written.clear()  # every write is merged
                    if self._journal.size > ROTATE_SIZE:
                        self._rotate()
                elif len(self._written) > _WRITTEN_PRUNE:
                    self._written = {k: v for k, v in self._written.items() if v > self._merged}
            for r in released:
                r.settle()
            if released or any(makes_work(op.kind, op.row) for op in ops):
                self._announce_work()

    def _apply(self, con: Connection, ops: list[Op], wal_id: str, end: int) -> set[str]:
        """:func:`apply`, into the file this process opened first (caller holds its lock)."""
        self._file.check_same_file()  # never merge into a file unlinked under us
        if any(op.kind == "X" for op in ops):
            self._announce_deletion()
        return apply(con, ops, wal_id, end)

    def _rotate(self) -> None:
        """Start a fresh journal once the old one is fully merged (holds both locks)."""
        size = self._journal.size
        try:
            old_id = self._journal.rotate()
        except OSError:
            return  # no room for a new file: the old one goes on, and rotates next time
        self._rotated += size
        assert self._file.con is not None
        if _synced_dir(self._folder):  # see recover
            self._file.con.execute("DELETE FROM dn_journal WHERE wal_id = ?", [old_id])

    def recover(self, con: Connection) -> None:
        """Merge the journals whose writer died (caller holds the file's lock), each in one
        transaction, then remove them."""
        offsets = dict(con.execute("SELECT wal_id, merged_offset FROM dn_journal").fetchall())
        for wal_id, path in dead_journals(self._folder):
            damage: list[Damage] = []
            ops, end = read_frames(path, int(offsets.get(wal_id, 0)), damage)
            if ops:
                # committed (and fdatasynced by DuckDB) before the journal is removed
                dropped = self._apply(con, [Op(k, r, end) for k, r in ops], wal_id, end)
                if dropped:
                    with self._lock:
                        self._forget(dropped)
                if any(makes_work(k, r) for k, r in ops):
                    self._announce_work()
            if damage:
                keep_damaged(path, damage, len(ops))  # renamed: its offset goes with the rest
            else:
                path.unlink()
        live = {p.stem for p in self._folder.glob("*.wal")}
        gone = [wal_id for wal_id in offsets if wal_id not in live]
        # a journal's offset is forgotten only once its removal is on disk: after a power loss
        # it must not come back without its offset and be merged again from the start
        if gone and _synced_dir(self._folder):
            for wal_id in gone:
                con.execute("DELETE FROM dn_journal WHERE wal_id = ?", [wal_id])

    # ------------------------------------------------------------------ run leases
    def let_go(self, run_id: str, fd: int) -> tuple[Future[None], int] | None:
        """Let go of a run's lock file (``fd``) once what this process wrote so far is
        merged (the next holder reads the run from DuckDB); returns a future settled then and
        the position to merge to, or ``None`` if it was let go now."""
        with self._lock:
            position = self._appended
            if not self._closed and self._merged < position:
                self._releases[run_id] = rel = _Release(position, fd)
                self._wake.set()
                return rel.done, position
        unlock(fd)  # everything merged (or the store merged, or failed to, as it closed)
        self._announce_work()
        return None

    def take_back(self, run_id: str) -> int | None:
        """The lock file of a run this process let go of, if it is not let go yet: still
        this process's to execute it again."""
        with self._lock:
            kept = self._releases.pop(run_id, None)
        if kept is None:
            return None
        kept.settle()
        return kept.fd

    def _settle_releases(self) -> None:
        """A merge failed: whoever waits for a lease to be let go stops waiting (as a failed
        ``release()`` returns); the leases are let go after the next merge that works."""
        with self._lock:
            waiting = list(self._releases.values())
        for r in waiting:
            r.settle()

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        backoff = 0.0  # after a failed merge: wait longer, up to a second, before retrying
        file = self._file
        while not self._closed:
            self._wake.wait(max(self._merge_interval, backoff))
            self._wake.clear()
            if self._closed:
                break
            try:
                if self.pending and (
                    file.con is not None
                    or self._releases  # a run's next holder waits for its records
                    or time.monotonic() - self._pending_since >= _REOPEN_AFTER
                    or len(self.pending) >= _MERGE_AT
                ):
                    self.merge()
                elif file.con is not None and file.queue.waiting():
                    with file.using():
                        pass  # leaving hands the file over
                elif file.con is not None and time.monotonic() - file.used_at > self._idle_close:
                    with file.lock:
                        if not self.pending and time.monotonic() - file.used_at > self._idle_close:
                            file.close()
            except StoreLockedError:
                self._settle_releases()
                continue  # another process holds the file; the journal keeps our records
            except Exception as e:  # a full disk, an I/O error: the records wait in the journal
                self.error = e
                self._settle_releases()
                backoff = min(max(backoff * 2, self._merge_interval, 0.01), 1.0)
                continue
            backoff = 0.0

    def stop(self) -> list[int]:
        """Stop the thread (the store closes, after its last merge); returns the lock files
        of the leases still waiting for a merge, settled, for the store to close."""
        self._closed = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            releases = list(self._releases.values())
            self._releases.clear()
        for r in releases:
            r.settle()
        return [r.fd for r in releases]
