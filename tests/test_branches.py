"""Replay never takes another branch (issue 14): a failure or timeout a run observed is part
of its history; race losers that are child runs are cancelled; a run id belongs to one
workflow; a version can be chosen; signals to a run that does not exist are an error.

The kill tests run real processes on a DuckDB file and on PostgreSQL, SIGKILL them at the
interesting point and finish the run in a fresh process; every effect appends to a log file,
so a test can count what executed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    RunConflictError,
    RunNotFoundError,
    StepTimeoutError,
    UnrecordedCancelWarning,
    WorkflowVersionError,
)
from durable_nb.store import RunRecord, Store, open_store

from .conftest import PG_TEST_KEY
from .helpers import spawn_python

# ======================================================================= in one process


def test_an_error_the_workflow_caught_replays_and_only_the_failing_one_is_retried(
    store: Store,
) -> None:
    calls: list[str] = []

    @dn.effect
    def once_fails(tag: str) -> str:
        calls.append(tag)
        if calls.count(tag) == 1:
            raise OSError(f"{tag} failed")
        return tag.upper()

    @dn.durable
    async def wf(ctx: dn.Context) -> list[str]:
        try:
            first = await ctx.run(once_fails, "caught")
        except OSError as e:
            first = f"fallback after {e}"
        return [first, await ctx.run(once_fails, "uncaught")]

    with pytest.raises(OSError, match=r"^uncaught failed$"):
        dn.run(wf, run_id="r")
    assert dn.get_job("r").status() == "failed"
    # resuming the failed run calls the effect that failed it again; the error the workflow
    # caught and handled replays (with its type), so the run keeps its fallback branch
    assert dn.run(wf, run_id="r") == ["fallback after caught failed", "UNCAUGHT"]
    assert calls == ["caught", "uncaught", "uncaught"]
    # a third execution (the run completed: its recorded result) executes nothing
    assert dn.run(wf, run_id="r") == ["fallback after caught failed", "UNCAUGHT"]
    assert calls == ["caught", "uncaught", "uncaught"]


def test_the_trace_shows_the_error_that_failed_the_run(store: Store) -> None:
    @dn.effect
    def boom() -> None:
        raise ValueError("no")

    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        await ctx.run(boom)

    with pytest.raises(ValueError):
        dn.run(wf, run_id="t")
    steps = dn.Client().trace("t")["steps"]
    assert [(s["kind"], s["state"], s["error"]) for s in steps] == [
        ("effect", "failed", "ValueError('no')")
    ]


def test_errors_outside_runs_stay_uncached_unless_asked() -> None:
    calls: list[int] = []

    @dn.effect
    def fails(n: int) -> None:
        calls.append(n)
        raise KeyError(n)

    for _ in range(2):
        with pytest.raises(KeyError):
            fails(1)
    assert calls == [1, 1]


def test_a_durable_timeout_replays_as_a_timeout(store: Store, clock: dn.FakeClock) -> None:
    calls: list[str] = []
    release = asyncio.Event()

    @dn.effect
    async def slow(tag: str) -> str:
        calls.append(tag)
        if len(calls) == 1:
            await release.wait()  # the first time it hangs; later it would be quick
        return tag

    @dn.durable
    async def wf(ctx: dn.Context) -> list[str]:
        out = []
        try:
            out.append(await ctx.wait_for(slow("a"), 5))
        except StepTimeoutError:
            out.append("a timed out")
        try:
            async with ctx.timeout(5):
                out.append(await slow("b"))
        except TimeoutError:  # a StepTimeoutError is a TimeoutError
            out.append("b timed out")
        return out

    assert dn.run(wf, run_id="w") == ["a timed out", "b"]
    assert calls == ["a", "b"]
    assert dn.run(wf, run_id="w", restart=False) == ["a timed out", "b"]
    trace = dn.Client().trace("w")
    kinds = [s["kind"] for s in trace["steps"]]
    assert kinds.count("timeout") == 1 and kinds.count("deadline") == 2
    # replaying the recorded history (code changed: the completed run executes again)
    wf.replay_completed = True
    assert dn.run(wf, run_id="w") == ["a timed out", "b"]
    assert calls == ["a", "b"]  # the timed-out call is not executed again on replay


def test_a_timeout_whose_deadline_passed_while_nothing_ran_cuts_at_once(store: Store) -> None:
    calls: list[str] = []

    @dn.effect
    async def step(tag: str) -> str:
        calls.append(tag)
        return tag

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        try:
            async with ctx.timeout(60):
                await step("inside")
                await ctx.wait_signal("go")
                return await step("after go")
        except StepTimeoutError:
            return "timed out"

    runtime.clock = dn.SystemClock()
    job = dn.start(wf, run_id="d")
    for _ in range(500):  # until it waits for the signal, inside the block
        if job.status() == "waiting":
            break
        threading.Event().wait(0.01)
    assert job.status() == "waiting"
    job._interrupt()  # Ctrl-C: the run stops, resumable, its deadline recorded
    with pytest.raises(KeyboardInterrupt):
        job.result()
    runtime.clock = dn.FakeClock(start=time.time() + 120)  # resumed after the deadline
    assert dn.run(wf, run_id="d") == "timed out"  # cut on entering, before the body runs
    assert calls == ["inside"]


def test_ctx_timeout_and_wait_for_check_their_arguments(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context, what: str) -> None:
        if what == "zero":
            ctx.timeout(0)
        elif what == "none":
            ctx.timeout(None)  # type: ignore[arg-type]
        else:
            ctx.wait_for(3, 1)  # type: ignore[arg-type]

    with pytest.raises(ArgumentError, match=r"^seconds must be a number of seconds > 0 or None"):
        dn.run(wf, "zero")
    with pytest.raises(ArgumentError, match=r"^seconds must be a number of seconds > 0, got None"):
        dn.run(wf, "none")
    with pytest.raises(TypeError, match=r"^ctx\.wait_for expects awaitables"):
        dn.run(wf, "not awaitable")


def test_a_plain_asyncio_timeout_around_an_effect_warns_once_per_workflow(store: Store) -> None:
    @dn.effect
    async def hangs() -> None:
        await asyncio.Event().wait()

    @dn.durable(name=f"plain-timeout-{id(store)}")  # warned once per workflow and process
    async def wf(ctx: dn.Context) -> int:
        n = 0
        for _ in range(2):
            try:
                await asyncio.wait_for(hangs(), 0.01)
            except TimeoutError:
                n += 1
        return n

    runtime.clock = dn.SystemClock()  # asyncio's own timer; the fake clock is not involved
    with pytest.warns(UnrecordedCancelWarning, match=r"ctx\.wait_for\(aw, seconds\)") as seen:
        assert dn.run(wf, run_id="p") == 2
    assert len([w for w in seen if w.category is UnrecordedCancelWarning]) == 1


def test_race_and_all_losers_that_are_child_runs_are_cancelled(store: Store) -> None:
    ran_finally: list[str] = []
    waiting: list[str] = []

    @dn.durable
    async def waits(ctx: dn.Context, tag: str) -> str:
        waiting.append(tag)
        try:
            return str(await ctx.wait_signal("never"))
        finally:
            ran_finally.append(tag)

    async def loser_waits(tag: str) -> None:
        # children start concurrently (on PostgreSQL their start-up reads run off the loop):
        # end the winner only once the loser executes, so it is cancelled mid-body
        while tag not in waiting:
            await asyncio.sleep(0.001)

    @dn.durable
    async def quick(ctx: dn.Context) -> str:
        await loser_waits("race")
        return "quick"

    @dn.durable
    async def fails(ctx: dn.Context) -> str:
        await loser_waits("all")
        raise LookupError("child failed")

    @dn.durable
    async def racer(ctx: dn.Context) -> Any:
        return await ctx.race(
            ctx.child(waits, "race", run_id="loser"), ctx.child(quick, run_id="winner")
        )

    @dn.durable
    async def fan(ctx: dn.Context) -> Any:
        return await ctx.all([ctx.child(waits, "all", run_id="sibling"), ctx.child(fails)])

    assert dn.run(racer, run_id="racer") == (1, "quick")
    assert dn.get_job("loser").status() == "cancelled" and ran_finally == ["race"]
    with pytest.raises(LookupError, match=r"^child failed$"):
        dn.run(fan, run_id="fan")
    assert dn.get_job("sibling").status() == "cancelled" and ran_finally == ["race", "all"]


def test_a_run_id_belongs_to_one_workflow(store: Store) -> None:
    @dn.durable(name="A")
    async def a(ctx: dn.Context) -> str:
        return "a"

    @dn.durable(name="B")
    async def b(ctx: dn.Context) -> str:
        return "b"

    assert dn.run(a, run_id="X") == "a"
    before = store.get_run("X")
    with pytest.raises(
        RunConflictError,
        match=r"^run 'X' is a run of workflow 'A', not of 'B': a run id belongs to one workflow",
    ):
        dn.run(b, run_id="X")
    with pytest.raises(RunConflictError, match=r"^run 'X' is a run of workflow 'A', not of 'B'"):
        dn.start(b, run_id="X", on="worker")
    assert store.get_run("X") == before  # changed nothing
    assert dn.run(b, run_id="X", restart=True) == "b"  # restart replaces it, on purpose


def test_a_chosen_version_starts_and_continues_on_that_version(store: Store) -> None:
    @dn.durable(name="order", version="1")
    async def v1(ctx: dn.Context, n: int) -> str:
        if n == 0:
            ctx.continue_as_new(1, version="2")
        return f"v1:{n}"

    @dn.durable(name="order", version="2")
    async def v2(ctx: dn.Context, n: int) -> str:
        if n == 0:
            ctx.continue_as_new(1, version="1")
        return f"v2:{n}"

    assert dn.run(v2, 5, run_id="newest") == "v2:5"
    assert dn.run(v2, 5, run_id="chosen", version="1") == "v1:5"
    assert store.get_run("chosen").version == "1"  # type: ignore[union-attr]
    assert dn.run(v1, 0, run_id="generations") == "v1:1"  # v2 (newest), then v1 as chosen
    with pytest.raises(
        WorkflowVersionError,
        match=r"^version '3' of workflow 'order' is not defined in this process "
        r"\(defined versions: '1', '2'\)",
    ):
        dn.start(v2, 5, run_id="gone", version="3")
    assert store.get_run("gone") is None
    with pytest.raises(WorkflowVersionError, match=r"^run 'chosen' runs on version '1' of"):
        dn.run(v2, 5, run_id="chosen", version="2")
    with pytest.raises(ArgumentError, match=r"^version must be a non-empty str"):
        dn.start(v2, 5, version="")


def test_signals_to_a_run_that_does_not_exist_are_an_error(store: Store) -> None:
    @dn.durable
    async def wf(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("go")

    job = dn.start(wf, run_id="approve-order-17")
    job.signal("go", 1)  # a run started here: known before its record is written
    assert job.result() == 1
    with pytest.raises(
        RunNotFoundError,
        match=r"^no run 'approve-order-71' in the store .* to signal \(did you mean "
        r"'approve-order-17'\?\); check the run id",
    ):
        dn.signal("approve-order-71", "go")
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope' in the store"):
        dn.enqueue("nope", "jobs", 1)
    assert store.list_signals("approve-order-71") == []  # nothing was stored
    dn.signal("later", "go", 2, missing_ok=True)  # pre-delivery is an explicit opt-in
    assert dn.run(wf, run_id="later") == 2


# ======================================================================= across kills

WORKER = r"""
import asyncio, json, os, signal, sys
import durable_nb as dn

LOG = os.environ["EXEC_LOG"]
KILL = os.environ.get("KILL_AT", "")


def note(line):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\n").encode())
    os.close(fd)


def executed(prefix):
    try:
        with open(LOG) as f:
            return sum(1 for line in f if line.startswith("exec " + prefix))
    except FileNotFoundError:
        return 0


def point(label):
    if KILL == label:
        os.kill(os.getpid(), signal.SIGKILL)


@dn.effect
def work(tag):
    note("exec " + tag)
    return tag.upper()


@dn.effect
def charge(amount):
    n = executed("charge") + 1
    note(f"exec charge {n}")
    if n == 1:
        raise OSError("card declined")  # declined the first time; it would pass later
    return f"charged {amount}"


@dn.durable
async def order(ctx):
    try:
        paid = await ctx.run(charge, 10)
    except OSError as e:
        paid = f"fallback: {e}"
        await ctx.run(work, "compensate")
    point("after")
    await ctx.run(work, "ship")
    return paid


@dn.effect
async def slow(tag):
    n = executed("slow " + tag) + 1
    note(f"exec slow {tag} {n}")
    if n == 1:
        await asyncio.sleep(3600)  # slow the first time; it would be quick later
    return "quick " + tag


@dn.durable
async def deadline(ctx):
    out = []
    try:
        out.append(await ctx.wait_for(slow("a"), 0.3))
    except TimeoutError:
        out.append("a timed out")
        await ctx.run(work, "fallback-a")
    try:
        async with ctx.timeout(0.3):
            out.append(await slow("b"))
    except TimeoutError:
        out.append("b timed out")
        await ctx.run(work, "fallback-b")
    point("after")
    return out


@dn.durable
async def loser(ctx):
    try:
        return await ctx.wait_signal("never")
    finally:
        note("exec loser finally")


@dn.durable
async def winner(ctx):
    return await ctx.run(work, "win")


@dn.durable
async def racer(ctx):
    idx, value = await ctx.race(ctx.child(loser, run_id="loser"), ctx.child(winner, run_id="winner"))
    point("raced")
    return [idx, value]


name = sys.argv[1]
wf = {"order": order, "deadline": deadline, "racer": racer}[name]
try:
    result = dn.run(wf, run_id=name)
except Exception as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    sys.exit(3)
print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.fixture(params=["duckdb", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "duckdb":
        yield str(tmp_path / "s.duckdb")
    else:  # a short lease: the killed process's run is free soon after its kill
        yield request.getfixturevalue("pg_url") + "&lease_seconds=2"


def _worker(tmp: Path, url: str, scenario: str, **env: str) -> tuple[int, str]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    p = spawn_python(
        str(script),
        scenario,
        env={
            "DURABLE_NB_STORE": url,
            "DURABLE_NB_KEY": PG_TEST_KEY.decode(),
            "EXEC_LOG": str(tmp / "exec.log"),
            **env,
        },
        cwd=tmp,
    )
    out, err = p.communicate(timeout=120)
    return p.returncode, out + err


def _killed_then_finished(tmp: Path, url: str, scenario: str, label: str) -> Any:
    code, out = _worker(tmp, url, scenario, KILL_AT=label)
    assert code == -signal.SIGKILL, f"not killed at {label!r}: {out}"
    for _ in range(60):  # PostgreSQL: until the dead process's lease is over
        code, out = _worker(tmp, url, scenario)
        if "RunLockedError" not in out:
            break
        time.sleep(0.5)
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _log(tmp: Path) -> list[str]:
    path = tmp / "exec.log"
    return path.read_text().splitlines() if path.exists() else []


def _status(url: str, run_id: str) -> str | None:
    store = open_store(url)
    try:
        rec: RunRecord | None = store.get_run(run_id)
        return rec.status if rec is not None else None
    finally:
        store.close()


def test_a_caught_error_keeps_its_branch_across_a_kill(tmp_path: Path, store_url: str) -> None:
    result = _killed_then_finished(tmp_path, store_url, "order", "after")
    assert result == "fallback: card declined"  # not "charged 10": the branch it took
    assert _log(tmp_path) == ["exec charge 1", "exec compensate", "exec ship"]


def test_a_durable_timeout_keeps_its_branch_across_a_kill(tmp_path: Path, store_url: str) -> None:
    result = _killed_then_finished(tmp_path, store_url, "deadline", "after")
    assert result == ["a timed out", "b timed out"]
    assert _log(tmp_path) == [
        "exec slow a 1",
        "exec fallback-a",
        "exec slow b 1",
        "exec fallback-b",
    ]


def test_a_race_loser_child_is_cancelled_and_stays_so_across_a_kill(
    tmp_path: Path, store_url: str
) -> None:
    result = _killed_then_finished(tmp_path, store_url, "racer", "raced")
    assert result == [1, "WIN"]
    assert _log(tmp_path) == ["exec win", "exec loser finally"]
    assert _status(store_url, "loser") == "cancelled"
    assert _status(store_url, "winner") == "completed"
