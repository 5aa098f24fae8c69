"""``@durable`` workflows: runs that resume from their recorded history.

A run executes as one asyncio task. When it starts, its whole history is loaded into an
in-memory index, so replaying a step is a dict lookup. Steps are found by key — identity,
code version, input hash and occurrence — not by position, so editing a workflow between
executions is safe; ``strict=True`` additionally checks that replay follows the recorded
order.

A run's :class:`Context` adds what durable-execution engines offer: timers, signals and
queues, interrupt blocks, fan-out (``ctx.all``) and races (``ctx.race``), child runs,
continue-as-new, per-run key/value state (``_kv.py``), custom status and replay-aware
logging. Each is a journaled step with its own ``kind`` (sleep, signal, dequeue, interrupt,
race, child, start_child, kv_set, status, log ...), so the trace shows it and a replay
repeats it exactly; each takes its step when called, so concurrent use replays in call order.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import functools
import importlib
import inspect
import json
import logging
import math
import random as _random
import re
import threading
import time
import uuid as _uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import replace as _replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Generic, NoReturn, ParamSpec, TypeVar, cast, overload

from .. import _codecs, _hashing
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableError,
    Interrupted,
    NonDeterminismError,
    RunCancelledError,
    RunLockedError,
    RunNotFoundError,
    SignalTimeoutError,
    StoreLockedError,
    StoreUnavailableError,
    UnstorableValueError,
    WorkflowVersionError,
)
from ..store import (
    FINAL_STATUSES,
    EffectRecord,
    EventRecord,
    RunLease,
    RunRecord,
    SignalRecord,
)
from ._clock import wait_event
from ._effects import EffectFunction, Retry, _check_retry, _check_timeout, replay
from ._kv import RunKV, kv_base_texts, kv_snapshot
from ._runtime import (
    CancelScope,
    Key4,
    cancel_scope,
    cancelled,
    current_scope,
    running_loop,
    runtime,
)
from ._streams import StreamReader, StreamWriter

__all__ = [
    "Context",
    "Job",
    "RunState",
    "Workflow",
    "cancelled",
    "durable",
    "enqueue",
    "get_job",
    "run",
    "start",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

CANCEL_SIGNAL = "__cancel__"
#: queue messages are signals named ``QUEUE_PREFIX + queue``: ordered, stored, delivered once
QUEUE_PREFIX = "__queue__:"
#: step kinds that consume a signal (their detail names its ``signal_id``)
SIGNAL_STEP_KINDS = ("signal", "dequeue", "interrupt")
#: bookkeeping records that are not calls of the workflow (no place in the recorded order)
_AUX_KINDS = ("retry", "kv_base")
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
            if r.kind in _AUX_KINDS:
                continue
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
        consumed = {_signal_id_of(r) for r in history if r.kind in SIGNAL_STEP_KINDS}
        self.inbox: list[SignalRecord] = [s for s in signals if s.signal_id not in consumed]
        self.seen_signals = {s.signal_id for s in signals}
        self.wakeup = asyncio.Event()
        self.inbox_token = inbox_token
        self.last_poll = time.monotonic()
        self.cancel_reason: str | None = None
        self.listeners = job._listeners  # shared: subscribing before the run starts works
        self.workflow: Workflow[..., Any] | None = job.workflow
        self.root_scope = CancelScope()  # cancelled with the run: effects see dn.cancelled()
        self.waits: list[dict[str, Any]] = []  # what the run waits on now (timers, signals...)
        self.interrupts: list[_InterruptBlock] = []  # active ``ctx.interrupt_on`` blocks
        self.children: set[str] = set()  # runs started by ctx.start_child
        self.kv: dict[str, str] = {}  # the run's key/value state as it replays: key -> JSON

    # live observers (widgets) -----------------------------------------------------------
    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell the job's listeners what just happened (``kind``: step, status, event, or
        custom_status with ``version`` and ``value`` when ``ctx.set_status`` publishes).

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
        rec = self.index.get(key4)
        if rec is None:
            # inside an interrupt_on block that an earlier execution saw interrupted, the
            # first step that execution did not complete is where the interrupt struck
            block = _active_interrupt.get()
            while block is not None:
                if block.replay is not None and block.state is self:
                    err, block.replay = block.replay, None
                    raise err
                block = block.parent
        return rec

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

    def record_together(self, rec: EffectRecord, others: list[EffectRecord]) -> None:
        """Record a step with records of the run's other scopes in one atomic write."""
        runtime.store.put_effects([rec, *others])
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

    def note_failure(
        self,
        key4: Key4,
        seq: int,
        exc: BaseException,
        started: float,
        *,
        attempt: int = 1,
        retry_in: float | None = None,
    ) -> None:
        """An attempt failed: a ``step_failed`` event (with its attempt number and, when it
        will be retried, the delay) so the trace shows every attempt."""
        data: dict[str, Any] = {
            "identity": key4[0],
            "seq": seq,
            "error": repr(exc)[:500],
            "attempt": attempt,
        }
        if retry_in is not None:
            data["retry_in"] = retry_in
        self.event("step_failed", data)
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
                    "attempt": attempt,
                    "retry_in": retry_in,
                },
            )

    # durable retry schedules ---------------------------------------------------------
    @staticmethod
    def _retry_key(key4: Key4) -> Key4:
        return ("dn.retry:" + key4[0], key4[1], key4[2], key4[3])

    def retry_state(self, key4: Key4) -> dict[str, Any] | None:
        """Where an effect call's retries stood when an earlier execution stopped."""
        rec = self.index.get(self._retry_key(key4))
        if rec is None:
            return None
        value = _codecs.decode(rec.payload, runtime.store.signer)
        return value if isinstance(value, dict) else None

    def record_retry(self, key4: Key4, seq: int, state: dict[str, Any]) -> None:
        """Record an effect call's retry schedule (failed attempts, next attempt's time), so
        a restart between two attempts resumes the schedule instead of starting over."""
        rkey = self._retry_key(key4)
        detail = {"identity": key4[0], "attempt": state["failures"]}
        if state.get("next_at") is not None:
            detail["next_at"] = _now_iso(state["next_at"])
        rec = EffectRecord(
            self.scope_id,
            *rkey,
            payload=_codecs.encode(state, runtime.store.signer),
            kind="retry",
            seq=seq,
            started_at=runtime.clock.time(),
            detail=json.dumps(detail),
        )
        runtime.store.put_effects([rec])
        self.index[rkey] = rec

    # waits -------------------------------------------------------------------------
    def begin_wait(self, what: dict[str, Any]) -> None:
        """The run waits on ``what`` (a timer, a signal, a retry delay): status ``waiting``,
        with every wait under way in its detail (several with ``ctx.all``)."""
        self.waits.append(what)
        self._publish_waits()

    def end_wait(self, what: dict[str, Any]) -> None:
        with contextlib.suppress(ValueError):
            self.waits.remove(what)
        self._publish_waits()

    def _publish_waits(self) -> None:
        if not self.waits:
            self.set_run_status("running")
            return
        if len(self.waits) == 1:
            w = self.waits[0]
            if w["kind"] == "signal":
                self.set_run_status("waiting", {"signal": w["name"]})
                return
            if w["kind"] == "timer":
                self.set_run_status("waiting", {"timer_until": w["until"]})
                return
        self.set_run_status("waiting", {"waiting": list(self.waits)})

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
        for block in reversed(self.interrupts):  # the innermost block takes it
            if block.name == sig.name and block.fired is None:
                block.fire(self.inbox.pop(self.inbox.index(sig)))
                break
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
        self.root_scope.cancel()
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
        key4, seq, rec = self._step("dn.sleep_until", _hashing.hash_value(ts).hex())
        if rec is None:
            self._record(key4, seq, ts, "sleep", json.dumps({"until": _now_iso(ts)}))
        else:
            replay(self._state, rec)
        return self._sleep_until(ts)

    async def _sleep_until(self, deadline: float) -> None:
        st, clock = self._state, runtime.clock
        if deadline - clock.time() <= 0:
            return
        what = {"kind": "timer", "until": _now_iso(deadline)}
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
        _check_name(name)
        _check_user_signal(name)
        timeout = _check_timeout(timeout)
        run_id = self.run_id

        def late() -> str:
            return (
                f"no signal {name!r} reached run {run_id!r} within timeout={timeout:g}s; send it "
                f"with job.signal({name!r}, payload) or `durable-nb signal`, or wait longer"
            )

        return self._receive(name, "dn.signal", "signal", {"name": name}, timeout, late)

    def dequeue(self, queue: str, *, timeout: float | None = None) -> Awaitable[Any]:
        """Take the next message from the run's queue ``queue`` (sent with
        ``job.enqueue(queue, message)`` or ``dn.enqueue(run_id, queue, message)``): messages
        come in the order they were sent, each once, including those sent while no process
        ran the workflow; unconsumed ones survive continue-as-new. With ``timeout`` (seconds,
        durable) a :class:`SignalTimeoutError` is raised when the queue stayed empty.
        """
        _check_queue(queue)
        timeout = _check_timeout(timeout)
        run_id = self.run_id

        def late() -> str:
            return (
                f"no message on queue {queue!r} reached run {run_id!r} within "
                f"timeout={timeout:g}s; send one with job.enqueue({queue!r}, message), or wait "
                "longer"
            )

        return self._receive(
            QUEUE_PREFIX + queue, "dn.dequeue", "dequeue", {"queue": queue}, timeout, late
        )

    def _receive(
        self,
        signame: str,
        identity: str,
        kind: str,
        detail: dict[str, Any],
        timeout: float | None,
        late: Callable[[], str],
    ) -> Coroutine[Any, Any, Any]:
        ih = _hashing.hash_value(next(iter(detail.values()))).hex()
        key4, seq, rec = self._step(identity, ih)
        deadline_step = None
        if timeout is not None:  # taken on replay too: occurrences stay aligned
            deadline_step = self._step(identity + "_deadline", ih)
        return self._receive_body(
            signame, kind, detail, timeout, late, key4, seq, rec, deadline_step
        )

    async def _receive_body(
        self,
        signame: str,
        kind: str,
        detail: dict[str, Any],
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
                what_for = {"signal": detail["name"]} if "name" in detail else dict(detail)
                self._record(dkey, dseq, deadline, "deadline", json.dumps(what_for))
        wait = (
            {"kind": "signal", "name": signame}
            if kind == "signal"
            else {"kind": "queue", "name": detail["queue"]}
        )
        waiting = False
        try:
            while True:
                st.poll_inbox()
                sig = st.take_signal(signame, deadline)
                if sig is not None:
                    value = json.loads(sig.payload)
                    got = {**detail, "signal_id": sig.signal_id}
                    self._record(key4, seq, value, kind, json.dumps(got))
                    st.event("signal_received", got)
                    return value
                if deadline is not None and clock.time() >= deadline:
                    raise SignalTimeoutError(late())
                if not waiting:
                    waiting = True
                    st.begin_wait(wait)
                st.wakeup.clear()
                # a signal from this process sets wakeup; the run's inbox poller sets it for
                # signals other processes send, so an untimed wait needs no polling of its own
                await wait_event(
                    clock,
                    st.wakeup,
                    None if deadline is None else max(0.0, deadline - clock.time()),
                )
        finally:
            if waiting:
                st.end_wait(wait)

    def interrupt_on(self, name: str) -> _InterruptBlock:
        """``async with ctx.interrupt_on("stop"): ...`` — a block that is cancelled when the
        signal ``name`` arrives, raising :class:`~durable_nb.Interrupted` (with the signal's
        ``.name`` and ``.payload``) out of the ``async with``. The signal is consumed once and
        recorded: a replay raises at the same point — the first step inside the block that
        the interrupted execution did not complete (or the block's end). A ``name`` signal
        already waiting when the block starts interrupts it at once. Effects in flight in the
        block are cancelled (``dn.cancelled()`` is then True in them)."""
        _check_name(name)
        _check_user_signal(name)
        return _InterruptBlock(self, name)

    # fan-out, fan-in and races --------------------------------------------------------------
    def all(self, aws: Iterable[Awaitable[Any]], /) -> Awaitable[list[Any]]:
        """Run awaitables together (effect calls, ``ctx.sleep``, ``ctx.wait_signal``,
        ``ctx.child``, coroutines that use them) and return their results in order. If one
        fails, the others are cancelled (effects in flight see ``dn.cancelled()``) and its
        error is raised. Replays deterministically: each step's key was taken when it was
        called."""
        items = _awaitables(aws, "ctx.all")
        return self._all(items)

    async def _all(self, items: list[Awaitable[Any]]) -> list[Any]:
        if not items:
            return []
        branches = _spawn(items)
        futs = [f for f, _ in branches]
        try:
            await asyncio.wait(futs, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            await _cancel_branches(branches)
            raise
        failed = next(
            (f for f in futs if f.done() and not f.cancelled() and f.exception() is not None),
            None,
        )
        if failed is not None:
            await _cancel_branches(branches)
            _retrieve(futs)
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
        items = _awaitables(aws, "ctx.race")
        if not items:
            raise ArgumentError("ctx.race needs at least one awaitable, got none")
        key4, seq, rec = self._step("dn.race", _hashing.hash_value(len(items)).hex())
        return self._race(items, key4, seq, rec)

    async def _race(
        self, items: list[Awaitable[Any]], key4: Key4, seq: int, rec: EffectRecord | None
    ) -> tuple[int, Any]:
        st = self._state
        if rec is not None and 0 <= (idx := int(replay(st, rec))) < len(items):
            for j, aw in enumerate(items):
                if j != idx:
                    _discard(aw)
            return idx, await items[idx]
        branches = _spawn(items)
        futs = [f for f, _ in branches]
        try:
            done, _ = await asyncio.wait(futs, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel_branches(branches)
            raise
        idx = min(i for i, f in enumerate(futs) if f in done)
        winner = futs[idx]
        won = not winner.cancelled() and winner.exception() is None
        if won:  # recorded before any other await: a loser cannot finish in between
            self._record(key4, seq, idx, "race", json.dumps({"winner": idx, "of": len(futs)}))
        await _cancel_branches(branches)
        _retrieve(futs)
        return idx, winner.result()  # the winner's error, if it failed

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
        one version (``status_version``); a replay does not publish again."""
        text = _json_text(value, "status")
        st = self._state
        key4, seq, rec = self._step("dn.status", _hashing.hash_value(text).hex())
        if rec is not None:
            replay(st, rec)  # published by an earlier execution; the run record holds the latest
            return
        run = st.run
        run.custom_status = text
        run.status_version += 1
        run.updated_at = runtime.clock.time()
        runtime.store.put_run(run)
        preview = text if len(text) <= 200 else text[:197] + "..."
        self._record(key4, seq, run.status_version, "status", json.dumps({"value": preview}))
        st.emit("custom_status", {"version": run.status_version, "value": json.loads(text)})

    @property
    def kv(self) -> RunKV:
        """The run's key/value state (see :class:`RunKV`): ``ctx.kv.set(k, v)``,
        ``ctx.kv.get(k)``, ``ctx.kv.delete(k)``, ``ctx.kv.items()``, ``k in ctx.kv``."""
        return RunKV(self)

    @property
    def log(self) -> RunLog:
        """A logger (``ctx.log.info(...)`` etc.) that writes each message once: a replay of
        the run does not log again. Logger name ``durable_nb.run.<workflow name>``."""
        return RunLog(self)

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
        key4, seq, rec = self._step(f"dn.{what}:" + workflow.name, ih)
        child_id = (
            _check_run_id(run_id)
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
        job = _start(workflow, args, kwargs, run_id=child_id, parent_id=self.run_id)
        try:
            result = await job.wait()
        except asyncio.CancelledError:
            if self._state.cancel_reason is not None:  # cancelled, not interrupted: so is the child
                job.cancel(f"parent {self.run_id!r} was cancelled")
            raise
        self._record(key4, seq, result, "child", json.dumps({"run_id": child_id}))
        return result

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
        self._record(
            key4,
            seq,
            child_id,
            "start_child",
            json.dumps({"run_id": child_id, "workflow": workflow.name}),
        )
        st.children.add(child_id)
        return _start(workflow, args, kwargs, run_id=child_id, parent_id=self.run_id)

    def continue_as_new(self, *args: Any, **kwargs: Any) -> NoReturn:
        """End this generation of the run and start the next with new arguments, in the same
        process: its history starts empty (bounded history for eternal loops), its key/value
        state, unconsumed signals and queue messages stay, its custom status stays, and it
        runs on the newest version of the workflow. ``job.wait()`` returns the result of the
        last generation. Does not return."""
        wf = self._state.workflow
        if wf is None:
            raise DurableError(f"run {self.run_id!r} has no workflow to continue with")
        wf.binder.bind(args, kwargs)  # a wrong call fails here, in this generation
        raise _ContinueAsNew(args, kwargs)


class _ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new`` and caught by the run's driver. A BaseException, so
    a workflow's ``except Exception`` does not swallow it."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("continue as new")
        self.call = (args, kwargs)


def _check_user_signal(name: str) -> None:
    if name == CANCEL_SIGNAL or name.startswith(QUEUE_PREFIX):
        raise ArgumentError(
            f"signal name {name!r} is reserved (cancellation, queues); use job.cancel(), "
            "ctx.dequeue() or another name"
        )


def _check_queue(queue: object) -> str:
    limit = 200 - len(QUEUE_PREFIX)
    if not isinstance(queue, str) or not queue or len(queue) > limit or not _utf8(queue):
        raise ArgumentError(
            f"queue must be a non-empty str of at most {limit} characters, got {queue!r}"
        )
    return queue


def _awaitables(aws: Iterable[Awaitable[T]], what: str) -> list[Awaitable[T]]:
    try:
        items = list(aws)
    except TypeError:
        raise ArgumentTypeError(
            f"{what} expects awaitables (effect calls, ctx.sleep(...), ctx.wait_signal(...), "
            f"ctx.child(...), coroutines), got {aws!r}"
        ) from None
    for i, aw in enumerate(items):
        if not inspect.isawaitable(aw):
            for other in items:  # nothing runs, and no "never awaited" warning follows
                _discard(other)
            raise ArgumentTypeError(
                f"{what} expects awaitables (effect calls, ctx.sleep(...), ctx.wait_signal(...), "
                f"ctx.child(...), coroutines), got {aw!r} at position {i}; pass the call, not "
                "its function"
            )
    return items


def _discard(aw: object) -> None:
    """Drop an awaitable that will not be awaited (a race's recorded loser)."""
    if inspect.iscoroutine(aw):
        aw.close()
    elif isinstance(aw, asyncio.Future):
        aw.cancel()


def _spawn(items: list[Awaitable[T]]) -> list[tuple[asyncio.Future[T], CancelScope]]:
    """One task per awaitable, each with its own cancel scope (inside the caller's), created
    in order so their steps keep the order of the calls."""
    parent = cancel_scope.get()
    out: list[tuple[asyncio.Future[T], CancelScope]] = []
    for aw in items:
        scope = CancelScope(parent)
        token = cancel_scope.set(scope)  # the task copies the context as it is now
        try:
            fut = asyncio.ensure_future(aw)
        finally:
            cancel_scope.reset(token)
        out.append((fut, scope))
    return out


async def _cancel_branches(branches: list[tuple[asyncio.Future[Any], CancelScope]]) -> None:
    """Cancel the branches still running (their effects see dn.cancelled() first) and wait
    until their finally blocks ran."""
    pending = []
    for fut, scope in branches:
        if not fut.done():
            scope.cancel()
            fut.cancel()
            pending.append(fut)
    if pending:
        await asyncio.wait(pending)


def _retrieve(futs: list[asyncio.Future[Any]]) -> None:
    """Mark every branch's error as seen (asyncio would log the ones nobody asked for)."""
    for f in futs:
        if f.done() and not f.cancelled():
            f.exception()


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
    return _start(workflow, args, kwargs, run_id=child_id, parent_id=parent_id)


_active_interrupt: contextvars.ContextVar[_InterruptBlock | None] = contextvars.ContextVar(
    "durable_nb_interrupt", default=None
)


class _InterruptBlock:
    """``async with ctx.interrupt_on(name):`` (see :meth:`Context.interrupt_on`).

    The block cancels its task when the signal comes, the way ``asyncio.timeout`` does, and
    turns that cancellation into :class:`Interrupted` on the way out."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx, self.state, self.name = ctx, ctx._state, name
        self.parent: _InterruptBlock | None = None
        self.replay: Interrupted | None = None  # an earlier execution was interrupted here
        self.fired: Interrupted | None = None
        self.task: asyncio.Task[Any] | None = None
        self._token: contextvars.Token[_InterruptBlock | None] | None = None
        self._step: tuple[Key4, int] | None = None

    def __repr__(self) -> str:
        return f"<durable_nb interrupt_on({self.name!r}) in run {self.state.run_id!r}>"

    async def __aenter__(self) -> _InterruptBlock:
        if self._step is not None:
            raise DurableError(
                f"the interrupt_on({self.name!r}) block was entered already; call "
                "ctx.interrupt_on(...) again for another block"
            )
        st = self.state
        key4, seq, rec = self.ctx._step("dn.interrupt", _hashing.hash_value(self.name).hex())
        self._step = (key4, seq)
        if rec is not None:
            value = replay(st, rec)
            err = self._error(value.get("payload") if isinstance(value, dict) else None)
            if isinstance(value, dict) and value.get("at_enter"):
                raise err
            self.replay = err
        else:
            st.poll_inbox()
            sig = st.take_signal(self.name, None)
            if sig is not None:  # already waiting: the block is interrupted before it starts
                raise self._consume(sig, at_enter=True)
            self.task = asyncio.current_task()
            st.interrupts.append(self)
        self.parent = _active_interrupt.get()
        self._token = _active_interrupt.set(self)
        return self

    def _error(self, payload: Any) -> Interrupted:
        return Interrupted(
            self.name,
            payload,
            f"run {self.state.run_id!r} was interrupted by signal {self.name!r} "
            f"(payload {payload!r:.200})",
        )

    def _consume(self, sig: SignalRecord, *, at_enter: bool) -> Interrupted:
        assert self._step is not None
        payload = json.loads(sig.payload)
        got = {"name": self.name, "signal_id": sig.signal_id}
        self.ctx._record(
            *self._step, {"payload": payload, "at_enter": at_enter}, "interrupt", json.dumps(got)
        )
        self.state.event("signal_received", {**got, "interrupt": True})
        return self._error(payload)

    def fire(self, sig: SignalRecord) -> None:
        """The signal arrived (on the run's loop): record it, cancel the block's task."""
        self.fired = self._consume(sig, at_enter=False)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        st = self.state
        if self._token is not None:
            _active_interrupt.reset(self._token)
            self._token = None
        with contextlib.suppress(ValueError):
            st.interrupts.remove(self)
        if self.replay is not None:  # replayed to the block's end: it was interrupted here
            err, self.replay = self.replay, None
            if exc is None:
                raise err
            return False
        fired = self.fired
        if fired is None:
            return False
        task = self.task
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if not isinstance(exc, asyncio.CancelledError):
            # the body ended before the cancellation reached it: absorb that cancellation
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                if st.cancel_reason is not None:
                    raise
        cancelling = getattr(task, "cancelling", None)
        others = (
            uncancel() if uncancel is not None and cancelling is not None and cancelling() else 0
        )
        if isinstance(exc, asyncio.CancelledError) and (st.cancel_reason is not None or others):
            return False  # the run itself is being cancelled or interrupted
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            raise fired from exc
        raise fired from None


class RunLog:
    """``ctx.log``: logging that does not repeat on replay. Each call is a journaled step
    (``kind="log"``); a replayed call is skipped. The message goes to the ``logging``
    logger ``durable_nb.run.<workflow name>`` with ``run_id`` as an extra attribute."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    @property
    def logger(self) -> logging.Logger:
        wf = self._ctx._state.workflow
        return logging.getLogger("durable_nb.run." + (wf.name if wf is not None else "?"))

    def log(self, level: int, msg: object, *args: Any) -> None:
        if not isinstance(level, int) or isinstance(level, bool):
            raise ArgumentTypeError(f"level must be a logging level (an int), got {level!r}")
        text = str(msg) % args if args else str(msg)
        ctx = self._ctx
        key4, seq, rec = ctx._step("dn.log", _hashing.hash_value((level, text)).hex())
        if rec is not None:
            replay(ctx._state, rec)
            return
        # logged before it is recorded: a crash in between repeats a line rather than lose it
        self.logger.log(level, "%s", text, extra={"run_id": ctx.run_id})
        ctx._record(
            key4,
            seq,
            None,
            "log",
            json.dumps({"level": logging.getLevelName(level), "message": text[:1000]}),
        )

    def debug(self, msg: object, *args: Any) -> None:
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: object, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: object, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: object, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)

    def critical(self, msg: object, *args: Any) -> None:
        self.log(logging.CRITICAL, msg, *args)


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
        version: str | None = None,
    ) -> None:
        if version is not None and (
            not isinstance(version, str) or not version or len(version) > 100
        ):
            raise ArgumentError(
                f"version must be a non-empty str of at most 100 characters, got {version!r}"
            )
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
        self.version = version
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ for introspection
        if version is not None:
            with _versions_lock:  # a redefinition (a rerun cell) replaces that version
                _versions.setdefault(self.name, {})[version] = self

    def __repr__(self) -> str:
        if self.version is not None:
            return f"<durable workflow {self.name} version {self.version!r}>"
        return f"<durable workflow {self.name}>"

    @property
    def code_version(self) -> str:
        """A hash of the workflow's normalized source: a completed run whose code changed
        executes again (replaying its recorded steps) instead of returning a stale result.
        A versioned workflow's code version is its version: edits within it do not count."""
        if self.source_version is None and self.version is not None:
            return "v:" + self.version
        return self.source_version or _hashing.code_version(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # (a sync effect in a worker thread may block: the run's loop goes on meanwhile)
        if isinstance(current_scope.get(), RunState) and running_loop() is not None:
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
    *, name: str | None = None, strict: bool = False, version: str | None = None
) -> Callable[[Callable[..., Coroutine[Any, Any, R]]], Workflow[..., R]]: ...


def durable(
    fn: Any = None, /, *, name: str | None = None, strict: bool = False, version: str | None = None
) -> Any:
    """Make an ``async def workflow(ctx, ...)`` resumable (SPEC 3).

    ``name`` replaces ``module.qualname`` (it names derived run ids); ``strict`` raises
    :class:`NonDeterminismError` when a replay departs from the recorded order.

    ``version`` makes versions of one workflow (one ``name``) live side by side: a run
    started on a version finishes on it (its ``RunRecord.version``), whichever version's
    object is passed to ``start``/``run``; a new run (and a run's next generation after
    ``continue_as_new``) takes the newest defined version (compared like "1" < "2" < "10");
    resuming a run whose version is no longer defined raises
    :class:`~durable_nb.errors.WorkflowVersionError`.
    """
    if fn is None:
        return lambda f: Workflow(f, name=name, strict=strict, version=version)
    return Workflow(fn, name=name, strict=strict, version=version)


# every version of every versioned workflow defined in this process: name -> version -> it
_versions: dict[str, dict[str, Workflow[..., Any]]] = {}
_versions_lock = threading.Lock()


def _version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: numbers compare as numbers ("2" < "10"), the rest as text."""
    parts = re.findall(r"\d+|\D+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _newest(wf: Workflow[..., R]) -> Workflow[..., R]:
    """The workflow a new run (or generation) of ``wf``'s name executes."""
    if wf.version is None:
        return wf
    with _versions_lock:
        known = dict(_versions.get(wf.name, {}))
    if not known:
        return wf
    return cast(Workflow[..., R], known[max(known, key=_version_order)])


def _for_run(wf: Workflow[..., R], rec: RunRecord) -> Workflow[..., R]:
    """The workflow an existing run executes: the version it started on."""
    if not rec.version or wf.version == rec.version:
        return wf
    with _versions_lock:
        known = dict(_versions.get(wf.name, {}))
    found = known.get(rec.version)
    if found is None:
        defined = ", ".join(repr(v) for v in sorted(known, key=_version_order)) or "none"
        raise WorkflowVersionError(
            f"run {rec.run_id!r} started on version {rec.version!r} of workflow {wf.name!r}, "
            f"which is not defined in this process (defined versions: {defined}); define it "
            f"again with @durable(name={wf.name!r}, version={rec.version!r}) to let the run "
            "finish, or start the run afresh with restart=True"
        )
    return cast(Workflow[..., R], found)


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
        self._lease_lost = False

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
        self._watch()
        # shielded: a waiter that gives up must not cancel the run's result for everyone
        return await asyncio.shield(asyncio.wrap_future(self._future))

    def _watch(self) -> None:
        """A run that executes elsewhere (a worker, another process) settles this job when
        the store says it ended."""
        if self._loop is None and not self._future.done():  # not started in this process
            _remote.watch(self)

    def __await__(self) -> Any:
        return self.wait().__await__()

    def result(self, timeout: float | None = None) -> R:
        """Block until the run ends and return its result. Ctrl-C stops the run cleanly and
        leaves it resumable."""
        timeout = _check_timeout(timeout)
        self._watch()
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

    def enqueue(self, queue: str, message: Any = None) -> None:
        """Put ``message`` (JSON data) on the run's queue ``queue`` for ``ctx.dequeue``:
        stored durably, delivered in order, once."""
        enqueue(self.run_id, queue, message)

    def kv(self) -> Mapping[str, Any]:
        """A read-only snapshot of the run's key/value state (``ctx.kv``), also while it
        runs, in this process or another."""
        return MappingProxyType(kv_snapshot(runtime.store, self.run_id))

    async def wait_status_change(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> tuple[int, Any]:
        """Wait until the run publishes a custom status (``ctx.set_status``) newer than
        ``after_version`` (default: the current one) and return ``(version, value)``.

        A run executing in this process wakes the waiter at once; for a run elsewhere the
        store is polled (one small read a second, leaving a DuckDB file idle most of the
        time, so the process running the run can use it). Raises ``TimeoutError`` after
        ``timeout`` seconds, and :class:`DurableError` if the run ended without a newer
        status.
        """
        if after_version is not None and (
            not isinstance(after_version, int) or isinstance(after_version, bool)
        ):
            raise ArgumentTypeError(f"after_version must be an int or None, got {after_version!r}")
        timeout = _check_timeout(timeout)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener(msg: dict[str, Any]) -> None:
            if msg.get("kind") in ("custom_status", "status"):
                loop.call_soon_threadsafe(changed.set)

        unsubscribe = self.subscribe(listener)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                changed.clear()
                version, value, status = await self._status_now()
                if after_version is None:
                    after_version = version
                elif version > after_version:
                    return version, value
                if status in FINAL_STATUSES and (self._state is None or self.done()):
                    raise DurableError(
                        f"run {self.run_id!r} ended ({status}) at status version {version} "
                        f"without a status newer than {after_version}"
                    )
                wait = 1.0
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise TimeoutError(
                            f"run {self.run_id!r} published no status newer than version "
                            f"{after_version} within timeout={timeout:g}s"
                        )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait)
        finally:
            unsubscribe()

    async def _status_now(self) -> tuple[int, Any, str]:
        state = self._state
        if state is not None and not self.done():
            rec = state.run
        else:  # another process's run: read the store off the loop (a busy file may wait)
            found = await asyncio.to_thread(runtime.store.get_run, self.run_id)
            if found is None:
                if self._task is not None and not self.done():
                    return 0, None, "pending"  # started here, not executing yet
                raise RunNotFoundError(f"no run {self.run_id!r} in the store {runtime.store.url!r}")
            rec = found
        value = json.loads(rec.custom_status) if rec.custom_status else None
        return rec.status_version, value, rec.status

    def stream(self, name: str) -> StreamReader:
        """The run's stream ``name`` from its first chunk, then live as the run writes it:
        ``async for chunk in job.stream(name)`` (or a plain ``for`` off the run's loop). Ends
        when the stream is closed or the run has ended (see :class:`StreamReader`)."""
        return StreamReader(self, name)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run at its next await; it ends as cancelled and runs its finally blocks."""
        cancel(self.run_id, reason)

    def widget(self, **options: Any) -> Any:
        """A live trace widget of this run (a ``durable_nb.widgets.TraceWidget``; needs the
        notebook extra). ``options`` go to its constructor."""
        # the engine's one upward reference, imported on call so the engine never loads widgets
        widgets = importlib.import_module("durable_nb.widgets")
        return widgets.TraceWidget(self, **options)


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


class _RemoteRuns:
    """Settles the jobs of runs executing in other processes, from the store: one daemon
    thread reads each watched run's record when the store signals work (a run ending releases
    its lease, which wakes waiters) and at least every 2 s. It does not poll faster: a DuckDB
    file is shared by taking turns, and a reader that never pauses would lock the worker out."""

    def __init__(self) -> None:
        self._jobs: dict[str, list[Job[Any]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        atexit.register(self._close)

    def watch(self, job: Job[Any]) -> None:
        with self._lock:
            jobs = self._jobs.setdefault(job.run_id, [])
            if job not in jobs:
                jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="durable_nb-remote-runs", daemon=True
                )
                self._thread.start()

    def _close(self) -> None:
        # at exit, before the store closes: a thread inside a store call would crash it
        self._closing.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(5)

    def _serve(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                watched = {rid: list(jobs) for rid, jobs in self._jobs.items()}
                if not watched:
                    self._thread = None
                    return
            store = runtime.store
            for rid, jobs in watched.items():
                if self._closing.is_set():
                    return
                try:
                    rec = store.get_run(rid)
                except Exception:  # a busy or unreachable store: look again later
                    continue
                try:
                    outcome = _final_outcome(rec) if rec is not None else None
                except Exception as e:  # undecodable here (another key, a newer codec): final
                    outcome = (False, e)
                if rec is None:
                    outcome = (False, RunNotFoundError(f"run {rid!r} was deleted from the store"))
                if outcome is None:
                    continue
                for job in jobs:
                    (_resolve if outcome[0] else _reject)(job._future, outcome[1])
                with self._lock:
                    self._jobs.pop(rid, None)
            with contextlib.suppress(Exception):
                store.wait_for_work(2.0)


_remote = _RemoteRuns()


def _final_outcome(rec: RunRecord) -> tuple[bool, Any] | None:
    """Like :func:`_outcome_of_record`, and a failed run's error too (for a job that only
    watches the run: a failed run does not resume by itself)."""
    if rec.status == "failed" and rec.error is not None:
        return (False, _codecs.decode_error(rec.error, runtime.store.signer))
    return _outcome_of_record(rec)


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


def enqueue(run_id: str, queue: str, message: Any = None) -> None:
    """Put ``message`` (JSON data) on queue ``queue`` of run ``run_id`` (see
    :meth:`Context.dequeue`); the run need not be executing."""
    _check_queue(queue)
    signal(run_id, QUEUE_PREFIX + queue, message)


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
    lease: RunLease | None = None,
) -> Job[R]:
    """Start a run on this thread's loop, or on the engine's loop when there is none or the
    caller will block on the result (``blocking``). ``lease``: the run's lease, already taken
    (a worker's claim_run); otherwise the run takes it when it starts."""
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
    coro = _drive(job, workflow, args, kwargs, restart, parent_id, lease)
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
    on: str = "here",
    **kwargs: Any,
) -> Job[R]:
    """Start (or resume) a run and return its :class:`Job` at once.

    The run id is ``run_id`` or derived from the workflow's name and arguments. Starting a
    run that completed returns its recorded result without executing anything; a failed or
    interrupted run resumes. ``restart=True`` forgets the run's history first.

    ``on="worker"`` does not execute the run here: it is queued in the store for a worker
    (``durable-nb worker``) that knows the workflow; the Job follows it through the store.
    """
    if on == "worker":
        return _enqueue(workflow, args, kwargs, run_id=run_id, restart=bool(restart))
    if on != "here":
        raise ArgumentError(
            f"on must be 'here' (execute in this process) or 'worker' (queue it for a "
            f"worker), got {on!r}"
        )
    return _start(workflow, args, kwargs, run_id=run_id, restart=bool(restart))


def _enqueue(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None,
    restart: bool,
) -> Job[R]:
    """Queue a run for a worker: a ``queued`` record carrying its arguments. A run that is
    queued or executing somewhere is left alone; one that completed with these arguments
    and this code keeps its outcome; a failed one, or one whose arguments or code changed,
    is queued again (and resumes from its history on the worker)."""
    if not isinstance(workflow, Workflow):
        raise ArgumentTypeError(
            f"expected a @durable workflow, got {workflow!r}; decorate it with @durable"
        )
    wf = _newest(workflow)
    bound = wf.binder.bind(args, kwargs)
    rid = _check_run_id(run_id) if run_id is not None else wf.run_id_for(*args, **kwargs)
    store = runtime.store
    try:
        payload = _codecs.encode(bound, store.signer, what="the workflow's arguments")
    except UnstorableValueError as e:
        raise UnstorableValueError(
            f"a run started on a worker needs storable arguments: {e}"
        ) from None
    # the run's lease while its record changes: no worker claims it meanwhile, and a run
    # executing somewhere is left alone (a restart of it is refused, as for a local run)
    try:
        lease: RunLease | None = store.acquire_run(rid, runtime.owner)
    except RunLockedError:
        if restart:
            raise
        lease = None
    if lease is not None:
        try:
            if restart:
                store.delete_run(rid)
            rec = store.get_run(rid)
            now = runtime.clock.time()
            if rec is None:
                store.put_run(
                    RunRecord(
                        rid, wf.name, "queued", now, now, args=payload, version=wf.version or ""
                    )
                )
            elif rec.status in ("failed", "completed") and not (
                rec.status == "completed"
                # a later generation runs on continue_as_new's arguments, not the caller's
                and (rec.generation > 0 or rec.input_hash == wf.binder.hash_bound(bound))
                and rec.code_version == _for_run(wf, rec).code_version
            ):
                rec.status, rec.updated_at, rec.detail = "queued", now, ""
                if rec.generation == 0:
                    rec.args = payload
                store.put_run(rec)
        finally:
            lease.release()
    job: Job[R] = Job(rid, workflow)
    job._watch()
    return job


def run(
    workflow: Workflow[P, R],
    /,
    *args: Any,
    run_id: str | None = None,
    restart: bool = False,
    **kwargs: Any,
) -> R:
    """Run a workflow to completion and return its result; works in any thread, including a
    notebook cell whose thread already runs an event loop, and a sync effect running in a
    worker thread."""
    if isinstance(current_scope.get(), RunState) and running_loop() is not None:
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
    lease: RunLease | None = None,
) -> None:
    """Execute (or resume) one run, generation after generation when it continues as new.
    The job's future is settled only after the run's lease is released and its records
    merged, so whoever sees the result can start the run again."""
    store, clock = runtime.store, runtime.clock
    state: RunState | None = None
    poller: asyncio.Future[None] | None = None
    outcome: tuple[bool, Any] | None = None  # (ok, value or exception)
    claimed = lease is not None  # a worker's claim: nobody waits here to fix a failed start
    try:
        if lease is None:
            lease = store.acquire_run(job.run_id, runtime.owner)
        lease.on_lost = functools.partial(_lease_lost, job, asyncio.get_running_loop())
        rec = store.get_run(job.run_id)
        if rec is not None and restart:
            store.delete_run(job.run_id)
            rec = None
        if rec is None:
            wf = _newest(wf)
        else:
            wf = _for_run(wf, rec)
            if rec.generation > 0 and rec.args is not None:
                # a later generation runs on the arguments continue_as_new gave it
                args, kwargs = _call_of(wf, _codecs.decode(rec.args, store.signer))
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
        poller = asyncio.ensure_future(_poll_inbox(job))
        new_generation = False
        while True:
            history = store.load_effects("run/" + job.run_id)
            token = store.inbox_token(job.run_id)  # before reading: a signal sent meanwhile shows
            signals = store.list_signals(job.run_id)
            now = clock.time()
            resumed = rec is not None and not new_generation
            if rec is None:
                try:
                    args_payload = _codecs.encode(
                        wf.binder.bind(args, kwargs), store.signer, what="the workflow's arguments"
                    )
                except UnstorableValueError:
                    args_payload = None
                rec = RunRecord(
                    job.run_id,
                    wf.name,
                    "running",
                    now,
                    now,
                    args=args_payload,
                    parent_id=parent_id,
                    version=wf.version or "",
                )
            rec.status, rec.updated_at, rec.detail = "running", now, ""
            rec.input_hash, rec.code_version = input_hash, code_version
            rec.executions += 1
            rec.error = None
            state = RunState(job, rec, history, signals, wf.strict, token)
            state.workflow = wf
            job._state = state
            store.put_run(rec)
            opened: dict[str, Any] = {"execution": rec.executions, "history": len(history)}
            if rec.generation:
                opened["generation"] = rec.generation
            state.event("resumed" if resumed else "started", opened)
            _start_kv(state, history)
            current_scope.set(state)
            cancel_scope.set(state.root_scope)
            cancel_sig = next((s for s in state.inbox if s.name == CANCEL_SIGNAL), None)
            if cancel_sig is not None:
                state.cancel_reason = json.loads(cancel_sig.payload) or "cancelled"
                raise asyncio.CancelledError
            try:
                result: Any = await wf.fn(Context(state), *args, **kwargs)
            except _ContinueAsNew as nxt:
                wf, args, kwargs, rec = _next_generation(state, wf, nxt)
                input_hash, code_version = rec.input_hash, rec.code_version
                new_generation = True
                continue
            break
        state.run.result = _codecs.encode(
            result, store.signer, what=f"the result of workflow {wf.name}"
        )
        _finish(state, "completed")
        outcome = (True, result)
    except asyncio.CancelledError:
        if state is not None and state.cancel_reason is not None:
            _finish(state, "cancelled", detail={"reason": state.cancel_reason})
            await _cancel_children(state)
            outcome = (
                False,
                RunCancelledError(
                    f"run {job.run_id!r} was cancelled ({state.cancel_reason}); start it again "
                    "with restart=True to run it afresh"
                ),
            )
        else:  # interrupted (Ctrl-C, loop shutdown, lease lost): the run stays resumable
            if state is not None:
                state.event("interrupted", {**_stats(state), "lease_lost": job._lease_lost})
            outcome = (
                False,
                RunLockedError(
                    f"run {job.run_id!r} lost its lease (the store could not renew it in time), "
                    "so another process may have taken it over; it stopped here and resumes "
                    "wherever it is executed next"
                )
                if job._lease_lost
                else KeyboardInterrupt(
                    f"run {job.run_id!r} was interrupted; run it again to resume"
                ),
            )
    except BaseException as e:
        if state is not None and state.run.status != "completed":
            try:
                state.run.error = _codecs.encode_error(e, store.signer)
                _finish(state, "failed", detail={"error": repr(e)[:500]})
            except Exception:  # the store failed too: the error we report is the run's
                pass
        elif state is None and claimed and isinstance(e, Exception):
            # it could not even start (arguments that no longer bind, a version this worker
            # lacks): left queued it would be claimed again at once, forever
            _fail_unstarted(job.run_id, e)
        outcome = (False, e)
        if not isinstance(e, Exception):
            raise
    finally:
        if poller is not None:
            poller.cancel()
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


def _fail_unstarted(run_id: str, e: Exception) -> None:
    """Mark a claimed run that failed before it executed as failed (its lease still held),
    unless the store itself was the trouble: then it stays claimable for a later try."""
    if isinstance(e, (StoreLockedError, StoreUnavailableError)):
        return
    store = runtime.store
    with contextlib.suppress(Exception):
        rec = store.get_run(run_id)
        if rec is not None and rec.status not in FINAL_STATUSES:
            rec.status, rec.updated_at = "failed", runtime.clock.time()
            rec.error = _codecs.encode_error(e, store.signer)
            rec.detail = json.dumps({"error": repr(e)[:500]})
            store.put_run(rec)


async def _poll_inbox(job: Job[Any]) -> None:
    """While a run executes, pick up what other processes send it (signals, queue messages,
    a cancel) even when it is busy in a long effect: a cheap check of the store's inbox
    token every half second."""
    while True:
        await asyncio.sleep(_INBOX_POLL)
        state = job._state
        if state is None or time.monotonic() - state.last_poll < _INBOX_POLL:
            continue
        state.last_poll = time.monotonic()
        try:
            token = runtime.store.inbox_token(state.run_id)
            if token == state.inbox_token:
                continue
            # off the loop: reading may wait while another process holds a DuckDB file
            signals = await asyncio.to_thread(runtime.store.list_signals, state.run_id)
        except Exception:  # a store hiccup (a busy file): the next round tries again
            continue
        if job._state is state:
            state.inbox_token = token
            for sig in signals:
                state.deliver(sig)


def _call_of(wf: Workflow[..., Any], bound: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Stored bound arguments (name -> value) back into a call of ``wf``."""
    if not isinstance(bound, dict):
        raise DurableError(
            f"the stored arguments of workflow {wf.name} are damaged: {bound!r:.200}"
        )
    ba = inspect.BoundArguments(wf.binder.signature, bound)
    return ba.args, ba.kwargs


def _start_kv(state: RunState, history: list[EffectRecord]) -> None:
    """Where the run's key/value state starts in this execution: empty for a new run; for a
    new generation, what the previous one left (recorded as the generation's first step, so
    its replays start from the same state)."""
    base = next((r for r in history if r.kind == "kv_base"), None)
    store = runtime.store
    if base is not None:
        value = _codecs.decode(base.payload, store.signer)
        state.kv = dict(value) if isinstance(value, dict) else {}
        return
    if history or state.run.generation == 0:
        return
    texts = kv_base_texts(store, state.run_id)
    if texts:
        rec = EffectRecord(
            state.scope_id,
            "dn.kv.base",
            "",
            "",
            0,
            payload=_codecs.encode(texts, store.signer),
            kind="kv_base",
            seq=-1,
            started_at=runtime.clock.time(),
            detail=json.dumps({"keys": len(texts)}),
        )
        store.put_effects([rec])
        state.index[(rec.identity, rec.version, rec.input_hash, rec.occurrence)] = rec
    state.kv = texts


def _next_generation(
    state: RunState, wf: Workflow[..., R], nxt: _ContinueAsNew
) -> tuple[Workflow[..., R], tuple[Any, ...], dict[str, Any], RunRecord]:
    """Continue the run as new: one atomic reset of its record and history that also drops
    the signals its history consumed (unconsumed ones and queue messages stay)."""
    store = runtime.store
    new_wf = _newest(wf)  # a new generation runs on the newest version
    args, kwargs = nxt.call
    payload = _codecs.encode(
        new_wf.binder.bind(args, kwargs),
        store.signer,
        what="the arguments given to ctx.continue_as_new",
    )
    consumed = sorted(
        {
            sid
            for r in state.index.values()
            if r.kind in SIGNAL_STEP_KINDS and (sid := _signal_id_of(r))
        }
    )
    old = state.run
    state.event(
        "continued_as_new",
        {"generation": old.generation + 1, "history": len(state.index), **_stats(state)},
    )
    new = _replace(
        old,
        status="running",
        args=payload,
        result=None,
        error=None,
        detail="",
        input_hash=new_wf.binder.input_hash(args, kwargs),
        code_version=new_wf.code_version,
        generation=old.generation + 1,
        version=new_wf.version or "",
        updated_at=runtime.clock.time(),
    )
    store.reset_run(new, consumed)
    return new_wf, args, kwargs, new


async def _cancel_children(state: RunState) -> None:
    """A cancelled run's children (started with ctx.start_child) are cancelled too; those
    executing in this process have ended when this returns (so has the parent, for whoever
    waits on it)."""
    ids = set(state.children)
    for r in state.index.values():
        if r.kind == "start_child":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ids.add(str(json.loads(r.detail)["run_id"]))
    ending: list[asyncio.Future[Any]] = []
    for child_id in sorted(ids):
        with contextlib.suppress(DurableError):
            rec = runtime.store.get_run(child_id)
            if rec is not None and rec.status not in FINAL_STATUSES:
                cancel(child_id, f"parent {state.run_id!r} was cancelled")
                with runtime.jobs_lock:
                    live = runtime.jobs.get(child_id)
                if live is not None:
                    ending.append(asyncio.wrap_future(live._future))
    if ending:
        await asyncio.wait(ending, timeout=30)
        for f in ending:  # their outcome (cancelled) is the children's own business
            if f.done() and not f.cancelled():
                f.exception()


def _lease_lost(job: Job[Any], loop: asyncio.AbstractEventLoop) -> None:
    """The store says this process no longer holds the run's lease (called from the store's
    thread): stop executing it, so two processes never go on executing one run together."""

    def stop() -> None:
        job._lease_lost = True
        if job._task is not None and not job._task.done():
            job._task.cancel()

    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
        loop.call_soon_threadsafe(stop)


def _stats(state: RunState) -> dict[str, Any]:
    return {
        "replayed": state.replayed,
        "executed": state.executed,
        "saved_seconds": round(state.saved, 6),
    }


def _finish(state: RunState, status: str, detail: dict[str, Any] | None = None) -> None:
    state.event(status, {**_stats(state), **(detail or {})})
    state.set_run_status(status, detail)
