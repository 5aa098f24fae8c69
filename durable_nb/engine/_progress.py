"""Progress of long work: ``dn.progress(iterable, total=None, desc=None)``, the one progress
primitive, and the tqdm bars of an effect, which report through it.

Inside an effect that executes in a run, ``_effects`` opens a :class:`Step` for each attempt.
Every bar of the attempt — a ``dn.progress`` loop, or a tqdm bar of the user's own (any
``tqdm.std.tqdm`` subclass: ``tqdm``, ``tqdm.auto``, ``tqdm.notebook``, ``tqdm.asyncio``),
created while the step is open — tells it how far it got. The outermost bar open (the first
opened of those still open) is told to the run's live listeners (the trace widget shows
``37/100 pages`` on the effect's row, next to its ticking elapsed time), at most every
:data:`EVERY` seconds plus its first and last state, from any thread the effect runs in; and
its last state is the step's *final* progress, which ``_effects`` records with the result (a
``progress`` record, :func:`progress_records`): a replayed row, or a widget opened from the
store later, shows that final count instead of a spinner. A replayed effect does not run, so
nothing reports and nothing spins.

Outside a run (a plain cell, a ``%%effect`` cell, a script) ``dn.progress`` is a
``tqdm.auto`` bar when tqdm is installed, which a ``%%effect`` cell replays as the text of its
final state; else it passes the items through. Inside a run without live listeners (a
script's ``dn.run``) it is that bar too, and the bar reports to the step.

tqdm has no callback for this, so its ``__init__``, ``update`` and ``close`` are wrapped once
per process, when ``tqdm.std`` is (or gets) imported: a bar created outside an effect's step
costs one context-variable read at creation and nothing after.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .._journal import PROGRESS_PREFIX, ProgressDetail
from ..errors import ArgumentError, ArgumentTypeError
from ..store import EffectRecord
from ._usage import record_beside

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from ._state import RunState

__all__ = ["EVERY", "Step", "current_step", "progress", "progress_records"]

T = TypeVar("T")

EVERY = 0.1  # seconds between two reports of one step (a widget repaints at most this often)


class Step:
    """The effect attempt executing in this task or thread, inside a run: where its bars
    report, and the final state of its outermost bar (``final``)."""

    __slots__ = ("_desc", "_last", "_n", "_open", "_total", "name", "seq", "state")

    def __init__(self, state: RunState, seq: int, name: str) -> None:
        self.state, self.seq, self.name = state, seq, name
        self._n: float | None = None  # the outermost bar's last state: none reported yet
        self._open: list[object] = []  # the bars open now, in the order they opened
        self._last = 0.0

    @property
    def final(self) -> ProgressDetail | None:
        """The last state of the outermost bar, or None when no bar reported."""
        if self._n is None:
            return None
        total = self._total
        return {
            "n": int(self._n),
            "total": None if total is None else int(total),
            "desc": self._desc,
        }

    def opened(self, bar: object, n: float, total: float | None, desc: str) -> None:
        self._open.append(bar)
        if self._open[0] is bar:
            self._tell(n, total, desc, True)

    def update(self, bar: object, n: float, total: float | None, desc: str) -> None:
        if self._open and self._open[0] is bar:
            self._tell(n, total, desc, False)

    def closed(self, bar: object, n: float, total: float | None, desc: str) -> None:
        outermost = bool(self._open) and self._open[0] is bar
        if bar in self._open:
            self._open.remove(bar)
        if outermost or not self._open:  # an inner bar's end is not the effect's
            self._tell(n, total, desc, True)

    def _tell(self, n: float, total: float | None, desc: str, always: bool) -> None:
        self._n, self._total, self._desc = n, total, desc
        state = self.state
        if not state.listeners:
            return
        now = time.monotonic()
        if not always and now - self._last < EVERY:
            return
        self._last = now
        data = {"seq": self.seq, "name": self.name, **(self.final or {})}
        data["done"] = data.pop("n")
        # on the run's loop: a sync effect runs in a worker thread
        if threading.current_thread() is state.loop_thread:
            state.emit("progress", data)
        elif not state.loop.is_closed():
            state.loop.call_soon_threadsafe(state.emit, "progress", data)


#: the effect attempt executing in this task or thread inside a run; set by ``_effects``
#: around each attempt (worker threads copy it)
current_step: contextvars.ContextVar[Step | None] = contextvars.ContextVar(
    "durable_nb_step", default=None
)


def progress_records(rec: EffectRecord, step: Step | None) -> tuple[EffectRecord, ...]:
    """The ``progress`` record to write with the effect record ``rec`` (same scope, key and
    step; the identity prefixed): its final progress, or none when no bar reported."""
    if step is None or step.final is None:
        return ()
    return (record_beside(rec, PROGRESS_PREFIX + rec.identity, "progress", step.final),)


# ------------------------------------------------------------------------------ dn.progress
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
    if step is not None and step.state.listeners:
        return _inside(iterable, n, desc or "", step)
    bar = _bar(iterable, n, desc)  # a bar inside a run's step reports to it (the tqdm hook)
    if bar is not None:
        return bar
    return iter(iterable) if step is None else _inside(iterable, n, desc or "", step)


def _bar(iterable: Iterable[T], total: int | None, desc: str | None) -> Iterator[T] | None:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]  # optional, untyped
    except ImportError:  # no bar to show
        return None
    bar: Iterator[T] = iter(tqdm(iterable, total=total, desc=desc))
    return bar


def _inside(iterable: Iterable[T], total: int | None, desc: str, step: Step) -> Iterator[T]:
    me = object()
    done = 0
    step.opened(me, 0, total, desc)
    try:
        for item in iterable:
            yield item
            done += 1
            step.update(me, done, total, desc)
    finally:  # exhausted, or left early (break, an error): its last state is final
        step.closed(me, done, done if total is None else total, desc)


# ------------------------------------------------------------------------- the tqdm hook
def _hook(tqdm: Any) -> None:
    """Wrap ``tqdm.std.tqdm`` (every bar class derives from it): a bar created inside an
    effect's step reports to it."""
    if getattr(tqdm, "_durable_nb_hooked", False):
        return
    init, update, close = tqdm.__init__, tqdm.update, tqdm.close

    def _state(bar: Any) -> tuple[float, float | None, str]:
        return bar.n, bar.total, str(bar.desc or "").removesuffix(": ")

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        step = current_step.get()
        init(self, *args, **kwargs)
        if step is not None and not self.disable:
            self._durable_nb_step = step
            step.opened(self, *_state(self))

    @functools.wraps(update)
    def _update(self: Any, n: float = 1) -> Any:
        out = update(self, n)
        step: Step | None = self.__dict__.get("_durable_nb_step")
        if step is not None:
            step.update(self, *_state(self))
        return out

    @functools.wraps(close)
    def _close(self: Any) -> Any:
        step: Step | None = self.__dict__.pop("_durable_nb_step", None)
        out = close(self)
        if step is not None:
            step.closed(self, *_state(self))
        return out

    tqdm.__init__, tqdm.update, tqdm.close = __init__, _update, _close
    tqdm._durable_nb_hooked = True


class _WhenImported(importlib.abc.MetaPathFinder):
    """Hooks ``tqdm.std`` right after it is imported, if it is: nothing is imported for it."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "tqdm.std":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if loader is not None and hasattr(loader, "exec_module"):
                hooked = _then_hook(loader.exec_module)
                loader.exec_module = hooked  # type: ignore[method-assign,assignment]  # its own
            return spec
        return None


def _then_hook(run: Callable[[ModuleType], None]) -> Callable[[ModuleType], None]:
    def exec_module(module: ModuleType) -> None:
        run(module)
        if module.__name__ == "tqdm.std" and hasattr(module, "tqdm"):  # a shared loader's
            _hook(module.tqdm)  # other modules are left alone

    return exec_module


if "tqdm.std" in sys.modules:
    _hook(sys.modules["tqdm.std"].tqdm)
elif not any(isinstance(f, _WhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _WhenImported())
