"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import ArgumentError
from durable_nb.store import SignalRecord
from durable_nb.store._duckdb import DuckDBStore

from .helpers import ROOT

CHILD = textwrap.dedent(
    """
    import sys, time
    from durable_nb.store._duckdb import DuckDBStore
    from durable_nb.store import EffectRecord
    from durable_nb._codecs import Payload
    s = DuckDBStore(sys.argv[1], merge_interval=3600, idle_close=0.05)
    lease = s.acquire_run("R", "child")
    s.put_effects([EffectRecord("run/R", "eff", "v", "h", 0, Payload("json", b"42"), seq=0)])
    s._close_connection()  # what the idle close does: the record is only in the journal
    print("ready", flush=True)
    time.sleep(60)  # still executing run R when it is killed
    """
)


def test_a_busy_process_taking_over_a_run_sees_the_dead_holders_journal(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    DuckDBStore(path).close()
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    parent = DuckDBStore(path, idle_close=3600)  # holds the file while the child lives
    try:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        lease = parent.acquire_run("R", "parent")
        assert parent.get_effect(("run/R", "eff", "v", "h", 0)) is not None
        lease.release()
    finally:
        parent.close()


def test_the_run_is_merged_and_released_before_its_result_is_seen(tmp_path: Path) -> None:
    @dn.effect
    def side(x: int) -> int:
        return x

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return side(1)

    path = tmp_path / "s.duckdb"
    a = DuckDBStore(path, merge_interval=3600, idle_close=3600)
    b = DuckDBStore(path)  # another user of the same store
    runtime._store = a
    try:
        assert dn.run(wf, run_id="R") == 1
        lease = b.acquire_run("R", "B")
        rec = b.get_run("R")
        assert rec is not None and rec.status == "completed"
        lease.release()
    finally:
        b.close()


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


def _serve_until(worker: object, jobs: list[dn.Job[object]]) -> list[object]:
    """Serve ``worker`` until every job settled (or 10 s); their outcomes (value or error)."""
    from durable_nb.worker import Worker

    assert isinstance(worker, Worker)

    async def body() -> list[object]:
        task = asyncio.ensure_future(worker.serve())
        out: list[object] = []
        try:
            for job in jobs:
                try:
                    out.append(await asyncio.wait_for(job.wait(), 10))
                except Exception as e:
                    out.append(e)
        finally:
            worker.stop()
            await task
        return out

    return asyncio.run(body())


def test_a_queued_run_whose_arguments_do_not_bind_fails_without_killing_the_worker() -> None:
    from durable_nb._codecs import encode
    from durable_nb.store import RunRecord
    from durable_nb.worker import Worker

    @dn.durable(name="poison")
    async def wf(ctx: dn.Context, n: int) -> int:
        return n

    store = runtime.store
    # stored by a kernel whose workflow took other arguments (a list, not name -> value)
    store.put_run(RunRecord("bad", "poison", "queued", 1.0, 1.0, args=encode([1], store.signer)))
    good = dn.start(wf, 7, run_id="good", on="worker")
    worker = Worker([wf], concurrency=1, grace=5)
    bad_job = dn.get_job("bad")
    bad_out, good_out = _serve_until(worker, [bad_job, good])
    assert good_out == 7
    assert isinstance(bad_out, dn.DurableError), bad_out
    assert "damaged" in str(bad_out)
    rec = store.get_run("bad")
    assert rec is not None and rec.status == "failed"


def test_a_queued_run_of_a_version_the_worker_lacks_fails_instead_of_being_claimed_forever() -> (
    None
):
    from durable_nb._codecs import encode
    from durable_nb.errors import WorkflowVersionError
    from durable_nb.store import RunRecord
    from durable_nb.worker import Worker

    @dn.durable(name="versioned_poison", version="1")
    async def wf(ctx: dn.Context, n: int) -> int:
        return n

    store = runtime.store
    args = encode({"n": 3}, store.signer)
    store.put_run(RunRecord("v9", "versioned_poison", "queued", 1.0, 1.0, args=args, version="9"))
    worker = Worker([wf], concurrency=1, grace=5)
    (out,) = _serve_until(worker, [dn.get_job("v9")])
    assert isinstance(out, WorkflowVersionError), out
    assert worker.claimed == 1
    rec = store.get_run("v9")
    assert rec is not None and rec.status == "failed"


def test_a_watched_run_whose_result_cannot_be_read_here_raises_instead_of_hanging() -> None:
    from durable_nb._codecs import Payload
    from durable_nb.errors import StoreFormatError
    from durable_nb.store import RunRecord

    store = runtime.store
    store.put_run(RunRecord("elsewhere", "wf", "queued", 1.0, 1.0))
    job: dn.Job[object] = dn.Job("elsewhere", None)  # a run another process executes
    job._watch()
    # it completes there with a result this process cannot decode (say, a pickle signed
    # with another DURABLE_NB_KEY, or written by a newer durable_nb)
    done = RunRecord("elsewhere", "wf", "completed", 1.0, 2.0, result=Payload("zzz", b""))
    store.put_run(done)
    with pytest.raises(StoreFormatError, match=r"^unknown payload codec 'zzz'"):
        job.result(timeout=10)


def test_restarting_a_run_on_a_worker_leaves_a_run_executing_elsewhere_alone() -> None:
    from durable_nb.errors import RunLockedError

    @dn.durable(name="busy_elsewhere")
    async def wf(ctx: dn.Context, n: int) -> int:
        return n

    store = runtime.store
    dn.start(wf, 1, run_id="busy", on="worker")
    lease = store.acquire_run("busy", "a worker in another process")  # executing there
    try:
        with pytest.raises(RunLockedError, match=r"^run 'busy' is already being executed"):
            dn.start(wf, 1, run_id="busy", restart=True, on="worker")
        assert store.get_run("busy") is not None  # its history is not pulled from under it
    finally:
        lease.release()
    job = dn.start(wf, 1, run_id="busy", restart=True, on="worker")  # free now: restarts
    assert job.status() == "queued"


def test_concurrent_calls_of_a_shared_effect_in_one_process_execute_once() -> None:
    """Two runs of a worker (one process, one owner) call one shared key at once."""
    calls: list[int] = []

    @dn.effect(shared=True)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.05)
        return x * 2

    @dn.effect(shared=True)
    def fetch_sync(x: int) -> int:
        calls.append(x)
        time.sleep(0.05)
        return x * 3

    async def body() -> list[int]:
        return list(await asyncio.gather(fetch(1), fetch(1)))

    assert asyncio.run(body()) == [2, 2]
    assert calls == [1]

    async def threads() -> list[int]:
        return list(
            await asyncio.gather(asyncio.to_thread(fetch_sync, 2), asyncio.to_thread(fetch_sync, 2))
        )

    assert asyncio.run(threads()) == [6, 6]
    assert calls == [1, 2]


def test_starting_a_continued_as_new_run_on_a_worker_again_executes_nothing() -> None:
    from durable_nb.worker import Worker

    executed: list[int] = []

    @dn.effect
    def step(n: int) -> int:
        executed.append(n)
        return n

    @dn.durable(name="can_loop")
    async def loop(ctx: dn.Context, n: int) -> int:
        step(n)
        if n < 2:
            ctx.continue_as_new(n + 1)
        return n

    assert dn.run(loop, 0, run_id="L") == 2
    assert executed == [0, 1, 2]
    assert dn.run(loop, 0, run_id="L") == 2  # here: its recorded outcome
    assert executed == [0, 1, 2]
    job = dn.start(loop, 0, run_id="L", on="worker")  # on a worker: the same
    (out,) = _serve_until(Worker([loop], concurrency=1, grace=5), [job])
    assert out == 2
    assert executed == [0, 1, 2]


def test_a_failed_later_generation_requeued_on_a_worker_resumes_on_its_own_arguments() -> None:
    from durable_nb.worker import Worker

    executed: list[int] = []
    fail = {"at": 2}

    @dn.effect
    def step(n: int) -> int:
        executed.append(n)
        if n == fail["at"]:
            raise RuntimeError("boom")
        return n

    @dn.durable(name="can_loop_fail")
    async def loop(ctx: dn.Context, n: int) -> int:
        await ctx.run(step, n, retry=dn.Retry(attempts=1))
        if n < 2:
            ctx.continue_as_new(n + 1)
        return n

    with pytest.raises(RuntimeError, match=r"^boom$"):
        dn.run(loop, 0, run_id="F")
    fail["at"] = -1
    job = dn.start(loop, 0, run_id="F", on="worker")
    (out,) = _serve_until(Worker([loop], concurrency=1, grace=5), [job])
    assert out == 2
    assert executed == [0, 1, 2, 2]  # generation 2 again, not the run from generation 0
