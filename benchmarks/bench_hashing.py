"""How fast durable_nb computes effect keys (``durable_nb._hashing``).

Run ``python benchmarks/bench_hashing.py``; a benchmark runner imports :func:`run`, which
returns rows ``{"name", "value", "unit"}``. Throughput figures are the best of a few
repeats (the machine is shared and noisy); GB is 10**9 bytes.

- raw xxh3_128 over a 100 MB buffer: the ceiling;
- ``hash_value`` of a 100 MB float64 numpy array, of a 100 MB numeric pandas DataFrame
  (10 float64 columns) and of a 100 MB Arrow table (10 float64 columns, 4 chunks each);
- ``joblib.hash`` of the same numpy array, when joblib is installed (md5 over a pickle);
- ``ArgBinder.input_hash`` of a call with one int argument (the replay hot path), and
  ``hash_value`` of five small scalars.
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import xxhash

from durable_nb._hashing import ArgBinder, hash_value

NBYTES = 100_000_000


def _best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm up: first-touch page faults, lazy imports, type resolution
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _gbps(name: str, nbytes: int, fn: Callable[[], object]) -> dict[str, Any]:
    return {"name": name, "value": round(nbytes / _best_seconds(fn) / 1e9, 2), "unit": "GB/s"}


def _per_call_us(name: str, fn: Callable[[], object], number: int = 100_000) -> dict[str, Any]:
    best = min(timeit.repeat(fn, number=number, repeat=5)) / number
    return {"name": name, "value": round(best * 1e6, 3), "unit": "us"}


def _one_int(i: int) -> int:
    return i


def run(nbytes: int = NBYTES) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    array = rng.random(nbytes // 8)
    rows.append(
        _gbps("raw xxh3_128, 100 MB buffer", array.nbytes, lambda: xxhash.xxh3_128_digest(array))
    )
    rows.append(_gbps("hash_value, numpy float64 array", array.nbytes, lambda: hash_value(array)))

    import pandas as pd

    ncols = 10
    rows_per_col = nbytes // 8 // ncols
    frame = pd.DataFrame({f"c{i}": rng.random(rows_per_col) for i in range(ncols)})
    frame_bytes = int(frame.memory_usage(index=False).sum())
    rows.append(
        _gbps("hash_value, numeric pandas DataFrame", frame_bytes, lambda: hash_value(frame))
    )

    import pyarrow as pa

    chunk = rows_per_col // 4
    columns = {
        f"c{i}": pa.chunked_array(
            [rng.random(chunk) for _ in range(3)] + [rng.random(rows_per_col - 3 * chunk)]
        )
        for i in range(ncols)
    }
    table = pa.table(columns)
    rows.append(_gbps("hash_value, Arrow table", table.nbytes, lambda: hash_value(table)))

    try:
        import joblib
    except ImportError:
        pass
    else:
        rows.append(
            _gbps("joblib.hash, numpy float64 array", array.nbytes, lambda: joblib.hash(array))
        )

    binder = ArgBinder(_one_int)
    rows.append(_per_call_us("input_hash, f(i: int)", lambda: binder.input_hash((7,), {})))
    rows.append(
        _per_call_us(
            "hash_value x5 small scalars",
            lambda: (
                hash_value(7),
                hash_value("text"),
                hash_value(2.5),
                hash_value(None),
                hash_value(True),
            ),
        )
    )
    return rows


def main() -> None:
    for row in run():
        print(f"{row['name']:<42} {row['value']:>10} {row['unit']}")


if __name__ == "__main__":
    main()
