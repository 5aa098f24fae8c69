"""Processes sharing one DuckDB store: the busy one hands the file over (issue 20, item 2).

Real interpreters on one store, driven by ``benchmarks/bench_sharing.py`` (the benchmark
prints the latencies; these tests assert that everyone finishes, nobody gets
``StoreLockedError``, and every recorded effect replays without executing again).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb

from durable_nb import _codecs
from durable_nb.store import EffectRecord
from durable_nb.store._duckdb import DuckDBStore
from durable_nb.store._duckdb_merge import MERGE_CHUNK
from durable_nb.store._handoff import Queue

from .helpers import ROOT, load_benchmark, spawn_python, wait_until


def _bench() -> ModuleType:
    bench: ModuleType = load_benchmark("bench_sharing")
    return bench


def _check(bench: ModuleType, store: Path, reports: list[dict[str, Any]], seconds: float) -> None:
    for r in reports:
        assert r["returncode"] == 0, r["stderr"]
        assert "StoreLockedError" not in r["stderr"]
        assert r["calls"] > 0
        assert r["executed"] == r["calls"]  # every call was new: executed once
        # a fresh process: the notebook's effects (and the workflow) replay without executing
        period = bench.WF_PERIOD if r["role"] == "wf" else bench.NB_PERIOD
        again = bench.replay(store, r["role"], r["tag"], r["calls"], seconds, period)
        assert again["calls"] == r["calls"]  # the workflow's recorded result: its count
        assert again["executed"] == 0, (r["role"], r["tag"], again)


def test_a_notebook_beside_a_busy_workflow_gets_the_file(tmp_path: Path) -> None:
    bench = _bench()
    store = tmp_path / "store.duckdb"
    reports = bench.run_processes(store, [("wf", "a"), ("nb", "b")], 5.0)
    _check(bench, store, reports, 5.0)


def test_ten_processes_on_one_store_all_make_progress(tmp_path: Path) -> None:
    bench = _bench()
    store = tmp_path / "store.duckdb"
    roles = [("wf", "a1"), ("wf", "a2")] + [("nb", f"b{i}") for i in range(8)]
    reports = bench.run_processes(store, roles, 5.0)
    _check(bench, store, reports, 5.0)
    # everyone left the queue
    assert list((tmp_path / "store.duckdb.d" / "queue").iterdir()) == []


def test_a_dead_waiters_request_is_skipped(tmp_path: Path) -> None:
    """A waiter killed while in line leaves its request file; the next one passes it."""
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    queue = Queue(tmp_path / "s.duckdb.d" / "queue")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from durable_nb.store._handoff import Queue
        Queue(Path({str(tmp_path / "s.duckdb.d" / "queue")!r})).ask()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    dead = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)})
    assert dead.returncode == -9
    assert queue.waiting()  # its request is still there
    mine = queue.ask()
    try:
        assert queue.my_turn(mine)  # the dead one ahead does not count, and is removed
        assert not queue.waiting(mine)
    finally:
        queue.leave(mine)
    store = DuckDBStore(path, lock_timeout=5)
    store.close()


def test_requests_are_served_oldest_first(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    queue = Queue(folder)
    first, second = queue.ask(), queue.ask()
    try:
        assert queue.my_turn(first)
        assert not queue.my_turn(second)
        assert queue.waiting(first) and queue.waiting(second)
        queue.leave(first)
        assert queue.my_turn(second)
        assert not queue.waiting(second)
    finally:
        queue.leave(second)
    assert list(folder.iterdir()) == []


def test_two_stores_in_one_process_share_the_file_without_handing_it_over(
    tmp_path: Path,
) -> None:
    """DuckDB shares one database instance within a process, so the baton is shared too."""
    a = DuckDBStore(tmp_path / "s.duckdb", idle_close=3600)
    b = DuckDBStore(tmp_path / "s.duckdb", idle_close=3600, lock_timeout=5)
    try:
        assert a._file.con is not None and b._file.con is not None  # both hold it at once
        assert not b._file.waits  # nobody queued
    finally:
        a.close()
        b.close()
    # the baton is free again: another process opens the store at once
    code = f"from durable_nb.store._duckdb import DuckDBStore; DuckDBStore({str(tmp_path / 's.duckdb')!r}, lock_timeout=5).close()"
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0


def test_a_waiting_process_gets_the_file_between_chunks_of_a_big_merge(tmp_path: Path) -> None:
    """A backlog of three and a bit merge chunks is merged in transactions of
    ``MERGE_CHUNK`` records, and a process that waits for the file gets it between two of
    them: it sees a whole number of chunks, not all of the backlog (nor none of it)."""
    path = tmp_path / "s.duckdb"
    total = 3 * MERGE_CHUNK + 100
    # keeps the file (no idle close, no merge but the one its backlog starts)
    holder = DuckDBStore(path, merge_interval=3600, idle_close=3600)
    waiter = None
    try:
        waiter = spawn_python(
            "-c",
            textwrap.dedent(f"""
                from durable_nb.store._duckdb import DuckDBStore
                s = DuckDBStore({str(path)!r}, lock_timeout=120)  # waits in line for the file
                print(len(s.load_effects("run/x")), flush=True)  # what it found on getting it
                s.close()
            """),
        )
        queue = tmp_path / "s.duckdb.d" / "queue"
        wait_until(lambda: any(queue.iterdir()), "the second process asking for the file")
        records = [
            EffectRecord("run/x", "m.f", "v", f"h{n}", 0, _codecs.encode(n, holder.signer), seq=n)
            for n in range(total)
        ]
        holder.put_effects(records)  # one journal write; the merge thread merges it
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        seen = int(out.strip())
        assert 0 < seen < total, seen
        assert seen % MERGE_CHUNK == 0, seen  # between two transactions, never inside one
        holder.flush()  # takes the file back for the rest
    finally:
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
        holder.close()
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM dn_effects").fetchall() == [(total,)]
    finally:
        con.close()
