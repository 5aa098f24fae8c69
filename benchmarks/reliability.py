"""The reliability campaign of issue 20: scale of one store, load in one kernel, hostile input,
faults in the I/O path.

    python benchmarks/reliability.py [--quick] [--only scale load fuzz faults] [--effects N]
                                     [--runs N] [--steps N] [--examples N] [--budget S]
                                     [--stores duckdb postgres]

Prints one table: what each part measured, the load held, the inputs tried and refused,
and the effects lost (must be 0). Benchmarks report, they never assert. Each measurement
runs in a fresh interpreter (``--child ...``), so one part's memory cannot hide in another's.

- **scale** (item 1): two DuckDB stores of the same shape, 10,000 and ``--effects``
  (10,000,000) effects: half in runs (``nightly-000000``... with 5,000 steps each at full
  size) and half in one notebook scope, the one the measuring script's own ``@effect``
  calls use. They are filled in bulk through the store's own schema: ``DuckDBStore`` creates
  the file (migrations and indexes), then one ``INSERT INTO dn_effects SELECT ... FROM
  range(n)`` per scope writes rows exactly as a merge would (see :func:`_bulk_fill`). Then,
  through the public API, the script records real effects on top: 200 top-level calls and
  five runs of 1,000 steps that fail after their last step. Measured in a fresh process per
  figure, each from a newly opened store (a kernel restart): opening the store; a top-level
  hit (a DuckDB point query: the read cache is empty after a restart) and a miss (what the
  notebook scope's key filter answers); a point-query miss in a run scope (no filter);
  replaying one 1,000-step run (``dn.run`` on the failed run id: 1,000 lookups, 0
  executions); ``durable-nb runs``; ``durable-nb gc --older-than 7d`` that prunes nothing;
  the file size per effect. The ratio column is the big store's figure over the small one's
  (target: within 2x).
- **load** (item 3): ``--runs`` (1,000) concurrent runs of ``--steps`` (100) effects each
  in one process, gathered (one coroutine awaits them all, as a cell that awaits) and as
  background jobs (started from a thread without a loop, waited for one by one), on a
  DuckDB and on the in-memory store, each in a fresh process after a warm-up: every run
  completes with the right result, every effect executed once and stored (counted in the
  store), a second start of every run executes nothing; the step latency (the time an
  ``await step(...)`` takes inside the workflow, all runs' samples pooled) p50 and p99, the
  effects per second, and the peak RSS over the RSS before the runs, per run.
- **fuzz** (item 6): see :func:`fuzz_part`.
- **faults** (item 4): see :func:`faults_part`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

import durable_nb as dn  # noqa: E402

TOP_NAME = "reliability"  # the notebook scope of the measuring processes: top/reliability
REPLAY_STEPS = 1000
REPLAY_RUNS = 5
TOP_KEYS = 200
_CONTROL: dict[str, Any] = {"executed": 0, "fail": False}


@dn.effect(name="reliability.top_inc", version="1")
def top_inc(i: int) -> int:
    _CONTROL["executed"] += 1
    return i + 1


@dn.effect(name="reliability.step", version="1")
async def step(i: int) -> int:
    _CONTROL["executed"] += 1
    return i * 2


class PlannedFailure(Exception):
    pass


@dn.durable(name="reliability.replayed", version="1")
async def replayed(ctx: dn.Context, n: int) -> int:
    total = 0
    for i in range(n):
        total += await step(i)
    if _CONTROL["fail"]:
        raise PlannedFailure("fails after its last step, so the same run id replays them")
    return total


# --------------------------------------------------------------------------- helpers


def _us(ns: float) -> float:
    return round(ns / 1000, 1)


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def _child(*args: str, timeout: float = 3600) -> Any:
    """Run this file with ``--child ARGS`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _tempdir(tag: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"dn-reliability-{tag}-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- scale


def _shape(n: int) -> tuple[int, int, int]:
    """(runs, steps per run, notebook-scope effects): half in runs, half in one scope."""
    steps = 500 if n <= 100_000 else 5000
    runs = max(1, n // 2 // steps)
    return runs, steps, n - runs * steps


def _bulk_fill(path: str, n: int) -> dict[str, Any]:
    """Fill a new store with ``n`` effects in bulk, through the store's own schema.

    ``DuckDBStore`` creates the file (its migrations make the tables and indexes) and is
    closed; then plain SQL inserts rows with the columns a journal merge writes
    (``_EFFECT_COLS`` / ``_RUN_COLS``): effects ``('run/nightly-NNNNNN', 'reliability.step',
    'v:1', <32 hex digits>, 0, 'json', '1', NULL, false, 'effect', seq, started_at,
    duration, '')`` with started_at within the last hour, one completed run row per bulk
    run, and the notebook scope ``top/reliability`` with rows of ``reliability.top_inc``.
    The rows carry the identities and versions of the measured effects, so the measured
    lookups cannot skip the bulk rows by their min/max statistics (a lookup of an identity
    absent from the bulk would be a best case). The scope's key filter does not exist yet
    (a bulk insert into a store whose filter exists would leave the filter without these
    keys: delete ``<store>.d/keys/`` after such an insert); the first process that needs it
    builds it in one pass (timed below as "first miss")."""
    import duckdb

    from durable_nb.store._duckdb import DuckDBStore

    runs, steps, top = _shape(n)
    DuckDBStore(path).close()
    t0 = time.perf_counter()
    con = duckdb.connect(path)
    now = time.time()
    con.execute(
        "INSERT INTO dn_effects SELECT 'run/nightly-' || lpad((i // $steps)::VARCHAR, 6, '0'), "
        "'reliability.step', 'v:1', md5('r' || i::VARCHAR), 0, 'json', '1'::BLOB, NULL, "
        "false, 'effect', (i % $steps)::INTEGER, $start + i * 1e-4, 0.001, '' "
        "FROM range($n) t(i)",
        {"steps": steps, "start": now - 3600, "n": runs * steps},
    )
    con.execute(
        "INSERT INTO dn_runs (run_id, workflow, status, created_at, updated_at, "
        "status_version, executions, detail, input_hash, code_version, generation, version) "
        "SELECT 'nightly-' || lpad(i::VARCHAR, 6, '0'), 'reliability.bulk_wf', 'completed', "
        "$start + i, $start + i + 1, 1, 1, '', md5('a' || i::VARCHAR), 'v:1', 0, '' "
        "FROM range($runs) t(i)",
        {"runs": runs, "start": now - 3600},
    )
    con.execute(
        "INSERT INTO dn_effects SELECT $scope, 'reliability.top_inc', 'v:1', "
        "md5('t' || i::VARCHAR), 0, 'json', '1'::BLOB, NULL, false, 'effect', -1, "
        "$start + i * 1e-4, 0.001, '' FROM range($n) t(i)",
        {"scope": "top/" + TOP_NAME, "start": now - 3600, "n": top},
    )
    con.execute("CHECKPOINT")
    con.close()
    return {"fill_s": round(time.perf_counter() - t0, 1), "runs": runs, "steps": steps, "top": top}


def _child_scale_build(path: str, n: int) -> dict[str, Any]:
    out = _bulk_fill(path, n)
    from durable_nb.engine import runtime

    dn.set_store(path)
    runtime.set_top_scope(TOP_NAME)
    t0 = time.perf_counter_ns()
    top_inc(-1)  # the first lookup in the scope completes its key filter (one pass)
    out["first_miss_ms"] = round((time.perf_counter_ns() - t0) / 1e6, 1)
    for i in range(TOP_KEYS):
        top_inc(i)
    _CONTROL["fail"] = True
    for k in range(REPLAY_RUNS):
        with contextlib.suppress(PlannedFailure):
            dn.run(replayed, REPLAY_STEPS, run_id=_replay_id(k))
    dn.get_store().close()
    return out


def _replay_id(k: int) -> str:
    # sorts among the bulk runs' ids, so min/max statistics cannot skip the bulk rows
    return f"nightly-000000-replay-{k}"


def _child_scale_measure(path: str, what: str, k: int) -> dict[str, Any]:
    """One measurement on a freshly opened store (a kernel restart); the imports and the CLI
    are warmed up on a scratch store first, so only the work on this store is timed."""
    from durable_nb.cli import main
    from durable_nb.engine import runtime

    scratch = str(Path(path).parent / f"scratch-{os.getpid()}.duckdb")
    with contextlib.redirect_stdout(io.StringIO()):
        main(["--store", scratch, "runs"])
    dn.set_store(scratch)
    dn.run(replayed, 2, run_id="warm-up")
    dn.get_store().close()
    shutil.rmtree(scratch + ".d", ignore_errors=True)
    for p in (scratch, scratch + ".wal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

    runtime.set_top_scope(TOP_NAME)
    _CONTROL["executed"] = 0
    if what == "open":
        t0 = time.perf_counter_ns()
        store = dn.set_store(path)
        return {"ns": [time.perf_counter_ns() - t0], "executed": 0}
    store = dn.set_store(path)
    ns: list[int] = []
    if what == "hit":
        for i in range(TOP_KEYS):
            t0 = time.perf_counter_ns()
            top_inc(i)
            ns.append(time.perf_counter_ns() - t0)
    elif what == "miss":
        for i in range(TOP_KEYS):
            t0 = time.perf_counter_ns()
            top_inc(10**9 + k * 10_000 + i)
            ns.append(time.perf_counter_ns() - t0)
    elif what == "run_miss":
        for i in range(TOP_KEYS):
            key = ("run/nightly-000001", "reliability.step", "v:1", f"{k:08x}{i:024x}", 0)
            t0 = time.perf_counter_ns()
            assert store.get_effect(key) is None
            ns.append(time.perf_counter_ns() - t0)
    elif what == "replay":
        t0 = time.perf_counter_ns()
        dn.run(replayed, REPLAY_STEPS, run_id=_replay_id(k))
        ns.append(time.perf_counter_ns() - t0)
    elif what in ("runs", "gc"):
        dn.get_store().close()
        argv = ["--store", path, "runs"] if what == "runs" else ["--store", path, "gc"]
        buf = io.StringIO()
        t0 = time.perf_counter_ns()
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
        ns.append(time.perf_counter_ns() - t0)
        if rc != 0 or (what == "gc" and not buf.getvalue().startswith("deleted 0 run(s), 0 ")):
            raise RuntimeError(f"{argv!r} returned {rc}: {buf.getvalue()[:300]!r}")
    else:
        raise ValueError(what)
    return {"ns": ns, "executed": _CONTROL["executed"]}


def _count_effects(path: str) -> int:
    store = dn.set_store(path)
    from durable_nb.store._duckdb import DuckDBStore

    assert isinstance(store, DuckDBStore)
    with store._db() as con:
        n = int(con.execute("SELECT count(*) FROM dn_effects").fetchall()[0][0])
    store.close()
    return n


def scale_part(n_big: int, n_small: int = 10_000, repeats: int = 3) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    figures: dict[int, dict[str, Any]] = {}
    with _tempdir("scale") as tmp:
        for n in (n_small, n_big):
            path = str(tmp / f"store-{n}.duckdb")
            info = _child("scale-build", path, str(n))
            f: dict[str, Any] = {"fill_s": info["fill_s"], "first_miss_ms": info["first_miss_ms"]}
            samples: dict[str, list[int]] = {}
            executed: dict[str, int] = {}
            for what in ("open", "hit", "miss", "run_miss", "replay", "runs", "gc"):
                reps = REPLAY_RUNS if what == "replay" else repeats
                for k in range(reps):
                    got = _child("scale-measure", path, what, str(k))
                    samples.setdefault(what, []).extend(got["ns"])
                    executed[what] = executed.get(what, 0) + got["executed"]
            f["samples"] = samples
            f["executed"] = executed
            total = n + TOP_KEYS + 1 + REPLAY_RUNS * REPLAY_STEPS + TOP_KEYS * repeats
            f["expected"] = total
            f["counted"] = _child("scale-count", path)["count"]
            f["bytes"] = os.path.getsize(path) + _dir_bytes(Path(path + ".d"))
            figures[n] = f
            for p in Path(tmp).glob(f"store-{n}.*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    def fig(n: int, what: str, stat: str) -> float:
        xs = [float(x) for x in figures[n]["samples"][what]]
        return statistics.median(xs) if stat == "median" else _p99(xs)

    small, big = figures[n_small], figures[n_big]
    label = f"{n_big:,} vs {n_small:,} effects"
    for what, stat, title in (
        ("open", "median", "open the store (connect, migrate, recover journals)"),
        ("hit", "median", "top-level hit after a restart (point query): median"),
        ("hit", "p99", "top-level hit after a restart (point query): p99"),
        ("miss", "median", "top-level miss (key filter, then run and record): median"),
        ("miss", "p99", "top-level miss (key filter, then run and record): p99"),
        ("run_miss", "median", "point-query miss in a run scope (no filter): median"),
        ("replay", "median", f"replay one {REPLAY_STEPS:,}-step run after a restart (wall)"),
        ("runs", "median", "`durable-nb runs` (in-process, opens the store)"),
        ("gc", "median", "`durable-nb gc` that prunes nothing (in-process, opens the store)"),
    ):
        a, b = fig(n_small, what, stat), fig(n_big, what, stat)
        rows.append(
            {
                "part": "scale",
                "name": title,
                "small": f"{_us(a)} us",
                "big": f"{_us(b)} us",
                "ratio": f"{b / a:.2f}x" if a else "-",
            }
        )
    rows.append(
        {
            "part": "scale",
            "name": "first miss on a bulk-filled scope (completes the key filter in one pass)",
            "small": f"{small['first_miss_ms']} ms",
            "big": f"{big['first_miss_ms']} ms",
            "ratio": "one-off",
        }
    )
    rows.append(
        {
            "part": "scale",
            "name": "bytes per effect (DuckDB file + key filter)",
            "small": f"{small['bytes'] / n_small:.0f} B",
            "big": f"{big['bytes'] / n_big:.0f} B",
            "ratio": f"{big['bytes'] / n_big / (small['bytes'] / n_small):.2f}x",
        }
    )
    rows.append(
        {
            "part": "scale",
            "name": "bulk fill (SQL through the store's schema)",
            "small": f"{small['fill_s']} s",
            "big": f"{big['fill_s']} s",
            "ratio": "",
        }
    )
    for n, f in ((n_small, small), (n_big, big)):
        lost = f["expected"] - f["counted"]
        executed_on_replay = f["executed"]["hit"] + f["executed"]["replay"]
        rows.append(
            {
                "part": "scale",
                "name": f"{n:,}-effect store: effects lost / re-executed on hit and replay",
                "small": "",
                "big": f"{lost} / {executed_on_replay}",
                "ratio": "must be 0 / 0",
                "lost": lost,
            }
        )
    rows[0]["name"] = f"[{label}] " + rows[0]["name"]
    return rows


# --------------------------------------------------------------------------- load

_LATENCIES: list[int] = []


@dn.effect(name="reliability.load_step", version="1")
async def load_step(run: int, i: int) -> int:
    _CONTROL["executed"] += 1
    await asyncio.sleep(0)  # let the other runs in: 1,000 runs interleave step by step
    return run * 1000 + i


@dn.durable(name="reliability.load", version="1")
async def load_wf(ctx: dn.Context, run: int, n: int) -> int:
    total = 0
    for i in range(n):
        t0 = time.perf_counter_ns()
        total += await load_step(run, i)
        _LATENCIES.append(time.perf_counter_ns() - t0)
    return total


def load_expected(run: int, n: int) -> int:
    return sum(run * 1000 + i for i in range(n))


async def _gathered(runs: int, n: int, prefix: str) -> list[int]:
    jobs = [dn.start(load_wf, r, n, run_id=f"{prefix}-{r}") for r in range(runs)]
    return list(await asyncio.gather(*(j.wait() for j in jobs)))


def run_load(mode: str, runs: int, n: int, prefix: str = "load") -> list[int]:
    """``runs`` concurrent runs of ``n`` effects each, in this process: ``gathered`` (one
    coroutine awaits them all, as a notebook cell that awaits would) or ``background``
    (started from a thread without a loop, as ``%%durable --background`` cells are, and
    waited for one by one). Returns their results in order."""
    if mode == "gathered":
        return asyncio.run(_gathered(runs, n, prefix))
    jobs = [dn.start(load_wf, r, n, run_id=f"{prefix}-{r}") for r in range(runs)]
    return [j.result(timeout=3600) for j in jobs]


def _child_load(path: str, mode: str, runs: int, n: int) -> dict[str, Any]:
    dn.set_store(":memory:" if path == ":memory:" else path)
    # warm up the engine, the store connection and the first merge before counting memory
    run_load(mode, 2, 2, prefix="warm-up")
    dn.get_store().flush()
    _LATENCIES.clear()
    _CONTROL["executed"] = 0
    gc.collect()
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    results = run_load(mode, runs, n)
    wall = time.perf_counter() - t0
    peak = _peak_rss_mb()
    wrong = sum(got != load_expected(r, n) for r, got in enumerate(results))
    store = dn.get_store()
    store.flush()
    counted = sum(
        sum(1 for e in store.load_effects(f"run/load-{r}") if e.kind == "effect")
        for r in range(runs)
    )
    statuses = {}
    for r in range(runs):
        rec = store.get_run(f"load-{r}")
        status = rec.status if rec else "missing"
        statuses[status] = statuses.get(status, 0) + 1
    executed = _CONTROL["executed"]
    _CONTROL["executed"] = 0
    again = run_load(mode, runs, n)  # completed runs return their recorded results
    lat = sorted(_LATENCIES)
    return {
        "wall_s": round(wall, 2),
        "effects_per_s": round(runs * n / wall),
        "executed": executed,
        "wrong": wrong,
        "counted": counted,
        "statuses": statuses,
        "re_executed": _CONTROL["executed"]
        + sum(a != b for a, b in zip(again, results, strict=True)),
        "p50_us": _us(lat[len(lat) // 2]),
        "p99_us": _us(_p99([float(x) for x in lat])),
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "rss_per_run_kb": round((peak - base) * 1024 / runs, 1),
    }


def load_part(runs: int, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with _tempdir("load") as tmp:
        for store in ("duckdb", "memory"):
            for mode in ("gathered", "background"):
                path = ":memory:" if store == "memory" else str(tmp / f"{mode}.duckdb")
                got = _child("load", path, mode, str(runs), str(n))
                total = runs * n
                lost = total - got["counted"]
                held = (
                    got["executed"] == total
                    and got["wrong"] == 0
                    and got["statuses"] == {"completed": runs}
                    and lost == 0
                    and got["re_executed"] == 0
                )
                name = f"{runs:,} concurrent runs x {n} effects, {mode}, {store} store"
                rows += [
                    {
                        "part": "load",
                        "name": f"{name}: all complete, none lost, none re-executed",
                        "big": "held" if held else "FAILED",
                        "ratio": f"{got['counted']:,}/{total:,} stored",
                        "lost": lost,
                        "detail": got,
                    },
                    {
                        "part": "load",
                        "name": f"{name}: step latency p50 / p99",
                        "small": f"{got['p50_us']} us",
                        "big": f"{got['p99_us']} us",
                        "ratio": f"{got['effects_per_s']:,} effects/s",
                    },
                    {
                        "part": "load",
                        "name": f"{name}: peak RSS (base before the runs) / per run",
                        "small": f"{got['peak_rss_mb']} MB ({got['base_rss_mb']})",
                        "big": f"{got['rss_per_run_kb']} kB/run",
                        "ratio": f"{got['wall_s']} s wall",
                    },
                ]
    return rows


# --------------------------------------------------------------------------- fuzz


#: the properties of tests/test_hostile_*.py (file, test), cheapest first
FUZZ_TESTS = (
    ("test_hostile_values.py", "test_effect_arguments_replay_exactly_or_are_refused"),
    ("test_hostile_values.py", "test_effect_results_replay_exactly_or_are_refused"),
    ("test_hostile_cli.py", "test_magic_arguments_run_or_are_refused_with_a_usage_error"),
    (
        "test_hostile_runs.py",
        "test_run_ids_kv_streams_queues_and_signals_replay_exactly_or_are_refused",
    ),
    ("test_hostile_import.py", "test_import_of_damaged_or_forged_exports_is_all_or_nothing"),
    ("test_hostile_cli.py", "test_cli_arguments_run_or_are_refused_without_a_traceback"),
)
#: each property runs once per store: the pytest parameter of each
FUZZ_STORES = ("duckdb", "postgres")


def fuzz_part(
    examples: int, budget: float, stores: tuple[str, ...] = FUZZ_STORES
) -> list[dict[str, Any]]:
    """The hostile-input properties of ``tests/test_hostile_*.py`` with ``examples`` examples
    each (Hypothesis profile ``hostile-fuzz`` at 10,000), one fresh pytest process per
    property and store (``stores``: ``duckdb``, ``postgres``), for at most ``budget``
    seconds each (a property cut short is reported as such). On the DuckDB side, effects
    and the CLI go through a DuckDB store; the property that starts a run per example, and
    the import, use the in-memory store here (a run on a DuckDB file pays a few journal
    merges, and 10,000 of them would take most of an hour); CI runs all of them on DuckDB
    and PostgreSQL with fewer examples. PostgreSQL: the test server (``DURABLE_NB_TEST_PG``,
    see ``tests/conftest.py``), a fresh schema per test module."""
    rows: list[dict[str, Any]] = []
    with _tempdir("fuzz") as tmp:
        for (file, test), store in ((t, s) for s in stores for t in FUZZ_TESTS):
            per_run = "import" in test or "run_ids" in test  # on the in-memory store, see above
            kind = "memory" if store == "duckdb" and per_run else store
            tally = tmp / f"{test}-{store}.json"
            env = {
                **os.environ,
                "DURABLE_NB_HYPOTHESIS_PROFILE": "hostile-fuzz",
                "DURABLE_NB_HOSTILE_STORE": "memory",
                "DURABLE_NB_FUZZ_TALLY": str(tally),
            }
            if examples != 10_000:
                env["DURABLE_NB_HYPOTHESIS_PROFILE"] = "hostile-ci"
                env["DURABLE_NB_HOSTILE_EXAMPLES"] = str(examples)
            t0 = time.perf_counter()
            target = f"{REPO / 'tests' / file}::{test}[{kind}]"
            try:
                out = subprocess.run(
                    [
                        *(sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"),
                        *("-o", "timeout=0", "--basetemp", str(tmp / "pytest"), target),
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    cwd=str(REPO),
                    timeout=budget,
                )
                status = "passed" if out.returncode == 0 else "FAILED"
                if out.returncode == 0 and " skipped" in out.stdout:
                    status = "skipped"
                if out.returncode != 0:
                    print(out.stdout[-5000:], file=sys.stderr)
            except subprocess.TimeoutExpired:
                status = f"cut short at {budget:.0f} s"
            wall = time.perf_counter() - t0
            counts = json.loads(tally.read_text()) if tally.exists() else {}
            if not counts:
                rows.append(
                    {
                        "part": "fuzz",
                        "name": f"{test}[{kind}]: no tally",
                        "big": status,
                        "ratio": f"{wall:.0f} s",
                        "lost": int(status == "FAILED"),
                    }
                )
            for i, (entry, c) in enumerate(counts.items()):
                rows.append(
                    {
                        "part": "fuzz",
                        "name": f"{entry}: tried, refused with a durable_nb error "
                        "(the rest stored and replayed exactly)",
                        "small": f"{c.get('tried', 0):,} tried",
                        "big": f"{c.get('refused', 0):,} refused",
                        "ratio": f"{status}, {wall:.0f} s" if i == 0 else "(same runs)",
                        "lost": int(status == "FAILED" and i == 0),
                    }
                )
    return rows


# --------------------------------------------------------------------------- faults

#: the fault-injection tests (item 4): a real full disk, I/O errors, a read-only directory,
#: damaged journals and DuckDB files, a store directory deleted under a running store, gc
#: racing a resumed run, PostgreSQL restarted and its connections killed mid-effect
FAULT_TESTS = ("tests/test_io_faults.py", "tests/test_pg_faults.py", "tests/test_client.py")


def faults_part() -> list[dict[str, Any]]:
    """Each fault test, run once in one pytest process, as a row: injected and survived
    (the test passed: nothing recorded lost, a clear error, the process went on), or not.
    What each test injects and checks is in its docstring and README "When the disk or the
    server fails"."""
    with _tempdir("faults") as tmp:
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                *(sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"),
                *(
                    "--basetemp",
                    str(tmp / "pytest"),
                    *FAULT_TESTS,
                    "-k",
                    "io_faults or pg_faults or gc_never",
                ),
            ],
            capture_output=True,
            text=True,
            cwd=str(REPO),
        )
        wall = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for line in out.stdout.splitlines():
        status, _, test = line.partition(" ")
        if status not in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            continue
        rows.append(
            {
                "part": "faults",
                "name": test.split("::", 1)[-1].split(" - ")[0][:86],
                "big": "survived" if status == "PASSED" else status.lower(),
                "lost": int(status in ("FAILED", "ERROR")),
            }
        )
    if rows:
        rows[0]["ratio"] = f"{len(rows)} tests, {wall:.0f} s"
    else:
        print(out.stdout[-5000:], out.stderr[-5000:], file=sys.stderr)
        rows.append({"part": "faults", "name": "no fault test ran", "big": "FAILED", "lost": 1})
    return rows


# --------------------------------------------------------------------------- main


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = ("part", "what", "small", "big / value", "ratio / note")
    widths = (6, 86, 14, 16, 16)
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        cells = (r["part"], r["name"], r.get("small", ""), r.get("big", ""), r.get("ratio", ""))
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))


def _child_main(args: list[str]) -> int:
    kind, rest = args[0], args[1:]
    if kind == "scale-build":
        out: Any = _child_scale_build(rest[0], int(rest[1]))
    elif kind == "scale-measure":
        out = _child_scale_measure(rest[0], rest[1], int(rest[2]))
    elif kind == "load":
        out = _child_load(rest[0], rest[1], int(rest[2]), int(rest[3]))
    elif kind == "scale-count":
        out = {"count": _count_effects(rest[0])}
    else:
        raise SystemExit(f"unknown child {kind!r}")
    dn.get_store().close()
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    parser.add_argument("--only", nargs="+", choices=("scale", "load", "fuzz", "faults"))
    parser.add_argument("--effects", type=int, help="effects in the big store (10,000,000)")
    parser.add_argument("--runs", type=int, help="concurrent runs of the load part (1,000)")
    parser.add_argument("--steps", type=int, help="effects per run of the load part (100)")
    parser.add_argument("--examples", type=int, help="examples per property (10,000)")
    parser.add_argument(
        "--budget", type=float, default=3600, help="seconds per fuzzed property (3600)"
    )
    parser.add_argument(
        "--stores",
        nargs="+",
        choices=FUZZ_STORES,
        default=list(FUZZ_STORES),
        help="the stores the fuzz part runs each property on (both)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    parts = args.only or ["scale", "load", "fuzz", "faults"]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    if "scale" in parts:
        n_big = args.effects or (200_000 if args.quick else 10_000_000)
        rows += scale_part(n_big)
    if "load" in parts:
        rows += load_part(args.runs or (100 if args.quick else 1000), args.steps or 100)
    if "fuzz" in parts:
        examples = args.examples or (100 if args.quick else 10_000)
        rows += fuzz_part(examples, args.budget, tuple(args.stores))
    if "faults" in parts:
        rows += faults_part()
    _print_table(rows)
    lost = sum(int(r.get("lost", 0)) for r in rows)
    print(f"\neffects lost: {lost} (must be 0); took {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
