"""Where an observer of runs plugs in: the executions of runs, the steps they execute and
the steps they replay. ``dn.instrument`` (``durable_nb/_otel.py``) installs one that turns
them into OpenTelemetry spans; without one every hook is a check of one global.

An executing effect's step is a context manager around its attempts and its record
(:func:`step`), so the observer can make its span current while the function runs: spans
the function opens nest under the step, and a map's items carry it to their workers.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..store import EffectRecord
    from ._runtime import Key4, TopScope
    from ._state import RunState

__all__ = ["NO_STEP", "Observer", "StepObservation", "install", "observer", "observers", "step"]


class StepObservation(Protocol):
    """One executing step, entered before its first attempt and left after its record."""

    def __enter__(self) -> StepObservation: ...

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def recorded(self, rec: EffectRecord, also: tuple[EffectRecord, ...], attempts: int) -> None:
        """Its record (and bookkeeping such as token usage) was written."""


class Observer(Protocol):
    def execution(self, state: RunState, kind: str, data: dict[str, Any]) -> None:
        """A run's trace event: ``started``/``resumed`` open an execution, the closing
        events end it."""

    def step(self, state: RunState, key4: Key4, seq: int, kind: str) -> StepObservation:
        """A step of ``state`` starts executing (an effect, a map)."""

    def replayed(self, state: RunState, rec: EffectRecord) -> None:
        """A step was replayed from the journal."""

    def recorded(self, state: RunState, rec: EffectRecord) -> None:
        """An engine step (a timer, a signal, ``ctx.now``...) was recorded."""


class _NoStep:
    __slots__ = ()

    def __enter__(self) -> _NoStep:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def recorded(self, rec: EffectRecord, also: tuple[EffectRecord, ...], attempts: int) -> None:
        return None


NO_STEP = _NoStep()
#: the installed observer, if any (a list changed in place: the hooks test its truth, which
#: costs a recorded step nothing measurable when it is empty)
observers: list[Observer] = []


def observer() -> Observer | None:
    return observers[0] if observers else None


def install(obs: Observer | None) -> None:
    """Install ``obs`` (None: none) for every run of this process from now on."""
    observers[:] = [obs] if obs is not None else []


def step(scope: RunState | TopScope, key4: Key4, seq: int, kind: str) -> StepObservation:
    """The observation of a step that starts executing (a no-op outside runs or without an
    observer)."""
    if not observers or seq < 0:  # top-level calls (seq -1) belong to no run
        return NO_STEP
    return observers[0].step(scope, key4, seq, kind)  # type: ignore[arg-type]  # a run's
