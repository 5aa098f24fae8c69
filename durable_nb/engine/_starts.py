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
import weakref

from ..store import RunLease, RunStart
from ._runtime import off_loop, runtime, writer_loop

__all__ = ["start_together"]

#: the most runs one store call starts (their histories come back in one answer)
BATCH = 64

Taken = tuple[RunLease, RunStart]


class _Starts:
    """The starts waiting on one loop for the next store call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: list[tuple[str, asyncio.Future[Taken | None]]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, run_id: str) -> asyncio.Future[Taken | None]:
        future: asyncio.Future[Taken | None] = self.loop.create_future()
        self.waiting.append((run_id, future))
        if len(self.waiting) == 1:  # the starts of this loop turn go together
            self.loop.call_soon(self._send)
        return future

    def _send(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting[:BATCH], self.waiting[BATCH:]
            task = self.loop.create_task(self._take(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _take(self, batch: list[tuple[str, asyncio.Future[Taken | None]]]) -> None:
        ids = list(dict.fromkeys(run_id for run_id, _ in batch))
        try:
            got = await off_loop(runtime.store.start_runs, ids, runtime.owner)
        except BaseException as e:
            for _, future in batch:
                if not future.done():
                    if isinstance(e, Exception):
                        future.set_exception(e)
                    else:
                        future.cancel()
            raise
        for run_id, future in batch:
            taken = got.pop(run_id, None)  # a run id twice: the second takes the usual path
            if not future.done():
                future.set_result(taken)
            elif taken is not None:  # its start was cancelled meanwhile: let the run go
                later = taken[0].release_later(writer_loop(self.loop))
                if later is not None:
                    later.add_done_callback(_consume)


def _consume(later: object) -> None:
    """Nothing waits for the release of a run whose start was cancelled."""


_starts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Starts] = weakref.WeakKeyDictionary()


async def start_together(run_id: str) -> Taken | None:
    """The run's lease and :class:`~durable_nb.store.RunStart`, taken with the other runs
    starting on this loop now; None if the store could not take it at once."""
    loop = asyncio.get_running_loop()
    starts = _starts.get(loop)
    if starts is None:
        starts = _starts[loop] = _Starts(loop)
    return await starts.add(run_id)
