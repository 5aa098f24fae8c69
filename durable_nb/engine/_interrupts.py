"""``async with ctx.interrupt_on(name):`` — a block that a signal interrupts.

The block cancels its task when the signal comes, the way ``asyncio.timeout`` does, and
turns that cancellation into :class:`~durable_nb.Interrupted` on the way out. The signal is
consumed once and recorded (an ``interrupt`` step), so a replay raises at the same point:
the first step inside the block that the interrupted execution did not complete (see
``RunState.lookup``), or the block's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
from typing import Any

from .. import _hashing
from .._journal import InterruptDetail, detail_text
from ..errors import DurableError, Interrupted
from ..store import SignalRecord
from ._runtime import Key4
from ._state import RunState, active_interrupt, replay

__all__ = ["InterruptBlock"]


class InterruptBlock:
    """One ``async with ctx.interrupt_on(name):`` block (see ``Context.interrupt_on``)."""

    def __init__(self, state: RunState, name: str) -> None:
        self.state, self.name = state, name
        self.parent: InterruptBlock | None = None
        self.replay: Interrupted | None = None  # an earlier execution was interrupted here
        self.fired: Interrupted | None = None
        self.task: asyncio.Task[Any] | None = None
        self._token: contextvars.Token[InterruptBlock | None] | None = None
        self._step: tuple[Key4, int] | None = None

    def __repr__(self) -> str:
        return f"<durable_nb interrupt_on({self.name!r}) in run {self.state.run_id!r}>"

    async def __aenter__(self) -> InterruptBlock:
        if self._step is not None:
            raise DurableError(
                f"the interrupt_on({self.name!r}) block was entered already; call "
                "ctx.interrupt_on(...) again for another block"
            )
        st = self.state
        key4, seq, rec = st.step("dn.interrupt", _hashing.hash_value(self.name).hex())
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
        self.parent = active_interrupt.get()
        self._token = active_interrupt.set(self)
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
        got = InterruptDetail(name=self.name, signal_id=sig.signal_id)
        self.state.record_value(
            *self._step, {"payload": payload, "at_enter": at_enter}, "interrupt", detail_text(got)
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
            active_interrupt.reset(self._token)
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
