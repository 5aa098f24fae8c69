"""``dn.instrument``: runs as OpenTelemetry traces, read back from the SDK's in-memory
exporter — one trace per execution, linked by run id; each step a span; replayed steps
zero-length and marked; user spans nested under the effect that opened them, also from a
map's items on a process pool."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.errors import ArgumentTypeError


def _need_otel() -> None:
    """OpenTelemetry is a test dependency (the dev extra): missing, it skips, and fails
    under CI."""
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("opentelemetry-sdk is not installed (durable_nb[otel])")


@pytest.fixture
def exported() -> Iterator[tuple[Any, Any]]:
    _need_otel()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from durable_nb import _otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dn.instrument(tracer_provider=provider)
    yield exporter, provider
    _otel.uninstrument()
    provider.shutdown()


class Reply:
    """An LLM response as the OpenAI SDK shapes it (``usage``, ``model``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.model = "gpt-test"
        self.usage = {"prompt_tokens": 12, "completion_tokens": 5}


def test_a_run_is_one_trace_per_execution_with_replayed_steps_marked(
    exported: tuple[Any, Any],
) -> None:
    exporter, provider = exported
    user = provider.get_tracer("user code")

    @dn.effect
    def ask(q: str) -> Reply:
        with user.start_as_current_span("http call"):
            return Reply(q.upper())

    def double(x: int) -> int:
        with user.start_as_current_span("item"):
            return 2 * x

    boom = {"on": True}

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        reply = await ctx.run(ask, "hi")
        ctx.now()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            doubled = await ctx.map(double, [1, 2, 3], executor=pool)
        if boom["on"]:
            raise RuntimeError("boom")
        return f"{reply.text} {sum(doubled)}"

    with pytest.raises(RuntimeError, match="boom"):
        dn.run(wf, run_id="t")
    boom["on"] = False
    assert dn.run(wf, run_id="t") == "HI 12"

    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name.startswith("run ")]
    assert len(roots) == 2
    first, second = sorted(roots, key=lambda s: s.start_time)
    assert first.context.trace_id != second.context.trace_id  # one trace per execution
    assert {r.attributes["durable_nb.run_id"] for r in roots} == {"t"}
    assert first.attributes["durable_nb.status"] == "failed"
    assert second.attributes["durable_nb.status"] == "completed"
    assert [link.context.span_id for link in second.links] == [first.context.span_id]

    def of(root: Any) -> list[Any]:
        return [s for s in spans if s.context.trace_id == root.context.trace_id]

    # the first execution: every step executed, user spans under the step that made them
    one = {s.name: s for s in of(first)}
    steps = [
        s for s in of(first) if s.parent is not None and s.parent.span_id == first.context.span_id
    ]
    names = [s.name for s in sorted(steps, key=lambda s: s.attributes["durable_nb.seq"])]
    assert names == [ask.identity, "dn.now", "dn.map:" + dn.effect(double).identity]
    assert all(s.attributes["durable_nb.replayed"] is False for s in steps)
    http = one["http call"]
    assert http.parent.span_id == one[ask.identity].context.span_id
    assert one[ask.identity].attributes["gen_ai.usage.input_tokens"] == 12
    assert one[ask.identity].attributes["gen_ai.usage.output_tokens"] == 5
    assert one[ask.identity].attributes["durable_nb.attempt"] == 1
    map_span = one["dn.map:" + dn.effect(double).identity]
    items = [s for s in of(first) if s.name == "item"]
    assert len(items) == 3
    assert all(s.parent.span_id == map_span.context.span_id for s in items)
    assert map_span.attributes["durable_nb.map.items"] == 3

    # the second: the same steps replayed, zero-length and marked; no new work under them
    two = [s for s in of(second) if s is not second]
    assert sorted(s.name for s in two) == sorted(names)
    assert all(s.attributes["durable_nb.replayed"] is True for s in two)
    assert all(s.start_time == s.end_time for s in two)
    assert not [s for s in of(second) if s.name in ("http call", "item")]


def item_trace(x: int) -> tuple[int, int]:
    """On a worker process: the trace and parent span the item runs under."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return ctx.trace_id, ctx.span_id


def test_a_maps_items_run_under_its_step_on_worker_processes(exported: tuple[Any, Any]) -> None:
    exporter, _ = exported

    @dn.durable
    async def wf(ctx: dn.Context) -> list[tuple[int, int]]:
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            return await ctx.map(item_trace, range(4), executor=pool)

    seen = dn.run(wf, run_id="w")
    (step,) = [s for s in exporter.get_finished_spans() if s.name.startswith("dn.map:")]
    assert {tuple(x) for x in seen} == {(step.context.trace_id, step.context.span_id)}


def test_instrument_checks_its_argument() -> None:
    _need_otel()
    with pytest.raises(ArgumentTypeError, match="tracer_provider"):
        dn.instrument(tracer_provider="jaeger")
