"""Streams of a run and streaming effects.

A **stream** is a named, append-only sequence of chunks that a run writes
(``ctx.stream(name)``) and anyone reads (``job.stream(name)``), in this process or another.
Chunk ``i`` of stream ``name`` of run ``R`` is the effect record
``("stream/R", name, "", "", i)`` (kind ``chunk``); closing the stream adds an end marker
(kind ``stream_end``) at the next position. Each write is also a step of the run
(identity ``dn.stream:<name>``, kind ``stream``) stored by the same ``put_effects`` call as
the chunk, so after a crash a write either happened wholly — and replays without writing
again — or not at all: chunk positions are exactly-once.

A **streaming effect** is an ``@effect`` whose function is an async generator (an LLM token
stream). Its chunks are journaled as they arrive — chunks that arrive in the same loop
iteration share one store write, and a chunk is durable before the workflow sees it — as
records ``dn.chunk:<identity>`` in the run's stream scope (or, outside a run, in the
notebook's scope), so the run's trace shows one step per call, not one per token. After a
crash the resumed call replays the chunks received and continues the generator from them;
its reduced final value is the call's result record (kind ``stream``, the chunk count in its
``detail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import reprlib
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from .. import _codecs
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableError,
    EffectTimeoutError,
    StoreLockedError,
    StreamClosedError,
    UnstorableValueError,
)
from ..store import FINAL_STATUSES, EffectRecord
from ._effects import Retry, _total_timeout, preview_args, replay
from ._runtime import Key4, TopScope, running_loop, runtime

if TYPE_CHECKING:
    import concurrent.futures

    from ._effects import EffectFunction
    from ._workflow import Job, RunState

__all__ = [
    "EffectDecorator",
    "StreamReader",
    "StreamWriter",
    "StreamingCall",
    "StreamingSpec",
    "check_stream_name",
    "default_reducer",
    "stream_scope",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

STEP_KIND = "stream"  # run steps: a write, a close, a streaming effect's result
CHUNK_KIND = "chunk"
END_KIND = "stream_end"

# A reader of a run that executes in another process polls the store: often at first, less
# while nothing comes. Waiting longer than a DuckDB store's idle close (0.5 s) between polls
# lets the writing process have the file back (one process holds it at a time).
_POLL_MIN = 0.2
_POLL_MAX = 1.0
_MAX_BATCH = 1000  # chunks journaled at once even when they keep arriving without a pause
_BULK = 64  # chunks beyond which a replay reads the stream scope at once, not one by one

_preview = reprlib.Repr()
_preview.maxstring = 60
_preview.maxother = 60
_preview.maxlist = _preview.maxdict = 4


def stream_scope(run_id: str) -> str:
    """The effect scope holding a run's streams (see ``store.run_scopes``)."""
    return "stream/" + run_id


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_stream_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"{what} must be a str naming the stream, got {name!r}; use a short name such as "
            "'tokens'"
        )
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name) or not _utf8(name):
        raise ArgumentError(
            f"{what} must be 1-200 printable characters, got {name!r}; use a short name such "
            "as 'tokens'"
        )
    return name


_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


def _check_chunk(chunk: object, name: str) -> object:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if type(chunk) in _JSON_TYPES:
        try:
            json.dumps(chunk, allow_nan=False)
        except (TypeError, ValueError):
            pass
        else:
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


_bell = _Bell()


# ----------------------------------------------------------------- positions in a run
class _Position:
    """Where the next chunk of one stream goes, as far as this execution of the run knows."""

    __slots__ = ("closed", "next")

    def __init__(self, next_: int, closed: bool) -> None:
        self.next = next_
        self.closed = closed


# per executing run: its streams' next positions (found in the store on first use, then kept)
_positions: weakref.WeakKeyDictionary[RunState, dict[str, _Position]] = weakref.WeakKeyDictionary()


def _position(state: RunState, name: str) -> _Position:
    table = _positions.get(state)
    if table is None:
        table = _positions[state] = {}
    pos = table.get(name)
    if pos is None:
        run = state.run
        if run.executions <= 1 and run.generation == 0:
            pos = _Position(0, False)  # a run's first execution: its streams are empty
        else:
            pos = _scan(stream_scope(state.run_id), name)
        table[name] = pos
    return pos


def _scan(scope: str, name: str) -> _Position:
    """The end of a stream in the store. Positions are contiguous from 0 (one writer, one
    position at a time), so a doubling probe and a bisection find it in O(log n) lookups —
    on resume, and after continue-as-new, whose generations share the run's streams."""
    store = runtime.store

    def present(i: int) -> bool:
        return store.get_effect((scope, name, "", "", i)) is not None

    if not present(0):
        return _Position(0, False)
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
    return _Position(lo + 1, last is not None and last.kind == END_KIND)


def _step(state: RunState, identity: str) -> tuple[Key4, int, EffectRecord | None]:
    key4 = (identity, "", "", state.next_occurrence(identity, ""))
    seq = state.next_seq()
    return key4, seq, state.lookup(key4, seq)


def _closed_error(name: str, run_id: str) -> StreamClosedError:
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
            raise _closed_error(self.name, st.run_id)
        key4, seq, rec = _step(st, "dn.stream:" + self.name)
        if rec is not None:
            return int(cast(int, replay(st, rec)))
        pos = _position(st, self.name)
        if pos.closed:
            raise _closed_error(self.name, st.run_id)
        index, now, signer = pos.next, runtime.clock.time(), runtime.store.signer
        step = EffectRecord(
            st.scope_id,
            *key4,
            payload=_codecs.encode(index, signer),
            kind=STEP_KIND,
            seq=seq,
            started_at=now,
            detail=json.dumps({"stream": self.name, "index": index, "chunk": _preview.repr(value)}),
        )
        item = EffectRecord(
            stream_scope(st.run_id),
            self.name,
            "",
            "",
            index,
            payload=_codecs.encode(value, signer, what=f"chunk {index} of stream {self.name!r}"),
            kind=CHUNK_KIND,
            seq=index,
            started_at=now,
        )
        st.record_together(step, [item])  # one store call: the step and its chunk, or neither
        pos.next = index + 1
        _bell.ring()
        return index

    async def close(self) -> None:
        """End the stream: readers stop after its last chunk. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        st = self._state
        key4, seq, rec = _step(st, "dn.stream_close:" + self.name)
        if rec is not None:
            replay(st, rec)
            known = _positions.get(st, {}).get(self.name)
            if known is not None:
                known.closed = True
            return
        pos = _position(st, self.name)
        if pos.closed:  # another writer closed it; its close step replays
            return
        index, now = pos.next, runtime.clock.time()
        signer = runtime.store.signer
        step = EffectRecord(
            st.scope_id,
            *key4,
            payload=_codecs.encode(index, signer),
            kind=STEP_KIND,
            seq=seq,
            started_at=now,
            detail=json.dumps({"stream": self.name, "closed": True, "chunks": index}),
        )
        end = EffectRecord(
            stream_scope(st.run_id),
            self.name,
            "",
            "",
            index,
            payload=_codecs.encode(None, signer),
            kind=END_KIND,
            seq=index,
            started_at=now,
        )
        st.record_together(step, [end])
        pos.next, pos.closed = index + 1, True
        _bell.ring()

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
            raise DurableError(
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
            if rec.kind == END_KIND:
                return ended, chunks, True
            chunks.append(_codecs.decode(rec.payload, store.signer))
            pos += 1
        return ended, chunks, False

    def _watch(self) -> None:
        fut: concurrent.futures.Future[Any] = self._job._future
        fut.add_done_callback(_bell.ring)

    async def _aiter(self) -> AsyncIterator[Any]:
        self._watch()
        pos, delay, bulk = 0, _POLL_MIN, True
        while True:
            seen = _bell.version
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
            await _bell.wait(seen, delay)
            delay = min(delay * 2, _POLL_MAX)

    def _iter(self) -> Iterator[Any]:
        self._watch()
        pos, delay, bulk = 0, _POLL_MIN, True
        while True:
            seen = _bell.version
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
            _bell.wait_sync(seen, delay)
            delay = min(delay * 2, _POLL_MAX)


# --------------------------------------------------------------------- streaming effects
def default_reducer(chunks: list[Any]) -> Any:
    """Join ``str`` chunks into one ``str`` and ``bytes`` chunks into one ``bytes``; any other
    chunks (or none) give the list of chunks."""
    if chunks and all(type(c) is str for c in chunks):
        return "".join(chunks)
    if chunks and all(isinstance(c, (bytes, bytearray)) for c in chunks):
        return b"".join(chunks)
    return list(chunks)


class StreamingSpec:
    """What makes an ``@effect`` a streaming one (see :func:`~durable_nb.effect`).

    The function is an async generator. Its final value is ``reducer(chunks)`` (by default
    :func:`default_reducer`). When a call resumes after a crash or a failed attempt, the
    chunks it had received are replayed, then the generator runs again:

    * if it declares a keyword parameter ``resume_from`` (with a default), it is called with
      ``resume_from=`` the list of chunks already received (``[]`` on a first call) and must
      yield only what comes after them — e.g. ask the LLM to continue the partial answer;
    * otherwise it is called afresh and its first ``len(received)`` chunks are dropped, which
      is right only for a generator that yields the same chunks again (a deterministic one).

    With ``stream=name`` the chunks are also appended to the run's stream ``name`` as they
    are journaled, so ``job.stream(name)`` readers see them live (inside a run only).
    """

    def __init__(self, fn: Callable[..., Any], reducer: object, stream: object) -> None:
        label = getattr(fn, "__qualname__", repr(fn))
        if reducer is not None and not callable(reducer):
            raise ArgumentTypeError(
                f"reducer must be a callable taking the list of chunks, got {reducer!r}"
            )
        if not inspect.isasyncgenfunction(fn):
            what = "reducer" if reducer is not None else "stream"
            raise ArgumentTypeError(
                f"{what}= is for streaming effects, whose function is an async generator "
                f"(`async def` with `yield`); {label} is not one: remove {what}= or make it "
                "yield its chunks"
            )
        self.reducer: Callable[[list[Any]], Any] = cast(
            "Callable[[list[Any]], Any]", reducer if reducer is not None else default_reducer
        )
        self.stream = check_stream_name(stream, "stream") if stream is not None else None
        try:
            param = inspect.signature(fn).parameters.get("resume_from")
        except (TypeError, ValueError):
            param = None
        self.resumes = param is not None and param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if self.resumes and param is not None and param.default is inspect.Parameter.empty:
            raise ArgumentTypeError(
                f"{label} declares resume_from without a default; give it one (resume_from=()) "
                "— durable_nb passes the chunks already received, callers never do"
            )

    def call(
        self,
        eff: EffectFunction[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> StreamingCall[Any]:
        if self.resumes and "resume_from" in kwargs:
            raise ArgumentError(
                f"resume_from={_preview.repr(kwargs['resume_from'])} passed to streaming effect "
                f"{eff.identity}; durable_nb passes it (the chunks already received) when a "
                "call resumes — call it without resume_from"
            )
        scope, key4, seq, rec = eff._locate(args, kwargs)  # the key is decided now, at call time
        return StreamingCall(
            self,
            eff,
            scope,
            key4,
            seq,
            rec,
            args,
            kwargs,
            retry or eff.retry,
            timeout or eff.timeout,
        )


class StreamingCall(Generic[T]):
    """One call of a streaming effect. ``async for chunk in call`` yields its chunks as they
    arrive (those recorded earlier first); ``await call`` returns the reduced final value;
    both may be used, in either order. A call whose result is recorded replays: iterating it
    yields the recorded chunks and nothing executes.

    The generator starts when the call is first awaited or iterated, and stops when nobody
    waits on it any more (a ``break`` out of the ``async for``); the chunks received so far
    stay recorded, and awaiting or iterating the call again continues from them."""

    def __init__(
        self,
        spec: StreamingSpec,
        eff: EffectFunction[..., Any],
        scope: RunState | TopScope,
        key4: Key4,
        seq: int,
        final: EffectRecord | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: Retry | None,
        timeout: float | None,
    ) -> None:
        self._spec, self._eff, self._scope = spec, eff, scope
        self._key4, self._seq, self._final = key4, seq, final
        self._args, self._kwargs = args, kwargs
        self._retry, self._timeout = retry, timeout
        if isinstance(scope, TopScope):
            chunk_scope, generation = scope.scope_id, 0
        else:  # in the run's stream scope: deleted with the run, and not one trace step each
            chunk_scope, generation = stream_scope(scope.run_id), scope.run.generation
        suffix = f"#{key4[3]}" + (f"@{generation}" if generation else "")
        self._chunk_key = (chunk_scope, "dn.chunk:" + key4[0], key4[1], key4[2] + suffix)
        self._chunks: list[Any] = []  # journaled, in order: what consumers may see
        self._loaded = False
        self._pending: list[Any] = []  # arrived, not yet journaled
        self._flush_scheduled = False
        self._write_error: Exception | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._consumers = 0
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._preview = ""

    def __repr__(self) -> str:
        return f"<streaming call of {self._eff.identity}>"

    # ------------------------------------------------------------------ consuming
    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    def __iter__(self) -> Iterator[Any]:
        raise DurableError(
            f"a call of streaming effect {self._eff.identity} is read with `async for` (or "
            "`await`ed for its final value), in async code or a notebook cell"
        )

    async def _result(self) -> Any:
        if self._final is not None:
            self._settle_replay()
        else:
            self._consumers += 1
            try:
                while not self._done:
                    self._ensure_pump()
                    await self._wait()
            finally:
                self._release()
        if self._error is not None:
            raise self._error
        return self._value

    async def _iterate(self) -> AsyncIterator[Any]:
        if self._final is not None:
            self._settle_replay()
            for chunk in self._recorded_chunks():
                yield chunk
        else:
            self._consumers += 1
            try:
                i = 0
                while True:
                    while i < len(self._chunks):
                        yield self._chunks[i]
                        i += 1
                    if self._done:
                        break
                    self._ensure_pump()
                    await self._wait()
            finally:
                self._release()
        if self._error is not None:
            raise self._error

    def _settle_replay(self) -> None:
        if self._done or self._final is None:
            return
        self._done = True
        try:
            self._value = replay(self._scope, self._final)
        except Exception as e:  # a recorded error (cache_errors=True)
            self._error = e

    def _recorded_chunks(self) -> list[Any]:
        if not self._loaded:
            count = None
            if self._final is not None:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    count = int(json.loads(self._final.detail)["chunks"])
            self._chunks = self._load_chunks(count)
            self._loaded = True
        return self._chunks

    def _load_chunks(self, count: int | None) -> list[Any]:
        store = runtime.store
        scope, identity, version, input_hash = self._chunk_key
        get: Callable[[int], EffectRecord | None]
        if count is not None and count > _BULK and not isinstance(self._scope, TopScope):
            found = {
                r.occurrence: r
                for r in store.load_effects(scope)
                if (r.identity, r.version, r.input_hash) == (identity, version, input_hash)
            }
            get = found.get
        else:

            def get(i: int) -> EffectRecord | None:
                return store.get_effect((scope, identity, version, input_hash, i))

        out: list[Any] = []
        while (count is None or len(out) < count) and (rec := get(len(out))) is not None:
            out.append(_codecs.decode(rec.payload, store.signer))
        return out

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()

    def _ensure_pump(self) -> None:
        if self._task is None or (self._task.done() and not self._done):
            self._task = asyncio.get_running_loop().create_task(self._pump())

    def _release(self) -> None:
        self._consumers -= 1
        if self._consumers == 0 and self._task is not None and not self._task.done():
            self._task.cancel()  # nobody waits for the rest; what arrived stays recorded

    # ------------------------------------------------------------------ producing
    async def _pump(self) -> None:
        """Run the generator (resuming from what was received) to the final value."""
        scope, eff, clock = self._scope, self._eff, runtime.clock
        if not self._loaded:
            self._chunks = self._load_chunks(None)  # received before a crash: replayed first
            self._loaded = True
            if self._chunks:
                self._notify()
        started, t0 = clock.time(), time.perf_counter()
        preview = self._preview = preview_args(self._args, self._kwargs)
        scope.note_start(self._key4, self._seq, preview)
        scope.inflight += 1
        cancelled = False
        retry, failures = self._retry, 0
        # retries resume from what was received; unlike a plain effect's, their schedule is
        # not recorded: a restarted process counts attempts afresh
        total = (
            started + retry.total_timeout
            if retry is not None and retry.total_timeout is not None
            else None
        )
        try:
            while True:
                limit = self._timeout
                if total is not None:
                    left = max(0.0, total - clock.time())
                    limit = left if limit is None else min(limit, left)
                try:
                    await self._attempt(limit)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._flush()  # what arrived before the failure counts as received
                    failures += 1
                    if retry is None or failures >= retry.attempts:
                        raise
                    if not isinstance(e, retry.retry_on):
                        raise
                    delay = retry.delay(failures)
                    if total is not None and clock.time() + delay >= total:
                        raise _total_timeout(eff.identity, retry, failures, repr(e)) from e
                    scope.note_failure(
                        self._key4, self._seq, e, started, attempt=failures, retry_in=delay
                    )
                    await clock.sleep(delay)
            self._flush()
            value = self._spec.reducer(list(self._chunks))
            rec = EffectRecord(
                scope.scope_id,
                *self._key4,
                payload=_codecs.encode(
                    value, runtime.store.signer, what=f"the result of {eff.identity}"
                ),
                kind=STEP_KIND,
                seq=self._seq,
                started_at=started,
                duration=time.perf_counter() - t0,
                detail=self._detail(preview),
            )
            await scope.record_async(rec)
            self._value = value
        except asyncio.CancelledError:
            cancelled = True
            with contextlib.suppress(Exception):
                self._flush()  # keep what arrived: a later await continues from it
            raise
        except Exception as e:
            self._error = e
            try:
                self._fail(e, started, t0, preview, max(failures, 1))
            except Exception as store_error:  # the store failed too
                self._error = store_error
        finally:
            scope.inflight -= 1
            if not cancelled:
                self._done = True
            self._notify()

    async def _attempt(self, limit: float | None) -> None:
        kwargs = dict(self._kwargs)
        skip = 0
        if self._spec.resumes:
            kwargs["resume_from"] = list(self._chunks)
        else:
            skip = len(self._chunks)  # a deterministic generator yields them again
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        agen = cast(Any, self._eff.fn)(*self._args, **kwargs)
        try:
            while True:
                try:
                    if deadline is None:
                        chunk = await agen.__anext__()
                    else:
                        chunk = await asyncio.wait_for(
                            agen.__anext__(), max(0.0, deadline - loop.time())
                        )
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    if deadline is None or loop.time() < deadline:
                        raise  # the generator's own
                    raise EffectTimeoutError(
                        f"streaming effect {self._eff.identity} did not finish within "
                        f"timeout={limit:g}s; raise the timeout (the chunks received so far "
                        "are kept: a retry continues from them)"
                    ) from None
                if skip:
                    skip -= 1
                    continue
                self._pending.append(chunk)
                if self._write_error is not None:  # a journal write failed meanwhile
                    err, self._write_error = self._write_error, None
                    raise err
                if len(self._pending) >= _MAX_BATCH:
                    self._flush()
                elif not self._flush_scheduled:
                    # chunks that arrive before the loop turns share this one write
                    self._flush_scheduled = True
                    loop.call_soon(self._flush_soon)
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()

    def _flush_soon(self) -> None:
        try:
            self._flush()
        except Exception as e:  # the pump raises it at its next chunk, or flushes at the end
            self._write_error = e

    def _flush(self) -> None:
        """Journal the chunks that arrived since the last flush, in one store write; only
        then may consumers see them."""
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._put(batch)
        except BaseException:
            self._pending[:0] = batch  # kept for the next flush, which may succeed
            raise
        self._write_error = None  # what an earlier failed write held is journaled now
        self._chunks.extend(batch)
        scope = self._scope
        if not isinstance(scope, TopScope) and scope.listeners:
            scope.emit(
                "step",
                {
                    "seq": self._seq,
                    "step": STEP_KIND,
                    "name": self._key4[0],
                    "state": "running",
                    "args": self._preview,
                    "chunks": len(self._chunks),
                },
            )
        self._notify()

    def _put(self, batch: list[Any]) -> None:
        store, scope = runtime.store, self._scope
        now, base = runtime.clock.time(), len(self._chunks)
        cscope, identity, version, input_hash = self._chunk_key
        payloads = [
            _codecs.encode(c, store.signer, what=f"chunk {base + i} of {self._eff.identity}")
            for i, c in enumerate(batch)
        ]
        records = [
            EffectRecord(
                cscope,
                identity,
                version,
                input_hash,
                base + i,
                p,
                kind=CHUNK_KIND,
                seq=base + i,
                started_at=now,
            )
            for i, p in enumerate(payloads)
        ]
        mirror = self._spec.stream
        pos = None
        if mirror is not None and not isinstance(scope, TopScope):
            pos = _position(scope, mirror)
            if pos.closed:
                raise _closed_error(mirror, scope.run_id)
            records += [
                EffectRecord(
                    stream_scope(scope.run_id),
                    mirror,
                    "",
                    "",
                    pos.next + i,
                    p,
                    kind=CHUNK_KIND,
                    seq=pos.next + i,
                    started_at=now,
                )
                for i, p in enumerate(payloads)
            ]
        store.put_effects(records)  # the chunks and their mirror: together or not at all
        if pos is not None:
            pos.next += len(batch)
            _bell.ring()

    def _detail(self, preview: str) -> str:
        return json.dumps({"args": preview, "chunks": len(self._chunks)})

    def _fail(self, exc: Exception, started: float, t0: float, preview: str, attempt: int) -> None:
        scope = self._scope
        if not self._eff.cache_errors:
            scope.note_failure(self._key4, self._seq, exc, started, attempt=attempt)
            return
        rec = EffectRecord(
            scope.scope_id,
            *self._key4,
            payload=_codecs.encode_error(exc, runtime.store.signer),
            is_error=True,
            kind=STEP_KIND,
            seq=self._seq,
            started_at=started,
            duration=time.perf_counter() - t0,
            detail=self._detail(preview),
        )
        scope.record(rec)


class EffectDecorator(Protocol):
    """What ``@effect(...)`` with options returns: for an async generator function, an
    effect whose calls are :class:`StreamingCall` objects (iterate them for the chunks, await
    them for the final value); for any other function, an effect returning what it returns."""

    @overload
    def __call__(
        self, fn: Callable[P, AsyncIterator[T]], /
    ) -> EffectFunction[P, StreamingCall[T]]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> EffectFunction[P, R]: ...
