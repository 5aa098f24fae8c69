"""What the hostile-input properties (``tests/test_hostile_*.py``, issue 20 item 6) share:
the Hypothesis profiles, the generated inputs, the exact comparison, the tally the fuzz
benchmark reads, and how to tell that a store did not change.

Each property feeds an entry point generated input and requires one of two outcomes: the
value is stored and replayed exactly (same type, same value; replay read back through a
second store object on the same data, so it comes from the database, not from a cache of
the object that wrote it), or it is refused with one of the project's own errors (a
subclass from ``durable_nb.errors``, never the bare base class) and the store holds what
it held before. Nothing in between.

Stores: every property that writes runs on DuckDB and on PostgreSQL (one schema per test
module, ``module_pg_url``), through the ``store_pair`` fixture of ``conftest.py``.
PostgreSQL text cannot hold a NUL character, and no store a lone surrogate: a name carrying
one is refused with the project's error on every store, and changes nothing
(:func:`unkeepable`); values (arguments, results, payloads) carry them like any text.

How many examples: the ``hostile-ci`` Hypothesis profile (the default, a few dozen per
entry point) or the one named by ``DURABLE_NB_HYPOTHESIS_PROFILE``: ``hostile-fuzz``
(10,000 per entry point, run by ``benchmarks/reliability.py``). With
``DURABLE_NB_FUZZ_TALLY=PATH`` the tests write how many inputs each entry point was given
and how many it refused to PATH (JSON), for the benchmark's table.
``DURABLE_NB_HOSTILE_STORE=memory`` runs the properties that start a run per example (and
the import) on the in-memory store instead of DuckDB: the long fuzz run uses it there,
because each run on a DuckDB file pays a few journal merges (commits); CI runs them on
DuckDB.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import enum
import io
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

import durable_nb as dn
from durable_nb import errors
from durable_nb.engine import runtime
from durable_nb.store import Store
from durable_nb.store._duckdb import DuckDBStore

settings.register_profile(
    "hostile-ci",
    max_examples=int(os.environ.get("DURABLE_NB_HOSTILE_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "hostile-fuzz",
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "hostile-debug",
    max_examples=int(os.environ.get("DURABLE_NB_HOSTILE_EXAMPLES", "40")),
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("DURABLE_NB_HYPOTHESIS_PROFILE", "hostile-ci"))

MEMORY = os.environ.get("DURABLE_NB_HOSTILE_STORE") == "memory"
_POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)
#: the stores a property that writes through a store runs on (``store_pair``'s parameter)
STORE_KINDS = ["duckdb", _POSTGRES]
#: the same for the property that starts a run per example, and the import (see above)
RUN_STORE_KINDS = ["memory" if MEMORY else "duckdb", _POSTGRES]


# ------------------------------------------------------------------ the benchmark's tally
#: "entry point (store kind)" -> Counter(tried=..., refused=..., stored=..., seconds=...)
TALLY: dict[str, Counter[str]] = {}


def save_tally() -> None:
    path = os.environ.get("DURABLE_NB_FUZZ_TALLY")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=1))


def entry(what: str, store: Store) -> str:
    """The tally's name of an entry point on one kind of store."""
    kind = {"DuckDBStore": "DuckDB", "PostgresStore": "PostgreSQL", "MemoryStore": "memory"}
    return f"{what} ({kind[type(store).__name__]})"


def count(name: str, outcome: str) -> None:
    c = TALLY.setdefault(name, Counter())
    c["tried"] += 1
    c[outcome] += 1
    if c["tried"] % 100 == 0:
        save_tally()  # a run cut short keeps what it counted


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Adds the seconds the block took to ``name``'s tally, and saves the tally (also when
    the property failed)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        TALLY.setdefault(name, Counter())["seconds"] += round(time.perf_counter() - t0)
        save_tally()


def own_error(e: BaseException) -> bool:
    """One of the project's errors, and a specific one (never the bare base class)."""
    return isinstance(e, errors.DurableError) and type(e) is not errors.DurableError


# ------------------------------------------------------------------ exact comparison
def same(a: Any, b: Any) -> bool:
    """Equal value and equal type, recursively; NaN equals NaN, -0.0 is not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, decimal.Decimal):
        return a.is_nan() and b.is_nan() if a.is_nan() else a == b and str(a) == str(b)
    if type(a).__module__ == "numpy" and hasattr(a, "dtype"):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    return bool(a == b)


def unkeepable(value: Any) -> bool:
    """Whether ``value`` is text some store cannot keep as a name: it has a NUL character
    (PostgreSQL's text cannot hold one) or a lone surrogate (not UTF-8)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return "\x00" in value


# ------------------------------------------------------------------ generated inputs
class Colour(enum.Enum):
    RED = 1
    GREEN = "g"


_text = st.text() | st.text(alphabet=st.characters(codec="utf-8"), max_size=5)
_floats = st.floats(allow_nan=True, allow_infinity=True)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | _floats
    | _text
    | st.binary()
    | st.builds(bytearray, st.binary(max_size=20))
    | st.complex_numbers(allow_nan=False)
    | st.decimals(allow_nan=False)
    | st.datetimes()
    | st.datetimes(timezones=st.just(_dt.timezone.utc))
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.uuids()
    | st.sampled_from(list(Colour))
    | st.builds(PurePosixPath, st.text(alphabet="abc/._ ", max_size=12))
)
_hashable = st.none() | st.booleans() | st.integers() | _text | st.binary(max_size=8)
#: effect arguments and results: every supported type, nested
VALUES = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_text, inner, max_size=4)
        | st.dictionaries(_hashable, inner, max_size=3)
        | st.frozensets(_hashable, max_size=4)
        | st.sets(_hashable, max_size=4)
    ),
    max_leaves=12,
)
#: what JSON payloads (signals, queue messages, custom statuses) may be
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | _floats | _text,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner)
        | st.dictionaries(_text, inner, max_size=4)
        | st.dictionaries(st.integers(), inner, max_size=2)
    ),
    max_leaves=10,
)
HOSTILE_NAMES = (
    _text
    | st.text(min_size=190, max_size=260)
    | st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "x" * 201, "queue:q", "__cancel__"])
    | st.integers()
    | st.none()
    | st.binary(max_size=8)
)
#: None is not hostile (it asks for a derived run id), so it is left out
RUN_IDS = HOSTILE_NAMES.filter(lambda v: v is not None) | st.text(
    alphabet=st.characters(min_codepoint=33), min_size=1
)


# ------------------------------------------------------------------ a run to work on
@dn.effect(name="hostile.opaque", version="1")
def opaque(i: int) -> Any:
    return Colour.RED if i % 2 else {1, 2, i}  # pickled (signed)


@dn.durable(name="hostile.exported", version="1")
async def exported(ctx: dn.Context, n: int) -> Any:
    """A run with a bit of everything: pickled effects, kv, a stream, a status, a signal."""
    out = [opaque(i) for i in range(n)]
    ctx.kv["n"] = n
    await ctx.stream("s").write({"n": n})
    ctx.set_status({"stage": n})
    await ctx.wait_signal("go")
    return [str(x) for x in out]


# ------------------------------------------------------------------ stores
@contextlib.contextmanager
def engine_on(store: Store) -> Iterator[None]:
    """The engine works on ``store`` inside the block."""
    old = runtime._store
    runtime._store = store
    try:
        yield
    finally:
        runtime._store = old


#: the PostgreSQL tables that hold what a user stored (not the leases, sessions, workers)
_PG_TABLES = ("dn_effects", "dn_runs", "dn_signals", "dn_inbox", "dn_events", "dn_queues")


def _pg_rows(store: Any, select: str) -> tuple[Any, ...]:
    """``select`` (with ``{t}`` for the table) over each table of ``_PG_TABLES``, in one
    query on the store's own connections."""
    from psycopg import sql

    parts = [
        sql.SQL("(" + select + ")").format(t=sql.Identifier(store.schema, t)) for t in _PG_TABLES
    ]
    query = sql.SQL("SELECT ") + sql.SQL(", ").join(parts)
    row = store._call(lambda conn: conn.execute(query).fetchone())
    return tuple(row)


def write_mark(store: Store) -> Any:
    """What changes whenever the store writes anything (cheap enough for every example): a
    refused input must leave it as it was. DuckDB: the size of its journal; PostgreSQL: the
    rows of each table and the newest transaction that wrote one."""
    if isinstance(store, DuckDBStore):
        return store._journal.size + len(store._merger.pending)
    if type(store).__name__ == "PostgresStore":
        return _pg_rows(
            store,
            "SELECT count(*)::text || '/' || coalesce(max(xmin::text::bigint), 0)::text FROM {t}",
        )
    return fingerprint(store)


def fingerprint(store: Store) -> tuple[Any, ...]:
    """Counts and a hash of every row the store holds (after merging its journal)."""
    if isinstance(store, DuckDBStore):
        store.flush()
        with store._db() as con:
            row = con.execute(
                "SELECT (SELECT count(*) FROM dn_effects), "
                "(SELECT bit_xor(hash(scope, identity, version, input_hash, occurrence, data, "
                "kind, seq)) FROM dn_effects), "
                "(SELECT count(*) FROM dn_runs), "
                "(SELECT bit_xor(hash(run_id, status, updated_at, result_data)) FROM dn_runs), "
                "(SELECT count(*) FROM dn_signals), (SELECT count(*) FROM dn_events)"
            ).fetchall()
        return tuple(row[0])
    if type(store).__name__ == "PostgresStore":
        return _pg_rows(
            store,
            "SELECT count(*)::text || '/' || coalesce(md5(string_agg(r::text, '|' "
            "ORDER BY r::text)), '') FROM {t} AS r",
        )
    buf = io.StringIO()
    dn.Client(store).export(buf)
    lines = buf.getvalue().splitlines()[1:]  # the header has the time of the export
    return (len(lines), hash(tuple(sorted(lines))), len(store.list_runs(limit=10**6)))
