"""Time as the engine sees it: wall time for durable deadlines; sleeping, waiting and timing
out for timers, signal waits, retries and the per-attempt timeouts of async effects.

The engine never asks which clock it has: everything it waits for goes through the
:class:`Clock` protocol (modelled on trio's ``Clock``). :class:`SystemClock` is real time.
Tests swap in :class:`FakeClock`, a virtual clock that *autojumps*: when the run has nothing
left to do but wait — ready tasks have had their turn and no record write is under way
(:data:`writes`: a real write takes real time, and a virtual 5 s timer must not beat it) —
virtual time jumps to the next deadline, so tests never sleep for real. Sync effects running
in worker threads keep wall-time timeouts (a thread's progress is not the loop's to see).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

__all__ = ["Clock", "FakeClock", "SystemClock", "writes"]

T = TypeVar("T")

#: loop turns a FakeClock gives ready tasks before it treats the loop as idle: a task woken
#: by another (a signal delivered, a branch finishing) runs within a turn or two
_IDLE_TURNS = 3


class _Writes:
    """How many tasks wait for a record's write right now (``wait_written``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending = 0

    def started(self) -> None:
        with self._lock:
            self.pending += 1

    def ended(self) -> None:
        with self._lock:
            self.pending -= 1


writes = _Writes()


class Clock(Protocol):
    """What the engine needs of time. A custom clock implements all five (or subclasses
    :class:`SystemClock` and overrides ``time``)."""

    def time(self) -> float:
        """Seconds since the epoch (durable deadlines are stored in this unit)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass."""
        ...

    def sleep_sync(self, seconds: float) -> None:
        """Let ``seconds`` pass, blocking the thread (sync effects' retry delays)."""
        ...

    async def wait(self, event: asyncio.Event, seconds: float | None) -> bool:
        """Wait until ``event`` is set or ``seconds`` pass (``None``: no limit); True if it
        was set."""
        ...

    async def wait_for(self, aw: Awaitable[T], seconds: float) -> T:
        """``aw``'s result, or ``TimeoutError`` once ``seconds`` passed (``aw`` is then
        cancelled)."""
        ...


class SystemClock:
    """Real time."""

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(seconds)

    async def wait(self, event: asyncio.Event, seconds: float | None) -> bool:
        if event.is_set():
            return True
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            return event.is_set()
        return True

    async def wait_for(self, aw: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(aw, seconds)


class FakeClock:
    """A virtual clock that autojumps: ``sleep``, ``wait`` and ``wait_for`` advance it
    instead of waiting, once the loop is idle (ready tasks had their turns, no record write
    is under way). ``slept`` lists what each sleep asked for."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def _idle(self) -> None:
        """Return once the loop has nothing left to do but wait."""
        for _ in range(_IDLE_TURNS):
            await asyncio.sleep(0)
        while writes.pending > 0:
            await asyncio.sleep(0.0005)
            for _ in range(_IDLE_TURNS):
                await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self._idle()
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)

    async def wait(self, event: asyncio.Event, seconds: float | None) -> bool:
        if event.is_set():
            return True
        await self._idle()
        if event.is_set():
            return True
        if seconds is None:
            await event.wait()
            return True
        self.advance(max(0.0, seconds))
        return event.is_set()

    async def wait_for(self, aw: Awaitable[T], seconds: float) -> T:
        task = asyncio.ensure_future(aw)
        try:
            await self._idle()
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():  # it only waits: the time it was given passes at once
            self.advance(max(0.0, seconds))
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                cancelling = getattr(current, "cancelling", None)  # Python 3.11+
                if cancelling is not None and cancelling():
                    raise  # this task is cancelled itself, not only timed out
                raise asyncio.TimeoutError from None
        return task.result()
