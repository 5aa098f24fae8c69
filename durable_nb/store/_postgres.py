"""The PostgreSQL store: one Postgres schema shared by every kernel, worker and machine.

URL: ``postgresql://[user@]host[:port]/database[?schema=NAME&lease_seconds=S&<libpq parameters>]``
(``postgres://`` works too). Everything lives in the schema ``NAME`` (default
``durable_nb``), created on first use, so several teams or test runs can share a database.
Give passwords through ``PGPASSWORD`` or ``~/.pgpass`` rather than in the URL: the store's
``url`` and its error messages never show a password.

What the Store protocol asks, and how this store keeps it:

* **Durable on return, atomic per call.** Every call is one autocommit statement or one
  transaction (a batch of effects, a reset, a delete), committed before it returns.
* **Last write wins.** ``INSERT ... ON CONFLICT DO UPDATE`` on each record's key.
* **Durable on return, shared round trips.** Effect, run and event records go through one
  writer thread per store (``_pg_commit``): writes that arrive while it commits share the
  next transaction (group commit), and each caller is answered once its transaction
  committed. ``submit`` is the same without waiting; from the engine's loop it goes through
  a connection of the loop's own (``_pg_commit.LoopCommit`` over ``_pg_wire``), and the
  loop awaits the answer.
* **One executor per run.** A lease row ``(run_id, token, owner, expires_at)``, taken with
  one upsert that succeeds only if there is no row or it expired by the database's clock; a
  background thread renews every lease this store holds each ``lease_seconds / 3``. The
  token starts with the key of this store's *session* (``_pg_session``), an advisory lock
  the server drops when the holder's connection ends: a holder that died (even SIGKILLed)
  is found gone by the next process that wants its run, which cuts the lease short to
  ``TAKEOVER_GRACE`` and takes the run then. A holder cut off from the server, or on a dead
  host (a half-open connection), is taken over when the server gives up on its connection
  (about 2 minutes) or its lease expires, whichever is first. A holder whose session ends
  gives up its leases at once (fencing: the runs stop). Releasing deletes the row and
  notifies workers. Shared-effect claims carry the session key the same way.
* **Workers.** ``claim_run`` (``_pg_queues``: queue limits, priorities and sessions hold
  there) picks the oldest run that needs an executor with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (competing workers skip each other's candidates
  instead of queueing) and takes its lease in the same transaction. ``wait_for_work``
  sleeps on a dedicated ``LISTEN`` connection; queuing a run, sending a signal and
  releasing a lease ``NOTIFY`` the schema's channel (``dn_work_<hash of the schema>``).
* **Tables** (DataFrames, Arrow tables: ``Payload.table``) are kept as Arrow IPC streams in
  ``bytea`` columns, which restores every Arrow type exactly (up to PostgreSQL's 1 GB per
  value).
* **Pickles are signed** with the team's key: ``key=`` or ``$DURABLE_NB_KEY`` (at least 16
  characters). Without a key the store keeps every value that needs no pickle, records
  errors as text, and refuses to store or read pickles, saying to set the key. Nothing is
  unpickled before its signature is checked.
* **Schema migrations** (``_pg_schema``, with every statement) are named, ordered and
  recorded in ``dn_migrations``; a schema written by a newer durable_nb is refused with
  ``StoreVersionError``.

The rest of the store lives beside this module: its URL and key (``_pg_url``), its
statements (``_pg_schema``), leases, claims and fencing (``_pg_leases``), queues, sessions
and shared limits (``_pg_queues``), group commit (``_pg_commit``, ``_pg_wire``) and the
liveness session (``_pg_session``); only these modules import psycopg. Every value reaches
SQL as a parameter; the schema name, the only identifier that varies, is validated and
quoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from .._journal import run_scope
from ..errors import (
    ArgumentError,
    RunLockedError,
    StoreError,
    StoreUnavailableError,
)
from . import _migrations, _rows
from ._base import RunQuery
from ._pg_commit import Done, GroupCommit, LoopCommit, Sql, Statement
from ._pg_leases import PgLeases, WorkSignal
from ._pg_queues import PgQueues, queue_statements
from ._pg_schema import (
    BOOKKEEPING,
    EFFECT_KEY_COLS,
    EFFECT_TYPES,
    MIGRATIONS,
    SCHEMA_VERSION,
    ipc_of,
    payload_of,
    statements,
)
from ._pg_session import TAKEOVER_GRACE, Session
from ._pg_start import PgStarts
from ._pg_url import DEFAULT_SCHEMA, lease_from_url, resolve_key, split_url
from ._protocol import RunLease, run_scopes

if TYPE_CHECKING:
    from ._protocol import EffectKey, EffectRecord, EventRecord, RunRecord, SignalRecord

__all__ = ["DEFAULT_SCHEMA", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
#: the text fields of the records, checked for what PostgreSQL text cannot hold
_EFFECT_TEXT = ("scope", "identity", "version", "input_hash", "kind", "detail")
_RUN_TEXT = ("run_id", "workflow", "status", "custom_status", "parent_id", "detail", "version")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PostgresStore(PgStarts, PgLeases, PgQueues):
    """Runs and effects in a PostgreSQL schema, shared by processes and machines.

    See the module docstring. ``lease_seconds``: how long a run stays owned by a holder
    that stopped renewing (it renews every third of it). ``pool_size``: connections this
    process may use at once. ``connect_timeout``: seconds to wait for the server.
    """

    _remote = True

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        key: bytes | str | None = None,
        lease_seconds: float = 30.0,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        from .._codecs import Signer

        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise ArgumentError(
                f"url must be a postgresql:// URL, got {url!r}; e.g. "
                "'postgresql://user@host:5432/dbname?schema=durable_nb'"
            )
        for name, value in (("lease_seconds", lease_seconds), ("connect_timeout", connect_timeout)):
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ArgumentError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ArgumentError(f"pool_size must be an int >= 1, got {pool_size!r}")
        url, lease_seconds = lease_from_url(url, lease_seconds)
        self._conninfo, self._schema, self._url = split_url(url, schema)
        raw_key = resolve_key(key)
        self._signer = (
            Signer(raw_key)
            if raw_key is not None
            else Signer.without_key(f"the PostgreSQL store {self._url!r}")
        )
        self._lease_seconds = float(lease_seconds)
        self._connect_timeout = float(connect_timeout)
        self._connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self._conninfo:
            self._connect_kwargs["connect_timeout"] = max(1, math.ceil(connect_timeout))
        if "application_name" not in self._conninfo:  # so pg_stat_activity says who we are
            self._connect_kwargs["application_name"] = f"durable_nb:{self._schema}"
        self._channel = (
            "dn_work_" + hashlib.blake2b(self._schema.encode(), digest_size=8).hexdigest()
        )
        self._q = self._statements()
        self._qq = queue_statements(self._schema)
        self._seen_keys: dict[str, str] = {}

        self._closed = False
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # lease token -> run id, renewed by the heartbeat
        self._lease_objs: dict[str, RunLease] = {}  # lease token -> the holder's RunLease
        # run id -> the token of the lease this store took for it, kept after the lease was
        # lost (until released): the run's writes commit only while that lease is live
        self._fences: dict[str, str] = {}
        self._next_condemn = 0.0  # monotonic time of the next look for dead holders' runs
        # a claim's node id (None without one) and workflows -> (claimable wake-ups seen,
        # until when) after it found nothing
        self._idle: dict[tuple[str | None, ...], tuple[int, float]] = {}
        self._stop = threading.Event()
        self._work = WorkSignal()
        self._heartbeat: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        name = f"durable_nb-pg-{self._schema}"
        self._session = Session(self._conninfo, self._connect_kwargs, self._session_lost, name)
        self._sql = Sql(
            self._q["put_effect"],
            self._q["put_effects"],
            self._q["put_effect_fenced"],
            self._q["put_effects_fenced"],
            self._q["fence"],
            EFFECT_TYPES,
        )
        self._writer = GroupCommit(
            lambda: psycopg.connect(self._conninfo, **self._connect_kwargs),
            self._sql,
            self._translate,
            name,
        )
        self._loop_writers: dict[asyncio.AbstractEventLoop, LoopCommit] = {}

        try:
            with psycopg.connect(self._conninfo, **self._connect_kwargs) as conn:
                self._migrate(conn)
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        except psycopg.Error as e:
            raise StoreError(
                f"cannot prepare the PostgreSQL store {self._url!r}: {_first_line(e)}; "
                "check that the user may create the schema and its tables there"
            ) from e
        self._pool: ConnectionPool[_Conn] = ConnectionPool(
            self._conninfo,
            kwargs=self._connect_kwargs,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=max(self._connect_timeout, 5.0),
            name=f"durable_nb-{self._schema}",
        )
        self._pool.open(wait=False)

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        """The URL without its password (give that by PGPASSWORD or ~/.pgpass)."""
        return self._url

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def lease_seconds(self) -> float:
        return self._lease_seconds

    def __repr__(self) -> str:
        return f"PostgresStore({self._url!r})"

    # ------------------------------------------------------------------ SQL
    def _statements(self) -> dict[str, str]:
        return statements(self._schema)

    # ------------------------------------------------------------------ migrations
    def _read_version(self, conn: _Conn) -> tuple[int, str, list[str]]:
        tables = sorted(
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = %s",
                [self._schema],
            ).fetchall()
        )
        if "dn_meta" not in tables:
            return 0, "", tables
        s = sql.Identifier(self._schema)
        meta: dict[str, str] = dict(
            conn.execute(sql.SQL("SELECT key, value FROM {}.dn_meta").format(s)).fetchall()
        )
        return int(meta.get("schema_version", 0)), str(meta.get("written_by", "?")), tables

    def _check_version(self, current: int, written_by: str) -> None:
        _migrations.check_version(
            current,
            written_by,
            SCHEMA_VERSION,
            f"the PostgreSQL store {self._url!r} (schema {self._schema!r})",
        )

    def _migrate(self, conn: _Conn) -> None:
        current, written_by, _ = self._read_version(conn)
        self._check_version(current, written_by)
        if current == SCHEMA_VERSION:
            return

        s = sql.Identifier(self._schema)
        with conn.transaction():
            # processes opening a fresh schema at once: one migrates, the others then see it
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                ["durable_nb schema " + self._schema],
            )
            # only when missing: a schema an administrator created needs no CREATE on the database
            if not conn.execute(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", [self._schema]
            ).fetchone():
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
            current, written_by, tables = self._read_version(conn)
            self._check_version(current, written_by)
            if current == SCHEMA_VERSION:
                return
            if current == 0 and tables:
                raise _migrations.not_a_store(
                    f"the schema {self._schema!r} of {self._url!r}",
                    tables,
                    "choose another schema with ?schema=NAME in the store URL",
                )
            _migrations.migrate(
                lambda q, params: conn.execute(sql.SQL(q).format(s=s), params),
                MIGRATIONS,
                current,
                BOOKKEEPING,
            )

    # ------------------------------------------------------------------ connections
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self._url!r} is closed; open a new one")

    def _unavailable(self, e: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"cannot reach the PostgreSQL store {self._url!r}: {_first_line(e)}; check that "
            "the server is running and accepts connections at that address (user, database; "
            "a password goes in PGPASSWORD or ~/.pgpass), or choose another store with "
            "DURABLE_NB_STORE"
        )

    def _call(self, fn: Callable[[_Conn], _T]) -> _T:
        """Run ``fn`` on a pooled connection; once more on a fresh one if the server dropped
        the connection or aborted the transaction (every call here may be repeated)."""
        self._check_open()
        retried = False
        while True:
            conn: _Conn | None = None
            try:
                with self._pool.connection() as conn:
                    return fn(conn)
            except PoolTimeout as e:
                raise self._pool_timeout(e) from None
            except psycopg.OperationalError as e:
                lost = conn is None or conn.closed or conn.broken
                if not retried and (lost or isinstance(e, psycopg.errors.TransactionRollback)):
                    retried = True
                    if lost:  # the server went away once: its other sessions are gone too
                        with contextlib.suppress(psycopg.Error):
                            self._pool.check()
                    continue
                raise self._unavailable(e) from e
            except (psycopg.Error, UnicodeEncodeError) as e:
                raise self._translate(e) from e

    def _translate(self, e: BaseException) -> BaseException:
        """The store's error for what psycopg raised (or passed on, if it is not psycopg's)."""
        if isinstance(e, psycopg.errors.DivisionByZero):  # only the fence divides
            error: BaseException = RunLockedError(
                "this process no longer holds the lease of the run it wrote for; the store "
                "refused the write"
            )
        elif isinstance(e, psycopg.OperationalError):
            error = self._unavailable(e)
        elif isinstance(e, psycopg.Error):
            error = StoreError(
                f"the PostgreSQL store {self._url!r} refused a request: {_first_line(e)}"
            )
        elif isinstance(e, UnicodeEncodeError):  # raised by psycopg before anything is sent
            error = StoreError(
                f"the PostgreSQL store {self._url!r} cannot keep text that is not UTF-8 "
                f"({e}); use names and ids without lone surrogates"
            )
        else:
            return e
        error.__cause__ = e
        return error

    def _pool_timeout(self, e: BaseException) -> StoreError:
        try:
            psycopg.connect(self._conninfo, **self._connect_kwargs).close()
        except psycopg.Error as probe:
            return self._unavailable(probe)
        return StoreError(
            f"all {self._pool.max_size} connections of the PostgreSQL store {self._url!r} "
            f"stayed busy for {self._pool.timeout:g}s ({e}); pass a larger pool_size to "
            "PostgresStore or use fewer threads"
        )

    # ------------------------------------------------------------------ effects
    def _keepable(self, record: object, what: str, names: Sequence[str]) -> None:
        """Refuse a record whose text fields PostgreSQL cannot hold (a NUL character) before
        anything is sent, naming the field: grouped rows go as binary arrays, refused late,
        and psycopg's own error would not say which field."""
        for name in names:
            text = getattr(record, name)
            if text is not None and "\x00" in text:
                raise StoreError(
                    f"the PostgreSQL store {self._url!r} refused a request: PostgreSQL text "
                    f"fields cannot contain NUL (0x00) characters, and the {what}'s {name} "
                    f"{text!r} has one; remove it"
                )

    def _effect_row(self, rec: EffectRecord) -> tuple[Any, ...]:
        self._keepable(rec, "effect", _EFFECT_TEXT)
        return _rows.effect_row(rec, ipc_of(rec.payload))

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        self._check_open()
        if records:
            rows = [self._effect_row(rec) for rec in records]
            self._write(rows, [], self._fence_of(effects=records))

    def submit(
        self,
        done: Done,
        *,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._check_open()
        rows = [self._effect_row(rec) for rec in effects]  # encoding errors raise here
        statements = self._run_statements(runs) + self._event_statements(events)
        if not rows and not statements:
            done(None)
            return
        self._send(rows, statements, self._fence_of(effects, runs, events), done, loop)

    def _send(
        self,
        rows: list[tuple[Any, ...]],
        statements: list[Statement],
        fence: list[str],
        done: Done,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """Hand a write to ``loop``'s own writer, or without a loop to the writer thread;
        ``done`` is told once it committed or failed."""
        if loop is not None:  # written by the loop itself, on a connection of its own
            writer = self._loop_writers.get(loop)
            if writer is None:
                with self._lock:  # loops of several threads (the engine's, a worker's)
                    self._check_open()  # close() closed the writers it knew: no new one
                    for gone_loop in [lp for lp in self._loop_writers if lp.is_closed()]:
                        self._loop_writers.pop(gone_loop).close_now()  # a worker's that ended
                    writer = self._loop_writers[loop] = LoopCommit(
                        self._conninfo, self._connect_kwargs, self._sql, self._translate, loop
                    )
            writer.submit(rows, statements, self._fenced_done(fence, done), fence)
            return
        try:
            self._writer.submit(rows, statements, self._fenced_done(fence, done), fence)
        except psycopg.Error:
            self._check_open()  # closed meanwhile: say so
            raise

    def _write(
        self, rows: list[tuple[Any, ...]], statements: list[Statement], fence: list[str]
    ) -> None:
        try:
            self._writer.write(rows, statements, fence)
        except psycopg.InterfaceError:
            self._check_open()
            raise
        except RunLockedError as e:
            raise self._refused(fence, e) from e.__cause__

    def get_effect(self, key: EffectKey) -> EffectRecord | None:
        q = self._q["get_effect"]
        row = self._call(lambda conn: conn.execute(q, key, binary=True).fetchone())
        return _rows.effect_from_row(row, payload_of) if row is not None else None

    def get_effects(self, keys: Sequence[EffectKey]) -> list[EffectRecord | None]:
        """The records of many keys (a map's items): one query per scope, identity and
        version, not one round trip each."""
        q = self._q["get_effects"]
        where = {k: n for n, k in enumerate(keys)}
        groups: dict[tuple[str, str, str], list[str]] = {}
        for k in where:
            groups.setdefault(k[:3], []).append(k[3])
        out: list[EffectRecord | None] = [None] * len(keys)
        for head, hashes in groups.items():
            args: list[Any] = [*head, sorted(set(hashes))]

            def read(conn: _Conn, args: list[Any] = args) -> list[Any]:
                return conn.execute(q, args, binary=True).fetchall()

            for row in self._call(read):
                rec = _rows.effect_from_row(row, payload_of)
                if (n := where.get(rec.key)) is not None:
                    out[n] = rec
        return out

    def load_effects(self, scope: str) -> list[EffectRecord]:
        q = self._q["load_effects"]
        rows = self._call(lambda conn: conn.execute(q, [scope], binary=True).fetchall())
        return [_rows.effect_from_row(r, payload_of) for r in rows]

    def _effect_scopes(self, prefix: str) -> list[str]:
        q = self._q["effect_scopes"]
        rows = self._call(lambda conn: conn.execute(q, [prefix]).fetchall())
        return sorted(str(r[0]) for r in rows)

    def delete_effects(self, scope: str) -> int:
        q = self._q["delete_effects"]
        return self._call(lambda conn: conn.execute(q, [scope]).rowcount)

    def _prune_effects(self, scope_prefix: str, older_than: float) -> int:
        q, qc = self._q["prune_effects"], self._q["prune_claims"]

        def prune(conn: _Conn) -> int:
            n = conn.execute(q, [scope_prefix, older_than]).rowcount
            conn.execute(qc)  # claims of holders that died
            return n

        return self._call(prune)

    def _claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        # the owner is stored after the session key, so a claimer that died is found gone
        q, qc = self._q["claim_effect"], self._q["condemn_claim"]
        params = (*key, f"{self._session_key()}.{owner}", seconds)
        condemn = {"grace": TAKEOVER_GRACE, **dict(zip(EFFECT_KEY_COLS, key, strict=True))}

        def claim(conn: _Conn) -> bool:
            if conn.execute(q, params).fetchone() is not None:
                return True
            conn.execute(qc, condemn)  # its claimer is gone: the claim ends after the grace
            return False

        return self._call(claim)

    def release_effect(self, key: EffectKey, owner: str) -> None:
        q = self._q["release_effect"]
        params = (*key, owner)
        self._call(lambda conn: conn.execute(q, params))

    # ------------------------------------------------------------------ runs
    def _run_row(self, run: RunRecord) -> tuple[Any, ...]:
        self._keepable(run, "run", _RUN_TEXT)
        return _rows.run_row(run, [ipc_of(run.args), ipc_of(run.result), ipc_of(run.error)])

    def _run_from_row(self, r: Sequence[Any]) -> RunRecord:
        return _rows.run_from_row(r, payload_of)

    def _run_statements(self, runs: Sequence[RunRecord]) -> list[Statement]:
        q = self._q["put_run"]
        return [(q, (*self._run_row(run), self._channel)) for run in runs]

    def put_run(self, run: RunRecord) -> None:
        self._check_open()
        self._write([], self._run_statements([run]), self._fence_of(runs=[run]))

    def get_run(self, run_id: str) -> RunRecord | None:
        q = self._q["get_run"]
        row = self._call(lambda conn: conn.execute(q, [run_id], binary=True).fetchone())
        return _rows.run_from_row(row, payload_of) if row is not None else None

    def _get_runs(self, run_ids: list[str]) -> dict[str, RunRecord]:
        q = self._q["get_runs"]
        rows = self._call(lambda conn: conn.execute(q, [run_ids], binary=True).fetchall())
        runs = (_rows.run_from_row(r, payload_of) for r in rows)
        return {run.run_id: run for run in runs}

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        clause, params = query.sql("%s")
        q = self._q["list_runs"] + clause
        rows = self._call(lambda conn: conn.execute(q, params, binary=True).fetchall())
        return [_rows.run_from_row(r, payload_of) for r in rows]

    def delete_run(self, run_id: str) -> bool:
        q = self._q
        fence = self._fence_of_run(run_id)

        def delete(conn: _Conn) -> bool:
            with conn.transaction():
                existed = conn.execute(q["delete_run"], [run_id]).rowcount > 0
                for name in ("delete_signals", "delete_inbox", "delete_events"):
                    conn.execute(q[name], [run_id])
                conn.execute(q["delete_scopes"], [list(run_scopes(run_id))])
                self._check_fence(conn, fence)
            return existed

        return self._fenced_call(delete, fence)

    def _reset_run(self, run: RunRecord, consumed_signals: tuple[str, ...]) -> None:
        q, params = self._q, (*self._run_row(run), self._channel)
        consumed = list(consumed_signals)
        fence = self._fence_of_run(run.run_id)

        def reset(conn: _Conn) -> None:
            with conn.transaction():
                conn.execute(q["put_run"], params)
                conn.execute(q["delete_effects"], [run_scope(run.run_id)])
                if consumed:
                    conn.execute(q["delete_some_signals"], [run.run_id, consumed])
                self._check_fence(conn, fence)

        self._fenced_call(reset, fence)

    # ------------------------------------------------------------------ wake-ups
    def wait_for_work(self, timeout: float) -> None:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout >= 0:
            raise ArgumentError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self._check_open()
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen_loop, name="durable_nb-pg-listen", daemon=True
                )
                self._listener.start()
        self._work.wait(timeout)

    def _listen_loop(self) -> None:
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
        conn: _Conn | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self._conninfo, **self._connect_kwargs)
                    conn.execute(listen)
                    self._work.set()  # whatever was sent while nobody listened
                for note in conn.notifies(timeout=0.25):
                    self._work.set(note.payload in ("queued", "released"))
            except psycopg.Error as e:
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                    conn = None
                if not self._stop.is_set():
                    _log.warning("durable_nb: lost the LISTEN connection (%s); reconnecting", e)
                    self._work.set()  # waiters fall back to polling meanwhile
                self._stop.wait(1.0)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # ------------------------------------------------------------------ signals, events
    def add_signal(self, signal: SignalRecord) -> None:
        q = self._q["add_signal"]
        self._keepable(signal, "signal", ("run_id", "signal_id", "name", "payload"))
        params = (*_rows.signal_row(signal), self._channel)
        self._call(lambda conn: conn.execute(q, params))

    def list_signals(self, run_id: str) -> list[SignalRecord]:
        q = self._q["list_signals"]
        rows = self._call(lambda conn: conn.execute(q, [run_id], binary=True).fetchall())
        return [_rows.signal_from_row(r) for r in rows]

    def inbox_token(self, run_id: str) -> object:
        q = self._q["inbox_token"]
        row = self._call(lambda conn: conn.execute(q, [run_id]).fetchone())
        return row[0] if row is not None else None

    def _inbox_tokens(self, run_ids: list[str]) -> dict[str, object]:
        q = self._q["inbox_tokens"]
        rows = self._call(lambda conn: conn.execute(q, [run_ids]).fetchall())
        got: dict[str, object] = dict.fromkeys(run_ids)
        got.update((run_id, token) for run_id, token in rows)
        return got

    def _event_statements(self, events: Sequence[EventRecord]) -> list[Statement]:
        q = self._q["put_event"]
        for e in events:
            self._keepable(e, "event", ("run_id", "event_id", "kind", "data"))
        return [(q, _rows.event_row(e)) for e in events]

    def append_events(self, events: Sequence[EventRecord]) -> None:
        self._check_open()
        if events:
            self._write([], self._event_statements(events), self._fence_of(events=events))

    def load_events(self, run_id: str) -> list[EventRecord]:
        q = self._q["load_events"]
        rows = self._call(lambda conn: conn.execute(q, [run_id], binary=True).fetchall())
        return [_rows.event_from_row(r) for r in rows]

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> None:
        self._check_open()  # every write is committed before it returns

    def close(self) -> None:
        """Release the leases this process holds (so others may take the runs over at once)
        and every connection."""
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            tokens = list(self._held)
        if tokens:
            q, qn = self._q["release_all"], self._q["notify"]

            def release_all(conn: _Conn) -> None:
                with conn.transaction():
                    if conn.execute(q, [tokens]).fetchall():
                        conn.execute(qn, [self._channel, "released"])

            try:
                self._call(release_all)
            except StoreError as e:
                _log.warning("durable_nb: could not release run leases at close: %s", e)
        with self._lock:
            self._closed = True
            self._held.clear()
            self._fences.clear()
        self._work.set()  # waiters return (and find the store closed on their next call)
        for thread in (self._heartbeat, self._listener):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
        self._writer.close()
        with self._lock:
            loop_writers = list(self._loop_writers.values())
        for writer in loop_writers:
            # what its loop has under way finishes first (unless we are on that loop)
            deadline = time.monotonic() + 5
            while writer.busy and not writer.loop.is_closed() and time.monotonic() < deadline:
                if _on_loop(writer.loop):
                    break
                time.sleep(0.005)
            writer.close_now()
        self._session.close()  # after the leases' rows went: nobody needs to find us gone
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
