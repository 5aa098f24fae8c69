from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.store import MemoryStore, Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets a fresh in-memory store, a fake clock and its own working directory."""
    monkeypatch.chdir(tmp_path)
    old_store, old_clock, old_top = runtime._store, runtime.clock, runtime.top
    runtime._store = MemoryStore()
    runtime.clock = dn.FakeClock()
    runtime.set_top_scope("test")
    yield
    store = runtime._store
    runtime._store, runtime.clock, runtime.top = old_store, old_clock, old_top
    if store is not None:
        store.close()


@pytest.fixture
def clock() -> dn.FakeClock:
    assert isinstance(runtime.clock, dn.FakeClock)
    return runtime.clock


@pytest.fixture(params=["memory", "duckdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store in use by the engine, once per implementation."""
    if request.param == "memory":
        s: Store = MemoryStore()
    else:
        from durable_nb.store._duckdb import DuckDBStore

        s = DuckDBStore(tmp_path / "store.duckdb")
    runtime._store = s
    yield s
