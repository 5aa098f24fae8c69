"""Scale, load and the regressions the hostile-input campaign found (issue 20, items 1, 3, 6).

Timing is measured in ``benchmarks/reliability.py``; these tests assert what is not timing:
that point lookups use an index at any store size, that many concurrent runs in one process
all complete with nothing lost, and that each bug the property tests of ``test_hostile_*.py``
found stays fixed.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import duckdb
import pytest
from IPython.core.error import UsageError

import durable_nb as dn
from durable_nb import errors
from durable_nb.engine import runtime
from durable_nb.store import MemoryStore, Store
from durable_nb.store._duckdb import DuckDBStore

from .helpers import run, wait_until


# ------------------------------------------------------------------ item 1: indexes
def _plan(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> str:
    return "\n".join(r[1] for r in con.execute("EXPLAIN ANALYZE " + sql, params).fetchall())


def test_point_lookups_scan_an_index_not_the_table(tmp_path: Path) -> None:
    """The queries ``get_effect`` runs (by input hash; by scope for kv and stream records)
    scan an index; a filter on all five key columns would scan every row group."""
    from durable_nb.store._duckdb import _GET_BY_INPUT, _GET_BY_SCOPE

    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    con = duckdb.connect(str(path))
    # 300,000 effects in 300 runs: several row groups, so a table scan would show
    con.execute(
        "INSERT INTO dn_effects SELECT 'run/r-' || (i // 1000)::VARCHAR, 'f', 'v:1', "
        "md5(i::VARCHAR), 0, 'json', '1'::BLOB, NULL, false, 'effect', (i % 1000)::INTEGER, "
        "i, 0.0, '' FROM range(300000) t(i)"
    )
    con.execute(
        "INSERT INTO dn_effects SELECT 'kv/r-7', 'key-' || i::VARCHAR, '', '', 0, 'json', "
        "'1'::BLOB, NULL, false, 'kv_set', i::INTEGER, i, 0.0, '' FROM range(5) t(i)"
    )
    h = con.execute("SELECT md5('1234')").fetchall()[0][0]
    by_input = _plan(con, _GET_BY_INPUT, ["run/r-1", "f", "v:1", h, 0])
    assert "Index Scan" in by_input, by_input
    by_scope = _plan(con, _GET_BY_SCOPE, ["kv/r-7", "key-3", "", "", 0])
    assert "Index Scan" in by_scope, by_scope
    assert con.execute(_GET_BY_INPUT, ["run/r-1", "f", "v:1", h, 0]).fetchall()[0][3] == h
    assert con.execute(_GET_BY_SCOPE, ["kv/r-7", "key-3", "", "", 0]).fetchall()[0][1] == "key-3"
    assert con.execute(_GET_BY_INPUT, ["run/r-2", "f", "v:1", h, 0]).fetchall() == []
    con.close()
    store = DuckDBStore(path)  # and the store finds them through those queries
    try:
        rec = store.get_effect(("run/r-1", "f", "v:1", h, 0))
        assert rec is not None and rec.seq == 234
        assert store.get_effect(("kv/r-7", "key-3", "", "", 0)) is not None
        assert store.get_effect(("kv/r-7", "key-9", "", "", 0)) is None
    finally:
        store.close()


def test_an_older_store_gets_the_indexes_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    con = duckdb.connect(str(path))  # make it look like a schema-1 store
    con.execute("DROP INDEX dn_effects_input_hash")
    con.execute("DROP INDEX dn_effects_scope")
    con.execute("DELETE FROM dn_migrations WHERE version > 1")
    con.execute("UPDATE dn_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    DuckDBStore(path).close()
    con = duckdb.connect(str(path))
    names = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
    assert {"dn_effects_input_hash", "dn_effects_scope"} <= names
    con.close()


def test_a_gc_that_prunes_nothing_writes_nothing(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    runtime._store = store
    dn.set_clock(None)  # recorded now, so younger than gc's cutoff
    dn.effect(name="t.f", version="1")(lambda x: x)(1)
    store.flush()
    deletions = tmp_path / "s.duckdb.d" / "deletions"
    token = deletions.stat().st_mtime_ns if deletions.exists() else None
    out = dn.Client(store).gc("7d")
    assert (out["runs"], out["top_effects"], out["shared_effects"]) == (0, 0, 0)
    # other processes keep their read caches: nothing told them records went away
    assert (deletions.stat().st_mtime_ns if deletions.exists() else None) == token


# ------------------------------------------------------------------ item 3: load
EXECUTED: dict[str, int] = {"n": 0}


@dn.effect(name="reliability.load_step", version="1")
async def load_step(run: int, i: int) -> int:
    EXECUTED["n"] += 1
    await asyncio.sleep(0)
    return run * 1000 + i


@dn.durable(name="reliability.load", version="1")
async def load_wf(ctx: dn.Context, run: int, n: int) -> int:
    total = 0
    for i in range(n):
        total += await load_step(run, i)
    return total


@pytest.mark.parametrize("mode", ["gathered", "background"])
def test_many_concurrent_runs_in_one_process_all_complete_and_lose_nothing(
    tmp_path: Path, mode: str
) -> None:
    runs, n = 60, 20
    store = DuckDBStore(tmp_path / "s.duckdb")
    runtime._store = store
    EXECUTED["n"] = 0

    async def gathered() -> list[int]:
        jobs = [dn.start(load_wf, r, n, run_id=f"load-{r}") for r in range(runs)]
        return list(await asyncio.gather(*(j.wait() for j in jobs)))

    if mode == "gathered":
        results = asyncio.run(gathered())
    else:
        jobs = [dn.start(load_wf, r, n, run_id=f"load-{r}") for r in range(runs)]
        results = [j.result(timeout=120) for j in jobs]
    assert results == [sum(r * 1000 + i for i in range(n)) for r in range(runs)]
    assert EXECUTED["n"] == runs * n
    store.close()
    reopened = DuckDBStore(tmp_path / "s.duckdb")  # what is durable, read afresh
    runtime._store = reopened
    for r in range(runs):
        rec = reopened.get_run(f"load-{r}")
        assert rec is not None and rec.status == "completed"
        steps = [e for e in reopened.load_effects(f"run/load-{r}") if e.kind == "effect"]
        assert sorted(e.input_hash for e in steps) == sorted({e.input_hash for e in steps})
        assert len(steps) == n
    again = asyncio.run(gathered())
    assert again == results and EXECUTED["n"] == runs * n  # nothing executed twice


# ------------------------------------------------------------------ item 6: regressions
@dn.durable(name="reliability.waits", version="1")
async def waits(ctx: dn.Context) -> Any:
    return await ctx.wait_signal("go")


@pytest.mark.parametrize("name", ["__cancel__", "__queue__:jobs"])
def test_reserved_signal_names_are_refused_when_sent(name: str) -> None:
    job = dn.start(waits, run_id="waits")
    job.signal("warm-up", None)
    wait_until(lambda: runtime.store.get_run("waits") is not None, "the run starts")
    pattern = rf"^signal name {name!r} is reserved \(cancellation, queues\)"
    with pytest.raises(errors.ArgumentError, match=pattern):
        job.signal(name, "x")
    with pytest.raises(errors.ArgumentError, match=pattern):
        dn.signal("waits", name, "x")
    with pytest.raises(errors.ArgumentError, match=pattern):
        dn.Client(runtime.store).signal("waits", name, "x")
    assert [s.name for s in runtime.store.list_signals("waits")] == ["warm-up"]
    job.signal("go", 1)
    assert job.result(timeout=30) == 1  # the run was not cancelled


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ((1, 2), r"\(1, 2\) is a tuple \(use a list\)"),
        ({1: "a"}, r"key 1 is a int, and JSON keys are str"),
        ([{"k": (1,)}], r"\(1,\) is a tuple"),
    ],
)
def test_json_payloads_that_would_come_back_changed_are_refused(value: Any, problem: str) -> None:
    seen: dict[str, Any] = {}

    @dn.durable(name="reliability.payloads", version="1")
    async def payloads(ctx: dn.Context) -> None:
        for what, call in (
            ("kv", lambda: ctx.kv.set("k", value)),
            ("status", lambda: ctx.set_status(value)),
        ):
            try:
                call()
            except errors.UnstorableValueError as e:
                seen[what] = str(e)
        try:
            await ctx.stream("s").write(value)
        except errors.UnstorableValueError as e:
            seen["stream"] = str(e)
        seen["kv keys"] = list(ctx.kv)
        await ctx.wait_signal("go")

    job = dn.start(payloads, run_id="payloads")
    with pytest.raises(
        errors.UnstorableValueError, match=rf"^payload must be JSON data .*{problem}"
    ):
        job.signal("go", value)
    job.signal("go", None)
    job.result(timeout=30)
    assert seen["kv keys"] == []
    for what in ("kv", "status", "stream"):
        assert re.search(problem, seen[what]) or what == "stream", (what, seen[what])
    assert seen["stream"].startswith("a chunk written to stream 's' must be JSON data")


def _export(tmp_path: Path) -> list[str]:
    key = b"k" * 32
    src = MemoryStore(key=key)
    runtime._store = src
    job = dn.start(waits, run_id="exported")
    job.signal("go", {"a": 1})
    job.result(timeout=30)
    buf = io.StringIO()
    dn.Client(src).export(buf)
    return buf.getvalue().splitlines(keepends=True)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("cut", r"it has no end record: it was cut short"),
        ("after end", r"a record follows the end record"),
        ("non-ascii base64", r"a payload's bytes are not base64"),
        ("wrong field type", r"field 'occurrence' of a effect record is 'x'"),
        ("bad signal payload", r"a signal's payload is not JSON"),
        ("count", r"the end record counts"),
    ],
)
def test_damaged_exports_are_refused_and_nothing_is_imported(
    tmp_path: Path, damage: str, message: str
) -> None:
    lines = _export(tmp_path)
    assert json.loads(lines[-1])["type"] == "end"
    if damage == "cut":
        lines = lines[:-1]
    elif damage == "after end":
        lines.append(lines[1])
    elif damage == "count":
        del lines[-2]
    else:
        for i, line in enumerate(lines):
            d = json.loads(line)
            if damage == "non-ascii base64" and d["type"] == "effect":
                d["payload"]["data"] = "é" + d["payload"]["data"]
            elif damage == "wrong field type" and d["type"] == "effect":
                d["occurrence"] = "x"
            elif damage == "bad signal payload" and d["type"] == "signal":
                d["payload"] = "{not json"
            else:
                continue
            lines[i] = json.dumps(d) + "\n"
            break
    target = DuckDBStore(tmp_path / "t.duckdb", key=b"k" * 32)
    try:
        with pytest.raises(errors.ExportFormatError, match=message):
            dn.Client(target).import_records(io.StringIO("".join(lines)))
        assert target.list_runs() == [] and target.load_effects("run/exported") == []
    finally:
        target.close()


@pytest.mark.parametrize(("record", "field"), [("signal", "name"), ("run", "workflow")])
def test_an_export_with_a_nul_character_in_a_name_is_refused_whole_on_every_store(
    store: Store, tmp_path: Path, record: str, field: str
) -> None:
    """PostgreSQL text cannot hold NUL: such a file was checked, then written record by
    record into PostgreSQL until the store refused one (half-imported); now it is refused
    before anything is written, on every store."""
    lines = _export(tmp_path)
    runtime._store = store
    for i, line in enumerate(lines):
        d = json.loads(line)
        if d["type"] == record:
            lines[i] = json.dumps({**d, field: "a\x00b"}) + "\n"
            break
    with pytest.raises(
        errors.ExportFormatError, match=rf"field '{field}' of a {record} record is not text"
    ):
        dn.Client(store).import_records(io.StringIO("".join(lines)))
    assert store.list_runs() == [] and store.list_signals("exported") == []
    assert store.load_effects("run/exported") == [] and store.load_events("exported") == []


@dn.durable(name="reliability.names", version="1")
async def names(ctx: dn.Context, name: str) -> dict[str, str]:
    refused: dict[str, str] = {}
    for what, call in (
        ("kv key", lambda: ctx.kv.set(name, 1)),
        ("signal", lambda: ctx.wait_signal(name)),
        ("queue", lambda: ctx.dequeue(name)),
        ("stream", lambda: ctx.stream(name)),
    ):
        try:
            got: Any = call()
        except errors.ArgumentError as e:
            refused[what] = str(e)
        else:  # not refused (the test fails): an awaitable not awaited must not warn
            getattr(got, "close", lambda: None)()
    return refused


@pytest.mark.parametrize("name", ["a\x00b", "lone \udc80 surrogate"], ids=["NUL", "surrogate"])
def test_names_postgresql_cannot_keep_are_refused_alike_on_every_store(
    store: Store, name: str
) -> None:
    """A signal or queue name with a NUL character was refused only when sent, by
    PostgreSQL, and a run waiting on it waited for ever; names are now refused alike on
    every store (a lone surrogate already was), before anything is written."""
    job = dn.start(waits, run_id="waits")
    # the store's record, not the job's: a PostgreSQL store writes a status behind the run
    wait_until(
        lambda: (rec := store.get_run("waits")) is not None and rec.status == "waiting",
        "the store says the run waits",
    )
    before = _everything(store, "waits")
    unkeepable = r" \(no NUL character, no lone surrogate\), got "
    for call, pattern in (
        (lambda: job.signal(name, 1), r"^name must be a non-empty str of at most 200 characters"),
        (lambda: job.enqueue(name, 1), r"^queue must be a non-empty str of at most 190 characters"),
    ):
        with pytest.raises(errors.ArgumentError, match=pattern + unkeepable):
            call()
    with pytest.raises(errors.ArgumentError, match=r"^run_id must be 1-200 printable characters"):
        dn.start(names, name, run_id=name)
    assert _everything(store, "waits") == before
    refused = dn.run(names, name, run_id="names")
    assert sorted(refused) == ["kv key", "queue", "signal", "stream"]
    assert re.match(r"^kv key must be text every store can keep \(no NUL", refused["kv key"])
    assert [s.name for s in store.list_signals("names")] == []
    job.signal("go", 2)
    assert job.result(timeout=30) == 2


def _everything(store: Store, run_id: str) -> Any:
    run = store.get_run(run_id)
    return (
        [(r.run_id, r.status, r.updated_at) for r in store.list_runs()],
        store.list_signals(run_id),
        store.load_events(run_id),
        store.load_effects(f"run/{run_id}"),
        run.status_version if run is not None else None,
    )


def test_an_export_of_format_version_1_still_imports(tmp_path: Path) -> None:
    lines = _export(tmp_path)
    header = json.loads(lines[0])
    lines[0] = json.dumps({**header, "version": 1}) + "\n"
    out = dn.Client(MemoryStore(key=b"k" * 32)).import_records(io.StringIO("".join(lines[:-1])))
    assert out["runs"] == 1


@pytest.mark.parametrize("cell", [None, "x = 1\n"])
@pytest.mark.parametrize("magic", ["durable", "effect"])
def test_magic_arguments_with_an_unclosed_quote_are_a_usage_error(
    ip: Any, magic: str, cell: str | None
) -> None:
    if cell is None and magic == "effect":
        return  # %effect is a cell magic only
    with pytest.raises(UsageError, match=r"^cannot read the arguments '\"': No closing quotation"):
        if cell is None:
            ip.run_line_magic(magic, '"')
        else:
            ip.run_cell_magic(magic, '"', cell)
    assert run(ip, "1 + 1") == 2
