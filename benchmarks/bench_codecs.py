"""How fast results are stored and loaded by type.

A 10M-row x 4-column numeric DataFrame is stored and loaded four ways: through the
``pandas`` codec as a native DuckDB table (what the DuckDB store does), pickled into a
DuckDB BLOB, pickled into a plain file, and as Parquet. Figures are MB/s of the frame's
in-memory size; "store" ends when the data is durable (DuckDB's commit, ``fsync`` for
files), "load" ends with an equal DataFrame in hand. Connecting to DuckDB is not timed.
Also: encode/decode microseconds of the small values that dominate replay.

    .venv/bin/python benchmarks/bench_codecs.py            # ~25 s, ~2.5 GB of memory
    .venv/bin/python benchmarks/bench_codecs.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from durable_nb._codecs import Payload, Signer, decode, encode

SIGNER = Signer(b"benchmark key, 32 bytes long....")


def make_frame(n_rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "id": np.arange(n_rows, dtype=np.int64),
            "x": rng.random(n_rows),
            "y": rng.standard_normal(n_rows),
            "n": rng.integers(0, 1_000, n_rows, dtype=np.int64),
        }
    )


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _native(df: pd.DataFrame, tmp: Path) -> tuple[float, float, pd.DataFrame]:
    path = str(tmp / "native.duckdb")
    con = duckdb.connect(path)

    def store() -> bytes:
        payload = encode(df, SIGNER)
        con.register("dn_value", payload.table)
        con.execute("CREATE TABLE result AS SELECT * FROM dn_value")
        con.unregister("dn_value")
        return payload.data

    t_store, data = _timed(store)
    con.close()
    con = duckdb.connect(path)

    def load() -> object:
        table = con.sql("SELECT * FROM result").to_arrow_table()
        return decode(Payload("pandas", data, table), SIGNER)

    t_load, out = _timed(load)
    con.close()
    return t_store, t_load, out


def _pickle_blob(df: pd.DataFrame, tmp: Path) -> tuple[float, float, pd.DataFrame]:
    path = str(tmp / "blob.duckdb")
    con = duckdb.connect(path)
    con.execute("CREATE TABLE results (v BLOB)")

    def store() -> None:
        con.execute("INSERT INTO results VALUES (?)", [pickle.dumps(df, protocol=5)])

    t_store, _ = _timed(store)
    con.close()
    con = duckdb.connect(path)

    def load() -> object:
        row = con.execute("SELECT v FROM results").fetchone()
        assert row is not None
        return pickle.loads(row[0])

    t_load, out = _timed(load)
    con.close()
    return t_store, t_load, out


def _pickle_file(df: pd.DataFrame, tmp: Path) -> tuple[float, float, pd.DataFrame]:
    path = tmp / "frame.pickle"
    t_store, _ = _timed(lambda: _write_durably(path, pickle.dumps(df, protocol=5)))
    t_load, out = _timed(lambda: pickle.loads(path.read_bytes()))
    return t_store, t_load, out


def _parquet(df: pd.DataFrame, tmp: Path) -> tuple[float, float, pd.DataFrame]:
    path = tmp / "frame.parquet"

    def store() -> None:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=None), path)
        _fsync(path)

    t_store, _ = _timed(store)
    t_load, out = _timed(lambda: pq.read_table(path).to_pandas())
    return t_store, t_load, out


def _micro_us(stmt: Callable[[], object], number: int = 20_000) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def run(n_rows: int = 10_000_000, repeats: int = 2) -> list[dict[str, Any]]:
    """Measure everything; rows of {"name", "value", "unit"}. Best of ``repeats`` runs."""
    rows: list[dict[str, Any]] = []
    df = make_frame(n_rows)
    mb = df.memory_usage(deep=True).sum() / 1e6
    rows.append({"name": f"frame {n_rows:,} rows x 4 numeric columns", "value": mb, "unit": "MB"})
    ways = {
        "DuckDB native table (pandas codec)": _native,
        "pickle in a DuckDB BLOB": _pickle_blob,
        "pickle in a file": _pickle_file,
        "Parquet file": _parquet,
    }
    for label, way in ways.items():
        stores, loads = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="bench_codecs_") as tmp:
                t_store, t_load, out = way(df, Path(tmp))
            if not out.equals(df):
                raise AssertionError(f"{label}: the loaded frame differs")
            del out
            stores.append(t_store)
            loads.append(t_load)
        rows.append({"name": f"{label}: store", "value": mb / min(stores), "unit": "MB/s"})
        rows.append({"name": f"{label}: load", "value": mb / min(loads), "unit": "MB/s"})

    small: dict[str, object] = {
        "small int": 12345,
        "short str": "hello world",
        "small dict": {"status": "ok", "n": 3, "items": [1, 2.5, None]},
        "small tuple (pickle)": (1, "a"),
    }
    for label, value in small.items():
        payload = encode(value, SIGNER)
        rows.append(
            {
                "name": f"encode {label}",
                "value": _micro_us(lambda v=value: encode(v, SIGNER)),
                "unit": "us",
            }
        )
        rows.append(
            {
                "name": f"decode {label}",
                "value": _micro_us(lambda p=payload: decode(p, SIGNER)),
                "unit": "us",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for row in run(args.rows, args.repeats):
        print(f"{row['name']:<48} {row['value']:>10.2f} {row['unit']}")
    print(f"{'(benchmark took)':<48} {time.perf_counter() - start:>10.1f} s")


if __name__ == "__main__":
    main()
