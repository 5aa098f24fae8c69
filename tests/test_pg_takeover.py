"""PostgreSQL: a dead executor's run (or shared-effect claim) is taken over at once, a live
one never is, a holder cut off from the server is fenced at its lease's expiry, and group
commit loses nothing a workflow saw.

Real processes on the local PostgreSQL. Every takeover test uses ``lease_seconds=3600`` (or
a claim of 3600 s), so a takeover that waited for the lease could never finish within the
test's timeouts: only the session check can. Executions are counted from a log file the
processes append to (one ``os.write`` per line).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

import durable_nb as dn
from durable_nb import _codecs
from durable_nb.errors import RunLockedError, StoreUnavailableError
from durable_nb.store._pg_commit import LOOP_GROUP, GroupCommit, LoopCommit
from durable_nb.store._pg_session import TAKEOVER_GRACE
from durable_nb.store._pg_wire import LoopConnection
from durable_nb.store._postgres import PostgresStore

from .conftest import PG_TEST_KEY, PG_URL
from .helpers import ROOT, can_take, wait_until

pytestmark = pytest.mark.postgres

FLOWS = textwrap.dedent(
    """
    import asyncio, os, time
    import durable_nb as dn

    LOG = os.environ["DN_LOG"]

    def log(*parts):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(str(p) for p in (*parts, os.getpid(), time.time())) + "\\n").encode())
        finally:
            os.close(fd)

    @dn.effect
    async def step(run_id: str, i: int) -> int:
        log("start", run_id, i)
        await asyncio.sleep(float(os.environ.get("DN_STEP_SLEEP", "0")))
        if str(i) == os.environ.get("DN_HANG_AT"):
            log("inside", run_id, i)
            await asyncio.sleep(3600)  # until the test kills this process
        log("end", run_id, i)
        return i

    @dn.durable(name="job")
    async def job(ctx: dn.Context, n: int) -> int:
        total = 0
        for i in range(n):
            total += await step(ctx.run_id, i)
        return total

    @dn.effect(shared=True, name="tk.shared", timeout=3600)  # its claim lasts 3600 s
    def shared_work(x: int) -> int:
        log("start", "shared", x)
        if os.environ.get("DN_HANG_AT") == "shared":
            log("inside", "shared", x)
            time.sleep(3600)
        log("end", "shared", x)
        return 2 * x
    """
)

_RUN = """
import importlib.util, json, sys
import durable_nb as dn
spec = importlib.util.spec_from_file_location("flows", sys.argv[1])
flows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flows)
try:
    if sys.argv[2] == "shared":
        print(json.dumps({"result": flows.shared_work(21)}), flush=True)
    else:
        print(json.dumps({"result": dn.run(flows.job, int(sys.argv[3]), run_id=sys.argv[2])}))
except dn.RunLockedError as e:
    print(json.dumps({"locked": str(e)}), flush=True)
"""

Line = tuple[str, str, int, int, float]  # what, run id, step, pid, time


def _spawn(flows: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(flows), *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def _lines(log: Path) -> list[Line]:
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        what, run_id, i, pid, ts = line.split()
        rows.append((what, run_id, int(i), int(pid), float(ts)))
    return rows


def _wait_for_line(log: Path, what: str, timeout: float = 60) -> Line:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in _lines(log):
            if row[0] == what:
                return row
        time.sleep(0.02)
    pytest.fail(f"no {what!r} line in the execution log within {timeout:g}s")


def _assert_one_executor_at_a_time(rows: list[Line]) -> None:
    """Per run, the lines of each process form a span that overlaps no other's."""
    spans: dict[str, dict[int, list[float]]] = collections.defaultdict(dict)
    for _, run_id, _, pid, ts in rows:
        span = spans[run_id].setdefault(pid, [ts, ts])
        span[0], span[1] = min(span[0], ts), max(span[1], ts)
    for run_id, by_pid in spans.items():
        for a, b in itertools.pairwise(sorted(by_pid.values())):
            assert a[1] <= b[0], f"run {run_id} executed by two processes at once: {by_pid}"


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    path = tmp_path / "flows.py"
    path.write_text(FLOWS)
    return path


def _env(url: str, log: Path, **extra: str) -> dict[str, str]:
    return {
        "DN_LOG": str(log),
        "DURABLE_NB_STORE": url,
        "DURABLE_NB_KEY": PG_TEST_KEY.decode(),
        **extra,
    }


def test_a_sigkilled_executor_is_taken_over_at_once_and_never_by_two(
    tmp_path: Path, pg_url: str, flows: Path
) -> None:
    """A kernel SIGKILLed inside an effect; its run is taken over from fresh processes with
    lease_seconds=3600: only the dead session can let them in within the timeout."""
    log = tmp_path / "exec.log"
    url = pg_url + "&lease_seconds=3600"
    victim = _spawn(flows, _env(url, log, DN_HANG_AT="5"), "t", "10")
    try:
        inside = _wait_for_line(log, "inside")
        assert inside[3] == victim.pid
        # a live holder is never displaced: refused, also after the takeover grace
        store = PostgresStore(url, key=PG_TEST_KEY)
        try:
            for _ in range(2):
                with pytest.raises(
                    RunLockedError, match=rf"^run 't' is being executed by pid {victim.pid} "
                ):
                    store.acquire_run("t", "contender")
                time.sleep(2 * TAKEOVER_GRACE)
        finally:
            store.close()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
    # two restarted kernels at once: one takes the run over, the other is refused or, if it
    # comes after, gets the recorded result
    fresh = [_spawn(flows, _env(url, log), "t", "10") for _ in range(2)]
    outs = [_finish(p) for p in fresh]
    assert {"result": 45} in outs, outs
    for out in outs:
        assert out == {"result": 45} or out["locked"].startswith("run 't' is being executed"), out

    rows = _lines(log)
    _assert_one_executor_at_a_time(rows)
    ends = collections.Counter(i for what, _, i, _, _ in rows if what == "end")
    starts = collections.Counter(i for what, _, i, _, _ in rows if what == "start")
    assert ends == {i: 1 for i in range(10)}, ends  # no completed effect ran twice
    assert starts == {**{i: 1 for i in range(10)}, 5: 2}, starts  # only the one in flight
    executors = {pid for _, _, _, pid, _ in rows}
    assert len(executors) == 2, rows  # the victim and exactly one of the fresh processes


def test_the_claim_of_a_sigkilled_shared_effect_is_taken_over_at_once(
    tmp_path: Path, pg_url: str, flows: Path
) -> None:
    log = tmp_path / "exec.log"
    victim = _spawn(flows, _env(pg_url, log, DN_HANG_AT="shared"), "shared")
    try:
        _wait_for_line(log, "inside")
        schema = urlsplit(pg_url).query.split("schema=")[1]
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            [key] = conn.execute(
                sql.SQL(
                    "SELECT scope, identity, version, input_hash, occurrence "
                    "FROM {}.dn_effect_claims"
                ).format(sql.Identifier(schema))
            ).fetchall()
        # the live claimer keeps its claim, also after the grace
        store = PostgresStore(pg_url, key=PG_TEST_KEY)
        try:
            for _ in range(2):
                assert store.claim_effect(tuple(key), "contender", 60.0) is False  # type: ignore[arg-type]
                time.sleep(2 * TAKEOVER_GRACE)
        finally:
            store.close()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
    assert _finish(_spawn(flows, _env(pg_url, log), "shared")) == {"result": 42}
    rows = _lines(log)
    assert [(w, pid == victim.pid) for w, _, _, pid, _ in rows] == [
        ("start", True),
        ("inside", True),
        ("start", False),
        ("end", False),
    ]


class _Proxy:
    """A TCP forwarder to PostgreSQL that can stall: ``block()`` stops moving bytes but keeps
    every connection open (a cut-off network path, or a dead host whose connections the
    server still thinks are up)."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._stop.is_set():
            self._open.wait()
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self._open.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def block(self) -> None:
        self._open.clear()

    def unblock(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    parts = urlsplit(PG_URL)
    p = _Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield p
    p.close()


def test_a_holder_cut_off_but_connected_is_taken_over_at_lease_expiry_and_stops(
    tmp_path: Path, pg_url: str, flows: Path, proxy: _Proxy
) -> None:
    """The holder's connections stall without closing: the server still sees its session,
    so nobody takes the run over at once; at the lease's expiry another process does, and
    the holder, fenced, starts no step after that — not even once its connections work again."""
    log = tmp_path / "exec.log"
    parts = urlsplit(pg_url)
    netloc = parts.netloc.rpartition("@")[0]
    via_proxy = urlunsplit(
        parts._replace(netloc=(netloc + "@" if netloc else "") + f"127.0.0.1:{proxy.port}")
    )
    lease = "&lease_seconds=3"
    holder = _spawn(flows, _env(via_proxy + lease, log, DN_STEP_SLEEP="0.05"), "t", "400")
    try:
        deadline = time.monotonic() + 60
        while sum(1 for r in _lines(log) if r[0] == "end") < 3:
            assert time.monotonic() < deadline and holder.poll() is None, holder.stderr
            time.sleep(0.02)
        proxy.block()
        blocked_at = time.time()
        store = PostgresStore(pg_url + lease, key=PG_TEST_KEY)
        try:  # the session looks alive to the server: no takeover at once
            with pytest.raises(RunLockedError, match=r"^run 't' is being executed by "):
                store.acquire_run("t", "contender")
        finally:
            store.close()
        taker = _spawn(flows, _env(pg_url + lease, log), "t", "400")
        deadline = time.monotonic() + 120
        while True:  # refused until the lease expires, then it takes the run over
            out = _finish(taker)
            if "result" in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.5)
            taker = _spawn(flows, _env(pg_url + lease, log), "t", "400")
        assert out == {"result": sum(range(400))}
        proxy.unblock()  # the holder's writes go through now; it must still stop
        held = _finish(holder)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert held["locked"].startswith("run 't' lost its lease"), held
    rows = _lines(log)
    _assert_one_executor_at_a_time(rows)
    mine = [r for r in rows if r[3] == holder.pid]
    assert mine and max(r[4] for r in mine) < blocked_at + 1.0, "the holder went on after the block"
    ends = collections.Counter(i for what, _, i, _, _ in rows if what == "end")
    assert set(ends) == set(range(400)) and max(ends.values()) <= 2


# ---------------------------------------------------------------------------- group commit


class _Flaky:
    """Makes the store's writers fail their n-th group write, whichever writes it: the
    writer thread, or the engine loop's (a group it sends and whose answer its connection's
    reader reads, or one its task writes after connecting or preparing). The failure is not
    a dropped connection (which a fresh one repairs): the group's writers are told it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        self.n = n
        self.calls = 0
        on_thread, on_loop = GroupCommit._write_group, LoopCommit._write_group
        send = LoopConnection.send

        def thread_write(writer: GroupCommit, group: Any) -> None:
            self._count()
            on_thread(writer, group)

        async def loop_write(writer: LoopCommit, group: Any) -> None:
            self._count()
            await on_loop(writer, group)

        def loop_send(conn: LoopConnection, statements: Any, then: Any = None) -> int | None:
            if then is not None:  # a group of the common path: it fails instead of being sent
                try:
                    self._count()
                except psycopg.OperationalError as e:
                    asyncio.get_running_loop().call_soon(then, e)
                    return len(statements)
            return send(conn, statements, then)

        monkeypatch.setattr(GroupCommit, "_write_group", thread_write)
        monkeypatch.setattr(LoopCommit, "_write_group", loop_write)
        monkeypatch.setattr(LoopConnection, "send", loop_send)

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise psycopg.OperationalError(f"injected failure of write {self.n}")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_fifty_runs_with_a_failing_batch_lose_nothing_a_workflow_saw(
    pg_url: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    executed: collections.Counter[tuple[str, int]] = collections.Counter()
    seen: list[tuple[str, int]] = []

    @dn.effect(name="gc.step")
    async def step(run_id: str, i: int) -> int:
        executed[(run_id, i)] += 1
        await asyncio.sleep(0)
        return i

    @dn.durable(name="gc.wf")
    async def wf(ctx: dn.Context) -> int:
        total = 0
        for i in range(10):
            total += await step(ctx.run_id, i)
            seen.append((ctx.run_id, i))
        return total

    ids = [f"g{k}" for k in range(50)]
    flaky = _Flaky(monkeypatch, n)
    try:
        jobs = [dn.start(wf, run_id=r) for r in ids]
        failed = []
        for job in jobs:
            try:
                assert job.result(timeout=120) == 45
            except StoreUnavailableError as e:
                assert "injected failure" in str(e), e
                failed.append(job.run_id)
        assert flaky.calls >= n and failed, "the injected failure hit no run"
        # every result a workflow saw is in the store
        for run_id in ids:
            recorded = {
                _codecs.decode(r.payload, store.signer)
                for r in store.load_effects(f"run/{run_id}")
                if r.identity == "gc.step"
            }
            saw = {i for r, i in seen if r == run_id}
            assert saw <= recorded, (run_id, saw - recorded)
        # resumed on a healthy writer: every run completes and no step it saw runs again
        flaky.n = -1
        saw_before = set(seen)
        for run_id in ids:
            assert dn.run(wf, run_id=run_id) == 45
        assert {key: executed[key] for key in saw_before} == {key: 1 for key in saw_before}
        assert sorted(executed) == sorted((r, i) for r in ids for i in range(10))
    finally:
        dn.set_store(":memory:")


def test_concurrent_runs_share_commits_in_groups_the_loop_can_overlap(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 runs whose effects complete together: their records share commits (far fewer
    groups than writes), no group holds more than LOOP_GROUP writes (so the loop executes
    one part of the runs while the server commits another), and every record is stored."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    sizes: list[int] = []  # the writes of each group the loop's writer committed
    on_loop, send_next = LoopCommit._write_group, LoopCommit._send_next

    async def counted(writer: LoopCommit, group: Any) -> None:  # its task's groups
        sizes.append(len(group))
        await on_loop(writer, group)

    def sent(writer: LoopCommit) -> bool:  # the groups it sends at once
        if not send_next(writer):
            return False
        sizes.append(len(writer._sent or ()))
        return True

    monkeypatch.setattr(LoopCommit, "_write_group", counted)
    monkeypatch.setattr(LoopCommit, "_send_next", sent)

    @dn.effect(name="gc.share")
    async def share(run_id: str, i: int) -> int:
        return i

    @dn.durable(name="gc.sharing")
    async def sharing(ctx: dn.Context) -> int:
        return sum([await share(ctx.run_id, i) for i in range(5)])

    try:
        jobs = [dn.start(sharing, run_id=f"s{k}") for k in range(100)]
        assert [job.result(timeout=120) for job in jobs] == [10] * 100
        writes = sum(sizes)
        assert writes >= 500  # five effects a run, and the runs' own records
        assert max(sizes) <= LOOP_GROUP
        assert len(sizes) < writes / 4, sizes
        stored = [r for k in range(100) for r in store.load_effects(f"run/s{k}")]
        assert len([r for r in stored if r.identity == "gc.share"]) == 500
    finally:
        dn.set_store(":memory:")


def test_runs_started_together_take_their_leases_and_reads_in_one_store_call(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 runs started at once take their leases and read their starts in shared store calls
    (one round trip each), not 50 acquires and 50 reads; a run another process holds takes
    the usual path and says who holds it, the others go on; a rerun replays every run."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    batches: list[list[str]] = []
    acquired: list[str] = []
    start_runs, acquire_run = PostgresStore.start_runs, PostgresStore.acquire_run

    def batch(self: PostgresStore, run_ids: Any, owner: str) -> Any:
        batches.append(list(run_ids))
        return start_runs(self, run_ids, owner)

    def acquire(self: PostgresStore, run_id: str, owner: str) -> Any:
        acquired.append(run_id)
        return acquire_run(self, run_id, owner)

    monkeypatch.setattr(PostgresStore, "start_runs", batch)
    monkeypatch.setattr(PostgresStore, "acquire_run", acquire)
    executed: collections.Counter[tuple[str, int]] = collections.Counter()

    @dn.effect(name="gc.start_step")
    async def step(run_id: str, i: int) -> int:
        executed[(run_id, i)] += 1
        return i

    @dn.durable(name="gc.starting")
    async def starting(ctx: dn.Context) -> int:
        return sum([await step(ctx.run_id, i) for i in range(3)])

    other = PostgresStore(pg_url, key=PG_TEST_KEY)  # another process, holding one run
    held = other.acquire_run("t-held", "another process")
    acquired.clear()
    ids = [f"t{k}" for k in range(50)]
    try:
        jobs = [dn.start(starting, run_id=r) for r in ids]
        blocked = dn.start(starting, run_id="t-held")
        assert [job.result(timeout=120) for job in jobs] == [3] * 50
        with pytest.raises(RunLockedError, match=r"^run 't-held' is being executed by another"):
            blocked.result(timeout=120)
        assert sorted(r for b in batches for r in b) == sorted([*ids, "t-held"])
        # shared calls: the starts that reach the loop in one turn go together (how many
        # turns the 51 dn.start calls from this thread span depends on the machine's load)
        assert len(batches) <= len(ids) // 4, [len(b) for b in batches]
        assert acquired == ["t-held"]  # only the held run took the usual path
        assert executed == {(r, i): 1 for r in ids for i in range(3)}
        batches.clear()
        again = [dn.start(starting, run_id=r) for r in ids]  # a rerun: every run replays
        assert [job.result(timeout=120) for job in again] == [3] * 50
        assert executed == {(r, i): 1 for r in ids for i in range(3)}
        assert len(batches) <= len(ids) // 4, [len(b) for b in batches]
    finally:
        held.release()
        other.close()
        dn.set_store(":memory:")


def test_a_start_cancelled_while_its_batch_is_under_way_lets_its_run_go(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose start is cancelled (its job cancelled, its loop stopping) while the store
    takes the leases of its batch gets no lease left behind: the batch lets it go, and
    another process takes the run at once; the batch's other run starts."""
    from durable_nb.engine._starts import start_together

    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    start_runs = PostgresStore.start_runs

    def slow(self: PostgresStore, run_ids: Any, owner: str) -> Any:
        time.sleep(0.5)  # the store call is under way when the start is cancelled
        return start_runs(self, run_ids, owner)

    monkeypatch.setattr(PostgresStore, "start_runs", slow)

    async def main() -> None:
        first = asyncio.ensure_future(start_together("c1"))
        second = asyncio.ensure_future(start_together("c2"))
        await asyncio.sleep(0.2)
        first.cancel()
        taken = await second
        assert taken is not None and taken[0].run_id == "c2"
        with pytest.raises(asyncio.CancelledError):
            await first
        taken[0].release()

    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        asyncio.run(main())
        # let go by a write behind the batch: soon, never after the lease's 30 s
        wait_until(lambda: can_take(other, "c1"), "the cancelled start's lease let go", timeout=10)
    finally:
        other.close()
        dn.set_store(":memory:")


def test_a_batch_of_starts_abandoned_by_its_loop_leaves_no_lease(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is torn down (``asyncio.run`` ends) while the store takes a batch's leases
    in a thread: the leases it takes after all are let go, not renewed for ever."""
    from durable_nb.engine._starts import start_together

    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    start_runs = PostgresStore.start_runs

    def slow(self: PostgresStore, run_ids: Any, owner: str) -> Any:
        time.sleep(0.5)  # the loop ends while this is under way
        return start_runs(self, run_ids, owner)

    monkeypatch.setattr(PostgresStore, "start_runs", slow)

    async def main() -> None:
        starts = [asyncio.ensure_future(start_together(r)) for r in ("a1", "a2")]
        await asyncio.sleep(0.1)
        assert not any(start.done() for start in starts)  # torn down with them under way

    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        asyncio.run(main())
        for run_id in ("a1", "a2"):  # let go by the writer thread: soon, not after 30 s
            wait_until(lambda r=run_id: can_take(other, r), f"{run_id}'s lease let go", timeout=10)
    finally:
        other.close()
        dn.set_store(":memory:")


def test_starts_do_not_wait_on_a_live_lease_another_process_is_writing_under(
    pg_url: str,
) -> None:
    """Another process holds a run's lease and is committing a write fenced by it (its lease
    row held FOR SHARE): the runs started together with that run do not wait for it (the
    batch takes no lock on a live lease), and that run then says who holds it."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)

    @dn.effect(name="gc.fenced_step")
    async def step(i: int) -> int:
        return i

    @dn.durable(name="gc.beside")
    async def beside(ctx: dn.Context) -> int:
        return await step(1) + await step(2)

    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    held = other.acquire_run("w-held", "another process")
    schema = urlsplit(pg_url).query.split("schema=")[1]
    try:
        with psycopg.connect(PG_URL) as writing:  # the holder's write, not committed yet
            writing.execute(
                sql.SQL("SELECT 1 FROM {}.dn_leases WHERE run_id = 'w-held' FOR SHARE").format(
                    sql.Identifier(schema)
                )
            )
            jobs = [dn.start(beside, run_id=f"w{k}") for k in range(10)]
            blocked = dn.start(beside, run_id="w-held")
            assert [job.result(timeout=60) for job in jobs] == [3] * 10
            writing.commit()
        with pytest.raises(RunLockedError, match=r"^run 'w-held' is being executed by another"):
            blocked.result(timeout=60)
    finally:
        held.release()
        other.close()
        dn.set_store(":memory:")


def test_runs_that_end_together_let_go_of_their_leases_in_shared_commits(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's lease is deleted by a write of the loop's own writer once the run's records
    are durable: 50 runs ending together share a few commits (and their notifications)
    instead of one transaction each in a thread, and each job's result comes only after its
    lease is gone, so whoever sees it can start the run again at once."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    release = store._q["release"]
    groups: list[int] = []  # lease deletions in each group the loop's writer sent
    send = LoopConnection.send

    def counted(conn: LoopConnection, statements: Any, then: Any = None) -> int | None:
        sent = send(conn, statements, then)
        if sent is not None and (n := sum(q == release for q, _ in statements)):
            groups.append(n)
        return sent

    monkeypatch.setattr(LoopConnection, "send", counted)

    @dn.effect(name="gc.end_step")
    async def step(run_id: str, i: int) -> int:
        return i

    @dn.durable(name="gc.ending")
    async def ending(ctx: dn.Context) -> int:
        return await step(ctx.run_id, 1) + await step(ctx.run_id, 2)

    try:
        jobs = [dn.start(ending, run_id=f"e{k}") for k in range(50)]
        for job in jobs:
            assert job.result(timeout=120) == 3
            other = PostgresStore(pg_url, key=PG_TEST_KEY)  # another process would, at once
            try:
                other.acquire_run(job.run_id, "another").release()
            finally:
                other.close()
        assert sum(groups) == 50, groups  # every lease let go by the loop's writer
        assert len(groups) < 50 / 2, groups  # in shared commits
    finally:
        dn.set_store(":memory:")


def test_a_holder_whose_session_the_server_ended_stops_and_its_run_is_taken_over(
    pg_url: str,
) -> None:
    """The server ends the holder's session (a restart, pg_terminate_backend, an idle
    timeout) while the holder lives: it stops the run at once (fenced), and another process
    may take the run over although its lease (3600 s) has not expired."""
    store = PostgresStore(pg_url + "&lease_seconds=3600", key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    inside = threading.Event()

    @dn.durable(name="ended")
    async def ended(ctx: dn.Context) -> str:
        inside.set()
        await asyncio.sleep(3600)  # stopped long before
        return "finished"

    try:
        job = dn.start(ended, run_id="ended-1")
        assert inside.wait(60)
        schema = urlsplit(pg_url).query.split("schema=")[1]
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            [(token,)] = conn.execute(
                sql.SQL("SELECT token FROM {}.dn_leases").format(sql.Identifier(schema))
            ).fetchall()
            key = int(token.split(".")[0])
            [(pid,)] = conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = %s AND objid = %s AND objsubid = 1",
                [key >> 32, key & 0xFFFFFFFF],
            ).fetchall()
            assert conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        with pytest.raises(RunLockedError, match=r"^run 'ended-1' lost its lease"):
            job.result(timeout=60)
        other = PostgresStore(pg_url, key=PG_TEST_KEY)
        try:
            other.acquire_run("ended-1", "taker").release()
        finally:
            other.close()
    finally:
        dn.set_store(":memory:")
