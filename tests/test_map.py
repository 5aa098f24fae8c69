"""Durable fan-out (``dn.map``, ``ctx.map``, ``@effect(executor=)``) on real executors: a
Dask ``LocalCluster`` of worker processes and a ``ProcessPoolExecutor``. The driving process
is SIGKILLed mid-map and run again; executions are counted by the workers in a file, so a
replay that executed anyway, or an item computed twice, shows."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb import trace
from durable_nb._codecs import decode
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    MapError,
    RunNotFoundError,
)
from durable_nb.store import Store, open_store

from .helpers import ROOT, spawn_python, wait_until

DRIVER = str(ROOT / "tests" / "map_driver.py")
N = 2000
MAX_IN_FLIGHT = 20


def _need_dask() -> None:
    """Dask is a test dependency (the dev extra): missing, it skips, and fails under CI."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("dask[distributed] is not installed (durable_nb[dask])")


def _lines(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _settled(path: Path) -> list[int]:
    """The count file once no worker appends to it any more (work in flight at a kill
    finishes on its worker)."""
    seen = [-1]

    def still() -> bool:
        n = len(_lines(path))
        same = n == seen[0]
        seen[0] = n
        return same

    wait_until(still, "the workers stopped executing", timeout=60, interval=0.5)
    return _lines(path)


def _recorded_items(store_path: Path) -> set[int]:
    """The items whose results the store holds (results are x*x)."""
    store = open_store(str(store_path))
    try:
        recs = [r for r in store.load_effects("top/map-test") if r.kind == "map_item"]
        return {math.isqrt(decode(r.payload, store.signer)) for r in recs if not r.is_error}
    finally:
        store.close()


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a process and every process it started (its cluster, its pool)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.kill()
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=30)  # reaped, its pipes closed
    psutil.wait_procs(kids, timeout=30)


def _driver(
    mode: str, tmp: Path, *, kill_worker_at: int = 0, address: str = "", n: int = N
) -> subprocess.Popen[str]:
    args = [mode, str(tmp / "store.duckdb"), str(tmp / "count.txt"), str(tmp / "result.json")]
    args += [str(n), str(MAX_IN_FLIGHT), str(kill_worker_at)]
    if address:
        args.append(address)
    return spawn_python(DRIVER, *args, env={"DURABLE_NB_SCOPE": "map-test"}, cwd=tmp)


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A LocalCluster (2 worker processes, 1 thread each) in a process of its own, which
    outlives the drivers a test kills; yields its scheduler's address."""
    _need_dask()
    code = (
        "import logging, sys\n"
        "from distributed import LocalCluster\n"
        "if __name__ == '__main__':\n"
        "    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,\n"
        "                     dashboard_address=':0', silence_logs=logging.ERROR)\n"
        "    print(c.scheduler_address, flush=True)\n"
        "    sys.stdin.read()\n"
        "    c.close()\n"
    )
    proc = spawn_python("-c", code, stdin=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    assert address.startswith("tcp://"), proc.stderr.read() if proc.stderr else ""
    yield address
    _kill_tree(proc)


def _kill_at_half_and_rerun(mode: str, tmp: Path, address: str = "") -> None:
    """Map N items, SIGKILL the driver (and whatever it started) after ~N/2 executions, run
    it again: the items recorded before the kill are not executed again, at most
    MAX_IN_FLIGHT items run twice, and the result is complete and in order."""
    first = _driver(mode, tmp, address=address)
    count = tmp / "count.txt"
    wait_until(lambda: len(_lines(count)) >= N // 2, "half the items executed", timeout=240)
    _kill_tree(first)
    before = _settled(count)
    recorded = _recorded_items(tmp / "store.duckdb")
    assert 0 < len(recorded) < N  # killed mid-map, with items recorded
    assert recorded <= set(before)

    second = _driver(mode, tmp, address=address)
    _, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    assert result == [x * x for x in range(N)]
    after = _lines(count)[len(before) :]
    assert recorded.isdisjoint(after)  # nothing recorded was computed again
    assert len(before) + len(after) <= N + MAX_IN_FLIGHT
    assert set(before) | set(after) == set(range(N))


def test_map_on_a_dask_cluster_survives_a_sigkill_of_the_driver(
    cluster: str, tmp_path: Path
) -> None:
    _kill_at_half_and_rerun("dask", tmp_path, cluster)


def test_map_survives_a_crash_of_the_driver_with_the_cluster_it_started(tmp_path: Path) -> None:
    _need_dask()
    _kill_at_half_and_rerun("dask-local", tmp_path)  # the rerun starts a new cluster


def test_map_on_a_process_pool_survives_a_sigkill_of_the_driver(tmp_path: Path) -> None:
    _kill_at_half_and_rerun("process", tmp_path)


def test_a_killed_dask_worker_does_not_stop_the_map(cluster: str, tmp_path: Path) -> None:
    proc = _driver("dask", tmp_path, address=cluster, kill_worker_at=300, n=1000)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "killed worker" in out
    assert json.loads((tmp_path / "result.json").read_text()) == [x * x for x in range(1000)]


def test_single_calls_and_client_executors_on_the_cluster(cluster: str, tmp_path: Path) -> None:
    """``@effect(executor=client)`` runs each call on a worker and records it here;
    ``client.get_executor(...)`` works as a map's executor (its options apply)."""
    code = (
        "import json, os, sys\n"
        "import durable_nb as dn\n"
        "from distributed import Client\n"
        "if __name__ == '__main__':\n"
        "    dn.set_store(sys.argv[1])\n"
        "    client = Client(sys.argv[2])\n"
        "    @dn.effect(executor=client)\n"
        "    def where(x):\n"
        "        return os.getpid(), x\n"
        "    first = where(3)\n"
        "    dn.engine.runtime.top.reset()  # what a cell's next execution starts with\n"
        "    again = where(3)\n"
        "    out = dn.map(lambda x: x + 1, range(40), executor=client.get_executor(retries=1))\n"
        "    print(json.dumps([os.getpid(), first, again, out]))\n"
    )
    proc = spawn_python("-c", code, str(tmp_path / "s.duckdb"), cluster, cwd=tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    me, first, again, mapped = json.loads(out.strip().splitlines()[-1])
    assert first[0] != me and first[1] == 3  # on a worker process
    assert again == first  # replayed from the record, not run again
    assert mapped == list(range(1, 41))


def test_a_killed_pool_process_fails_its_items_and_a_rerun_sends_only_those(
    tmp_path: Path,
) -> None:
    proc = _driver("process", tmp_path, kill_worker_at=300, n=1000)
    out, err = proc.communicate(timeout=240)
    # a ProcessPoolExecutor that lost a process is broken for good: its items fail, the
    # others stay recorded
    assert proc.returncode == 3, err[-3000:]
    assert "BrokenProcessPool" in out
    count = tmp_path / "count.txt"
    before = _settled(count)
    recorded = _recorded_items(tmp_path / "store.duckdb")
    assert 0 < len(recorded) < 1000
    assert recorded <= set(before)
    again = _driver("process", tmp_path, n=1000)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == [x * x for x in range(1000)]
    assert recorded.isdisjoint(_lines(count)[len(before) :])


# ----------------------------------------------------------------- in this process
calls: list[int] = []
_lock = threading.Lock()


def square(x: int) -> int:
    with _lock:
        calls.append(x)
    return x * x


def pid_of(x: int) -> tuple[int, int]:
    return os.getpid(), x


def test_dn_map_returns_results_in_order_and_a_rerun_executes_nothing() -> None:
    calls.clear()
    items = [5, 3, 9, 3, 1]  # a repeated item is a second call (its own occurrence)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert dn.map(square, items, executor=pool) == [25, 9, 81, 9, 1]
        assert sorted(calls) == sorted(items)
        runtime.top.reset()  # what the next execution of the cell starts with
        assert dn.map(square, items, executor=pool) == [25, 9, 81, 9, 1]
    assert len(calls) == len(items)
    runtime.top.reset()
    assert dn.map(square, [*items, 7]) == [25, 9, 81, 9, 1, 49]  # threads of this process
    assert len(calls) == len(items) + 1  # only the new item


def test_a_process_pool_executes_the_items_in_other_processes() -> None:
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        out = dn.map(pid_of, range(20), executor=pool)
    assert [x for _, x in out] == list(range(20))
    assert os.getpid() not in {p for p, _ in out}


def where(x: int) -> tuple[int, int]:
    calls.append(x)  # in the worker's copy of the list, never this one
    return os.getpid(), x


def test_effect_with_an_executor_runs_the_call_there_and_records_it() -> None:
    calls.clear()
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        remote = dn.effect(where, executor=pool)
        pid, x = remote(4)
        assert (x, calls) == (4, [])
        assert pid != os.getpid()
        assert remote(4) == (pid, 4)  # replayed: recorded here, not executed again


def test_max_in_flight_and_the_effects_concurrency_limit_bound_the_items_out() -> None:
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(x: int) -> int:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002)
        with lock:
            state["now"] -= 1
        return x

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert dn.map(slow, range(60), executor=pool, max_in_flight=3) == list(range(60))
        assert 1 <= state["most"] <= 3
        state["most"] = 0
        limited = dn.effect(slow, limit="map-test", concurrency=2)
        assert dn.map(limited, range(100, 160), executor=pool) == list(range(100, 160))
        assert 1 <= state["most"] <= 2


class Flaky(Exception):
    pass


def test_failed_items_are_retried_then_reported_with_their_index_the_rest_kept() -> None:
    tries: dict[int, int] = {}

    @dn.effect(retry=dn.Retry(attempts=2, initial_delay=0.001))
    def shaky(x: int) -> int:
        with _lock:
            tries[x] = tries.get(x, 0) + 1
        if x == 3 and tries[x] == 1:
            raise Flaky("once")  # retried, then fine
        if x in (5, 8):
            raise ValueError(f"bad item {x}")
        return x

    with pytest.raises(MapError) as info:
        dn.map(shaky, range(10))
    err = info.value
    assert sorted(err.errors) == [5, 8]
    assert isinstance(err.errors[5], ValueError) and str(err.errors[5]) == "bad item 5"
    assert err.exceptions == (err.errors[5], err.errors[8])
    assert err.results[:5] == [0, 1, 2, 3, 4] and err.results[5] is None
    assert "item 5: ValueError('bad item 5')" in str(err)
    assert tries == {**{x: 1 for x in range(10)}, 3: 2, 5: 2, 8: 2}  # every item ran
    runtime.top.reset()
    with pytest.raises(MapError):
        dn.map(shaky, range(10))
    # outside a run errors are not cached: only the failed items ran again
    assert tries == {**{x: 1 for x in range(10)}, 3: 2, 5: 4, 8: 4}


def test_ctx_map_is_one_step_replayed_without_executing_and_its_errors_replay_too() -> None:
    calls.clear()
    fail = {7}

    @dn.effect
    def item(x: int) -> int:
        with _lock:
            calls.append(x)
        if x in fail:
            raise ValueError(f"no {x}")
        return x + 100

    boom = {"on": True}

    @dn.durable
    async def wf(ctx: dn.Context, n: int) -> Any:
        before = ctx.random()
        try:
            out: Any = sum(await ctx.map(item, range(n), max_in_flight=4))
        except MapError as e:
            out = ("failed", sorted(e.errors))
        if boom["on"]:
            raise RuntimeError("boom")  # after the map: resuming the run replays it
        return (out, before)

    with pytest.raises(RuntimeError, match="boom"):
        dn.run(wf, 12, run_id="m")
    assert sorted(calls) == list(range(12))
    boom["on"] = False
    # the replay raises the same MapError from the journal, without executing an item
    (out, _) = dn.run(wf, 12, run_id="m")
    assert out == ("failed", [7])
    assert sorted(calls) == list(range(12))

    t = trace.run_trace(dn.get_store(), "m")
    (step,) = [s for s in t["steps"] if s["kind"] == "map"]
    assert step["step"] == 1  # one step after ctx.random, however many items
    m = step["map"]  # type: ignore[typeddict-item]
    assert (m["items"], m["done"], m["failed"], m["in_flight"]) == (12, 11, 1, 0)
    assert len(m["durations"]) == 12
    assert t["totals"]["steps"] == 2
    text = trace.format_trace(t)
    assert "map " in text and "over 12 items" in text and "11 done" in text and "1 failed" in text


def test_a_failed_run_resumed_computes_only_the_failed_items() -> None:
    calls.clear()
    broken = {"on": True}

    @dn.effect
    def part(x: int) -> int:
        with _lock:
            calls.append(x)
        if x == 2 and broken["on"]:
            raise ValueError("down")
        return x

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return sum(await ctx.map(part, range(6)))

    with pytest.raises(MapError):
        dn.run(wf, run_id="r")
    assert sorted(calls) == list(range(6))
    broken["on"] = False
    assert dn.resume("r").result() == 15
    assert sorted(calls) == sorted([*range(6), 2])  # only the failed item ran again


def test_map_progress_reaches_the_runs_listeners_and_a_replay_reports_none() -> None:
    import asyncio

    boom = {"on": True}

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        out = sum(await ctx.map(square, range(30)))
        if boom["on"]:
            raise RuntimeError("boom")  # after the map: resuming the run replays it
        return out

    def follow() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []

        async def go() -> int:
            job = dn.start(wf, run_id="pr")
            job.subscribe(seen.append)
            result: int = await job.wait()
            return result

        try:
            assert asyncio.run(go()) == sum(x * x for x in range(30))
        except RuntimeError:
            assert boom["on"]
        return seen

    seen = follow()
    progress = [m for m in seen if m["kind"] == "progress"]
    assert progress and progress[-1]["done"] == 30 and progress[-1]["total"] == 30
    assert {m["seq"] for m in progress} == {0}
    running = [m for m in seen if m["kind"] == "step" and m.get("state") == "running"]
    assert [m["seq"] for m in running] == [0]
    boom["on"] = False
    seen = follow()  # replayed: no progress, the step replayed
    assert not [m for m in seen if m["kind"] == "progress"]
    steps = [m for m in seen if m["kind"] == "step"]
    assert [(m["step"], m["state"]) for m in steps] == [("map", "replayed")]

    from durable_nb.widgets._model import TraceModel

    model = TraceModel("pr")
    model.load_trace(trace.run_trace(dn.get_store(), "pr"))
    (row,) = model.rows
    assert row["progress"].startswith("30/30")
    assert row["label"] == "map square over 30 items"


def test_map_arguments_are_checked() -> None:
    with pytest.raises(ArgumentTypeError, match="fn"):
        dn.map(square(3), [1])  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="items"):
        dn.map(square, "abc")
    with pytest.raises(ArgumentTypeError, match="executor"):
        dn.map(square, [1], executor="dask")
    with pytest.raises(ArgumentError, match="max_in_flight"):
        dn.map(square, [1], max_in_flight=0)

    async def coro(x: int) -> int:
        return x

    with pytest.raises(ArgumentTypeError, match="async"):
        dn.map(coro, [1])
    with pytest.raises(ArgumentTypeError, match="executor"):
        dn.effect(coro, executor=concurrent.futures.ThreadPoolExecutor(1))

    @dn.durable
    async def wf(ctx: dn.Context) -> None:
        dn.map(square, [1])

    with pytest.raises(BlockingCallError, match=r"ctx\.map"):
        dn.run(wf, run_id="b")


def test_a_recorded_map_sends_nothing_to_its_executor_on_every_store(store: Store) -> None:
    """A rerun looks every item up (one query on DuckDB and PostgreSQL) and sends none."""

    class Refusing(concurrent.futures.Executor):
        def submit(self, *a: Any, **k: Any) -> Any:
            raise AssertionError("a recorded item was sent to the executor")

    first = dn.map(square, [*range(300), 5])
    runtime.top.reset()
    assert dn.map(square, [*range(300), 5], executor=Refusing()) == first
    runtime.top.reset()
    with pytest.raises(MapError) as info:  # only the new item is sent (and refused)
        dn.map(square, [*range(300), 5, 1000], executor=Refusing())
    assert list(info.value.errors) == [301]
    assert isinstance(info.value.errors[301], AssertionError)


def test_the_trace_shows_a_running_maps_items_in_flight() -> None:
    release = threading.Event()

    def held(x: int) -> int:
        if x >= 3:
            release.wait(30)
        return x

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            return sum(await ctx.map(held, range(6), executor=pool))

    job = dn.start(wf, run_id="fl")

    def items() -> Any:
        try:
            steps = trace.run_trace(dn.get_store(), "fl")["steps"]
        except RunNotFoundError:  # not stored yet
            return None
        steps = [s for s in steps if s["kind"] == "map"]
        return steps[0]["map"] if steps else None  # type: ignore[typeddict-item]

    wait_until(lambda: (items() or {}).get("done") == 3, "three items recorded")
    m = items()
    assert (m["items"], m["done"], m["in_flight"], m["missing"]) == (6, 3, 3, 0)
    release.set()
    assert job.result(30) == 15
    m = items()
    assert (m["done"], m["in_flight"], m["executed"], m["replayed"]) == (6, 0, 6, 0)


def test_a_cancelled_run_keeps_its_maps_recorded_items_and_a_resume_sends_the_rest() -> None:
    release = threading.Event()
    ran: list[int] = []

    def held(x: int) -> int:
        with _lock:
            ran.append(x)
        if x >= 3:
            release.wait(30)
        return x

    pool = concurrent.futures.ThreadPoolExecutor(6)

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return sum(await ctx.map(held, range(6), executor=pool))

    job = dn.start(wf, run_id="cm")

    def done() -> int:
        recs = dn.get_store().load_effects("run/cm")
        return sum(r.kind == "map_item" for r in recs)

    wait_until(lambda: done() == 3 and len(ran) == 6, "three items recorded, three running")
    job.cancel("enough")
    with pytest.raises(dn.RunCancelledError):
        job.result(30)
    release.set()
    pool.shutdown(wait=True)
    assert done() == 3  # what ended before the cancel stays recorded
    ran.clear()
    with concurrent.futures.ThreadPoolExecutor(6) as again:
        pool = again
        assert dn.resume("cm").result(30) == 15
    assert sorted(ran) == [3, 4, 5]  # only the items that had not been recorded
