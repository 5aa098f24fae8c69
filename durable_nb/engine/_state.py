"""The live state of one executing run: its history index, its step counter, its inbox.

:class:`RunState` is also the run's effect *scope* (the same interface as
``_runtime.TopScope``): effects and ``ctx`` operations take their step from it (key,
occurrence, position), look their record up in it, and record through it — effects that
complete in the same loop iteration share one store write. It publishes what happens to
the run's live listeners (widgets) and its status to the store, and holds what the run
waits on, the signals delivered to it and its cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading
import time
import uuid as _uuid
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .. import _codecs
from .._journal import (
    AUX_KINDS,
    CANCEL_SIGNAL,
    PROGRESS_PREFIX,
    RETRY_PREFIX,
    USAGE_PREFIX,
    EventKind,
    LiveKind,
    RecordKind,
    RetryDetail,
    RunStatus,
    detail_text,
    iso_time,
    read_detail,
    run_scope,
    signal_id_of,
)
from ..errors import NonDeterminismError, UnrecordedCancelWarning
from ..store import EffectRecord, EventRecord, RunRecord, SignalRecord
from ._observe import observers
from ._runtime import (
    CancelScope,
    Key4,
    TopScope,
    Written,
    cancel_scope,
    durable_write,
    off_loop,
    runtime,
    wait_written,
)

if TYPE_CHECKING:
    from ._interrupts import CutBlock, InterruptBlock
    from ._jobs import Job
    from ._workflow import Workflow

__all__ = ["INBOX_POLL", "RunState", "active_interrupt", "replay"]

INBOX_POLL = 0.5  # seconds between checks for signals sent by other processes
_UNREAD = object()  # refresh_inbox: the caller did not read the inbox token
#: steps an observer sees executing as a whole (``_observe.step``), not only recorded
_OBSERVED_AROUND = ("effect", "map")
_warned_cancel: set[str] = set()  # workflows warned about an unrecorded cancellation

#: the innermost interrupt or timeout block the current task is in (see ``_interrupts``)
active_interrupt: contextvars.ContextVar[CutBlock | None] = contextvars.ContextVar(
    "durable_nb_interrupt", default=None
)


def replay(scope: RunState | TopScope, rec: EffectRecord) -> Any:
    """The recorded outcome of a step: its value, or its error raised again."""
    scope.note_replay(rec)
    signer = runtime.store.signer
    if rec.is_error:
        exc = _codecs.decode_error(rec.payload, signer)
        scope.note_error(exc, rec)
        raise exc
    return _codecs.decode(rec.payload, signer)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it carries: causes, contexts, a group's members."""
    out: list[BaseException] = []
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += list(getattr(e, "exceptions", ()) or ())
    return out


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
        self.scope_id = run_scope(record.run_id)
        self.strict = strict
        self.index: dict[Key4, EffectRecord] = {
            (r.identity, r.version, r.input_hash, r.occurrence): r
            for r in history
            if r.kind != "cleared"  # an error that failed the run: its call runs again
        }
        self.loaded = len(history)  # records it started with (a fork's first execution has some)
        self.by_seq: dict[int, EffectRecord] = {}
        # tokens the replayed steps had cost, per model ([prompt, completion]); None while
        # the history has no usage record (most runs: replays then look nothing up)
        self.tokens_saved: dict[str, list[int]] | None = None
        for r in history:
            if r.kind in AUX_KINDS:
                if r.kind == "usage":
                    self.tokens_saved = {}
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
        self._batch_waiters: list[Written] = []
        self._behind: list[Written] = []  # records written behind, oldest first
        consumed = {signal_id_of(r.kind, r.detail) for r in history} - {None}
        self.inbox: list[SignalRecord] = [s for s in signals if s.signal_id not in consumed]
        self.seen_signals = {s.signal_id for s in signals}
        self.wakeup = asyncio.Event()
        # the loop the run executes on, and its thread: progress reported from an effect's
        # worker thread reaches the listeners there
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.current_thread()
        self.inbox_token = inbox_token
        self.last_poll = time.monotonic()
        self.cancel_reason: str | None = None
        self.listeners = job._listeners  # shared: subscribing before the run starts works
        self.workflow: Workflow[..., Any] | None = job.workflow
        self.root_scope = CancelScope()  # cancelled with the run: effects see dn.cancelled()
        self.waits: list[dict[str, Any]] = []  # what the run waits on now (timers, signals...)
        self.interrupts: list[InterruptBlock] = []  # active ``ctx.interrupt_on`` blocks
        self.children: set[str] = set()  # runs started by ctx.start_child
        self.kv: dict[str, str] = {}  # the run's key/value state as it replays: key -> JSON
        # when each key was last set, as the run saw it (ctx.kv.prune's clock): the time its
        # kv_set step was recorded, or the generation's start for keys it inherited
        self.kv_times: dict[str, float] = {}
        # the recorded errors the workflow has seen in this execution (raised or replayed),
        # so the ones that end up failing the run can be cleared (see clear_failure)
        self.errors: list[tuple[BaseException, EffectRecord]] = []

    # live observers (widgets) -----------------------------------------------------------
    def emit(self, kind: LiveKind, data: dict[str, Any]) -> None:
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
        data: dict[str, Any] = {
            "seq": rec.seq,
            "step": rec.kind,
            "name": rec.identity,
            "state": state,
            "duration": rec.duration,
            "args": rec.detail,
            "error": rec.is_error,
        }
        usage = self.index.get((USAGE_PREFIX + rec.identity, *self._key_rest(rec)))
        if usage is not None:  # what the LLM call used, as the trace says it (trace.Tokens)
            d = read_detail(usage.detail)
            data["tokens"] = {
                "prompt": d.get("prompt_tokens", 0),
                "completion": d.get("completion_tokens", 0),
                "model": d.get("model", ""),
            }
        bar = self.index.get((PROGRESS_PREFIX + rec.identity, *self._key_rest(rec)))
        if bar is not None:  # how far its progress bar got: its row shows it, not a spinner
            data["progress"] = read_detail(bar.detail)
        self.emit("step", data)

    @staticmethod
    def _key_rest(rec: EffectRecord) -> tuple[str, str, int]:
        return (rec.version, rec.input_hash, rec.occurrence)

    # scope interface -------------------------------------------------------------
    def next_occurrence(self, identity: str, input_hash: str) -> int:
        k = (identity, input_hash)
        n = self._counts.get(k, 0)
        self._counts[k] = n + 1
        return n

    def next_seq(self) -> int:
        if self.job._lease_lost:
            # fencing: once another process may hold the run, no new step starts here (a
            # cancellation deferred by a record's write would otherwise let one begin)
            raise asyncio.CancelledError
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
            self.check_cut()
        return rec

    def check_cut(self) -> None:
        """Inside a block (``interrupt_on``, ``timeout``) that an earlier execution saw cut,
        the first step that execution did not complete is where the cut struck: raise the
        block's error instead of executing it."""
        block = active_interrupt.get()
        while block is not None:
            if block.replay is not None and block.state is self:
                err, block.replay = block.replay, None
                raise err
            block = block.parent

    def note_cancelled(self, identity: str) -> None:
        """An effect of this run was cancelled. When nothing that records its outcome did it
        (a run cancel, a lost race or ``ctx.all`` branch, an interrupt or timeout block, the
        run interrupted here on purpose), it was a plain ``asyncio.wait_for``/``timeout`` or
        a task cancelled by hand: after a restart the run may take another branch. Warn,
        once per workflow, naming the durable forms."""
        if self.cancel_reason is not None or self.job._stopping or self.job._lease_lost:
            return
        scope = cancel_scope.get()
        if scope is not None and scope.cancelled():
            return
        block = active_interrupt.get()
        while block is not None:
            if block.fired is not None:
                return
            block = block.parent
        name = self.workflow.name if self.workflow is not None else self.run_id
        if name in _warned_cancel:
            return
        _warned_cancel.add(name)
        warnings.warn(
            UnrecordedCancelWarning(
                f"effect {identity} in run {self.run_id!r} was cancelled by something whose "
                "outcome is not recorded (asyncio.wait_for, asyncio.timeout, a task cancelled "
                "by hand): after a restart the effect may finish and the run take another "
                "branch; use `await ctx.wait_for(aw, seconds)` or `async with "
                "ctx.timeout(seconds):`, whose timeouts are recorded"
            ),
            stacklevel=2,
        )

    # observed errors ---------------------------------------------------------------------
    def note_error(self, exc: BaseException, rec: EffectRecord) -> None:
        """The workflow sees ``exc``, recorded as ``rec`` (or replayed from it)."""
        self.errors.append((exc, rec))

    def clear_failure(self, exc: BaseException) -> None:
        """The run fails with ``exc``: the recorded errors in its chain are cleared, so that
        resuming the run calls those effects again (what resuming a failed run is for); the
        errors the workflow caught and handled stay recorded and replay as they were."""
        chain = {id(e) for e in _chain(exc)}
        now = runtime.clock.time()
        cleared = [
            replace(rec, kind="cleared", started_at=now)
            for e, rec in self.errors
            if id(e) in chain and rec.scope == self.scope_id
        ]
        if cleared and not self.write_behind(effects=cleared):
            runtime.store.put_effects(cleared)

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

    # engine steps (everything in a run's journal that is not an effect call) ---------------
    def step(self, identity: str, input_hash: str = "") -> tuple[Key4, int, EffectRecord | None]:
        """Take an engine step now, at call time: ``(key, seq, its record or None)``."""
        key4 = (identity, "", input_hash, self.next_occurrence(identity, input_hash))
        seq = self.next_seq()
        return key4, seq, self.lookup(key4, seq)

    def record_value(
        self, key4: Key4, seq: int, value: object, kind: RecordKind, detail: str = ""
    ) -> None:
        """Record an engine step's outcome (``value``, stored by type like an effect's)."""
        payload = _codecs.encode(value, runtime.store.signer, what=kind)
        self.record_step(
            EffectRecord(
                self.scope_id,
                *key4,
                payload=payload,
                kind=kind,
                seq=seq,
                started_at=runtime.clock.time(),
                detail=detail,
            )
        )

    def record(self, rec: EffectRecord, *also: EffectRecord) -> None:
        """Record a step (with its bookkeeping records ``also``, in the same write)."""
        self._raise_behind()  # a record written behind that failed fails the run here
        runtime.store.put_effects([rec, *also])
        for r in also:
            self.index[(r.identity, r.version, r.input_hash, r.occurrence)] = r
        self._recorded(rec)
        self._maybe_poll()

    def record_step(self, rec: EffectRecord) -> None:
        """Record an engine step (``ctx.now``, a timer's deadline, a received signal...): on
        a remote store, written behind (see :meth:`write_behind`)."""
        if not self.write_behind(effects=[rec]):
            runtime.store.put_effects([rec])
            self._maybe_poll()
        self._recorded(rec)

    def record_together(self, rec: EffectRecord, others: list[EffectRecord]) -> None:
        """Record a step with records of the run's other scopes in one atomic write
        (written behind on a remote store)."""
        if not self.write_behind(effects=[rec, *others]):
            runtime.store.put_effects([rec, *others])
            self._maybe_poll()
        self._recorded(rec)

    # writes behind --------------------------------------------------------------------
    # The engine's own records (ctx steps, statuses, trace events) on a remote store do not
    # block the loop for a round trip: they are handed to the store's writer, which commits
    # them in the order given, in order with every blocking write, and the run goes on. What
    # depends on them and leaves the run is durable only after them: an effect's record
    # waits for them first (:meth:`caught_up`), and so do the run's end and its timers. A
    # crash before they are durable loses them together with everything after them, and
    # the replay takes those steps afresh: a durable history is always a prefix of what the
    # run did. A write that failed fails the run at its next effect, timer or end.
    def write_behind(
        self,
        *,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
    ) -> bool:
        """Hand records to a remote store without waiting; False (nothing done) when the
        store writes at once or no loop runs here: then the caller writes them itself."""
        if not runtime.store.remote:
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._raise_behind()
        written = durable_write(
            runtime.store, effects=effects, runs=runs, events=events, on_loop=False
        )
        self._behind.append(written)
        return True

    def _raise_behind(self) -> None:
        """Forget the writes behind that are durable; raise the error of one that failed."""
        while self._behind and self._behind[0].finished:
            error = self._behind.pop(0).error
            if error is not None:
                raise error

    async def caught_up(self) -> None:
        """Return once every record written behind is durable (raising the first error)."""
        while self._behind:
            await wait_written(self._behind[0])
            self._raise_behind()

    async def record_async(self, rec: EffectRecord, *also: EffectRecord) -> None:
        """Record an effect's outcome (with its bookkeeping records ``also``, in the same
        write); returns once it is durable, without blocking the loop while the store writes
        (other runs go on, and their records share the write)."""
        if self._behind:  # written behind: durable first, in that order
            await self.caught_up()
        if self.inflight <= 1 and not self._batch:
            store = runtime.store
            if not store.remote:  # it writes at once: as cheap as a sync record
                store.put_effects([rec, *also])
            else:
                await wait_written(durable_write(store, effects=[rec, *also]))
            for r in also:
                self.index[(r.identity, r.version, r.input_hash, r.occurrence)] = r
            self._recorded(rec)
            return
        # effects of this run completing in the same loop iteration share one write
        loop = asyncio.get_running_loop()
        mine = Written(loop)
        if not self._batch:
            loop.call_soon(self._flush_batch)
        self._batch.append(rec)
        self._batch += also
        self._batch_waiters.append(mine)
        await wait_written(mine)

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        waiters, self._batch_waiters = self._batch_waiters, []
        try:
            written = durable_write(runtime.store, effects=batch)
        except BaseException as e:
            self._batch_done(batch, waiters, e)
            return
        if written.finished:  # a store that writes at once: no extra loop iteration
            self._batch_done(batch, waiters, written.error)
        else:  # nobody awaits this write's own future: it is never cancelled
            written.wake.add_done_callback(
                lambda _: self._batch_done(batch, waiters, written.error)
            )

    def _batch_done(
        self, batch: list[EffectRecord], waiters: list[Written], error: BaseException | None
    ) -> None:
        if error is None:
            for rec in batch:  # bookkeeping first: a step's listeners read its usage record
                if rec.kind in AUX_KINDS:
                    self.index[(rec.identity, rec.version, rec.input_hash, rec.occurrence)] = rec
            for rec in batch:
                if rec.kind not in AUX_KINDS:
                    self._recorded(rec)
        for w in waiters:
            w.settle(error)

    def _recorded(self, rec: EffectRecord) -> None:
        self.index[(rec.identity, rec.version, rec.input_hash, rec.occurrence)] = rec
        self.executed += 1
        if self.listeners:
            self._emit_step(rec, "failed" if rec.is_error else "executed")
        if observers and rec.kind not in _OBSERVED_AROUND:
            observers[0].recorded(self, rec)

    def _maybe_poll(self) -> None:
        """After a step recorded synchronously (the caller blocks anyway): look for signals
        other processes sent, if it is time. Awaited records leave that to the run's poller,
        which reads off the loop."""
        if time.monotonic() - self.last_poll > INBOX_POLL:
            self.poll_inbox()

    def note_replay(self, rec: EffectRecord) -> None:
        self.replayed += 1
        self.saved += rec.duration
        if self.tokens_saved is not None:
            usage = self.index.get((USAGE_PREFIX + rec.identity, *self._key_rest(rec)))
            if usage is not None:
                d = read_detail(usage.detail)
                acc = self.tokens_saved.setdefault(str(d.get("model") or "?"), [0, 0])
                acc[0] += int(d.get("prompt_tokens", 0) or 0)
                acc[1] += int(d.get("completion_tokens", 0) or 0)
        if self.listeners:
            self._emit_step(rec, "replayed")
        if observers:
            observers[0].replayed(self, rec)

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
        return (RETRY_PREFIX + key4[0], key4[1], key4[2], key4[3])

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
        detail: RetryDetail = {"identity": key4[0], "attempt": state["failures"]}
        if state.get("next_at") is not None:
            detail["next_at"] = iso_time(state["next_at"])
        rec = EffectRecord(
            self.scope_id,
            *rkey,
            payload=_codecs.encode(state, runtime.store.signer),
            kind="retry",
            seq=seq,
            started_at=runtime.clock.time(),
            detail=detail_text(detail),
        )
        if not self.write_behind(effects=[rec]):
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
        if token != self.inbox_token:
            self._take_inbox(token, runtime.store.list_signals(self.run_id))

    async def refresh_inbox(self, token: object = _UNREAD) -> None:
        """:meth:`poll_inbox` from a coroutine: a remote store's round trips go off the loop,
        so the other runs on it go on meanwhile (reading signals may wait for a DuckDB file:
        off the loop on every store). ``token``: the inbox token, if the caller just read
        it. Two polls that overlap deliver a signal once (by its id); nothing is delivered
        once this state is not its job's any more (the run continued as new meanwhile)."""
        self.last_poll = time.monotonic()
        if token is _UNREAD:
            token = await off_loop(runtime.store.inbox_token, self.run_id)
        if token == self.inbox_token:
            return
        signals = await off_loop(runtime.store.list_signals, self.run_id, thread=True)
        if self.job._state is self:
            self._take_inbox(token, signals)

    def _take_inbox(self, token: object, signals: Sequence[SignalRecord]) -> None:
        """The inbox as read: ``token`` read before ``signals`` (one sent meanwhile shows
        at the next poll)."""
        self.inbox_token = token
        for sig in signals:
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
    def set_run_status(self, status: RunStatus, detail: dict[str, Any] | None = None) -> None:
        run = self.status_record(status, detail)
        if not self.write_behind(runs=[run]):
            runtime.store.put_run(run)
        self.status_stored(status, detail)

    def event(self, kind: EventKind, data: dict[str, Any] | None = None) -> None:
        event = self.event_record(kind, data)
        if not self.write_behind(events=[event]):
            runtime.store.append_events([event])

    def event_record(self, kind: EventKind, data: dict[str, Any] | None = None) -> EventRecord:
        """A trace event of this run, told to the live listeners; the caller stores it."""
        if self.listeners:
            self.emit("event", {"event": kind, "data": data or {}})
        if observers:
            observers[0].execution(self, kind, data or {})
        return EventRecord(
            self.run_id,
            _uuid.uuid4().hex,
            runtime.clock.time(),
            kind,
            json.dumps(data, default=str) if data else "",
        )

    def status_record(self, status: RunStatus, detail: dict[str, Any] | None = None) -> RunRecord:
        """The run's record with a new status; the caller stores it, then tells the live
        listeners (:meth:`status_stored`)."""
        rec = self.run
        rec.status = status
        rec.detail = json.dumps(detail) if detail else ""
        rec.updated_at = runtime.clock.time()
        return rec

    def status_stored(self, status: RunStatus, detail: dict[str, Any] | None = None) -> None:
        if self.listeners:
            self.emit("status", {"status": status, "detail": detail or {}})
