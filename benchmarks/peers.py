"""The peers half of the benchmark suite: Duron, DBOS and joblib on the same workloads.

Everything runs in-process (DBOS's crash-recovery figure also starts one child process
that it kills on purpose) and cleans up its temp dirs. Every public function returns plain
figures, or ``{"error": "..."}`` when its peer is not installed or fails, so a later run
can put durable_nb's own numbers beside these in one table.

Install the peers with ``pip install -e '.[bench]'`` (duron==0.0.3, dbos==3.4.0, joblib).
Run ``python benchmarks/peers.py`` (``--json PATH`` also writes the figures as JSON).

Naming of the figures:

- ``*_step_median_us`` / ``*_step_p99_us``: per-step time measured *inside* the workflow
  body with ``time.perf_counter_ns()`` taken after each step returns (the gap between two
  consecutive steps, so it includes the engine's bookkeeping and log write or lookup).
- ``*_wall_per_step_us``: total wall time of the whole workflow run divided by n (includes
  session/workflow start-up and completion), the median over the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")

# Set only in the DBOS crash child: the workflow hard-exits after this many steps.
_DBOS_CRASH_AFTER: int | None = None
_DBOS_APP = "dnb-peers-bench"
_DBOS_APP_VERSION = "dnb-peers-bench-1"


# --------------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _step_stats(prefix: str, deltas_ns: list[int]) -> dict[str, float]:
    us = [d / 1000 for d in deltas_ns]
    return {
        f"{prefix}_step_median_us": round(statistics.median(us), 1),
        f"{prefix}_step_p99_us": round(_p99(us), 1),
    }


def _deltas(stamps: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(stamps)]


@contextlib.contextmanager
def _tempdir(tag: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=f"dnb-peers-{tag}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _off_loop(fn: Callable[[], _T]) -> _T:
    """Run ``fn()`` here, or in a fresh thread when this thread already runs an asyncio loop
    (a Jupyter cell): ``asyncio.run`` fails there, and DBOS refuses e.g. ``fork_workflow``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="dnb-peers-bench")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: _T = box["value"]
    return value


def _run_coro(factory: Callable[[], Any]) -> Any:
    return _off_loop(lambda: asyncio.run(factory()))


def _guarded(fn: Callable[[], _T]) -> _T | dict[str, str]:
    try:
        return _off_loop(fn)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------- Duron


def duron_record_replay(n_steps: int = 1000, repeats: int = 3) -> dict[str, Any]:
    """Duron 0.0.3: a workflow of n trivial sequential ``ctx.run`` steps (each returns i+1).

    Recording runs the workflow against an empty log; replay opens a new Session on the
    same (now complete) log and starts the same workflow, which re-runs the body and feeds
    every step its logged result. Done for the file log (JSON lines, flushed, no fsync)
    and the in-memory log.
    """
    try:
        import duron
        from duron.contrib.storage import FileLogStorage, MemoryLogStorage
    except ImportError as exc:
        return {"error": f"duron not installed: {exc}"}

    def inner() -> dict[str, Any]:
        stamps: list[int] = []

        def inc(i: int) -> int:
            return i + 1

        @duron.durable
        async def bench_wf(ctx: duron.Context, n: int) -> int:
            total = 0
            stamps.append(time.perf_counter_ns())
            for i in range(n):
                total += await ctx.run(inc, i)
                stamps.append(time.perf_counter_ns())
            return total

        expected = n_steps * (n_steps + 1) // 2

        async def one_run(log: Any) -> tuple[list[int], float]:
            stamps.clear()
            t0 = time.perf_counter_ns()
            async with duron.Session(log) as session:
                task = await session.start(bench_wf, n_steps)
                result = await task.result()
            wall = (time.perf_counter_ns() - t0) / n_steps / 1000
            if result != expected:
                raise AssertionError(f"duron returned {result}, expected {expected}")
            if len(stamps) != n_steps + 1:
                raise AssertionError(f"duron body saw {len(stamps) - 1} steps")
            return _deltas(stamps), wall

        async def measure() -> dict[str, Any]:
            out: dict[str, Any] = {"version": _version("duron"), "n_steps": n_steps}
            with _tempdir("duron") as tmp:
                for kind in ("file", "memory"):
                    acc: dict[str, list[Any]] = {"record": [], "replay": []}
                    walls: dict[str, list[float]] = {"record": [], "replay": []}
                    for rep in range(repeats):
                        if kind == "file":
                            path = os.path.join(tmp, f"log-{rep}.jsonl")
                            first: Any = FileLogStorage(path)
                            second: Any = FileLogStorage(path)
                        else:
                            first = MemoryLogStorage()
                            second = first
                        for phase, log in (("record", first), ("replay", second)):
                            deltas, wall = await one_run(log)
                            acc[phase].extend(deltas)
                            walls[phase].append(wall)
                    for phase in ("record", "replay"):
                        out.update(_step_stats(f"{kind}_{phase}", acc[phase]))
                        out[f"{kind}_{phase}_wall_per_step_us"] = round(
                            statistics.median(walls[phase]), 1
                        )
                    if kind == "file":
                        size = os.path.getsize(os.path.join(tmp, "log-0.jsonl"))
                        out["file_log_bytes_per_step"] = round(size / n_steps, 1)
            return out

        result: dict[str, Any] = _run_coro(measure)
        return result

    return _guarded(inner)


# --------------------------------------------------------------------------- DBOS


def _dbos_config(db_path: str) -> dict[str, Any]:
    # No conductor key, OTLP off (it is off unless enable_otlp=True; no endpoints given), so
    # DBOS opens no network connection (checked with strace: only AF_UNIX connects).
    return {
        "name": _DBOS_APP,
        "system_database_url": f"sqlite:///{db_path}",
        "enable_otlp": False,
        "log_level": "WARNING",
        "application_version": _DBOS_APP_VERSION,
        "executor_id": "local",
    }


def _dbos_define(stamps: list[int], state: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Register the benchmark workflows; identical in the parent and the crash child."""
    from dbos import DBOS

    @DBOS.step(name="dnb_bench_inc")
    def inc(i: int) -> int:
        return i + 1

    @DBOS.workflow(name="dnb_bench_wf")
    def bench_wf(n: int) -> int:
        total = 0
        stamps.append(time.perf_counter_ns())
        for i in range(n):
            total += inc(i)
            stamps.append(time.perf_counter_ns())
            if _DBOS_CRASH_AFTER is not None and i + 1 >= _DBOS_CRASH_AFTER:
                os._exit(0)  # a crash: the workflow stays PENDING with all steps recorded
        return total

    @DBOS.step(name="dnb_bench_echo")
    def echo(x: str) -> str:
        state["executed"].append(x)
        return f"result-for-{x}"

    @DBOS.workflow(name="dnb_bench_stale_wf")
    def stale_wf(wf_arg: str) -> str:
        # the step's argument is the workflow argument unless the "code" (state) overrides it
        arg = state.get("code_arg") or wf_arg
        return echo(arg)

    return bench_wf, stale_wf, state


@contextlib.contextmanager
def _dbos_session(db_path: str, define: Callable[[], _T]) -> Iterator[_T]:
    """A fresh DBOS instance and registry: ``define()`` registers the workflows, then
    ``DBOS(config)``; destroyed (instance and registry) on exit."""
    from dbos import DBOS

    DBOS.destroy(destroy_registry=True)  # a leftover instance from an earlier failure
    defined = define()
    DBOS(config=_dbos_config(db_path))  # type: ignore[arg-type]
    try:
        yield defined
    finally:
        DBOS.destroy(destroy_registry=True)


def dbos_record_replay(n_steps: int = 200, repeats: int = 3) -> dict[str, Any]:
    """DBOS 3.4 on SQLite: a @DBOS.workflow of n trivial sequential @DBOS.step calls.

    - record: a new workflow id per repeat (``with SetWorkflowID(id): wf(n)``).
    - rerun_completed: the same call again with the same id. DBOS does NOT re-run the body
      of a completed workflow: it returns the stored workflow output, so this is one
      lookup, reported as wall/n only.
    - fork_replay: ``DBOS.fork_workflow(id, start_step=n+1)`` copies all n step outputs to
      a new workflow and runs it through DBOS's internal queue; the body re-runs and every
      step is read from its checkpoint. Per-step figures come from inside the body; the
      wall figure includes the queue's dispatch delay (its poll interval is ~1 s).
    - recovery_replay: a child process records the n steps and hard-exits inside the
      workflow (a crash); a fresh DBOS.launch() on the same database recovers the PENDING
      workflow and re-runs the body, each step replayed from its checkpoint.
    """
    try:
        import dbos  # noqa: F401
        from dbos import DBOS, SetWorkflowID
    except ImportError as exc:
        return {"error": f"dbos not installed: {exc}"}

    def inner() -> dict[str, Any]:
        out: dict[str, Any] = {"version": _version("dbos"), "n_steps": n_steps}
        expected = n_steps * (n_steps + 1) // 2
        with _tempdir("dbos") as tmp:
            db_path = os.path.join(tmp, "dbos.sqlite")
            stamps: list[int] = []
            with _dbos_session(db_path, lambda: _dbos_define(stamps, {"executed": []})) as (
                bench_wf,
                _,
                _,
            ):
                t0 = time.perf_counter_ns()
                DBOS.launch()
                out["launch_ms"] = round((time.perf_counter_ns() - t0) / 1e6, 1)
                rec: list[int] = []
                rec_wall: list[float] = []
                rerun_wall: list[float] = []
                fork_steps: list[int] = []
                fork_wall: list[float] = []
                for rep in range(repeats):
                    wfid = f"bench-{rep}"
                    stamps.clear()
                    t0 = time.perf_counter_ns()
                    with SetWorkflowID(wfid):
                        result = bench_wf(n_steps)
                    rec_wall.append((time.perf_counter_ns() - t0) / n_steps / 1000)
                    if result != expected or len(stamps) != n_steps + 1:
                        raise AssertionError(f"dbos record returned {result}")
                    rec.extend(_deltas(stamps))

                    stamps.clear()
                    t0 = time.perf_counter_ns()
                    with SetWorkflowID(wfid):
                        result = bench_wf(n_steps)
                    rerun_wall.append((time.perf_counter_ns() - t0) / n_steps / 1000)
                    if result != expected:
                        raise AssertionError(f"dbos rerun returned {result}")
                    out["rerun_completed_body_executed"] = bool(stamps)

                    stamps.clear()
                    t0 = time.perf_counter_ns()
                    handle = DBOS.fork_workflow(wfid, n_steps + 1)
                    result = handle.get_result()
                    fork_wall.append((time.perf_counter_ns() - t0) / n_steps / 1000)
                    if result != expected or len(stamps) != n_steps + 1:
                        raise AssertionError(f"dbos fork returned {result}")
                    fork_steps.extend(_deltas(stamps))
                out.update(_step_stats("record", rec))
                out["record_wall_per_step_us"] = round(statistics.median(rec_wall), 1)
                out["rerun_completed_wall_per_step_us"] = round(statistics.median(rerun_wall), 1)
                out.update(_step_stats("fork_replay", fork_steps))
                out["fork_replay_wall_per_step_us"] = round(statistics.median(fork_wall), 1)
            out.update(_dbos_recovery(tmp, n_steps, expected))
        return out

    return _guarded(inner)


def _dbos_recovery(tmp: str, n_steps: int, expected: int) -> dict[str, Any]:
    from dbos import DBOS

    db_path = os.path.join(tmp, "dbos-crash.sqlite")
    wfid = "bench-crash"
    child = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--dbos-crash-child",
            db_path,
            wfid,
            str(n_steps),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if child.returncode != 0:
        return {"recovery_error": f"crash child exited {child.returncode}: {child.stderr[-500:]}"}
    stamps: list[int] = []
    with _dbos_session(db_path, lambda: _dbos_define(stamps, {"executed": []})):
        t0 = time.perf_counter_ns()
        DBOS.launch()  # finds the PENDING workflow and re-enqueues it for recovery
        result: Any = DBOS.retrieve_workflow(wfid).get_result()
        wall = (time.perf_counter_ns() - t0) / n_steps / 1000
    if result != expected or len(stamps) != n_steps + 1:
        return {"recovery_error": f"recovered result {result}, {len(stamps) - 1} steps"}
    out: dict[str, Any] = _step_stats("recovery_replay", _deltas(stamps))
    out["recovery_replay_wall_per_step_us"] = round(wall, 1)
    return out


def _dbos_crash_child(db_path: str, wfid: str, n_steps: int) -> None:
    global _DBOS_CRASH_AFTER
    from dbos import DBOS, SetWorkflowID

    _DBOS_CRASH_AFTER = n_steps
    bench_wf, _, _ = _dbos_define([], {"executed": []})
    DBOS(config=_dbos_config(db_path))  # type: ignore[arg-type]
    DBOS.launch()
    with SetWorkflowID(wfid):
        bench_wf(n_steps)
    sys.exit(3)  # not reached: the workflow hard-exits with 0 after its last step


# --------------------------------------------------------------------------- joblib


def joblib_hash_gbps(nbytes: int = 100_000_000, repeats: int = 3) -> float | dict[str, str]:
    """joblib.hash (md5 over its pickle stream) of a float64 numpy array, GB/s (1e9 B/s).

    Median of ``repeats`` runs after one warm-up. Returns {"error": ...} instead of a float
    when joblib or numpy is missing.
    """
    try:
        import joblib  # type: ignore[import-untyped]
        import numpy as np
    except ImportError as exc:
        return {"error": f"joblib/numpy not installed: {exc}"}

    def inner() -> float:
        arr = np.random.default_rng(0).random(max(1, nbytes // 8))
        joblib.hash(arr[: min(len(arr), 1_000_000)])  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            joblib.hash(arr)
            times.append(time.perf_counter_ns() - t0)
        return round(arr.nbytes / statistics.median(times), 3)  # bytes/ns == GB/s

    return _guarded(inner)


def joblib_memory_call(n_calls: int = 300, large_nbytes: int = 0) -> dict[str, Any]:
    """joblib.Memory per-call overhead for a trivial function (x + 1) of a small int, µs.

    miss: a new argument each call (hash, run, write to the on-disk cache); hit: an
    argument already cached. With ``large_nbytes`` > 0 also a float64 array argument of
    that size, hit and miss in ms (joblib hashes the whole argument on every call).
    """
    try:
        import joblib
    except ImportError as exc:
        return {"error": f"joblib not installed: {exc}"}

    def trivial(x: Any) -> Any:
        return x + 1

    def inner() -> dict[str, Any]:
        out: dict[str, Any] = {"version": _version("joblib"), "n_calls": n_calls}
        with _tempdir("joblib") as tmp:
            memory = joblib.Memory(location=tmp, verbose=0)
            cached = memory.cache(trivial)
            cached(-1)  # creates the function's cache folder
            miss, hit = [], []
            for i in range(n_calls):
                t0 = time.perf_counter_ns()
                cached(i)
                miss.append(time.perf_counter_ns() - t0)
            for i in range(n_calls):
                t0 = time.perf_counter_ns()
                cached(i)
                hit.append(time.perf_counter_ns() - t0)
            out.update(
                {
                    "miss_median_us": round(statistics.median(miss) / 1000, 1),
                    "miss_p99_us": round(_p99(miss) / 1000, 1),
                    "hit_median_us": round(statistics.median(hit) / 1000, 1),
                    "hit_p99_us": round(_p99(hit) / 1000, 1),
                }
            )
            if large_nbytes > 0:
                import numpy as np

                arr = np.random.default_rng(1).random(max(1, large_nbytes // 8))
                t0 = time.perf_counter_ns()
                cached(arr)
                out["large_arg_bytes"] = arr.nbytes
                out["large_arg_miss_ms"] = round((time.perf_counter_ns() - t0) / 1e6, 1)
                hits = []
                for _ in range(3):
                    t0 = time.perf_counter_ns()
                    cached(arr)
                    hits.append(time.perf_counter_ns() - t0)
                out["large_arg_hit_ms"] = round(statistics.median(hits) / 1e6, 1)
            memory.clear(warn=False)
        return out

    return _guarded(inner)


# --------------------------------------------------------------------------- stale results


def _duron_stale() -> dict[str, Any]:
    import duron
    from duron.contrib.storage import FileLogStorage

    executed: list[str] = []
    code: dict[str, str | None] = {"code_arg": None}

    def echo(x: str) -> str:
        executed.append(x)
        return f"result-for-{x}"

    @duron.durable
    async def stale_wf(ctx: duron.Context, wf_arg: str) -> str:
        return await ctx.run(echo, code["code_arg"] or wf_arg)

    async def run(path: str, wf_arg: str) -> str:
        async with duron.Session(FileLogStorage(path)) as session:
            task = await session.start(stale_wf, wf_arg)
            result: str = await task.result()
            return result

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with _tempdir("duron-stale") as tmp:
            # 1. same log, the workflow started with argument B instead of A
            log = os.path.join(tmp, "wf-arg.jsonl")
            first = await run(log, "A")
            executed.clear()
            second = await run(log, "B")
            out["wf_arg_changed"] = {
                "first": first,
                "rerun_with_B": second,
                "stale": second == "result-for-A",
                "step_executed_on_rerun": bool(executed),
            }
            # 2. same log and arguments, the code now calls the step with B
            log = os.path.join(tmp, "code.jsonl")
            code["code_arg"] = "A"
            first = await run(log, "A")
            executed.clear()
            code["code_arg"] = "B"
            second = await run(log, "A")
            out["step_arg_changed_in_code"] = {
                "first": first,
                "rerun_with_B": second,
                "stale": second == "result-for-A",
                "step_executed_on_rerun": bool(executed),
            }
        return out

    result: dict[str, Any] = _run_coro(scenario)
    return result


def _dbos_stale() -> dict[str, Any]:
    from dbos import DBOS, SetWorkflowID

    out: dict[str, Any] = {}
    state: dict[str, Any] = {"executed": [], "code_arg": None}
    with (
        _tempdir("dbos-stale") as tmp,
        _dbos_session(os.path.join(tmp, "dbos.sqlite"), lambda: _dbos_define([], state)) as (
            _,
            stale_wf,
            _,
        ),
    ):
        DBOS.launch()
        # 1. same workflow id, called with argument B instead of A
        with SetWorkflowID("stale-wf-arg"):
            first = stale_wf("A")
        state["executed"].clear()
        with SetWorkflowID("stale-wf-arg"):
            second = stale_wf("B")
        out["wf_arg_changed"] = {
            "first": first,
            "rerun_with_B": second,
            "stale": second == "result-for-A",
            "step_executed_on_rerun": bool(state["executed"]),
        }
        # 2. the code now calls the step with B. A completed id never re-runs its body
        # (see 1), so the body is re-run the way DBOS re-runs one: fork_workflow past the
        # recorded step (its checkpoint is copied; same path as crash recovery).
        state["code_arg"] = "A"
        with SetWorkflowID("stale-code"):
            first = stale_wf("A")
        state["executed"].clear()
        state["code_arg"] = "B"
        second = DBOS.fork_workflow("stale-code", 2).get_result()
        out["step_arg_changed_in_code_fork"] = {
            "first": first,
            "rerun_with_B": second,
            "stale": second == "result-for-A",
            "step_executed_on_rerun": bool(state["executed"]),
        }
    return out


def stale_result_check() -> dict[str, Any]:
    """Does a peer hand back the result recorded for argument A when the step now gets B?

    Two cases per peer: (1) the same workflow id/log re-run with workflow argument B;
    (2) the workflow's code changed so the step is called with B (the body is re-run
    against the recorded history). ``stale`` is what was observed, ``step_executed_on_rerun``
    whether the step function ran at all during the re-run.
    """
    out: dict[str, Any] = {}
    try:
        import duron  # noqa: F401

        out["duron"] = _guarded(_duron_stale)
    except ImportError as exc:
        out["duron"] = {"error": f"duron not installed: {exc}"}
    try:
        import dbos  # noqa: F401

        out["dbos"] = _guarded(_dbos_stale)
    except ImportError as exc:
        out["dbos"] = {"error": f"dbos not installed: {exc}"}
    return out


# --------------------------------------------------------------------------- main


def run_all(
    duron_steps: int = 1000, dbos_steps: int = 200, hash_nbytes: int = 100_000_000
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("duron_record_replay", lambda: duron_record_replay(duron_steps)),
        ("dbos_record_replay", lambda: dbos_record_replay(dbos_steps)),
        ("joblib_hash_gbps", lambda: joblib_hash_gbps(hash_nbytes)),
        ("joblib_memory_call", lambda: joblib_memory_call(300, large_nbytes=hash_nbytes)),
        ("stale_result_check", stale_result_check),
    ]
    for name, job in jobs:
        t0 = time.perf_counter()
        results[name] = job()
        timings[name] = round(time.perf_counter() - t0, 2)
    results["_meta"] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "versions": {d: _version(d) for d in ("duron", "dbos", "joblib", "numpy")},
        "seconds": timings,
    }
    return results


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            section, _, figure = prefix.partition(".")
            rows.append((section, figure, str(value)))

    for name, value in results.items():
        if name == "joblib_hash_gbps" and not isinstance(value, dict):
            rows.append((name, f"GB/s ({results['_meta']['versions']['joblib']})", str(value)))
        else:
            walk(name, value)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duron-steps", type=int, default=1000)
    parser.add_argument("--dbos-steps", type=int, default=200)
    parser.add_argument("--hash-nbytes", type=int, default=100_000_000)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--dbos-crash-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dbos_crash_child:
        db_path, wfid, n = args.dbos_crash_child
        _dbos_crash_child(db_path, wfid, int(n))
        return 0
    results = run_all(args.duron_steps, args.dbos_steps, args.hash_nbytes)
    rows = _rows(results)
    widths = [max(len(r[i]) for r in [*rows, ("section", "figure", "value")]) for i in range(3)]
    print(f"{'section':<{widths[0]}}  {'figure':<{widths[1]}}  value")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * widths[2]}")
    for section, figure, value in rows:
        print(f"{section:<{widths[0]}}  {figure:<{widths[1]}}  {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
