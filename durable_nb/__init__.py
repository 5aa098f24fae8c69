"""durable_nb: durable execution for Python and Jupyter.

Layers, lowest first (a lower layer never imports a higher one; ``tests/test_layers.py``
holds the line, and finds no import cycle): ``errors``, ``_version`` → ``_journal``,
``_hashing``, ``_codecs`` → ``store`` → ``engine`` → ``trace`` / ``client`` / ``worker`` →
``cli`` / ``magics`` / ``widgets`` → this package. Importing this package loads
neither DuckDB, pyarrow, numpy nor pandas; the store opens on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from . import (
    _provenance,  # noqa: F401  # installs the provenance keyer in _hashing
    errors,
)
from ._version import __version__
from .client import Client
from .engine import (
    Clock,
    Context,
    EffectFunction,
    FakeClock,
    Job,
    Retry,
    SystemClock,
    Workflow,
    cancel,
    cancelled,
    current_session,
    durable,
    effect,
    enqueue,
    fork,
    get_job,
    progress,
    queue,
    resume,
    run,
    signal,
    start,
    wrap,
)
from .engine import map_items as _map_items
from .engine import runtime as _runtime
from .engine import set_widget_factory as _set_widget_factory
from .errors import (
    DuplicateRunError,
    DurableError,
    Interrupted,
    NonDeterminismError,
    RunCancelledError,
    RunLockedError,
    SignalTimeoutError,
)
from .store import Store

__all__ = [
    "Client",
    "Clock",
    "Context",
    "DuplicateRunError",
    "DurableError",
    "EffectFunction",
    "FakeClock",
    "Interrupted",
    "Job",
    "NonDeterminismError",
    "Retry",
    "RunCancelledError",
    "RunLockedError",
    "SignalTimeoutError",
    "Store",
    "SystemClock",
    "Workflow",
    "__version__",
    "cancel",
    "cancelled",
    "current_session",
    "durable",
    "effect",
    "enqueue",
    "errors",
    "fork",
    "get_job",
    "get_store",
    "instrument",
    "map",
    "progress",
    "queue",
    "resume",
    "run",
    "set_clock",
    "set_store",
    "signal",
    "start",
    "wrap",
]


def set_store(store: Store | str | os.PathLike[str] | None = None) -> Store:
    """Use this store from now on: a Store, a DuckDB path, ``":memory:"``, or ``None`` for the
    default (``$DURABLE_NB_STORE`` or ``.durable_nb/store.duckdb``). The previous store is
    closed. Returns the store."""
    return _runtime.set_store(store)


def get_store() -> Store:
    """The store in use (opened on first use)."""
    return _runtime.store


def map(
    fn: Callable[..., Any],
    items: Iterable[Any],
    /,
    *,
    executor: object = None,
    max_in_flight: int | None = None,
) -> list[Any]:
    """Call the effect ``fn`` on every item, on ``executor`` (a
    ``concurrent.futures.Executor`` such as ``ProcessPoolExecutor()``, a Dask
    ``distributed.Client`` or ``client.get_executor()``; None: threads of this process),
    and return the results in input order. Each item's result is recorded as it completes
    (by this process: workers never see the store), so running the cell again after a crash
    sends only the missing items. ``max_in_flight`` bounds the items out at once (None: no
    bound); ``fn``'s ``retry=``, ``limit=`` and ``rate=`` apply per item. Items that fail for
    good do not stop the others; once every item ended they raise
    :class:`~durable_nb.errors.MapError` with each failed index and its error. In a workflow
    use ``await ctx.map(...)`` (guide, "Scaling out a notebook")."""
    return _map_items(fn, items, executor=executor, max_in_flight=max_in_flight)


def instrument(tracer_provider: object = None) -> None:
    """Export runs as OpenTelemetry traces from now on (extra ``durable_nb[otel]``): each
    execution of a run a trace, each step a span (replayed steps as zero-length spans marked
    ``durable_nb.replayed``), user spans inside an effect nested under its step, on workers
    too. ``tracer_provider``: the SDK provider to use (None: the global one). guide,
    "OpenTelemetry"."""
    from . import _otel  # loads opentelemetry now, not on import

    _otel.instrument(tracer_provider)


def set_clock(clock: Clock | None) -> None:
    """Use this clock for timers, deadlines and retries (``None``: the system clock)."""
    _runtime.set_clock(clock)


def _trace_widget(job: Job[object], **options: object) -> object:
    """``job.widget()``: the engine asks the package for its widget, so it never imports the
    widgets layer (which needs the notebook extra, loaded only now)."""
    from .widgets import TraceWidget

    return TraceWidget(job, **options)  # type: ignore[arg-type]  # options are the widget's


_set_widget_factory(_trace_widget)


def load_ipython_extension(ip: object) -> None:
    """``%load_ext durable_nb``: register the magics (IPython is imported only now)."""
    from .magics import load_ipython_extension as load

    load(ip)  # type: ignore[arg-type]  # an InteractiveShell


def unload_ipython_extension(ip: object) -> None:
    """``%unload_ext durable_nb``: remove the magics and hooks again."""
    from .magics import unload_ipython_extension as unload

    unload(ip)  # type: ignore[arg-type]  # an InteractiveShell
