"""run_trace: a run's journal read back as the trace data the CLI and the widgets show."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.errors import RunNotFoundError
from durable_nb.store import Store
from durable_nb.trace import format_run, format_trace, run_history, run_info, run_trace

calls: Counter[str] = Counter()
state = {"fail": True, "flaky_failures": 1}


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    state.update(fail=True, flaky_failures=1)


@dn.effect
def add(a: int, b: int) -> int:
    calls["add"] += 1
    return a + b


@dn.effect(retry=dn.Retry(attempts=3, initial_delay=1.0))
def flaky(x: int) -> int:
    calls["flaky"] += 1
    if state["flaky_failures"]:
        state["flaky_failures"] -= 1
        raise ConnectionError("try again")
    return x * 10


@dn.durable(name="child")
async def child(ctx: dn.Context, n: int) -> int:
    return add(n, n)


@dn.durable(name="parent")
async def parent(ctx: dn.Context) -> int:
    a = add(1, 2)
    b = flaky(a)
    ctx.set_status({"stage": "approval"})
    go = await ctx.wait_signal("go")
    c = await ctx.child(child, 5)
    await ctx.sleep(10)
    if state["fail"]:
        raise RuntimeError("stop here")
    return a + b + c + int(go)


def _wait_status(job: dn.Job[Any], status: str) -> None:
    """Until the store says so (the job's own status changes just before it is stored)."""
    store = dn.get_store()
    for _ in range(1000):
        rec = store.get_run(job.run_id)
        if rec is not None and rec.status == status:
            return
        time.sleep(0.005)
    raise AssertionError(f"run {job.run_id} never reached {status}: {job.status()}")


def test_trace_of_a_run_that_waits_fails_and_resumes(store: Store, clock: dn.FakeClock) -> None:
    job = dn.start(parent, run_id="p")
    _wait_status(job, "waiting")
    t = run_trace(store, "p")
    assert t["run"]["status"] == "waiting"
    assert t["run"]["custom_status"] == {"stage": "approval"}
    assert t["run"]["status_version"] == 1
    assert t["run"]["executions"] == 1
    assert t["waiting"] == [{"kind": "signal", "name": "go"}]
    assert [(s["seq"], s["kind"], s["name"], s["state"]) for s in t["steps"]] == [
        (0, "effect", "tests.test_trace.add", "executed"),
        (1, "effect", "tests.test_trace.flaky", "executed"),
        (2, "status", "dn.status", "executed"),
    ]
    assert [s["attempts"] for s in t["steps"]] == [1, 2, 1]
    assert t["steps"][0]["args"] == "(1, 2)"
    assert t["pending_signals"] == []

    job.signal("extra", 1)  # never waited for: stays pending
    job.signal("go", 4)
    with pytest.raises(RuntimeError, match=r"^stop here$"):
        job.result(timeout=30)
    t = run_trace(store, "p")
    assert t["run"]["status"] == "failed"
    assert t["run"]["detail"] == {"error": "RuntimeError('stop here')"}
    assert t["waiting"] == []
    assert t["pending_signals"] == ["extra"]
    assert len(t["children"]) == 1 and t["children"][0].startswith("p/child-0-")
    kinds = [s["kind"] for s in t["steps"]]
    assert kinds == ["effect", "effect", "status", "signal", "child", "sleep"]
    assert {s["state"] for s in t["steps"]} == {"executed"}
    assert [e["kind"] for e in t["events"]] == [
        "started",
        "step_failed",
        "signal_received",
        "failed",
    ]
    assert t["events"][-1]["data"]["executed"] == 6

    clock.advance(100)
    state["fail"] = False
    assert dn.run(parent, run_id="p") == 3 + 30 + 10 + 4
    assert calls == {"add": 2, "flaky": 2}  # nothing executed again
    t = run_trace(store, "p")
    assert t["run"]["status"] == "completed" and t["run"]["executions"] == 2
    assert [s["state"] for s in t["steps"]] == ["replayed"] * 6
    assert t["totals"] == {
        "steps": 6,
        "executed": 0,
        "replayed": 6,
        "failed": 0,
        "saved_seconds": pytest.approx(sum(s["duration"] for s in t["steps"]), abs=1e-5),
        "tokens": {"prompt": 0, "completion": 0},  # no step reported token usage
        "tokens_saved": {"prompt": 0, "completion": 0},
        "tokens_by_model": {},
        "tokens_before": {"prompt": 0, "completion": 0},  # no earlier generation
    }
    assert [e["kind"] for e in t["events"]][-2:] == ["resumed", "completed"]
    json.dumps(t)  # JSON-ready

    child_trace = run_trace(store, t["children"][0])
    assert child_trace["run"]["parent_id"] == "p"
    assert child_trace["run"]["workflow"] == "child"


def test_a_step_that_fails_shows_as_failed_with_its_error(store: Store) -> None:
    @dn.effect
    def broken(x: int) -> int:
        raise ValueError(f"no {x}")

    @dn.effect(cache_errors=True)
    def cached_broken(x: int) -> int:
        raise KeyError(x)

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        try:
            cached_broken(1)
        except KeyError:
            pass
        return broken(7)

    with pytest.raises(ValueError, match=r"^no 7$"):
        dn.run(wf, run_id="b")
    t = run_trace(store, "b")
    assert [(s["seq"], s["state"], s["error"], s["attempts"]) for s in t["steps"]] == [
        (0, "failed", "KeyError('1')", 1),
        (1, "failed", "ValueError('no 7')", 1),
    ]
    assert t["totals"]["failed"] == 2


def test_error_records_are_read_without_importing_or_running_code(store: Store) -> None:
    """A recorded error's description comes from its record, even when the exception class
    cannot be rebuilt in the reading process."""

    class LocalError(Exception):
        pass

    @dn.effect(cache_errors=True)
    def fails() -> None:
        raise LocalError("local")

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        try:
            fails()
        except LocalError:
            return "caught"
        return "no"

    assert dn.run(wf, run_id="l") == "caught"
    step = run_trace(store, "l")["steps"][0]
    assert step["error"].endswith("LocalError('local')")


def test_waiting_on_a_timer_is_shown(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        await ctx.sleep(3600)

    from durable_nb.store import RunRecord

    store.put_run(
        RunRecord("t", "wf", "waiting", 1.0, 2.0, detail=json.dumps({"timer_until": "2030-01-01"}))
    )
    assert run_trace(store, "t")["waiting"] == [{"kind": "timer", "until": "2030-01-01"}]


def test_run_info_history_and_text(store: Store, clock: dn.FakeClock) -> None:
    state["flaky_failures"] = 0
    job = dn.start(parent, run_id="p")
    _wait_status(job, "waiting")
    info = run_info(store, "p")
    assert info["run_id"] == "p" and "events" not in info
    text = format_run(info)
    assert "status    waiting" in text
    assert "waits on  signal 'go'" in text
    assert 'custom    {"stage": "approval"} (v1)' in text
    state["fail"] = False
    job.signal("go", 1)
    assert job.result(timeout=30) == 3 + 30 + 10 + 1
    trace = run_trace(store, "p")
    hist = run_history(trace)
    assert [h["ts"] for h in hist] == sorted(h["ts"] for h in hist)
    assert hist[0]["type"] == "event" and hist[0]["kind"] == "started"
    assert hist[-1]["type"] == "event" and hist[-1]["kind"] == "completed"
    assert sum(h["type"] == "step" for h in hist) == 6
    timeline = format_trace(trace)
    lines = timeline.splitlines()
    assert lines[0] == "run p  workflow parent  status completed"
    assert lines[1].startswith("children: p/child-0-")
    assert lines[2].split() == ["AT", "SEQ", "KIND", "STATE", "TOOK", "STEP", "NOTE"]
    assert any(" effect  executed " in ln and "tests.test_trace.add(1, 2)" in ln for ln in lines)
    assert lines[-1].startswith("6 step(s): 6 executed, 0 replayed, 0 failed; replay saved")


def test_missing_run(store: Store) -> None:
    with pytest.raises(
        RunNotFoundError,
        match=r"^no run 'nope' in the store '.*'; list runs with `durable-nb runs`$",
    ):
        run_trace(store, "nope")


def test_the_workflow_features_show_as_readable_steps(store: Store) -> None:
    from durable_nb.engine import enqueue
    from durable_nb.trace import step_label

    @dn.durable(name="features")
    async def features(ctx: dn.Context) -> Any:
        ctx.log.info("hello %s", "there")
        await ctx.start_child(child, 2)
        idx, _ = await ctx.race(ctx.sleep(5), ctx.wait_signal("never"))
        first = await ctx.dequeue("inbox")
        return [idx, first, ctx.random() < 1]

    enqueue("f", "inbox", {"n": 1}, missing_ok=True)
    enqueue("f", "inbox", {"n": 2}, missing_ok=True)  # stays on the queue
    assert dn.run(features, run_id="f") == [0, {"n": 1}, True]
    t = run_trace(store, "f")
    labels = [step_label(s) for s in t["steps"]]
    assert labels[0] == "log INFO: hello there"
    assert re.fullmatch(r"start_child f/child-s0-\w+", labels[1])
    assert "race: #0 of 2 won" in labels
    assert "dequeue('inbox')" in labels
    assert labels[-1] == "ctx.random()"
    assert t["pending_signals"] == ["queue:inbox"]
    assert t["children"] == [labels[1].split()[1]]


def test_a_streaming_effect_is_one_step_with_its_chunk_count(store: Store) -> None:
    from durable_nb.trace import step_label

    @dn.effect
    async def tokens(n: int) -> Any:
        for i in range(n):
            yield f"t{i}"

    @dn.durable(name="streamer")
    async def streamer(ctx: dn.Context) -> Any:
        return await tokens(3)

    assert dn.run(streamer, run_id="s") == "t0t1t2"  # str chunks concatenate by default
    (step,) = run_trace(store, "s")["steps"]
    assert step["kind"] == "stream"
    assert re.fullmatch(r".*tokens\(3\) \(3 chunks\)", step_label(step))
