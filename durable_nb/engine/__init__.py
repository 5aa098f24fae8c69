"""The engine: effects, workflows, replay. Imports no IPython, widgets or CLI framework."""

from __future__ import annotations

from ._clock import Clock, FakeClock, SystemClock
from ._effects import EffectFunction, Retry, effect
from ._kv import RunKV
from ._runtime import cancelled, runtime
from ._workflow import (
    Context,
    Job,
    RunLog,
    Workflow,
    cancel,
    durable,
    enqueue,
    get_job,
    run,
    signal,
    start,
)

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
    "cancel",
    "cancelled",
    "durable",
    "effect",
    "enqueue",
    "get_job",
    "run",
    "runtime",
    "signal",
    "start",
]
