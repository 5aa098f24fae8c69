"""Runs that start together on one loop take their leases and first reads in one store call.

Each run that starts needs its lease and the reads its execution starts from (record,
history, inbox token, signals). On a remote store each is a round trip, made in a thread so
the loop does not wait, and a loop has few threads: 50 ``dn.start`` calls in a row queued
their 100 round trips and 50 commits behind each other, and the last run began ~50 ms after
the first. Here the starts that arrive in one loop turn go to the store in one call
(``Store.start_runs``: on PostgreSQL one round trip and one commit for all of them). A run
the store could not take at once (held by a live process, or its dead holder's lease in
its grace) takes the usual path, ``acquire_run``, which says who holds it or waits.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from ..store import RunLease, RunStart
from ._runtime import off_loop, runtime

__all__ = ["start_together"]

#: the most runs one store call starts (their histories come back in one answer)
BATCH = 64

Taken = tuple[RunLease, RunStart]


class _Starts:
    """The starts waiting on one loop for the next store call (it runs on that loop)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[str, asyncio.Future[Taken | None]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, run_id: str) -> asyncio.Future[Taken | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Taken | None] = loop.create_future()
        self.waiting.append((run_id, future))
        if len(self.waiting) == 1:  # the starts of this loop turn go together
            loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            batch, self.waiting = self.waiting[:BATCH], self.waiting[BATCH:]
            task = loop.create_task(self._take(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _take(self, batch: list[tuple[str, asyncio.Future[Taken | None]]]) -> None:
        call = _Call(list(dict.fromkeys(run_id for run_id, _ in batch)))
        try:
            got = await off_loop(call.start)
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):  # the loop is torn down: what the
                call.abandon()  # store takes meanwhile is let go
            for _, future in batch:
                if not future.done():
                    if isinstance(e, Exception):
                        future.set_exception(e)
                    else:
                        future.cancel()
            if not isinstance(e, Exception):
                raise
            return  # each start says it (nobody awaits this task)
        for run_id, future in batch:
            taken = got.pop(run_id, None)  # a run id twice: the second takes the usual path
            if not future.done():
                future.set_result(taken)
            elif taken is not None:  # its start was cancelled meanwhile: let the run go
                _let_go(taken)


class _Call:
    """One ``start_runs`` call, made in a thread; if its batch is abandoned meanwhile (its
    loop torn down), what it took is let go, whether it returns before or after."""

    def __init__(self, run_ids: list[str]) -> None:
        self.run_ids = run_ids
        self._lock = threading.Lock()
        self._abandoned = False
        self._got: dict[str, Taken] | None = None

    def start(self) -> dict[str, Taken]:
        got = runtime.store.start_runs(self.run_ids, runtime.owner)
        with self._lock:
            if not self._abandoned:
                self._got = got
                return got
        for taken in got.values():
            _let_go(taken)
        return {}

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            got, self._got = self._got, None
        for taken in (got or {}).values():
            _let_go(taken)


def _let_go(taken: Taken) -> None:
    """Let go of a run whose start was cancelled (nothing waits for it: on PostgreSQL the
    writer thread deletes the lease)."""
    taken[0].release_later(None)


#: the starts of each loop runs start on (the engine's, a worker's)
_starts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Starts] = weakref.WeakKeyDictionary()


async def start_together(run_id: str) -> Taken | None:
    """The run's lease and :class:`~durable_nb.store.RunStart`, taken with the other runs
    starting on this loop now; None if the store could not take it at once."""
    loop = asyncio.get_running_loop()
    starts = _starts.get(loop)
    if starts is None:
        starts = _starts[loop] = _Starts()
    future = starts.add(run_id)
    try:
        return await future
    except asyncio.CancelledError:  # cancelled in the very turn the batch answered
        if future.done() and not future.cancelled() and future.exception() is None:
            taken = future.result()  # the lease is ours, and nobody's else
            if taken is not None:
                _let_go(taken)
        raise
