"""Streaming effects: an ``@effect`` whose function is an async generator (an LLM token
stream).

Its chunks are journaled as they arrive — chunks that arrive in the same loop iteration
share one store write, and a chunk is durable before the workflow sees it — as records
``dn.chunk:<identity>`` in the run's stream scope (or, outside a run, in the notebook's
scope), so the run's trace shows one step per call, not one per token. After a crash the
resumed call replays the chunks received and continues the generator from them; its
reduced final value is the call's result record (kind ``stream``, the chunk count in its
``detail``). With ``stream=`` the chunks are also appended to a run stream (``_streams``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import reprlib
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from .. import _codecs
from .._journal import CHUNK_PREFIX, StreamDetail, check_stream_name, detail_text, stream_scope
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    EffectTimeoutError,
)
from ..store import EffectRecord
from ._retry import Attempts, Retry, preview_args
from ._runtime import Key4, TopScope, runtime
from ._state import RunState, replay
from ._streams import bell, closed_error, position
from ._usage import usage_records

if TYPE_CHECKING:
    from ._effects import EffectFunction

__all__ = ["EffectDecorator", "StreamingCall", "StreamingSpec", "default_reducer"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_MAX_BATCH = 1000  # chunks journaled at once even when they keep arriving without a pause
_BULK = 64  # chunks beyond which a replay reads the stream scope at once, not one by one

_preview = reprlib.Repr()
_preview.maxstring = 60
_preview.maxother = 60
_preview.maxlist = _preview.maxdict = 4


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
        scope, key4, seq, rec = eff.locate(args, kwargs)  # the key is decided now, at call time
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
        self._chunk_key = (chunk_scope, CHUNK_PREFIX + key4[0], key4[1], key4[2] + suffix)
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
        raise BlockingCallError(
            f"a call of streaming effect {self._eff.identity} is read with `async for` (or "
            "`await`ed for its final value), in async code or a notebook cell; a plain `for` "
            "would block the loop that produces its chunks"
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
        scope, eff = self._scope, self._eff
        if not self._loaded:
            self._chunks = self._load_chunks(None)  # received before a crash: replayed first
            self._loaded = True
            if self._chunks:
                self._notify()
        # retries resume from what was received, on the one attempt policy (_retry.Attempts):
        # inside a run the schedule is recorded, so a restart between attempts resumes it
        att = Attempts(scope, self._key4, self._seq, eff.identity, self._retry, self._timeout)
        started, t0 = att.first, time.perf_counter()
        preview = self._preview = preview_args(self._args, self._kwargs)
        scope.note_start(self._key4, self._seq, preview)
        scope.inflight += 1
        cancelled = False
        try:
            while True:
                await att.pause()
                if (late := att.expired()) is not None:
                    raise late
                lim = eff.limiter
                if lim is not None:  # each attempt is a request the API sees
                    held = await lim.acquire()
                try:
                    await self._attempt(att.limit())
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._flush()  # what arrived before the failure counts as received
                    if (err := att.failed(e)) is None:
                        continue
                    att.give_up(err, e)
                finally:
                    if lim is not None:
                        lim.release(held)
            self._flush()
            value = self._spec.reducer(list(self._chunks))
            rec = EffectRecord(
                scope.scope_id,
                *self._key4,
                payload=_codecs.encode(
                    value, runtime.store.signer, what=f"the result of {eff.identity}"
                ),
                kind="stream",
                seq=self._seq,
                started_at=started,
                duration=time.perf_counter() - t0,
                detail=self._detail(preview),
            )
            # tokens reported by the final value or by the chunks, written with the result
            usage = usage_records(rec, value) or usage_records(rec, list(self._chunks))
            await scope.record_async(rec, *usage)
            self._value = value
        except asyncio.CancelledError:
            cancelled = True
            with contextlib.suppress(Exception):
                self._flush()  # keep what arrived: a later await continues from it
            raise
        except Exception as e:
            self._error = e
            try:
                self._fail(e, started, t0, preview, max(att.failures, 1))
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
        loop, clock = asyncio.get_running_loop(), runtime.clock
        deadline = None if limit is None else clock.time() + limit
        agen = cast(Any, self._eff.fn)(*self._args, **kwargs)
        try:
            while True:
                try:
                    if deadline is None:
                        chunk = await agen.__anext__()
                    else:
                        left = max(0.0, deadline - clock.time())
                        chunk = await clock.wait_for(agen.__anext__(), left)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    if deadline is None or clock.time() < deadline:
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
                    "step": "stream",
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
                kind="chunk",
                seq=base + i,
                started_at=now,
            )
            for i, p in enumerate(payloads)
        ]
        mirror = self._spec.stream
        pos = None
        if mirror is not None and not isinstance(scope, TopScope):
            pos = position(scope, mirror)
            if pos.closed:
                raise closed_error(mirror, scope.run_id)
            records += [
                EffectRecord(
                    stream_scope(scope.run_id),
                    mirror,
                    "",
                    "",
                    pos.next + i,
                    p,
                    kind="chunk",
                    seq=pos.next + i,
                    started_at=now,
                )
                for i, p in enumerate(payloads)
            ]
        store.put_effects(records)  # the chunks and their mirror: together or not at all
        if pos is not None:
            pos.next += len(batch)
            bell.ring()

    def _detail(self, preview: str) -> str:
        return detail_text(StreamDetail(args=preview, chunks=len(self._chunks)))

    def _fail(self, exc: Exception, started: float, t0: float, preview: str, attempt: int) -> None:
        scope = self._scope
        if not self._eff.cache_errors and not isinstance(scope, RunState):
            scope.note_failure(self._key4, self._seq, exc, started, attempt=attempt)
            return
        rec = EffectRecord(
            scope.scope_id,
            *self._key4,
            payload=_codecs.encode_error(exc, runtime.store.signer),
            is_error=True,
            kind="stream",
            seq=self._seq,
            started_at=started,
            duration=time.perf_counter() - t0,
            detail=self._detail(preview),
        )
        scope.record(rec)
        scope.note_error(exc, rec)


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
