"""Group commit for the PostgreSQL store: writes that arrive together share one transaction.

A commit costs a WAL flush (about 0.27 ms on the benchmark machine with
``synchronous_commit=on``) whatever the transaction holds, and every run executing in a
process records its effects through the same store. So the store funnels its record writes
(effects, run records, events) through one writer thread with a connection of its own: while
it commits one group, the next one gathers, and 50 runs whose effects complete at the same
moment share one round trip and one flush. A writer learns its outcome only once the
transaction holding its writes committed — durable — never before. A group that fails for
a reason other than the connection is retried write by write, so one bad record fails only
the caller that sent it.

:class:`LoopCommit` is the same on the engine's event loop, with an asyncio connection: the
loop sends a group and serves other runs until the server answers, and no thread stands
between the loop and the server (two thread wake-ups per write cost more than the write's
own CPU on a busy machine), nor a task between the server's answer and the writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ._pg_wire import LoopConnection, binary_array, settle
from ._protocol import WriteDone

__all__ = ["Done", "GroupCommit", "LoopCommit", "Sql"]

_log = logging.getLogger(__name__)

#: the most writes :class:`LoopCommit` puts in one group: runs woken by one commit all write
#: at once, and in one group the loop would sit idle while it commits; in two, it executes
#: the runs of one while the server commits the other
LOOP_GROUP = 32
#: seconds :class:`LoopCommit`'s task stays after its writer's last group
_LINGER = 1.0

#: told the outcome of a write: None once it is durable, else the error (already translated)
Done = WriteDone
_Conn = psycopg.Connection[tuple[Any, ...]]
Statement = tuple[str, Sequence[Any]]


class _Write:
    __slots__ = ("done", "effects", "fence", "statements", "told")

    def __init__(
        self,
        effects: Sequence[tuple[Any, ...]],
        statements: Sequence[Statement],
        done: Done,
        fence: Sequence[str] = (),
    ) -> None:
        self.effects = effects
        self.statements = statements
        self.done = done
        self.fence = fence  # lease tokens the write is conditional on (its runs' leases)
        self.told = False


class Sql:
    """The statements a writer runs: ``one`` upserts one effect row; ``many`` upserts rows
    given as one array per column (``unnest``); ``many_fenced`` is ``many`` that first checks
    the leases ``fence`` names (count, tokens joined by spaces), ``one_fenced`` likewise for one row; ``fence``
    alone, for a group without effects.
    A fence check fails its transaction (``division_by_zero``) unless every token it names is
    a live lease, and holds those lease rows (``FOR SHARE``) until the transaction ends, so a
    takeover, which rewrites the row, waits for the write and sees it."""

    __slots__ = ("fence", "many", "many_fenced", "one", "one_fenced", "types")

    def __init__(
        self,
        one: str,
        many: str,
        one_fenced: str,
        many_fenced: str,
        fence: str,
        types: Sequence[str],
    ) -> None:
        self.one, self.many, self.fence = one, many, fence
        self.one_fenced, self.many_fenced = one_fenced, many_fenced
        self.types = tuple(types)  # the SQL types of an effect row's columns


class GroupCommit:
    """The writer thread. ``statements`` says how to write effect rows (tuples whose first 5
    values are the effect key). ``translate`` turns a psycopg error into the store's error."""

    def __init__(
        self,
        connect: Callable[[], _Conn],
        statements: Sql,
        translate: Callable[[BaseException], BaseException],
        name: str,
    ) -> None:
        self._connect = connect
        self._sql = statements
        self._translate = translate
        self._name = name
        self._cond = threading.Condition()
        self._queue: list[_Write] = []
        self._committing = False  # a thread (the writer or a caller) is committing a group
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: _Conn | None = None
        self.groups = 0  # transactions committed (for tests and benchmarks)

    # ----------------------------------------------------------------- callers
    # Leader and followers: a caller that blocks anyway (:meth:`write`) commits the queue
    # itself when nobody is committing, and otherwise waits for the committer, which takes its
    # write along; callers that cannot block (:meth:`submit`) leave it to the writer thread.
    # So an uncontended write costs no thread hand-off, and concurrent ones share commits.

    def submit(
        self,
        effects: Sequence[tuple[Any, ...]],
        statements: Sequence[Statement],
        done: Done,
        fence: Sequence[str] = (),
    ) -> None:
        """Queue a write; ``done`` is called (on the thread that commits it) once it
        committed or failed. ``fence``: lease tokens that must be live for it to commit."""
        write = _Write(effects, statements, done, fence)
        with self._cond:
            if self._closing:
                raise psycopg.InterfaceError("the store's writer is closed")
            self._queue.append(write)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name=f"{self._name}-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def write(
        self,
        effects: Sequence[tuple[Any, ...]],
        statements: Sequence[Statement],
        fence: Sequence[str] = (),
    ) -> None:
        """Write and wait until it is durable; raises the store's error if it failed."""
        outcome: list[BaseException | None] = []
        write = _Write(effects, statements, outcome.append, fence)
        with self._cond:
            if self._closing:
                raise psycopg.InterfaceError("the store's writer is closed")
            self._queue.append(write)
            while not outcome:
                if self._committing:
                    self._cond.wait()
                else:
                    self._lead()
        if outcome[0] is not None:
            raise outcome[0]

    def close(self) -> None:
        """Commit what is queued, then stop the thread and close the connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._cond:
            while self._committing:  # a caller leading a commit
                self._cond.wait()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # ----------------------------------------------------------------- committing
    def _lead(self) -> None:
        """Commit everything queued (called holding the lock, nobody committing)."""
        self._committing = True
        group, self._queue = self._queue, []
        self._cond.release()
        try:
            self._commit(group)
        except BaseException:  # the leading caller was interrupted (Ctrl-C): tell the others
            cut = self._translate(psycopg.InterfaceError("the write was interrupted"))
            for write in group:
                if not write.told:
                    _tell(write, cut)
            raise
        finally:
            self._cond.acquire()
            self._committing = False
            self._cond.notify_all()

    def _serve(self) -> None:
        with self._cond:
            while True:
                while (not self._queue or self._committing) and not self._closing:
                    self._cond.wait()
                if self._committing:  # closing: let the caller that leads finish
                    self._cond.wait()
                    continue
                if not self._queue:
                    return
                self._lead()

    def _commit(self, group: list[_Write]) -> None:
        try:
            self._write_group(group)
        except Exception as e:
            if len(group) > 1 and not isinstance(e, psycopg.OperationalError):
                for write in group:  # find the culprit: each write alone
                    try:
                        self._write_group([write])
                    except Exception as e1:
                        _tell(write, self._translate(e1))
                    else:
                        _tell(write, None)
                return
            error = self._translate(e)
            for write in group:
                _tell(write, error)
            return
        self.groups += 1
        for write in group:
            _tell(write, None)

    def _write_group(self, group: list[_Write]) -> None:
        """One transaction for the group; once more on a fresh connection if the server
        dropped this one (every write here is an upsert, so repeating it is harmless)."""
        for attempt in range(2):
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = self._connect()
            try:
                self._execute(conn, group)
                return
            except psycopg.OperationalError:
                if attempt == 0 and (conn.closed or conn.broken):
                    self._conn = None
                    continue
                raise

    def _execute(self, conn: _Conn, group: list[_Write]) -> None:
        plan = _plan(group, self._sql, _columns)
        if len(plan) == 1:  # the common case: one statement, one round trip (autocommit)
            conn.execute(*plan[0])
            return
        with conn.pipeline(), conn.transaction():
            for query, params in plan:
                conn.execute(query, params)


class LoopCommit:
    """Group commit on one event loop (its thread calls :meth:`submit`; ``done`` is called
    on it too). Writes queued while a group commits form the next group.

    The common path has no task: a group is sent as soon as it is known (the connection up,
    its statements prepared), the connection's reader tells its writers in the loop turn
    the answer arrives in, and sends the next group at once. A task (:meth:`_serve`) does the
    rest: connecting, preparing, a fresh connection after a broken one, the search for the
    write that failed a group. It lingers while the writer is in use, so a loop torn down
    (``asyncio.run`` ending, which cancels its tasks) cuts what is under way and nobody
    waits for ever on a write whose answer will never be read."""

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: dict[str, Any],
        statements: Sql,
        translate: Callable[[BaseException], BaseException],
        loop: Any,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = connect_kwargs
        self._sql = statements
        self._translate = translate
        self.loop = loop
        self._queue: list[_Write] = []
        self._sent: list[_Write] | None = None  # the group the connection's reader waits for
        self._failed: tuple[list[_Write], BaseException] | None = None  # for the task
        self._committing: list[_Write] | None = None  # the group the task commits
        self._closed = False  # close_now was called: nothing connects or sends any more
        self._conn: LoopConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the task waits on it for work
        self._sends = 0  # groups sent so far (the task lingers while this moves)
        self.groups = 0

    def submit(
        self,
        effects: Sequence[tuple[Any, ...]],
        statements: Sequence[Statement],
        done: Done,
        fence: Sequence[str] = (),
    ) -> None:
        self._queue.append(_Write(effects, statements, done, fence))
        if self._idle() and not self._send_next():
            self._poke()
        if self._task is None:
            self._task = self.loop.create_task(self._serve())
            self._task.add_done_callback(self._served)

    @property
    def busy(self) -> bool:
        """Writes are queued or under way."""
        return bool(
            self._queue or self._sent is not None or self._committing is not None or self._failed
        )

    def close_now(self) -> None:
        """Close the connection from any thread (the store is closing): nothing connects
        or sends after this."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close_threadsafe()

    # ----------------------------------------------------------------- the common path
    def _send_next(self) -> bool:
        """Send the next group, to be answered through :meth:`_answered`, if the connection
        is up and its statements are prepared; False leaves it to the task."""
        conn = self._conn
        if conn is None or conn.broken or not self._queue:
            return False
        group = self._queue[:LOOP_GROUP]
        try:
            sent = conn.send(_plan(group, self._sql, _binary_columns), self._answered)
        except Exception:  # a broken connection, a value it cannot send: the task says so
            return False
        if sent is None:
            return False
        del self._queue[: len(group)]
        self._sent = group
        self._sends += 1
        return True

    def _answered(self, error: BaseException | None) -> None:
        """The connection read the answer to the group sent (or failed): tell its writers
        and send the next group."""
        group, self._sent = self._sent, None
        if group is None:  # cut meanwhile (the task was cancelled)
            return
        if error is not None:  # a fresh connection, or each write alone: the task's work
            self._failed = (group, error)
            self._poke()
            return
        self.groups += 1
        try:
            for write in group:
                _tell(write, None)
        finally:  # a callback raised past _tell (KeyboardInterrupt): the others still learn
            for write in group:
                if not write.told:
                    _tell(write, None)
        if self._queue and self._idle() and not self._send_next():
            self._poke()

    def _idle(self) -> bool:
        """No group is under way: the next may be sent."""
        return self._sent is None and self._committing is None and self._failed is None

    # ----------------------------------------------------------------- the task
    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _serve(self) -> None:
        loop = self.loop
        seen = -1
        try:
            while True:
                await self._work_done()
                if not self.busy and seen == self._sends:  # idle for a whole round
                    return
                seen = self._sends
                wake = self._wake = loop.create_future()
                timer = loop.call_later(_LINGER, settle, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._wake = None
        finally:  # gone now, not a loop turn later: the next submit starts a new task
            if self._task is asyncio.current_task():
                self._task = None

    def _served(self, task: asyncio.Task[None]) -> None:
        """The task ended. Cancelled with its loop (even before it began: then no line of
        it ran), or failed: what is under way is cut, so nobody is told twice or never."""
        if self._task is task:
            self._task = None
        if not task.cancelled():
            error = task.exception()
            if error is None:
                return
            _log.error("durable_nb: the loop's writer failed", exc_info=error)
        cut = self._translate(psycopg.InterfaceError("the write was interrupted"))
        groups = [self._sent or [], self._committing or [], self._queue]
        if self._failed is not None:
            groups.append(self._failed[0])
        self._sent = self._committing = self._failed = None
        self._queue = []
        conn = self._conn  # its answers are unread: no later group may take them as its own
        if conn is not None:
            self._conn = None
            conn.close()
        for group in groups:
            for write in group:
                if not write.told:
                    _tell(write, cut)

    async def _work_done(self) -> None:
        """Do what the common path left: a failed group, groups that need a connection or
        preparing; until the common path can go on (or nothing is left)."""
        while self._sent is None:
            if self._failed is not None:
                group, error = self._failed
                self._failed = None
            elif self._queue and not self._send_next():
                group, error = self._queue[:LOOP_GROUP], None
                del self._queue[: len(group)]
            else:
                return
            self._committing = group  # cancelled meanwhile, _serve tells it it was cut
            await self._commit(group, error)
            self._committing = None

    async def _commit(self, group: list[_Write], error: BaseException | None) -> None:
        """Commit ``group``, or, told the ``error`` its sending met, recover: once more on a
        fresh connection if that one broke, else each write alone to find the culprit."""
        try:
            if error is None or self._repeatable(error):
                await self._write_group(group)  # upserts: harmless twice
            else:
                raise error
        except Exception as e:
            if len(group) > 1 and not isinstance(e, psycopg.OperationalError):
                for write in group:  # find the culprit: each write alone
                    try:
                        await self._write_group([write])
                    except Exception as e1:
                        _tell(write, self._translate(e1))
                    else:
                        _tell(write, None)
                return
            error = self._translate(e)
            for write in group:
                _tell(write, error)
            return
        self.groups += 1
        for write in group:
            _tell(write, None)

    def _repeatable(self, error: BaseException) -> bool:
        """A group that failed with ``error`` is sent again (once): its connection broke,
        or the server rolled it back for a reason of the moment (a deadlock, a serialization
        failure), as ``PostgresStore._call`` repeats its calls."""
        if isinstance(error, psycopg.errors.TransactionRollback):
            return True
        return isinstance(error, psycopg.OperationalError) and (
            self._conn is None or self._conn.broken
        )

    async def _write_group(self, group: list[_Write]) -> None:
        plan = _plan(group, self._sql, _binary_columns)
        for attempt in range(2):
            conn = self._conn
            if conn is None or conn.broken:
                if conn is not None:
                    conn.close()
                self._conn = None
                if self._closed:
                    raise psycopg.InterfaceError("the store's writer is closed")
                conn = await LoopConnection.connect(self._conninfo, self._kwargs, self.loop)
                if self._closed:  # the store closed while it connected
                    conn.close()
                    raise psycopg.InterfaceError("the store's writer is closed")
                self._conn = conn
            try:
                await conn.run(plan)
                return
            except psycopg.OperationalError:
                if attempt == 0 and conn.broken:
                    continue
                raise


def _plan(
    group: list[_Write],
    q: Sql,
    columns: Callable[[Sql, dict[tuple[Any, ...], tuple[Any, ...]]], list[Any]],
) -> list[Statement]:
    """The statements of one group: its effect rows as one upsert (one row per key, the
    last, as ON CONFLICT requires) and the other statements in order. When writes of the
    group are conditional on leases, the check comes last (in the effects' upsert, or a
    statement of its own): the run rows before the lease rows, as a worker's claim locks
    them, so the two never wait for each other in a cycle."""
    rows: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    tokens: dict[str, None] = {}
    for write in group:
        for row in write.effects:
            rows[row[:5]] = row
        for token in write.fence:
            tokens[token] = None
    others = [s for write in group for s in write.statements]
    if tokens:
        fence = [len(tokens), " ".join(tokens)]  # a token has no space in it
        if len(rows) == 1:
            return [*others, (q.one_fenced, [*fence, *next(iter(rows.values()))])]
        if rows:
            return [*others, (q.many_fenced, [*fence, *columns(q, rows)])]
        return [*others, (q.fence, fence)]
    if len(rows) == 1:
        return [(q.one, next(iter(rows.values()))), *others]
    if rows:
        return [(q.many, columns(q, rows)), *others]
    return others


def _columns(q: Sql, rows: dict[tuple[Any, ...], tuple[Any, ...]]) -> list[Any]:
    """The rows as one list per column (psycopg dumps each as an array)."""
    return [list(col) for col in zip(*rows.values(), strict=True)]


def _binary_columns(q: Sql, rows: dict[tuple[Any, ...], tuple[Any, ...]]) -> list[Any]:
    """The rows as one binary array per column, encoded here (for :class:`LoopConnection`)."""
    cols = zip(*rows.values(), strict=True)
    return [binary_array(t, col) for t, col in zip(q.types, cols, strict=True)]


def _tell(write: _Write, error: BaseException | None) -> None:
    write.told = True
    try:
        write.done(error)
    except Exception:  # a caller's callback must not stop the writer
        _log.exception("durable_nb: a write's completion callback failed")
