"""The DuckDB store's three journal modes (issue 20, item 5): what surviving an OS crash costs.

* ``fsync=False``: the journal is never synced (a crash of the process loses nothing; an OS
  crash loses what was not merged into DuckDB yet);
* ``fsync="group"``: one ``fdatasync`` by a background syncer covers every write made
  while the previous one ran; each writer waits for it;
* ``fsync=True``: one ``fdatasync`` per write, in the writer.

Per mode: one writer, then 8 threads writing at once (``put_effects`` of one small record
each, as a completed effect does), reporting the write latency (p50/p99), writes per
second and ``fdatasync`` calls per write; and a 300-step workflow of ``@effect`` calls.
Modes run interleaved, ``rounds`` times, best round kept (the machine is shared).

    python benchmarks/bench_fsync.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MODES: list[bool | str] = [False, "group", True]


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _writes(mode: bool | str, folder: Path, threads: int, per_thread: int) -> dict[str, float]:
    from durable_nb._codecs import Payload
    from durable_nb.store import EffectRecord
    from durable_nb.store._duckdb import DuckDBStore

    store = DuckDBStore(folder / f"w-{mode}-{threads}.duckdb", fsync=mode)
    lat: list[float] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine = []
        for i in range(per_thread):
            rec = EffectRecord("run/x", "f", "v", f"{t}-{i}", 0, Payload("json", b"1"), seq=i)
            t0 = time.perf_counter()
            store.put_effects([rec])
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    try:
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        n = threads * per_thread
        return {
            "p50_us": _pct(lat, 0.5) * 1e6,
            "p99_us": _pct(lat, 0.99) * 1e6,
            "per_s": n / elapsed,
            "syncs_per_write": (store._journal.syncs / n) if mode == "group" else float(bool(mode)),
        }
    finally:
        store.close()


def _workflow(mode: bool | str, folder: Path, steps: int) -> float:
    import durable_nb as dn
    from durable_nb.store._duckdb import DuckDBStore

    @dn.effect(name=f"bench_fsync.inc_{mode}")
    def inc(i: int) -> int:
        return i + 1

    @dn.durable(name=f"bench_fsync.steps_{mode}")
    async def flow(ctx: dn.Context, n: int) -> int:
        total = 0
        for i in range(n):
            total += inc(i)
        return total

    store = DuckDBStore(folder / f"wf-{mode}.duckdb", fsync=mode)
    dn.set_store(store)
    try:
        t0 = time.perf_counter()
        dn.run(flow, steps, run_id=f"r-{time.monotonic_ns()}")
        return (time.perf_counter() - t0) / steps * 1e6
    finally:
        dn.set_store(None)
        store.close()


def run(quick: bool = False) -> list[dict[str, Any]]:
    rounds, per_thread, steps = (1, 50, 100) if quick else (3, 300, 300)
    best: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(rounds):
            for mode in MODES:
                for threads in (1, 8):
                    n = per_thread if threads == 1 else per_thread // 2
                    r = _writes(mode, Path(d), threads, n)
                    key = (repr(mode), f"{threads} thread{'s' if threads > 1 else ''}")
                    if key not in best or r["per_s"] > best[key]["per_s"]:
                        best[key] = r
                us = _workflow(mode, Path(d), steps)
                key = (repr(mode), "workflow")
                if key not in best or us < best[key]["step_us"]:
                    best[key] = {"step_us": us}
    return [{"mode": m, "load": load, **v} for (m, load), v in best.items()]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| fsync= | writers | write p50 | write p99 | writes/s | fdatasync per write |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["load"] == "workflow":
            continue
        lines.append(
            f"| {r['mode']} | {r['load']} | {r['p50_us']:.0f} us | {r['p99_us']:.0f} us "
            f"| {r['per_s']:,.0f} | {r['syncs_per_write']:.2f} |"
        )
    lines += ["", "| fsync= | 300-step workflow, per step |", "|---|---|"]
    for r in rows:
        if r["load"] == "workflow":
            lines.append(f"| {r['mode']} | {r['step_us']:.0f} us |")
    return "\n".join(lines)


if __name__ == "__main__":
    started = time.time()
    print(table(run(quick="--quick" in sys.argv)))
    print(
        f"\n({time.time() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
