"""Workflow features at parity with durable-execution engines (issue 5), each run, replayed
(execution counts must not grow) and restarted in real processes (SIGKILL at an interesting
point, then resumed): fan-out/fan-in, race, timers, interrupts, queues, child runs,
continue-as-new, retries and timeouts, cancellation, custom status, per-run key/value state,
versioning, replay-aware logging, effects that start work.

Test names start with the feature (``test_all_*``, ``test_race_*``, ``test_timer_*``,
``test_interrupt_*``, ``test_queue_*``, ``test_start_child_*``, ``test_continue_as_new_*``,
``test_retry_*``, ``test_cancel_*``, ``test_status_*``, ``test_kv_*``, ``test_version_*``,
``test_log_*``, ``test_effects_start_*``); the ``*_survives_a_kill`` ones kill a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    EffectTimeoutError,
    UnstorableValueError,
    WorkflowVersionError,
)
from durable_nb.store import Store

from .helpers import spawn_python

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@dn.effect
async def fetch(tag: str) -> str:
    calls[tag] += 1
    await asyncio.sleep(0)
    return tag.upper()


@dn.effect
def work(tag: str) -> str:
    calls[tag] += 1
    return tag.upper()


def wait_for(pred: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def kinds(run_id: str) -> list[str]:
    return [r.kind for r in runtime.store.load_effects("run/" + run_id)]


# ------------------------------------------------------------------ fan-out / fan-in


@dn.durable
async def sub(ctx: dn.Context, n: int) -> int:
    return len(await fetch("sub" * n))


def test_all_over_effects_timers_signals_and_children_replays(
    store: Store, clock: dn.FakeClock
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> list[Any]:
        out = await ctx.all(
            [
                fetch("a"),
                ctx.run(work, "b"),
                ctx.sleep(60),
                ctx.wait_signal("go"),
                ctx.child(sub, 2),
            ]
        )
        if fail:
            raise RuntimeError("stop after the fan-in")
        return out

    job = dn.start(wf, True, run_id="fan")
    job.signal("go", {"ok": 1})
    with pytest.raises(RuntimeError, match=r"^stop after the fan-in$"):
        job.result(timeout=30)
    assert dict(calls) == {"a": 1, "b": 1, "subsub": 1}
    assert dn.run(wf, False, run_id="fan") == ["A", "B", None, {"ok": 1}, 6]
    assert dict(calls) == {"a": 1, "b": 1, "subsub": 1}  # replayed: nothing ran again
    assert sum(clock.slept) == pytest.approx(60)
    assert {"sleep", "signal", "child", "effect"} <= set(kinds("fan"))


def test_all_cancels_the_others_when_one_fails_and_they_are_told(store: Store) -> None:
    saw: list[str] = []
    started = threading.Event()

    def patient() -> str:
        started.set()
        for _ in range(3000):
            if dn.cancelled():
                saw.append("cancelled")
                return "gave up"
            time.sleep(0.001)
        return "done"

    @dn.effect
    async def broken() -> None:
        await asyncio.to_thread(started.wait, 10)
        raise ValueError("broken branch")

    @dn.durable
    async def wf(ctx: dn.Context) -> list[Any]:
        return await ctx.all([ctx.run(patient), broken()])

    with pytest.raises(ValueError, match=r"^broken branch$"):
        dn.run(wf, run_id="fail-fast")
    wait_for(lambda: saw == ["cancelled"], "the patient effect to see its cancellation")
    assert not [r for r in store.load_effects("run/fail-fast") if r.kind == "effect"]


def test_all_rejects_what_is_not_awaitable(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.all([fetch("x"), work])  # type: ignore[list-item]

    with pytest.raises(
        ArgumentTypeError, match=r"^ctx\.all expects awaitables .*got <effect .*work> at position 1"
    ):
        dn.run(wf, run_id="bad-all")
    assert calls == {}


# ------------------------------------------------------------------ race


def test_race_timer_beats_a_slow_effect_whose_thread_is_told(
    store: Store, clock: dn.FakeClock
) -> None:
    saw: list[str] = []
    started = threading.Event()

    def slow(tag: str) -> str:
        calls[tag] += 1
        started.set()
        for _ in range(5000):
            if dn.cancelled():
                saw.append("cancelled")
                return "late"
            time.sleep(0.001)
        return "finished"

    async def once_started(timer: Any) -> Any:
        # (the fake clock fires a timer at once: let the effect's thread start first)
        await asyncio.to_thread(started.wait, 30)
        return await timer

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> list[Any]:
        idx, value = await ctx.race(ctx.run(slow, "slow"), once_started(ctx.sleep(30)))
        if fail:
            raise RuntimeError("after the race")
        return [idx, value]

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="timeout")
    wait_for(lambda: saw == ["cancelled"], "the loser to see dn.cancelled()")
    assert dn.run(wf, False, run_id="timeout") == [1, None]
    assert calls == {"slow": 1}  # the loser is not started again on replay
    race = [r for r in store.load_effects("run/timeout") if r.kind == "race"]
    assert len(race) == 1 and json.loads(race[0].detail) == {"winner": 1, "of": 2}


def test_race_replay_keeps_the_recorded_winner_when_every_contender_is_done(
    store: Store,
) -> None:
    gate = asyncio.Event()

    @dn.effect
    async def slowpoke() -> str:
        calls["slowpoke"] += 1
        await gate.wait()
        return "slowpoke"

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> tuple[int, Any]:
        won = await ctx.race(slowpoke(), fetch("quick"))
        if fail:
            raise RuntimeError("x")
        return won

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="r")
    # as if the loser had finished too: a plain re-race would now pick it (index 0)
    gate.set()

    @dn.durable
    async def only_slowpoke(ctx: dn.Context) -> str:
        return await slowpoke()

    dn.run(only_slowpoke, run_id="helper")
    rec = store.load_effects("run/helper")[0]
    rec.scope = "run/r"
    store.put_effects([rec])
    assert dn.run(wf, False, run_id="r") == (1, "QUICK")
    assert calls == {"slowpoke": 2, "quick": 1}  # once in the race, once in the helper run


def test_race_winner_error_propagates_and_is_not_recorded(store: Store) -> None:
    @dn.effect
    async def bad() -> None:
        raise KeyError("bad")

    @dn.effect
    async def never() -> None:
        await asyncio.sleep(3600)

    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.race(never(), bad())

    with pytest.raises(KeyError):
        dn.run(wf, run_id="race-err")
    assert "race" not in kinds("race-err")
    with pytest.raises(ArgumentError, match=r"^ctx\.race needs at least one awaitable, got none$"):

        @dn.durable
        async def empty(ctx: dn.Context) -> Any:
            return await ctx.race()

        dn.run(empty, run_id="race-empty")


# ------------------------------------------------------------------ timers


def test_timer_long_wait_is_one_sleep_and_fires_at_once_when_overdue(
    store: Store, clock: dn.FakeClock
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> str:
        await ctx.sleep(30 * 86400)
        if fail:
            raise RuntimeError("after the timer")
        return "woke"

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="month")
    assert clock.slept == [30 * 86400.0]  # one wait: no polling while a timer waits
    clock.slept.clear()
    assert dn.run(wf, False, run_id="month") == "woke"
    assert clock.slept == []


# ------------------------------------------------------------------ signals: interrupt form


@dn.effect
async def step(run_id: str, i: int) -> int:
    calls[f"step{i}"] += 1
    await asyncio.sleep(0)
    if i == 2:  # the "stop" signal arrives while the block works
        dn.signal(run_id, "stop", {"by": "operator"})
    return i * 10


def test_interrupt_on_raises_with_the_payload_and_replays_at_the_same_point(
    store: Store,
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> list[Any]:
        done: list[int] = []
        try:
            async with ctx.interrupt_on("stop"):
                for i in range(10):
                    done.append(await step(ctx.run_id, i))
        except dn.Interrupted as e:
            out: list[Any] = [done, e.name, e.payload]
        if fail:
            raise RuntimeError("after the interrupt")
        return out

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="intr")
    first = dict(calls)
    assert first == {"step0": 1, "step1": 1, "step2": 1, "step3": 1}  # step3 was cut short
    assert dn.run(wf, False, run_id="intr") == [[0, 10, 20], "stop", {"by": "operator"}]
    assert dict(calls) == first  # replay raised where the first execution was interrupted
    assert kinds("intr").count("interrupt") == 1


def test_interrupt_signal_already_waiting_interrupts_at_once_and_is_consumed_once(
    store: Store,
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> list[Any]:
        out = []
        for _ in range(2):
            try:
                async with ctx.interrupt_on("stop"):
                    out.append(await fetch("inside"))
            except dn.Interrupted as e:
                out.append(e.payload)
        return out

    dn.signal("early", "stop", 7, missing_ok=True)
    assert dn.run(wf, run_id="early") == [7, "INSIDE"]
    assert calls == {"inside": 1}


def test_interrupt_cancels_effects_in_flight_they_see_cancelled(store: Store) -> None:
    saw: list[bool] = []
    started = threading.Event()

    def long_job() -> str:
        started.set()
        for _ in range(5000):
            if dn.cancelled():
                saw.append(True)
                return "stopped"
            time.sleep(0.001)
        return "done"

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        try:
            async with ctx.interrupt_on("stop"):
                await ctx.run(long_job)
        except dn.Interrupted:
            return "interrupted"
        return "ran"

    job = dn.start(wf, run_id="intr-thread")
    assert started.wait(30)
    job.signal("stop")
    assert job.result(timeout=30) == "interrupted"
    wait_for(lambda: saw == [True], "the effect thread to see dn.cancelled()")


# ------------------------------------------------------------------ event queues


def test_queue_messages_in_order_once_and_they_survive_continue_as_new(store: Store) -> None:
    @dn.durable
    async def consumer(ctx: dn.Context, seen: list[str]) -> list[str]:
        msg = await ctx.dequeue("jobs")
        seen = [*seen, await fetch(msg)]
        if msg == "stop":
            return seen
        ctx.continue_as_new(seen)

    for m in ["a", "b", "c", "stop", "extra"]:
        dn.enqueue("consumer", "jobs", m, missing_ok=True)
    assert dn.run(consumer, [], run_id="consumer") == ["A", "B", "C", "STOP"]
    assert dict(calls) == {"a": 1, "b": 1, "c": 1, "stop": 1}
    rec = store.get_run("consumer")
    assert rec is not None and rec.generation == 3
    assert kinds("consumer") == ["dequeue", "effect"]  # bounded: the last generation only
    # the unconsumed message stays for a later consumer
    consumed = {
        json.loads(r.detail)["signal_id"]
        for r in store.load_effects("run/consumer")
        if r.kind == "dequeue"
    }
    pending = [s for s in store.list_signals("consumer") if s.signal_id not in consumed]
    assert [json.loads(s.payload) for s in pending] == ["extra"]
    assert dn.run(consumer, [], run_id="consumer") == ["A", "B", "C", "STOP"]  # completed
    assert calls["stop"] == 1


def test_queue_enqueue_reaches_a_waiting_run_and_dequeue_times_out(
    store: Store, clock: dn.FakeClock
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> list[Any]:
        got = [await ctx.dequeue("inbox"), await ctx.dequeue("inbox")]
        try:
            await ctx.dequeue("inbox", timeout=5)
        except dn.SignalTimeoutError as e:
            got.append(str(e))
        return got

    job = dn.start(wf, run_id="mailbox")
    job.enqueue("inbox", {"n": 1})
    job.enqueue("inbox", [2])
    got = job.result(timeout=30)
    assert got[:2] == [{"n": 1}, [2]]
    assert re.match(
        r"^no message on queue 'inbox' reached run 'mailbox' within timeout=5s; send one "
        r"with job\.enqueue\('inbox', message\)",
        got[2],
    )
    with pytest.raises(ArgumentError, match=r"^queue must be a non-empty str"):
        dn.enqueue("mailbox", "", 1)
    with pytest.raises(ArgumentError, match=r"^signal name '__queue__:inbox' is reserved"):

        @dn.durable
        async def sneaky(ctx: dn.Context) -> Any:
            return await ctx.wait_signal("__queue__:inbox")

        dn.run(sneaky, run_id="sneaky")


# ------------------------------------------------------------------ child runs


def test_start_child_is_recorded_not_started_twice_and_has_its_parent(store: Store) -> None:
    @dn.durable
    async def parent(ctx: dn.Context, fail: bool) -> str:
        handle = await ctx.start_child(sub, 3)
        if fail:
            raise RuntimeError("parent failed after starting its child")
        return f"{handle.run_id} -> {await handle.wait()}"

    with pytest.raises(RuntimeError):
        dn.run(parent, True, run_id="p")
    child_id = json.loads(
        next(r for r in store.load_effects("run/p") if r.kind == "start_child").detail
    )["run_id"]
    dn.get_job(child_id)  # it exists
    wait_for(lambda: dn.get_job(child_id).status() == "completed", "the child to finish")
    assert dn.run(parent, False, run_id="p") == f"{child_id} -> 9"
    assert calls == {"subsubsub": 1}
    kids = store.list_runs(parent_id="p")
    assert [k.run_id for k in kids] == [child_id]


# ------------------------------------------------------------------ continue-as-new


def test_continue_as_new_keeps_kv_and_signals_and_returns_the_last_generation(
    store: Store,
) -> None:
    @dn.durable
    async def counter(ctx: dn.Context, n: int) -> dict[str, Any]:
        ctx.kv.set("count", ctx.kv.get("count", 0) + 1)
        await fetch(f"gen{n}")
        if n < 4:
            ctx.continue_as_new(n + 1)
        return {"n": n, "count": ctx.kv["count"], "note": await ctx.wait_signal("note")}

    dn.signal("loop", "note", "kept across generations", missing_ok=True)
    job = dn.start(counter, 0, run_id="loop")
    assert job.result(timeout=30) == {"n": 4, "count": 5, "note": "kept across generations"}
    assert dict(calls) == {f"gen{i}": 1 for i in range(5)}
    rec = store.get_run("loop")
    assert rec is not None and rec.generation == 4 and rec.status == "completed"
    assert job.kv() == {"count": 5}
    assert sorted(kinds("loop")) == sorted(["kv_base", "kv_set", "effect", "signal"])
    events = [e.kind for e in store.load_events("loop")]
    assert events.count("continued_as_new") == 4
    # a later execution (the process restarted) runs the last generation's arguments
    assert dn.run(counter, 0, run_id="loop") == {
        "n": 4,
        "count": 5,
        "note": "kept across generations",
    }
    assert calls["gen4"] == 1


def test_continue_as_new_arguments_must_fit_the_workflow(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, n: int) -> None:
        ctx.continue_as_new(n, 2, 3)

    with pytest.raises(ArgumentTypeError, match=r"too many positional arguments"):
        dn.run(wf, 1, run_id="bad-can")


# ------------------------------------------------------------------ retries and timeouts


def test_retry_each_attempt_is_in_the_trace_with_its_delay(
    store: Store, clock: dn.FakeClock
) -> None:
    @dn.effect(retry=dn.Retry(attempts=5, initial_delay=10, backoff=2, retry_on=OSError))
    async def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise OSError(f"try {calls['flaky']}")
        return "ok"

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        return await flaky()

    assert dn.run(wf, run_id="retry") == "ok"
    assert clock.slept == [10.0, 20.0]
    failed = [json.loads(e.data) for e in store.load_events("retry") if e.kind == "step_failed"]
    assert [(f["attempt"], f["retry_in"], f["error"]) for f in failed] == [
        (1, 10.0, "OSError('try 1')"),
        (2, 20.0, "OSError('try 2')"),
    ]
    assert "retry" in kinds("retry")
    assert dn.run(wf, run_id="retry") == "ok"
    assert calls["flaky"] == 3


def test_retry_total_timeout_gives_up_with_a_clear_error(store: Store, clock: dn.FakeClock) -> None:
    def always_down() -> None:
        calls["down"] += 1
        raise ConnectionError("down")

    policy = dn.Retry(attempts=10, initial_delay=10, backoff=2, total_timeout=35)

    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        await ctx.run(always_down, retry=policy)

    with pytest.raises(
        EffectTimeoutError,
        match=r"^effect .*always_down did not succeed within total_timeout=35s \(3 failed "
        r"attempts, the last with ConnectionError\('down'\)\); raise total_timeout",
    ):
        dn.run(wf, run_id="deadline")
    assert calls["down"] == 3  # at 0, 10 and 30 s; the next (at 70 s) would be too late
    assert clock.slept == [10.0, 20.0]
    with pytest.raises(
        ArgumentError, match=r"^total_timeout must be a number of seconds > 0 or None, got 0$"
    ):
        dn.Retry(total_timeout=0)


def test_retry_per_attempt_timeout_abandons_the_attempt_and_tells_it(store: Store) -> None:
    saw: list[bool] = []

    def stuck() -> str:
        calls["stuck"] += 1
        for _ in range(5000):
            if dn.cancelled():
                saw.append(True)
                break
            time.sleep(0.001)
        return "late"

    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.run(stuck, timeout=0.05, retry=dn.Retry(attempts=2, initial_delay=0))

    with pytest.raises(EffectTimeoutError, match=r"did not finish within timeout=0\.05s"):
        dn.run(wf, run_id="stuck")
    assert calls["stuck"] == 2
    wait_for(lambda: saw == [True, True], "both abandoned attempts to see dn.cancelled()")


# ------------------------------------------------------------------ cancellation


def test_cancel_stops_at_the_next_await_runs_finally_tells_effects_and_cancels_children(
    store: Store,
) -> None:
    saw: list[str] = []
    started = threading.Event()

    def long_job() -> str:
        started.set()
        for _ in range(10000):
            if dn.cancelled():
                saw.append("effect saw cancel")
                return "stopped"
            time.sleep(0.001)
        return "done"

    @dn.durable
    async def waiter(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("never")

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        await ctx.start_child(waiter, run_id="kid")
        try:
            await ctx.run(long_job)
        finally:
            saw.append("finally")
        return "finished"

    job = dn.start(wf, run_id="doomed")
    assert started.wait(30)
    job.cancel("operator said stop")
    with pytest.raises(dn.RunCancelledError, match=r"^run 'doomed' was cancelled \(operator"):
        job.result(timeout=30)
    wait_for(lambda: "effect saw cancel" in saw, "the effect to see the cancel")
    assert "finally" in saw
    wait_for(lambda: dn.get_job("kid").status() == "cancelled", "the child to be cancelled")
    assert dn.get_job("doomed").status() == "cancelled"


# ------------------------------------------------------------------ custom status


def test_status_wait_status_change_in_process_and_replay_does_not_publish_again(
    store: Store,
) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> str:
        ctx.set_status({"stage": "one"})
        await ctx.wait_signal("next")
        ctx.set_status({"stage": "two"})
        if fail:
            raise RuntimeError("x")
        return "done"

    async def main() -> list[Any]:
        job = dn.start(wf, True, run_id="st")
        seen = [await job.wait_status_change(0, timeout=30)]
        job.signal("next")
        seen.append(await job.wait_status_change(1, timeout=30))
        with pytest.raises(RuntimeError):
            await job.wait()
        return seen

    assert asyncio.run(main()) == [(1, {"stage": "one"}), (2, {"stage": "two"})]
    assert dn.run(wf, False, run_id="st") == "done"
    rec = store.get_run("st")
    assert rec is not None and rec.status_version == 2  # replayed calls did not publish

    async def after_end() -> None:
        with pytest.raises(
            dn.errors.RunEndedError,
            match=r"^run 'st' ended \(completed\) at status version 2 without a status newer than 2; "
            r"read its last status with job\.custom_status\(\)$",
        ):
            await dn.get_job("st").wait_status_change(2, timeout=30)

    asyncio.run(after_end())


def test_status_wait_status_change_times_out(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        await ctx.wait_signal("never")

    async def main() -> None:
        job = dn.start(wf, run_id="quiet")
        with pytest.raises(TimeoutError, match=r"^run 'quiet' published no status newer"):
            await job.wait_status_change(timeout=0.05)
        job.cancel()

    asyncio.run(main())


# ------------------------------------------------------------------ per-run key/value state


def test_kv_set_get_delete_items_replay_exactly_and_read_from_outside(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> dict[str, Any]:
        ctx.kv.set("visits", ctx.kv.get("visits", 0) + 1)
        ctx.kv["user"] = {"name": "ada"}
        ctx.kv.set("tmp", 1)
        assert ctx.kv.delete("tmp") and not ctx.kv.delete("tmp")
        await ctx.wait_signal("go")
        ctx.kv.set("visits", ctx.kv["visits"] + 1)
        if fail:
            raise RuntimeError("x")
        return dict(ctx.kv.items())

    job = dn.start(wf, True, run_id="kv")
    wait_for(lambda: job.status() == "waiting", "the run to wait")
    assert job.kv() == {"user": {"name": "ada"}, "visits": 1}  # while it runs
    with pytest.raises(TypeError):
        job.kv()["visits"] = 5  # type: ignore[index]  # a read-only snapshot
    job.signal("go")
    with pytest.raises(RuntimeError):
        job.result(timeout=30)
    assert dn.get_job("kv").kv() == {"user": {"name": "ada"}, "visits": 2}
    # the replay sees the values as they were at each point, not the latest ones
    assert dn.run(wf, False, run_id="kv") == {"visits": 2, "user": {"name": "ada"}}
    assert dn.get_job("kv").kv() == {"user": {"name": "ada"}, "visits": 2}


def test_kv_limits_have_clear_errors(store: Store) -> None:
    errors: list[str] = []

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        for bad in [
            lambda: ctx.kv.set("k" * 201, 1),
            lambda: ctx.kv.set("big", "x" * 70_000),
            lambda: ctx.kv.set("obj", object()),
            lambda: ctx.kv.set(5, 1),  # type: ignore[arg-type]
        ]:
            try:
                bad()
            except dn.DurableError as e:
                errors.append(f"{type(e).__name__}: {e}")
        for i in range(1000):
            ctx.kv.set(f"k{i}", i)
        try:
            ctx.kv.set("one-more", 1)
        except ArgumentError as e:
            errors.append(str(e))
        ctx.kv.set("k0", "replacing a key is fine")
        return len(ctx.kv)

    assert dn.run(wf, run_id="kvlim") == 1000
    assert re.match(r"^ArgumentError: kv key must be 1-200 characters, got 'k{201}'", errors[0])
    assert errors[1] == (
        "ArgumentError: kv value for key 'big' is 70002 bytes as JSON, over the limit of 65536 "
        "bytes (64 KiB); keep large data as an effect's result and store a reference to it in kv"
    )
    assert errors[2].startswith(
        f"{UnstorableValueError.__name__}: kv value for key 'obj' must be JSON data"
    )
    assert errors[3] == "ArgumentTypeError: kv keys are str, got 5 of type int"
    assert errors[4] == (
        "run 'kvlim' already holds 1000 kv keys, the limit; delete keys it no longer needs "
        "before setting 'one-more'"
    )


# ------------------------------------------------------------------ versioning


def test_version_runs_finish_on_their_version_and_new_runs_take_the_newest(
    store: Store,
) -> None:
    @dn.durable(name="order", version="1")
    async def order_v1(ctx: dn.Context, fail: bool) -> str:
        a = await fetch("v1-step")
        if fail:
            raise RuntimeError("crash on v1")
        return "v1:" + a

    with pytest.raises(RuntimeError):
        dn.run(order_v1, True, run_id="o1")

    @dn.durable(name="order", version="2")
    async def order_v2(ctx: dn.Context, fail: bool) -> str:
        return "v2:" + await fetch("v2-step")

    @dn.durable(name="order", version="10")
    async def order_v10(ctx: dn.Context, fail: bool) -> str:
        return "v10:" + await fetch("v10-step")

    assert dn.run(order_v10, False, run_id="o1") == "v1:V1-STEP"  # its own version
    assert dn.run(order_v1, False, run_id="o2") == "v10:V10-STEP"  # the newest ("10" > "2")
    assert calls == {"v1-step": 1, "v10-step": 1}
    rec = store.get_run("o1")
    assert rec is not None and rec.version == "1"
    rec2 = store.get_run("o2")
    assert rec2 is not None and rec2.version == "10"


def test_version_gone_is_a_clear_error(store: Store) -> None:
    @dn.durable(name="gone", version="1")
    async def v1(ctx: dn.Context) -> None:
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        dn.run(v1, run_id="g1")
    from durable_nb.engine import _workflow

    del _workflow._versions["gone"]["1"]  # as in a new process that defines only version 2

    @dn.durable(name="gone", version="2")
    async def v2(ctx: dn.Context) -> None:
        return None

    with pytest.raises(
        WorkflowVersionError,
        match=r"^run 'g1' started on version '1' of workflow 'gone', which is not defined in "
        r"this process \(defined versions: '2'\); define it again with "
        r"@durable\(name='gone', version='1'\)",
    ):
        dn.run(v2, run_id="g1")


# ------------------------------------------------------------------ replay-aware logging


def test_log_writes_once_not_again_on_replay(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    @dn.durable(name="logged")
    async def wf(ctx: dn.Context, fail: bool) -> str:
        ctx.log.info("starting %s", "job")
        await fetch("l1")
        ctx.log.warning("after l1")
        if fail:
            raise RuntimeError("x")
        ctx.log.error("finished")
        return "ok"

    caplog.set_level(logging.DEBUG, logger="durable_nb.run.logged")
    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="log")
    assert dn.run(wf, False, run_id="log") == "ok"
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("durable_nb.run.logged", "INFO", "starting job"),
        ("durable_nb.run.logged", "WARNING", "after l1"),
        ("durable_nb.run.logged", "ERROR", "finished"),
    ]
    assert all(getattr(r, "run_id", None) == "log" for r in caplog.records)
    assert kinds("log").count("log") == 3


# ------------------------------------------------------------------ effects that start work


@dn.durable
async def target(ctx: dn.Context, tag: str) -> str:
    return await fetch("target-" + tag)


@dn.durable
async def listener(ctx: dn.Context) -> Any:
    return await ctx.wait_signal("hello")


def test_effects_start_runs_and_send_signals_once(store: Store) -> None:
    def spawn_in_thread(tag: str) -> str:
        calls["spawn-thread"] += 1
        dn.signal("listener", "hello", tag)
        return dn.start(target, tag, run_id="t-" + tag).run_id

    @dn.effect
    async def spawn_async(tag: str) -> str:
        calls["spawn-async"] += 1
        return dn.start(target, tag, run_id="t-" + tag).run_id

    @dn.durable
    async def starter(ctx: dn.Context, fail: bool) -> list[str]:
        ids = [await ctx.run(spawn_in_thread, "thread"), await spawn_async("async")]
        if fail:
            raise RuntimeError("x")
        return [str(dn.get_job(i).result(timeout=30)) for i in ids]

    lis = dn.start(listener, run_id="listener")
    with pytest.raises(RuntimeError):
        dn.run(starter, True, run_id="starter")
    assert lis.result(timeout=30) == "thread"
    for rid in ("t-thread", "t-async"):
        wait_for(lambda rid=rid: dn.get_job(rid).status() == "completed", rid)
    assert dn.run(starter, False, run_id="starter") == ["TARGET-THREAD", "TARGET-ASYNC"]
    assert dict(calls) == {
        "spawn-thread": 1,
        "spawn-async": 1,
        "target-thread": 1,
        "target-async": 1,
    }
    assert len(store.list_signals("listener")) == 1


def test_effects_start_a_run_and_wait_for_it_from_a_worker_thread(store: Store) -> None:
    def run_target(tag: str) -> str:
        calls["run-target"] += 1
        return dn.run(target, tag, run_id="blocking-" + tag)  # blocks this thread only

    @dn.durable
    async def wf(ctx: dn.Context, fail: bool) -> str:
        out = str(await ctx.run(run_target, "z"))
        if fail:
            raise RuntimeError("x")
        return out

    with pytest.raises(RuntimeError):
        dn.run(wf, True, run_id="blocks")
    assert dn.run(wf, False, run_id="blocks") == "TARGET-Z"
    assert dict(calls) == {"run-target": 1, "target-z": 1}

    @dn.effect
    async def run_target_on_the_loop() -> str:
        return dn.run(target, "w")

    @dn.durable
    async def wrong(ctx: dn.Context) -> str:
        return await run_target_on_the_loop()

    with pytest.raises(
        dn.errors.BlockingCallError, match=r"^dn\.run\(\) inside a run would block it"
    ):
        dn.run(wrong, run_id="wrong")


# ------------------------------------------------------------------ strict replay


def test_strict_replay_accepts_every_new_step_kind(store: Store, clock: dn.FakeClock) -> None:
    attempts: Counter[str] = Counter()
    crash = [True]  # (a later generation runs on its own stored arguments, not the caller's)

    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise OSError("once")
        return "ok"

    @dn.durable(strict=True)
    async def wf(ctx: dn.Context, n: int) -> list[Any]:
        if n == 0:
            ctx.kv.set("k", 1)
            ctx.continue_as_new(1)
        out = [await ctx.run(flaky, retry=dn.Retry(attempts=2, initial_delay=1))]
        out.append(await ctx.race(fetch("r"), ctx.sleep(5)))
        out.append(await ctx.all([fetch("a"), ctx.sleep(1)]))
        ctx.kv.set("k", ctx.kv["k"] + 1)
        ctx.set_status("half")
        ctx.log.info("half way")
        try:
            async with ctx.interrupt_on("stop"):
                out.append(await ctx.dequeue("q"))
        except dn.Interrupted as e:
            out.append(e.payload)
        if crash[0]:
            raise RuntimeError("x")
        return [*out, dict(ctx.kv)]

    dn.enqueue("strict", "q", "m", missing_ok=True)
    with pytest.raises(RuntimeError):
        dn.run(wf, 0, run_id="strict")
    crash[0] = False
    assert dn.run(wf, 0, run_id="strict") == ["ok", (0, "R"), ["A", None], "m", {"k": 2}]
    assert attempts["flaky"] == 2 and calls == {"r": 1, "a": 1}


# ------------------------------------------------------------------ inside a %%durable cell


def test_features_inside_a_durable_cell() -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext durable_nb", store_history=False)
    try:
        dn.enqueue("cell", "jobs", "msg", missing_ok=True)
        cell = textwrap.dedent(
            """\
            %%durable cell
            import durable_nb as dn
            pair = await ctx.all([ctx.sleep(1), ctx.dequeue("jobs")])
            won = await ctx.race(ctx.sleep(5), ctx.wait_signal("never"))
            ctx.kv.set("stage", "done")
            ctx.log.info("cell ran")
            try:
                async with ctx.interrupt_on("stop"):
                    await ctx.sleep(10)
            except dn.Interrupted:
                pass
            [pair, won, dict(ctx.kv)]
            """
        )
        res = shell.run_cell(cell)
        assert res.error_in_exec is None and res.error_before_exec is None
        assert res.result == [[None, "msg"], (0, None), {"stage": "done"}]
        assert dn.get_job("cell").kv() == {"stage": "done"}
    finally:
        shell.run_cell("%unload_ext durable_nb", store_history=False)


# ================================================================== restarts of real processes
#
# One worker script holds a scenario per feature. ``point(label)`` SIGKILLs the process when
# ``KILL_AT`` names that label; every effect appends ``exec <tag>`` to a log file, so a test
# can check that nothing the workflow saw complete ever ran twice.

WORKER = r"""
import asyncio, json, logging, os, signal, sys, time
import durable_nb as dn
from durable_nb.engine import runtime

LOG = os.environ["EXEC_LOG"]
KILL = os.environ.get("KILL_AT", "")
if os.environ.get("CLOCK_AHEAD"):
    dn.set_clock(dn.FakeClock(start=time.time() + float(os.environ["CLOCK_AHEAD"])))
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(levelname)s %(message)s")


def note(line):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\n").encode())
    os.close(fd)


def point(label):
    if KILL == label:
        os.kill(os.getpid(), signal.SIGKILL)


def executed(prefix):
    try:
        with open(LOG) as f:
            return sum(1 for line in f if line.startswith("exec " + prefix))
    except FileNotFoundError:
        return 0


@dn.effect
def work(tag):
    note("exec " + tag)
    return tag.upper()


@dn.durable
async def timer(ctx):
    a = await ctx.run(work, "before")
    await ctx.sleep(3600)
    return [a, await ctx.run(work, "after")]


@dn.effect(retry=dn.Retry(attempts=3, initial_delay=600, max_delay=600, backoff=1, retry_on=OSError))
def flaky():
    n = executed("flaky") + 1
    note(f"exec flaky {n}")
    if n < 3:
        raise OSError(f"attempt {n}")
    return "ok"


@dn.durable
async def retry(ctx):
    return await ctx.run(flaky)


@dn.effect(retry=dn.Retry(attempts=3, initial_delay=600, max_delay=600, backoff=1, retry_on=OSError))
async def flaky_stream():
    n = executed("fstream") + 1
    note(f"exec fstream {n}")
    yield "a"
    if n < 3:
        raise OSError(f"attempt {n}")
    yield "b"


@dn.durable
async def stream_retry(ctx):
    return await flaky_stream()


@dn.durable
async def queue(ctx):
    got = []
    while len(got) < 3:
        got.append(await ctx.run(work, await ctx.dequeue("jobs")))
        point(f"got{len(got)}")
    return got


@dn.durable
async def forever(ctx, n, total):
    point(f"start{n}")
    value = await ctx.run(work, f"gen{n}")
    ctx.kv.set("last", value)
    point(f"gen{n}")
    if n == 4:
        return {"total": total + n, "kv": dict(ctx.kv)}
    ctx.continue_as_new(n + 1, total + n)


@dn.effect
async def slow_one():
    note("exec slow")
    await asyncio.sleep(3600)
    return "slow"


@dn.durable
async def race(ctx):
    idx, value = await ctx.race(slow_one(), ctx.run(work, "fast"))
    point("raced")
    return [idx, value]


@dn.durable
async def interrupt(ctx):
    done = []
    try:
        async with ctx.interrupt_on("stop"):
            for i in range(3):
                done.append(await ctx.run(work, f"i{i}"))
            await ctx.wait_signal("never")
    except dn.Interrupted as e:
        point("interrupted")
        return [done, e.payload]
    return "not interrupted"


@dn.durable
async def status(ctx):
    ctx.kv.set("stage", "one")
    ctx.set_status({"stage": 1})
    await ctx.wait_signal("next")
    ctx.kv.set("stage", "two")
    ctx.set_status({"stage": 2})
    await ctx.wait_signal("next")
    return dict(ctx.kv)


@dn.effect
def gated_work(tag):
    # waits for the test's go-ahead file (GATE), so a kill that comes first finds it not yet
    # begun: an effect killed mid-flight, before its record, would rightly run again
    gate = os.environ.get("GATE")
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
    note("exec " + tag)
    return tag.upper()


@dn.durable
async def kid(ctx, n):
    return await ctx.run(gated_work, f"kid{n}")


@dn.durable
async def parent(ctx):
    handle = await ctx.start_child(kid, 1, run_id="kid1")
    point("started")
    return await handle.wait()


VERSIONS = os.environ.get("VERSIONS", "").split(",")
if "1" in VERSIONS:

    @dn.durable(name="order", version="1")
    async def order_v1(ctx):
        a = await ctx.run(work, "v1")
        point("v1")
        return "v1:" + a

    order = order_v1
if "2" in VERSIONS:

    @dn.durable(name="order", version="2")
    async def order_v2(ctx):
        return "v2:" + await ctx.run(work, "v2")

    order = order_v2


@dn.durable(name="logged")
async def logged(ctx):
    ctx.log.info("starting %s", "job")
    await ctx.run(work, "l1")
    point("logged")
    ctx.log.warning("finished")
    return "ok"


@dn.durable
async def fan(ctx):
    first = await ctx.all([ctx.run(work, f"f{i}") for i in range(4)])
    point("fanned")
    second = await ctx.all([*(ctx.run(work, f"g{i}") for i in range(4)), ctx.sleep(0.1)])
    return first + second[:4]


@dn.durable
async def kid_waits(ctx):
    return await ctx.wait_signal("never")


@dn.durable
async def doomed(ctx):
    await ctx.start_child(kid_waits, run_id="kid-waits")
    try:
        await ctx.wait_signal("never")
    finally:
        note("finally ran")


@dn.durable
async def target(ctx, tag):
    await ctx.wait_signal("go")
    return await ctx.run(work, "target-" + tag)


@dn.effect
def spawn_in_thread(tag):
    note("exec spawn-" + tag)
    return dn.start(target, tag, run_id="t-" + tag).run_id


@dn.effect
async def spawn_async(tag):
    note("exec spawn-" + tag)
    return dn.start(target, tag, run_id="t-" + tag).run_id


@dn.durable
async def spawner(ctx):
    ids = [await ctx.run(spawn_in_thread, "x"), await spawn_async("y")]
    point("spawned")
    return ids


SCENARIOS = {
    "timer": (timer, ()), "retry": (retry, ()), "stream_retry": (stream_retry, ()),
    "queue": (queue, ()),
    "forever": (forever, (0, 0)), "race": (race, ()), "interrupt": (interrupt, ()),
    "status": (status, ()), "parent": (parent, ()), "logged": (logged, ()), "fan": (fan, ()),
    "doomed": (doomed, ()), "spawner": (spawner, ()),
    "target-x": (target, ("x",)), "target-y": (target, ("y",)),
}
name = sys.argv[1]
wf, args = (order, ()) if name == "order" else SCENARIOS[name]
try:
    result = dn.run(wf, *args, run_id=os.environ.get("RUN_ID", name))
except Exception as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
print("RESULT " + json.dumps(result), flush=True)
print("SLEPT " + json.dumps(getattr(runtime.clock, "slept", [])), flush=True)
"""


def _worker(tmp: Path, scenario: str, **env: str) -> subprocess.Popen[str]:
    script = tmp / "worker.py"
    if not script.exists():
        script.write_text(WORKER)
    return spawn_python(
        str(script),
        scenario,
        env={"DURABLE_NB_STORE": str(tmp / "s.duckdb"), "EXEC_LOG": str(tmp / "exec.log"), **env},
        cwd=tmp,
    )


def _killed_at(tmp: Path, scenario: str, label: str, **env: str) -> None:
    p = _worker(tmp, scenario, KILL_AT=label, **env)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, f"not killed at {label!r}: {err}"


def _finish(tmp: Path, scenario: str, **env: str) -> tuple[Any, str]:
    p = _worker(tmp, scenario, **env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), out


def _kill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.communicate(timeout=60)


def _log(tmp: Path) -> list[str]:
    path = tmp / "exec.log"
    return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def _here(tmp: Path) -> Iterator[Store]:
    """This process on the workers' DuckDB file, closed afterwards so they can open it."""
    from durable_nb.store._duckdb import DuckDBStore

    store = DuckDBStore(tmp / "s.duckdb", lock_timeout=30)
    old, runtime._store = runtime._store, store
    try:
        yield store
    finally:
        runtime._store = old
        store.close()


def _wait_status(tmp: Path, run_id: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _here(tmp) as store:
            rec = store.get_run(run_id)
        if rec is not None and rec.status == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"run {run_id!r} never reached status {status!r}")


def test_timer_survives_a_kill_while_waiting_and_fires_at_once_when_overdue(
    tmp_path: Path,
) -> None:
    p = _worker(tmp_path, "timer")
    _wait_status(tmp_path, "timer", "waiting")
    _kill(p)
    result, out = _finish(tmp_path, "timer", CLOCK_AHEAD="3601")
    assert result == ["BEFORE", "AFTER"]
    assert "SLEPT []" in out  # overdue: no wait at all
    assert _log(tmp_path) == ["exec before", "exec after"]


def test_retry_schedule_survives_a_kill_between_attempts(tmp_path: Path) -> None:
    p = _worker(tmp_path, "retry")
    _wait_status(tmp_path, "retry", "waiting")  # attempt 1 failed; 600 s until attempt 2
    _kill(p)
    assert _log(tmp_path) == ["exec flaky 1"]
    result, out = _finish(tmp_path, "retry", CLOCK_AHEAD="300")
    assert result == "ok"
    slept = json.loads(next(x for x in out.splitlines() if x.startswith("SLEPT "))[6:])
    # only what was left of the first delay, then the second delay in full
    assert len(slept) == 2 and 280 < slept[0] <= 300 and slept[1] == pytest.approx(600)
    assert _log(tmp_path) == ["exec flaky 1", "exec flaky 2", "exec flaky 3"]
    with _here(tmp_path) as store:
        failed = [json.loads(e.data) for e in store.load_events("retry") if e.kind == "step_failed"]
    assert [(f["attempt"], f["retry_in"]) for f in failed] == [(1, 600.0), (2, 600.0)]


def test_streaming_retry_schedule_survives_a_kill_between_attempts(tmp_path: Path) -> None:
    p = _worker(tmp_path, "stream_retry")
    _wait_status(tmp_path, "stream_retry", "waiting")  # attempt 1 failed; 600 s until the next
    _kill(p)
    assert _log(tmp_path) == ["exec fstream 1"]
    result, out = _finish(tmp_path, "stream_retry", CLOCK_AHEAD="300")
    assert result == "ab"  # the chunk received before the failure is kept, not repeated
    slept = json.loads(next(x for x in out.splitlines() if x.startswith("SLEPT "))[6:])
    # only what was left of the first delay, then the second delay in full
    assert len(slept) == 2 and 280 < slept[0] <= 300 and slept[1] == pytest.approx(600)
    assert _log(tmp_path) == ["exec fstream 1", "exec fstream 2", "exec fstream 3"]


def test_queue_survives_a_kill_while_waiting_for_messages(tmp_path: Path) -> None:
    with _here(tmp_path):
        dn.enqueue("queue", "jobs", "a", missing_ok=True)
    p = _worker(tmp_path, "queue")
    _wait_status(tmp_path, "queue", "waiting")  # "a" done, waiting for the next message
    _kill(p)
    with _here(tmp_path):  # sent while no process runs the workflow
        dn.enqueue("queue", "jobs", "b")
        dn.enqueue("queue", "jobs", "c")
    result, _ = _finish(tmp_path, "queue")
    assert result == ["A", "B", "C"]
    assert _log(tmp_path) == ["exec a", "exec b", "exec c"]


def test_continue_as_new_survives_kills_mid_generation_and_right_after_the_reset(
    tmp_path: Path,
) -> None:
    _killed_at(tmp_path, "forever", "gen2")  # generation 2 did its work, then died
    _killed_at(tmp_path, "forever", "start3")  # generation 3 just began (history reset)
    with _here(tmp_path) as store:
        rec = store.get_run("forever")
        assert rec is not None and rec.generation == 3
        # the new generation's history: only where its key/value state starts
        assert [r.kind for r in store.load_effects("run/forever")] == ["kv_base"]
    result, _ = _finish(tmp_path, "forever")
    assert result == {"total": 10, "kv": {"last": "GEN4"}}
    assert _log(tmp_path) == [f"exec gen{i}" for i in range(5)]


def test_race_survives_a_kill_after_the_winner_is_recorded(tmp_path: Path) -> None:
    _killed_at(tmp_path, "race", "raced")
    assert dn.run is not None and sorted(_log(tmp_path)) == ["exec fast", "exec slow"]
    result, _ = _finish(tmp_path, "race")
    assert result == [1, "FAST"]
    assert sorted(_log(tmp_path)) == ["exec fast", "exec slow"]  # the loser did not start again


def test_interrupt_survives_a_kill_and_replays_the_interrupt(tmp_path: Path) -> None:
    p = _worker(tmp_path, "interrupt", KILL_AT="interrupted")
    _wait_status(tmp_path, "interrupt", "waiting")
    with _here(tmp_path):
        dn.signal("interrupt", "stop", {"reason": "enough"})  # from another process
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL  # killed right after the block was interrupted
    result, _ = _finish(tmp_path, "interrupt")
    assert result == [["I0", "I1", "I2"], {"reason": "enough"}]
    assert _log(tmp_path) == ["exec i0", "exec i1", "exec i2"]


def test_status_and_kv_are_read_from_another_process_and_survive_a_kill(
    tmp_path: Path,
) -> None:
    p = _worker(tmp_path, "status")

    async def watch() -> list[Any]:
        job = dn.get_job("status")
        first = await job.wait_status_change(0, timeout=60)
        kv1 = dict(job.kv())
        dn.signal("status", "next")
        second = await job.wait_status_change(first[0], timeout=60)
        return [first, kv1, second, dict(job.kv())]

    _wait_status(tmp_path, "status", "waiting")
    with _here(tmp_path):
        seen = asyncio.run(watch())
    assert seen == [(1, {"stage": 1}), {"stage": "one"}, (2, {"stage": 2}), {"stage": "two"}]
    _wait_status(tmp_path, "status", "waiting")
    _kill(p)
    with _here(tmp_path):
        dn.signal("status", "next")
    result, _ = _finish(tmp_path, "status")
    assert result == {"stage": "two"}
    with _here(tmp_path) as store:
        rec = store.get_run("status")
        assert rec is not None and rec.status_version == 2  # the replay published nothing


def test_start_child_survives_a_kill_and_the_child_is_not_started_twice(
    tmp_path: Path,
) -> None:
    # the child starts in the parent's process; its effect waits for the go-ahead, which
    # comes only after the kill, so the resumed process is the one that executes it
    gate = tmp_path / "go"
    _killed_at(tmp_path, "parent", "started", GATE=str(gate))
    assert _log(tmp_path) == []
    gate.touch()
    result, _ = _finish(tmp_path, "parent", GATE=str(gate))
    assert result == "KID1"
    assert _log(tmp_path) == ["exec kid1"]
    with _here(tmp_path) as store:
        kid = store.get_run("kid1")
        assert kid is not None and kid.parent_id == "parent" and kid.status == "completed"
        starts = [r for r in store.load_effects("run/parent") if r.kind == "start_child"]
        assert len(starts) == 1


def test_version_a_run_finishes_on_its_version_after_a_restart(tmp_path: Path) -> None:
    _killed_at(tmp_path, "order", "v1", VERSIONS="1", RUN_ID="o1")
    _killed_at(tmp_path, "order", "v1", VERSIONS="1", RUN_ID="o3")
    result, _ = _finish(tmp_path, "order", VERSIONS="1,2", RUN_ID="o1")
    assert result == "v1:V1"  # started on version 1, finished on it
    result, _ = _finish(tmp_path, "order", VERSIONS="1,2", RUN_ID="o2")
    assert result == "v2:V2"  # a new run takes the newest
    p = _worker(tmp_path, "order", VERSIONS="2", RUN_ID="o3")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 3
    assert re.search(
        r"^ERROR WorkflowVersionError: run 'o3' started on version '1' of workflow 'order', which "
        r"is not defined in this process \(defined versions: '2'\)",
        out,
        re.M,
    ), out
    assert _log(tmp_path) == ["exec v1", "exec v1", "exec v2"]  # o1 and o3 each once


def test_log_survives_a_kill_without_repeating_lines(tmp_path: Path) -> None:
    p = _worker(tmp_path, "logged", KILL_AT="logged")
    out1, _ = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    _, out2 = _finish(tmp_path, "logged")
    logs = [x for x in (out1 + out2).splitlines() if x.startswith("LOG ")]
    assert logs == ["LOG INFO starting job", "LOG WARNING finished"]
    assert _log(tmp_path) == ["exec l1"]


def test_all_survives_a_kill_between_two_fan_outs(tmp_path: Path) -> None:
    _killed_at(tmp_path, "fan", "fanned")
    result, _ = _finish(tmp_path, "fan")
    assert result == ["F0", "F1", "F2", "F3", "G0", "G1", "G2", "G3"]
    assert sorted(_log(tmp_path)) == sorted(
        [f"exec f{i}" for i in range(4)] + [f"exec g{i}" for i in range(4)]
    )


def test_cancel_from_another_process_runs_finally_and_cancels_the_child(
    tmp_path: Path,
) -> None:
    p = _worker(tmp_path, "doomed")
    _wait_status(tmp_path, "kid-waits", "waiting")
    _wait_status(tmp_path, "doomed", "waiting")
    with _here(tmp_path):
        dn.cancel("doomed", "from the CLI")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, out + err
    assert "ERROR RunCancelledError: run 'doomed' was cancelled (from the CLI)" in out
    assert _log(tmp_path) == ["finally ran"]
    with _here(tmp_path) as store:
        statuses = {r: store.get_run(r).status for r in ("doomed", "kid-waits")}  # type: ignore[union-attr]
    assert statuses == {"doomed": "cancelled", "kid-waits": "cancelled"}


def test_effects_start_runs_that_survive_a_kill_and_are_not_started_twice(
    tmp_path: Path,
) -> None:
    _killed_at(tmp_path, "spawner", "spawned")
    result, _ = _finish(tmp_path, "spawner")
    assert result == ["t-x", "t-y"]
    with _here(tmp_path):  # the started runs wait for this before they work
        dn.signal("t-x", "go", missing_ok=True)
        dn.signal("t-y", "go", missing_ok=True)
    _finish(tmp_path, "target-x", RUN_ID="t-x")  # finish what the killed process left
    _finish(tmp_path, "target-y", RUN_ID="t-y")
    log = _log(tmp_path)
    assert sorted(log) == ["exec spawn-x", "exec spawn-y", "exec target-x", "exec target-y"]
