"""What long-running LLM work costs durable_nb itself: progress reporting per item, the rate
and concurrency limiter per call, and recording an effect whose result carries token usage.

Run ``python benchmarks/bench_llm.py``; :func:`run` returns rows ``{"name", "value", "unit"}``
(``benchmarks/run.py --only llm``). Benchmarks report, they never assert.

- progress per item: ``for _ in dn.progress(range(n))`` inside an effect of a run that a
  listener follows (as the trace widget does), minus the same loop over ``range(n)``, per
  item; the listener only appends (the widget's own cost per message is in bench_widget).
- limiter per call: a run of n sequential calls of an async ``@effect`` with
  ``limit=..., concurrency=10**6, rate="1000000000/s"`` (never waits) minus the same effect
  without a limit, per call, medians of the in-body step times; and one bare
  ``acquire()``/``release()`` pair.
- usage record: the same run where the effect returns an OpenAI-style dict with ``usage``
  (two records in one write: the result and its usage) minus one returning the same dict
  without ``usage``, per step, DuckDB store.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
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
from durable_nb.engine._limits import check_limit, limiter  # noqa: E402


def _row(name: str, value: float, unit: str) -> dict[str, Any]:
    return {"name": name, "value": round(value, 3), "unit": unit}


def _steps(fn: Any, n: int, run_id: str) -> list[float]:
    """In-body time of each of n sequential calls of ``await fn(i)`` in one run (ns)."""
    stamps: list[int] = []

    @dn.durable(name=f"bench-{run_id}")
    async def wf(ctx: dn.Context) -> int:
        stamps.append(time.perf_counter_ns())
        for i in range(n):
            await fn(i)
            stamps.append(time.perf_counter_ns())
        return n

    job = dn.start(wf, run_id=run_id)
    job.subscribe(lambda m: None)
    job.result()
    return [b - a for a, b in itertools.pairwise(stamps)]


def progress_cost(n_items: int, repeats: int) -> list[dict[str, Any]]:
    messages: list[int] = []

    def loop(k: int, use: bool) -> int:
        it = dn.progress(range(n_items)) if use else iter(range(n_items))
        t0 = time.perf_counter_ns()
        for _ in it:
            pass
        return time.perf_counter_ns() - t0

    @dn.effect
    def timed(k: int, use: bool) -> int:
        return loop(k, use)

    @dn.durable(name="bench-progress")
    async def wf(ctx: dn.Context, k: int) -> list[int]:
        return [await ctx.run(timed, k, False), await ctx.run(timed, k, True)]

    plain, with_progress = [], []
    for k in range(repeats):
        job = dn.start(wf, k, run_id=f"progress-{k}")
        job.subscribe(lambda m: messages.append(1) if m["kind"] == "progress" else None)
        a, b = job.result()
        plain.append(a)
        with_progress.append(b)
    per_item = (statistics.median(with_progress) - statistics.median(plain)) / n_items
    return [
        _row(
            f"dn.progress inside a followed run's effect, per item ({n_items:,} items)",
            per_item,
            "ns",
        ),
        _row(
            "progress messages per bar of that loop (every 0.1 s, plus first and last)",
            len(messages) / max(1, repeats),
            "messages",
        ),
    ]


def _best(fn: Any, n: int, tag: str, repeats: int = 3) -> float:
    """The lowest of ``repeats`` runs' median step times (ns): the machine is shared and
    noisy, and a run's first steps pay one-off costs."""
    return min(statistics.median(_steps(fn, n, f"{tag}-{k}")) for k in range(repeats))


def limiter_cost(n: int) -> list[dict[str, Any]]:
    @dn.effect
    async def plain(i: int) -> int:
        return i

    @dn.effect(limit="bench-limit", concurrency=10**6, rate="1000000000/s")
    async def limited(i: int) -> int:
        return i

    base, lim = _best(plain, n, "lim-plain"), _best(limited, n, "lim-limited")
    named = check_limit("bench-bare", 10**6, "1000000000/s")
    assert named is not None
    bare = limiter(*named)

    async def pairs() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            bare.release(await bare.acquire())
        return (time.perf_counter_ns() - t0) / n

    pair = asyncio.run(pairs())
    return [
        _row(
            f"record an async effect in a run, no limit, per step, median ({n:,} steps)",
            base / 1000,
            "µs",
        ),
        _row(
            "the same with limit= (concurrency and rate, never waiting), per step, median",
            lim / 1000,
            "µs",
        ),
        _row("limiter cost per call (the difference)", (lim - base) / 1000, "µs"),
        _row("one bare acquire()/release() pair", pair / 1000, "µs"),
    ]


def usage_cost(n: int) -> list[dict[str, Any]]:
    body = {"id": "x", "model": "m", "choices": [{"message": {"content": "hello"}}]}

    @dn.effect
    async def without(i: int) -> dict[str, Any]:
        return body

    @dn.effect
    async def with_usage(i: int) -> dict[str, Any]:
        return {**body, "usage": {"prompt_tokens": 12, "completion_tokens": 3}}

    a, b = _best(without, n, "usage-without"), _best(with_usage, n, "usage-with")
    return [
        _row(
            f"record an LLM-style result without usage, per step, median ({n:,} steps)",
            a / 1000,
            "µs",
        ),
        _row(
            "the same result with usage (result + usage record, one write), per step, median",
            b / 1000,
            "µs",
        ),
        _row("token accounting per recorded call (the difference)", (b - a) / 1000, "µs"),
    ]


def run(n_items: int = 1_000_000, n_calls: int = 5_000, repeats: int = 3) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dn-bench-llm-") as tmp:
        dn.set_store(str(Path(tmp) / "store.duckdb"))
        try:
            _steps(lambda i: asyncio.sleep(0), 10, "warm-up")  # engine loop, store, first merge
            rows = progress_cost(n_items, repeats)
            rows += limiter_cost(n_calls)
            rows += usage_cost(n_calls)
        finally:
            dn.get_store().close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--json", action="store_true", help="print JSON rows")
    args = ap.parse_args(argv)
    rows = run(100_000, 500, 1) if args.quick else run()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['value']:>12,.3f} {r['unit']:<9} {r['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
