"""Queues, sessions and dedup ids with real worker processes on the local PostgreSQL.

Worker processes are ``durable-nb worker flows.py`` commands; every run's effect appends
``start``/``end`` lines (run id, session, pid, time) to an execution log with one
``os.write`` each, and the assertions read that log (and the store). Under ``CI=true`` a
missing PostgreSQL fails these tests (the ``pg_url`` fixture).
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

import durable_nb as dn
from durable_nb.cli import cli
from durable_nb.engine import runtime
from durable_nb.errors import ArgumentError, DuplicateRunError, StoreFeatureError
from durable_nb.store import MemoryStore, Node, QueueSpec, Route, RunRecord
from durable_nb.store._postgres import PostgresStore
from durable_nb.worker import Worker

from .conftest import PG_TEST_KEY
from .helpers import ROOT

FLOWS = textwrap.dedent(
    """
    import asyncio, os, time
    import durable_nb as dn

    LOG = os.environ["DN_LOG"]

    def log(*parts):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            line = " ".join(str(p) for p in (*parts, os.getpid(), time.time()))
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)

    dn.queue("llm", concurrency=5, worker_concurrency=2, rate="100/1s")
    dn.queue("prio", priority=True)
    dn.queue("burst", rate="10/1s")

    @dn.effect
    async def work(run_id: str, sleep: float) -> int:
        log("start", run_id, dn.current_session() or "-")
        if sleep >= 100 and os.environ.get("DN_HANG"):
            await asyncio.sleep(3600)  # until the test kills this process
        await asyncio.sleep(min(sleep, 0.05))
        log("end", run_id, dn.current_session() or "-")
        return 1

    @dn.durable(name="task")
    async def task(ctx: dn.Context, i: int, sleep: float = 0.0) -> int:
        return await work(ctx.run_id, sleep)
    """
)

Line = tuple[str, str, str, int, float]  # what, run id, session, pid, time


@pytest.fixture
def setup(tmp_path: Path, pg_url: str) -> Iterator[tuple[ModuleType, Callable[..., Any], Path]]:
    """The flows module (imported here too, to start runs), a worker spawner, the log."""
    path = tmp_path / "flows.py"
    path.write_text(FLOWS)
    log = tmp_path / "exec.log"
    os.environ["DN_LOG"] = str(log)
    spec = importlib.util.spec_from_file_location("dn_queue_flows", path)
    assert spec is not None and spec.loader is not None
    flows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flows)
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    runtime._store = store
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str, hang: bool = False) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DN_LOG": str(log),
            "DURABLE_NB_STORE": pg_url,
            "DURABLE_NB_KEY": PG_TEST_KEY.decode(),
        }
        env.pop("DN_HANG", None)
        if hang:
            env["DN_HANG"] = "1"
        with open(tmp_path / f"worker{len(procs)}.err", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "durable_nb", "worker", str(path), "--grace", "0", *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                text=True,
            )
        procs.append(proc)
        return proc

    yield flows, spawn, log
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    runtime._store = None
    store.close()
    os.environ.pop("DN_LOG", None)


def _lines(log: Path) -> list[Line]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        what, run_id, session, pid, ts = line.split()
        out.append((what, run_id, session, int(pid), float(ts)))
    return out


def _wait(jobs: list[dn.Job[Any]], timeout: float = 60) -> None:
    for job in jobs:
        assert job.result(timeout=timeout) == 1


def _wait_for(what: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"not within {timeout:g}s: {what}")


def _pids_of_sessions(rows: list[Line], run_ids: set[str] | None = None) -> dict[str, set[int]]:
    by: dict[str, set[int]] = collections.defaultdict(set)
    for what, run_id, session, pid, _ in rows:
        if what == "end" and (run_ids is None or run_id in run_ids):
            by[session].add(pid)
    return by


def _workers_up(n: int) -> Callable[[], list[dict[str, Any]] | None]:
    def check() -> list[dict[str, Any]] | None:
        found = dn.Client().workers()
        return found if len(found) >= n else None

    return check


@pytest.mark.postgres
def test_sessions_pin_runs_to_one_worker_move_when_it_dies_and_stay_when_it_restarts(
    setup: tuple[ModuleType, Callable[..., Any], Path], pg_url: str
) -> None:
    flows, spawn, log = setup
    sessions = [f"s{k}" for k in range(6)]
    # queued before any worker runs: whoever comes first takes two sessions, no more
    jobs = [
        dn.start(flows.task, i, on="worker", session=sessions[i % 6], run_id=f"a{i}")
        for i in range(24)
    ]
    for node in ("n1", "n2", "n3"):
        spawn("--node-id", node, "--max-sessions", "2", "--concurrency", "8", hang=True)
    _wait(jobs)
    by_session = _pids_of_sessions(_lines(log))
    assert all(len(pids) == 1 for pids in by_session.values()), by_session
    owner = {s: next(iter(pids)) for s, pids in by_session.items()}
    per_pid = collections.Counter(owner.values())
    assert sorted(per_pid.values()) == [2, 2, 2], owner  # three workers, two sessions each
    workers = {w["node_id"]: w for w in dn.Client().workers()}
    assert {n: len(w["sessions"]) for n, w in workers.items()} == {"n1": 2, "n2": 2, "n3": 2}
    node_of_pid = {w["pid"]: n for n, w in workers.items()}
    # the operations view on the command line
    env = {"DURABLE_NB_KEY": PG_TEST_KEY.decode()}
    listed = CliRunner().invoke(cli, ["--store", pg_url, "workers", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert {w["node_id"]: sorted(w["sessions"]) for w in json.loads(listed.output)} == {
        n: sorted(w["sessions"]) for n, w in workers.items()
    }
    text = CliRunner().invoke(cli, ["--store", pg_url, "metrics"], env=env).output
    assert "queue llm  0 queued, 0 running" in text
    assert all(f"worker {n}  0 running, sessions " in text for n in ("n1", "n2", "n3"))
    trace = dn.Client().trace("a0")
    noted = [e["data"] for e in trace["events"] if e["kind"] == "session"]
    assert noted and noted[0]["where"] == "worker" and noted[0]["session"] == "s0"

    # the worker holding s0 dies with a run of s0 in flight: the run and s0 move to a new
    # worker (the others have no room), and so do its other session's runs
    victim_pid = owner["s0"]
    other = next(s for s, p in owner.items() if p == victim_pid and s != "s0")
    hung = dn.start(flows.task, 100, 100.0, on="worker", session="s0", run_id="hung")
    _wait_for(lambda: any(r[0] == "start" and r[1] == "hung" for r in _lines(log)))
    os.kill(victim_pid, signal.SIGKILL)
    spawn("--node-id", "n4", "--max-sessions", "2")
    more = [
        dn.start(flows.task, 200 + i, on="worker", session=s, run_id=f"b{i}{s}")
        for i in range(3)
        for s in ("s0", other)
    ]
    assert hung.result(timeout=60) == 1
    _wait(more)
    moved = _pids_of_sessions(_lines(log), {"hung", *(j.run_id for j in more)})
    n4 = _wait_for(lambda: [w for w in dn.Client().workers() if w["node_id"] == "n4"])[0]
    new_pid = n4["pid"]
    assert moved == {"s0": {new_pid}, other: {new_pid}}
    assert sorted(n4["sessions"]) == sorted(["s0", other])
    depths = dn.Client().queue_depths()
    assert depths["sessions"]["s0"]["node_id"] == "n4" and depths["sessions"]["s0"]["moves"] == 1

    # a worker restarted with its node id keeps its sessions, although another live worker
    # (n5) has room for them
    keep_node = next(n for p, n in sorted(node_of_pid.items()) if p != victim_pid)
    kept = sorted(s for s, p in owner.items() if node_of_pid[p] == keep_node)
    os.kill(owner[kept[0]], signal.SIGKILL)
    spawn("--node-id", "n5", "--max-sessions", "2")
    spawn("--node-id", keep_node, "--max-sessions", "2")

    def restarted() -> dict[str, Any] | None:
        found = {w["node_id"]: w for w in dn.Client().workers()}
        w = found.get(keep_node)
        ok = w is not None and w["pid"] != owner[kept[0]] and "n5" in found
        return w if ok else None

    back = _wait_for(restarted)
    last = [
        dn.start(flows.task, 300 + i, on="worker", session=s, run_id=f"c{i}{s}")
        for i in range(3)
        for s in kept
    ]
    _wait(last)
    after = _pids_of_sessions(_lines(log), {j.run_id for j in last})
    assert after == {s: {back["pid"]} for s in kept}
    assert sorted(back["sessions"]) == sorted(kept)


@pytest.mark.postgres
def test_queue_limits_hold_across_workers_under_500_runs(
    setup: tuple[ModuleType, Callable[..., Any], Path], pg_url: str
) -> None:
    """Queue ``llm``: concurrency 5 on all workers, 2 per worker, 100 starts per second;
    queue ``burst`` beside it: 10 starts per second and no other limit (40 runs the
    workers' free slots would otherwise take within a second or two)."""
    flows, spawn, log = setup
    jobs = [dn.start(flows.task, i, 0.02, on="worker", queue="llm") for i in range(500)]
    burst = [dn.start(flows.task, 1000 + i, on="worker", queue="burst") for i in range(40)]
    for _ in range(3):
        spawn("--concurrency", "16")
    _wait(jobs + burst, timeout=120)
    bursts = {j.run_id for j in burst}
    rows = [r for r in _lines(log) if r[1] not in bursts]
    assert sum(r[0] == "start" for r in rows) == 500
    # concurrency: executions overlap at most 5 at a time, 2 in one worker process
    spans: dict[str, list[float]] = {}
    pid_of: dict[str, int] = {}
    for what, run_id, _, pid, ts in rows:
        spans.setdefault(run_id, [0.0, 0.0])[0 if what == "start" else 1] = ts
        pid_of[run_id] = pid
    edges = sorted(
        [(t0, 1, pid_of[r]) for r, (t0, _) in spans.items()]
        + [(t1, -1, pid_of[r]) for r, (_, t1) in spans.items()]
    )
    live, most = 0, 0
    per: collections.Counter[int] = collections.Counter()
    most_per = 0
    for _, step, pid in edges:  # at equal times an end (-1) sorts before a start
        live += step
        per[pid] += step
        most, most_per = max(most, live), max(most_per, per[pid])
    assert most <= 5, most
    assert most_per <= 2, most_per
    assert len(set(pid_of.values())) == 3  # every worker took part
    # rate: the claims (stamped by the database's clock in the claim's transaction) never
    # exceed 100 in any second, and the 500 starts took at least four windows
    schema = pg_url.split("schema=")[1]
    for queue, n, calls in (("llm", 500, 100), ("burst", 40, 10)):
        with psycopg.connect(pg_url.split("?")[0]) as conn:
            claimed = sorted(
                float(r[0])
                for r in conn.execute(
                    f'SELECT claimed_at FROM "{schema}".dn_routes WHERE queue = %s', [queue]
                ).fetchall()
            )
        assert len(claimed) == n
        j = 0
        for i, t in enumerate(claimed):
            while claimed[j] <= t - 1.0:
                j += 1
            assert i - j + 1 <= calls, f"{queue}: {i - j + 1} claims within one second at {t}"
    starts = sorted(ts for what, _, _, _, ts in rows if what == "start")
    assert starts[-1] - starts[0] >= 4.0
    # the burst's 40 starts, from the execution log: four windows, so at least three
    # seconds from the first to the last
    burst_starts = sorted(r[4] for r in _lines(log) if r[0] == "start" and r[1] in bursts)
    assert len(burst_starts) == 40 and burst_starts[-1] - burst_starts[0] >= 3.0


@pytest.mark.postgres
def test_priorities_order_a_queue(setup: tuple[ModuleType, Callable[..., Any], Path]) -> None:
    flows, spawn, log = setup
    priorities = [3, 0, 2, 1, 3, 1, 0, 2, 2, 1, 3, 0]
    jobs = [
        dn.start(flows.task, i, on="worker", queue="prio", priority=p, run_id=f"p{i:02d}")
        for i, p in enumerate(priorities)
    ]
    spawn("--concurrency", "1")
    _wait(jobs)
    order = [r[1] for r in _lines(log) if r[0] == "start"]
    expected = [f"p{i:02d}" for i, _ in sorted(enumerate(priorities), key=lambda x: (x[1], x[0]))]
    assert order == expected
    with pytest.raises(ArgumentError, match=r"queue 'llm' has no priorities.*priority=True"):
        dn.start(flows.task, 99, on="worker", queue="llm", priority=1)


@pytest.mark.postgres
def test_a_live_dedup_id_is_refused_naming_its_run(
    setup: tuple[ModuleType, Callable[..., Any], Path],
) -> None:
    flows, _, _ = setup
    first = dn.start(flows.task, 1, on="worker", queue="llm", dedup_id="order-42")
    # the same run again is no duplicate: its job, as always
    same = dn.start(flows.task, 1, on="worker", queue="llm", dedup_id="order-42")
    assert same.run_id == first.run_id
    with pytest.raises(
        DuplicateRunError,
        match=rf"^dedup_id 'order-42' is held by run '{first.run_id}' \(queued\) in queue "
        r"'llm'; wait for that run to end",
    ):
        dn.start(flows.task, 2, on="worker", queue="llm", dedup_id="order-42")
    # another queue has its own ids; the default queue too
    others = [
        dn.start(flows.task, 3, on="worker", queue="prio", dedup_id="order-42"),
        dn.start(flows.task, 4, on="worker", dedup_id="order-42"),
    ]
    with pytest.raises(DuplicateRunError, match="held by run"):
        dn.start(flows.task, 5, on="worker", dedup_id="order-42")
    # once the holder ended, the id is free again
    w = Worker([flows.task], node_id="inproc")
    t = threading.Thread(target=lambda: asyncio.run(w.serve()))
    t.start()
    try:
        assert first.result(timeout=30) == 1
        again = dn.start(flows.task, 2, on="worker", queue="llm", dedup_id="order-42")
        assert again.result(timeout=30) == 1
        _wait(others)  # no job of this test is left following its run afterwards
    finally:
        w.stop()
        t.join(timeout=30)


def test_stores_without_workers_refuse_routing_and_a_local_session_says_so(
    tmp_path: Path,
) -> None:
    from durable_nb.store._duckdb import DuckDBStore

    @dn.durable(name="q.local")
    async def local(ctx: dn.Context, x: int) -> int:
        return x + 1

    dn.queue("q.test", concurrency=1)
    for store in (MemoryStore(), DuckDBStore(tmp_path / "s.duckdb")):
        runtime._store = store
        for kw in ({"queue": "q.test"}, {"session": "gpu-1"}, {"dedup_id": "d"}):
            with pytest.raises(StoreFeatureError, match=r"needs a store that coordinates"):
                dn.start(local, 1, on="worker", **kw)
        with pytest.raises(StoreFeatureError, match="node_id and max_sessions need"):
            Worker([local], node_id="n1")
        job = dn.start(local, 1, session="gpu-1")
        assert job.result(timeout=30) == 2
        events = [e for e in dn.Client().trace(job.run_id)["events"] if e["kind"] == "session"]
        assert [(e["data"]["session"], e["data"]["where"]) for e in events] == [("gpu-1", "here")]
        assert dn.current_session() is None
        runtime._store = None
        store.close()
    with pytest.raises(ArgumentError, match=r"queue=.* applies to runs started on workers"):
        dn.start(local, 1, queue="q.test")


def test_queue_arguments_are_checked() -> None:
    with pytest.raises(ArgumentError, match="worker_concurrency \\(3\\) must not exceed"):
        dn.queue("x", concurrency=2, worker_concurrency=3)
    with pytest.raises(ArgumentError, match="concurrency must be an int >= 1 or None, got 0"):
        dn.queue("x", concurrency=0)
    with pytest.raises(ArgumentError, match="rate must be 'N/unit'"):
        dn.queue("x", rate="fast")
    with pytest.raises(ArgumentError, match="'default' is the queue of runs started without"):
        dn.queue("default", concurrency=1)
    with pytest.raises(ArgumentError, match="max_sessions must be an int >= 1"):
        Worker([], max_sessions=0)
    spec = dn.queue("x", concurrency=3, rate="100/min", priority=True)
    assert (spec.concurrency, spec.calls, spec.window, spec.priority) == (3, 100, 60.0, True)
    assert json.dumps(spec.name) == '"x"'


@pytest.mark.postgres
def test_claims_follow_queue_limits_and_sessions(pg_url: str) -> None:
    """The claim rules, step by step, with workers (nodes) of one process."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)

    def done(got: Any) -> None:  # the run completed: its worker writes it, then releases
        got[0].status = "completed"
        store.put_run(got[0])
        got[1].release()

    try:
        store.put_queue(QueueSpec("q", concurrency=3, worker_concurrency=2))
        for i in range(6):
            store.queue_run(RunRecord(f"r{i}", "wf", "queued", i, i), Route("q"))
        a, b = Node("a", "owner-a", ("wf",)), Node("b", "owner-b", ("wf",))
        store.register_worker(a)
        store.register_worker(b)
        with pytest.raises(ArgumentError, match="node_id 'a' is in use by the live worker"):
            store.register_worker(Node("a", "someone else", ("wf",)))
        ga1, ga2 = store.claim_routed(a), store.claim_routed(a)
        assert store.claim_routed(a) is None  # worker_concurrency 2
        gb1 = store.claim_routed(b)
        assert store.claim_routed(b) is None  # concurrency 3 on all workers
        assert ga1 and ga2 and gb1
        assert [g[0].run_id for g in (ga1, ga2, gb1)] == ["r0", "r1", "r2"]
        done(ga1)
        gb2 = store.claim_routed(b)
        assert gb2 is not None and gb2[0].run_id == "r3" and gb2[2] == Route("q")
        # sessions: a run of a session another live node holds is left to it
        store.queue_run(RunRecord("s1", "wf", "queued", 10, 10), Route(session="x"))
        store.queue_run(RunRecord("s2", "wf", "queued", 11, 11), Route(session="x"))
        c = Node("c", "owner-c", ("wf",), max_sessions=1, idle_timeout=0.0)
        d = Node("d", "owner-d", ("wf",), max_sessions=1)
        store.register_worker(c)
        store.register_worker(d)
        assert store.claim_run("plain", ["wf"]) is None  # no node: no session runs
        gc = store.claim_routed(c)
        assert gc is not None and gc[0].run_id == "s1" and gc[2] == Route(session="x")
        assert store.claim_routed(d) is None  # x is c's while its run executes
        done(gc)  # idle timeout 0: the session is free once the run's lease is released
        gd = store.claim_routed(d)
        assert gd is not None and gd[0].run_id == "s2"
        sessions = store.queue_depths()["sessions"]
        assert sessions["x"]["node_id"] == "d" and sessions["x"]["moves"] == 1
        # d is full (max_sessions 1): a run of another session is not d's to take
        store.queue_run(RunRecord("y1", "wf", "queued", 12, 12), Route(session="y"))
        assert store.claim_routed(d) is None
        gy = store.claim_routed(c)
        assert gy is not None and gy[0].run_id == "y1"
        # d's run ended, and x stays d's for its idle timeout (600 s): not e's to take
        done(gd)
        e = Node("e", "owner-e", ("wf",))
        store.register_worker(e)
        store.queue_run(RunRecord("s3", "wf", "queued", 13, 13), Route(session="x"))
        assert store.claim_routed(e) is None
        # a stopped worker frees its sessions
        store.unregister_worker("d")
        store.unregister_worker("e")
        assert {w["node_id"] for w in store.live_workers()} == {"a", "b", "c"}
        done(gy)
        gx = store.claim_routed(c)
        assert gx is not None and gx[0].run_id == "s3"
    finally:
        store.close()


@pytest.mark.postgres
def test_the_end_of_a_run_of_a_limited_queue_wakes_claimers(pg_url: str) -> None:
    """Idle claimers look again only when a notification may mean a run to claim (issue 17):
    a run of a queue with a concurrency limit that ends frees a slot, so its release notifies
    'released'; a plain run that ends notifies 'ended', which claimers sleep through."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        store.put_queue(QueueSpec("q", concurrency=1))
        store.queue_run(RunRecord("limited", "wf", "queued", 1, 1), Route("q"))
        store.put_run(RunRecord("plain", "wf", "queued", 2, 2))
        with psycopg.connect(store._conninfo, autocommit=True) as conn:
            conn.execute(f'LISTEN "{store._channel}"')
            seen = []
            for run_id in ("limited", "plain"):
                got = store.claim_run("w", ["wf"])
                assert got is not None and got[0].run_id == run_id
                got[0].status = "completed"
                store.put_run(got[0])
                got[1].release()
                seen.append([n.payload for n in conn.notifies(timeout=5.0, stop_after=1)])
        assert seen == [["released"], ["ended"]]
    finally:
        store.close()
