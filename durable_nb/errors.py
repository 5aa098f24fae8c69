"""Every public exception of durable_nb, under one base class.

Each message names the broken rule, shows the offending value with ``!r`` and says what to
do. Where Python has a matching built-in category (``TypeError``, ``ValueError``,
``TimeoutError``) the error also derives from it, so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BlockingCallError",
    "DuplicateRunError",
    "DurableError",
    "DurableWarning",
    "EffectTimeoutError",
    "EngineError",
    "ExportFormatError",
    "Interrupted",
    "KernelSpecError",
    "LimitConflictError",
    "MapError",
    "NonDeterminismError",
    "PayloadIntegrityError",
    "RunCancelledError",
    "RunConflictError",
    "RunEndedError",
    "RunLockedError",
    "RunNotFoundError",
    "SignalTimeoutError",
    "StepTimeoutError",
    "StoreDamageWarning",
    "StoreError",
    "StoreFeatureError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreUnavailableError",
    "StoreVersionError",
    "StreamClosedError",
    "UnhashableInputError",
    "UnrecordedCancelWarning",
    "UnstorableValueError",
    "WidgetUnavailableError",
    "WorkflowNotFoundError",
    "WorkflowVersionError",
]


class DurableError(Exception):
    """Base class of every error durable_nb raises on purpose."""


class ArgumentError(DurableError, ValueError):
    """A public entry point got an argument with a bad value."""


class ArgumentTypeError(DurableError, TypeError):
    """A public entry point got an argument of the wrong type."""


class BlockingCallError(DurableError, RuntimeError):
    """A blocking call was made where it would block the event loop a run needs (the
    ``await`` form works there), or a run would wait on itself."""


class LimitConflictError(ArgumentError):
    """Two effects define one named rate/concurrency limit with different figures."""


class UnhashableInputError(DurableError, TypeError):
    """An effect or workflow input has no canonical content hash."""


class UnstorableValueError(DurableError, TypeError):
    """A result, payload or variable cannot be encoded by any codec."""


class NonDeterminismError(DurableError):
    """With ``strict=True``, a replayed run called a different step than its history."""


class EffectTimeoutError(DurableError, TimeoutError):
    """An effect attempt, or all attempts together, ran past its timeout."""


class SignalTimeoutError(DurableError, TimeoutError):
    """``ctx.wait_signal(name, timeout=...)`` saw no signal before its deadline."""


class StepTimeoutError(DurableError, TimeoutError):
    """``ctx.wait_for(aw, timeout)`` or ``async with ctx.timeout(seconds):`` ran out of time.
    The timeout is recorded, so a replay of the run raises it at the same point."""


class Interrupted(DurableError):
    """An ``async with ctx.interrupt_on(name):`` block was stopped by the signal ``name``;
    ``.name`` and ``.payload`` (the signal's JSON payload) say which and with what."""

    def __init__(self, name: str, payload: object = None, message: str | None = None) -> None:
        super().__init__(message or f"interrupted by signal {name!r} (payload {payload!r})")
        self.name = name
        self.payload = payload

    def __reduce__(self) -> tuple[object, ...]:  # recorded errors round-trip with their fields
        return (type(self), (self.name, self.payload, str(self)))


class MapError(DurableError):
    """Items of a ``ctx.map``/``dn.map`` failed for good (after their effect's retries).

    The other items ran to the end and their results are recorded: running the map again
    computes only the failed ones (inside a run, a resume does). One class on every Python
    version (3.10 has no ``ExceptionGroup``): ``.errors`` maps each failed item's index to
    its original exception, ``.exceptions`` lists them in index order (the shape of an
    exception group's), ``.results`` holds the results in input order with ``None`` where an
    item failed."""

    def __init__(
        self,
        message: str,
        errors: dict[int, BaseException],
        results: list[object] | None = None,
    ) -> None:
        super().__init__(message)
        self.errors = dict(sorted(errors.items()))
        self.exceptions = tuple(self.errors.values())
        self.results = results if results is not None else []

    def __reduce__(self) -> tuple[object, ...]:  # recorded errors round-trip with their fields
        return (type(self), (str(self), self.errors, self.results))


class WorkflowNotFoundError(DurableError, LookupError):
    """The workflow a run belongs to is not defined (or not known) in this process."""


class WorkflowVersionError(DurableError):
    """A run started on a version of its workflow that is not defined in this process."""


class StreamClosedError(DurableError):
    """A chunk was written to a run's stream after the stream was closed."""


class RunNotFoundError(DurableError, LookupError):
    """No run with the given id exists in the store."""


class RunConflictError(DurableError):
    """A run id names a run of another workflow: a run id belongs to one workflow."""


class DuplicateRunError(DurableError):
    """A run was started with a dedup id that a live run (queued or executing) of the same
    queue holds; the message names that run."""


class RunEndedError(DurableError):
    """The run ended before what was being waited for happened."""


class RunCancelledError(DurableError):
    """The run was cancelled; its result will never exist."""


class RunLockedError(DurableError):
    """Another process is executing this run right now."""


class StoreError(DurableError):
    """The store cannot be opened, read or written."""


class StoreFeatureError(StoreError, ArgumentError):
    """The store in use cannot do what was asked (queues with limits, priorities, dedup ids
    and sessions need a store that coordinates workers: PostgreSQL)."""


class StoreUnavailableError(StoreError):
    """The store's location cannot be created, opened or written."""


class StoreLockedError(StoreError):
    """Another process holds the store file and did not release it in time."""


class StoreFormatError(StoreError):
    """The file is not a durable_nb store, or is damaged."""


class StoreVersionError(StoreError):
    """The store was written by a newer schema than this version of durable_nb knows."""


class ExportFormatError(DurableError, ValueError):
    """A file given to import is not a durable_nb export, is damaged, or is of a newer format."""


class PayloadIntegrityError(StoreError):
    """A pickled payload is unsigned or its signature does not match: it is never unpickled."""


class KernelSpecError(DurableError):
    """The "Python 3 (durable)" kernel spec cannot be built or installed."""


class EngineError(DurableError):
    """The engine reached a state it never should: a bug in durable_nb — please report it
    with the traceback."""


class WidgetUnavailableError(DurableError):
    """A widget cannot be shown: its front-end bundle or the notebook extra is missing."""


class DurableWarning(UserWarning):
    """Base class of the warnings durable_nb gives."""


class UnrecordedCancelWarning(DurableWarning):
    """An effect inside a run was cancelled by something whose outcome is not recorded (a
    plain ``asyncio.wait_for``/``asyncio.timeout``, a task cancelled by hand): after a restart
    the run may take another branch. ``ctx.wait_for``/``ctx.timeout`` record theirs."""


class StoreDamageWarning(DurableWarning):
    """A store's journal had damaged bytes (a torn or corrupted record): the records around
    them were kept, the damaged file is kept next to them for inspection."""
