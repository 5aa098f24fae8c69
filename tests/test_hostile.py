"""Hostile and malformed input at the public entry points (issue 20, item 6).

Each property feeds an entry point generated input and requires one of two outcomes: the
value is stored and replayed exactly (same type, same value; replay read back through a
second store object on the same DuckDB file, so it comes from the database, not from a
cache of the object that wrote it), or it is refused with one of the project's own errors
(a subclass from ``durable_nb.errors``, never the bare base class) and the store holds what
it held before. Nothing in between.

How many examples: the ``hostile-ci`` Hypothesis profile (the default, a few dozen per
entry point) or the one named by ``DURABLE_NB_HYPOTHESIS_PROFILE``: ``hostile-fuzz``
(10,000 per entry point, run by ``benchmarks/reliability.py``). With
``DURABLE_NB_FUZZ_TALLY=PATH`` the tests write how many inputs each entry point was given
and how many it refused to PATH (JSON), for the benchmark's table.
``DURABLE_NB_HOSTILE_STORE=memory`` runs the properties that start a run per example (and
the import) on the in-memory store: the long fuzz run uses it there, because each run on a
DuckDB file pays a few journal merges (commits); CI runs everything on DuckDB.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
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

#: entry point -> Counter(tried=..., refused=..., stored=..., seconds=...)
TALLY: dict[str, Counter[str]] = {}


def _save_tally() -> None:
    path = os.environ.get("DURABLE_NB_FUZZ_TALLY")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=1))


@pytest.fixture(autouse=True)
def _write_tally() -> Iterator[None]:
    yield
    _save_tally()


def _count(entry: str, outcome: str) -> None:
    c = TALLY.setdefault(entry, Counter())
    c["tried"] += 1
    c[outcome] += 1
    if c["tried"] % 100 == 0:
        _save_tally()  # a run cut short keeps what it counted


def _own_error(e: BaseException) -> bool:
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


# ------------------------------------------------------------------ stores
@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[DuckDBStore, DuckDBStore]]:
    """The engine's DuckDB store, and a second store object on the same file that replays
    read through (a restarted kernel's view)."""
    writer = DuckDBStore(tmp_path / "store.duckdb")
    reader = DuckDBStore(tmp_path / "store.duckdb")
    runtime._store = writer
    yield writer, reader
    reader.close()


MEMORY = os.environ.get("DURABLE_NB_HOSTILE_STORE") == "memory"


@pytest.fixture
def run_stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Like ``stores``, or one in-memory store twice under DURABLE_NB_HOSTILE_STORE=memory."""
    if not MEMORY:
        writer: Store = DuckDBStore(tmp_path / "store.duckdb")
        reader: Store = DuckDBStore(tmp_path / "store.duckdb")
    else:
        from durable_nb.store import MemoryStore

        writer = reader = MemoryStore()
    runtime._store = writer
    yield writer, reader
    if reader is not writer:
        reader.close()


def _engine_on(store: Store) -> Callable[[], None]:
    old = runtime._store
    runtime._store = store

    def back() -> None:
        runtime._store = old

    return back


def _journal_bytes(store: Store) -> int:
    """How much the store has written to its journal: a refused input must not add to it."""
    assert isinstance(store, DuckDBStore)
    return store._journal.size + len(store._merger.pending)


class ReplayLater:
    """Stored inputs to replay through the reader store: its reads go to DuckDB, so the
    writer's journal is merged first, once per batch rather than once per example."""

    def __init__(self, writer: DuckDBStore, reader: DuckDBStore, batch: int = 200) -> None:
        self.writer, self.reader, self.batch = writer, reader, batch
        self.items: list[tuple[str, Callable[[], Any], Any]] = []

    def add(self, entry: str, call: Callable[[], Any], value: Any) -> None:
        self.items.append((entry, call, value))
        if len(self.items) >= self.batch:
            self.check()

    def check(self) -> None:
        self.writer.flush()
        back = _engine_on(self.reader)
        try:
            for entry, call, value in self.items:
                runtime.top.reset()
                again = call()
                assert same(again, value), f"{entry}: {value!r} replayed as {again!r}"
        finally:
            back()
        self.items.clear()


# ------------------------------------------------------------------ effects
EXECUTED = Counter[str]()


@dn.effect(name="hostile.echo", version="1")
def echo(x: Any) -> Any:
    EXECUTED["echo"] += 1
    return x


_RESULTS: dict[int, Any] = {}


@dn.effect(name="hostile.make", version="1")
def make(token: int) -> Any:
    """Returns a value that is not its argument: results are checked apart from hashing."""
    EXECUTED["make"] += 1
    return _RESULTS[token]


def _replays(entry: str, call: Callable[[], Any], value: Any, later: ReplayLater) -> None:
    """Call an effect at top level: it is refused (nothing journaled) or it replays exactly,
    at once from the writing store and later through the reader."""
    journal = _journal_bytes(runtime.store)
    runtime.top.reset()
    executed = sum(EXECUTED.values())
    try:
        first = call()
    except Exception as e:
        assert _own_error(e), f"{entry}: {value!r} raised {e!r}, not one of durable_nb.errors"
        assert _journal_bytes(runtime.store) == journal, f"{entry}: half-written {value!r}"
        _count(entry, "refused")
        return
    assert same(first, value)
    runtime.top.reset()
    again = call()
    assert same(again, value), f"{entry}: {value!r} replayed as {again!r}"
    assert sum(EXECUTED.values()) <= executed + 1, "a replay executed the effect again"
    later.add(entry, call, value)
    _count(entry, "stored")


def test_effect_arguments_and_results_replay_exactly_or_are_refused(
    stores: tuple[DuckDBStore, DuckDBStore],
) -> None:
    later = ReplayLater(*stores)
    t0 = time.perf_counter()

    @PROFILE
    @given(VALUES)
    def check(value: Any) -> None:
        _replays("effect argument", lambda: echo(value), value, later)

    check()
    later.check()
    TALLY["effect argument"]["seconds"] += round(time.perf_counter() - t0)


def test_effect_results_replay_exactly_or_are_refused(
    stores: tuple[DuckDBStore, DuckDBStore],
) -> None:
    later = ReplayLater(*stores)
    t0 = time.perf_counter()
    token = iter(range(10**9))

    @PROFILE
    @given(VALUES | st.builds(lambda: lambda: 1))
    def check(value: Any) -> None:
        n = next(token)
        _RESULTS[n] = value
        _replays("effect result", lambda: make(n), value, later)

    check()
    later.check()
    TALLY["effect result"]["seconds"] += round(time.perf_counter() - t0)


# ------------------------------------------------------------------ run ids, kv, streams,
# queue messages, signals: one run per example exercises them all
class PlannedFailure(Exception):
    pass


_FAIL_FIRST: set[str] = set()
REFUSED = "<refused>"


def _refusal(e: Exception) -> str:
    if not _own_error(e):
        raise e
    return f"{REFUSED} {type(e).__name__}"


@dn.durable(name="hostile.steps", version="1")
async def steps(
    ctx: dn.Context,
    kv_key: Any,
    kv_value: Any,
    stream: Any,
    chunk: Any,
    queue: Any,
    signal: Any,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    try:
        ctx.kv[kv_key] = kv_value
        seen["kv"] = ctx.kv[kv_key]
    except Exception as e:
        seen["kv"] = _refusal(e)
        seen["kv keys after refusal"] = sorted(ctx.kv)
    try:
        w = ctx.stream(stream)
    except Exception as e:
        seen["stream"] = _refusal(e)
    else:
        try:
            seen["stream"] = await w.write(chunk)
        except Exception as e:
            seen["stream"] = _refusal(e)
        seen["next position"] = await w.write("sentinel")
    try:
        seen["queue"] = await ctx.dequeue(queue)
    except Exception as e:
        seen["queue"] = _refusal(e)
    try:
        seen["signal"] = await ctx.wait_signal(signal)
    except Exception as e:
        seen["signal"] = _refusal(e)
    if ctx.run_id in _FAIL_FIRST:
        _FAIL_FIRST.discard(ctx.run_id)
        raise PlannedFailure("the first execution fails after its steps, so they replay")
    return seen


def _sent(send: Callable[[Any], None], value: Any, fallback: Any) -> tuple[str, Any]:
    """Send ``value``; when the value (not the name) is refused, send ``fallback`` so the
    run is not left waiting. Returns ("sent" | "refused name" | "refused value", what went)."""
    try:
        send(value)
        return "sent", value
    except errors.UnstorableValueError:
        send(fallback)
        return "refused value", fallback
    except Exception as e:
        assert _own_error(e), f"sending {value!r} raised {e!r}"
        return "refused name", None


_JSON_TYPES = (type(None), bool, int, float, str, list, dict)


def _json_exact(value: Any) -> bool:
    """Whether JSON text gives ``value`` back as it is (no tuples, only str keys)."""
    if type(value) in (list,):
        return all(_json_exact(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return type(value) in _JSON_TYPES


#: None is not hostile (it asks for a derived run id), so it is left out
RUN_IDS = HOSTILE_NAMES.filter(lambda v: v is not None) | st.text(
    alphabet=st.characters(min_codepoint=33), min_size=1
)


def test_run_ids_kv_streams_queues_and_signals_replay_exactly_or_are_refused(
    run_stores: tuple[Store, Store],
) -> None:
    writer, reader = run_stores
    t0 = time.perf_counter()
    serial = iter(range(10**9))

    @PROFILE
    @given(
        run_id=RUN_IDS,
        kv_key=HOSTILE_NAMES,
        kv_value=JSONISH,
        stream=HOSTILE_NAMES,
        chunk=JSONISH | st.binary(),
        queue=HOSTILE_NAMES,
        message=JSONISH,
        signal=HOSTILE_NAMES,
        payload=JSONISH,
    )
    def check(
        run_id: Any,
        kv_key: Any,
        kv_value: Any,
        stream: Any,
        chunk: Any,
        queue: Any,
        message: Any,
        signal: Any,
        payload: Any,
    ) -> None:
        args = (kv_key, kv_value, stream, chunk, queue, signal)
        if isinstance(run_id, str) and run_id:
            run_id += f"#{next(serial)}"  # a new run each time; "" stays ""
        runs_before = len(writer.list_runs(limit=100_000))
        if isinstance(run_id, str):
            _FAIL_FIRST.add(run_id)  # before it starts: a run with nothing to wait for ends at once
        try:
            job = dn.start(steps, *args, run_id=run_id)
        except Exception as e:
            assert _own_error(e), f"run id {run_id!r} raised {e!r}"
            assert len(writer.list_runs(limit=100_000)) == runs_before
            _count("run id", "refused")
            run_id = f"fallback-{next(serial)}"
            _FAIL_FIRST.add(run_id)
            job = dn.start(steps, *args, run_id=run_id)
        else:
            _count("run id", "stored")
        queued = _sent(lambda m: job.enqueue(queue, m), message, "fallback")
        signalled = _sent(lambda p: job.signal(signal, p), payload, None)
        with pytest.raises(PlannedFailure):
            job.result(timeout=60)
        writer.flush()
        back = _engine_on(reader)
        try:
            seen = dn.run(steps, *args, run_id=run_id)  # replays every step from DuckDB
        finally:
            back()
        assert reader.get_run(run_id) is not None
        first_kv = seen["kv"]
        if isinstance(first_kv, str) and first_kv.startswith(REFUSED):
            assert kv_key not in seen["kv keys after refusal"]
            _count("kv key/value", "refused")
        else:
            assert _json_exact(kv_value) and same(first_kv, kv_value), (kv_value, first_kv)
            _count("kv key/value", "stored")
        if isinstance(seen["stream"], str):
            assert seen["stream"].startswith(REFUSED)
            assert seen.get("next position", 0) == 0  # the refused chunk took no position
            _count("stream chunk", "refused")
        else:
            assert seen["stream"] == 0 and seen["next position"] == 1
            got = list(dn.get_job(run_id).stream(stream))
            expected = bytes(chunk) if isinstance(chunk, bytearray) else chunk
            assert same(got[0], expected), (chunk, got)
            _count("stream chunk", "stored")
        for entry, (outcome, sent), got in (
            ("queue message", queued, seen["queue"]),
            ("signal", signalled, seen["signal"]),
        ):
            if outcome == "refused name":
                assert isinstance(got, str) and got.startswith(REFUSED), (entry, got)
                _count(entry, "refused")
            else:
                assert same(got, sent), f"{entry}: sent {sent!r}, the run got {got!r}"
                _count(entry, "stored" if outcome == "sent" else "refused")

    check()
    TALLY["run id"]["seconds"] += round(time.perf_counter() - t0)


# ------------------------------------------------------------------ import files
def _store_fingerprint(store: Store) -> tuple[Any, ...]:
    """Counts and a hash of every row the store holds (after merging its journal)."""
    if not isinstance(store, DuckDBStore):
        import io

        buf = io.StringIO()
        dn.Client(store).export(buf)
        lines = buf.getvalue().splitlines()[1:]  # the header has the time of the export
        return (len(lines), hash(tuple(sorted(lines))), len(store.list_runs(limit=10**6)))
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


@dn.effect(name="hostile.opaque", version="1")
def opaque(i: int) -> Any:
    return Colour.RED if i % 2 else {1, 2, i}  # pickled (signed)


@dn.durable(name="hostile.exported", version="1")
async def exported(ctx: dn.Context, n: int) -> Any:
    out = [opaque(i) for i in range(n)]
    ctx.kv["n"] = n
    await ctx.stream("s").write({"n": n})
    ctx.set_status({"stage": n})
    await ctx.wait_signal("go")
    return [str(x) for x in out]


def _export_text(key: bytes) -> str:
    from durable_nb.store import MemoryStore

    src = MemoryStore(key=key)
    back = _engine_on(src)
    try:
        for i in range(3):
            job = dn.start(exported, i + 1, run_id=f"exported-{i}")
            job.signal("go", {"i": i})
            job.result(timeout=30)
        dn.set_clock(None)
        shared = dn.effect(name="hostile.shared", version="1", shared=True)(lambda x: [x])
        shared(1)
        import io

        buf = io.StringIO()
        dn.Client(src).export(buf)
        return buf.getvalue()
    finally:
        back()


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


def test_import_of_damaged_or_forged_exports_is_all_or_nothing(tmp_path: Path) -> None:
    import io

    key = b"hostile test key, not a secret..."
    text = _export_text(key)
    from durable_nb.store import MemoryStore

    def new_store(name: str, key: bytes | None) -> Store:
        return MemoryStore(key=key) if MEMORY else DuckDBStore(tmp_path / name, key=key)

    target = new_store("target.duckdb", key)
    other_key = new_store("other-key.duckdb", None)  # pickles signed by key are foreign
    t0 = time.perf_counter()
    try:

        @PROFILE
        @given(MUTATIONS, st.booleans())
        def check(ops: list[tuple[str, int, int, Any]], into_other: bool) -> None:
            store = other_key if into_other else target
            damaged = _mutate(text, ops)
            before = _store_fingerprint(store)
            try:
                dn.Client(store).import_records(io.StringIO(damaged))
            except Exception as e:
                assert _own_error(e), f"{ops!r}: import raised {e!r}"
                assert _store_fingerprint(store) == before, f"{ops!r}: half-imported"
                _count("export file for import", "refused")
                return
            after = _store_fingerprint(store)  # merged without error
            again = io.StringIO()
            dn.Client(store).export(again)  # what it holds reads back and exports
            fresh = new_store(f"fresh-{TALLY['export file for import']['stored']}.duckdb", key)
            try:
                dn.Client(fresh).import_records(io.StringIO(again.getvalue()))
            finally:
                fresh.close()
            assert after[2] >= before[2]
            _count("export file for import", "stored")

        check()
    finally:
        target.close()
        other_key.close()
    TALLY["export file for import"]["seconds"] += round(time.perf_counter() - t0)


# ------------------------------------------------------------------ command line, magics
CLI_COMMANDS = [
    "runs",
    "show",
    "trace",
    "tree",
    "signal",
    "cancel",
    "resume",
    "fork",
    "forget",
    "gc",
    "export",
    "import",
    "metrics",
]
#: never generated: options that import modules (--app), write where they are told (-o,
#: --store with a path of the generator's choosing), or commands that serve forever
#: (worker) or install files outside the test's folder (install-kernel)
_UNSAFE = {"--app", "-o", "--output", "--store", "worker", "install-kernel"}
CLI_TOKENS = st.sampled_from(
    [
        "--json",
        "--status",
        "--limit",
        "--since",
        "--older-than",
        "--dry-run",
        "--reason",
        "--from-step",
        "--run-id",
        "--keep-runs",
        "--replace",
        "--scope",
        "--help",
        "-x",
        "--",
        "0",
        "-1",
        "1e999",
        "nan",
        "7d",
        "cli-run",
        "{}",
        "[1,",
        "\x00",
        "",
    ]
) | st.text(max_size=12)
CLI_ARGV = st.tuples(
    st.sampled_from(CLI_COMMANDS) | st.text(max_size=8), st.lists(CLI_TOKENS, max_size=5)
)


def test_cli_arguments_run_or_are_refused_without_a_traceback(
    stores: tuple[DuckDBStore, DuckDBStore],
) -> None:
    import contextlib
    import io

    from durable_nb.cli import main

    writer, reader = stores
    job = dn.start(exported, 1, run_id="cli-run")
    job.signal("go", 1)
    job.result(timeout=30)
    writer.close()
    runtime._store = None
    path = str(writer.path)
    t0 = time.perf_counter()

    @PROFILE
    @given(CLI_ARGV)
    def check(argv_parts: tuple[str, list[str]]) -> None:
        argv = [argv_parts[0], *argv_parts[1]]
        if any(a in _UNSAFE or a.startswith(("--app", "--store", "--output")) for a in argv):
            return
        before = _store_fingerprint(reader)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--store", path, *argv])
        text = out.getvalue() + err.getvalue()
        assert code in (0, 1, 2), (argv, code, text)
        assert "Traceback" not in text, (argv, text)
        if code != 0:
            assert _store_fingerprint(reader) == before, f"{argv!r} failed but changed the store"
            _count("CLI arguments", "refused")
        else:
            _count("CLI arguments", "stored")

    check()
    TALLY["CLI arguments"]["seconds"] += round(time.perf_counter() - t0)


MAGIC_LINES = st.tuples(
    st.sampled_from(["runs", "show", "signal", "cancel", "forget", "cache", "why", ""])
    | st.text(max_size=8),
    st.lists(CLI_TOKENS | st.sampled_from(["magic-run", "'x y'", '"', "\\", "clear"]), max_size=4),
)


def test_magic_arguments_run_or_are_refused_with_a_usage_error(ip: Any) -> None:
    from IPython.core.error import UsageError

    job = dn.start(exported, 1, run_id="magic-run")
    job.signal("go", 1)
    job.result(timeout=30)
    store = runtime.store
    t0 = time.perf_counter()

    def state() -> Any:
        return [
            (r.run_id, r.status, r.updated_at, len(store.list_signals(r.run_id)))
            for r in store.list_runs()
        ]

    @PROFILE
    @given(MAGIC_LINES, st.sampled_from(["durable", "effect", "durable-cell"]))
    def check(parts: tuple[str, list[str]], magic: str) -> None:
        line = " ".join([parts[0], *parts[1]])
        if line.split()[:1] == ["store"] or (magic != "durable" and line.strip()):
            line = " ".join(parts[1])  # %durable store would change the store under the test
        before = state()
        try:
            if magic == "durable":
                ip.run_line_magic("durable", line)
            else:
                name = "effect" if magic == "effect" else "durable"
                ip.run_cell_magic(name, line, "magic_y = 1\n")
        except UsageError:
            assert state() == before, f"%{magic} {line!r} was refused but changed the store"
            _count("magic arguments", "refused")
        except Exception as e:
            assert _own_error(e), f"%{magic} {line!r} raised {e!r}"
            assert state() == before
            _count("magic arguments", "refused")
        else:
            _count("magic arguments", "stored")

    check()
    TALLY["magic arguments"]["seconds"] += round(time.perf_counter() - t0)
