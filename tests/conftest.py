from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.store import MemoryStore, Store

if TYPE_CHECKING:
    import psycopg
    from IPython.core.interactiveshell import InteractiveShell

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets a fresh in-memory store, a fake clock, its own working directory, the
    workflow versions defined before it (each test defines its own versions), and forgets the
    workflows it defines (what dn.resume and dn.fork find by name)."""
    from durable_nb.engine import _workflow

    monkeypatch.chdir(tmp_path)
    old_store, old_clock, old_top = runtime._store, runtime.clock, runtime.top
    versions = {k: dict(v) for k, v in _workflow._versions.items()}
    defined = dict(_workflow._defined)
    runtime._store = MemoryStore()
    runtime.clock = dn.FakeClock()
    runtime.set_top_scope("test")
    yield
    _workflow._versions.clear()
    _workflow._versions.update(versions)
    _workflow._defined.clear()
    _workflow._defined.update(defined)
    store = runtime._store
    runtime._store, runtime.clock, runtime.top = old_store, old_clock, old_top
    if store is not None:
        store.close()


@pytest.fixture
def clock() -> dn.FakeClock:
    assert isinstance(runtime.clock, dn.FakeClock)
    return runtime.clock


#: the database the PostgreSQL tests use; each test works in a fresh schema of its own
PG_URL = os.environ.get("DURABLE_NB_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"
#: the signing key of test stores (a team would set DURABLE_NB_KEY)
PG_TEST_KEY = b"durable_nb test key, not a secret"
_pg_problem: list[str | None] = []  # checked once per session


def _shown(url: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    netloc = (user.partition(":")[0] + "@" if user else "") + host
    return urlunsplit(parts._replace(netloc=netloc))


def _pg_connect() -> psycopg.Connection[Any]:
    import psycopg

    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)


def require_postgres() -> None:
    """Skip the test when no PostgreSQL server answers, except under CI=true: there the
    PostgreSQL store must be tested, so a missing server fails."""
    if not _pg_problem:
        try:
            _pg_connect().close()
            _pg_problem.append(None)
        except Exception as e:  # ImportError (no psycopg) or any connection failure
            _pg_problem.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
    problem = _pg_problem[0]
    if problem is None:
        return
    message = (
        f"PostgreSQL is not reachable at {_shown(PG_URL)} ({problem}); start it "
        "(pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start), "
        "install the postgres extra, or point DURABLE_NB_TEST_PG at a test database"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def drop_schema(schema: str) -> None:
    from psycopg import sql

    with _pg_connect() as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A postgresql:// URL naming a fresh schema, dropped after the test."""
    require_postgres()
    schema = "dn_test_" + secrets.token_hex(6)
    yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    drop_schema(schema)


@pytest.fixture(scope="module")
def module_pg_url() -> Iterator[Callable[[str], str]]:
    """``url(name)``: a postgresql:// URL naming a fresh schema of this test module (one per
    ``name``, the same for each test), dropped after the module's last test. For tests that
    open many stores, where a schema per test would cost more than the test."""
    require_postgres()
    schemas: dict[str, str] = {}

    def url(name: str = "") -> str:
        schema = schemas.setdefault(name, "dn_test_" + secrets.token_hex(6))
        return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"

    yield url
    for schema in schemas.values():
        drop_schema(schema)


@pytest.fixture
def store_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two store objects on the same data, of the kind given as the parameter (``memory``:
    one object twice; ``duckdb``: one file; ``postgres``: the test module's schema, signed
    with the test key). The engine writes through the first; the second reads what it
    wrote back from the database, as a restarted kernel would."""
    kind = request.param
    if kind == "memory":
        writer: Store = MemoryStore()
        reader = writer
    elif kind == "duckdb":
        from durable_nb.store._duckdb import DuckDBStore

        writer = DuckDBStore(tmp_path / "store.duckdb")
        reader = DuckDBStore(tmp_path / "store.duckdb")
    else:
        from durable_nb.store._postgres import PostgresStore

        url = request.getfixturevalue("module_pg_url")()
        writer = PostgresStore(url, key=PG_TEST_KEY)
        reader = PostgresStore(url, key=PG_TEST_KEY)
    runtime._store = writer  # closed by _isolated_runtime
    yield writer, reader
    if reader is not writer:
        reader.close()


@pytest.fixture(params=["memory", "duckdb", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The store in use by the engine, once per implementation."""
    schema = None
    if request.param == "memory":
        s: Store = MemoryStore()
    elif request.param == "duckdb":
        from durable_nb.store._duckdb import DuckDBStore

        s = DuckDBStore(tmp_path / "store.duckdb")
    else:
        from durable_nb.store._postgres import PostgresStore

        require_postgres()
        schema = "dn_test_" + secrets.token_hex(6)
        s = PostgresStore(PG_URL, schema=schema, key=PG_TEST_KEY)
    runtime._store = s
    yield s
    if schema is not None:
        s.close()
        drop_schema(schema)


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    """An IPython shell with durable_nb loaded (magics are tested through run_cell)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext durable_nb", store_history=False)
    shell.user_ns["calls"] = []
    # counts executions without being an input whose content changes (a function hashes by code)
    shell.run_cell("def tick(v):\n    calls.append(v)\n", store_history=False)
    yield shell
    shell.run_cell("%unload_ext durable_nb", store_history=False)
    for name in [n for n in shell.user_ns if not n.startswith("_")]:
        if name not in ("In", "Out", "exit", "quit", "get_ipython"):
            del shell.user_ns[name]
