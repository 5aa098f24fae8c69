"""Workers share runs through one store: claimed once, taken over after a crash, never twice.

The big test is issue 6's proof: three worker processes and two "kernel" processes on one
PostgreSQL store, 200 runs of 20 effects, one worker SIGKILLed midway.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import ArgumentError
from durable_nb.worker import Worker, load_workflows

from .helpers import ROOT

FLOWS = textwrap.dedent(
    """
    import asyncio, os, time
    import durable_nb as dn

    LOG = os.environ["DN_LOG"]
    _executed = 0

    def _log(line: str) -> None:
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)

    @dn.effect
    async def step(run_id: str, i: int) -> int:
        global _executed
        _executed += 1
        if _executed == int(os.environ.get("DN_DIE_AT", "0")):
            os.kill(os.getpid(), 9)  # a crash inside an effect, before it completed
        await asyncio.sleep(0.001)
        _log(f"effect {run_id} {i} {os.getpid()} {time.time()}")
        return i

    @dn.durable(name="job")
    async def job(ctx: dn.Context, n: int) -> int:
        _log(f"exec {ctx.run_id} -1 {os.getpid()} {time.time()}")
        total = 0
        for i in range(n):
            total += await step(ctx.run_id, i)
        return total
    """
)


def _spawn(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _worker_code(flows: Path, concurrency: int) -> str:
    return (
        "import durable_nb as dn\n"
        "from durable_nb.worker import Worker\n"
        f"Worker([{str(flows)!r}], concurrency={concurrency}).run()\n"
    )


def _kernel_code(flows: Path, prefix: str, n_runs: int, steps: int) -> str:
    return textwrap.dedent(
        f"""
        import importlib.util, json, sys
        import durable_nb as dn
        spec = importlib.util.spec_from_file_location("flows", {str(flows)!r})
        flows = importlib.util.module_from_spec(spec); spec.loader.exec_module(flows)
        jobs = [dn.start(flows.job, {steps}, run_id=f"{prefix}-{{i}}", on="worker")
                for i in range({n_runs})]
        print(json.dumps([j.result(timeout=600) for j in jobs]))
        """
    )


def _log_lines(path: Path) -> list[tuple[str, str, int, int, float]]:
    rows = []
    for line in path.read_text().splitlines():
        kind, run_id, i, pid, ts = line.split()
        rows.append((kind, run_id, int(i), int(pid), float(ts)))
    return rows


def test_load_workflows_needs_workflows(tmp_path: Path) -> None:
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ArgumentError, match=r"^module '.*empty\.py' defines no @durable workflow"):
        load_workflows([str(empty)])
    with pytest.raises(ArgumentError, match=r"^cannot import module 'no_such_mod_xyz'"):
        load_workflows(["no_such_mod_xyz"])
    with pytest.raises(ArgumentError, match=r"^concurrency must be an int >= 1, got 0"):
        Worker([str(tmp_path / "x.py")], concurrency=0)


def test_worker_runs_queued_runs_in_process(tmp_path: Path, store: dn.Store) -> None:
    """A run started on="worker" waits in the store until a worker claims it."""
    log = tmp_path / "log"
    os.environ["DN_LOG"] = str(log)
    try:
        flows = tmp_path / "flows_inproc.py"
        flows.write_text(FLOWS)
        wfs = load_workflows([str(flows)])
        job = dn.start(wfs["job"], 5, run_id="q1", on="worker")
        assert job.status() == "queued"
        worker = Worker(list(wfs.values()), concurrency=2, grace=5)

        async def serve_until_done() -> int:
            task = asyncio.ensure_future(worker.serve())
            result = await job.wait()
            worker.stop()
            await task
            return result

        assert asyncio.run(serve_until_done()) == sum(range(5))
        effects = [r for r in _log_lines(log) if r[0] == "effect"]
        assert sorted(r[2] for r in effects) == list(range(5))
        assert worker.claimed == 1
    finally:
        del os.environ["DN_LOG"]


@pytest.mark.postgres
def test_three_workers_two_kernels_one_killed(tmp_path: Path, pg_url: str) -> None:
    """200 runs x 20 effects; a worker dies midway; all complete, nothing runs twice."""
    flows = tmp_path / "flows.py"
    flows.write_text(FLOWS)
    log = tmp_path / "exec.log"
    url = pg_url + "&lease_seconds=2"  # the killed worker's run is taken over 2 s later
    env = {
        "DN_LOG": str(log),
        "DURABLE_NB_STORE": url,
        "DURABLE_NB_KEY": "team-secret-for-the-worker-test",
    }
    workers = [
        _spawn(_worker_code(flows, 1), {**env, "DN_DIE_AT": "30"}),  # the victim
        _spawn(_worker_code(flows, 8), env),
        _spawn(_worker_code(flows, 8), env),
    ]
    kernels = [_spawn(_kernel_code(flows, f"k{k}", 100, 20), env) for k in range(2)]
    try:
        outs = [k.communicate(timeout=600) for k in kernels]
        for k, (out, err) in zip(kernels, outs, strict=True):
            assert k.returncode == 0, err
            assert out.strip() == "[" + ", ".join(["190"] * 100) + "]"
        assert workers[0].wait(timeout=60) == -signal.SIGKILL
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)  # graceful: finish or release, then exit 0
        errs = []
        for w in workers:
            try:
                errs.append(w.communicate(timeout=60)[1])
            except subprocess.TimeoutExpired:
                w.kill()
                errs.append(w.communicate()[1])
    for w, err in zip(workers[1:], errs[1:], strict=True):
        assert w.returncode == 0, err

    rows = _log_lines(log)
    effects = collections.Counter((r[1], r[2]) for r in rows if r[0] == "effect")
    assert len(effects) == 200 * 20
    twice = [k for k, n in effects.items() if n > 1]
    assert twice == [], f"effects executed twice: {twice[:10]}"
    victim = workers[0].pid
    assert any(r[3] == victim for r in rows), "the killed worker did no work before it died"
    # no run was executed by two processes at once: per run, each process's span of log
    # lines (from its execution start to its last effect) does not overlap another's
    spans: dict[str, dict[int, list[float]]] = collections.defaultdict(dict)
    for _, run_id, _, pid, ts in rows:
        span = spans[run_id].setdefault(pid, [ts, ts])
        span[0], span[1] = min(span[0], ts), max(span[1], ts)
    for run_id, by_pid in spans.items():
        ordered = sorted(by_pid.values())
        for a, b in itertools.pairwise(ordered):
            assert a[1] <= b[0], f"run {run_id} executed by two workers at once: {by_pid}"
    taken_over = [r for r, by_pid in spans.items() if victim in by_pid and len(by_pid) > 1]
    assert taken_over, "no run of the killed worker was taken over by another"


def test_worker_command_serves_a_duckdb_store_until_sigterm(tmp_path: Path) -> None:
    """`durable-nb worker flows.py` on a DuckDB file: a run queued by another process
    completes there, and SIGTERM stops the worker cleanly (exit 0)."""
    flows = tmp_path / "flows_cli.py"
    flows.write_text(FLOWS)
    db = tmp_path / "store.duckdb"
    env = {"DN_LOG": str(tmp_path / "log"), "DURABLE_NB_STORE": str(db)}
    dn.set_store(str(db))  # creates the store the command expects
    dn.get_store().flush()
    dn.set_store(":memory:")
    proc = _spawn(
        f"from durable_nb.cli import main; raise SystemExit(main(['worker', {str(flows)!r}]))", env
    )
    try:
        kernel = _spawn(_kernel_code(flows, "cli", 3, 4), env)
        out, err = kernel.communicate(timeout=120)
        assert kernel.returncode == 0, err
        assert out.strip() == "[6, 6, 6]"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, werr = proc.communicate(timeout=60)
    assert proc.returncode == 0, werr
    assert "serving job" in werr and "stopped after 3 run(s)" in werr


@pytest.mark.postgres
def test_a_run_whose_lease_is_lost_stops_executing(pg_url: str) -> None:
    """Fencing: when this process can no longer renew a run's lease (here: another process
    took the run over after it expired), the run stops at once instead of executing on beside
    the new holder, and its Job says why."""
    import psycopg

    from durable_nb.store._postgres import PostgresStore

    from .conftest import PG_TEST_KEY

    store = PostgresStore(pg_url, key=PG_TEST_KEY, lease_seconds=0.6)
    dn.set_store(store)
    dn.set_clock(None)
    gate_reached = []

    @dn.durable(name="fenced")
    async def fenced(ctx: dn.Context) -> str:
        gate_reached.append(1)
        await asyncio.sleep(60)  # a long step: the lease is lost meanwhile
        return "finished"

    job = dn.start(fenced, run_id="fenced-1")
    while not gate_reached:
        time.sleep(0.01)
    schema = pg_url.rsplit("schema=", 1)[1]
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:  # "another holder"
        conn.execute(
            f"UPDATE {schema}.dn_leases SET owner = 'someone else', token = 'theirs' "
            "WHERE run_id = 'fenced-1'"
        )
    with pytest.raises(dn.RunLockedError, match=r"^run 'fenced-1' lost its lease"):
        job.result(timeout=30)
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as conn:
        holder = conn.execute(f"SELECT owner FROM {schema}.dn_leases").fetchall()
    assert holder == [("someone else",)], "the lost lease must not be released over its new holder"


# -------------------------------------------- regressions found in review (each failed before its fix)


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
