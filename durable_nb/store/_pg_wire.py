"""A PostgreSQL connection an event loop drives itself: libpq's pipeline mode, no cursor.

The engine's loop writes every record of a run on a PostgreSQL store (``_pg_commit.LoopCommit``),
so what a write costs the loop in Python bounds how many effects a process records per
second. psycopg's ``AsyncConnection.execute`` builds a cursor, converts the query, looks up its
prepared-statement cache and, for every wait on the socket, registers the socket with the loop
and removes it again; a transaction of several statements adds a pipeline and a transaction
block around them. Measured on the benchmark machine: ~105-115 µs of CPU per one-row insert,
against ~50-60 µs for the same write through libpq's own calls with the socket registered once.

:class:`LoopConnection` is that lean path. It takes a connection psycopg opened (so
connecting, authentication, TLS and the adapters are psycopg's), puts its libpq connection in
pipeline mode, and from then on sends a *group* of statements and one Sync: between two Syncs
the server runs the statements as one implicit transaction, committed at the Sync, and an
error aborts the rest — the group is all or nothing. Statements are prepared once per
connection (by text and parameter types); parameters are dumped by psycopg's
:class:`~psycopg.adapt.Transformer` (its C dumpers), or given already encoded
(:class:`Encoded`, e.g. the binary arrays of :func:`binary_array`). Errors are psycopg's own
exception classes (by SQLSTATE), so callers translate them as they do psycopg's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import Buffer
from psycopg.adapt import PyFormat, Transformer

__all__ = ["Answered", "Encoded", "LoopConnection", "binary_array", "placeholders", "settle"]

#: told, on the loop, the outcome of a group sent with a callback: None once it committed,
#: else its first error (a psycopg exception)
Answered = Callable[[BaseException | None], None]

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


class Encoded:
    """A parameter already in PostgreSQL's binary format, with its type's oid."""

    __slots__ = ("data", "oid")

    def __init__(self, oid: int, data: bytes) -> None:
        self.oid = oid
        self.data = data


# ---------------------------------------------------------------------------- queries
_PLACEHOLDER = re.compile(r"%(%|s|b)")


def placeholders(query: str) -> tuple[bytes, int]:
    """``query`` with psycopg's ``%s``/``%b`` placeholders as ``$1``, ``$2``... (``%%`` is a
    ``%``), and its number of parameters. Named placeholders are not supported."""
    n = 0

    def number(m: re.Match[str]) -> str:
        nonlocal n
        if m.group(1) == "%":
            return "%"
        n += 1
        return f"${n}"

    if "%(" in query:
        raise ValueError(f"named placeholders are not supported: {query[:80]!r}")
    return _PLACEHOLDER.sub(number, query).encode(), n


# ---------------------------------------------------------------------------- arrays
#: element type name -> (element oid, array oid, encoder of one non-null element)
_ELEMENT: dict[str, tuple[int, int, Any]] = {
    "text": (25, 1009, str.encode),
    "bytea": (17, 1001, bytes),
    "bigint": (20, 1016, struct.Struct("!q").pack),
    "float8": (701, 1022, struct.Struct("!d").pack),
    "boolean": (16, 1000, lambda v: b"\x01" if v else b"\x00"),
}
_LEN = struct.Struct("!i").pack
_NULL = _LEN(-1)
_HEADER = struct.Struct("!iiIii")


def binary_array(type_name: str, values: Sequence[Any]) -> Encoded:
    """A one-dimensional array of ``type_name`` (text, bytea, bigint, float8, boolean) in
    PostgreSQL's binary format; None is NULL. One pass of C-level packing per element, where
    psycopg's list dumper walks the list in Python."""
    elem_oid, array_oid, encode = _ELEMENT[type_name]
    parts = [_HEADER.pack(1, 0, elem_oid, len(values), 1)]
    append = parts.append
    for v in values:
        if v is None:
            append(_NULL)
        else:
            data = encode(v)
            append(_LEN(len(data)))
            append(data)
    return Encoded(array_oid, b"".join(parts))


# ---------------------------------------------------------------------------- connection
class LoopConnection:
    """One connection, used by one event loop (every method but :meth:`close_threadsafe`
    runs on it), one group at a time (``_pg_commit.LoopCommit`` sends one after another).

    The loop watches the socket from the start to the close (registering it per group
    cost two ``epoll_ctl`` calls, ~15 µs, on every write's path); the socket is closed on
    the loop's thread only, after it stopped watching, so the loop never watches a
    descriptor a new connection may have been given."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._conn = conn  # owns the libpq connection; only closed through it
        self._pg = conn.pgconn
        self._loop = loop
        self._tx = Transformer(conn)
        self._prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._names = itertools.count()  # a name is never reused, even once forgotten
        self._parsed: dict[str, tuple[bytes, int]] = {}
        self._writable: asyncio.Future[None] | None = None  # while a send waits for room
        self._answer: _Answer | None = None  # a group sent with a callback, until answered
        self._draining = False  # that group's bytes wait for room in the socket
        self._failure: BaseException | None = None
        self._socket = self._pg.socket
        self._watching = True
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()
        loop.add_reader(self._socket, self._readable)

    @classmethod
    async def connect(
        cls, conninfo: str, kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop
    ) -> LoopConnection:
        # UTF-8 whatever the database's encoding: binary_array packs text as UTF-8
        conn = await psycopg.AsyncConnection.connect(
            conninfo, **{**kwargs, "autocommit": True, "client_encoding": "UTF8"}
        )
        return cls(conn, loop)

    @property
    def backend_pid(self) -> int:
        """The server process serving this connection."""
        return self._pg.backend_pid

    @property
    def broken(self) -> bool:
        return self._failure is not None or self._pg.status != pq.ConnStatus.OK

    def close(self) -> None:
        """Close now, on the loop's thread (a waiting group fails)."""
        self._fail(psycopg.OperationalError("the connection was closed"))
        if self._writable is not None:  # before the descriptor goes: no stale key is left
            self._loop.remove_writer(self._socket)
        self._pg.finish()

    def close_threadsafe(self) -> None:
        """Close from another thread: on the loop if it still runs, else right here."""
        loop = self._loop
        if not loop.is_closed() and loop.is_running():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: then here
                loop.call_soon_threadsafe(self.close)
                return
        if not loop.is_closed():  # a group under way is told; nothing stays watched
            self._fail(psycopg.OperationalError("the connection was closed"))
        self._pg.finish()

    # ------------------------------------------------------------------ a group
    async def run(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Run ``statements`` as one transaction: all committed when this returns, or none
        (the first error is raised, a psycopg exception)."""
        sent = self.send(statements)
        if sent is None:
            await self._prepare(statements)
            sent = self.send(statements)
            assert sent is not None
        await self.finish(sent)

    def send(
        self, statements: Sequence[tuple[str, Sequence[Any]]], then: Answered | None = None
    ) -> int | None:
        """Send ``statements`` as one transaction, if each is prepared on this connection
        (else send nothing and return None: :meth:`run` prepares them first); the number of
        statements sent, for :meth:`finish`. Called as soon as a group is known, it has the
        server at work while the loop goes on.

        With ``then``, nobody awaits :meth:`finish`: the socket's reader collects the answer
        and calls ``then`` with the outcome (on the loop, once), so a commit's answer reaches
        its writers in the loop turn it arrives in, with no task woken in between (and a
        close or a broken connection calls it with the error)."""
        if self._failure is not None:
            raise self._failure
        if self._answer is not None:  # one group at a time: its answer is not read yet
            raise psycopg.InterfaceError("a group sent with a callback is still under way")
        sends = []
        for query, params in statements:
            values, types, formats = self._dump(params)
            name = self._prepared.get((query, types))
            if name is None:
                return None
            sends.append((name, values, formats))
        pg = self._pg
        try:
            for name, values, formats in sends:
                pg.send_query_prepared(name, values, param_formats=formats)
            pg.pipeline_sync()
            unsent = pg.flush()  # what does not fit in the socket now, finish() sends
        except psycopg.OperationalError as e:
            self._fail(e)
            raise
        if then is not None:
            self._answer = _Answer(len(sends), then)
            if unsent:  # the rest goes as the socket drains
                self._draining = True
                self._loop.add_writer(self._socket, self._drain)
        return len(sends)

    async def finish(self, sent: int) -> None:
        """Wait for the group :meth:`send` sent: return once it committed, or raise its
        first error."""
        if self._answer is not None:  # its answer goes to the callback, not here
            raise psycopg.InterfaceError("a group sent with a callback is still under way")
        try:
            await self._flush()
            error = await self._collect(sent)
        except psycopg.OperationalError as e:
            self._fail(e)
            raise
        if error is not None:
            raise error

    async def _prepare(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Prepare the statements not prepared yet, in a pipeline of their own (a failed
        group cannot undo them)."""
        new: list[tuple[bytes, bytes, tuple[int, ...]]] = []
        for query, params in statements:
            types = self._dump(params)[1]
            if (query, types) not in self._prepared:
                name = f"dn_{next(self._names)}".encode()
                new.append((name, self._parse(query), types))
                self._prepared[(query, types)] = name
        pg = self._pg
        try:
            for name, text, types in new:
                pg.send_prepare(name, text, param_types=types)
            pg.pipeline_sync()
            await self._flush()
            error = await self._collect(len(new))
        except psycopg.OperationalError as e:
            self._fail(e)
            raise
        if error is not None:
            for name, _, _ in new:
                self._forget(name)
            raise error

    def _parse(self, query: str) -> bytes:
        parsed = self._parsed.get(query)
        if parsed is None:
            parsed = self._parsed[query] = placeholders(query)
        return parsed[0]

    def _forget(self, name: bytes) -> None:
        for key, value in list(self._prepared.items()):
            if value == name:
                del self._prepared[key]

    def _dump(
        self, params: Sequence[Any]
    ) -> tuple[list[Buffer | None], tuple[int, ...], list[int]]:
        """The parameters in wire form: values, type oids, formats (0 text, 1 binary)."""
        tx = self._tx
        if Encoded not in map(type, params):  # (in C: a one-row write has 17 parameters)
            values = list(tx.dump_sequence(params, [PyFormat.AUTO] * len(params)))
            return values, tuple(tx.types or ()), list(tx.formats or ())
        out: list[Buffer | None] = []
        types: list[int] = []
        formats: list[int] = []
        for p in params:
            if isinstance(p, Encoded):
                out.append(p.data)
                types.append(p.oid)
                formats.append(1)
            else:
                out += tx.dump_sequence([p], [PyFormat.AUTO])
                types += tx.types or ()
                formats += tx.formats or ()
        return out, tuple(types), formats

    # ------------------------------------------------------------------ the socket
    def _readable(self) -> None:
        try:
            self._pg.consume_input()
        except psycopg.OperationalError as e:
            self._fail(e)
            return
        if self._answer is not None:
            self._read_answer(self._answer)

    def _read_answer(self, answer: _Answer) -> None:
        """Read what has arrived of a callback group's answer (as :meth:`_collect` does);
        once its Sync is read, tell the outcome."""
        pg = self._pg
        while not pg.is_busy():
            res = pg.get_result()
            if answer.left:  # a command's results, then None
                if res is None:
                    answer.left -= 1
                elif answer.error is None and res.status not in _OK:
                    answer.error = _error(res, self._conn)
            elif res is not None and res.status == pq.ExecStatus.PIPELINE_SYNC:
                self._answer = None  # before telling: the callback may send the next group
                answer.then(answer.error)
                return

    def _drain(self) -> None:
        try:
            unsent = self._pg.flush()
        except psycopg.OperationalError as e:
            self._fail(e)
            return
        if not unsent and self._draining:
            self._draining = False
            self._loop.remove_writer(self._socket)

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
            self._unwatch()
        if self._draining:  # before the descriptor goes: no stale key is left
            self._draining = False
            self._loop.remove_writer(self._socket)
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_exception(error)
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.then(error)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._socket)

    async def _flush(self) -> None:
        while self._pg.flush():  # the socket's buffer is full: wait until it drains
            if self._failure is not None:
                raise self._failure
            writable = self._writable = self._loop.create_future()
            self._loop.add_writer(self._socket, settle, writable)
            try:
                await writable  # a close meanwhile fails it (_fail)
            finally:
                self._writable = None
                self._loop.remove_writer(self._socket)

    async def _collect(self, commands: int) -> psycopg.Error | None:
        """Read the results of ``commands`` commands and the Sync after them, as the
        socket's reader reads a callback group's (:meth:`_read_answer`); the first error,
        if any (the commands after it were skipped). A broken connection raises."""
        if self._failure is not None:
            raise self._failure
        told: asyncio.Future[BaseException | None] = self._loop.create_future()

        def tell(error: BaseException | None) -> None:
            if not told.done():
                told.set_result(error)

        answer = self._answer = _Answer(commands, tell)
        self._read_answer(answer)  # what has arrived already
        error = await told
        if error is not None and error is self._failure:
            raise error
        return answer.error


class _Answer:
    """A group sent with a callback: commands whose results are still to read, its first
    error, and whom to tell."""

    __slots__ = ("error", "left", "then")

    def __init__(self, commands: int, then: Answered) -> None:
        self.left = commands
        self.error: psycopg.Error | None = None
        self.then = then


def settle(future: asyncio.Future[None]) -> None:
    """Set ``future``'s result to None unless it is done (a wake-up that may come twice)."""
    if not future.done():
        future.set_result(None)


def _error(res: pq.abc.PGresult, conn: psycopg.AsyncConnection[Any]) -> psycopg.Error:
    if res.status == pq.ExecStatus.PIPELINE_ABORTED:
        return psycopg.errors.PipelineAborted("the group was aborted by an earlier error")
    sqlstate = (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    try:
        cls = psycopg.errors.lookup(sqlstate)
    except KeyError:
        cls = psycopg.DatabaseError
    message = res.error_message.decode("utf-8", "replace").strip()
    return cls(message, info=res, encoding=conn.info.encoding)
