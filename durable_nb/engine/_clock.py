"""Time as the engine sees it: wall time for durable deadlines, sleeping for timers and retries.

Tests swap in :class:`FakeClock`, whose sleeps advance virtual time at once (no real sleeps
in tests) — but not while the engine waits for the store to write a record (:data:`writes`):
a real write takes real time, and a virtual 5 s timer must not beat it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "writes"]


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


async def _until_written() -> None:
    """Let real work finish before virtual time jumps: ready tasks, and writes in flight."""
    for _ in range(3):
        await asyncio.sleep(0)
    while writes.pending > 0:
        await asyncio.sleep(0.0005)
        for _ in range(3):
            await asyncio.sleep(0)


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (durable deadlines are stored in this unit)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def sleep_sync(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock:
    """A virtual clock: ``sleep`` advances it instead of waiting, once the tasks that are
    ready and the record writes under way had their turn."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await _until_written()
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)

    def sleep_sync(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += max(0.0, seconds)


async def wait_event(clock: Clock, event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass on ``clock``; True if it was set."""
    if event.is_set():
        return True
    if isinstance(clock, FakeClock):
        await _until_written()  # let ready tasks and writes finish before virtual time jumps
        if event.is_set():
            return True
        if seconds is None:
            await event.wait()
            return True
        clock.advance(max(0.0, seconds))
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        return event.is_set()
    return True
