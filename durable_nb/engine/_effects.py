"""``@effect``: functions whose results are recorded, keyed by a content hash of their inputs.

The key is decided synchronously when the function is *called* (not when its coroutine is
first awaited), so occurrence numbers follow call order and ``asyncio.gather`` replays
deterministically. A call goes down the layers once: its key (``_hashing``), its record
(``_codecs``), its scope (a run's :class:`~._state.RunState` or a notebook's
:class:`~._runtime.TopScope`), which writes it to the store. Async generator functions are
streaming effects (``_streaming.py``); how attempts are retried and timed out is
``_retry.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from .. import _codecs, _hashing
from ..errors import ArgumentError, ArgumentTypeError
from ..store import EffectRecord
from ._executors import check_executor, is_dask, run_on, shippable
from ._limits import Limiter, check_limit, limiter
from ._observe import NO_STEP, observers
from ._observe import step as observe_step
from ._progress import Step, current_step, progress_records
from ._retry import (
    Attempts,
    Retry,
    attempt_timeout,
    call_with_timeout,
    check_retry,
    check_timeout,
    preview_args,
)
from ._runtime import CancelScope, Key4, TopScope, cancel_scope, current_scope, runtime
from ._state import RunState, replay
from ._streaming import StreamingSpec
from ._usage import usage_records

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ._streaming import EffectDecorator, StreamingCall

__all__ = ["EffectFunction", "as_effect", "effect"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_CLAIM_SECONDS = 60.0  # how long a shared effect's claim keeps others waiting, at least


class EffectFunction(Generic[P, R]):
    """A function whose calls are recorded (see :func:`effect`). Calling it works like the
    function itself; inside a run the call is journaled, outside it is memoized."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        version: str | None = None,
        retry: Retry | int | None = None,
        timeout: float | None = None,
        cache_errors: bool = False,
        shared: bool = False,
        reducer: Callable[[list[Any]], Any] | None = None,
        stream: str | None = None,
        limit: str | None = None,
        concurrency: int | None = None,
        rate: str | None = None,
        executor: object = None,
    ) -> None:
        if not callable(fn):
            raise ArgumentTypeError(f"@effect needs a function, got {fn!r}")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ArgumentError(f"name must be a non-empty str, got {name!r}")
        if version is not None and not isinstance(version, (str, int)):
            raise ArgumentTypeError(f"version must be a str, got {version!r}")
        self.fn = fn
        self.identity = name if name is not None else _hashing.effect_identity(fn)
        self.version = "v:" + str(version) if version is not None else _hashing.code_version(fn)
        self.retry = check_retry(retry)
        self.timeout = check_timeout(timeout)
        self.cache_errors = bool(cache_errors)
        self.shared = bool(shared)
        named = check_limit(limit, concurrency, rate)
        self.limiter: Limiter | None = limiter(*named) if named is not None else None
        self.is_async = inspect.iscoroutinefunction(fn)
        # an async generator is a streaming effect (_streaming.py)
        self.streaming: StreamingSpec | None = None
        if reducer is not None or stream is not None or inspect.isasyncgenfunction(fn):
            self.streaming = StreamingSpec(fn, reducer, stream)
        self._binder = _hashing.ArgBinder(fn)
        #: where its calls execute (``executor=``): here, or on an executor or Dask cluster
        #: (the call waits for the result, which this process records)
        self.executor = check_executor(executor)
        self._target: Callable[..., Any] = fn
        if self.executor is not None:
            if self.is_async or self.streaming is not None:
                raise ArgumentTypeError(
                    f"executor= runs plain functions elsewhere; {self.identity} is an async or "
                    "streaming function: drop executor= or make it a plain def"
                )
            ship = shippable(fn, self, dask=is_dask(self.executor))
            self._target = functools.partial(run_on, self.executor, ship)
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ for introspection

    def __repr__(self) -> str:
        return f"<effect {self.identity}>"

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return functools.partial(cast(Any, self), obj)

    # -------------------------------------------------------------- the call
    def locate(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[RunState | TopScope, Key4, int, EffectRecord | None]:
        """Decide the call's key now, at call time (so occurrences follow call order), and
        find its record: ``(scope, key, seq, record or None)``."""
        scope: RunState | TopScope = current_scope.get() or runtime.top
        if self.shared:
            scope = runtime.shared
        input_hash = self._binder.input_hash(args, kwargs)
        occurrence = scope.next_occurrence(self.identity, input_hash)
        key4 = (self.identity, self.version, input_hash, occurrence)
        seq = scope.next_seq()
        return scope, key4, seq, scope.lookup(key4, seq)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.streaming is not None:
            return cast(R, self.streaming.call(self, args, kwargs))
        scope, key4, seq, rec = self.locate(args, kwargs)
        if self.is_async:
            if rec is not None:
                return cast(R, _replayed(scope, rec))
            if isinstance(scope, TopScope) and scope.shared:
                return cast(R, self._claimed_async(scope, key4, seq, args, kwargs, False))
            return cast(R, self._execute_async(scope, key4, seq, args, kwargs, False))
        if rec is not None:
            return cast(R, replay(scope, rec))
        if isinstance(scope, TopScope) and scope.shared:
            return self._claimed_sync(scope, key4, seq, args, kwargs)
        return self._execute_sync(scope, key4, seq, args, kwargs)

    def call_awaitable(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """The ``ctx.run`` form: an awaitable; a sync function runs in a worker thread."""
        if self.streaming is not None:
            return self.streaming.call(self, args, kwargs, retry=retry, timeout=timeout)
        scope, key4, seq, rec = self.locate(args, kwargs)
        if rec is not None:
            return _replayed(scope, rec)
        if isinstance(scope, TopScope) and scope.shared:
            return self._claimed_async(
                scope, key4, seq, args, kwargs, not self.is_async, retry=retry, timeout=timeout
            )
        return self._execute_async(
            scope, key4, seq, args, kwargs, not self.is_async, retry=retry, timeout=timeout
        )

    # -------------------------------------------------------------- shared effects
    # Concurrent first calls of one shared key, in any process on the store, claim it: one
    # executes, the others wait for its record and replay it. A claim lasts at most
    # _CLAIM_SECONDS (or the effect's timeout, if longer): a holder that dies or runs longer
    # lets the others execute too, and the key's last record wins (guide, "Workers and the
    # PostgreSQL store", shared cache).
    def _claim_seconds(self, timeout: float | None) -> float:
        return max(_CLAIM_SECONDS, timeout or self.timeout or 0.0)

    def _claimed_sync(
        self,
        scope: TopScope,
        key4: Key4,
        seq: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        rec, claimer = scope.claim_sync(key4, self._claim_seconds(None))
        if rec is not None:
            return cast(R, replay(scope, rec))
        try:
            return self._execute_sync(scope, key4, seq, args, kwargs)
        finally:
            scope.release_claim(key4, claimer)

    async def _claimed_async(
        self,
        scope: TopScope,
        key4: Key4,
        seq: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        in_thread: bool,
        *,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Any:
        rec, claimer = await scope.claim_async(key4, self._claim_seconds(timeout))
        if rec is not None:
            return replay(scope, rec)
        try:
            return await self._execute_async(
                scope, key4, seq, args, kwargs, in_thread, retry=retry, timeout=timeout
            )
        finally:
            scope.release_claim(key4, claimer)

    # -------------------------------------------------------------- execution
    def _make_record(
        self,
        scope: RunState | TopScope,
        key4: Key4,
        seq: int,
        value: object,
        is_error: bool,
        started: float,
        t0: float,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[EffectRecord, object]:
        signer = runtime.store.signer
        if is_error:
            payload = _codecs.encode_error(cast(BaseException, value), signer)
        else:
            payload = _codecs.encode(value, signer, what=f"the result of {self.identity}")
        rec = EffectRecord(
            scope.scope_id,
            *key4,
            payload=payload,
            is_error=is_error,
            kind="effect",
            seq=seq,
            started_at=started,
            duration=time.perf_counter() - t0,
            detail=preview_args(args, kwargs),
        )
        return rec, value

    def _execute_sync(
        self,
        scope: RunState | TopScope,
        key4: Key4,
        seq: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> R:
        att = Attempts(scope, key4, seq, self.identity, self.retry, self.timeout)
        # inside a run each attempt has a step its progress bars report to (_progress.py)
        in_run = scope if isinstance(scope, RunState) else None
        step: Step | None = None
        t0 = time.perf_counter()
        if scope.listeners:  # the argument preview only for a live widget
            scope.note_start(key4, seq, preview_args(args, kwargs))
        with observe_step(scope, key4, seq, "effect") if observers else NO_STEP as obs:
            while True:
                att.pause_sync()
                if (late := att.expired()) is not None:  # ran out while no process ran the run
                    self._fail(att, late, t0, args, kwargs)
                    raise late
                limit = att.limit()
                if self.limiter is not None:  # each attempt is a request the API sees
                    held = self.limiter.acquire_sync()
                # dn.progress and tqdm bars inside the function report to this step
                here = None
                if in_run is not None:
                    step = Step(in_run, seq, self.identity)
                    here = current_step.set(step)
                try:
                    if limit is not None:  # in a worker thread, with a cancel scope of its own
                        attempt = CancelScope(cancel_scope.get())
                        token = cancel_scope.set(attempt)
                        try:
                            call = functools.partial(self._target, *args, **kwargs)
                            result = call_with_timeout(call, limit, self.identity, attempt)
                        finally:
                            cancel_scope.reset(token)
                    else:
                        result = self._target(*args, **kwargs)
                    break
                except BaseException as e:
                    if (err := att.failed(e)) is None:
                        continue
                    self._fail(att, err, t0, args, kwargs)
                    att.give_up(err, e)
                finally:
                    if here is not None:
                        current_step.reset(here)
                    if self.limiter is not None:
                        self.limiter.release(held)
            rec, _ = self._make_record(scope, key4, seq, result, False, att.first, t0, args, kwargs)
            usage = usage_records(rec, result)
            # its tokens are counted now, once; its final progress is kept for its row
            scope.record(rec, *usage, *progress_records(rec, step))
            if obs is not NO_STEP:
                obs.recorded(rec, usage, att.failures + 1)
            return cast(R, result)

    async def _execute_async(
        self,
        scope: RunState | TopScope,
        key4: Key4,
        seq: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        in_thread: bool,
        *,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Any:
        scope.check_cut()  # awaited inside a block an earlier execution saw cut: cut here
        att = Attempts(
            scope, key4, seq, self.identity, retry or self.retry, timeout or self.timeout
        )
        # inside a run each attempt has a step its progress bars report to (_progress.py)
        in_run = scope if isinstance(scope, RunState) else None
        step: Step | None = None
        t0 = time.perf_counter()
        if scope.listeners:  # the argument preview only for a live widget
            scope.note_start(key4, seq, preview_args(args, kwargs))
        scope.inflight += 1  # while >1 effects are in flight, completions share a write
        try:
            with observe_step(scope, key4, seq, "effect") if observers else NO_STEP as obs:
                while True:
                    await att.pause()
                    if (late := att.expired()) is not None:
                        self._fail(att, late, t0, args, kwargs)
                        raise late
                    limit = att.limit()
                    # the attempt's own cancel scope, seen by the function in its worker thread
                    # (which copies the context when the attempt starts) or under a timeout; a
                    # plain async function learns of a cancellation from the CancelledError itself
                    attempt = token = None
                    if self.limiter is not None:  # each attempt is a request the API sees
                        held = await self.limiter.acquire()
                    # dn.progress and tqdm bars inside the function report to this step (a worker
                    # thread copies the context when the attempt starts)
                    here = None
                    if in_run is not None:
                        step = Step(in_run, seq, self.identity)
                        here = current_step.set(step)
                    if in_thread or limit is not None:
                        attempt = CancelScope(cancel_scope.get())
                        token = cancel_scope.set(attempt)
                    try:
                        if in_thread:
                            aw: Awaitable[Any] = asyncio.to_thread(self._target, *args, **kwargs)
                        else:
                            aw = cast(Awaitable[Any], self.fn(*args, **kwargs))
                        if limit is not None:
                            # a thread's progress is wall time; an async function's is the clock's
                            timed = asyncio.wait_for if in_thread else runtime.clock.wait_for
                            try:
                                result = await timed(aw, limit)
                            except asyncio.TimeoutError:
                                if attempt is not None:
                                    attempt.cancel()
                                raise attempt_timeout(self.identity, limit) from None
                        else:
                            result = await aw
                        break
                    except asyncio.CancelledError:
                        if attempt is not None:
                            attempt.cancel()
                        scope.note_cancelled(self.identity)
                        raise
                    except BaseException as e:
                        if (err := att.failed(e)) is None:
                            continue
                        self._fail(att, err, t0, args, kwargs)
                        att.give_up(err, e)
                    finally:
                        if token is not None:
                            cancel_scope.reset(token)
                        if here is not None:
                            current_step.reset(here)
                        if self.limiter is not None:
                            self.limiter.release(held)
                rec, _ = self._make_record(
                    scope, key4, seq, result, False, att.first, t0, args, kwargs
                )
                # the tokens it reports are written with the result (counted once, now), and
                # its final progress
                usage = usage_records(rec, result)
                await scope.record_async(rec, *usage, *progress_records(rec, step))
                if obs is not NO_STEP:
                    obs.recorded(rec, usage, att.failures + 1)
                return result
        finally:
            scope.inflight -= 1

    def _fail(
        self,
        att: Attempts,
        exc: BaseException,
        t0: float,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """The call gives up with ``exc``. Inside a run the error is part of its history (the
        workflow may take another branch on it, and a replay must take the same one);
        outside a run only with ``cache_errors``."""
        scope, key4, seq = att.scope, att.key4, att.seq
        if isinstance(exc, Exception) and (self.cache_errors or isinstance(scope, RunState)):
            rec, _ = self._make_record(scope, key4, seq, exc, True, att.first, t0, args, kwargs)
            scope.record(rec)
            scope.note_error(exc, rec)
        else:
            scope.note_failure(key4, seq, exc, att.first, attempt=max(att.failures, 1))


async def _replayed(scope: RunState | TopScope, rec: EffectRecord) -> Any:
    return replay(scope, rec)


# the effects made for plain functions given to ctx.run / ctx.map, kept while the function
# lives (a lambda made per call must not pile up here)
_adhoc: weakref.WeakKeyDictionary[Any, EffectFunction[..., Any]] = weakref.WeakKeyDictionary()
_adhoc_lock = threading.Lock()


def as_effect(fn: Callable[..., Any]) -> EffectFunction[..., Any]:
    """``fn`` as an effect: itself if it is one, else the (kept) effect of a plain function."""
    if isinstance(fn, EffectFunction):
        return fn
    with _adhoc_lock, contextlib.suppress(TypeError):  # unhashable or not weakly referable
        eff = _adhoc.get(fn)
        if eff is not None:
            return eff
    eff = EffectFunction(fn)
    with _adhoc_lock, contextlib.suppress(TypeError):
        _adhoc[fn] = eff
    return eff


@overload
def effect(
    fn: Callable[P, AsyncIterator[T]], /
) -> EffectFunction[P, StreamingCall[T]]: ...  # a streaming effect


@overload
def effect(fn: Callable[P, R], /) -> EffectFunction[P, R]: ...


@overload
def effect(
    *,
    name: str | None = None,
    version: str | None = None,
    retry: Retry | int | None = None,
    timeout: float | None = None,
    cache_errors: bool = False,
    shared: bool = False,
    reducer: Callable[[list[Any]], Any] | None = None,
    stream: str | None = None,
    limit: str | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    executor: object = None,
) -> EffectDecorator: ...


def effect(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    version: str | None = None,
    retry: Retry | int | None = None,
    timeout: float | None = None,
    cache_errors: bool = False,
    shared: bool = False,
    reducer: Callable[[list[Any]], Any] | None = None,
    stream: str | None = None,
    limit: str | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    executor: object = None,
) -> Any:  # the overloads above say what; a streaming effect's calls are not R
    """Record a function's results, keyed by a content hash of its inputs (guide, "How it
    works").

    ``name`` replaces ``module.qualname`` as its identity; ``version`` pins the code version
    (otherwise any real edit of the source starts a new cache); ``retry`` and ``timeout``
    apply per call; ``cache_errors`` records exceptions too; ``shared`` makes one cache for
    every notebook, script and run on the store (a pure function: one result per input).

    An async generator function makes a *streaming effect* (an LLM token stream): a call
    is both async-iterable (its chunks, journaled as they arrive) and awaitable (the final
    value, ``reducer(chunks)``; by default ``str`` or ``bytes`` chunks joined, else the
    list). After a crash it resumes from the chunks received — see
    :class:`~durable_nb.engine._streaming.StreamingSpec` for the ``resume_from`` convention.
    ``stream`` also appends the chunks to the run's stream of that name, for
    ``job.stream(name)`` readers.

    ``limit`` names a rate/concurrency limit shared by every effect that names it:
    ``concurrency`` attempts at once at most, ``rate`` (``"500/min"``) attempt starts in any
    sliding window of that length at most (``engine/_limits.py``). Replays never wait.

    ``executor`` (a ``concurrent.futures.Executor`` or a Dask ``distributed.Client``)
    executes each call there — another process, a cluster — and waits for its result, which
    this process records (guide, "Scaling out a notebook"); many calls at once: ``dn.map``.
    """

    def wrap(f: Callable[P, R]) -> EffectFunction[P, R]:
        return EffectFunction(
            f,
            name=name,
            version=version,
            retry=retry,
            timeout=timeout,
            cache_errors=cache_errors,
            shared=shared,
            reducer=reducer,
            stream=stream,
            limit=limit,
            concurrency=concurrency,
            rate=rate,
            executor=executor,
        )

    if fn is None:
        return wrap
    if isinstance(fn, EffectFunction):
        return fn
    return wrap(fn)
