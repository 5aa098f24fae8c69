"""The DuckDB store's key filter: a miss in a notebook scope needs no query, and no record is
ever missed — across processes, across the filter's growth, on stores older than it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from durable_nb._codecs import Payload
from durable_nb.store import EffectRecord
from durable_nb.store._duckdb import DuckDBStore
from durable_nb.store._keyfilter import KeyFilter

from .helpers import spawn_python

SCOPE = "top/nb.ipynb"


def rec(i: int, scope: str = SCOPE) -> EffectRecord:
    return EffectRecord(scope, "mod.f", "v1", f"{i:032x}", 0, payload=Payload("json", b"1"))


def queries(store: DuckDBStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the store's trips to DuckDB."""
    calls: list[int] = []
    original = store._db

    def counted() -> Any:
        calls.append(1)
        return original()

    monkeypatch.setattr(store, "_db", counted)
    return calls


def test_a_miss_in_a_notebook_scope_makes_no_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    try:
        store.put_effects([rec(i) for i in range(10)])
        store.flush()
        store._recent.clear()  # as after a restart: nothing in memory
        assert store.get_effect(rec(3).key) is not None  # completes the filter on first use
        trips = queries(store, monkeypatch)
        for i in range(100, 200):
            assert store.get_effect(rec(i).key) is None
        assert trips == []
        assert store.get_effect(rec(5).key) is not None  # a recorded key still is found
        # run scopes are not filtered: their history is loaded whole when a run starts
        assert store.get_effect(rec(1, "run/r").key) is None
        assert trips == [1, 1]
    finally:
        store.close()


WRITER = """
import sys
from durable_nb._codecs import Payload
from durable_nb.store import EffectRecord
from durable_nb.store._duckdb import DuckDBStore
store = DuckDBStore(sys.argv[1], idle_close=0.05)
for start in range(int(sys.argv[2]), int(sys.argv[3]), 1000):
    store.put_effects([
        EffectRecord("top/nb.ipynb", "mod.f", "v1", f"{i:032x}", 0, payload=Payload("json", b"1"))
        for i in range(start, min(start + 1000, int(sys.argv[3])))
    ])
store.close()
"""


def test_records_another_process_wrote_are_found_even_after_the_filter_grew(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.duckdb"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    store = DuckDBStore(path, idle_close=0.05)
    try:
        store.put_effects([rec(0)])
        assert store.get_effect(rec(1).key) is None  # the filter is open and complete here
        # another process writes 40,000 keys: more than the first two generations hold
        proc = spawn_python(str(script), str(path), "1", "40001")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert len(list((tmp_path / "s.duckdb.d" / "keys").iterdir())) == 3  # it grew twice
        store._recent.clear()
        # every slot written in every generation (a sample: each found key is a query)
        sample = [*range(0, 40001, 97), *range(39_900, 40001)]
        missing = [i for i in sample if store.get_effect(rec(i).key) is None]
        assert missing == []
        assert store.get_effect(rec(40001).key) is None
    finally:
        store.close()


def test_a_store_older_than_the_filter_is_scanned_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path)
    store.put_effects([rec(i) for i in range(50)])
    store.close()
    shutil.rmtree(tmp_path / "s.duckdb.d" / "keys")  # as a store made before filters
    store = DuckDBStore(path)
    try:
        assert all(store.get_effect(rec(i).key) is not None for i in range(50))
        store._recent.clear()
        trips = queries(store, monkeypatch)
        assert store.get_effect(rec(77).key) is None
        assert trips == []
    finally:
        store.close()
    store = DuckDBStore(path)  # the next process trusts it at once
    try:
        trips = queries(store, monkeypatch)
        assert store.get_effect(rec(78).key) is None
        assert trips == []
    finally:
        store.close()


def test_a_filter_file_that_is_not_ours_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    f = KeyFilter(folder, SCOPE)
    f.add([("a", "b", "c", 0)])
    f.mark_complete()
    assert f.absent(("a", "b", "c", 1)) and not f.absent(("a", "b", "c", 0))
    f.close()
    (path,) = folder.iterdir()
    data = bytearray(path.read_bytes())
    data[:8] = b"GARBAGE!"
    path.write_bytes(bytes(data))
    f = KeyFilter(folder, SCOPE)
    try:
        assert not f.complete and not f.absent(("a", "b", "c", 1))
    finally:
        f.close()
