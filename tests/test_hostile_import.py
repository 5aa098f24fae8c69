"""A damaged or forged export file is imported whole or not at all: cut short, lines dropped,
swapped or repeated, characters changed, pickles forged, fields of the wrong type, lines of
megabytes; into a DuckDB and a PostgreSQL store, signed with the exporter's key or another
(issue 20, item 6; what the properties share: ``hostile.py``)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import durable_nb as dn
from durable_nb.store import MemoryStore, Store
from durable_nb.store._duckdb import DuckDBStore

from .hostile import (
    JSONISH,
    PROFILE,
    RUN_STORE_KINDS,
    count,
    engine_on,
    entry,
    exported,
    fingerprint,
    own_error,
    timed,
)

KEY = b"hostile test key, not a secret..."


def _export_text(key: bytes) -> str:
    src = MemoryStore(key=key)
    with engine_on(src):
        for i in range(3):
            job = dn.start(exported, i + 1, run_id=f"exported-{i}")
            job.signal("go", {"i": i})
            job.result(timeout=30)
        dn.set_clock(None)
        shared = dn.effect(name="hostile.shared", version="1", shared=True)(lambda x: [x])
        shared(1)
        buf = io.StringIO()
        dn.Client(src).export(buf)
        return buf.getvalue()


def _mutate(text: str, ops: list[tuple[str, int, int, Any]]) -> str:
    lines = text.splitlines(keepends=True)
    for op, a, b, extra in ops:
        n = len(lines)
        i, j = a % max(n, 1), b % max(n, 1)
        if op == "truncate":
            joined = "".join(lines)
            lines = [joined[: a % max(len(joined), 1)]]
        elif op == "drop" and n:
            del lines[i]
        elif op == "swap" and n:
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "duplicate" and n:
            lines.insert(j, lines[i])
        elif op == "char" and n and lines[i]:
            k = b % len(lines[i])
            lines[i] = lines[i][:k] + str(extra)[:1] + lines[i][k + 1 :]
        elif op == "forge":
            signed = [k for k, line in enumerate(lines) if '"pickle"' in line]
            if signed:
                k = signed[a % len(signed)]
                pos = lines[k].index('"data": "', lines[k].index('"pickle"')) + 9 + b % 8
                flip = "A" if lines[k][pos] != "A" else "B"
                lines[k] = lines[k][:pos] + flip + lines[k][pos + 1 :]
        elif op == "field" and n:
            try:
                d = json.loads(lines[i])
            except ValueError:
                continue
            if isinstance(d, dict) and d:
                field = sorted(d)[b % len(d)]
                d[field] = extra
                lines[i] = json.dumps(d) + "\n"
        elif op == "unkeepable" and n:  # text no store can keep inside a text field
            try:
                d = json.loads(lines[i])
            except ValueError:
                continue
            texts = sorted(k for k, v in d.items() if isinstance(v, str)) if type(d) is dict else []
            if texts:
                field = texts[b % len(texts)]
                k = a % (len(d[field]) + 1)
                d[field] = d[field][:k] + ("\x00" if b % 3 else "\udc80") + d[field][k:]
                lines[i] = json.dumps(d) + "\n"
        elif op == "huge":
            lines.insert(i, "x" * (2**18 + a % 2**20) + "\n")
        elif op == "huge field" and n:
            try:
                d = json.loads(lines[i])
            except ValueError:
                continue
            if isinstance(d, dict) and "run_id" in d:
                d["workflow" if "workflow" in d else "run_id"] = "w" * (2**18 + b % 2**20)
                lines[i] = json.dumps(d) + "\n"
    return "".join(lines)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "truncate",
                "drop",
                "swap",
                "duplicate",
                "char",
                "forge",
                "field",
                "unkeepable",
                "huge",
                "huge field",
            ]
        ),
        st.integers(0, 2**31),
        st.integers(0, 2**31),
        JSONISH | st.text(max_size=3),
    ),
    min_size=1,
    max_size=3,
)


@pytest.fixture
def new_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str, bytes | None], Store]]:
    """``new_store(name, key)``: an empty store of the parameter's kind (PostgreSQL: a schema
    of this module per name), closed after the test."""
    opened: list[Store] = []

    def new(name: str, key: bytes | None) -> Store:
        if request.param == "memory":
            store: Store = MemoryStore(key=key)
        elif request.param == "duckdb":
            store = DuckDBStore(tmp_path / f"{name}.duckdb", key=key)
        else:
            from durable_nb.store._postgres import PostgresStore

            url = request.getfixturevalue("module_pg_url")(name)
            store = PostgresStore(url, key=key)
        opened.append(store)
        return store

    yield new
    for store in opened:
        store.close()


@pytest.mark.parametrize("new_store", RUN_STORE_KINDS, indirect=True)
def test_import_of_damaged_or_forged_exports_is_all_or_nothing(
    new_store: Callable[[str, bytes | None], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_NB_KEY", raising=False)  # the other store has no key
    text = _export_text(KEY)
    target = new_store("target", KEY)
    other_key = new_store("other_key", None)  # pickles signed by KEY are foreign there
    name = entry("export file for import", target)

    @PROFILE
    @given(MUTATIONS, st.booleans(), st.booleans())
    def check(ops: list[tuple[str, int, int, Any]], into_other: bool, replace: bool) -> None:
        store = other_key if into_other else target
        damaged = _mutate(text, ops)
        before = fingerprint(store)
        runs_before = len(store.list_runs(limit=10**6))
        try:
            # replace: the runs the store has are written again (else they are skipped)
            dn.Client(store).import_records(io.StringIO(damaged), replace=replace)
        except Exception as e:
            assert own_error(e), f"{ops!r}: import raised {e!r}"
            assert fingerprint(store) == before, f"{ops!r}: half-imported"
            count(name, "refused")
            return
        again = io.StringIO()
        dn.Client(store).export(again)  # what it holds reads back, exports and imports again
        dn.Client(MemoryStore(key=KEY)).import_records(io.StringIO(again.getvalue()))
        assert len(store.list_runs(limit=10**6)) >= runs_before
        count(name, "stored")

    with timed(name):
        check()
