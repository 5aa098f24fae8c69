"""A notebook-like driver of ``dn.map`` for tests/test_map.py, run as its own process (so a
test can SIGKILL it): maps ``work`` over ``range(N)`` on an executor and writes the results.

``python tests/map_driver.py MODE STORE COUNT RESULT N MAX_IN_FLIGHT KILL_WORKER_AT [ADDRESS]``

MODE: ``dask`` (a running cluster at ADDRESS), ``dask-local`` (a LocalCluster of its own,
2 worker processes of 1 thread), ``process`` (a ProcessPoolExecutor of 2). Each execution of
``work`` appends its item to COUNT (on the worker). KILL_WORKER_AT > 0: once COUNT has that
many lines, SIGKILL one worker process. A failed map prints ``MapError`` and its failed
indices on stdout and exits 3.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import durable_nb as dn

COUNT = sys.argv[3] if len(sys.argv) > 3 else ""


@dn.effect
def work(x: int) -> int:
    with open(COUNT, "a") as f:  # O_APPEND: one line per execution, from any process
        f.write(f"{x}\n")
    time.sleep(0.004)
    return x * x


def _lines() -> int:
    try:
        with open(COUNT) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _kill_a_worker(pids: list[int], at: int) -> None:
    while _lines() < at:
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGKILL)
    print(f"killed worker {pids[0]}", flush=True)


def main() -> int:
    mode, store, _, result = sys.argv[1:5]
    n, max_in_flight, kill_at = (int(a) for a in sys.argv[5:8])
    dn.set_store(store)
    executor: Any
    if mode.startswith("dask"):
        from distributed import Client, LocalCluster

        if mode == "dask":
            executor = Client(sys.argv[8])
        else:
            cluster = LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            )
            executor = Client(cluster)
        executor.wait_for_workers(2)
        pids = sorted(executor.run(os.getpid).values())
    else:
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(2)
        executor.submit(int).result()  # its processes exist now
        pids = sorted(executor._processes)  # type: ignore[attr-defined]
    print(f"ready {os.getpid()} workers {pids}", flush=True)
    if kill_at > 0:
        threading.Thread(target=_kill_a_worker, args=(pids, kill_at), daemon=True).start()
    try:
        out = dn.map(work, range(n), executor=executor, max_in_flight=max_in_flight)
    except dn.errors.MapError as e:
        print(f"MapError {sorted(e.errors)[:5]} {len(e.errors)} {e.exceptions[0]!r}", flush=True)
        return 3
    with open(result, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
