"""Schema evolution: stores written by an earlier durable_nb open, migrate and replay; a store
written by a newer schema is refused without being touched.

The fixtures in ``tests/fixtures/store_71d904a`` were written by commit 71d904a's code (how:
the docstring of ``build.py`` there, which built them; ``manifest.json`` says with which
Python, DuckDB and pandas). Their effects and workflows are ``flows_v1``, imported here
under the same name, so today's code computes the same keys; ``flows_v1.CALLS`` counts
executions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import gzip
import hashlib
import importlib
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import StoreVersionError
from durable_nb.store import Store

from .conftest import PG_TEST_KEY, PG_URL

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "store_71d904a"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
#: effects keyed by a hash of their source replay only on the Python minor that wrote them
SAME_PYTHON = MANIFEST["python"].rsplit(".", 1)[0] == "{}.{}".format(*sys.version_info[:2])


@pytest.fixture
def flows() -> Iterator[ModuleType]:
    sys.path.insert(0, str(FIXTURES))
    try:
        module = importlib.import_module("flows_v1")
        module.CALLS.clear()
        runtime.set_top_scope(MANIFEST["top_scope"].removeprefix("top/"))
        yield module
    finally:
        sys.path.remove(str(FIXTURES))
        sys.modules.pop("flows_v1", None)


def _duckdb_fixture(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURES / "duckdb_store.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "store.duckdb"


def _postgres_fixture(pg_url: str) -> str:
    """Restore the dump into the (fresh) schema of ``pg_url``; returns that schema."""
    import psycopg

    schema = pg_url.rsplit("schema=", 1)[1]
    script = gzip.decompress((FIXTURES / "postgres.sql.gz").read_bytes()).decode()
    script = script.replace(MANIFEST["pg_schema"], schema)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(script)  # type: ignore[call-overload]  # a script: no parameters
    return schema


def _open(kind: str, tmp_path: Path, pg_url: str | None) -> Store:
    if kind == "duckdb":
        from durable_nb.store._duckdb import DuckDBStore

        return DuckDBStore(_duckdb_fixture(tmp_path))
    from durable_nb.store._postgres import PostgresStore

    assert pg_url is not None
    _postgres_fixture(pg_url)
    return PostgresStore(pg_url, key=PG_TEST_KEY)


@pytest.fixture(params=["duckdb", "postgres"])
def old_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Store]]:
    pg_url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    store = _open(request.param, tmp_path, pg_url)
    runtime._store = store
    yield request.param, store


def _schema_of(kind: str, store: Store) -> tuple[int, list[int]]:
    """The schema version in dn_meta and the versions recorded in dn_migrations."""
    if kind == "duckdb":
        import duckdb

        store.close()
        con = duckdb.connect(str(store.url), read_only=True)
        try:
            meta = con.execute("SELECT value FROM dn_meta WHERE key = 'schema_version'")
            version = int(meta.fetchall()[0][0])
            migrations = con.execute("SELECT version FROM dn_migrations ORDER BY 1")
            applied = [r[0] for r in migrations.fetchall()]
        finally:
            con.close()
        return version, applied
    import psycopg
    from psycopg import sql

    schema = sql.Identifier(store.schema)  # type: ignore[attr-defined]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        version = int(
            conn.execute(
                sql.SQL("SELECT value FROM {}.dn_meta WHERE key = 'schema_version'").format(schema)
            ).fetchall()[0][0]
        )
        applied = [
            r[0]
            for r in conn.execute(
                sql.SQL("SELECT version FROM {}.dn_migrations ORDER BY 1").format(schema)
            )
        ]
    return version, applied


def test_a_store_written_by_71d904a_opens_migrates_and_replays_every_effect(
    old_store: tuple[str, Store], flows: ModuleType
) -> None:
    kind, store = old_store
    f = flows
    # -- runs as the old code left them
    runs = {r["run_id"]: r["status"] for r in dn.Client(store).runs(limit=1000)}
    assert runs == {k: v["status"] for k, v in MANIFEST[f"{kind}_runs"].items()}

    # -- every top-level effect replays: results of every type, an error, the shared scope
    assert (f.square(2), f.square(3), f.square(2)) == (4, 9, 4)
    page = asyncio.run(f.fetch("https://example.invalid/top"))
    assert page == {
        "url": "https://example.invalid/top",
        "size": len("https://example.invalid/top"),
        "tags": ["a", "b"],
        "ok": True,
        "none": None,
    }
    assert f.values(3) == {
        "bytes": b"\x00\x01" * 3,
        "tuple": (1, "two", 3.0),
        "set": {3, 4},
        "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "day": dt.date(2026, 1, 2),
        "money": decimal.Decimal("12.50"),
        "big": 2**80 + 3,
        "float": 0.1 * 3,
    }
    frame = f.frame(5)
    assert frame.to_dict("list") == {"i": [0, 1, 2, 3, 4], "half": [0, 0.5, 1, 1.5, 2]}
    with pytest.raises(ValueError, match="boom 7"):
        f.boom(7)
    assert f.shared_lookup("key") == "KEY"
    if kind == "duckdb":  # recorded by a process killed before its journal was merged
        assert f.square(11) == 121
        assert f.values(4)["big"] == 2**80 + 4
    assert f.hashed(1) == 1001
    if not SAME_PYTHON:
        # keyed by a hash of its source as this Python parses it (an ast dump): another minor
        # version may parse it alike (3.10 and 3.11 do) or not (3.12, 3.13), and execute it
        f.CALLS.pop("hashed", None)
    assert f.CALLS == {}

    # -- finished runs return what they recorded without executing anything
    done = dn.run(f.pipeline, 3, run_id="done")
    assert done["xs"] == [0, 1, 4] and done["doubled"] == 2 * 13 * 13
    assert done["page"]["size"] == len("https://example.invalid/3")
    assert dn.run(f.counter, 1, run_id="counted") == 1 + 4 + 9
    job = dn.get_job("done")
    assert job.kv() == {"seen": 3}
    assert job.custom_status() == {"stage": "steps"}
    assert list(job.stream("log")) == ["first", {"second": 2}]
    trace = dn.Client(store).trace("done")
    assert trace["run"]["status"] == "completed"
    assert f.CALLS == {}

    # -- a run waiting for a signal resumes: finished steps replay, the rest executes once
    waiting = dn.start(f.approval, "widget", run_id="waiting")
    waiting.signal("approve", "yes")
    size = len("https://example.invalid/item/widget")
    assert waiting.result(timeout=30) == f"{size}:yes:36"
    assert dn.get_job("waiting").kv() == {"item": "widget"}
    assert f.CALLS == {"square": 1}
    f.CALLS.clear()

    # -- the queue message the old code sent while no process ran is delivered once
    assert dn.start(f.inbox, 3, run_id="queue").result(timeout=30) == [
        "m1",
        {"m": 2},
        ["m", 3],
    ]
    assert f.CALLS == {"square": 1}
    f.CALLS.clear()

    # -- a failed run resumes by its id: its finished step replays, it fails again
    assert dn.Client(store).run("failed")["status"] == "failed"
    with pytest.raises(RuntimeError, match="failing 5"):
        dn.resume("failed").result(timeout=30)
    assert dn.Client(store).run("cancelled")["status"] == "cancelled"
    assert dn.get_job("cancelled").kv() == {"item": "gadget"}
    assert f.CALLS == {}

    # -- the schema is today's, every migration recorded
    from durable_nb.store import _duckdb, _postgres

    today = _duckdb.SCHEMA_VERSION if kind == "duckdb" else _postgres.SCHEMA_VERSION
    assert _schema_of(kind, store) == (today, list(range(1, today + 1)))


# ---------------------------------------------------------------------- a newer schema


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (names and contents) and every folder."""
    return {
        str(p.relative_to(root)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in sorted(root.rglob("*"))
    }


def test_a_duckdb_store_of_a_newer_schema_is_refused_and_not_touched(tmp_path: Path) -> None:
    import duckdb

    from durable_nb.store._duckdb import SCHEMA_VERSION, DuckDBStore

    path = _duckdb_fixture(tmp_path)
    DuckDBStore(path).close()  # today's schema, the journal merged
    con = duckdb.connect(str(path))
    con.execute(
        "UPDATE dn_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)]
    )
    con.execute("UPDATE dn_meta SET value = '99.0' WHERE key = 'written_by'")
    con.execute("CREATE TABLE dn_from_the_future (x INTEGER)")
    con.close()
    # a journal in a format this version may not know, left by the newer one
    future = path.with_name("store.duckdb.d") / "journal" / "future-1-abcd.wal"
    future.write_bytes(b"\xff" * 64)
    before = _tree_digest(tmp_path)
    assert any(name.endswith("future-1-abcd.wal") for name in before)

    with pytest.raises(StoreVersionError) as err:
        DuckDBStore(path)
    message = str(err.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "durable_nb 99.0" in message and str(path) in message
    assert "upgrade durable_nb" in message
    assert _tree_digest(tmp_path) == before


def _schema_digest(pg_url: str, schema: str) -> dict[str, str]:
    """Every table of ``schema`` (its columns and rows) and every index, as text digests."""
    import psycopg
    from psycopg import sql

    out: dict[str, str] = {}
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", [schema]
            )
        ]
        for table in tables:
            ident = sql.Identifier(schema, table)
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(ident)
            ).fetchall()
            cols = conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                [schema, table],
            ).fetchall()
            out[table] = hashlib.sha256(repr((cols, rows)).encode()).hexdigest()
        out["indexes"] = repr(
            conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s ORDER BY 1",
                [schema],
            ).fetchall()
        )
    return out


def test_a_postgres_store_of_a_newer_schema_is_refused_and_not_touched(pg_url: str) -> None:
    import psycopg
    from psycopg import sql

    from durable_nb.store._postgres import SCHEMA_VERSION, PostgresStore

    schema = _postgres_fixture(pg_url)
    PostgresStore(pg_url, key=PG_TEST_KEY).close()  # today's schema
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET value = %s WHERE key = 'schema_version'").format(
                sql.Identifier(schema, "dn_meta")
            ),
            [str(SCHEMA_VERSION + 1)],
        )
        conn.execute(
            sql.SQL("UPDATE {} SET value = '99.0' WHERE key = 'written_by'").format(
                sql.Identifier(schema, "dn_meta")
            )
        )
        conn.execute(
            sql.SQL("CREATE TABLE {} (x integer)").format(
                sql.Identifier(schema, "dn_from_the_future")
            )
        )
    before = _schema_digest(pg_url, schema)
    assert "dn_from_the_future" in before

    with pytest.raises(StoreVersionError) as err:
        PostgresStore(pg_url, key=PG_TEST_KEY)
    message = str(err.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "durable_nb 99.0" in message and schema in message
    assert "upgrade durable_nb" in message
    assert _schema_digest(pg_url, schema) == before


def test_a_store_file_of_a_newer_duckdb_is_refused_and_not_touched(tmp_path: Path) -> None:
    import duckdb

    from durable_nb.store._duckdb import DuckDBStore

    if int(duckdb.__version__.split(".")[0]) >= 2:
        pytest.skip(f"duckdb {duckdb.__version__} reads the files DuckDB 2 writes")
    path = tmp_path / "store.duckdb"
    path.write_bytes(gzip.decompress((FIXTURES / "duckdb2_store.duckdb.gz").read_bytes()))
    before = _tree_digest(tmp_path)
    with pytest.raises(StoreVersionError) as err:
        DuckDBStore(path)
    message = str(err.value)
    assert str(path) in message and "newer DuckDB" in message
    assert f"duckdb {duckdb.__version__}" in message and "pip install -U duckdb" in message
    after = _tree_digest(tmp_path)  # the store's own folder is made before the file is read
    assert after["store.duckdb"] == before["store.duckdb"]
    assert "store.duckdb.wal" not in after
