"""The engine: effects, workflows, replay. Imports no IPython, widgets or CLI framework."""

from __future__ import annotations

from ._clock import Clock, FakeClock, SystemClock
from ._effects import EffectFunction, Retry, effect
from ._runtime import runtime
from ._workflow import Context, Job, Workflow, cancel, durable, get_job, run, signal, start

__all__ = [
    "Clock",
    "Context",
    "EffectFunction",
    "FakeClock",
    "Job",
    "Retry",
    "SystemClock",
    "Workflow",
    "cancel",
    "durable",
    "effect",
    "get_job",
    "run",
    "runtime",
    "signal",
    "start",
]
