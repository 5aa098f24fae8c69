"""The workflow API: :class:`Context`, what a workflow receives as its first argument.

Each ``ctx`` operation is a journaled step with its own ``kind`` (see ``_journal``): effects
(``ctx.run``), recorded time, randomness and ids, durable timers, signals and queues,
interrupt blocks, fan-out (``ctx.all``) and races (``ctx.race``), run streams, custom
status, key/value state (``_kv.py``), replay-aware logging (``_log.py``), child runs and
continue-as-new. Each takes its step when called, so concurrent use replays in call order.
Child runs start through ``runtime.start_run``, which the run driver installs, so this room
does not import the driver that executes it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime, timezone
from typing import Any, Literal, NoReturn, TypeVar, cast

from .. import _hashing
from .._journal import (
    FINAL_STATUSES,
    ChildDetail,
    DeadlineDetail,
    DequeueDetail,
    RaceDetail,
    SignalDetail,
    SleepDetail,
    StartChildDetail,
    StatusDetail,
    check_name,
    check_queue,
    check_run_id,
    check_user_signal,
    detail_text,
    iso_time,
    json_text,
    queue_signal,
)
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    EngineError,
    SignalTimeoutError,
)
from ..store import EffectRecord
from ._branches import awaitables, cancel_branches, discard, retrieve, spawn
from ._effects import as_effect
from ._interrupts import InterruptBlock, TimeoutBlock
from ._jobs import Job, get_job
from ._kv import RunKV, kv_of, kv_of_step
from ._log import RunLog
from ._map import map_in_run
from ._retry import Retry, check_retry, check_timeout
from ._runtime import Key4, cancel_scope, cancelled, runtime
from ._state import RunState, replay
from ._streams import StreamWriter
from ._workflow import Workflow, version_of

__all__ = ["Context", "ContinueAsNew"]

R = TypeVar("R")
T = TypeVar("T")


class Context:
    """What a workflow receives as its first argument: the durable operations of its run."""

    def __init__(self, state: RunState) -> None:
        self._state = state

    @property
    def run_id(self) -> str:
        return self._state.run_id

    def __repr__(self) -> str:
        return f"<durable_nb.Context run_id={self.run_id!r}>"

    # effects -----------------------------------------------------------------------
    def run(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retry: Retry | int | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Awaitable[Any]:
        """Run ``fn(*args, **kwargs)`` as a journaled effect; sync functions run in a thread.

        ``retry`` and ``timeout`` are reserved for this call (wrap ``fn`` in
        ``functools.partial`` if it takes arguments of those names).
        """
        if not callable(fn):
            raise ArgumentTypeError(
                f"ctx.run expects a callable as fn, got {fn!r} of type {type(fn).__name__}; "
                "pass the function and its arguments: ctx.run(fetch, url), not ctx.run(fetch(url))"
            )
        eff = as_effect(fn)
        return eff.call_awaitable(
            args, kwargs, retry=check_retry(retry), timeout=check_timeout(timeout)
        )

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        /,
        *,
        executor: object = None,
        max_in_flight: int | None = None,
    ) -> Awaitable[list[Any]]:
        """Call the effect ``fn`` on every item on ``executor`` (a
        ``concurrent.futures.Executor`` or a Dask ``distributed.Client``; None: threads of
        this process) and return the results in input order. One step of the run, however
        many items: each item's result is recorded as it completes, so after a crash only
        the missing items are sent again. At most ``max_in_flight`` items are out at once
        (None: no bound), within ``fn``'s ``limit=``/``rate=``; a failed item is retried by
        ``fn``'s ``retry=``, and items that fail for good do not stop the others: they
        raise :class:`~durable_nb.errors.MapError` once every item ended (guide, "Scaling
        out a notebook")."""
        return map_in_run(self._state, fn, items, executor, max_in_flight)

    # deterministic helpers ----------------------------------------------------------
    def now(self) -> datetime:
        """The current time (UTC), recorded: a replay returns the same instant."""
        key4, seq, rec = self._state.step("dn.now")
        if rec is not None:
            ts = float(replay(self._state, rec))
        else:
            ts = runtime.clock.time()
            self._state.record_value(key4, seq, ts, "now")
        return datetime.fromtimestamp(ts, timezone.utc)

    def random(self) -> float:
        """A random float in [0, 1), recorded: a replay returns the same number."""
        key4, seq, rec = self._state.step("dn.random")
        if rec is not None:
            return float(replay(self._state, rec))
        value = _random.random()
        self._state.record_value(key4, seq, value, "random")
        return value

    def uuid(self) -> _uuid.UUID:
        """A random UUID (version 4), recorded: a replay returns the same one."""
        key4, seq, rec = self._state.step("dn.uuid")
        if rec is not None:
            return _uuid.UUID(str(replay(self._state, rec)))
        value = _uuid.uuid4()
        self._state.record_value(key4, seq, str(value), "uuid")
        return value

    # timers ------------------------------------------------------------------------------
    # Like effects, the operations below take their step (key, occurrence, position) when
    # they are *called*, not when first awaited, so ``ctx.all``/``ctx.race`` over them replay
    # in the order the calls were written.
    def sleep(self, seconds: float) -> Awaitable[None]:
        """A durable timer: its deadline is recorded, so after a restart it only waits what is
        left, and fires at once if the deadline passed while no process ran the workflow.
        Waiting costs nothing: no polling, one timer on the event loop."""
        if (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ArgumentError(f"seconds must be a finite number >= 0, got {seconds!r}")
        key4, seq, rec = self._state.step("dn.sleep", _hashing.hash_value(float(seconds)).hex())
        if rec is not None:
            deadline = float(replay(self._state, rec))
        else:
            deadline = runtime.clock.time() + seconds
            self._state.record_value(
                key4,
                seq,
                deadline,
                "sleep",
                detail_text(SleepDetail(seconds=seconds, until=iso_time(deadline))),
            )
        return self._sleep_until(deadline)

    def sleep_until(self, when: datetime | float) -> Awaitable[None]:
        """Like :meth:`sleep`, to an absolute time (an aware datetime or epoch seconds)."""
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ArgumentError(
                    f"when must be timezone-aware, got {when!r}; add tzinfo=timezone.utc"
                )
            ts = when.timestamp()
        elif isinstance(when, (int, float)) and not isinstance(when, bool) and math.isfinite(when):
            ts = float(when)
        else:
            raise ArgumentTypeError(f"when must be a datetime or epoch seconds, got {when!r}")
        key4, seq, rec = self._state.step("dn.sleep_until", _hashing.hash_value(ts).hex())
        if rec is None:
            self._state.record_value(
                key4, seq, ts, "sleep", detail_text(SleepDetail(until=iso_time(ts)))
            )
        else:
            replay(self._state, rec)
        return self._sleep_until(ts)

    async def _sleep_until(self, deadline: float) -> None:
        st, clock = self._state, runtime.clock
        await st.caught_up()  # its deadline is durable before the run waits on it
        if deadline - clock.time() <= 0:
            return
        what = {"kind": "timer", "until": iso_time(deadline)}
        st.begin_wait(what)
        try:
            while (remaining := deadline - clock.time()) > 0:
                await clock.sleep(remaining)
        finally:
            st.end_wait(what)

    # signals and queues --------------------------------------------------------------------
    def wait_signal(self, name: str, *, timeout: float | None = None) -> Awaitable[Any]:
        """Wait for the next signal called ``name`` and return its payload.

        Signals are delivered in the order they were sent, each once, also when they were
        sent while no process ran the workflow. With ``timeout`` (seconds, durable like a
        timer) a :class:`SignalTimeoutError` is raised when none came in time.
        """
        check_name(name)
        check_user_signal(name)
        timeout = check_timeout(timeout)
        run_id = self.run_id

        def late() -> str:
            return (
                f"no signal {name!r} reached run {run_id!r} within timeout={timeout:g}s; send it "
                f"with job.signal({name!r}, payload) or `durable-nb signal`, or wait longer"
            )

        return self._receive(name, "dn.signal", "signal", name, timeout, late)

    def dequeue(self, queue: str, *, timeout: float | None = None) -> Awaitable[Any]:
        """Take the next message from the run's queue ``queue`` (sent with
        ``job.enqueue(queue, message)`` or ``dn.enqueue(run_id, queue, message)``): messages
        come in the order they were sent, each once, including those sent while no process
        ran the workflow; unconsumed ones survive continue-as-new. With ``timeout`` (seconds,
        durable) a :class:`SignalTimeoutError` is raised when the queue stayed empty.
        """
        check_queue(queue)
        timeout = check_timeout(timeout)
        run_id = self.run_id

        def late() -> str:
            return (
                f"no message on queue {queue!r} reached run {run_id!r} within "
                f"timeout={timeout:g}s; send one with job.enqueue({queue!r}, message), or wait "
                "longer"
            )

        return self._receive(queue_signal(queue), "dn.dequeue", "dequeue", queue, timeout, late)

    def _receive(
        self,
        signame: str,
        identity: str,
        kind: Literal["signal", "dequeue"],
        subject: str,
        timeout: float | None,
        late: Callable[[], str],
    ) -> Coroutine[Any, Any, Any]:
        """The step of a ``wait_signal`` (``subject``: the signal's name) or a ``dequeue``
        (``subject``: the queue), and the coroutine that waits for it."""
        ih = _hashing.hash_value(subject).hex()
        key4, seq, rec = self._state.step(identity, ih)
        deadline_step = None
        if timeout is not None:  # taken on replay too: occurrences stay aligned
            deadline_step = self._state.step(identity + "_deadline", ih)
        return self._receive_body(
            signame, kind, subject, timeout, late, key4, seq, rec, deadline_step
        )

    async def _receive_body(
        self,
        signame: str,
        kind: Literal["signal", "dequeue"],
        subject: str,
        timeout: float | None,
        late: Callable[[], str],
        key4: Key4,
        seq: int,
        rec: EffectRecord | None,
        deadline_step: tuple[Key4, int, EffectRecord | None] | None,
    ) -> Any:
        st, clock = self._state, runtime.clock
        if rec is not None:
            return replay(st, rec)
        deadline = None
        if timeout is not None and deadline_step is not None:
            dkey, dseq, drec = deadline_step
            if drec is not None:
                deadline = float(replay(st, drec))
            else:
                deadline = clock.time() + timeout
                what_for = (
                    DeadlineDetail(signal=subject)
                    if kind == "signal"
                    else DeadlineDetail(queue=subject)
                )
                st.record_value(dkey, dseq, deadline, "deadline", detail_text(what_for))
        wait = (
            {"kind": "signal", "name": signame}
            if kind == "signal"
            else {"kind": "queue", "name": subject}
        )
        waiting = False
        await st.caught_up()  # what it wrote is durable before it may wait (looked at first)
        try:
            while True:
                await st.refresh_inbox()
                sig = st.take_signal(signame, deadline)
                if sig is not None:
                    value = json.loads(sig.payload)
                    got = (
                        SignalDetail(name=subject, signal_id=sig.signal_id)
                        if kind == "signal"
                        else DequeueDetail(queue=subject, signal_id=sig.signal_id)
                    )
                    st.record_value(key4, seq, value, kind, detail_text(got))
                    st.event("signal_received", dict(got))
                    return value
                if deadline is not None and clock.time() >= deadline:
                    raise SignalTimeoutError(late())
                if not waiting:
                    waiting = True
                    st.begin_wait(wait)
                st.wakeup.clear()
                # a signal from this process sets wakeup; the run's inbox poller sets it for
                # signals other processes send, so an untimed wait needs no polling of its own
                await clock.wait(
                    st.wakeup, None if deadline is None else max(0.0, deadline - clock.time())
                )
        finally:
            if waiting:
                st.end_wait(wait)

    def interrupt_on(self, name: str) -> InterruptBlock:
        """``async with ctx.interrupt_on("stop"): ...`` — a block that is cancelled when the
        signal ``name`` arrives, raising :class:`~durable_nb.Interrupted` (with the signal's
        ``.name`` and ``.payload``) out of the ``async with``. The signal is consumed once and
        recorded: a replay raises at the same point — the first step inside the block that
        the interrupted execution did not complete (or the block's end). A ``name`` signal
        already waiting when the block starts interrupts it at once. Effects in flight in the
        block are cancelled (``dn.cancelled()`` is then True in them)."""
        check_name(name)
        check_user_signal(name)
        return InterruptBlock(self._state, name)

    # fan-out, fan-in and races --------------------------------------------------------------
    def all(self, aws: Iterable[Awaitable[Any]], /) -> Awaitable[list[Any]]:
        """Run awaitables together (effect calls, ``ctx.sleep``, ``ctx.wait_signal``,
        ``ctx.child``, coroutines that use them) and return their results in order. If one
        fails, the others are cancelled (effects in flight see ``dn.cancelled()``) and its
        error is raised. Replays deterministically: each step's key was taken when it was
        called."""
        items = awaitables(aws, "ctx.all")
        return self._all(items)

    async def _all(self, items: list[Awaitable[Any]]) -> list[Any]:
        if not items:
            return []
        branches = spawn(items)
        futs = [f for f, _ in branches]
        try:
            await asyncio.wait(futs, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            await cancel_branches(branches)
            raise
        failed = next(
            (f for f in futs if f.done() and not f.cancelled() and f.exception() is not None),
            None,
        )
        if failed is not None:
            await cancel_branches(branches)
            retrieve(futs)
            raise cast(BaseException, failed.exception())
        return [f.result() for f in futs]

    def race(self, *aws: Awaitable[Any]) -> Awaitable[tuple[int, Any]]:
        """``idx, value = await ctx.race(a, b, ...)``: the first awaitable to finish wins; the
        others are cancelled and told so (``dn.cancelled()`` / ``ctx.cancelled()`` turn True
        in their effects, including effects running in worker threads). A timer racing an
        effect is the timeout pattern: ``await ctx.race(fetch(url), ctx.sleep(30))``.

        The winner is recorded (a ``race`` step): a replay returns the same winner, even when
        by then every contender could finish at once, and does not start the losers. If the
        winner raised, its error propagates (nothing is recorded). ``ctx.race([a, b])``
        works too."""
        if len(aws) == 1 and isinstance(aws[0], (list, tuple)):
            aws = tuple(aws[0])
        items = awaitables(aws, "ctx.race")
        if not items:
            raise ArgumentError("ctx.race needs at least one awaitable, got none")
        key4, seq, rec = self._state.step("dn.race", _hashing.hash_value(len(items)).hex())
        return self._race(items, key4, seq, rec)

    async def _race(
        self, items: list[Awaitable[Any]], key4: Key4, seq: int, rec: EffectRecord | None
    ) -> tuple[int, Any]:
        st = self._state
        if rec is not None and 0 <= (idx := int(replay(st, rec))) < len(items):
            for j, aw in enumerate(items):
                if j != idx:
                    discard(aw)
            return idx, await items[idx]
        branches = spawn(items)
        futs = [f for f, _ in branches]
        try:
            done, _ = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await cancel_branches(branches)
            raise
        idx = min(i for i, f in enumerate(futs) if f in done)
        winner = futs[idx]
        won = not winner.cancelled() and winner.exception() is None
        if won:  # recorded before any other await: a loser cannot finish in between
            self._state.record_value(
                key4, seq, idx, "race", detail_text(RaceDetail(winner=idx, of=len(futs)))
            )
        await cancel_branches(branches)
        retrieve(futs)
        return idx, winner.result()  # the winner's error, if it failed

    # durable timeouts ----------------------------------------------------------------------
    def timeout(self, seconds: float) -> TimeoutBlock:
        """``async with ctx.timeout(seconds): ...`` — the durable ``asyncio.timeout``: when
        the block runs past ``seconds`` its task is cancelled (effects in flight see
        ``dn.cancelled()``) and :class:`~durable_nb.errors.StepTimeoutError` is raised out of
        the ``async with``. Its deadline is recorded when the block is first entered (a
        restart waits only what is left), and a timeout is recorded when it strikes, so a
        replay times out at the same point — never finishing the block when the first
        execution did not, nor the other way round."""
        secs = check_timeout(seconds, "seconds")
        if secs is None:
            raise ArgumentError("seconds must be a number of seconds > 0, got None")
        return TimeoutBlock(self._state, secs, f"ctx.timeout({secs:g})")

    def wait_for(self, aw: Awaitable[T], timeout: float | None) -> Awaitable[T]:
        """``await ctx.wait_for(aw, seconds)`` — the durable ``asyncio.wait_for``: ``aw``'s
        result, or :class:`~durable_nb.errors.StepTimeoutError` when it takes longer than
        ``timeout`` seconds (``aw`` is then cancelled). The deadline and the outcome are
        recorded like :meth:`timeout`'s; ``timeout=None`` just awaits ``aw``."""
        item = awaitables([aw], "ctx.wait_for")[0]
        secs = check_timeout(timeout)
        if secs is None:
            return item
        block = TimeoutBlock(self._state, secs, f"ctx.wait_for(..., {secs:g})")
        block.prepare()  # its steps now, at call time, like an effect call's
        return self._wait_for(item, block)

    async def _wait_for(self, aw: Awaitable[T], block: TimeoutBlock) -> T:
        try:
            async with block:
                return await aw
        finally:
            discard(aw)  # cut before it was awaited (a replayed timeout): never run it

    def cancelled(self) -> bool:
        """True once the run is being cancelled (in the workflow body), or — called from an
        effect — once that effect's result is no longer wanted (see :func:`cancelled`)."""
        return cancelled()

    # streams -----------------------------------------------------------------------------
    def stream(self, name: str) -> StreamWriter:
        """A writer of the run's stream ``name`` (see :class:`StreamWriter`): each write is a
        journaled step, so a resumed run does not write a chunk twice; readers outside use
        ``job.stream(name)``."""
        return StreamWriter(self._state, name)

    # status, state and logs -------------------------------------------------------------------
    def set_status(self, value: Any) -> None:
        """Publish a custom status (JSON data) readable from outside with ``job.custom_status()``
        and awaited with ``job.wait_status_change()``. Each call that is not a replay counts
        one version (``status_version``); a replay does not publish again. ``None`` clears it
        (``job.custom_status()`` is None again; see :meth:`reset_status`)."""
        text = json_text(value, "status")
        st = self._state
        key4, seq, rec = self._state.step("dn.status", _hashing.hash_value(text).hex())
        if rec is not None:
            replay(st, rec)  # published by an earlier execution; the run record holds the latest
            return
        run = st.run
        run.custom_status = text
        run.status_version += 1
        run.updated_at = runtime.clock.time()
        if not st.write_behind(runs=[run]):
            runtime.store.put_run(run)
        preview = text if len(text) <= 200 else text[:197] + "..."
        # the value too, so a fork's record starts with the status its steps published
        self._state.record_value(
            key4,
            seq,
            {"version": run.status_version, "value": text},
            "status",
            detail_text(StatusDetail(value=preview)),
        )
        st.emit("custom_status", {"version": run.status_version, "value": json.loads(text)})

    def reset_status(self) -> None:
        """Clear the custom status: ``ctx.set_status(None)``, a new version whose value is
        None (waiters of ``job.wait_status_change()`` see it)."""
        self.set_status(None)

    @property
    def kv(self) -> RunKV:
        """The run's key/value state (see :class:`RunKV`): ``ctx.kv.set(k, v)``,
        ``ctx.kv.get(k)``, ``ctx.kv.delete(k)``, ``ctx.kv.items()``, ``k in ctx.kv``."""
        return RunKV(self._state)

    def kv_of(self, run_id: str, key: str, default: Any = None) -> Awaitable[Any]:
        """The value of ``key`` in another run's key/value state (``default`` when that run
        has no such key, or no such run exists yet), read now and recorded as a step: a
        replay returns the same value without reading again."""
        step = kv_of_step(self._state, run_id, key)
        return kv_of(self._state, run_id, key, default, step)

    @property
    def log(self) -> RunLog:
        """A logger (``ctx.log.info(...)`` etc.) that writes each message once: a replay of
        the run does not log again. Logger name ``durable_nb.run.<workflow name>``."""
        return RunLog(self._state)

    # children and generations ------------------------------------------------------------------
    def child(
        self, workflow: Workflow[..., R], /, *args: Any, run_id: str | None = None, **kwargs: Any
    ) -> Awaitable[R]:
        """Run a sub-workflow as a run of its own and return its result (recorded). The child
        is cancelled with its parent."""
        child_id, key4, seq, rec = self._child_step("child", workflow, args, kwargs, run_id, "")
        return self._child(workflow, args, kwargs, child_id, key4, seq, rec)

    def _child_step(
        self,
        what: str,
        workflow: Workflow[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run_id: str | None,
        tag: str,
    ) -> tuple[str, Key4, int, EffectRecord | None]:
        """The step of ``ctx.<what>(workflow, ...)`` and the child's run id (given, or derived
        from this run, the workflow, the step's occurrence and the arguments)."""
        if not isinstance(workflow, Workflow):
            raise ArgumentTypeError(
                f"ctx.{what} expects a @durable workflow, got {workflow!r}; decorate it with "
                "@durable"
            )
        workflow.binder.bind(args, kwargs)
        ih = workflow.binder.input_hash(args, kwargs)
        key4, seq, rec = self._state.step(f"dn.{what}:" + workflow.name, ih)
        child_id = (
            check_run_id(run_id)
            if run_id is not None
            else f"{self.run_id}/{workflow.name.rsplit('.', 1)[-1]}-{tag}{key4[3]}-{ih[:8]}"
        )
        return child_id, key4, seq, rec

    async def _child(
        self,
        workflow: Workflow[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        child_id: str,
        key4: Key4,
        seq: int,
        rec: EffectRecord | None,
    ) -> R:
        if rec is not None:
            return cast(R, replay(self._state, rec))
        job = runtime.start_run(workflow, args, kwargs, run_id=child_id, parent_id=self.run_id)
        try:
            result = await job.wait()
        except asyncio.CancelledError:
            await self._cancel_child(job)
            raise
        self._state.record_value(
            key4, seq, result, "child", detail_text(ChildDetail(run_id=child_id))
        )
        return result

    async def _cancel_child(self, job: Job[Any]) -> None:
        """This branch is cancelled while its child runs. When the run is cancelled, or the
        branch lost a ``ctx.race`` or a sibling in ``ctx.all`` failed, the child is cancelled
        too (the run's cancellation waits for it elsewhere; a lost branch waits here, so the
        child's finally blocks have run when the race returns). An interrupted run (Ctrl-C,
        a worker stopping) leaves its child running: both resume."""
        scope = cancel_scope.get()
        lost = scope is not None and scope.cancelled() and self._state.cancel_reason is None
        if self._state.cancel_reason is not None:
            job.cancel(f"parent {self.run_id!r} was cancelled")
        elif lost and not job.done():
            job.cancel(f"it lost a ctx.race (or a ctx.all sibling failed) in run {self.run_id!r}")
            ended = asyncio.wrap_future(job._future)
            await asyncio.wait([ended], timeout=30)
            if ended.done() and not ended.cancelled():
                ended.exception()  # its outcome (cancelled) is the child's own business

    def start_child(
        self, workflow: Workflow[..., R], /, *args: Any, run_id: str | None = None, **kwargs: Any
    ) -> Awaitable[Job[R]]:
        """Start a sub-workflow without waiting for it (fire and forget) and return its
        :class:`Job`. The start is recorded: a replay returns a handle on the same child (and
        resumes it if no process runs it) instead of starting another. The child's
        ``parent_id`` is this run; it is cancelled when this run is cancelled. Use
        ``await ctx.child(...)`` to wait for a child's result durably."""
        child_id, key4, seq, rec = self._child_step(
            "start_child", workflow, args, kwargs, run_id, "s"
        )
        return self._start_child(workflow, args, kwargs, child_id, key4, seq, rec)

    async def _start_child(
        self,
        workflow: Workflow[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        child_id: str,
        key4: Key4,
        seq: int,
        rec: EffectRecord | None,
    ) -> Job[R]:
        st = self._state
        if rec is not None:
            child_id = str(replay(st, rec))
            st.children.add(child_id)
            return _child_handle(workflow, args, kwargs, child_id, self.run_id)
        # recorded first; the child's id is derived from this step, so a crash between the two
        # only means the replay starts (resumes) that same child
        self._state.record_value(
            key4,
            seq,
            child_id,
            "start_child",
            detail_text(StartChildDetail(run_id=child_id, workflow=workflow.name)),
        )
        st.children.add(child_id)
        job = runtime.start_run(workflow, args, kwargs, run_id=child_id, parent_id=self.run_id)
        opened = job._opened
        if opened is not None and job._loop is asyncio.get_running_loop():
            # its record is stored once this returns (its start-up reads may run off the loop)
            await asyncio.shield(opened)
        return job

    def continue_as_new(self, *args: Any, version: str | None = None, **kwargs: Any) -> NoReturn:
        """End this generation of the run and start the next with new arguments, in the same
        process: its history starts empty (bounded history for eternal loops), its key/value
        state, unconsumed signals and queue messages stay, its custom status stays, and it
        runs on the newest version of the workflow — or on ``version``, which must be
        defined in this process. ``job.wait()`` returns the result of the last generation.
        Does not return."""
        wf = self._state.workflow
        if wf is None:
            raise EngineError(f"run {self.run_id!r} has no workflow to continue with")
        if version is not None:
            wf = version_of(wf, version)  # an unknown version fails here, in this generation
        wf.binder.bind(args, kwargs)  # a wrong call fails here, in this generation
        raise ContinueAsNew(args, kwargs, version)


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new`` and caught by the run's driver. A BaseException, so
    a workflow's ``except Exception`` does not swallow it."""

    def __init__(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], version: str | None = None
    ) -> None:
        super().__init__("continue as new")
        self.call = (args, kwargs)
        self.version = version


def _child_handle(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    child_id: str,
    parent_id: str,
) -> Job[R]:
    """A replayed ``start_child``: the child's job if it runs here or ended, else resume it."""
    with runtime.jobs_lock:
        live = runtime.jobs.get(child_id)
    if live is not None:
        return cast(Job[R], live)
    rec = runtime.store.get_run(child_id)
    if rec is not None and rec.status in FINAL_STATUSES:
        return cast(Job[R], get_job(child_id))
    return runtime.start_run(workflow, args, kwargs, run_id=child_id, parent_id=parent_id)
