"""OpenTelemetry export of runs: ``dn.instrument(tracer_provider=None)`` (extra
``durable_nb[otel]``).

Each execution of a run is a trace of its own: a root span ``run <workflow>`` opened by the
execution's ``started``/``resumed`` event and ended by its closing one, with the run id as
``durable_nb.run_id`` on every span and links to the root spans of the run's earlier
executions seen by this process. Each step is a child span named after its effect (or
``dn.map:<effect>``, ``dn.sleep``...) carrying its key, ``durable_nb.replayed``, the
attempts, the duration and the tokens an LLM call reported (GenAI semantic conventions).

A replayed step is a zero-length span marked ``durable_nb.replayed = true`` (with the
duration it took when it executed in ``durable_nb.recorded_duration_s``): it shows where the
step sits in the run without counting as work. An executing effect's span is the current
span while the function runs, so spans the function opens nest under it; a map's items carry
it to their workers (W3C trace context), where spans nest under the map's step too.
"""

from __future__ import annotations

import weakref
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode

from ._journal import CLOSING_EVENTS, EXECUTION_EVENTS, USAGE_PREFIX, read_detail
from ._version import __version__
from .engine import _executors, _observe
from .engine._runtime import Key4
from .engine._state import RunState
from .errors import ArgumentTypeError
from .store import EffectRecord

__all__ = ["instrument", "uninstrument"]


def _key_text(key4: Key4) -> str:
    identity, version, input_hash, occurrence = key4
    return f"{identity}|{version}|{input_hash}|{occurrence}"


class _Step:
    """An executing step's span, current while its function runs."""

    __slots__ = ("attrs", "name", "parent", "span", "token", "tracer")

    def __init__(
        self, tracer: trace.Tracer, parent: Span | None, name: str, attrs: dict[str, Any]
    ) -> None:
        self.tracer, self.parent, self.name, self.attrs = tracer, parent, name, attrs
        self.span: Span | None = None
        self.token: object = None

    def __enter__(self) -> _Step:
        ctx = trace.set_span_in_context(self.parent) if self.parent is not None else None
        self.span = self.tracer.start_span(self.name, context=ctx, attributes=self.attrs)
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, typ: object, exc: BaseException | None, tb: object) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]  # attach's token
        span = self.span
        if span is None:
            return
        if exc is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300]))
        span.end()

    def recorded(self, rec: EffectRecord, also: tuple[EffectRecord, ...], attempts: int) -> None:
        span = self.span
        if span is None:
            return
        span.set_attribute("durable_nb.attempt", attempts)
        span.set_attribute("durable_nb.duration_s", rec.duration)
        if rec.kind == "map":
            d = read_detail(rec.detail)
            for k in ("items", "executed", "replayed", "failed"):
                span.set_attribute(f"durable_nb.map.{k}", int(d.get(k, 0) or 0))
        for u in also:
            if u.identity.startswith(USAGE_PREFIX):
                _usage(span, u)


def _usage(span: Span, usage: EffectRecord) -> None:
    d = read_detail(usage.detail)
    span.set_attribute("gen_ai.usage.input_tokens", int(d.get("prompt_tokens", 0) or 0))
    span.set_attribute("gen_ai.usage.output_tokens", int(d.get("completion_tokens", 0) or 0))
    if d.get("model"):
        span.set_attribute("gen_ai.response.model", str(d["model"]))


class _Tracing:
    """The observer ``dn.instrument`` installs (``engine/_observe.py``)."""

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        self.tracer = trace.get_tracer("durable_nb", __version__, tracer_provider=provider)
        self.roots: weakref.WeakKeyDictionary[RunState, Span] = weakref.WeakKeyDictionary()
        self.earlier: dict[str, list[SpanContext]] = {}  # run id -> its executions' roots

    def _attrs(self, state: RunState, rec_or_key: EffectRecord | Key4, seq: int) -> dict[str, Any]:
        key4 = (
            rec_or_key
            if isinstance(rec_or_key, tuple)
            else (
                rec_or_key.identity,
                rec_or_key.version,
                rec_or_key.input_hash,
                rec_or_key.occurrence,
            )
        )
        return {
            "durable_nb.run_id": state.run_id,
            "durable_nb.seq": seq,
            "durable_nb.effect": key4[0],
            "durable_nb.key": _key_text(key4),
        }

    def _parent(self, state: RunState) -> Any:
        root = self.roots.get(state)
        return trace.set_span_in_context(root) if root is not None else otel_context.Context()

    # Observer ------------------------------------------------------------------------
    def execution(self, state: RunState, kind: str, data: dict[str, Any]) -> None:
        if kind in EXECUTION_EVENTS:
            workflow = state.workflow.name if state.workflow is not None else state.run.workflow
            links = [Link(c) for c in self.earlier.get(state.run_id, [])[-16:]]
            span = self.tracer.start_span(
                f"run {workflow}",
                context=otel_context.Context(),  # a trace of its own, whoever started it
                links=links,
                attributes={
                    "durable_nb.run_id": state.run_id,
                    "durable_nb.workflow": workflow,
                    "durable_nb.execution": int(data.get("execution", 0) or 0),
                    "durable_nb.resumed": kind == "resumed",
                },
            )
            self.roots[state] = span
            self.earlier.setdefault(state.run_id, []).append(span.get_span_context())
            return
        root = self.roots.get(state)
        if root is None:
            return
        if kind in CLOSING_EVENTS:
            del self.roots[state]
            root.set_attribute("durable_nb.status", kind)
            for k in ("replayed", "executed", "saved_seconds"):
                if isinstance(data.get(k), (int, float)):
                    root.set_attribute(f"durable_nb.{k}", data[k])
            if kind == "failed":
                root.set_status(Status(StatusCode.ERROR, str(data.get("error", ""))[:300]))
            root.end()
        else:  # step_failed, signal_received, ...: what happened during the execution
            root.add_event(kind, {k: str(v)[:300] for k, v in data.items()})

    def step(self, state: RunState, key4: Key4, seq: int, kind: str) -> _Step:
        attrs = {**self._attrs(state, key4, seq), "durable_nb.replayed": False}
        attrs["durable_nb.step_kind"] = kind
        return _Step(self.tracer, self.roots.get(state), key4[0], attrs)

    def replayed(self, state: RunState, rec: EffectRecord) -> None:
        attrs = {**self._attrs(state, rec, rec.seq), "durable_nb.replayed": True}
        attrs["durable_nb.step_kind"] = rec.kind
        attrs["durable_nb.recorded_duration_s"] = rec.duration
        span = self.tracer.start_span(rec.identity, context=self._parent(state), attributes=attrs)
        span.end(end_time=getattr(span, "start_time", None))  # zero-length (an SDK span)

    def recorded(self, state: RunState, rec: EffectRecord) -> None:
        if rec.seq < 0:
            return
        attrs = {**self._attrs(state, rec, rec.seq), "durable_nb.replayed": False}
        attrs["durable_nb.step_kind"] = rec.kind
        if rec.is_error:
            attrs["durable_nb.error"] = True
        span = self.tracer.start_span(rec.identity, context=self._parent(state), attributes=attrs)
        span.end()


def _carrier() -> dict[str, str] | None:
    """The current trace context for a worker (inside a step's span), else None."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def instrument(tracer_provider: object = None) -> None:
    """See :func:`durable_nb.instrument`."""
    if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
        raise ArgumentTypeError(
            f"tracer_provider must be an opentelemetry TracerProvider (such as "
            f"opentelemetry.sdk.trace.TracerProvider()) or None for the global one, got "
            f"{tracer_provider!r}"
        )
    _observe.install(_Tracing(tracer_provider))
    _executors.set_tracing(_carrier)


def uninstrument() -> None:
    """Stop exporting (tests; a notebook that wants its runs untraced again)."""
    _observe.install(None)
    _executors.set_tracing(None)
