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


@pytest.fixture(scope="module", autouse=True)
def _write_tally() -> Iterator[None]:
    yield
    path = os.environ.get("DURABLE_NB_FUZZ_TALLY")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in TALLY.items()}, indent=1))


def _count(entry: str, outcome: str) -> None:
    c = TALLY.setdefault(entry, Counter())
    c["tried"] += 1
    c[outcome] += 1


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


def _engine_on(store: Store) -> Callable[[], None]:
    old = runtime._store
    runtime._store = store

    def back() -> None:
        runtime._store = old

    return back


def _journal_bytes(store: Store) -> int:
    """How much the store has written to its journal: a refused input must not add to it."""
    assert isinstance(store, DuckDBStore)
    return store._wal_size


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
    stores: tuple[DuckDBStore, DuckDBStore],
) -> None:
    writer, reader = stores
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
            _FAIL_FIRST.add(run_id)  # before the run reaches its end (it waits below)
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
