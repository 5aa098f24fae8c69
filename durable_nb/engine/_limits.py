"""Rate and concurrency limits for API-bound effects: ``@effect(limit="openai",
concurrency=8, rate="500/min")``.

A limit is named, and the name is shared by every effect (and ``dn.wrap`` proxy) that uses
it in this process: at most ``concurrency`` attempts run at once, and at most N attempts
*start* in any sliding window of the rate's length. Each attempt counts (a retry is a
request the API sees too); a replay is no attempt, so it never waits. Waiting uses the
engine's clock, so tests run on a virtual one. The limiter holds within one process (every
thread and event loop in it), and on a store that shares limits (PostgreSQL,
:class:`~durable_nb.store.SharedLimits`) across every process using the store: a place is
taken here first, then in the store, in one transaction that uses the database's clock.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableWarning,
    LimitConflictError,
    StoreError,
)
from ..store import SharedLimits
from ._runtime import runtime

__all__ = ["Limiter", "check_limit", "limiter", "parse_rate"]

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_UNITS |= {"h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


def parse_rate(rate: object) -> tuple[int, float]:
    """``"500/min"``, ``"50/s"``, ``"10/5s"``, ``"1000/h"`` → (calls, window seconds)."""
    if not isinstance(rate, str):
        raise ArgumentTypeError(f"rate must be a str such as '500/min' or '50/s', got {rate!r}")
    m = _RATE.match(rate.lower())
    unit = (_UNITS.get(m.group(3)) or _UNITS.get(m.group(3).rstrip("s"))) if m else None
    if m is None or unit is None or int(m.group(1)) < 1:
        raise ArgumentError(
            f"rate must be 'N/unit' with N >= 1 and unit s, min, h or day (e.g. '500/min', "
            f"'50/s', '10/5s'), got {rate!r}"
        )
    window = unit * (float(m.group(2)) if m.group(2) else 1.0)
    if window <= 0:
        raise ArgumentError(f"rate needs a window longer than 0 seconds, got {rate!r}")
    return int(m.group(1)), window


@dataclass(frozen=True)
class _Spec:
    concurrency: int | None
    calls: int | None
    window: float | None
    rate: str | None


class Limiter:
    """One named limit: a concurrency cap and a sliding-window rate of attempt starts."""

    def __init__(self, name: str, spec: _Spec) -> None:
        self.name = name
        self.spec = spec
        self._lock = threading.Lock()
        self.active = 0
        self._starts: deque[float] = deque()
        # attempts waiting for a slot to free: woken one per release, in arrival order
        self._waiters: deque[tuple[asyncio.AbstractEventLoop | None, Any]] = deque()

    def __repr__(self) -> str:
        s = self.spec
        return f"<limit {self.name!r} concurrency={s.concurrency} rate={s.rate!r}>"

    def _try(self) -> float | None:
        """Take a slot now (None), or say how long to wait: 0.0 = until a release."""
        s = self.spec
        if s.concurrency is not None and self.active >= s.concurrency:
            return 0.0
        if s.calls is not None and s.window is not None:
            now = runtime.clock.time()
            starts = self._starts
            while starts and starts[0] <= now - s.window:
                starts.popleft()
            if len(starts) >= s.calls:
                return max(starts[0] + s.window - now, 1e-6)
            starts.append(now)
        self.active += 1
        return None

    def try_take(self) -> float | None:
        """Take a place in this process without waiting: None when taken (give it back with
        ``release(None)``), else how long to wait, 0.0 meaning until a place is given back.
        A map's driver asks this way: it cannot block while its own items, which give
        places back, complete. (Places in the store, PostgreSQL's shared limits, are not
        taken this way: a map's limit holds in its own process.)"""
        with self._lock:
            return self._try()

    async def acquire(self) -> str | None:
        """Wait for a place: this process's, then the store's when it shares limits across
        processes (PostgreSQL). Returns what :meth:`release` gives back."""
        await self._acquire_here()
        shared = _shared()
        if shared is None:
            return None
        slot = uuid.uuid4().hex
        s = self.spec
        try:
            while True:
                wait = await asyncio.to_thread(
                    shared.limit_take, self.name, slot, s.concurrency, s.calls, s.window, _HOLD
                )
                if wait is None:
                    return slot
                await runtime.clock.sleep(wait or _POLL)
        except BaseException:
            # cancelled while the store may have given the slot: give it back, not leave it
            # held until it expires
            self.release(slot if s.concurrency is not None else None)
            raise

    def acquire_sync(self) -> str | None:
        self._acquire_sync_here()
        shared = _shared()
        if shared is None:
            return None
        slot = uuid.uuid4().hex
        s = self.spec
        try:
            while True:
                wait = shared.limit_take(self.name, slot, s.concurrency, s.calls, s.window, _HOLD)
                if wait is None:
                    return slot
                runtime.clock.sleep_sync(wait or _POLL)
        except BaseException:
            self.release(slot if s.concurrency is not None else None)
            raise

    async def _acquire_here(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                wait = self._try()
                if wait == 0.0:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append((loop, fut))
            if wait is None:
                return
            if wait > 0:
                await runtime.clock.sleep(wait)
                continue
            try:
                await fut
            except asyncio.CancelledError:
                with self._lock:
                    if (loop, fut) in self._waiters:
                        self._waiters.remove((loop, fut))
                    elif fut.done() and not fut.cancelled():
                        self._wake_one()  # it was woken: pass the wake on
                raise

    def _acquire_sync_here(self) -> None:
        while True:
            with self._lock:
                wait = self._try()
                if wait == 0.0:
                    event = threading.Event()
                    self._waiters.append((None, event))
            if wait is None:
                return
            if wait > 0:
                runtime.clock.sleep_sync(wait)
            else:
                event.wait()

    def release(self, slot: str | None) -> None:
        """Give the place back (``slot``: what :meth:`acquire` returned)."""
        with self._lock:
            self.active -= 1
            self._wake_one()
        if slot is not None and self.spec.concurrency is not None:
            shared = _shared()
            if shared is not None:  # a call: about a millisecond, next to an API call's
                try:
                    shared.limit_give(self.name, slot)
                except StoreError as e:  # the slot expires on its own; the call's outcome stands
                    warnings.warn(
                        f"could not give back a slot of limit {self.name!r} ({e}); it frees "
                        f"itself within {_HOLD:g} s",
                        DurableWarning,
                        stacklevel=2,
                    )

    def _wake_one(self) -> None:  # under the lock
        while self._waiters:
            loop, waiter = self._waiters.popleft()
            if loop is None:
                waiter.set()
                return
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(self._resolve, waiter)
            return

    def _resolve(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)
            return
        with self._lock:  # its waiter was cancelled meanwhile: wake the next one
            self._wake_one()


_HOLD = 600.0  # seconds a slot of a shared limit lasts at most (its holder may have died)
_POLL = 0.05  # seconds between two asks for a slot of a shared limit that is full


_last: tuple[object, SharedLimits | None] = (None, None)


def _shared() -> SharedLimits | None:
    """The store, when limits hold across the processes that share it (PostgreSQL). Asked
    on every attempt, so the answer is kept per store (a Protocol check costs microseconds)."""
    global _last
    store = runtime.store
    if _last[0] is not store:
        _last = (store, store if isinstance(store, SharedLimits) else None)
    return _last[1]


_limiters: dict[str, Limiter] = {}
_registry_lock = threading.Lock()


def check_limit(limit: object, concurrency: object, rate: object) -> tuple[str, _Spec] | None:
    """Validate ``@effect``'s ``limit``, ``concurrency`` and ``rate`` (None: no limit)."""
    if limit is None:
        if concurrency is not None or rate is not None:
            raise ArgumentError(
                f"concurrency={concurrency!r} and rate={rate!r} need a limit name shared by the "
                "effects they cover: @effect(limit='openai', concurrency=8, rate='500/min')"
            )
        return None
    if not isinstance(limit, str) or not limit.strip() or len(limit) > 200:
        raise ArgumentError(
            f"limit must be a non-empty name of at most 200 characters, got {limit!r}"
        )
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ArgumentError(f"concurrency must be an int >= 1 or None, got {concurrency!r}")
    calls, window = parse_rate(rate) if rate is not None else (None, None)
    return limit, _Spec(concurrency, calls, window, rate if isinstance(rate, str) else None)


def limiter(name: str, spec: _Spec) -> Limiter:
    """The process's limiter named ``name``. An effect that names it without figures uses
    the one defined elsewhere; two definitions with different figures are an error."""
    with _registry_lock:
        have = _limiters.get(name)
        given = spec.concurrency is not None or spec.calls is not None
        if have is None:
            have = _limiters[name] = Limiter(name, spec)
        elif given and have.spec != spec:
            if have.spec.concurrency is None and have.spec.calls is None:
                have.spec = spec  # named first without figures: these define it
            else:
                raise LimitConflictError(
                    f"limit {name!r} is already defined with concurrency="
                    f"{have.spec.concurrency!r}, rate={have.spec.rate!r}; got concurrency="
                    f"{spec.concurrency!r}, rate={spec.rate!r}. Give the figures once and "
                    f"name the limit alone elsewhere: @effect(limit={name!r})"
                )
        return have
