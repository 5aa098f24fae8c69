"""Effects and workflows in one process: record, replay, keys, occurrences, errors."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    EffectTimeoutError,
    NonDeterminismError,
    UnhashableInputError,
    UnstorableValueError,
)
from durable_nb.store import RunRecord, SignalRecord, Store
from durable_nb.store._duckdb import DuckDBStore

from .helpers import wait_until

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@dn.effect
def double(x: int) -> int:
    calls[f"double({x})"] += 1
    return 2 * x


@dn.effect
async def fetch(url: str, delay: float = 0.0) -> dict[str, Any]:
    calls[f"fetch({url})"] += 1
    await asyncio.sleep(delay)
    return {"url": url, "n": len(url)}


@dn.durable
async def pipeline(ctx: dn.Context, urls: list[str]) -> int:
    pages = await asyncio.gather(*(fetch(u) for u in urls))
    doubled = [double(p["n"]) for p in pages]
    return sum(doubled)


def test_run_records_then_replays_without_executing(store: Store) -> None:
    assert dn.run(pipeline, ["a", "bb", "ccc"]) == 12
    first = dict(calls)
    assert first == {
        "fetch(a)": 1,
        "fetch(bb)": 1,
        "fetch(ccc)": 1,
        "double(1)": 1,
        "double(2)": 1,
        "double(3)": 1,
    }
    # a completed run returns its recorded result
    assert dn.run(pipeline, ["a", "bb", "ccc"]) == 12
    assert dict(calls) == first
    # the same steps under a fresh run id replay nothing (scope is the run)...
    assert dn.run(pipeline, ["a", "bb", "ccc"], run_id="other") == 12
    assert calls["fetch(a)"] == 2


def test_restarted_run_replays_every_finished_step(store: Store) -> None:
    dn.run(pipeline, ["a", "bb"], run_id="r")
    dn.run(pipeline, ["a", "bb"], run_id="r", restart=True)  # forget, execute again
    assert calls["fetch(a)"] == 2
    job = dn.start(pipeline, ["a", "bb"], run_id="r")
    assert job.result() == 6
    assert calls["fetch(a)"] == 2


def test_failed_run_resumes_and_replays_finished_steps(store: Store) -> None:
    state = {"fail": True}

    @dn.durable
    async def flaky(ctx: dn.Context) -> int:
        a = await fetch("one")
        if state["fail"]:
            raise RuntimeError("boom")
        b = await fetch("two")
        return a["n"] + b["n"]

    with pytest.raises(RuntimeError, match=r"^boom$"):
        dn.run(flaky, run_id="f")
    assert dn.get_job("f").status() == "failed"
    state["fail"] = False
    assert dn.run(flaky, run_id="f") == 6
    assert calls == {"fetch(one)": 1, "fetch(two)": 1}
    assert dn.get_job("f").status() == "completed"


def test_edited_workflow_replays_unchanged_calls_and_executes_changed(store: Store) -> None:
    urls = ["a", "bb", "ccc"]

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> list[int]:
        out = [(await fetch(u))["n"] for u in urls]
        if fail:
            raise RuntimeError("stop")
        return out

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="e")
    urls[1] = "yyy"  # the notebook was edited between executions
    assert dn.run(wf, False, run_id="e") == [1, 3, 3]
    assert calls == {"fetch(a)": 1, "fetch(bb)": 1, "fetch(ccc)": 1, "fetch(yyy)": 1}


def test_occurrences_replay_each_value_in_turn(store: Store) -> None:
    import random

    @dn.effect
    def roll_dice() -> int:
        calls["roll"] += 1
        return random.randint(1, 10**9)

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> tuple[int, int]:
        a, b = roll_dice(), roll_dice()
        if fail:
            raise RuntimeError("again")
        return a, b

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="d")
    first = [r for r in runtime.store.load_effects("run/d") if r.identity.endswith("roll_dice")]
    assert [r.occurrence for r in first] == [0, 1]
    a, b = dn.run(wf, False, run_id="d")
    assert calls["roll"] == 2
    assert a != b


def test_gather_replays_deterministically_whatever_the_completion_order(store: Store) -> None:
    delays = iter([0.03, 0.0, 0.01])

    @dn.effect
    async def pick(tag: str) -> str:
        await asyncio.sleep(next(delays))  # the first call finishes last
        calls[tag] += 1
        return f"{tag}-{calls[tag]}"

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> list[str]:
        out = await asyncio.gather(*(pick("same") for _ in range(3)))
        if fail:
            raise RuntimeError("x")
        return out

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="g")
    recorded = sorted(
        (r.occurrence, r.seq, _decode(r)) for r in runtime.store.load_effects("run/g")
    )
    # keys follow call order, not completion order
    assert recorded == [(0, 0, "same-3"), (1, 1, "same-1"), (2, 2, "same-2")]
    assert dn.run(wf, False, run_id="g") == ["same-3", "same-1", "same-2"]
    assert calls["same"] == 3


def _decode(rec: Any) -> Any:
    from durable_nb import _codecs

    return _codecs.decode(rec.payload, runtime.store.signer)


def test_effect_outside_a_run_is_memoized_in_the_notebook_scope() -> None:
    assert double(21) == 42
    assert double(21) == 42  # second occurrence in the same cell: executes (new occurrence)
    assert calls["double(21)"] == 2
    runtime.top.reset()  # a new cell execution
    assert double(21) == 42
    assert double(21) == 42
    assert calls["double(21)"] == 2
    assert asyncio.run(fetch("q")) == {"url": "q", "n": 1}
    runtime.top.reset()
    assert asyncio.run(fetch("q")) == {"url": "q", "n": 1}
    assert calls["fetch(q)"] == 1


def test_shared_effects_are_one_cache_for_every_scope(store: Store) -> None:
    @dn.effect(shared=True)
    def embed(text: str) -> list[float]:
        calls[text] += 1
        return [float(len(text))]

    @dn.durable
    async def wf(ctx: dn.Context) -> list[float]:
        return embed("hello") + embed("hello")

    assert embed("hello") == [5.0]
    assert dn.run(wf) == [5.0, 5.0]
    runtime.set_top_scope("another-notebook")
    assert embed("hello") == [5.0]
    assert calls["hello"] == 1


def test_keyword_order_and_defaults_do_not_change_the_key() -> None:
    @dn.effect
    def f(a: int, b: int = 2) -> int:
        calls["f"] += 1
        return a + b

    assert f(1) == 3
    runtime.top.reset()
    assert f(1, 2) == 3
    runtime.top.reset()
    assert f(b=2, a=1) == 3
    assert calls["f"] == 1


def test_version_pins_and_code_edits_invalidate() -> None:
    def define(body: str, version: str | None) -> Any:
        src = f"def g(x):\n    calls['g'] += 1\n    return {body}\n"
        glb: dict[str, Any] = {"calls": calls}
        exec(compile(src, f"<g-{body}>", "exec"), glb)
        return dn.effect(name="edited", version=version)(glb["g"])

    g1 = define("x + 1", None)
    assert g1(1) == 2
    runtime.top.reset()
    g2 = define("x + 100", None)  # a real edit: a new code version, so it executes
    assert g2(1) == 101
    assert calls["g"] == 2
    runtime.top.reset()
    p1 = define("x + 1", "7")
    p1(5)
    runtime.top.reset()
    p2 = define("x + 2", "7")  # pinned: the edit does not invalidate
    assert p2(5) == 6
    assert calls["g"] == 3


def test_strict_replay_reports_divergence_side_by_side(store: Store) -> None:
    order = ["a", "b"]

    @dn.durable(strict=True)
    async def wf(ctx: dn.Context, fail: bool) -> None:
        for u in order:
            await fetch(u)
        if fail:
            raise RuntimeError("pause")

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="s")
    order.reverse()
    with pytest.raises(NonDeterminismError) as info:
        dn.run(wf, False, run_id="s")
    text = str(info.value)
    assert re.match(r"^run 's' diverged from its history at step 0 \(strict=True\):\n", text)
    assert re.search(r"^  identity +\S*test_engine\.fetch +\S*test_engine\.fetch$", text, re.M)
    assert re.search(r"^  arguments +\('a'\) +\(see the call\)$", text, re.M)
    assert calls == {"fetch(a)": 1, "fetch(b)": 1}


def test_errors_reraise_with_original_type_and_are_not_cached() -> None:
    class Boom(ValueError):
        pass

    @dn.effect
    def bad(x: int) -> int:
        calls["bad"] += 1
        raise Boom(f"bad {x}")

    for _ in range(2):
        runtime.top.reset()
        with pytest.raises(Boom, match=r"^bad 1$"):
            bad(1)
    assert calls["bad"] == 2


def test_cache_errors_replays_the_error(store: Store) -> None:
    @dn.effect(cache_errors=True)
    def bad(x: int) -> int:
        calls["bad"] += 1
        raise KeyError(x)

    for _ in range(2):
        runtime.top.reset()
        with pytest.raises(KeyError):
            bad(1)
    assert calls["bad"] == 1


def test_retry_with_backoff_on_the_fake_clock(clock: dn.FakeClock) -> None:
    @dn.effect(retry=dn.Retry(attempts=4, backoff=2.0, initial_delay=1.0, retry_on=OSError))
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise OSError("try again")
        return "ok"

    assert flaky() == "ok"
    assert calls["flaky"] == 3
    assert clock.slept == [1.0, 2.0]

    @dn.effect(retry=dn.Retry(attempts=2, retry_on=OSError))
    def wrong() -> None:
        calls["wrong"] += 1
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        wrong()
    assert calls["wrong"] == 1


def test_async_effect_timeout(store: Store) -> None:
    @dn.effect(timeout=0.01)
    async def slow() -> int:
        await asyncio.sleep(5)
        return 1

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return await slow()

    with pytest.raises(
        EffectTimeoutError, match=r"^effect .*slow did not finish within timeout=0\.01s"
    ):
        dn.run(wf)


def test_sync_effect_via_ctx_run_runs_in_a_worker_thread(store: Store) -> None:
    import threading

    def where(tag: str) -> str:
        calls[tag] += 1
        return threading.current_thread().name

    @dn.durable
    async def wf(ctx: dn.Context) -> tuple[str, str]:
        return await ctx.run(where, "t"), threading.current_thread().name

    worker, loop_thread = dn.run(wf)
    assert worker != loop_thread
    dn.run(wf, run_id=None)
    assert calls["t"] == 1


def test_ctx_now_random_uuid_replay(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> tuple[Any, ...]:
        vals = (ctx.now(), ctx.random(), ctx.uuid(), ctx.random())
        if fail:
            raise RuntimeError("x")
        return tuple(str(v) for v in vals)

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="h")
    recorded = {r.kind for r in runtime.store.load_effects("run/h")}
    assert recorded == {"now", "random", "uuid"}
    runtime.clock.advance(1000)  # type: ignore[attr-defined]
    a = dn.run(wf, False, run_id="h")
    assert a[1] != a[3]
    assert dn.run(wf, False, run_id="h") == a


def test_child_runs_are_recorded(store: Store) -> None:
    @dn.durable
    async def sub(ctx: dn.Context, n: int) -> int:
        return (await fetch("x" * n))["n"]

    @dn.durable
    async def parent(ctx: dn.Context) -> int:
        return await ctx.child(sub, 3) + await ctx.child(sub, 4, run_id="kid")

    assert dn.run(parent, run_id="p") == 7
    kid = runtime.store.get_run("kid")
    assert kid is not None and kid.parent_id == "p" and kid.status == "completed"
    assert dn.run(parent, run_id="p", restart=True) == 7
    assert calls["fetch(xxx)"] == 1  # the child run completed: its result is recorded


def test_run_works_inside_a_running_event_loop(store: Store) -> None:
    async def cell() -> int:
        # a notebook cell: the thread already runs a loop, asyncio.run would fail here
        return dn.run(pipeline, ["ab"])

    assert asyncio.run(cell()) == 4

    async def native() -> int:
        return await dn.start(pipeline, ["abc"]).wait()

    assert asyncio.run(native()) == 6


def test_job_result_on_its_own_loop_says_to_await(store: Store) -> None:
    async def main() -> None:
        job = dn.start(pipeline, ["a"])
        with pytest.raises(
            dn.errors.BlockingCallError, match=r"^job.result\(\) would block the event loop"
        ):
            job.result()
        assert await job == 2

    asyncio.run(main())


def test_custom_status(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        ctx.set_status({"stage": "one"})
        ctx.set_status({"stage": "two"})

    job = dn.start(wf, run_id="cs")
    job.result()
    assert job.custom_status() == {"stage": "two"}
    rec = runtime.store.get_run("cs")
    assert rec is not None and rec.status_version == 2


# ------------------------------------------------------------------ bad input


def test_bad_input_gets_clear_errors_and_changes_nothing(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, x: int) -> Any:
        return await ctx.run(5)  # type: ignore[arg-type]

    with pytest.raises(
        ArgumentTypeError, match=r"^ctx\.run expects a callable as fn, got 5 of type int;"
    ):
        dn.run(wf, 1, run_id="bad")
    with pytest.raises(ArgumentTypeError, match=r"missing a required argument: 'x'"):
        dn.start(wf)
    with pytest.raises(ArgumentTypeError, match=r"missing a required argument: 'x'"):
        double()  # type: ignore[call-arg]
    import socket

    sock = socket.socket()
    try:
        with pytest.raises(UnhashableInputError, match=r"argument 'x'"):
            double(sock)  # type: ignore[arg-type]
    finally:
        sock.close()
    assert calls == {}

    @dn.effect
    def gives_lock() -> Any:
        import threading

        return threading.Lock()

    with pytest.raises(UnstorableValueError):
        gives_lock()
    with pytest.raises(ArgumentTypeError, match=r"^@durable needs an async function"):
        dn.durable(lambda ctx: None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^run_id must be 1-200 printable characters, got ''"):
        dn.start(wf, 1, run_id="")
    with pytest.raises(ArgumentError, match=r"^attempts must be an int >= 1, got 0$"):
        dn.Retry(attempts=0)
    with pytest.raises(
        ArgumentError, match=r"^timeout must be a number of seconds > 0 or None, got -1$"
    ):
        dn.effect(timeout=-1)(lambda: 1)
    assert [r.run_id for r in runtime.store.list_runs()] == ["bad"]


def test_calling_a_workflow_inside_a_run_says_use_child(store: Store) -> None:
    @dn.durable
    async def inner(ctx: dn.Context) -> int:
        return 1

    @dn.durable
    async def outer(ctx: dn.Context) -> int:
        return inner()

    with pytest.raises(
        dn.errors.BlockingCallError,
        match=r"^calling workflow .*inner inside a run would block it; use `await ctx.child\(inner, \.\.\.\)`",
    ):
        dn.run(outer)


# ------------------------------------------------------------------ timers, signals, cancel


def test_durable_timer_waits_once_and_only_what_is_left(store: Store, clock: dn.FakeClock) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> str:
        await ctx.sleep(3600)
        if fail:
            raise RuntimeError("crash after the timer started")
        return "woke"

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="t")
    assert sum(clock.slept) == pytest.approx(3600)
    clock.slept.clear()
    assert dn.run(wf, False, run_id="t") == "woke"
    assert clock.slept == []  # the deadline had passed: fires at once


def test_timer_resumed_before_its_deadline_waits_the_rest(
    store: Store, clock: dn.FakeClock
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> None:
        await ctx.sleep(100)
        if fail:
            raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="t2")
    clock.now -= 40  # resume as if only 60 s had passed since the timer started
    clock.slept.clear()
    dn.run(wf, False, run_id="t2")
    assert sum(clock.slept) == pytest.approx(40)


def test_signals_are_fifo_and_delivered_once(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> list[Any]:
        return [await ctx.wait_signal("msg"), await ctx.wait_signal("msg")]

    job = dn.start(wf, run_id="q")
    job.signal("msg", {"n": 1})
    job.signal("msg", {"n": 2})
    job.signal("other", "ignored")
    assert job.result(timeout=30) == [{"n": 1}, {"n": 2}]
    assert dn.run(wf, run_id="q") == [{"n": 1}, {"n": 2}]  # replayed, nothing consumed again


def test_signal_sent_before_the_run_starts_is_delivered(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("go")

    # pre-delivery to a run that does not exist yet is an explicit opt-in
    dn.signal("early", "go", [1, 2], missing_ok=True)
    assert dn.run(wf, run_id="early") == [1, 2]
    # and to a run that exists but no process executes
    store.put_run(RunRecord("waits", wf.name, "waiting", 1.0, 1.0))
    dn.signal("waits", "go", [3])
    assert dn.run(wf, run_id="waits") == [3]


def test_signal_timeout_is_durable(store: Store, clock: dn.FakeClock) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("approve", timeout=60)

    with pytest.raises(
        dn.SignalTimeoutError,
        match=r"^no signal 'approve' reached run 'late' within timeout=60s; send it with "
        r"job\.signal\('approve', payload\)",
    ):
        dn.run(wf, run_id="late")
    assert dn.get_job("late").status() == "failed"


def test_cancel_runs_finally_blocks_and_ends_cancelled(store: Store) -> None:
    cleaned = []

    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        try:
            await ctx.wait_signal("never")
        finally:
            cleaned.append(True)

    job = dn.start(wf, run_id="c")
    wait_until(lambda: job.status() == "waiting", "the run waiting for its signal")
    job.cancel("no longer needed")
    with pytest.raises(dn.RunCancelledError, match=r"^run 'c' was cancelled \(no longer needed\)"):
        job.result(timeout=30)
    assert cleaned == [True]
    assert dn.get_job("c").status() == "cancelled"
    with pytest.raises(dn.RunCancelledError):
        dn.run(wf, run_id="c")


def test_cancel_of_a_run_no_process_executes(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> None:
        if fail:
            raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="idle")
    dn.cancel("idle", "stale")
    assert dn.get_job("idle").status() == "failed"  # a failed run is over: nothing to cancel
    store.put_run(RunRecord("asleep", "wf", "waiting", 1.0, 1.0))
    dn.cancel("asleep", "stale")
    assert dn.get_job("asleep").status() == "cancelled"


def test_effects_completing_together_share_one_write() -> None:
    from durable_nb.store import MemoryStore

    class Counting(MemoryStore):
        batches: list[int] = []

        def put_effects(self, records: Any) -> None:
            self.batches.append(len(records))
            super().put_effects(records)

    runtime._store = Counting()
    gate = asyncio.Event()

    @dn.effect
    async def waits(i: int) -> int:
        await gate.wait()
        return i

    @dn.durable
    async def wf(ctx: dn.Context) -> list[int]:
        tasks = [waits(i) for i in range(10)]
        asyncio.get_running_loop().call_later(0.01, gate.set)
        return list(await asyncio.gather(*tasks))

    assert dn.run(wf) == list(range(10))
    assert sum(Counting.batches) == 10
    assert len(Counting.batches) < 10


def test_rerun_on_a_truncated_history_executes_only_the_lost_steps(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> int:
        total = 0
        for i in range(10):
            total += double(i)
        if fail:
            raise RuntimeError("x")
        return total

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="tr")
    kept = [r for r in store.load_effects("run/tr") if r.seq < 5]
    store.delete_effects("run/tr")
    store.put_effects(kept)
    assert dn.run(wf, False, run_id="tr") == 90
    assert [calls[f"double({i})"] for i in range(10)] == [1] * 5 + [2] * 5


# -------------------------------------------- regressions found in review (each failed before its fix)


def test_a_signal_sent_while_the_run_starts_is_not_missed() -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> object:
        return await ctx.wait_signal("go", timeout=60)

    store = runtime.store
    orig = store.list_signals
    sent: list[int] = []

    def list_signals(run_id: str) -> list[SignalRecord]:
        out = orig(run_id)
        if not sent:  # another process sends right after the run read its signals
            sent.append(1)
            store.add_signal(SignalRecord(run_id, uuid.uuid4().hex, "go", "7", time.time()))
        return out

    store.list_signals = list_signals  # type: ignore[method-assign]
    assert dn.run(wf, run_id="R") == 7


def test_names_that_cannot_be_stored_are_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    runtime._store = DuckDBStore(path)
    with pytest.raises(ArgumentError, match=r"^name must be a non-empty str of at most 200"):
        dn.signal("r", "\ud800", 1)
    with pytest.raises(ArgumentError, match=r"^run_id must be 1-200 printable characters"):
        dn.signal("\udc00", "go", 1)
    runtime._store.close()
    DuckDBStore(path).close()  # the store still opens


def test_a_timed_signal_wait_keeps_its_own_deadline_after_resume(clock: dn.FakeClock) -> None:
    crash = {"on": True}

    @dn.durable
    async def wf(ctx: dn.Context) -> list[object]:
        a = await ctx.wait_signal("go", timeout=10)
        if crash["on"]:
            raise RuntimeError("crash after the first signal")
        b = await ctx.wait_signal("go", timeout=1000)
        return [a, b]

    dn.signal("r1", "go", 1, missing_ok=True)
    with pytest.raises(RuntimeError):
        dn.run(wf, run_id="r1")
    crash["on"] = False
    clock.advance(50)  # past the first wait's deadline, well within the second's
    dn.signal("r1", "go", 2)
    assert dn.run(wf, run_id="r1") == [1, 2]


def test_a_waiter_giving_up_does_not_cancel_the_result() -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        await asyncio.sleep(0.05)
        return 5

    async def body() -> None:
        job = dn.start(wf, run_id="R")
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(job.wait(), 0.01)
        assert await job.wait() == 5

    asyncio.run(body())


def test_rerunning_a_completed_run_with_new_arguments_does_not_return_a_stale_result() -> None:
    seen: list[str] = []

    @dn.effect
    def fetch(arg: str) -> str:
        seen.append(arg)
        return arg.upper()

    @dn.durable
    async def wf(ctx: dn.Context, arg: str) -> str:
        return fetch(arg)

    assert dn.run(wf, "a", run_id="same") == "A"
    assert dn.run(wf, "b", run_id="same") == "B"
    assert dn.run(wf, "a", run_id="same") == "A"  # replayed, not executed again
    assert seen == ["a", "b"]
    assert dn.run(wf, "a", run_id="same") == "A"
    assert seen == ["a", "b"]
