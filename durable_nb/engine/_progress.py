"""Progress of long work: ``dn.progress(iterable, total=None, desc=None)``, the one progress
primitive.

Inside an effect that executes in a run, each step forward is told to the run's live
listeners (the trace widget shows ``37/100`` on the effect's row, next to its ticking
elapsed time), at most every :data:`EVERY` seconds plus the last one, from any thread the
effect runs in. Outside a run (a plain cell, a ``%%effect`` cell, a script) it is a
``tqdm.auto`` bar when tqdm is installed, which a ``%%effect`` cell replays as the text of
its final state; else it passes the items through. A replayed effect does not run, so it
reports nothing and nothing spins: its row shows it replayed.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ArgumentError, ArgumentTypeError

if TYPE_CHECKING:
    from ._state import RunState

__all__ = ["EVERY", "current_step", "progress"]

T = TypeVar("T")

EVERY = 0.1  # seconds between two reports of one bar (a widget repaints at most this often)

#: the effect executing in this task or thread: ``(run state, seq, identity)``; set by
#: ``_effects`` around each attempt inside a run (worker threads copy it)
current_step: contextvars.ContextVar[tuple[RunState, int, str] | None] = contextvars.ContextVar(
    "durable_nb_step", default=None
)


def _report(state: RunState, data: dict[str, Any]) -> None:
    """Tell the run's listeners, on the run's loop (a sync effect runs in a worker thread)."""
    if threading.current_thread() is state.loop_thread:
        state.emit("progress", data)
    elif not state.loop.is_closed():
        state.loop.call_soon_threadsafe(state.emit, "progress", data)


def _count(iterable: object, total: object) -> int | None:
    if total is not None:
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ArgumentError(f"total must be an int >= 0 or None, got {total!r}")
        return total
    try:
        return len(iterable)  # type: ignore[arg-type]  # anything sized
    except TypeError:
        return None


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str | None = None
) -> Iterator[T]:
    """Iterate ``iterable``, reporting how far it got (see the module docstring): to the
    trace widget inside a run's effect, as a tqdm bar in a cell otherwise. ``total``
    defaults to ``len(iterable)`` when it has one; ``desc`` labels the bar."""
    if not isinstance(iterable, Iterable):
        raise ArgumentTypeError(
            f"progress needs an iterable (a list, a range, a generator), got {iterable!r}"
        )
    if desc is not None and not isinstance(desc, str):
        raise ArgumentTypeError(f"desc must be a str or None, got {desc!r}")
    n = _count(iterable, total)
    step = current_step.get()
    if step is None or not step[0].listeners:
        return _outside(iterable, n, desc)
    return _inside(iterable, n, desc, step)


def _outside(iterable: Iterable[T], total: int | None, desc: str | None) -> Iterator[T]:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]  # optional, untyped
    except ImportError:  # no bar to show: the items pass through
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc))


def _inside(
    iterable: Iterable[T], total: int | None, desc: str | None, step: tuple[RunState, int, str]
) -> Iterator[T]:
    state, seq, name = step
    base = {"seq": seq, "name": name, "total": total, "desc": desc or ""}
    done, last = 0, 0.0
    _report(state, {**base, "done": 0})
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= EVERY:
            last = now
            _report(state, {**base, "done": done})
    _report(state, {**base, "done": done, "total": done if total is None else total})
