"""Durability across real processes: SIGKILL at many points, restarts, locks, timers, signals."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import StoreLockedError
from durable_nb.store._duckdb import DuckDBStore

from .helpers import ROOT, spawn_python

WORKER = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    import durable_nb as dn

    log, n = sys.argv[1], int(sys.argv[2])
    kill_seen, kill_inside = int(sys.argv[3]), int(sys.argv[4])
    pace = float(sys.argv[5])

    def append(line):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, (line + "\\n").encode())
        os.close(fd)

    @dn.effect
    def step(i):
        append(f"exec {i}")
        if i == kill_inside:
            os.kill(os.getpid(), signal.SIGKILL)
        if pace:
            time.sleep(pace)
        return i * i

    @dn.effect
    async def astep(i):
        append(f"exec a{i}")
        await asyncio.sleep(0)
        return -i

    @dn.durable
    async def wf(ctx, n):
        total = 0
        for i in range(n):
            total += step(i)
            append(f"seen {i}")
            if i % 5 == 0:
                vals = await asyncio.gather(astep(i), astep(i + 1000))
                append(f"seen a{i}")
                append(f"seen a{i + 1000}")
                total += sum(vals)
            if i == kill_seen:
                os.kill(os.getpid(), signal.SIGKILL)
        return total

    print("RESULT", dn.run(wf, n, run_id="crashy"))
    """
)


def _expected(n: int) -> int:
    return sum(i * i for i in range(n)) + sum(-i - (i + 1000) for i in range(0, n, 5))


def _launch(tmp: Path, n: int, kill_seen: int = -1, kill_inside: int = -1, pace: float = 0.0):
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return spawn_python(
        str(script),
        str(tmp / "exec.log"),
        str(n),
        str(kill_seen),
        str(kill_inside),
        str(pace),
        env={"DURABLE_NB_STORE": str(tmp / "store.duckdb")},
        cwd=tmp,
    )


def _check_log(tmp: Path) -> Counter[str]:
    """No effect that the workflow saw complete ever executed again."""
    seen: set[str] = set()
    execs: Counter[str] = Counter()
    log = tmp / "exec.log"
    # a kill during the interpreter's start-up (slow on a loaded machine) leaves no log yet
    for line in (log.read_text() if log.exists() else "").splitlines():
        kind, step = line.split()
        if kind == "seen":
            seen.add(step)
        else:
            assert step not in seen, f"step {step} executed again after the workflow saw it"
            execs[step] += 1
    for step in seen:
        assert execs[step] >= 1
    return execs


@pytest.mark.parametrize("point", ["seen", "inside"])
def test_sigkill_at_many_points_never_reexecutes_a_seen_effect(tmp_path: Path, point: str) -> None:
    n = 30
    kill_points = [0, 1, 4, 5, 6, 13, 22, 29]
    for k in kill_points:
        proc = _launch(
            tmp_path,
            n,
            kill_seen=k if point == "seen" else -1,
            kill_inside=k if point == "inside" else -1,
        )
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:  # the kill point was already past (replayed)
            continue
        assert proc.returncode == -signal.SIGKILL, err
        _check_log(tmp_path)
    proc = _launch(tmp_path, n)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"RESULT {_expected(n)}" in out
    execs = _check_log(tmp_path)
    assert len(execs) == n + 2 * len(range(0, n, 5))
    # every effect ran once, except one killed while executing at each "inside" kill point
    over = {s: c for s, c in execs.items() if c > 1}
    if point == "seen":
        assert over == {}
    else:
        assert set(over) <= {str(k) for k in kill_points} and all(c == 2 for c in over.values())


def test_random_sigkills_from_outside(tmp_path: Path) -> None:
    n = 60
    rng = random.Random(7)
    for _ in range(12):
        proc = _launch(tmp_path, n, pace=0.003)
        time.sleep(rng.uniform(0.3, 0.9))  # interpreter start-up is ~0.3 s of this
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _check_log(tmp_path)
    proc = _launch(tmp_path, n)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"RESULT {_expected(n)}" in out
    execs = _check_log(tmp_path)
    assert len(execs) == n + 2 * len(range(0, n, 5))


def _child(tmp: Path, code: str, **env: str) -> subprocess.Popen[str]:
    return spawn_python(
        "-c", textwrap.dedent(code), env={"DURABLE_NB_STORE": str(tmp / "s.duckdb"), **env}, cwd=tmp
    )


def _wait_for_status(path: Path, run_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store = DuckDBStore(path, lock_timeout=5)
        try:
            rec = store.get_run(run_id)
        finally:
            store.close()
        if rec is not None and rec.status == status:
            return
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never reached {status}")


WAITER = """
    import sys, time
    import durable_nb as dn

    if len(sys.argv) > 1:
        dn.set_clock(dn.FakeClock(start=time.time() + float(sys.argv[1])))

    @dn.durable
    async def wf(ctx):
        await ctx.sleep(3600)
        a = await ctx.wait_signal("approve")
        b = await ctx.wait_signal("approve")
        return [a, b]

    print("RESULT", dn.run(wf, run_id="w"))
"""


def test_timer_and_signals_survive_a_kill(tmp_path: Path) -> None:
    store_path = tmp_path / "s.duckdb"
    p = _child(tmp_path, WAITER)
    _wait_for_status(store_path, "w", "waiting")
    detail = DuckDBStore(store_path)
    rec = detail.get_run("w")
    detail.close()
    assert rec is not None and "timer_until" in rec.detail
    p.kill()
    p.communicate()
    # signals sent while no process runs the workflow are stored...
    dn.set_store(str(store_path))
    dn.signal("w", "approve", {"first": 1})
    dn.signal("w", "approve", {"second": 2})
    runtime.store.close()
    runtime._store = None
    # ...and on resume, the overdue timer fires at once and they arrive in order, once
    p = _child(
        tmp_path,
        WAITER.replace("if len(sys.argv) > 1:", "if True:").replace("float(sys.argv[1])", "3601"),
    )
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "RESULT [{'first': 1}, {'second': 2}]" in out
    p = _child(tmp_path, WAITER)  # completed: the recorded result, nothing waits
    out, err = p.communicate(timeout=60)
    assert "RESULT [{'first': 1}, {'second': 2}]" in out


def test_two_processes_never_execute_the_same_run(tmp_path: Path) -> None:
    p = _child(tmp_path, WAITER)
    _wait_for_status(tmp_path / "s.duckdb", "w", "waiting")
    q = _child(tmp_path, WAITER)
    _, err = q.communicate(timeout=60)
    p.kill()
    p.communicate()
    assert q.returncode == 1
    assert re.search(
        rf"RunLockedError: run 'w' is being executed by process {p.pid} on \S+ \(.*, since .*\); "
        "wait for it to finish, or stop that process and start the run again",
        err,
    ), err


BUSY = """
    import sys, time
    import durable_nb as dn

    @dn.effect
    def tick(i):
        return i

    @dn.durable
    async def wf(ctx):
        print("BUSY", flush=True)
        t = time.monotonic()
        i = 0
        while time.monotonic() - t < float(sys.argv[1]):
            tick(i)
            i += 1
        print("IDLE", flush=True)
        await ctx.wait_signal("stop")
        return i

    dn.run(wf, run_id="busy")
"""


def test_a_busy_process_hands_the_store_over_and_an_outside_holder_is_named(
    tmp_path: Path,
) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(BUSY), "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DURABLE_NB_STORE": str(tmp_path / "s.duckdb")},
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "BUSY"
        # the busy process records without pause and never goes idle: it hands the file over
        for _ in range(3):
            store = DuckDBStore(tmp_path / "s.duckdb", lock_timeout=10, merge_interval=0.01)
            try:
                rec = store.get_run("busy")
                assert rec is not None and rec.status == "running"
                first = len(store.load_effects("run/busy"))
            finally:
                store.close()
            assert first > 0
        assert p.poll() is None  # still recording
    finally:
        p.kill()
        p.communicate()
    # a program outside durable_nb's queue (here a bare DuckDB connection) is waited for,
    # then named
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({str(tmp_path / 's.duckdb')!r}); "
            "print('HELD', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        with pytest.raises(
            StoreLockedError,
            match=(
                rf"^the store '.*s\.duckdb' is in use by another process \(PID {holder.pid}, "
                r".*\) and stayed busy for 0\.5s; wait until that kernel or script is idle"
            ),
        ):
            DuckDBStore(tmp_path / "s.duckdb", lock_timeout=0.5)
    finally:
        holder.kill()
        holder.communicate()
    store = DuckDBStore(tmp_path / "s.duckdb", lock_timeout=10)
    try:
        rec = store.get_run("busy")
        assert rec is not None and rec.status == "running"  # killed while running
        assert len(store.load_effects("run/busy")) > 100
    finally:
        store.close()


INTERRUPTIBLE = """
    import asyncio, os
    import durable_nb as dn

    def note(line):
        with open("exec.log", "a") as f:
            f.write(line + "\\n")

    @dn.effect
    async def first():
        note("exec first")
        return 1

    @dn.effect
    async def slow(n):
        note("exec slow")
        print("SLOW", flush=True)
        await asyncio.sleep(n)
        return 2

    @dn.durable
    async def wf(ctx, n):
        return await first() + await slow(n)

    try:
        print("RESULT", dn.run(wf, float(os.environ["PAUSE"]), run_id="ctrlc"), flush=True)
    except KeyboardInterrupt:
        print("INTERRUPTED", dn.get_job("ctrlc").status(), flush=True)
"""


def test_ctrl_c_stops_a_run_cleanly_and_leaves_it_resumable(tmp_path: Path) -> None:
    p = _child(tmp_path, INTERRUPTIBLE, PAUSE="60")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "SLOW"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.strip() == "INTERRUPTED interrupted"  # not claimable by a worker (issue 14)
    p = _child(
        tmp_path,
        INTERRUPTIBLE.replace("first() + await slow(n)", "first() + await slow(0)"),
        PAUSE="0",
    )
    out, err = p.communicate(timeout=30)
    assert "RESULT 3" in out, err
    assert (tmp_path / "exec.log").read_text().splitlines() == [
        "exec first",
        "exec slow",
        "exec slow",
    ]


def test_signal_from_the_cli_reaches_a_run_waiting_in_another_process(tmp_path: Path) -> None:
    p = _child(tmp_path, CLI_SIGNAL)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "WAITING"
    sent = subprocess.run(
        [
            sys.executable,
            "-m",
            "durable_nb",
            "--store",
            str(tmp_path / "s.duckdb"),
            "signal",
            "live",
            "approve",
            '{"by": "cli"}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert sent.returncode == 0, sent.stderr
    out, err = p.communicate(timeout=60)
    assert "RESULT {'by': 'cli'}" in out, err


CLI_SIGNAL = """
    import durable_nb as dn

    @dn.durable
    async def wf(ctx):
        print("WAITING", flush=True)
        return await ctx.wait_signal("approve")

    print("RESULT", dn.run(wf, run_id="live"), flush=True)
"""
