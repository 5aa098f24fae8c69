"""Durable fan-out: ``await ctx.map(fn, items, executor=...)`` in a run, ``dn.map(...)``
outside runs.

Each item is a call of the effect ``fn`` (its key: the function and the item's content
hash, as ``fn(item)`` would have). The items not recorded yet go to the executor — a
``concurrent.futures.Executor`` or a Dask cluster (``_executors.py``) — at most
``max_in_flight`` at a time and within the effect's ``limit=``/``rate=``; each result is
journaled by this process as it comes back (the records of every item that ended since the
last write share one write), so a crash of the notebook, of a worker or of the cluster loses
no completed item, and running the map again sends only the missing ones. Results come back
in input order.

A failing item is retried by the effect's ``retry=``; one that fails for good does not stop
the others (they run to the end and are recorded), then :class:`~durable_nb.errors.MapError`
is raised with every failed index and its original error (guide, "Scaling out a
notebook", for why). In a run the map is one step (``map``) and its items are ``map_item``
records of that step; their errors are recorded like an effect's, so a replay raises the
same ``MapError`` and a resume of the failed run computes only the failed items again.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, cast

from .. import _codecs, _hashing
from .._journal import MapDetail, detail_text, read_detail
from ..errors import ArgumentError, ArgumentTypeError, BlockingCallError, MapError
from ..store import EffectRecord
from ._effects import EffectFunction, as_effect
from ._executors import Done, check_executor, executor_name, local_pool, open_pool, shippable
from ._executors import is_dask as _is_dask
from ._observe import step as observe_step
from ._progress import Step, current_step, progress
from ._retry import preview_args
from ._runtime import Key4, TopScope, current_scope, running_loop, runtime
from ._state import RunState

__all__ = ["map_in_run", "map_items"]

_POLL = 0.1  # seconds between two looks at a stop request while items are in flight
_TASKS_PER_THREAD = 4  # tasks out per worker thread: it never waits for the next one
_TASK_SECONDS = 0.05  # the work a task of many trivial items aims at
_MAX_BATCH = 1000  # items in one task at most


def _check(fn: object, items: object, max_in_flight: object, what: str) -> list[Any]:
    if not callable(fn):
        raise ArgumentTypeError(
            f"{what} expects a function as fn, got {fn!r}; pass the function itself: "
            f"{what}(score, rows), not {what}(score(row), rows)"
        )
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ArgumentTypeError(
            f"items must be an iterable of the function's inputs (a list, a range, a "
            f"DataFrame's rows as a list), got {items!r}"
        )
    if max_in_flight is not None and (
        not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1
    ):
        raise ArgumentError(
            f"max_in_flight must be an int >= 1 or None (no bound), got {max_in_flight!r}"
        )
    return list(items)


def _effect_of(fn: Callable[..., Any], what: str) -> EffectFunction[..., Any]:
    eff = as_effect(fn)
    if eff.is_async or eff.streaming is not None:
        raise ArgumentTypeError(
            f"{what} sends items to an executor, which calls plain functions; "
            f"{eff.identity} is async or streaming: make it a plain def, or gather its "
            "calls with ctx.all"
        )
    return eff


class _Map:
    """One map: its keys and the records found, decided when it is called."""

    def __init__(
        self,
        eff: EffectFunction[..., Any],
        items: list[Any],
        executor: object,
        max_in_flight: int | None,
        scope: RunState | TopScope,
    ) -> None:
        self.eff, self.items, self.max_in_flight = eff, items, max_in_flight
        self.executor = executor if executor is not None else local_pool()
        self.scope = scope
        ident, version, binder = eff.identity, eff.version, eff._binder
        keys: list[Key4] = []
        for item in items:
            ih = binder.input_hash((item,), {})
            keys.append((ident, version, ih, scope.next_occurrence(ident, ih)))
        self.keys = keys
        self.seq = -1
        self.step: tuple[Key4, int, EffectRecord | None] | None = None
        if isinstance(scope, RunState):
            # one step for the whole map, keyed by the function and every item's key
            digest = _hashing.hash_value("|".join(f"{k[2]}:{k[3]}" for k in keys)).hex()
            self.step = scope.step("dn.map:" + ident, digest)
            self.seq = self.step[1]
            index = scope.index
            self.found = [index.get(k) for k in keys]
        else:
            self.found = _get_many(scope.scope_id, keys)
        self.results: list[Any] = [None] * len(items)
        self.errors: dict[int, BaseException] = {}
        self.replayed = self.executed = self.tasks = 0
        signer = runtime.store.signer
        for i, rec in enumerate(self.found):
            if rec is None:
                continue
            self.replayed += 1
            if rec.is_error:
                exc = _codecs.decode_error(rec.payload, signer)
                scope.note_error(exc, rec)
                self.errors[i] = exc
            else:
                self.results[i] = _codecs.decode(rec.payload, signer)
        self.missing = [i for i, rec in enumerate(self.found) if rec is None]

    # ------------------------------------------------------------------ executing
    def detail(self, complete: bool) -> str:
        d: MapDetail = {
            "fn": self.eff.identity,
            "items": len(self.items),
            "complete": complete,
            "executed": self.executed,
            "replayed": self.replayed,
            "failed": len(self.errors),
            "executor": executor_name(self.executor),
        }
        return detail_text(d)

    def execute(self, stop: threading.Event) -> None:
        """Send the missing items out and journal each result as it comes back (blocking);
        reports progress through ``dn.progress`` (a bar in a cell, the step's row in a run's
        widget), which a map with nothing missing never shows."""
        if not self.missing:
            return
        label = f"map {self.eff.identity.rsplit('.', 1)[-1]}"
        for _ in progress(self._drive(stop), total=len(self.missing), desc=label):
            pass

    def _drive(self, stop: threading.Event) -> Iterator[None]:
        """The driver's loop: keep the executor busy with tasks, journal what comes back,
        retry what may be retried; yields once per item that ended."""
        eff, scope, seq, keys, items = self.eff, self.scope, self.seq, self.keys, self.items
        pool = open_pool(self.executor)
        ship = shippable(eff.fn, eff, dask=_is_dask(self.executor))
        store, signer, sid = runtime.store, runtime.store.signer, scope.scope_id
        record_errors = isinstance(scope, RunState) or eff.cache_errors
        retry, limiter, bound = eff.retry, eff.limiter, self.max_in_flight
        what = f"the result of {eff.identity}"
        todo = deque(self.missing)
        due: list[tuple[float, int]] = []  # retries: (when, index)
        attempts: dict[int, int] = {}
        # tasks out at once: enough to keep every worker busy while results travel
        max_tasks = pool.threads * _TASKS_PER_THREAD
        # items per task: one until their durations are known, then as many as make a task
        # of about _TASK_SECONDS, never so many that a worker would sit idle
        cap = max(1, min(_MAX_BATCH, len(todo) // max_tasks))
        if bound is not None:
            cap = min(cap, max(1, bound // pool.threads))
        size, mean = 1, 0.0
        name = f"dn-map-{uuid.uuid4().hex[:8]}-"
        tasks_out = items_out = 0
        try:
            while todo or due or items_out:
                if stop.is_set():
                    raise asyncio.CancelledError
                now = time.monotonic()
                while due and due[0][0] <= now:
                    todo.append(heapq.heappop(due)[1])
                wait = _POLL
                tasks: list[tuple[str, list[tuple[int, Any]]]] = []
                room = len(todo) if bound is None else bound - items_out
                while todo and room > 0 and tasks_out + len(tasks) < max_tasks:
                    chunk: list[tuple[int, Any]] = []
                    while todo and len(chunk) < min(size, room):
                        if limiter is not None and (w := limiter.try_take()) is not None:
                            wait = min(wait, w) if w > 0 else wait
                            break
                        i = todo.popleft()
                        chunk.append((i, items[i]))
                    if not chunk:
                        break
                    tasks.append((f"{name}{self.tasks}", chunk))
                    self.tasks += 1
                    room -= len(chunk)
                    items_out += len(chunk)
                if tasks:
                    pool.submit(ship, tasks)
                    tasks_out += len(tasks)
                if due:
                    wait = min(wait, max(0.0, due[0][0] - now))
                if not items_out:
                    time.sleep(wait)
                    continue
                ended_tasks, done = pool.wait(wait)
                tasks_out -= ended_tasks
                items_out -= len(done)
                if not done:
                    continue
                took = [d.duration for d in done if d.ok]
                if took:  # how long an item takes, smoothed: the next tasks' size
                    m = sum(took) / len(took)
                    mean = m if not mean else 0.7 * mean + 0.3 * m
                    size = max(1, min(cap, int(_TASK_SECONDS / max(mean, 1e-7))))
                recs: list[tuple[int, EffectRecord]] = []
                ended = 0
                for d in done:
                    if limiter is not None:
                        limiter.release(None)
                    i = d.pos
                    if d.ok:
                        payload = _codecs.encode(d.value, signer, what=what)
                        self.results[i] = d.value
                        self.executed += 1
                    else:
                        n = attempts[i] = attempts.get(i, 0) + 1
                        exc = d.value
                        if (
                            retry is not None
                            and n < retry.attempts
                            and isinstance(exc, retry.retry_on)
                        ):
                            heapq.heappush(due, (time.monotonic() + retry.delay(n), i))
                            continue
                        self.errors[i] = exc
                        if not (record_errors and isinstance(exc, Exception)):
                            ended += 1
                            continue
                        payload = _codecs.encode_error(exc, signer)
                    ended += 1
                    recs.append((i, _item_record(sid, keys[i], payload, d, seq, items[i])))
                if recs:  # durable before anything else happens
                    store.put_effects([r for _, r in recs])
                    if isinstance(scope, RunState):
                        for i, r in recs:
                            if r.is_error:
                                scope.note_error(self.errors[i], r)
                for _ in range(ended):
                    yield None
        finally:
            if tasks_out:
                pool.cancel()
                if limiter is not None:
                    for _ in range(items_out):
                        limiter.release(None)

    def outcome(self) -> list[Any]:
        if not self.errors:
            return self.results
        n = len(self.items)
        shown = "; ".join(f"item {i}: {e!r}"[:200] for i, e in list(self.errors.items())[:3])
        more = f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
        raise MapError(
            f"{len(self.errors)} of {n} items of map({self.eff.identity}) failed: {shown}{more}. "
            "The other items' results are recorded: fix the cause and run the map again (only "
            "the failed items execute); .errors maps each failed index to its error",
            self.errors,
            self.results,
        )


def _get_many(scope_id: str, keys: list[Key4]) -> list[EffectRecord | None]:
    """The records of a map's keys: in one query on a store that can (``get_effects``:
    DuckDB, PostgreSQL), else one read each (the memory store)."""
    store = runtime.store
    full = [(scope_id, *k) for k in keys]
    many = getattr(store, "get_effects", None)
    if callable(many):
        return cast(list[EffectRecord | None], many(full))
    return [store.get_effect(k) for k in full]


def _item_record(
    sid: str, key4: Key4, payload: _codecs.Payload, d: Done, seq: int, item: Any
) -> EffectRecord:
    return EffectRecord(
        sid,
        *key4,
        payload=payload,
        is_error=not d.ok,
        kind="map_item",
        seq=seq,
        started_at=time.time() - d.duration,
        duration=d.duration,
        detail="" if d.ok else preview_args((item,), {}),
    )


# ------------------------------------------------------------------------ outside runs
def map_items(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    executor: object = None,
    max_in_flight: int | None = None,
) -> list[Any]:
    """``dn.map``: call the effect ``fn`` on every item (see the module docstring) and
    return the results in input order; blocks until every item ended."""
    values = _check(fn, items, max_in_flight, "dn.map")
    check_executor(executor)
    eff = _effect_of(fn, "dn.map")
    scope: RunState | TopScope = current_scope.get() or runtime.top
    if eff.shared:
        scope = runtime.shared
    if isinstance(scope, RunState) and running_loop() is scope.loop:
        raise BlockingCallError(
            "dn.map blocks until every item ended, which would stop this run's event loop; "
            "in a workflow use `await ctx.map(fn, items, executor=...)`"
        )
    m = _Map(eff, values, executor, max_in_flight, scope)
    m.execute(threading.Event())
    return m.outcome()


# ------------------------------------------------------------------------------- in runs
def map_in_run(
    state: RunState,
    fn: Callable[..., Any],
    items: Iterable[Any],
    executor: object,
    max_in_flight: int | None,
) -> Awaitable[list[Any]]:
    """``ctx.map``: the map's step and its items' keys are taken now, at call time."""
    values = _check(fn, items, max_in_flight, "ctx.map")
    check_executor(executor)
    eff = _effect_of(fn, "ctx.map")
    m = _Map(eff, values, executor, max_in_flight, state)
    return _run(state, m)


async def _run(state: RunState, m: _Map) -> list[Any]:
    assert m.step is not None
    key4, seq, rec = m.step
    complete = rec is not None and read_detail(rec.detail).get("complete") is True
    if complete and not m.missing and rec is not None:
        state.note_replay(rec)  # the whole map was recorded: nothing executes, nothing spins
        return m.outcome()
    started = runtime.clock.time()
    t0 = time.perf_counter()
    if rec is None:  # the map's start, so a trace shows it (and its items) while it runs
        runtime.store.put_effects([_map_record(state, m, key4, seq, started, 0.0, False)])
    state.note_start(key4, seq, f"({len(m.items)} items)")
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    with observe_step(state, key4, seq, "map") as obs:
        # the thread that drives the map runs in the step's context: its items carry it
        ctx = contextvars.copy_context()
        if state.listeners:  # dn.progress reports to this step's row
            ctx.run(current_step.set, Step(state, seq, "dn.map:" + m.eff.identity))
        fut = loop.run_in_executor(None, ctx.run, m.execute, stop)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()  # the items in flight are given up; those recorded stay
            await asyncio.wait([fut], timeout=30)
            if fut.done() and not fut.cancelled():
                fut.exception()  # the driver's own stop: retrieved, not logged
            raise
        final = _map_record(state, m, key4, seq, started, time.perf_counter() - t0, True)
        await state.record_async(final)
        obs.recorded(final, (), 1)
    return m.outcome()


def _map_record(
    state: RunState, m: _Map, key4: Key4, seq: int, started: float, took: float, complete: bool
) -> EffectRecord:
    payload = _codecs.encode(
        {"items": len(m.items), "failed": len(m.errors)}, runtime.store.signer, what="map"
    )
    return EffectRecord(
        state.scope_id,
        *key4,
        payload=payload,
        kind="map",
        seq=seq,
        started_at=started,
        duration=took,
        detail=m.detail(complete),
    )
