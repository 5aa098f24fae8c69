"""durable_nb's PostgreSQL store and workers, beside DBOS on the same PostgreSQL server.

Run ``python benchmarks/bench_postgres.py`` (``--quick`` for small sizes);
``benchmarks/run.py`` imports :func:`run` (part "postgres"), which returns rows
``{"name", "value", "unit"}``. Benchmarks report, they never assert. Needs a PostgreSQL
server (``$DURABLE_NB_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432/test``) and
the bench extra (dbos 3.4.0, psycopg). Every measurement uses a fresh schema of that database
(``dnb_bench_<hex>``, for DBOS its ``dbos_system_schema``), dropped afterwards.

1. **effects recorded per second**, in this process: a ``@dn.durable`` workflow awaiting n
   trivial async ``@dn.effect`` steps (step i returns i+1), through ``PostgresStore``;
   *sequential* is one run of n steps, *concurrent* is 50 runs of n/50 steps started at once
   with ``dn.start`` (they interleave on the engine's event loop). DBOS: an async
   ``@DBOS.workflow`` of async ``@DBOS.step`` calls, the same shapes (50 concurrent with
   ``asyncio.gather``), its system database in a fresh schema on the same server.
   effects/s = steps / wall time of all the runs (start to last result). Beside them, before
   and after, the **bare commit**: one-row INSERTs, each its own transaction, through
   psycopg with no engine (``commit_floor``); its latency bounds a sequential run, which
   records one effect per commit. ``--effects-only`` runs just these.
2. **claim latency**: one idle worker process (``Worker([...]).run()``) waits on the store;
   this process calls ``dn.start(claim, tag, on="worker")`` and the workflow's first effect
   returns ``time.time()`` from its first line. Latency = that stamp minus ``time.time()``
   taken just before ``dn.start`` (same machine, same clock); median and p95 over ~30 starts,
   0.05-0.15 s apart so the worker is asleep each time. Also: how long ``dn.start`` itself
   takes and when ``job.result()`` returns. DBOS's equivalent: a worker process (DBOS
   launched, the same workflow on a DBOS queue); this process enqueues with ``DBOSClient``.
   DBOS queues are polled (``polling_interval_sec``, default 1 s), not notified, so it is
   measured at its default and at a tuned 0.1 s.
3. **throughput with 1, 2 and 4 worker processes** (``concurrency=16`` each): after a warm-up,
   this process queues R runs of 10 effects (``dn.start(..., on="worker")``) and the
   figure is R / (time of the last run's completion, read from the runs table, minus the
   time before the first start). Also: the seconds to queue them, and the CPU this
   (starting) process used meanwhile, in cores (its jobs follow the runs through the
   store). DBOS: 1, 2, 4 processes on a queue with ``worker_concurrency=16`` and a 0.1 s
   poll, runs queued with ``DBOSClient.enqueue``.

4. **takeover of a SIGKILLed executor**: a process executes a run (``dn.run``, the store's
   default 30 s lease) and is SIGKILLed inside its 5th effect (an OOM-killed kernel); at once
   a fresh process runs the same run id (a restarted kernel running the cell again). The
   figure is from the kill to the fresh process's ``dn.run`` returning (the run completed),
   timed by this process on one clock; it includes the fresh interpreter's start-up and
   imports, also shown alone (a process that only imports durable_nb and exits). Median of
   several kills. Before this version it was the lease: 30.4 s.

The machine is shared and small (2 cores here): worker processes, this process and the
PostgreSQL server compete for the same cores, so the multi-worker figures say how the
claiming scales on one box, not on several.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import math
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

import durable_nb as dn  # noqa: E402

PG_URL = os.environ.get("DURABLE_NB_BENCH_PG") or "postgresql://postgres@127.0.0.1:5432/test"
KEY = "durable_nb benchmark key, not a secret"
DBOS_APP = "dnb-pg-bench"
DBOS_VERSION = "dnb-pg-bench-1"
DBOS_QUEUE = "dnb_bench_q"
CONCURRENCY = 16  # runs one worker process executes at once (durable_nb's default)
TUNED_POLL = 0.1  # DBOS queue polling interval for the tuned figures (its default is 1 s)

_STAMPS: list[int] = []
#: issue 18: a durable_nb queue with DBOS's setting in the throughput part (16 runs of it at
#: once per worker process); the workers publish it when they start
DN_QUEUE = "dnb_bench_q"
dn.queue(DN_QUEUE, worker_concurrency=CONCURRENCY)


# --------------------------------------------------------------------------- workload


@dn.effect(name="bench_pg.ainc")
async def ainc(i: int) -> int:
    return i + 1


@dn.effect(name="bench_pg.first")
async def first(tag: str) -> float:
    return time.time()


@dn.durable(name="bench_pg.steps")
async def steps(ctx: dn.Context, n: int) -> int:
    total = 0
    _STAMPS.append(time.perf_counter_ns())
    for i in range(n):
        total += await ainc(i)
        _STAMPS.append(time.perf_counter_ns())
    return total


@dn.durable(name="bench_pg.claim")
async def claim(ctx: dn.Context, tag: str) -> float:
    return await first(tag)


@dn.effect(name="bench_pg.slow")
async def slow(i: int, hang: bool) -> int:
    if hang and i == 4:
        print("inside", flush=True)  # the benchmark kills this process now
        await asyncio.sleep(3600)
    return i


@dn.durable(name="bench_pg.victim")
async def victim(ctx: dn.Context, n: int) -> int:
    hang = os.environ.get("DN_BENCH_HANG") == "1"
    total = 0
    for i in range(n):
        total += await slow(i, hang)
    return total


def _dbos_define(stamps: list[int]) -> dict[str, Any]:
    """Register the DBOS twins of the workflows above (before ``DBOS(config)``)."""
    from dbos import DBOS

    @DBOS.step(name="bench_pg_ainc")
    async def dbos_ainc(i: int) -> int:
        return i + 1

    @DBOS.step(name="bench_pg_first")
    async def dbos_first(tag: str) -> float:
        return time.time()

    @DBOS.workflow(name="bench_pg_steps")
    async def dbos_steps(n: int) -> int:
        total = 0
        stamps.append(time.perf_counter_ns())
        for i in range(n):
            total += await dbos_ainc(i)
            stamps.append(time.perf_counter_ns())
        return total

    @DBOS.workflow(name="bench_pg_claim")
    async def dbos_claim(tag: str) -> float:
        return await dbos_first(tag)

    return {"steps": dbos_steps, "claim": dbos_claim}


# --------------------------------------------------------------------------- helpers


def _row(name: str, value: Any, unit: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit}


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _url(schema: str) -> str:
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


def _admin() -> Any:
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def _fresh_schema(tag: str) -> Iterator[str]:
    """A schema name nobody uses; the schema (whoever created it) is dropped on exit."""
    from psycopg import sql

    name = f"dnb_bench_{tag}_{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        with _admin() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _dbos_config(schema: str, executor: str) -> dict[str, Any]:
    return {
        "name": DBOS_APP,
        "system_database_url": PG_URL,
        "dbos_system_schema": schema,
        "enable_otlp": False,
        "log_level": "WARNING",
        "application_version": DBOS_VERSION,
        "executor_id": executor,
    }


@contextlib.contextmanager
def _dbos_session(schema: str, stamps: list[int]) -> Iterator[dict[str, Any]]:
    from dbos import DBOS

    DBOS.destroy(destroy_registry=True)  # a leftover instance from an earlier failure
    wfs = _dbos_define(stamps)
    DBOS(config=_dbos_config(schema, "bench-main"))  # type: ignore[arg-type]
    try:
        DBOS.launch()
        yield wfs
    finally:
        DBOS.destroy(destroy_registry=True)


def _guard(label: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A failing measurement becomes one row saying so; the others still run."""
    try:
        return fn()
    except Exception as exc:
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        print(f"[bench_postgres] {label} failed: {text}", file=sys.stderr, flush=True)
        return [_row(f"{label}: FAILED", text[:300], "")]


# --------------------------------------------------------------------------- 1. effects/s


def _dn_effects(schema: str, n: int, runs: int) -> tuple[float, list[int]]:
    """effects/s of ``runs`` concurrent runs of n/runs steps (1 run: sequential)."""
    per = n // runs
    dn.set_store(_url(schema))
    dn.run(steps, 10, run_id="warm-up")  # pool, engine loop, code hashes
    _STAMPS.clear()
    t0 = time.perf_counter()
    jobs = [dn.start(steps, per, run_id=f"r{runs}-{i}") for i in range(runs)]
    results = [j.result(timeout=600) for j in jobs]
    wall = time.perf_counter() - t0
    if results != [per * (per + 1) // 2] * runs:
        raise AssertionError(f"durable_nb runs returned {results[:3]}...")
    stamps = list(_STAMPS) if runs == 1 else []
    dn.set_store(":memory:")  # closes the PostgreSQL store before its schema is dropped
    return per * runs / wall, stamps


def _dbos_effects(schema: str, n: int, runs: int) -> tuple[float, list[int]]:
    per = n // runs
    stamps: list[int] = []
    with _dbos_session(schema, stamps) as wfs:

        async def go(k: int, m: int) -> list[int]:
            return list(await asyncio.gather(*(wfs["steps"](m) for _ in range(k))))

        asyncio.run(go(1, 10))
        stamps.clear()
        t0 = time.perf_counter()
        results = asyncio.run(go(runs, per))
        wall = time.perf_counter() - t0
    if results != [per * (per + 1) // 2] * runs:
        raise AssertionError(f"DBOS runs returned {results[:3]}...")
    return per * runs / wall, (stamps if runs == 1 else [])


def _effects_rows(
    who: str,
    fn: Callable[[str, int, int], tuple[float, list[int]]],
    runs: int,
    label: str,
    n: int,
    repeats: int,
) -> list[dict[str, Any]]:
    rates: list[float] = []
    deltas: list[float] = []
    for rep in range(repeats):
        with _fresh_schema(f"eff{rep}") as schema:
            rate, stamps = fn(schema, n, runs)
        rates.append(rate)
        deltas += [(b - a) / 1000 for a, b in itertools.pairwise(stamps)]
    out = [
        _row(
            f"{who}: effects recorded per second, {label} ({n} steps), median",
            round(statistics.median(rates)),
            "effects/s",
        ),
        _row(
            f"{who}: effects recorded per second, {label}: range over {len(rates)} repeats",
            f"{min(rates):.0f}-{max(rates):.0f}",
            "effects/s",
        ),
    ]
    if deltas:
        out.append(
            _row(
                f"{who}: sequential step, in body, median",
                round(statistics.median(deltas), 1),
                "µs",
            )
        )
    return out


def commit_floor(n: int, when: str) -> list[dict[str, Any]]:
    """The server's own cost of one commit, with no engine at all: n one-row INSERTs into a
    fresh table, each its own transaction (autocommit, a prepared statement through psycopg),
    one after another on one connection. A sequential run records one effect per commit, so
    1 s / this latency bounds its effects/s whatever the client does; the WAL flush in it
    (``synchronous_commit=on``) varies with the host's disk from hour to hour, which is why
    the figure is taken in the same run, before and after the effects."""
    from psycopg import sql

    with _fresh_schema("floor") as schema, _admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        table = sql.Identifier(schema, "t")
        conn.execute(sql.SQL("CREATE TABLE {} (k bigint PRIMARY KEY, v bytea)").format(table))
        insert = sql.SQL("INSERT INTO {} (k, v) VALUES (%s, %s)").format(table)
        lat: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            conn.execute(insert, (i, b"x" * 40), prepare=True)
            lat.append((time.perf_counter() - t0) * 1e6)
    median = statistics.median(lat)
    return [
        _row(f"bare one-row INSERT commit ({when}), median", round(median), "µs"),
        _row(
            f"bare one-row INSERT commit ({when}): the sequential ceiling it sets",
            round(1e6 / median),
            "commits/s",
        ),
    ]


def effects_per_second(
    n: int, concurrent: int, repeats: int, steady_n: int
) -> list[dict[str, Any]]:
    """Sequential and concurrent effects/s of both engines with ``n`` steps in all (so with
    ``concurrent`` runs, n/concurrent steps a run, each run's start and end included), and
    durable_nb's concurrent figure again with ``steady_n`` steps, where the runs' starts and
    ends weigh little (DBOS's rate does not depend on it, and at ~300 steps/s it would take
    minutes)."""
    rows: list[dict[str, Any]] = []
    for who, fn in (("durable_nb", _dn_effects), ("DBOS", _dbos_effects)):
        for runs, label in (
            (1, "sequential, 1 run"),
            (concurrent, f"{concurrent} concurrent runs"),
        ):
            measure = functools.partial(_effects_rows, who, fn, runs, label, n, repeats)
            rows += _guard(f"{who}: effects per second, {label}", measure)
        if who == "durable_nb":
            label = f"{concurrent} concurrent runs of {steady_n // concurrent} steps"
            measure = functools.partial(
                _effects_rows, who, fn, concurrent, label, steady_n, repeats
            )
            rows += _guard(f"{who}: effects per second, {label}", measure)
    return rows


# --------------------------------------------------------------------------- processes


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full.get("PYTHONPATH")) if p)
    full.update(env)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args],
        env=full,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 60) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return
        if not line and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"worker exited {proc.returncode}: {err.strip()[-500:]}")
    raise RuntimeError("worker did not become ready")


@contextlib.contextmanager
def _workers(
    kind: str, count: int, schema: str, poll: float = TUNED_POLL
) -> Iterator[list[subprocess.Popen[str]]]:
    """``count`` worker processes of durable_nb ("dn") or DBOS ("dbos") on ``schema``, ready;
    stopped on exit (durable_nb: SIGTERM, a graceful stop; DBOS: stdin closed)."""
    env = {"DURABLE_NB_STORE": _url(schema), "DURABLE_NB_KEY": KEY}
    procs: list[subprocess.Popen[str]] = []
    try:
        for k in range(count):
            if kind == "dn":
                args = ["--dn-worker", str(CONCURRENCY)]
            else:
                args = ["--dbos-worker", schema, f"w{k}", str(CONCURRENCY), str(poll)]
            procs.append(_spawn(args, env))
            if kind == "dbos" and k == 0:
                _wait_ready(procs[0], 120)  # the first one creates DBOS's schema alone
        for p in procs[1:] if kind == "dbos" else procs:
            _wait_ready(p, 120)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                if kind == "dn":
                    p.send_signal(signal.SIGTERM)
                elif p.stdin is not None:
                    with contextlib.suppress(OSError):
                        p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode not in (0, -signal.SIGTERM) and p.stderr is not None:
                print(
                    f"[bench_postgres] {kind} worker exited {p.returncode}: "
                    f"{p.stderr.read().strip()[-500:]}",
                    file=sys.stderr,
                )


def _dn_worker(concurrency: int) -> None:
    from durable_nb.worker import Worker

    worker = Worker([steps, claim], concurrency=concurrency, grace=10)
    dn.get_store()  # opened before "ready"
    print("ready", flush=True)
    worker.run()


def _dbos_worker(schema: str, executor: str, concurrency: int, poll: float) -> None:
    from dbos import DBOS

    _dbos_define([])
    DBOS(config=_dbos_config(schema, executor))  # type: ignore[arg-type]
    DBOS.launch()
    DBOS.register_queue(
        DBOS_QUEUE,
        worker_concurrency=concurrency,
        polling_interval_sec=poll,
        on_conflict="always_update",
    )
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    DBOS.destroy()


@contextlib.contextmanager
def _dbos_client(schema: str) -> Iterator[Any]:
    from dbos import DBOSClient

    client = DBOSClient(
        system_database_url=PG_URL, dbos_system_schema=schema, application_name=DBOS_APP
    )
    try:
        yield client
    finally:
        client.destroy()


def _dbos_enqueue(client: Any, workflow: str, wfid: str, *args: Any) -> Any:
    options = {
        "queue_name": DBOS_QUEUE,
        "workflow_name": workflow,
        "workflow_id": wfid,
        "app_version": DBOS_VERSION,
    }
    return client.enqueue(options, *args)


# --------------------------------------------------------------------------- 2. claim latency


def _pause() -> None:
    # a random phase against the pollers (DBOS polls its queue, durable_nb re-checks every
    # second) and time for the worker to go back to sleep
    time.sleep(random.uniform(0.05, 1.05))


def _latency_rows(who: str, lat_ms: list[float]) -> list[dict[str, Any]]:
    return [
        _row(f"{who}: median", round(statistics.median(lat_ms), 1), "ms"),
        _row(f"{who}: p95", round(_pct(lat_ms, 0.95), 1), "ms"),
        _row(f"{who}: starts measured", len(lat_ms), "starts"),
    ]


def dn_claim_latency(starts: int) -> list[dict[str, Any]]:
    lat: list[float] = []
    call: list[float] = []
    seen: list[float] = []
    with _fresh_schema("claim") as schema, _workers("dn", 1, schema):
        dn.set_store(_url(schema))
        try:
            for i in range(-3, starts):  # three warm-up starts
                _pause()
                t0 = time.time()
                job = dn.start(claim, f"c{i}", run_id=f"claim-{i}", on="worker")
                t1 = time.time()
                stamp = job.result(timeout=60)
                t2 = time.time()
                if i >= 0:
                    lat.append((stamp - t0) * 1000)
                    call.append((t1 - t0) * 1000)
                    seen.append((t2 - t0) * 1000)
        finally:
            dn.set_store(":memory:")
    who = "durable_nb claim latency (dn.start on='worker' to the effect's first line)"
    return [
        *_latency_rows(who, lat),
        _row(
            "durable_nb: the dn.start(on='worker') call itself, median",
            round(statistics.median(call), 1),
            "ms",
        ),
        _row(
            "durable_nb: dn.start to job.result() returning in the starting process, median",
            round(statistics.median(seen), 1),
            "ms",
        ),
    ]


def dbos_claim_latency(starts: int, poll: float) -> list[dict[str, Any]]:
    lat: list[float] = []
    with (
        _fresh_schema("dbosclaim") as schema,
        _workers("dbos", 1, schema, poll=poll),
        _dbos_client(schema) as client,
    ):
        for i in range(-3, starts):
            _pause()
            t0 = time.time()
            handle = _dbos_enqueue(client, "bench_pg_claim", f"claim-{i}", f"c{i}")
            stamp = handle.get_result(polling_interval_sec=0.01)
            if i >= 0:
                lat.append((stamp - t0) * 1000)
    default = " (its default)" if poll == 1.0 else ""
    return _latency_rows(
        f"DBOS queue pick-up latency (DBOSClient.enqueue to the step's first line), "
        f"queue polled every {poll:g} s{default}",
        lat,
    )


# --------------------------------------------------------------------------- 3. throughput


def _wait_completed(schema: str, table: str, prefix: str, n: int, timeout: float) -> float:
    """Poll the runs table until the ``n`` runs whose ids start with ``prefix`` completed;
    the last one's completion time (epoch seconds, the writer's clock)."""
    from psycopg import sql

    if table == "dn_runs":
        q = sql.SQL(
            "SELECT count(*), max(updated_at) FROM {}.dn_runs "
            "WHERE status = 'completed' AND run_id LIKE %s"
        ).format(sql.Identifier(schema))
    else:  # DBOS keeps epoch milliseconds
        q = sql.SQL(
            "SELECT count(*), max(updated_at) / 1000.0 FROM {}.workflow_status "
            "WHERE status = 'SUCCESS' AND workflow_uuid LIKE %s"
        ).format(sql.Identifier(schema))
    deadline = time.monotonic() + timeout
    count = 0
    with _admin() as conn:
        while time.monotonic() < deadline:
            count, last = conn.execute(q, [prefix + "%"]).fetchone()
            if count >= n:
                return float(last)
            time.sleep(0.02)
    raise TimeoutError(f"only {count} of {n} runs completed within {timeout:g} s")


def _expected(n: int) -> int:
    return n * (n + 1) // 2


def _cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) the processes used so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


def _server_cpu() -> float:
    """CPU seconds the PostgreSQL server (postmaster and every backend, also other users')
    used so far: the live processes' own, plus what the postmaster collected from backends
    that ended (a connection opened and closed during a measurement counts too)."""
    total = 0.0
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if (entry / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            parent = Path(f"/proc/{fields[1]}/comm")
            if not parent.exists() or parent.read_text().strip() not in ("postgres", "postmaster"):
                total += int(fields[13]) + int(fields[14])  # the postmaster: its ended children
    return total / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


Measured = tuple[float, float, float, float, float]


def dn_queue_throughput(workers: int, n_runs: int, n_effects: int, repeats: int) -> list[Measured]:
    """As :func:`dn_throughput`, the runs started on queue ``DN_QUEUE``
    (``worker_concurrency=16``, as DBOS's queue here): the claims count the queue's runs."""
    return dn_throughput(workers, n_runs, n_effects, repeats, queue=DN_QUEUE)


def dn_throughput(
    workers: int, n_runs: int, n_effects: int, repeats: int, queue: str | None = None
) -> list[Measured]:
    """Per repeat, on one schema and one set of workers: (runs/s, seconds to queue the runs,
    CPU cores this process used meanwhile, CPU cores of the workers, CPU cores of the
    PostgreSQL server)."""
    out: list[Measured] = []
    with _fresh_schema(f"tp{workers}") as schema, _workers("dn", workers, schema) as procs:
        dn.set_store(_url(schema))
        try:
            warm = [dn.start(steps, 2, run_id=f"warm-{i}", on="worker") for i in range(4 * workers)]
            for job in warm:
                job.result(timeout=60)
            for rep in range(repeats):
                time.sleep(0.5)  # the workers (and their watchers) settle
                w0, s0 = _cpu([p.pid for p in procs]), _server_cpu()
                t0, c0 = time.time(), time.process_time()
                jobs = [
                    dn.start(steps, n_effects, run_id=f"tp{rep}-{i}", on="worker", queue=queue)
                    for i in range(n_runs)
                ]
                queued = time.time() - t0
                last = _wait_completed(schema, "dn_runs", f"tp{rep}-", n_runs, 600)
                cpu = time.process_time() - c0
                w1, s1, t1 = _cpu([p.pid for p in procs]), _server_cpu(), time.time()
                for job in jobs:  # every run's result, through its job, is right
                    if job.result(timeout=60) != _expected(n_effects):
                        raise AssertionError(f"run {job.run_id} returned a wrong result")
                span = last - t0
                out.append(
                    (
                        n_runs / span,
                        queued,
                        cpu / span,
                        (w1 - w0) / (t1 - t0),
                        (s1 - s0) / (t1 - t0),
                    )
                )
        finally:
            dn.set_store(":memory:")
    return out


def dbos_throughput(workers: int, n_runs: int, n_effects: int, repeats: int) -> list[Measured]:
    out: list[Measured] = []
    with (
        _fresh_schema(f"dbostp{workers}") as schema,
        _workers("dbos", workers, schema) as procs,
        _dbos_client(schema) as client,
    ):
        warm = [_dbos_enqueue(client, "bench_pg_steps", f"warm-{i}", 2) for i in range(4 * workers)]
        for h in warm:
            h.get_result(polling_interval_sec=0.05)
        for rep in range(repeats):
            time.sleep(0.5)
            w0, s0 = _cpu([p.pid for p in procs]), _server_cpu()
            t0, c0 = time.time(), time.process_time()
            handles = [
                _dbos_enqueue(client, "bench_pg_steps", f"tp{rep}-{i}", n_effects)
                for i in range(n_runs)
            ]
            queued = time.time() - t0
            last = _wait_completed(schema, "workflow_status", f"tp{rep}-", n_runs, 600)
            cpu = time.process_time() - c0
            w1, s1, t1 = _cpu([p.pid for p in procs]), _server_cpu(), time.time()
            for h in handles:
                if h.get_result(polling_interval_sec=0.05) != _expected(n_effects):
                    raise AssertionError(f"DBOS run {h.get_workflow_id()} returned a wrong result")
            span = last - t0
            out.append(
                (n_runs / span, queued, cpu / span, (w1 - w0) / (t1 - t0), (s1 - s0) / (t1 - t0))
            )
    return out


def _throughput_rows(
    who: str,
    fn: Callable[[int, int, int, int], list[Measured]],
    k: int,
    n_runs: int,
    n_effects: int,
    repeats: int,
) -> list[dict[str, Any]]:
    what = f"{k} worker process{'es' if k > 1 else ''}"
    got = fn(k, n_runs, n_effects, repeats)
    rates = [g[0] for g in got]
    rate = statistics.median(rates)
    return [
        _row(
            f"{who} throughput, {what} ({n_runs} runs x {n_effects} effects), median",
            round(rate, 1),
            "runs/s",
        ),
        _row(f"{who} throughput, {what}: effects", round(rate * n_effects), "effects/s"),
        _row(
            f"{who} throughput, {what}: range over {len(rates)} repeats",
            f"{min(rates):.1f}-{max(rates):.1f}",
            "runs/s",
        ),
        _row(
            f"{who} throughput, {what}: queueing the {n_runs} runs (one process)",
            round(statistics.median(g[1] for g in got), 2),
            "s",
        ),
        _row(
            f"{who} throughput, {what}: CPU of the starting process (queueing, following the "
            "runs) per second of the measurement",
            round(statistics.median(g[2] for g in got), 2),
            "cores",
        ),
        _row(
            f"{who} throughput, {what}: CPU of the worker processes together, per second",
            round(statistics.median(g[3] for g in got), 2),
            "cores",
        ),
        _row(
            f"{who} throughput, {what}: CPU of the PostgreSQL server (all its processes, "
            "also other users'), per second",
            round(statistics.median(g[4] for g in got), 2),
            "cores",
        ),
    ]


def throughput(
    counts: Sequence[int], n_runs: int, n_effects: int, repeats: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for who, fn in (
        ("durable_nb", dn_throughput),
        (f"durable_nb on a queue (worker_concurrency={CONCURRENCY})", dn_queue_throughput),
        ("DBOS", dbos_throughput),
    ):
        for k in counts:
            measure = functools.partial(_throughput_rows, who, fn, k, n_runs, n_effects, repeats)
            rows += _guard(f"{who} throughput, {k} worker processes", measure)
    return rows


# --------------------------------------------------------------------------- 4. takeover


def _takeover_child(run_id: str) -> None:
    """``--takeover RUN``: execute (or take over) the run, print when it completed."""
    dn.run(victim, 10, run_id=run_id)
    print(f"done {time.time()!r}", flush=True)


def takeover(kills: int) -> list[dict[str, Any]]:
    seconds: list[float] = []
    bare: list[float] = []
    with _fresh_schema("takeover") as schema:
        env = {"DURABLE_NB_STORE": _url(schema), "DURABLE_NB_KEY": KEY}  # default 30 s lease
        for k in range(kills):
            run_id = f"victim-{k}"
            proc = _spawn(["--takeover", run_id], {**env, "DN_BENCH_HANG": "1"})
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "inside":
                raise RuntimeError(f"the victim said {line!r}: {proc.stderr.read()[-500:]}")
            proc.send_signal(signal.SIGKILL)
            killed = time.time()
            proc.wait()
            fresh = _spawn(["--takeover", run_id], env)
            out, err = fresh.communicate(timeout=120)
            if fresh.returncode != 0 or not out.startswith("done "):
                raise RuntimeError(f"the fresh process failed: {err.strip()[-500:]}")
            seconds.append(float(out.split()[1]) - killed)
            t0 = time.time()
            imports = _spawn(["--import-only"], env)
            imports.communicate(timeout=60)
            bare.append(time.time() - t0)
    return [
        _row(
            "durable_nb: SIGKILL of the executing process to the run completed from a fresh "
            "process (default 30 s lease), median",
            round(statistics.median(seconds), 3),
            "s",
        ),
        _row(
            f"durable_nb: takeover after SIGKILL: range over {len(seconds)} kills",
            f"{min(seconds):.3f}-{max(seconds):.3f}",
            "s",
        ),
        _row(
            "durable_nb: of which a fresh interpreter importing durable_nb and exiting, median",
            round(statistics.median(bare), 3),
            "s",
        ),
    ]


# --------------------------------------------------------------------------- main


def run(
    n_effects: int = 2000,
    steady_effects: int = 20_000,
    concurrent: int = 50,
    repeats: int = 3,
    claim_starts: int = 30,
    dbos_default_starts: int = 15,
    kills: int = 7,
    worker_counts: Sequence[int] = (1, 2, 4),
    tp_runs: int = 200,
    tp_effects: int = 10,
    floor_commits: int = 2000,
    effects_only: bool = False,
) -> list[dict[str, Any]]:
    os.environ.setdefault("DURABLE_NB_KEY", KEY)
    import psycopg

    with _admin() as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    rows = [
        _row("PostgreSQL server", f"{server} (synchronous_commit={sync})", ""),
        _row("psycopg", psycopg.__version__, ""),
        _row(
            "1-minute load average at the start (2 cores: above ~1 means others ran)",
            round(os.getloadavg()[0], 2),
            "",
        ),
    ]
    rows += commit_floor(floor_commits, "before the effects")
    rows += effects_per_second(n_effects, concurrent, repeats, steady_effects)
    rows += commit_floor(floor_commits, "after the effects")
    if effects_only:
        rows.append(_row("1-minute load average at the end", round(os.getloadavg()[0], 2), ""))
        return rows
    rows += _guard("durable_nb takeover after SIGKILL", lambda: takeover(kills))
    rows += _guard("durable_nb claim latency", lambda: dn_claim_latency(claim_starts))
    rows += _guard(
        f"DBOS pick-up latency, poll {TUNED_POLL:g} s",
        lambda: dbos_claim_latency(claim_starts, TUNED_POLL),
    )
    rows += _guard(
        "DBOS pick-up latency, poll 1 s", lambda: dbos_claim_latency(dbos_default_starts, 1.0)
    )
    rows += throughput(worker_counts, tp_runs, tp_effects, repeats)
    rows.append(_row("1-minute load average at the end", round(os.getloadavg()[0], 2), ""))
    return rows


QUICK: dict[str, Any] = {
    "n_effects": 500,
    "steady_effects": 2000,
    "repeats": 1,
    "claim_starts": 10,
    "dbos_default_starts": 4,
    "kills": 3,
    "tp_runs": 40,
    "floor_commits": 300,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the part")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the worker throughput figures (1 and 2 worker processes)",
    )
    parser.add_argument(
        "--effects-only",
        action="store_true",
        help="only the effects/s figures (both engines) and the bare commit beside them",
    )
    parser.add_argument("--dn-worker", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--dbos-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--takeover", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--import-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dn_worker:
        _dn_worker(int(args.dn_worker[0]))
        return 0
    if args.takeover:
        _takeover_child(args.takeover[0])
        return 0
    if args.import_only:
        return 0
    if args.dbos_worker:
        schema, executor, conc, poll = args.dbos_worker
        _dbos_worker(schema, executor, int(conc), float(poll))
        return 0
    if args.throughput_only:
        os.environ.setdefault("DURABLE_NB_KEY", KEY)
        sizes = QUICK if args.quick else {}
        rows = [_row("1-minute load average at the start", round(os.getloadavg()[0], 2), "")]
        rows += throughput((1, 2), sizes.get("tp_runs", 200), 10, sizes.get("repeats", 3))
        rows.append(_row("1-minute load average at the end", round(os.getloadavg()[0], 2), ""))
        for row in rows:
            print(f"{row['name']:<100} {row['value']!s:>12} {row['unit']}")
        return 0
    for row in run(**(QUICK if args.quick else {}), effects_only=args.effects_only):
        print(f"{row['name']:<100} {row['value']!s:>12} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
