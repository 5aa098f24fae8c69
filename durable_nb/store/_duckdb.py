"""The DuckDB store: the default, one file per notebook folder.

DuckDB pays about 1 ms of CPU per committed transaction, so committing each effect on its
own would cost more than most effects. Instead every write is appended, as one framed
record (length, CRC32, marshal payload), to a write-ahead journal owned by this process
(one ``os.write`` — durable against a crash of the process as soon as it returns,
``_wal.py``), and a background thread merges the journal into DuckDB in batches, storing
the journal offset in the same transaction (``_duckdb_merge.py``). A journal left behind by
a dead process (its ``flock`` is free) is merged by the next process that opens the store;
merging is idempotent. A read merges first only what this process wrote that changes its
answer; a run's lease is let go once its records are merged.

DuckDB lets one process hold a database file at a time, so the connection is closed
whenever this process has been idle for ``idle_close`` seconds (after merging
everything), and handed over sooner when another process asks for it (``_duckdb_file.py``,
``_handoff.py``: the holder merges what it has, closes the file, and the oldest waiter gets
it). A waiter raises ``StoreLockedError`` naming the holder once the line ahead of it has
not moved for ``lock_timeout`` seconds. ``fsync``: ``False`` (the journal is never synced:
what is not merged yet does not survive an OS crash), ``"group"`` (one ``fdatasync`` per
batch of concurrent writes, ``_syncer.py``) or ``True`` (one per write); see the guide's
"What survives what".

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
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
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
    StoreLockedError,
    StoreUnavailableError,
)
from . import _rows
from ._base import RunQuery, StoreBase
from ._duckdb_file import Connection, DuckFile, transaction
from ._duckdb_merge import ALL_RUNS, Merger
from ._duckdb_schema import SCHEMA_VERSION
from ._keyfilter import KeyFilter
from ._lockfiles import EffectClaims, file_token, lock_run, say_holder, touch
from ._protocol import CLAIMABLE_STATUSES, RunLease, run_scopes
from ._wal import Journal, Op, any_dead_journal, frame, makes_work

if TYPE_CHECKING:
    from .._codecs import Payload
    from ._protocol import EffectKey, EffectRecord, EventRecord, RunRecord, SignalRecord

__all__ = ["SCHEMA_VERSION", "DuckDBStore"]

_RECENT_MAX_RECORDS = 4096
_RECENT_MAX_BYTES = 64 * 1024
_WORK_POLL = 0.05  # seconds between looks at the ``work`` file while waiting for work

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


def _in_scopes(scopes: set[str], key: EffectKey, rec: EffectRecord) -> bool:
    return key[0] in scopes


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

        self._wlock = threading.Lock()
        self._file = DuckFile(
            self._path,
            self._aux / "queue",
            float(lock_timeout),
            on_open=self._opened,
            hand_over=self._hand_over,
        )
        self._merger = Merger(
            self._file,
            self._aux / "journal",
            self._wlock,
            merge_interval=float(merge_interval),
            idle_close=float(idle_close),
            merged=self._merged,
            forget=self._forget_scopes,
            announce_deletion=self._announce_deletion,
            announce_work=self._announce_work,
        )
        self._unmerged: dict[EffectKey, tuple[EffectRecord, Op]] = {}
        # small records read or written lately: a rerun of a notebook cell replays from memory
        # (microseconds) instead of a DuckDB point query (about 0.5 ms)
        self._recent: OrderedDict[EffectKey, EffectRecord] = OrderedDict()
        self._closed = False
        self._run_locks: dict[str, int] = {}
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

        with self._file.lock:
            self._file.connect()  # validates the file, migrates, recovers dead journals
        self._journal = Journal(self._aux / "journal", fsync=fsync)
        self._file.journal = self._journal
        self._merger.start(self._journal)

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

    # ------------------------------------------------------------------ file, journal
    def _db(self) -> contextlib.AbstractContextManager[Connection]:
        """The connection, for a block of statements (``DuckFile.db``)."""
        self._check_open()
        return self._file.db()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {str(self._path)!r} is closed; open a new one")

    def _opened(self, con: Connection) -> None:
        """Each time this process opens the file: merge what processes that died meanwhile
        left behind; drop cached records other processes may have deleted meanwhile."""
        self._merger.recover(con)
        with self._wlock:
            self._validate_cache()

    def _hand_over(self) -> None:
        """Before the file goes to a process that asked for it: merge a chunk of records."""
        self._merger.merge_chunk()

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
            written, position = self._merger.append(ops, buf, ends)
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
        # fsync="group": on disk before returning, in one fdatasync with concurrent writes
        self._journal.wait_synced(position)
        if any(makes_work(kind, row) for kind, row in ops):
            self._notify_work()  # in-process waiters; other processes hear of it after the merge

    def _merged(self, ops: list[Op]) -> None:
        """Records just merged (caller holds ``_wlock``): reads find them in DuckDB now."""
        for op in ops:
            if op.kind == "E":
                entry = self._unmerged.get(op.row[:5])
                if entry is not None and entry[1] is op:
                    del self._unmerged[op.row[:5]]
            elif op.kind == "X":
                scope = run_scope(op.row[0][0])
                if self._dropped.get(scope) is op:
                    del self._dropped[scope]

    def _forget_scopes(self, scopes: set[str]) -> None:
        """A dead process's resets forgot these scopes (caller holds ``_wlock``)."""
        self._forget_recent(partial(_in_scopes, scopes))

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
                self._file.drop()
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
        """Before committing a deletion (caller holds the file's lock): tell other processes to
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
            with transaction(con):
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
            if self._file.con is None:  # another process may have had the file meanwhile
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
            if self._file.con is None:
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
        self._merger.caught_up(("E", scope))
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
        self._merger.caught_up(("R", run_id))
        with self._db() as con:
            row = con.execute("SELECT * FROM dn_runs WHERE run_id = ?", [run_id]).fetchall()
        return _rows.run_from_row(row[0], self._read_payload) if row else None

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        clause, params = query.sql("?")
        self._merger.caught_up(ALL_RUNS)
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
            with transaction(con):
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
        # let go by a run of this process but not yet merged: still this process's
        fd = self._merger.take_back(run_id)
        if fd is None:
            fd = lock_run(self._aux / "locks", run_id, owner)
            try:
                # a previous holder that died may have left records in its journal: merge
                # them before this process reads the run's history (a live one let go only
                # once its records were merged)
                if any_dead_journal(self._aux / "journal"):
                    with self._file.using():
                        self._check_open()
                        if self._file.con is None:
                            self._file.connect()  # opening recovers dead journals already
                        else:
                            self._merger.recover(self._file.con)
            except BaseException:
                os.close(fd)
                raise
        say_holder(fd, owner)
        self._run_locks[run_id] = fd

        def let_go() -> tuple[Future[None], int] | None:
            if self._run_locks.get(run_id) == fd:
                del self._run_locks[run_id]
            return self._merger.let_go(run_id, fd)

        def release() -> None:  # merges on the caller's thread what the next holder reads
            later = let_go()
            if later is not None:
                with contextlib.suppress(StoreError):  # else the merge thread lets go after
                    self._merger.merge(later[1])  # its next merge that works

        def release_later(loop: object) -> Future[None] | None:  # the merge thread's work
            later = let_go()
            return None if later is None else later[0]

        return RunLease(run_id, owner, release, _release_later=release_later)

    def _claim_run(self, owner: str, wanted: list[str]) -> tuple[RunRecord, RunLease] | None:
        # what wait_for_work compares with: work that arrives after this look wakes it
        self._local.work_token = self._work_token()
        if not wanted:
            return None
        self._merger.caught_up(ALL_RUNS)
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
        self._merger.caught_up(("S", run_id))
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
        self._merger.caught_up(("V", run_id))
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
        self._merger.merge()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._merger.merge()
        finally:
            self._closed = True
            let_go = self._merger.stop()  # leases let go but not merged: the close lets go
            self._notify_work()  # waiters return
            try:
                self._file.shut()
            finally:
                with self._wlock:
                    self._journal.close(merged=not self._merger.pending)
                for fd in [*self._run_locks.values(), *let_go]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._run_locks.clear()
                with self._filters_lock:
                    for f in self._filters.values():
                        f.close()
                    self._filters.clear()
                self._claims.close()
