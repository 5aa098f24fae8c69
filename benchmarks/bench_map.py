"""What durable fan-out costs: ``ctx.map`` / ``dn.map`` of trivial items over a Dask
``LocalCluster`` of 2 worker processes (1 thread each) beside plain
``client.gather(client.map(fn, items))`` in the same run, the rerun of a recorded map, and
the driver's own cost per item.

Run ``python benchmarks/bench_map.py [--quick]``; :func:`run` returns rows ``{"name",
"value", "unit"}`` (``benchmarks/run.py --only map``). Benchmarks report, they never assert.

- map vs plain Dask: wall time of ``await ctx.map(inc, range(n), executor=client)`` in a
  fresh run (DuckDB store), and of ``dn.map`` in a fresh notebook scope, beside
  ``client.gather(client.map(inc, range(n), pure=False))``, alternated, medians. durable_nb
  sends the items in tasks sized from their measured durations (Dask's own ``client.map``,
  one future per task), so trivial items cost the scheduler less than one task each.
- rerun: ``dn.map`` again in a fresh cell (every item recorded, nothing sent), in the same
  process and after reopening the store (no read cache); ``ctx.map`` replayed by a resumed run.
- driver cost per item: ``dn.map`` over an executor that runs each task inline, minus the
  same tasks submitted to it without durable_nb, per item (key hashing, look-ups, task
  bookkeeping, encoding and recording the result); and the journaling alone: encoding
  results and writing their records in batches of 100, per item.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import durable_nb as dn  # noqa: E402
from durable_nb import _codecs  # noqa: E402
from durable_nb.engine import runtime  # noqa: E402
from durable_nb.store import EffectRecord  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def _row(name: str, value: float, unit: str) -> dict[str, Any]:
    return {"name": name, "value": round(value, 6), "unit": unit}


class Inline(concurrent.futures.Executor):
    """Runs each submitted call at once, in the caller: the executor costs nothing, so what
    remains is the driver's own work."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)
        return fut


def cluster_figures(n: int, repeats: int) -> list[dict[str, Any]]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    client.wait_for_workers(2)
    plain: list[float] = []
    ours_run: list[float] = []
    ours_top: list[float] = []
    replays: list[float] = []
    try:
        client.gather(client.map(inc, range(100), pure=False))  # warm: workers have inc
        for r in range(repeats):
            t = time.perf_counter()
            out = client.gather(client.map(inc, range(n), pure=False))
            plain.append(time.perf_counter() - t)
            assert out[-1] == n

            boom = {"on": True}

            @dn.durable(name=f"bench_map_{r}")
            async def wf(ctx: dn.Context, boom: dict[str, bool] = boom) -> int:
                total = sum(await ctx.map(inc, range(n), executor=client))
                if boom["on"]:
                    raise RuntimeError("stop after the map")  # resumed below: a replay
                return total

            t = time.perf_counter()
            try:
                dn.run(wf, run_id=f"bench-map-{r}")
            except RuntimeError:
                pass
            ours_run.append(time.perf_counter() - t)
            boom["on"] = False
            t = time.perf_counter()
            dn.run(wf, run_id=f"bench-map-{r}")
            replays.append(time.perf_counter() - t)

            runtime.set_top_scope(f"bench-map-{r}")
            t = time.perf_counter()
            dn.map(inc, range(n), executor=client)
            ours_top.append(time.perf_counter() - t)
    finally:
        client.close()
        cluster.close()
    med = statistics.median
    return [
        _row(
            f"plain client.gather(client.map(inc, range({n}))), 2-process LocalCluster, median",
            med(plain),
            "s",
        ),
        _row(
            f"ctx.map of {n} trivial items over the same cluster, fresh run, median",
            med(ours_run),
            "s",
        ),
        _row(
            f"dn.map of {n} trivial items over the same cluster, fresh scope, median",
            med(ours_top),
            "s",
        ),
        _row("ctx.map / plain client.map, wall time ratio", med(ours_run) / med(plain), "x"),
        _row("dn.map / plain client.map, wall time ratio", med(ours_top) / med(plain), "x"),
        _row(
            f"ctx.map of {n} items replayed by a resumed run (whole run), median", med(replays), "s"
        ),
    ]


def rerun_figures(n: int, repeats: int, store_path: str) -> list[dict[str, Any]]:
    runtime.set_top_scope("bench-map-rerun")
    dn.map(inc, range(n), executor=Inline())
    same: list[float] = []
    cold: list[float] = []
    for _ in range(repeats):
        runtime.top.reset()
        t = time.perf_counter()
        dn.map(inc, range(n), executor=Inline())
        same.append(time.perf_counter() - t)
    for _ in range(repeats):
        dn.set_store(store_path)  # reopened: an empty read cache, as in a new kernel
        runtime.top.reset()
        t = time.perf_counter()
        dn.map(inc, range(n), executor=Inline())
        cold.append(time.perf_counter() - t)
    med = statistics.median
    return [
        _row(f"dn.map of {n} recorded items rerun in a fresh cell, median", med(same), "s"),
        _row(
            f"dn.map of {n} recorded items rerun after reopening the store, median", med(cold), "s"
        ),
    ]


def driver_figures(n: int, repeats: int) -> list[dict[str, Any]]:
    ex = Inline()
    bare: list[float] = []
    ours: list[float] = []
    for r in range(repeats):
        t = time.perf_counter()
        futs = [ex.submit(inc, x) for x in range(n)]
        [f.result() for f in futs]
        bare.append(time.perf_counter() - t)
        runtime.set_top_scope(f"bench-map-driver-{r}")
        t = time.perf_counter()
        dn.map(inc, range(n), executor=ex)
        ours.append(time.perf_counter() - t)
    store, signer = runtime.store, runtime.store.signer
    journal: list[float] = []
    for r in range(repeats):
        t = time.perf_counter()
        for start in range(0, n, 100):
            recs = [
                EffectRecord(
                    f"top/bench-journal-{r}",
                    "inc",
                    "v",
                    f"{x:032x}",
                    0,
                    payload=_codecs.encode(x + 1, signer, what="bench"),
                    kind="map_item",
                    started_at=time.time(),
                    duration=1e-6,
                )
                for x in range(start, min(n, start + 100))
            ]
            store.put_effects(recs)
        journal.append(time.perf_counter() - t)
    med = statistics.median
    per = (med(ours) - med(bare)) / n * 1e6
    return [
        _row(
            "driver cost per item (dn.map over an inline executor minus the bare submits)",
            per,
            "µs",
        ),
        _row(
            "journaling per item (encode + record, batches of 100, DuckDB)",
            med(journal) / n * 1e6,
            "µs",
        ),
    ]


def run(n_items: int = 10_000, repeats: int = 3) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dn-bench-map-") as tmp:
        path = str(Path(tmp) / "store.duckdb")
        dn.set_store(path)
        dn.set_clock(None)
        try:
            rows = driver_figures(n_items, repeats)
            rows += rerun_figures(n_items, repeats, path)
            try:
                rows += cluster_figures(n_items, repeats)
            except ImportError:
                rows.append(_row("Dask not installed (pip install 'durable_nb[dask]')", 0, ""))
        finally:
            dn.get_store().close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args(argv)
    rows = run(2_000, 1) if args.quick else run()
    for r in rows:
        print(f"{r['name']:<100} {r['value']:>12} {r['unit']}")
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
