"""Blocks of a run that something outside their body cuts short: ``ctx.interrupt_on(name)``
(a signal) and ``ctx.timeout(seconds)`` / ``ctx.wait_for(aw, seconds)`` (a durable timer).

A block takes its step when it is entered and records into it only if it is cut: the cut
cancels the block's task, the way ``asyncio.timeout`` does, and turns that cancellation into
the block's error on the way out (:class:`~durable_nb.Interrupted`,
:class:`~durable_nb.errors.StepTimeoutError`). A replay of a cut block raises that error at
the same point: the first step inside the block that the cut execution did not complete
(``RunState.lookup``), an effect that would execute inside it (``RunState.check_cut``), or
the block's end. A block that was not cut leaves no record, so a replay runs it live again —
a timeout block against the deadline it recorded when first entered.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from typing import Any

from .. import _hashing
from .._journal import (
    DeadlineDetail,
    InterruptDetail,
    StepKind,
    TimeoutDetail,
    detail_text,
    iso_time,
)
from ..errors import ArgumentError, Interrupted, StepTimeoutError
from ..store import SignalRecord
from ._runtime import Key4, runtime
from ._state import RunState, active_interrupt, replay

__all__ = ["CutBlock", "InterruptBlock", "TimeoutBlock"]


class CutBlock:
    """What interrupt and timeout blocks share: the step, replay, the cut and the way out."""

    identity = "dn.cut"
    kind: StepKind = "interrupt"

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.parent: CutBlock | None = None
        self.replay: BaseException | None = None  # an earlier execution was cut here
        self.fired: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None
        self._token: contextvars.Token[CutBlock | None] | None = None
        self._step: tuple[Key4, int] | None = None
        self._rec: Any = None
        self._entered = False

    # what each form says ------------------------------------------------------------------
    def _input(self) -> object:
        """What the step's key is hashed from."""
        raise NotImplementedError

    def _error(self, value: Any) -> BaseException:
        """The block's error, from the value its cut recorded."""
        raise NotImplementedError

    async def _go_live(self) -> None:
        """Start watching for the cut (may cut at once, raising)."""
        raise NotImplementedError

    def _stop(self) -> None:
        """The block ended: stop watching."""

    # the step -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Take the block's step(s) now; ``ctx.wait_for`` does at call time, so ``ctx.all``
        over several keeps the order of the calls. Entering takes them otherwise."""
        if self._step is None:
            key4, seq, self._rec = self.state.step(
                self.identity, _hashing.hash_value(self._input()).hex()
            )
            self._step = (key4, seq)
            self._prepared()

    def _prepared(self) -> None:
        """Steps of its own a form takes right after the block's (a timeout's deadline)."""

    def _record_cut(self, value: dict[str, Any], detail: str) -> BaseException:
        assert self._step is not None
        self.state.record_value(*self._step, value, self.kind, detail)
        return self._error(value)

    def cut(self, err: BaseException) -> None:
        """Cut the block (on the run's loop): its task is cancelled; it raises ``err``."""
        self.fired = err
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # the block ----------------------------------------------------------------------------
    async def __aenter__(self) -> CutBlock:
        if self._entered:
            raise ArgumentError(
                f"{self!r} was entered already; call ctx.interrupt_on(...) or "
                "ctx.timeout(...) again for another block"
            )
        self._entered = True
        self.prepare()
        if self._rec is not None:
            value = replay(self.state, self._rec)
            err = self._error(value)
            if isinstance(value, dict) and value.get("at_enter"):
                raise err
            self.replay = err
        else:
            self.task = asyncio.current_task()
            await self._go_live()
        self.parent = active_interrupt.get()
        self._token = active_interrupt.set(self)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        st = self.state
        if self._token is not None:
            active_interrupt.reset(self._token)
            self._token = None
        self._stop()
        if self.replay is not None:  # replayed to the block's end: it was cut here
            err, self.replay = self.replay, None
            if exc is None:
                raise err
            return
        fired = self.fired
        if fired is None:
            return
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
            return  # the run itself is being cancelled or interrupted
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            raise fired from exc
        raise fired from None


class InterruptBlock(CutBlock):
    """One ``async with ctx.interrupt_on(name):`` block (see ``Context.interrupt_on``)."""

    identity = "dn.interrupt"
    kind: StepKind = "interrupt"

    def __init__(self, state: RunState, name: str) -> None:
        super().__init__(state)
        self.name = name

    def __repr__(self) -> str:
        return f"<durable_nb interrupt_on({self.name!r}) in run {self.state.run_id!r}>"

    def _input(self) -> object:
        return self.name

    def _error(self, value: Any) -> Interrupted:
        payload = value.get("payload") if isinstance(value, dict) else None
        return Interrupted(
            self.name,
            payload,
            f"run {self.state.run_id!r} was interrupted by signal {self.name!r} "
            f"(payload {payload!r:.200})",
        )

    async def _go_live(self) -> None:
        st = self.state
        await st.refresh_inbox()
        sig = st.take_signal(self.name, None)
        if sig is not None:  # already waiting: the block is interrupted before it starts
            raise self._consume(sig, at_enter=True)
        st.interrupts.append(self)

    def _stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.state.interrupts.remove(self)

    def _consume(self, sig: SignalRecord, *, at_enter: bool) -> BaseException:
        payload = json.loads(sig.payload)
        got = InterruptDetail(name=self.name, signal_id=sig.signal_id)
        err = self._record_cut({"payload": payload, "at_enter": at_enter}, detail_text(got))
        self.state.event("signal_received", {**got, "interrupt": True})
        return err

    def fire(self, sig: SignalRecord) -> None:
        """The signal arrived (on the run's loop): record it, cancel the block's task."""
        self.cut(self._consume(sig, at_enter=False))


class TimeoutBlock(CutBlock):
    """``async with ctx.timeout(seconds):`` and ``ctx.wait_for(aw, seconds)``: a block whose
    deadline is recorded when it is first entered (a restart waits only what is left, and
    cuts at once when it passed), and whose timeout, when it comes, is recorded too."""

    identity = "dn.timeout"
    kind: StepKind = "timeout"

    def __init__(self, state: RunState, seconds: float, what: str) -> None:
        super().__init__(state)
        self.seconds = seconds
        self.what = what  # "ctx.timeout(5)" or "ctx.wait_for(..., 5)", for messages
        self.deadline = 0.0
        self._timer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<durable_nb {self.what} in run {self.state.run_id!r}>"

    def _input(self) -> object:
        return float(self.seconds)

    def _prepared(self) -> None:
        # the deadline's own step, taken on replay too so occurrences stay aligned
        st, clock = self.state, runtime.clock
        dkey, dseq, drec = st.step(self.identity + "_deadline", _hashing.hash_value(0).hex())
        if drec is not None:
            self.deadline = float(replay(st, drec))
        else:
            self.deadline = clock.time() + self.seconds
            detail = DeadlineDetail(timeout=self.seconds, until=iso_time(self.deadline))
            st.record_value(dkey, dseq, self.deadline, "deadline", detail_text(detail))

    def _error(self, value: Any) -> StepTimeoutError:
        return StepTimeoutError(
            f"{self.what} in run {self.state.run_id!r} did not finish within "
            f"{self.seconds:g}s (the timeout is recorded: a replay times out here too); give it "
            "more time or make the work smaller"
        )

    def _expire(self, *, at_enter: bool) -> BaseException:
        now = runtime.clock.time()
        detail = TimeoutDetail(timeout=self.seconds, at=iso_time(now))
        return self._record_cut({"at_enter": at_enter, "at": now}, detail_text(detail))

    async def _go_live(self) -> None:
        clock = runtime.clock
        if self.deadline - clock.time() <= 0:  # it passed while no process ran the run
            raise self._expire(at_enter=True)
        self._timer = asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        clock = runtime.clock
        while (left := self.deadline - clock.time()) > 0:
            await clock.sleep(left)
        if self.fired is None and self._token is not None:
            self.cut(self._expire(at_enter=False))

    def _stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and not timer.done():
            timer.cancel()
