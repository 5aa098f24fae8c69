"""durable_nb's own engine figures, measured the way ``peers.py`` measures Duron and DBOS.

Run ``python benchmarks/bench_engine.py``; ``benchmarks/run.py`` imports :func:`run`, which
returns rows ``{"name", "value", "unit"}``. Benchmarks report, they never assert: a figure
that misses its target is printed as it is.

The workload is the peers' one: a ``@dn.durable`` workflow of n trivial sequential steps,
step i returns i+1 (``await ainc(i)`` for an async effect, ``inc(i)`` for a sync one).

- ``step median`` / ``step p99``: per step, measured *inside* the workflow body with
  ``time.perf_counter_ns()`` after each step returns; a step's time is the gap to the
  previous one, so it includes hashing the arguments, the engine's bookkeeping and the
  journal write (or the lookup and decode on replay). Samples of all repeats are pooled.
- ``wall / n``: the whole ``dn.run(...)`` call divided by n (run start, history load and
  completion included), the median over the repeats.
- record: each repeat is a new run id; the body raises after its last step, so the run
  ends *failed* with all n steps recorded. replay: the same run id run again (nothing
  raises this time): the body re-runs and every step is found by key, none executes.
  A 10-step run on each store first warms up the engine (its loop thread, the store
  connection, the effects' code hashes, the first journal merge, which imports pyarrow);
  those one-off costs are measured on their own by the resume and import figures.
- resume after a restart: one fresh interpreter records 10,000 steps on a DuckDB store
  and ends (the run failed and the process exits normally, or the process ``os._exit``\\s
  inside the workflow, leaving its journal unmerged: a crash); another fresh interpreter
  opens the store (timed) and calls ``dn.run`` for the same run id (timed from the call to
  its return: engine start, lease, history load, 10,000 replayed steps, completion).
- effect outside a run: an ``@effect`` called at top level (the notebook/script scope) on
  the DuckDB store. miss: a new argument each call (hash, run, journal write); hit: the
  same arguments again after the occurrence counters are reset (what re-running a
  notebook cell does) and the journal is merged, so each hit is a DuckDB lookup.
- import: ``python -c "import durable_nb"`` minus ``python -c "pass"``, median of 5 fresh
  interpreters each, and which of duckdb / pyarrow / numpy / pandas the import loaded.
- stale check (the mirror of ``peers.stale_result_check``): a step ``echo(x)`` returns
  ``"result-for-" + x``; the run is first made with A and fails after the step, then the
  same run id runs with B. durable_nb keys steps by their input hash, so the step should
  run again and return B's result.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

import durable_nb as dn  # noqa: E402

HEAVY_MODULES = ("duckdb", "pyarrow", "numpy", "pandas")

# Per-process state the workflows read: the body's timestamps, what the end of the run does
# ("fail" raises, "crash" hard-exits the process), and how many effects really executed.
_STAMPS: list[int] = []
_CONTROL: dict[str, Any] = {"end": None, "executed": 0}
_STALE: dict[str, Any] = {"executed": [], "code_arg": None, "fail": False}


class PlannedFailure(Exception):
    """Raised by a workflow on purpose, so its run ends failed and stays resumable."""


# --------------------------------------------------------------------------- workload


@dn.effect(name="bench_engine.ainc")
async def ainc(i: int) -> int:
    _CONTROL["executed"] += 1
    return i + 1


@dn.effect(name="bench_engine.inc")
def inc(i: int) -> int:
    _CONTROL["executed"] += 1
    return i + 1


def _end_of_run() -> None:
    end = _CONTROL["end"]
    if end == "fail":
        raise PlannedFailure("failed on purpose after the last step")
    if end == "crash":
        sys.stdout.flush()
        os._exit(0)  # a crash: no atexit, the store is not closed, its journal stays


@dn.durable(name="bench_engine.async_steps")
async def async_steps(ctx: dn.Context, n: int) -> int:
    total = 0
    stamps = _STAMPS
    stamps.append(time.perf_counter_ns())
    for i in range(n):
        total += await ainc(i)
        stamps.append(time.perf_counter_ns())
    _end_of_run()
    return total


@dn.durable(name="bench_engine.sync_steps")
async def sync_steps(ctx: dn.Context, n: int) -> int:
    total = 0
    stamps = _STAMPS
    stamps.append(time.perf_counter_ns())
    for i in range(n):
        total += inc(i)
        stamps.append(time.perf_counter_ns())
    _end_of_run()
    return total


WORKFLOWS = {"async": async_steps, "sync": sync_steps}


@dn.effect(name="bench_engine.top_inc")
def top_inc(i: int) -> int:
    return i + 1


@dn.effect(name="bench_engine.length")
def length(arr: Any) -> int:
    return len(arr)


@dn.effect(name="bench_engine.echo")
def echo(x: str) -> str:
    _STALE["executed"].append(x)
    return f"result-for-{x}"


@dn.durable(name="bench_engine.stale_wf")
async def stale_wf(ctx: dn.Context, wf_arg: str) -> str:
    # the step gets the workflow's argument, unless the "code" (_STALE) now says otherwise
    result = echo(_STALE["code_arg"] or wf_arg)
    if _STALE["fail"]:
        raise PlannedFailure("failed on purpose after the step")
    return result


# --------------------------------------------------------------------------- helpers


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _deltas(stamps: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def _row(name: str, value: Any, unit: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit}


def _us(ns: float) -> float:
    return round(ns / 1000, 2)


@contextlib.contextmanager
def _tempdir(tag: str) -> Iterator[Path]:
    path = tempfile.mkdtemp(prefix=f"dnb-bench-{tag}-")
    try:
        yield Path(path)
    finally:
        dn.set_store(":memory:")  # closes a DuckDB store living in the temp dir
        shutil.rmtree(path, ignore_errors=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("DURABLE_NB_STORE", None)
    return env


def _expected(n: int) -> int:
    return n * (n + 1) // 2


# --------------------------------------------------------------------------- record, replay


def record_replay(store: str, kind: str, n: int, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """Record n steps (the run fails after them), then replay them under the same run id."""
    dn.set_store(":memory:" if store == "memory" else str(tmp / f"{kind}.duckdb"))
    wf = WORKFLOWS[kind]
    _CONTROL["end"] = None
    dn.run(wf, 10, run_id=f"warm-up-{kind}")  # engine loop, connection, code hashes
    dn.get_store().flush()  # the first journal merge (it imports pyarrow) is a one-off too
    samples: dict[str, list[int]] = {"record": [], "replay": []}
    walls: dict[str, list[float]] = {"record": [], "replay": []}
    problems: list[str] = []
    for rep in range(repeats):
        run_id = f"{store}-{kind}-{rep}"
        for phase in ("record", "replay"):
            _STAMPS.clear()
            _CONTROL["executed"] = 0
            _CONTROL["end"] = "fail" if phase == "record" else None
            t0 = time.perf_counter_ns()
            try:
                result: Any = dn.run(wf, n, run_id=run_id)
            except PlannedFailure:
                result = "failed"
            walls[phase].append((time.perf_counter_ns() - t0) / n)
            want = ("failed", n) if phase == "record" else (_expected(n), 0)
            if (result, _CONTROL["executed"]) != want or len(_STAMPS) != n + 1:
                problems.append(
                    f"{phase} {run_id}: result {result!r}, {_CONTROL['executed']} executed, "
                    f"{len(_STAMPS) - 1} steps seen"
                )
            samples[phase].extend(_deltas(_STAMPS))
    _CONTROL["end"] = None
    rows = []
    label = "DuckDB store" if store == "duckdb" else "memory store"
    for phase in ("record", "replay"):
        name = f"{phase} {kind} effect, {label}"
        rows += [
            _row(f"{name}: step median", _us(statistics.median(samples[phase])), "us"),
            _row(f"{name}: step p99", _us(_p99(samples[phase])), "us"),
            _row(f"{name}: wall / n", _us(statistics.median(walls[phase])), "us"),
        ]
    if problems:
        rows.append(_row(f"{kind} effect, {label}: problems", "; ".join(problems), ""))
    return rows


# --------------------------------------------------------------------------- resume


def _child_record(path: str, n: int, end: str) -> None:
    dn.set_store(path)
    _CONTROL["end"] = end
    try:
        dn.run(async_steps, n, run_id="resume")
    except PlannedFailure:
        pass
    # "fail": the process exits normally (the store closes at exit, merging its journal)


def _child_resume(path: str, n: int) -> None:
    t0 = time.perf_counter_ns()
    dn.set_store(path)
    t1 = time.perf_counter_ns()
    result = dn.run(async_steps, n, run_id="resume")
    t2 = time.perf_counter_ns()
    deltas = _deltas(_STAMPS)
    out = {
        "open_s": (t1 - t0) / 1e9,
        "run_s": (t2 - t1) / 1e9,
        "ok": result == _expected(n) and len(deltas) == n,
        "executed": _CONTROL["executed"],
        "step_median_us": _us(statistics.median(deltas)) if deltas else None,
        "step_p99_us": _us(_p99(deltas)) if deltas else None,
    }
    print("RESULT " + json.dumps(out))


def resume_after_restart(n: int, tmp: Path) -> list[dict[str, Any]]:
    """Record n steps in one fresh interpreter, resume them in another; both ends timed."""
    rows: list[dict[str, Any]] = []
    for end, label in (("fail", "run failed"), ("crash", "process crashed")):
        path = str(tmp / f"resume-{end}.duckdb")
        name = f"resume {n:,} steps after restart ({label})"
        cmd = [sys.executable, str(Path(__file__).resolve())]
        rec = subprocess.run(
            [*cmd, "--child-record", path, str(n), end],
            capture_output=True,
            text=True,
            timeout=300,
            env=_child_env(),
        )
        if rec.returncode != 0:
            rows.append(_row(f"{name}: error", f"recording child: {rec.stderr[-400:]}", ""))
            continue
        res = subprocess.run(
            [*cmd, "--child-resume", path, str(n)],
            capture_output=True,
            text=True,
            timeout=300,
            env=_child_env(),
        )
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode != 0 or not lines:
            rows.append(_row(f"{name}: error", f"resuming child: {res.stderr[-400:]}", ""))
            continue
        out = json.loads(lines[-1][len("RESULT ") :])
        rows += [
            _row(f"{name}: dn.run call to return", round(out["run_s"], 4), "s"),
            _row(f"{name}: open the store", round(out["open_s"], 4), "s"),
            _row(f"{name}: replay step median", out["step_median_us"], "us"),
            _row(f"{name}: replay step p99", out["step_p99_us"], "us"),
            _row(f"{name}: steps executed again", out["executed"], "steps"),
        ]
        if not out["ok"]:
            rows.append(_row(f"{name}: problems", "wrong result or step count", ""))
    return rows


# --------------------------------------------------------------------------- outside a run


def outside_a_run(n_calls: int, large_nbytes: int, tmp: Path) -> list[dict[str, Any]]:
    """An effect called at top level (notebook/script scope) on the DuckDB store."""
    from durable_nb.engine import runtime

    store = dn.set_store(str(tmp / "top.duckdb"))
    top_inc(-1)  # warm-up: connection, code hash
    miss, hit = [], []
    for i in range(n_calls):
        t0 = time.perf_counter_ns()
        top_inc(i)
        miss.append(time.perf_counter_ns() - t0)
    store.flush()  # merged: every hit below is a DuckDB lookup
    runtime.top.reset()  # what re-running a notebook cell does
    for i in range(n_calls):
        t0 = time.perf_counter_ns()
        top_inc(i)
        hit.append(time.perf_counter_ns() - t0)
    name = "effect outside a run, DuckDB store, small int argument"
    rows = [
        _row(f"{name}: miss median", _us(statistics.median(miss)), "us"),
        _row(f"{name}: miss p99", _us(_p99(miss)), "us"),
        _row(f"{name}: hit median", _us(statistics.median(hit)), "us"),
        _row(f"{name}: hit p99", _us(_p99(hit)), "us"),
    ]
    if large_nbytes > 0:
        try:
            import numpy as np
        except ImportError:
            return rows
        arr = np.random.default_rng(1).random(max(1, large_nbytes // 8))
        mb = arr.nbytes / 1e6
        t0 = time.perf_counter_ns()
        length(arr)
        large_miss = time.perf_counter_ns() - t0
        store.flush()
        hits = []
        for _ in range(3):
            runtime.top.reset()
            t0 = time.perf_counter_ns()
            length(arr)
            hits.append(time.perf_counter_ns() - t0)
        name = f"effect outside a run, DuckDB store, {mb:g} MB numpy argument"
        rows += [
            _row(f"{name}: miss", round(large_miss / 1e6, 1), "ms"),
            _row(f"{name}: hit (median of 3)", round(statistics.median(hits) / 1e6, 1), "ms"),
        ]
    return rows


def miss_on_a_large_scope(n_keys: int, n_calls: int, tmp: Path) -> list[dict[str, Any]]:
    """Top-level misses when the notebook's scope already holds ``n_keys`` effects: what
    issue 15 asks to stay cheap at millions of effects. The scope is filled with records
    written in batches of 10,000 (as many cells of a long notebook would have); then
    ``top_inc`` is called with new arguments and timed like ``outside_a_run``."""
    from durable_nb._codecs import Payload
    from durable_nb.engine import runtime
    from durable_nb.store import EffectRecord

    store = dn.set_store(str(tmp / "large-scope.duckdb"))
    scope = runtime.top.scope_id
    top_inc(-1)  # warm-up; the scope's key filter starts here, on an empty scope
    for start in range(0, n_keys, 10_000):
        store.put_effects(
            [
                EffectRecord(scope, "filler", "v1", f"{i:032x}", 0, payload=Payload("json", b"1"))
                for i in range(start, min(start + 10_000, n_keys))
            ]
        )
    store.flush()
    runtime.top.reset()
    miss = []
    for i in range(n_calls):
        t0 = time.perf_counter_ns()
        top_inc(10**9 + i)
        miss.append(time.perf_counter_ns() - t0)
    name = f"effect outside a run, DuckDB store, notebook scope of {n_keys:,} effects"
    return [
        _row(f"{name}: miss median", _us(statistics.median(miss)), "us"),
        _row(f"{name}: miss p99", _us(_p99(miss)), "us"),
    ]


# --------------------------------------------------------------------------- import


def import_time(repeats: int = 5) -> list[dict[str, Any]]:
    """Fresh interpreters: ``import durable_nb`` minus ``pass``; and what the import loaded."""
    env = _child_env()

    def once(code: str) -> float:
        t0 = time.perf_counter_ns()
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
        return (time.perf_counter_ns() - t0) / 1e6

    once("import durable_nb")  # warm the bytecode cache and the OS page cache
    bare, with_import = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        bare.append(once("pass"))
        with_import.append(once("import durable_nb"))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, durable_nb; "
            f"print(json.dumps([m for m in {list(HEAVY_MODULES)!r} if m in sys.modules]))",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    return [
        _row(
            "import durable_nb (fresh interpreter, minus bare startup)",
            round(statistics.median(with_import) - statistics.median(bare), 1),
            "ms",
        ),
        _row("bare interpreter startup (python -c pass)", round(statistics.median(bare), 1), "ms"),
        _row(
            "import durable_nb: heavy modules loaded (duckdb/pyarrow/numpy/pandas)",
            ", ".join(loaded) if loaded else "none",
            "",
        ),
    ]


# --------------------------------------------------------------------------- stale check


def _stale_case(
    first_arg: str, second_arg: str, *, fail_first: bool, code_change: bool, run_id: str | None
) -> dict[str, Any]:
    _STALE["code_arg"] = first_arg if code_change else None
    _STALE["fail"] = fail_first
    kwargs = {"run_id": run_id} if run_id is not None else {}
    try:
        first: Any = dn.run(stale_wf, first_arg, **kwargs)
    except PlannedFailure:
        first = "failed"
    _STALE["executed"].clear()
    _STALE["fail"] = False
    if code_change:
        _STALE["code_arg"] = second_arg
        second = dn.run(stale_wf, first_arg, **kwargs)
    else:
        second = dn.run(stale_wf, second_arg, **kwargs)
    _STALE["code_arg"] = None
    return {
        "first": first,
        "rerun_with_B": second,
        "stale": second == "result-for-A",
        "step_executed_on_rerun": bool(_STALE["executed"]),
    }


def stale_check(tmp: Path) -> dict[str, Any]:
    """durable_nb's answers to ``peers.stale_result_check``'s cases, on the DuckDB store."""
    dn.set_store(str(tmp / "stale.duckdb"))
    return {
        # the mirror of the peers' cases; the first run fails after its step, so it resumes
        "wf_arg_changed_after_failure": _stale_case(
            "A", "B", fail_first=True, code_change=False, run_id="stale-wf-arg"
        ),
        "step_arg_changed_in_code_after_failure": _stale_case(
            "A", "B", fail_first=True, code_change=True, run_id="stale-code"
        ),
        # a *completed* run id hands back its recorded result without running anything (by
        # design, like DBOS's completed ids); without an explicit run id, B gets its own run
        "wf_arg_changed_completed_same_run_id": _stale_case(
            "A", "B", fail_first=False, code_change=False, run_id="stale-completed"
        ),
        "wf_arg_changed_completed_derived_run_id": _stale_case(
            "A", "B", fail_first=False, code_change=False, run_id=None
        ),
    }


def _stale_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for case, out in result.items():
        rows.append(_row(f"stale: {case}", out["stale"], "bool"))
        rows.append(
            _row(f"stale: {case}: step ran on re-run", out["step_executed_on_rerun"], "bool")
        )
        rows.append(_row(f"stale: {case}: re-run returned", out["rerun_with_B"], ""))
    return rows


# --------------------------------------------------------------------------- main


def run(
    n_steps: int = 5000,
    repeats: int = 3,
    resume_steps: int = 10_000,
    top_calls: int = 2000,
    large_nbytes: int = 100_000_000,
    large_scope: int = 1_000_000,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [_row("steps per run (record / replay)", n_steps, "steps")]
    with _tempdir("engine") as tmp:
        for store in ("duckdb", "memory"):
            for kind in ("async", "sync"):
                rows += record_replay(store, kind, n_steps, repeats, tmp)
        rows += resume_after_restart(resume_steps, tmp)
        rows += outside_a_run(top_calls, large_nbytes, tmp)
        rows += miss_on_a_large_scope(large_scope, top_calls, tmp)
        rows += _stale_rows(stale_check(tmp))
    rows += import_time()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resume-steps", type=int, default=10_000)
    parser.add_argument("--child-record", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-resume", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_record:
        path, n, end = args.child_record
        _child_record(path, int(n), end)
        return 0
    if args.child_resume:
        path, n = args.child_resume
        _child_resume(path, int(n))
        return 0
    for row in run(args.steps, args.repeats, args.resume_steps):
        print(f"{row['name']:<78} {row['value']!s:>12} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
