"""The engine: effects, workflows, replay. Imports no IPython, widgets or CLI framework.

One concern per file, lowest first (a file imports only files above it in this list;
``tests/test_layers.py`` holds the order):

``_clock``       time as the engine sees it (system clock, virtual clock for tests)
``_runtime``     process state: the store, the clock, the notebook/shared scopes, cancel
                 scopes, the engine's loop, the jobs of this process, ``start_run``
``_observe``     where an observer of runs plugs in (``dn.instrument``'s spans)
``_state``       the live state of one executing run (its scope, inbox, waits, status)
``_retry``       how an effect call is attempted: ``Retry``, timeouts, Retry-After hints
``_usage``       token usage an effect's result reports, recorded once with the result
``_limits``      named rate and concurrency limits of effects (``limit=``, ``rate=``)
``_progress``    ``progress(iterable)`` and tqdm bars: how far an effect got, live and final
``_executors``   where items execute: concurrent.futures executors, Dask clients
``_streams``     run streams: ``ctx.stream`` writers, ``job.stream`` readers
``_streaming``   streaming effects (async generator ``@effect`` functions)
``_effects``     ``@effect``: keyed, recorded calls, inside runs and out
``_wrap``        ``wrap(obj)``: an object whose method calls are effects
``_map``         durable fan-out of an effect over items (``ctx.map``, ``dn.map``)
``_kv``          a run's key/value state (``ctx.kv``)
``_interrupts``  blocks a signal or a durable timeout cuts short (``ctx.interrupt_on``,
                 ``ctx.timeout``, ``ctx.wait_for``)
``_branches``    concurrent branches of a run (``ctx.all``, ``ctx.race``)
``_jobs``        ``Job`` and steering from outside: signal, enqueue, cancel, get_job
``_workflow``    ``@durable``: what a workflow is, and its versions
``_log``         ``ctx.log``
``_context``     ``Context``: the workflow API
``_driver``      executing a run: ``start_run`` and the run's coroutine
``_resume``      resuming a stopped run by its id: ``resume``
``_fork``        forking a run from a step: ``fork``
``_api``         ``start`` and ``run``, here or queued for a worker
"""

from __future__ import annotations

from ._api import run, start
from ._clock import Clock, FakeClock, SystemClock
from ._context import Context
from ._driver import call_of, fail_unstarted, start_run
from ._effects import EffectFunction, effect
from ._fork import fork, fork_records
from ._jobs import Job, cancel, enqueue, get_job, send_time, set_widget_factory, signal
from ._kv import RunKV, check_kv_key, kv_value
from ._log import RunLog
from ._map import map_items
from ._progress import progress
from ._resume import requeue, resume
from ._retry import Retry, check_timeout
from ._runtime import cancelled, runtime
from ._workflow import Workflow, defined, durable
from ._wrap import wrap

__all__ = [
    "Clock",
    "Context",
    "EffectFunction",
    "FakeClock",
    "Job",
    "Retry",
    "RunKV",
    "RunLog",
    "SystemClock",
    "Workflow",
    "call_of",
    "cancel",
    "cancelled",
    "check_kv_key",
    "check_timeout",
    "defined",
    "durable",
    "effect",
    "enqueue",
    "fail_unstarted",
    "fork",
    "fork_records",
    "get_job",
    "kv_value",
    "map_items",
    "progress",
    "requeue",
    "resume",
    "run",
    "runtime",
    "send_time",
    "set_widget_factory",
    "signal",
    "start",
    "start_run",
    "wrap",
]
