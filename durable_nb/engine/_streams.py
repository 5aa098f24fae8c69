"""Streams of a run: ``ctx.stream(name)`` writes, ``job.stream(name)`` reads.

A **stream** is a named, append-only sequence of chunks that a run writes and anyone reads,
in this process or another. Chunk ``i`` of stream ``name`` of run ``R`` is the effect record
``("stream/R", name, "", "", i)`` (kind ``chunk``); closing the stream adds an end marker
(kind ``stream_end``) at the next position. Each write is also a step of the run (identity
``dn.stream:<name>``, kind ``stream``) stored by the same ``put_effects`` call as the chunk,
so after a crash a write either happened wholly — and replays without writing again — or
not at all: chunk positions are exactly-once.

Streaming effects (``_streaming.py``) append to a run's stream through :func:`position`
and :data:`bell` when they are given ``stream=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import reprlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from .. import _codecs
from .._journal import (
    FINAL_STATUSES,
    StreamDetail,
    check_stream_name,
    detail_text,
    json_problem,
    stream_scope,
)
from ..errors import (
    BlockingCallError,
    StoreLockedError,
    StreamClosedError,
    UnstorableValueError,
)
from ..store import EffectRecord
from ._runtime import running_loop, runtime
from ._state import RunState, replay

if TYPE_CHECKING:
    import concurrent.futures

    from ._jobs import Job

__all__ = ["Position", "StreamReader", "StreamWriter", "bell", "closed_error", "position"]

# A reader of a run that executes in another process polls the store: often at first, less
# while nothing comes. Waiting longer than a DuckDB store's idle close (0.5 s) between polls
# lets the writing process have the file back (one process holds it at a time).
_POLL_MIN = 0.2
_POLL_MAX = 1.0

_preview = reprlib.Repr()
_preview.maxstring = 60
_preview.maxother = 60
_preview.maxlist = _preview.maxdict = 4


_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


def _check_chunk(chunk: object, name: str) -> object:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if type(chunk) in _JSON_TYPES and json_problem(chunk)[0] is None:
        return chunk
    raise UnstorableValueError(
        f"a chunk written to stream {name!r} must be JSON data (None, bool, int, float, str, "
        f"list, dict) or bytes, got {_preview.repr(chunk)} of type {type(chunk).__name__}; "
        "convert it first (for example to a dict or to str)"
    )


# ------------------------------------------------------------------------------ the bell
def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Bell:
    """Wakes this process's stream readers (on any thread or loop) when a chunk was stored or
    a run ended. One for the process: a wake-up that was not for a reader costs it one look
    at the store."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.version = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def ring(self, *_: object) -> None:
        with self._cond:
            self.version += 1
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits there
                loop.call_soon_threadsafe(_wake, fut)

    def wait_sync(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen, timeout)

    async def wait(self, seen: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self.version != seen:
                return
            self._waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._waiters.remove((loop, fut))


#: rings when a chunk was stored or a run ended, waking this process's stream readers
bell = _Bell()


# ----------------------------------------------------------------- positions in a run
class Position:
    """Where the next chunk of one stream goes, as far as this execution of the run knows."""

    __slots__ = ("closed", "next")

    def __init__(self, next_: int, closed: bool) -> None:
        self.next = next_
        self.closed = closed


# per executing run: its streams' next positions (found in the store on first use, then kept)
_positions: weakref.WeakKeyDictionary[RunState, dict[str, Position]] = weakref.WeakKeyDictionary()


def position(state: RunState, name: str) -> Position:
    table = _positions.get(state)
    if table is None:
        table = _positions[state] = {}
    pos = table.get(name)
    if pos is None:
        run = state.run
        if run.executions <= 1 and run.generation == 0 and not state.loaded:
            pos = Position(0, False)  # a new run's first execution: its streams are empty
        else:
            pos = _scan(stream_scope(state.run_id), name)
        table[name] = pos
    return pos


def _scan(scope: str, name: str) -> Position:
    """The end of a stream in the store. Positions are contiguous from 0 (one writer, one
    position at a time), so a doubling probe and a bisection find it in O(log n) lookups —
    on resume, and after continue-as-new, whose generations share the run's streams."""
    store = runtime.store

    def present(i: int) -> bool:
        return store.get_effect((scope, name, "", "", i)) is not None

    if not present(0):
        return Position(0, False)
    lo, hi = 0, 1  # lo is present, hi is the probe
    while present(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if present(mid):
            lo = mid
        else:
            hi = mid
    last = store.get_effect((scope, name, "", "", lo))
    return Position(lo + 1, last is not None and last.kind == "stream_end")


def closed_error(name: str, run_id: str) -> StreamClosedError:
    return StreamClosedError(
        f"stream {name!r} of run {run_id!r} is closed; write every chunk before closing it, "
        "or write to a stream of another name"
    )


# ------------------------------------------------------------------------------ writing
class StreamWriter:
    """Writes one named stream of a run: ``w = ctx.stream("tokens")``; ``await w.write(x)``;
    ``await w.close()`` — or ``async with ctx.stream("tokens") as w:``, which closes it when
    the block ends without an error (after an error the run can resume and go on writing).

    Every write is a step of the run: when the run resumes, writes it already made are not
    made again (each chunk has exactly one position). Writes to one name share positions,
    whichever writer object makes them. Write from the workflow itself (the run's loop)."""

    def __init__(self, state: RunState, name: object) -> None:
        self.name = check_stream_name(name)
        self._state = state
        self._closed = False

    def __repr__(self) -> str:
        return f"<durable_nb stream {self.name!r} of run {self._state.run_id!r}>"

    async def write(self, chunk: Any) -> int:
        """Append ``chunk`` — JSON data, ``str`` or ``bytes`` — and return its position."""
        value = _check_chunk(chunk, self.name)
        st = self._state
        if self._closed:
            raise closed_error(self.name, st.run_id)
        key4, seq, rec = st.step("dn.stream:" + self.name)
        if rec is not None:
            return int(cast(int, replay(st, rec)))
        pos = position(st, self.name)
        if pos.closed:
            raise closed_error(self.name, st.run_id)
        index, now, signer = pos.next, runtime.clock.time(), runtime.store.signer
        step = EffectRecord(
            st.scope_id,
            *key4,
            payload=_codecs.encode(index, signer),
            kind="stream",
            seq=seq,
            started_at=now,
            detail=detail_text(
                StreamDetail(stream=self.name, index=index, chunk=_preview.repr(value))
            ),
        )
        item = EffectRecord(
            stream_scope(st.run_id),
            self.name,
            "",
            "",
            index,
            payload=_codecs.encode(value, signer, what=f"chunk {index} of stream {self.name!r}"),
            kind="chunk",
            seq=index,
            started_at=now,
        )
        st.record_together(step, [item])  # one store call: the step and its chunk, or neither
        pos.next = index + 1
        bell.ring()
        return index

    async def close(self) -> None:
        """End the stream: readers stop after its last chunk. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        key4, seq, rec = st.step("dn.stream_close:" + self.name)
        if rec is not None:
            replay(st, rec)
            known = _positions.get(st, {}).get(self.name)
            if known is not None:
                known.closed = True
            return
        pos = position(st, self.name)
        if pos.closed:  # another writer closed it; its close step replays
            return
        index, now = pos.next, runtime.clock.time()
        signer = runtime.store.signer
        step = EffectRecord(
            st.scope_id,
            *key4,
            payload=_codecs.encode(index, signer),
            kind="stream",
            seq=seq,
            started_at=now,
            detail=detail_text(StreamDetail(stream=self.name, closed=True, chunks=index)),
        )
        end = EffectRecord(
            stream_scope(st.run_id),
            self.name,
            "",
            "",
            index,
            payload=_codecs.encode(None, signer),
            kind="stream_end",
            seq=index,
            started_at=now,
        )
        st.record_together(step, [end])
        pos.next, pos.closed = index + 1, True
        bell.ring()

    async def __aenter__(self) -> StreamWriter:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()


# ------------------------------------------------------------------------------ reading
class StreamReader:
    """Reads a run's stream from its first chunk: ``async for chunk in job.stream(name)``,
    or a plain ``for`` outside the run's event loop.

    It yields the chunks already stored, then each new one as it is written, and ends after
    the stream's end marker or once the run has ended (completed, failed or cancelled). A run
    that stopped without ending (a crash) may resume, so its readers keep waiting.

    Chunks written in this process wake readers at once. A run executing in another process
    is polled (every 0.2 s, slowing to 1 s while nothing comes); with the DuckDB store, the
    writer's chunks reach another process only when the writing process lets go of the file
    (after 0.5 s without store activity), so they arrive in bursts."""

    def __init__(self, job: Job[Any], name: object) -> None:
        self.name = check_stream_name(name)
        self._job = job
        self._scope = stream_scope(job.run_id)

    def __repr__(self) -> str:
        return f"<durable_nb stream reader {self.name!r} of run {self._job.run_id!r}>"

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    def __iter__(self) -> Iterator[Any]:
        job = self._job
        if job._loop is not None and running_loop() is job._loop and not job.done():
            raise BlockingCallError(
                f"a plain `for` over stream {self.name!r} would block the event loop that runs "
                f"{job.run_id!r}; use `async for chunk in job.stream({self.name!r})` here"
            )
        return self._iter()

    def _ended(self) -> bool:
        job = self._job
        st = job._state
        if st is not None and not job.done():
            return st.run.status in FINAL_STATUSES
        rec = runtime.store.get_run(job.run_id)
        return rec is not None and rec.status in FINAL_STATUSES

    def _fetch(self, pos: int, bulk: bool) -> tuple[bool, list[Any], bool]:
        """``(the run had ended before this look, the chunks from pos on, stream closed)``."""
        ended = self._ended()  # first: a run that ended had stored all its chunks
        store = runtime.store
        get: Callable[[int], EffectRecord | None]
        if bulk:  # catching up from the start: one read, not one per chunk
            found = {
                r.occurrence: r for r in store.load_effects(self._scope) if r.identity == self.name
            }
            get = found.get
        else:

            def get(i: int) -> EffectRecord | None:
                return store.get_effect((self._scope, self.name, "", "", i))

        chunks: list[Any] = []
        while (rec := get(pos)) is not None:
            if rec.kind == "stream_end":
                return ended, chunks, True
            chunks.append(_codecs.decode(rec.payload, store.signer))
            pos += 1
        return ended, chunks, False

    def _watch(self) -> None:
        fut: concurrent.futures.Future[Any] = self._job._future
        fut.add_done_callback(bell.ring)

    async def _aiter(self) -> AsyncIterator[Any]:
        self._watch()
        pos, delay, bulk = 0, _POLL_MIN, True
        while True:
            seen = bell.version
            try:  # in a thread: another process may hold a DuckDB store's file a while
                ended, chunks, closed = await asyncio.to_thread(self._fetch, pos, bulk)
            except StoreLockedError:  # it kept the file: look again later
                ended, chunks, closed = False, [], False
            else:
                bulk = False
            for chunk in chunks:
                yield chunk
            pos += len(chunks)
            if closed or ended:
                return
            if chunks:
                delay = _POLL_MIN
                continue
            await bell.wait(seen, delay)
            delay = min(delay * 2, _POLL_MAX)

    def _iter(self) -> Iterator[Any]:
        self._watch()
        pos, delay, bulk = 0, _POLL_MIN, True
        while True:
            seen = bell.version
            try:
                ended, chunks, closed = self._fetch(pos, bulk)
            except StoreLockedError:  # another process kept a DuckDB store's file: later
                ended, chunks, closed = False, [], False
            else:
                bulk = False
            yield from chunks
            pos += len(chunks)
            if closed or ended:
                return
            if chunks:
                delay = _POLL_MIN
                continue
            bell.wait_sync(seen, delay)
            delay = min(delay * 2, _POLL_MAX)
