"""``@durable`` workflows: runs that resume from their recorded history.

A run executes as one asyncio task. When it starts, its whole history is loaded into an
in-memory index, so replaying a step is a dict lookup. Steps are found by key — identity,
code version, input hash and occurrence — not by position, so editing a workflow between
executions is safe; ``strict=True`` additionally checks that replay follows the recorded
order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import math
import random as _random
import threading
import time
import uuid as _uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from .. import _codecs, _hashing
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableError,
    NonDeterminismError,
    RunCancelledError,
    RunLockedError,
    RunNotFoundError,
    SignalTimeoutError,
    UnstorableValueError,
)
from ..store import EffectRecord, EventRecord, RunRecord, SignalRecord
from ._clock import wait_event
from ._effects import EffectFunction, Retry, _check_retry, _check_timeout, replay
from ._runtime import Key4, current_scope, running_loop, runtime

__all__ = ["Context", "Job", "RunState", "Workflow", "durable", "get_job", "run", "start"]

P = ParamSpec("P")
R = TypeVar("R")

CANCEL_SIGNAL = "__cancel__"
_INBOX_POLL = 0.5  # seconds between checks for signals sent by other processes


def _now_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _json_text(value: object, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnstorableValueError(
            f"{what} must be JSON data (None, bool, int, float, str, list, dict), got {value!r}; "
            f"convert it first ({e})"
        ) from None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be stored
        return False
    return True


def _check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str):
        raise ArgumentTypeError(f"run_id must be a str, got {run_id!r}")
    if not run_id or len(run_id) > 200 or any(ord(c) < 32 for c in run_id) or not _utf8(run_id):
        raise ArgumentError(
            f"run_id must be 1-200 printable characters, got {run_id!r}; pick a short name"
        )
    return run_id


def _check_name(name: object, what: str = "name") -> str:
    if not isinstance(name, str) or not name or len(name) > 200 or not _utf8(name):
        raise ArgumentError(
            f"{what} must be a non-empty str of at most 200 characters, got {name!r}"
        )
    return name


class RunState:
    """The live state of one executing run; also its effect scope."""

    def __init__(
        self,
        job: Job[Any],
        record: RunRecord,
        history: list[EffectRecord],
        signals: list[SignalRecord],
        strict: bool,
        inbox_token: object,
    ) -> None:
        self.job = job
        self.run_id = record.run_id
        self.run = record
        self.scope_id = "run/" + record.run_id
        self.strict = strict
        self.index: dict[Key4, EffectRecord] = {
            (r.identity, r.version, r.input_hash, r.occurrence): r for r in history
        }
        self.by_seq: dict[int, EffectRecord] = {}
        for r in history:
            old = self.by_seq.get(r.seq)
            if old is None or old.started_at <= r.started_at:
                self.by_seq[r.seq] = r
        self._counts: dict[tuple[str, str], int] = {}
        self._seq = 0
        self.replayed = 0
        self.executed = 0
        self.saved = 0.0
        self.inflight = 0
        self._batch: list[EffectRecord] = []
        self._batch_waiters: list[asyncio.Future[None]] = []
        consumed = {_signal_id_of(r) for r in history if r.kind == "signal"}
        self.inbox: list[SignalRecord] = [s for s in signals if s.signal_id not in consumed]
        self.seen_signals = {s.signal_id for s in signals}
        self.wakeup = asyncio.Event()
        self.inbox_token = inbox_token
        self.last_poll = time.monotonic()
        self.cancel_reason: str | None = None
        self.listeners = job._listeners  # shared: subscribing before the run starts works

    # live observers (widgets) -----------------------------------------------------------
    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell the job's listeners what just happened (``kind``: step, status, event).

        Listeners run on the run's loop and must be quick (a widget batches what it gets);
        one that raises is dropped so it cannot break the run."""
        if not self.listeners:
            return
        msg = {"kind": kind, "run_id": self.run_id, "ts": runtime.clock.time(), **data}
        for fn in list(self.listeners):
            try:
                fn(msg)
            except Exception:
                with contextlib.suppress(ValueError):
                    self.listeners.remove(fn)

    def _emit_step(self, rec: EffectRecord, state: str) -> None:
        self.emit(
            "step",
            {
                "seq": rec.seq,
                "step": rec.kind,
                "name": rec.identity,
                "state": state,
                "duration": rec.duration,
                "args": rec.detail,
                "error": rec.is_error,
            },
        )

    # scope interface -------------------------------------------------------------
    def next_occurrence(self, identity: str, input_hash: str) -> int:
        k = (identity, input_hash)
        n = self._counts.get(k, 0)
        self._counts[k] = n + 1
        return n

    def next_seq(self) -> int:
        s = self._seq
        self._seq = s + 1
        return s

    def lookup(self, key4: Key4, seq: int) -> EffectRecord | None:
        if self.strict:
            self._check_order(key4, seq)
        return self.index.get(key4)

    def _check_order(self, key4: Key4, seq: int) -> None:
        expected = self.by_seq.get(seq)
        if expected is None:
            return
        exp4 = (expected.identity, expected.version, expected.input_hash, expected.occurrence)
        if exp4 == key4:
            return
        rows = [
            ("step", str(seq), str(seq)),
            ("identity", expected.identity, key4[0]),
            ("code version", expected.version, key4[1]),
            ("input hash", expected.input_hash, key4[2]),
            ("occurrence", str(expected.occurrence), str(key4[3])),
            ("arguments", expected.detail or "?", "(see the call)"),
        ]
        width = max(len(r[1]) for r in rows) + 2
        table = "\n".join(f"  {a:<13}{b:<{width}}{c}" for a, b, c in rows)
        raise NonDeterminismError(
            f"run {self.run_id!r} diverged from its history at step {seq} (strict=True):\n"
            f"  {'':<13}{'recorded':<{width}}actual\n{table}\n"
            "restore the workflow's earlier order, or rerun without strict=True to replay by "
            "key, or start the run afresh with restart=True"
        )

    def record(self, rec: EffectRecord) -> None:
        runtime.store.put_effects([rec])
        self._recorded(rec)

    async def record_async(self, rec: EffectRecord) -> None:
        if self.inflight <= 1 and not self._batch:
            self.record(rec)
            return
        # effects completing in the same loop iteration share one journal write
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush_batch)
        self._batch.append(rec)
        self._batch_waiters.append(fut)
        await fut

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        waiters, self._batch_waiters = self._batch_waiters, []
        try:
            runtime.store.put_effects(batch)
        except BaseException as e:
            for w in waiters:
                if not w.done():
                    w.set_exception(e)
            return
        for rec in batch:
            self._recorded(rec)
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _recorded(self, rec: EffectRecord) -> None:
        self.index[(rec.identity, rec.version, rec.input_hash, rec.occurrence)] = rec
        self.executed += 1
        if self.listeners:
            self._emit_step(rec, "failed" if rec.is_error else "executed")
        if time.monotonic() - self.last_poll > _INBOX_POLL:
            self.poll_inbox()

    def note_replay(self, rec: EffectRecord) -> None:
        self.replayed += 1
        self.saved += rec.duration
        if self.listeners:
            self._emit_step(rec, "replayed")

    def note_failure(self, key4: Key4, seq: int, exc: BaseException, started: float) -> None:
        self.event("step_failed", {"identity": key4[0], "seq": seq, "error": repr(exc)[:500]})
        if self.listeners:
            self.emit(
                "step",
                {
                    "seq": seq,
                    "step": "effect",
                    "name": key4[0],
                    "state": "failed",
                    "duration": runtime.clock.time() - started,
                    "error": repr(exc)[:500],
                },
            )

    def note_start(self, key4: Key4, seq: int, detail: str) -> None:
        if self.listeners:
            self.emit(
                "step",
                {"seq": seq, "step": "effect", "name": key4[0], "state": "running", "args": detail},
            )

    # signals -----------------------------------------------------------------------
    def deliver(self, sig: SignalRecord) -> None:
        """A signal arrived (called on the run's loop)."""
        if sig.signal_id in self.seen_signals:
            return
        self.seen_signals.add(sig.signal_id)
        self.inbox.append(sig)
        self.inbox.sort(key=lambda s: (s.sent_at, s.signal_id))
        if sig.name == CANCEL_SIGNAL and self.cancel_reason is None:
            self.request_cancel(json.loads(sig.payload) or "cancelled")
        self.wakeup.set()

    def poll_inbox(self) -> None:
        """Pick up signals other processes sent, if the store says there may be some."""
        self.last_poll = time.monotonic()
        token = runtime.store.inbox_token(self.run_id)
        if token == self.inbox_token:
            return
        self.inbox_token = token
        for sig in runtime.store.list_signals(self.run_id):
            self.deliver(sig)

    def request_cancel(self, reason: str) -> None:
        self.cancel_reason = str(reason)
        task = self.job._task
        if task is not None and not task.done():
            task.cancel()

    def take_signal(self, name: str, deadline: float | None) -> SignalRecord | None:
        for i, sig in enumerate(self.inbox):
            if sig.name == name and (
                deadline is None or sig.sent_at <= deadline or runtime.clock.time() <= deadline
            ):
                return self.inbox.pop(i)
        return None

    # status and events ---------------------------------------------------------------
    def set_run_status(self, status: str, detail: dict[str, Any] | None = None) -> None:
        rec = self.run
        rec.status = status  # type: ignore[assignment]  # validated by callers
        rec.detail = json.dumps(detail) if detail else ""
        rec.updated_at = runtime.clock.time()
        runtime.store.put_run(rec)
        if self.listeners:
            self.emit("status", {"status": status, "detail": detail or {}})

    def event(self, kind: str, data: dict[str, Any] | None = None) -> None:
        if self.listeners:
            self.emit("event", {"event": kind, "data": data or {}})
        runtime.store.append_events(
            [
                EventRecord(
                    self.run_id,
                    _uuid.uuid4().hex,
                    runtime.clock.time(),
                    kind,
                    json.dumps(data, default=str) if data else "",
                )
            ]
        )


def _signal_id_of(rec: EffectRecord) -> str:
    try:
        return str(json.loads(rec.detail).get("signal_id", ""))
    except (ValueError, AttributeError):
        return ""


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
        eff = _as_effect(fn)
        return eff.call_awaitable(
            args, kwargs, retry=_check_retry(retry), timeout=_check_timeout(timeout)
        )

    # deterministic helpers ----------------------------------------------------------
    def _step(self, identity: str, input_hash: str = "") -> tuple[Key4, int, EffectRecord | None]:
        st = self._state
        key4 = (identity, "", input_hash, st.next_occurrence(identity, input_hash))
        seq = st.next_seq()
        return key4, seq, st.lookup(key4, seq)

    def _record(self, key4: Key4, seq: int, value: object, kind: str, detail: str = "") -> None:
        payload = _codecs.encode(value, runtime.store.signer, what=kind)
        self._state.record(
            EffectRecord(
                self._state.scope_id,
                *key4,
                payload=payload,
                kind=kind,
                seq=seq,
                started_at=runtime.clock.time(),
                detail=detail,
            )
        )

    def now(self) -> datetime:
        """The current time (UTC), recorded: a replay returns the same instant."""
        key4, seq, rec = self._step("dn.now")
        if rec is not None:
            ts = float(replay(self._state, rec))
        else:
            ts = runtime.clock.time()
            self._record(key4, seq, ts, "now")
        return datetime.fromtimestamp(ts, timezone.utc)

    def random(self) -> float:
        """A random float in [0, 1), recorded: a replay returns the same number."""
        key4, seq, rec = self._step("dn.random")
        if rec is not None:
            return float(replay(self._state, rec))
        value = _random.random()
        self._record(key4, seq, value, "random")
        return value

    def uuid(self) -> _uuid.UUID:
        """A random UUID (version 4), recorded: a replay returns the same one."""
        key4, seq, rec = self._step("dn.uuid")
        if rec is not None:
            return _uuid.UUID(str(replay(self._state, rec)))
        value = _uuid.uuid4()
        self._record(key4, seq, str(value), "uuid")
        return value

    # timers ------------------------------------------------------------------------------
    async def sleep(self, seconds: float) -> None:
        """A durable timer: its deadline is recorded, so after a restart it only waits what is
        left, and fires at once if the deadline passed while no process ran the workflow."""
        if (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ArgumentError(f"seconds must be a finite number >= 0, got {seconds!r}")
        key4, seq, rec = self._step("dn.sleep", _hashing.hash_value(float(seconds)).hex())
        if rec is not None:
            deadline = float(replay(self._state, rec))
        else:
            deadline = runtime.clock.time() + seconds
            self._record(
                key4,
                seq,
                deadline,
                "sleep",
                json.dumps({"seconds": seconds, "until": _now_iso(deadline)}),
            )
        await self._sleep_until(deadline)

    async def sleep_until(self, when: datetime | float) -> None:
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
        key4, seq, rec = self._step("dn.sleep_until", _hashing.hash_value(ts).hex())
        if rec is None:
            self._record(key4, seq, ts, "sleep", json.dumps({"until": _now_iso(ts)}))
        await self._sleep_until(ts)

    async def _sleep_until(self, deadline: float) -> None:
        st, clock = self._state, runtime.clock
        remaining = deadline - clock.time()
        if remaining <= 0:
            return
        st.set_run_status("waiting", {"timer_until": _now_iso(deadline)})
        try:
            while (remaining := deadline - clock.time()) > 0:
                await clock.sleep(min(remaining, _INBOX_POLL * 10))
                st.poll_inbox()
        finally:
            st.set_run_status("running")

    # signals -----------------------------------------------------------------------------
    async def wait_signal(self, name: str, *, timeout: float | None = None) -> Any:
        """Wait for the next signal called ``name`` and return its payload.

        Signals are delivered in the order they were sent, each once, also when they were
        sent while no process ran the workflow. With ``timeout`` (seconds, durable like a
        timer) a :class:`SignalTimeoutError` is raised when none came in time.
        """
        _check_name(name)
        if name == CANCEL_SIGNAL:
            raise ArgumentError(f"name {name!r} is reserved for cancellation; use job.cancel()")
        timeout = _check_timeout(timeout)
        st, clock = self._state, runtime.clock
        ih = _hashing.hash_value(name).hex()
        key4, seq, rec = self._step("dn.signal", ih)
        deadline = None
        if timeout is not None:  # the deadline step is taken on replay too: occurrences align
            dkey, dseq, drec = self._step("dn.signal_deadline", ih)
        if rec is not None:
            return replay(st, rec)
        if timeout is not None:
            if drec is not None:
                deadline = float(replay(st, drec))
            else:
                deadline = clock.time() + timeout
                self._record(dkey, dseq, deadline, "deadline", json.dumps({"signal": name}))
        waiting = False
        try:
            while True:
                st.poll_inbox()
                sig = st.take_signal(name, deadline)
                if sig is not None:
                    value = json.loads(sig.payload)
                    self._record(
                        key4,
                        seq,
                        value,
                        "signal",
                        json.dumps({"name": name, "signal_id": sig.signal_id}),
                    )
                    st.event("signal_received", {"name": name, "signal_id": sig.signal_id})
                    return value
                if deadline is not None and clock.time() >= deadline:
                    raise SignalTimeoutError(
                        f"no signal {name!r} reached run {st.run_id!r} within "
                        f"timeout={timeout:g}s; send it with job.signal({name!r}, payload) or "
                        "`durable-nb signal`, or wait longer"
                    )
                if not waiting:
                    waiting = True
                    st.set_run_status("waiting", {"signal": name})
                st.wakeup.clear()
                wait = (
                    _INBOX_POLL if deadline is None else min(_INBOX_POLL, deadline - clock.time())
                )
                await wait_event(clock, st.wakeup, max(0.0, wait))
        finally:
            if waiting:
                st.set_run_status("running")

    # status and children --------------------------------------------------------------------
    def set_status(self, value: Any) -> None:
        """Publish a custom status (JSON data) readable from outside with ``job.custom_status()``."""
        text = _json_text(value, "status")
        rec = self._state.run
        rec.custom_status = text
        rec.status_version += 1
        rec.updated_at = runtime.clock.time()
        runtime.store.put_run(rec)

    async def child(
        self, workflow: Workflow[..., R], /, *args: Any, run_id: str | None = None, **kwargs: Any
    ) -> R:
        """Run a sub-workflow as a run of its own and return its result (recorded)."""
        if not isinstance(workflow, Workflow):
            raise ArgumentTypeError(
                f"ctx.child expects a @durable workflow, got {workflow!r}; decorate it with "
                "@durable"
            )
        ih = workflow.binder.input_hash(args, kwargs)
        key4, seq, rec = self._step("dn.child:" + workflow.name, ih)
        if rec is not None:
            return cast(R, replay(self._state, rec))
        child_id = (
            _check_run_id(run_id)
            if run_id is not None
            else (f"{self.run_id}/{workflow.name.rsplit('.', 1)[-1]}-{key4[3]}-{ih[:8]}")
        )
        job = _start(workflow, args, kwargs, run_id=child_id, parent_id=self.run_id)
        try:
            result = await job.wait()
        except asyncio.CancelledError:
            if self._state.cancel_reason is not None:  # cancelled, not interrupted: so is the child
                job.cancel(f"parent {self.run_id!r} was cancelled")
            raise
        self._record(key4, seq, result, "child", json.dumps({"run_id": child_id}))
        return result


# the EffectFunction made for a plain callable passed to ctx.run, kept as long as the callable
# lives (a lambda made per call must not pile up here)
_adhoc: weakref.WeakKeyDictionary[Any, EffectFunction[..., Any]] = weakref.WeakKeyDictionary()
_adhoc_lock = threading.Lock()


def _as_effect(fn: Callable[..., Any]) -> EffectFunction[..., Any]:
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


class Workflow(Generic[P, R]):
    """A durable workflow (see :func:`durable`). Call it to run it to completion."""

    def __init__(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        *,
        name: str | None = None,
        strict: bool = False,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise ArgumentTypeError(
                f"@durable needs an async function (async def {getattr(fn, '__name__', '?')}"
                f"(ctx, ...)), got {fn!r}"
            )
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise ArgumentTypeError(
                f"a @durable workflow takes the run's Context as its first parameter: "
                f"async def {fn.__name__}(ctx, ...)"
            )
        self.fn = fn
        self.name = _check_name(name, "name") if name is not None else _hashing.effect_identity(fn)
        self.strict = bool(strict)
        self.binder = _hashing.ArgBinder(fn, skip_first=True)
        self.source_version: str | None = None  # set by %%durable: the cell's own code version
        # set by %%durable: a completed run executes again, replaying every step, so the
        # cell's names and output come back (its recorded result alone would not do that)
        self.replay_completed = False
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ for introspection

    def __repr__(self) -> str:
        return f"<durable workflow {self.name}>"

    @property
    def code_version(self) -> str:
        """A hash of the workflow's normalized source: a completed run whose code changed
        executes again (replaying its recorded steps) instead of returning a stale result."""
        return self.source_version or _hashing.code_version(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if isinstance(current_scope.get(), RunState):
            raise DurableError(
                f"calling workflow {self.name} inside a run would block it; use "
                f"`await ctx.child({self.fn.__name__}, ...)` instead"
            )
        return _start(self, args, kwargs, blocking=True).result()

    def run_id_for(self, *args: Any, **kwargs: Any) -> str:
        """The run id derived from the workflow's name and its arguments."""
        return f"{self.name}:{self.binder.input_hash(args, kwargs)[:16]}"


@overload
def durable(fn: Callable[..., Coroutine[Any, Any, R]], /) -> Workflow[..., R]: ...


@overload
def durable(
    *, name: str | None = None, strict: bool = False
) -> Callable[[Callable[..., Coroutine[Any, Any, R]]], Workflow[..., R]]: ...


def durable(fn: Any = None, /, *, name: str | None = None, strict: bool = False) -> Any:
    """Make an ``async def workflow(ctx, ...)`` resumable (SPEC 3).

    ``name`` replaces ``module.qualname`` (it names derived run ids); ``strict`` raises
    :class:`NonDeterminismError` when a replay departs from the recorded order.
    """
    if fn is None:
        return lambda f: Workflow(f, name=name, strict=strict)
    return Workflow(fn, name=name, strict=strict)


class Job(Generic[R]):
    """A handle on a run: wait for it, signal it, cancel it, ask its status."""

    def __init__(self, run_id: str, workflow: Workflow[..., R] | None) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self._future: concurrent.futures.Future[R] = concurrent.futures.Future()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: RunState | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def __repr__(self) -> str:
        return f"<durable_nb.Job run_id={self.run_id!r} status={self.status()!r}>"

    def done(self) -> bool:
        return self._future.done()

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener(message)`` for each step, status change and event of this run
        while it executes in this process (on the run's loop; keep it quick). Returns a
        function that unsubscribes."""
        if not callable(listener):
            raise ArgumentTypeError(f"listener must be callable, got {listener!r}")
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def wait(self) -> R:
        """Wait for the run's result (re-raises its error with the original type)."""
        # shielded: a waiter that gives up must not cancel the run's result for everyone
        return await asyncio.shield(asyncio.wrap_future(self._future))

    def __await__(self) -> Any:
        return self.wait().__await__()

    def result(self, timeout: float | None = None) -> R:
        """Block until the run ends and return its result. Ctrl-C stops the run cleanly and
        leaves it resumable."""
        timeout = _check_timeout(timeout)
        if self._loop is not None and running_loop() is self._loop and not self._future.done():
            raise DurableError(
                f"job.result() would block the event loop that runs {self.run_id!r}; "
                "use `await job.wait()` here"
            )
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():  # the run's own TimeoutError, not ours
                raise
            raise TimeoutError(
                f"run {self.run_id!r} did not finish within timeout={timeout:g}s"
            ) from None
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def _interrupt(self) -> None:
        loop, task = self._loop, self._task
        if loop is None or task is None or task.done():
            return
        loop.call_soon_threadsafe(task.cancel)
        try:
            self._future.exception(timeout=5)
        except BaseException:
            pass

    def status(self) -> str:
        if self._state is not None and not self._future.done():
            return self._state.run.status
        if self._task is not None and not self._future.done():
            return "pending"  # started in this process, not yet executing
        rec = runtime.store.get_run(self.run_id)
        return rec.status if rec is not None else "unknown"

    def custom_status(self) -> Any:
        """The last value the run passed to ``ctx.set_status`` (or None)."""
        rec = self._state.run if self._state is not None else runtime.store.get_run(self.run_id)
        return json.loads(rec.custom_status) if rec is not None and rec.custom_status else None

    def signal(self, name: str, payload: Any = None) -> None:
        """Send the run a signal: stored durably, delivered in order, once."""
        signal(self.run_id, name, payload)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run at its next await; it ends as cancelled and runs its finally blocks."""
        cancel(self.run_id, reason)


def get_job(run_id: str) -> Job[Any]:
    """A handle on an existing run, live in this process or only in the store."""
    _check_run_id(run_id)
    with runtime.jobs_lock:
        job = runtime.jobs.get(run_id)
    if job is not None:
        return job
    rec = runtime.store.get_run(run_id)
    if rec is None:
        raise RunNotFoundError(
            f"no run {run_id!r} in the store {runtime.store.url!r}; list runs with "
            "`durable-nb runs`"
        )
    job = Job(run_id, None)
    outcome = _outcome_of_record(rec)
    if outcome is not None:
        (_resolve if outcome[0] else _reject)(job._future, outcome[1])
    return job


def _resolve(fut: concurrent.futures.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _reject(fut: concurrent.futures.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _outcome_of_record(rec: RunRecord) -> tuple[bool, Any] | None:
    """A completed or cancelled run's recorded outcome; None while it can still progress."""
    if rec.status == "completed" and rec.result is not None:
        return (True, _codecs.decode(rec.result, runtime.store.signer))
    if rec.status == "cancelled":
        reason = json.loads(rec.detail or "{}").get("reason", "")
        return (
            False,
            RunCancelledError(
                f"run {rec.run_id!r} was cancelled ({reason}); "
                "start it again with restart=True to run it afresh"
            ),
        )
    return None


_last_sent = 0.0
_send_lock = threading.Lock()


def _send_time() -> float:
    """Wall time, strictly increasing within this process, so signals keep their send order
    even when sent within the clock's resolution or across a clock step backwards."""
    global _last_sent
    with _send_lock:
        _last_sent = max(time.time(), _last_sent + 1e-6)
        return _last_sent


def signal(run_id: str, name: str, payload: Any = None) -> None:
    """Send a signal to a run (see :meth:`Job.signal`)."""
    _check_run_id(run_id)
    _check_name(name)
    text = _json_text(payload, "payload")
    sig = SignalRecord(run_id, _uuid.uuid4().hex, name, text, _send_time())
    runtime.store.add_signal(sig)
    with runtime.jobs_lock:
        job = runtime.jobs.get(run_id)
    if job is not None and job._loop is not None and job._state is not None:
        state = job._state
        job._loop.call_soon_threadsafe(state.deliver, sig)


def cancel(run_id: str, reason: str = "cancelled") -> None:
    """Cancel a run, wherever it executes; a run no process executes is marked at once."""
    if not isinstance(reason, str):
        raise ArgumentTypeError(f"reason must be a str, got {reason!r}")
    with runtime.jobs_lock:
        live = runtime.jobs.get(run_id)
    if live is None:
        rec = runtime.store.get_run(run_id)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store {runtime.store.url!r}")
        if rec.status in ("completed", "failed", "cancelled"):
            return
    signal(run_id, CANCEL_SIGNAL, reason)
    if live is None:
        try:
            lease = runtime.store.acquire_run(run_id, runtime.owner)
        except RunLockedError:
            return  # another process runs it and will see the signal
        try:
            rec = runtime.store.get_run(run_id)
            if rec is not None and rec.status not in ("completed", "failed", "cancelled"):
                rec.status = "cancelled"
                rec.detail = json.dumps({"reason": reason})
                rec.updated_at = time.time()
                runtime.store.put_run(rec)
        finally:
            lease.release()


def _start(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None = None,
    restart: bool = False,
    parent_id: str | None = None,
    blocking: bool = False,
) -> Job[R]:
    """Start a run on this thread's loop, or on the engine's loop when there is none or the
    caller will block on the result (``blocking``)."""
    if not isinstance(workflow, Workflow):
        raise ArgumentTypeError(
            f"expected a @durable workflow, got {workflow!r}; decorate it with @durable"
        )
    workflow.binder.bind(args, kwargs)  # a missing argument fails here, before anything runs
    rid = _check_run_id(run_id) if run_id is not None else workflow.run_id_for(*args, **kwargs)
    with runtime.jobs_lock:
        live = runtime.jobs.get(rid)
        if live is not None and not live.done():
            if restart:
                raise DurableError(
                    f"run {rid!r} is executing in this process; cancel it before restarting it"
                )
            return cast(Job[R], live)
        job: Job[R] = Job(rid, workflow)
        runtime.jobs[rid] = job
    here = running_loop()
    loop = here if here is not None and not blocking else runtime.engine_loop()
    job._loop = loop
    coro = _drive(job, workflow, args, kwargs, restart, parent_id)
    if loop is here:
        job._task = loop.create_task(coro)
    else:

        def create() -> None:
            job._task = loop.create_task(coro)

        loop.call_soon_threadsafe(create)
    return job


def start(
    workflow: Workflow[P, R],
    /,
    *args: Any,
    run_id: str | None = None,
    restart: bool = False,
    **kwargs: Any,
) -> Job[R]:
    """Start (or resume) a run and return its :class:`Job` at once.

    The run id is ``run_id`` or derived from the workflow's name and arguments. Starting a
    run that completed returns its recorded result without executing anything; a failed or
    interrupted run resumes. ``restart=True`` forgets the run's history first.
    """
    return _start(workflow, args, kwargs, run_id=run_id, restart=bool(restart))


def run(
    workflow: Workflow[P, R],
    /,
    *args: Any,
    run_id: str | None = None,
    restart: bool = False,
    **kwargs: Any,
) -> R:
    """Run a workflow to completion and return its result; works in any thread, including a
    notebook cell whose thread already runs an event loop."""
    if isinstance(current_scope.get(), RunState):
        raise DurableError(
            "dn.run() inside a run would block it; use `await ctx.child(workflow, ...)`"
        )
    return _start(
        workflow, args, kwargs, run_id=run_id, restart=bool(restart), blocking=True
    ).result()


async def _drive(
    job: Job[R],
    wf: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    restart: bool,
    parent_id: str | None,
) -> None:
    """Execute (or resume) one run. The job's future is settled only after the run's lease is
    released and its records merged, so whoever sees the result can start the run again."""
    store, clock = runtime.store, runtime.clock
    state: RunState | None = None
    lease = None
    outcome: tuple[bool, Any] | None = None  # (ok, value or exception)
    try:
        lease = store.acquire_run(job.run_id, runtime.owner)
        rec = store.get_run(job.run_id)
        if rec is not None and restart:
            store.delete_run(job.run_id)
            rec = None
        input_hash = wf.binder.input_hash(args, kwargs)
        code_version = wf.code_version
        if rec is not None and (
            rec.status == "cancelled"
            or (
                not wf.replay_completed
                and (rec.input_hash, rec.code_version) == (input_hash, code_version)
            )
        ):
            outcome = _outcome_of_record(rec)
            if outcome is not None:
                return  # ended with these arguments and this code: its recorded outcome
        history = store.load_effects("run/" + job.run_id)
        token = store.inbox_token(job.run_id)  # before reading: a signal sent meanwhile shows
        signals = store.list_signals(job.run_id)
        now = clock.time()
        resumed = rec is not None
        if rec is None:
            try:
                args_payload = _codecs.encode(
                    wf.binder.bind(args, kwargs), store.signer, what="the workflow's arguments"
                )
            except UnstorableValueError:
                args_payload = None
            rec = RunRecord(
                job.run_id, wf.name, "running", now, now, args=args_payload, parent_id=parent_id
            )
        rec.status, rec.updated_at, rec.detail = "running", now, ""
        rec.input_hash, rec.code_version = input_hash, code_version
        rec.executions += 1
        rec.error = None
        state = RunState(job, rec, history, signals, wf.strict, token)
        job._state = state
        store.put_run(rec)
        state.event(
            "resumed" if resumed else "started",
            {"execution": rec.executions, "history": len(history)},
        )
        current_scope.set(state)
        cancel_sig = next((s for s in state.inbox if s.name == CANCEL_SIGNAL), None)
        if cancel_sig is not None:
            state.cancel_reason = json.loads(cancel_sig.payload) or "cancelled"
            raise asyncio.CancelledError
        result: Any = await wf.fn(Context(state), *args, **kwargs)
        state.run.result = _codecs.encode(
            result, store.signer, what=f"the result of workflow {wf.name}"
        )
        _finish(state, "completed")
        outcome = (True, result)
    except asyncio.CancelledError:
        if state is not None and state.cancel_reason is not None:
            _finish(state, "cancelled", detail={"reason": state.cancel_reason})
            outcome = (
                False,
                RunCancelledError(
                    f"run {job.run_id!r} was cancelled ({state.cancel_reason}); start it again "
                    "with restart=True to run it afresh"
                ),
            )
        else:  # interrupted (Ctrl-C, loop shutdown): the run stays resumable
            if state is not None:
                state.event("interrupted", _stats(state))
            outcome = (
                False,
                KeyboardInterrupt(f"run {job.run_id!r} was interrupted; run it again to resume"),
            )
    except BaseException as e:
        if state is not None and state.run.status != "completed":
            try:
                state.run.error = _codecs.encode_error(e, store.signer)
                _finish(state, "failed", detail={"error": repr(e)[:500]})
            except Exception:  # the store failed too: the error we report is the run's
                pass
        outcome = (False, e)
        if not isinstance(e, Exception):
            raise
    finally:
        try:
            if lease is not None:
                lease.release()
        finally:
            with runtime.jobs_lock:
                if runtime.jobs.get(job.run_id) is job:
                    del runtime.jobs[job.run_id]
            if outcome is None:
                outcome = (False, DurableError(f"run {job.run_id!r} ended without an outcome"))
            if outcome[0]:
                _resolve(job._future, outcome[1])
            else:
                _reject(job._future, outcome[1])


def _stats(state: RunState) -> dict[str, Any]:
    return {
        "replayed": state.replayed,
        "executed": state.executed,
        "saved_seconds": round(state.saved, 6),
    }


def _finish(state: RunState, status: str, detail: dict[str, Any] | None = None) -> None:
    state.event(status, {**_stats(state), **(detail or {})})
    state.set_run_status(status, detail)
