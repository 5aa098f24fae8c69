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
  committed. ``submit`` is the same without waiting (the engine's loop awaits the answer).
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

Only this module imports psycopg. Every value reaches SQL as a parameter; the schema name,
the only identifier that varies, is validated and quoted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from .._arrow_ipc import ipc_bytes, read_ipc
from .._journal import run_of_scope, run_scope
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    RunLockedError,
    StoreError,
    StoreUnavailableError,
)
from . import _migrations, _rows
from ._base import RunQuery
from ._pg_commit import Done, GroupCommit, LoopCommit, Sql, Statement
from ._pg_queues import PgQueues, queue_statements
from ._pg_schema import (
    BOOKKEEPING,
    EFFECT_KEY_COLS,
    EFFECT_TYPES,
    MIGRATIONS,
    SCHEMA_VERSION,
    statements,
)
from ._pg_session import TAKEOVER_GRACE, Session, session_key_of
from ._protocol import RunLease, run_scopes
from ._queues import Node, Route

if TYPE_CHECKING:
    from .._codecs import Payload
    from ._protocol import EffectKey, EffectRecord, EventRecord, RunRecord, SignalRecord

__all__ = ["DEFAULT_SCHEMA", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
_Claimed = tuple["RunRecord", RunLease, "Route | None"]

DEFAULT_SCHEMA = "durable_nb"
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MIN_KEY = 16
#: seconds between two looks for runs held by processes that died, by one store's claims:
#: the look probes the session lock of every live lease, and idle workers are woken by every
#: queued run and every released lease (4 workers looked ~30 times a run without a limit)
_CONDEMN_EVERY = 1.0


def _check_schema(schema: object) -> str:
    if not isinstance(schema, str):
        raise ArgumentTypeError(
            f"schema must be a str naming a PostgreSQL schema, got {type(schema).__name__} "
            f"{schema!r}"
        )
    if (
        not _SCHEMA_RE.fullmatch(schema)
        or len(schema) > 63
        or schema.lower().startswith("pg_")
        or schema.lower() == "information_schema"
    ):
        raise ArgumentError(
            f"schema must be a plain PostgreSQL identifier (a letter or '_', then letters, "
            f"digits or '_', at most 63 characters, not starting with 'pg_'), got {schema!r}; "
            "pick a name like 'durable_nb' or 'team_ml'"
        )
    return schema


def _split_url(url: str, schema: str | None) -> tuple[str, str, str]:
    """``(conninfo for libpq, schema, url to show)``: ``?schema=`` is ours, not libpq's,
    and the shown url has no password."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_url = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    if len(in_url) > 1:
        raise ArgumentError(f"the store URL names more than one schema: {in_url!r}; keep one")
    if in_url and schema is not None and in_url[0] != schema:
        raise ArgumentError(
            f"the store URL says schema={in_url[0]!r} but schema={schema!r} was passed; "
            "give the schema once"
        )
    name = _check_schema(in_url[0] if in_url else schema if schema is not None else DEFAULT_SCHEMA)
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = userinfo.partition(":")[0] + "@" + hostport
    shown = [(k, v) for k, v in rest if k != "password"]
    if name != DEFAULT_SCHEMA:
        shown.append(("schema", name))
    return conninfo, name, urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown)))


def _lease_from_url(url: str, lease_seconds: float) -> tuple[str, float]:
    """``?lease_seconds=S`` in the URL (ours, not libpq's) wins over the argument, so a
    worker started by URL alone (``durable-nb worker --store ...``) can set it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [v for k, v in query if k == "lease_seconds"]
    if not given:
        return url, lease_seconds
    try:
        value = float(given[-1])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(
            f"lease_seconds in the store URL must be a number of seconds > 0, got {given[-1]!r}"
        )
    rest = [(k, v) for k, v in query if k != "lease_seconds"]
    return urlunsplit(parts._replace(query=urlencode(rest))), value


def _resolve_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        env = os.environ.get("DURABLE_NB_KEY")
        if not env:
            return None
        if len(env.encode()) < _MIN_KEY:
            raise ArgumentError(
                f"DURABLE_NB_KEY must be at least {_MIN_KEY} characters long, got "
                f"{len(env.encode())}; set it to a long random secret, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        return env.encode()
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes | bytearray):
        raise ArgumentTypeError(
            f"key must be bytes or str (the team's signing key), got {type(key).__name__}"
        )
    if len(key) < _MIN_KEY:
        raise ArgumentError(
            f"key must be at least {_MIN_KEY} bytes long, got {len(key)} bytes; "
            "use e.g. secrets.token_bytes(32)"
        )
    return bytes(key)


def _payload(codec: str | None, data: bytes | None, table_ipc: bytes | None) -> Payload | None:
    """A payload read back (``_rows.ReadPayload``): its table was kept as an IPC stream."""
    from .._codecs import Payload

    if codec is None:
        return None
    table = read_ipc(table_ipc) if table_ipc is not None else None
    return Payload(codec, data if data is not None else b"", table)


def _ipc(p: Payload | None) -> bytes | None:
    return ipc_bytes(p.table) if p is not None and p.table is not None else None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _WorkSignal:
    """Wake-ups for ``wait_for_work``, never missed: a counter each waiting thread compares
    with the value it saw last (an Event cleared by one waiter would hide a wake-up from
    another thread of the same process, such as a worker and a job watcher). ``claimable``
    counts the wake-ups that may mean a run to claim (not a run that ended, not a signal)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self.claimable = 0
        self._seen = threading.local()

    def set(self, claimable: bool = True) -> None:
        with self._cond:
            self._seq += 1
            self.claimable += claimable
            self._cond.notify_all()

    def mark(self) -> None:
        """This thread has looked for work now: a wake-up after this ends its next wait."""
        with self._cond:
            self._seen.seq = self._seq

    def wait(self, timeout: float) -> None:
        with self._cond:
            seen = getattr(self._seen, "seq", None)
            if seen is None or seen == self._seq:
                start = self._seq
                self._cond.wait_for(lambda: self._seq != start, timeout)
            self._seen.seq = self._seq


class PostgresStore(PgQueues):
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
        url, lease_seconds = _lease_from_url(url, lease_seconds)
        self._conninfo, self._schema, self._url = _split_url(url, schema)
        raw_key = _resolve_key(key)
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
        self._work = _WorkSignal()
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
    def _effect_row(self, rec: EffectRecord) -> tuple[Any, ...]:
        p = rec.payload
        for name in ("scope", "identity", "version", "input_hash", "kind", "detail"):
            text = getattr(rec, name)
            if "\x00" in text:  # checked here: grouped rows go as binary arrays, refused late
                raise StoreError(
                    f"the PostgreSQL store {self._url!r} refused a request: PostgreSQL text "
                    f"fields cannot contain NUL (0x00) characters, and the effect's {name} "
                    f"{text!r} has one; remove it"
                )
        return _rows.effect_row(rec, _ipc(p))

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
        fence = self._fence_of(effects, runs, events)
        if loop is not None:  # written by the loop itself, on a connection of its own
            writer = self._loop_writers.get(loop)
            if writer is None:
                with self._lock:  # loops of several threads (the engine's, a worker's)
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

    # ------------------------------------------------------------------ fencing
    def _fence_of(
        self,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
    ) -> list[str]:
        """The lease tokens a write depends on: those of the runs whose records it holds
        that this store took a lease for (others' writes, e.g. queueing a run, are free)."""
        fences = self._fences
        if not fences:
            return []
        if len(effects) == 1 and not runs and not events:  # an effect's record: most writes
            token = fences.get(run_of_scope(effects[0].scope) or "")
            return [] if token is None else [token]
        run_ids = {run_of_scope(rec.scope) for rec in effects}
        run_ids.update(run.run_id for run in runs)
        run_ids.update(event.run_id for event in events)
        return sorted({t for r in run_ids if r is not None and (t := fences.get(r)) is not None})

    def _fence_of_run(self, run_id: str) -> list[str]:
        token = self._fences.get(run_id)
        return [] if token is None else [token]

    def _fenced_done(self, fence: list[str], done: Done) -> Done:
        if not fence:
            return done

        def told(error: BaseException | None) -> None:
            if isinstance(error, RunLockedError):
                error = self._refused(fence, error)
            done(error)

        return told

    def _refused(self, fence: list[str], error: RunLockedError) -> RunLockedError:
        """A write the server refused because a lease it depends on is not live any more:
        the runs of those leases stop here (another process may hold them), and the error
        names them."""
        runs = sorted({r for r, t in list(self._fences.items()) if t in fence})
        lost: list[RunLease] = []
        with self._lock:  # a write holds the records of one run (or of a run and its scopes)
            for token in fence:
                self._held.pop(token, None)
                if (lease := self._lease_objs.pop(token, None)) is not None:
                    lost.append(lease)
        self._fence(lost)
        refused = RunLockedError(
            f"run{'s' if len(runs) != 1 else ''} {', '.join(map(repr, runs)) or '?'} lost "
            f"{'their leases' if len(runs) > 1 else 'its lease'}: it expired while this "
            "process was stalled or cut off from the server, and another process may have "
            "taken the run over, so the store refused this process's write; the run stops "
            "here and resumes wherever it is executed next"
        )
        refused.__cause__ = error.__cause__
        return refused

    def get_effect(self, key: EffectKey) -> EffectRecord | None:
        q = self._q["get_effect"]
        row = self._call(lambda conn: conn.execute(q, key, binary=True).fetchone())
        return _rows.effect_from_row(row, _payload) if row is not None else None

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
                rec = _rows.effect_from_row(row, _payload)
                if (n := where.get(rec.key)) is not None:
                    out[n] = rec
        return out

    def load_effects(self, scope: str) -> list[EffectRecord]:
        q = self._q["load_effects"]
        rows = self._call(lambda conn: conn.execute(q, [scope], binary=True).fetchall())
        return [_rows.effect_from_row(r, _payload) for r in rows]

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

    # ------------------------------------------------------------------ shared limits
    def limit_take(
        self,
        name: str,
        slot: str,
        concurrency: int | None,
        calls: int | None,
        window: float | None,
        hold: float,
    ) -> float | None:
        s = sql.Identifier(self._schema)

        def take(conn: _Conn) -> float | None:
            with conn.transaction():
                # one taker per limit name at a time, in every process: count, then insert
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
                    ["durable_nb limit " + name],
                )
                row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
                now = float(row[0]) if row else 0.0
                if concurrency is not None:
                    conn.execute(
                        sql.SQL(
                            "DELETE FROM {}.dn_limit_slots WHERE name = %s "
                            "AND expires_at <= clock_timestamp()"
                        ).format(s),
                        [name],
                    )
                    held = conn.execute(
                        sql.SQL("SELECT count(*) FROM {}.dn_limit_slots WHERE name = %s").format(s),
                        [name],
                    ).fetchone()
                    if held is not None and int(held[0]) >= concurrency:
                        return 0.0
                if calls is not None and window is not None:
                    conn.execute(
                        sql.SQL(
                            "DELETE FROM {}.dn_limit_starts WHERE name = %s AND at <= %s"
                        ).format(s),
                        [name, now - window],
                    )
                    got = conn.execute(
                        sql.SQL(
                            "SELECT count(*), min(at) FROM {}.dn_limit_starts WHERE name = %s"
                        ).format(s),
                        [name],
                    ).fetchone()
                    if got is not None and int(got[0]) >= calls:
                        return max(float(got[1]) + window - now, 1e-3)
                    conn.execute(
                        sql.SQL("INSERT INTO {}.dn_limit_starts VALUES (%s, %s)").format(s),
                        [name, now],
                    )
                if concurrency is not None:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {}.dn_limit_slots VALUES "
                            "(%s, %s, clock_timestamp() + make_interval(secs => %s))"
                        ).format(s),
                        [name, slot, float(hold)],
                    )
                return None

        return self._call(take)

    def limit_give(self, name: str, slot: str) -> None:
        q = sql.SQL("DELETE FROM {}.dn_limit_slots WHERE name = %s AND slot = %s").format(
            sql.Identifier(self._schema)
        )
        self._call(lambda conn: conn.execute(q, [name, slot]))

    def release_effect(self, key: EffectKey, owner: str) -> None:
        q = self._q["release_effect"]
        params = (*key, owner)
        self._call(lambda conn: conn.execute(q, params))

    # ------------------------------------------------------------------ runs
    @staticmethod
    def _run_row(run: RunRecord) -> tuple[Any, ...]:
        return _rows.run_row(run, [_ipc(run.args), _ipc(run.result), _ipc(run.error)])

    def _run_from_row(self, r: Sequence[Any]) -> RunRecord:
        return _rows.run_from_row(r, _payload)

    def _run_statements(self, runs: Sequence[RunRecord]) -> list[Statement]:
        q = self._q["put_run"]
        return [(q, (*self._run_row(run), self._channel)) for run in runs]

    def put_run(self, run: RunRecord) -> None:
        self._check_open()
        self._write([], self._run_statements([run]), self._fence_of(runs=[run]))

    def get_run(self, run_id: str) -> RunRecord | None:
        q = self._q["get_run"]
        row = self._call(lambda conn: conn.execute(q, [run_id], binary=True).fetchone())
        return _rows.run_from_row(row, _payload) if row is not None else None

    def _get_runs(self, run_ids: list[str]) -> dict[str, RunRecord]:
        q = self._q["get_runs"]
        rows = self._call(lambda conn: conn.execute(q, [run_ids], binary=True).fetchall())
        runs = (_rows.run_from_row(r, _payload) for r in rows)
        return {run.run_id: run for run in runs}

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        clause, params = query.sql("%s")
        q = self._q["list_runs"] + clause
        rows = self._call(lambda conn: conn.execute(q, params, binary=True).fetchall())
        return [_rows.run_from_row(r, _payload) for r in rows]

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

    def _check_fence(self, conn: _Conn, fence: list[str]) -> None:
        """Last in a transaction that rewrites or deletes a run this store holds: it fails
        (and with it everything the transaction did) unless the lease is still live, and
        holds the lease row until the commit, as the group writes do (``Sql.fence``)."""
        if fence:
            conn.execute(self._q["fence"], [len(fence), " ".join(fence)])

    def _fenced_call(self, fn: Callable[[_Conn], _T], fence: list[str]) -> _T:
        try:
            return self._call(fn)
        except RunLockedError as e:
            if not fence:
                raise
            raise self._refused(fence, e) from e.__cause__

    # ------------------------------------------------------------------ leases
    def _holder_info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname()})

    def _session_key(self) -> int:
        """This store's session key, opening the session if needed."""
        self._check_open()
        try:
            return self._session.key()
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        except psycopg.Error as e:
            self._check_open()
            raise self._translate(e) from e

    def _token(self) -> str:
        """A fresh lease token, starting with this store's session key: the lease lives as
        long as the session does, or until it expires."""
        return f"{self._session_key()}.{secrets.token_hex(12)}"

    def _session_lost(self, key: int) -> None:
        """This store's session ended (its connection failed): every lease taken under it
        may be taken over by others after the grace, so their runs stop now (fencing)."""
        lost: list[RunLease] = []
        with self._lock:
            for token in [t for t in self._held if session_key_of(t) == key]:
                del self._held[token]
                lease = self._lease_objs.pop(token, None)
                if lease is not None:
                    lost.append(lease)
        self._fence(lost)

    @staticmethod
    def _fence(lost: list[RunLease]) -> None:
        for lease in lost:  # outside the lock: the engine interrupts the run
            release = lease._release
            try:
                lease.lost()
            except Exception:
                _log.exception("durable_nb: interrupting run %r failed", lease.run_id)
            # the engine releases it once the run stopped: that forgets the run's fence (its
            # late writes are refused until then) and leaves the lease row, not ours any more
            lease._release = release

    def _lease(self, run_id: str, owner: str, token: str) -> RunLease | None:
        """Hand out the lease just written, or ``None`` if its session ended meanwhile (the
        row is then deleted again, best effort: it is free for the taking anyway)."""
        lease = RunLease(run_id, owner)
        key = session_key_of(token)
        with self._lock:
            live = key is not None and self._session.is_live(key)
            if live:
                self._held[token] = run_id
                self._lease_objs[token] = lease
                self._fences[run_id] = token
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(
                        target=self._heartbeat_loop, name="durable_nb-pg-heartbeat", daemon=True
                    )
                    self._heartbeat.start()
        q = self._q["release"]

        def release() -> None:
            with self._lock:
                self._lease_objs.pop(token, None)
                if self._fences.get(run_id) == token:
                    del self._fences[run_id]
                if self._held.pop(token, None) is None or self._closed:
                    return  # lost (taken over after it expired) or released by close()
            try:
                self._call(lambda conn: conn.execute(q, [run_id, token, self._channel]))
            except StoreError as e:  # the lease expires by itself; nothing else to undo
                _log.warning("durable_nb: could not release the lease of run %r: %s", run_id, e)

        if not live:
            with contextlib.suppress(StoreError):
                self._call(lambda conn: conn.execute(q, [run_id, token, self._channel]))
            return None
        lease._release = release
        return lease

    def acquire_run(self, run_id: str, owner: str) -> RunLease:
        qa, qh, qc = self._q["acquire"], self._q["holder"], self._q["condemn"]
        grace = {"grace": TAKEOVER_GRACE, "run_id": run_id}
        while True:
            token = self._token()
            params = (run_id, token, owner, self._holder_info(), self._lease_seconds)

            def acquire(
                conn: _Conn, params: tuple[Any, ...] = params
            ) -> tuple[str, str, float] | None:
                while True:
                    if conn.execute(qa, params).fetchone() is not None:
                        return None
                    # a holder whose session ended keeps the run only for the grace
                    conn.execute(qc, grace)
                    row = conn.execute(qh, [run_id]).fetchone()
                    if row is not None:  # else released meanwhile: try again
                        return (row[0], row[1], row[2])

            held = self._call(acquire)
            if held is None:
                lease = self._lease(run_id, owner, token)
                if lease is None:
                    continue  # our own session ended meanwhile: take it under the next one
                return lease
            holder_owner, holder_json, remaining = held
            if remaining <= TAKEOVER_GRACE:
                # ending now (expired, or its holder is gone): wait for it rather than refuse
                time.sleep(max(remaining, 0.0) + 0.01)
                continue
            break
        try:
            info = json.loads(holder_json)
        except ValueError:
            info = {}
        raise RunLockedError(
            f"run {run_id!r} is being executed by {holder_owner} (process "
            f"{info.get('pid', '?')} on {info.get('host', '?')}); its lease has "
            f"{max(remaining, 0.0):.1f}s left and is renewed while that process lives — wait "
            "for it to finish, or stop that process: the run is taken over within a second of "
            "that process ending (or when its lease expires, if its host died)"
        )

    def _claim_run(self, owner: str, names: list[str]) -> tuple[RunRecord, RunLease] | None:
        self._work.mark()  # work arriving while we look must end the next wait_for_work
        self._check_open()
        if not names:
            return None
        # _pg_queues: queue limits hold, no sessions (no node)
        got = self._idle_claim((None, *names), lambda: self._claim(owner, names, None))
        return None if got is None else (got[0], got[1])

    def claim_routed(self, node: Node) -> tuple[RunRecord, RunLease, Route | None] | None:
        self._work.mark()
        self._check_open()
        return self._idle_claim(
            (node.node_id, *node.workflows), lambda: self._claim(node.owner, node.workflows, node)
        )

    def _idle_claim(
        self, which: tuple[str | None, ...], claim: Callable[[], _Claimed | None]
    ) -> _Claimed | None:
        """``claim()``, unless the last claim of ``which`` (a worker's node, or the workflows
        of a claim without one) found nothing and nothing since may mean a run to claim: a
        claim that found nothing is not repeated until a run was queued or let go, or a run
        of a queue with a concurrency limit ended (notifications), or _CONDEMN_EVERY passed
        (what only time changes: a rate window, a session's idle timeout, dead holders).
        Idle workers, woken by every run that ends anywhere, would otherwise all ask the
        server each time."""
        seen = self._work.claimable
        idle = self._idle.get(which)
        listening = self._listener is not None and self._listener.is_alive()
        if listening and idle is not None and idle[0] == seen and time.monotonic() < idle[1]:
            return None
        got = claim()
        if got is None:
            self._idle[which] = (seen, time.monotonic() + _CONDEMN_EVERY)
        else:
            self._idle.pop(which, None)
        return got

    def _condemn_dead(self) -> bool:
        # nothing to claim: are runs held by processes that died? Their leases end after the
        # grace; the caller looks once more after it (at most every _CONDEMN_EVERY s)
        now = time.monotonic()
        if now < self._next_condemn:
            return False
        self._next_condemn = now + _CONDEMN_EVERY
        q = self._q["condemn_all"]
        if not self._call(lambda conn: conn.execute(q, {"grace": TAKEOVER_GRACE}).fetchall()):
            return False
        time.sleep(TAKEOVER_GRACE + 0.01)
        return True

    def _renew(self, tokens: list[str]) -> set[str]:
        """Renew the leases of ``tokens``; returns the ones still ours."""
        q = self._q["renew"]
        rows = self._call(lambda conn: conn.execute(q, [self._lease_seconds, tokens]).fetchall())
        return {r[0] for r in rows}

    def _heartbeat_loop(self) -> None:
        renewed = time.monotonic()  # the leases are ours until at least this + lease_seconds
        # renewals run on a thread of their own: one that hangs (a server that stopped
        # answering on a connection that stays open) must not keep this loop from fencing
        beats = concurrent.futures.ThreadPoolExecutor(1, "durable_nb-pg-renew")
        try:
            while not self._stop.wait(self._lease_seconds / 3):
                with self._lock:
                    tokens = list(self._held)
                sent = time.monotonic()
                if not tokens:
                    renewed = sent
                    continue
                left = renewed + self._lease_seconds - sent
                try:
                    kept = beats.submit(self._renew, tokens).result(timeout=max(left, 0.001))
                except (StoreError, concurrent.futures.TimeoutError) as e:
                    # the next beat tries again: leases outlive an outage shorter than them
                    if self._closed:
                        continue
                    _log.warning(
                        "durable_nb: could not renew run leases: %s",
                        e if str(e) else "no answer from the server",
                    )
                    if time.monotonic() - renewed < self._lease_seconds:
                        continue
                    kept = set()  # expired by now: another process may hold them
                else:
                    renewed = sent
                self._expire([t for t in tokens if t not in kept])
        finally:
            beats.shutdown(wait=False)

    def _expire(self, tokens: list[str]) -> None:
        """These leases were not renewed in time: another process may hold them now."""
        lost: list[RunLease] = []
        with self._lock:
            for token in tokens:
                if run_id := self._held.pop(token, None):
                    _log.warning(
                        "durable_nb: the lease of run %r expired before it was renewed and "
                        "another process may have taken the run over; this process stops "
                        "executing it",
                        run_id,
                    )
                    lease = self._lease_objs.pop(token, None)
                    if lease is not None:
                        lost.append(lease)
        self._fence(lost)

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

    def _event_statements(self, events: Sequence[EventRecord]) -> list[Statement]:
        q = self._q["put_event"]
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
