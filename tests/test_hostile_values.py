"""Effect arguments and results of every supported type, hostile ones included, are stored
and replayed exactly, or refused with one of durable_nb's errors with nothing written; on
DuckDB and on PostgreSQL (issue 20, item 6; what the properties share: ``hostile.py``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import durable_nb as dn
from durable_nb._hashing import hash_value
from durable_nb.engine import runtime
from durable_nb.store import Store

from .hostile import (
    PROFILE,
    STORE_KINDS,
    VALUES,
    count,
    engine_on,
    entry,
    own_error,
    same,
    timed,
    write_mark,
)

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


class ReplayLater:
    """Stored inputs to replay through the reader store, whose reads go to the database:
    the writer is flushed first (DuckDB merges its journal), once per batch rather than
    once per example."""

    def __init__(self, writer: Store, reader: Store, batch: int = 200) -> None:
        self.writer, self.reader, self.batch = writer, reader, batch
        self.items: list[tuple[str, Callable[[], Any], Any]] = []

    def add(self, name: str, call: Callable[[], Any], value: Any) -> None:
        self.items.append((name, call, value))
        if len(self.items) >= self.batch:
            self.check()

    def check(self) -> None:
        self.writer.flush()
        executed = sum(EXECUTED.values())
        with engine_on(self.reader):
            for name, call, value in self.items:
                runtime.top.reset()
                again = call()
                assert same(again, value), f"{name}: {value!r} replayed as {again!r}"
        assert sum(EXECUTED.values()) == executed, "a replay from the database executed again"
        self.items.clear()


#: the first argument seen of each input hash: an equal argument (``0.0`` after ``-0.0``, a
#: set in another order, one instant in another time zone) is the same input, so its call
#: replays the first one's result (``durable_nb/_hashing.py``, "Equal values of one type")
_FIRST: dict[tuple[str, bytes], Any] = {}


def _replays(
    name: str, call: Callable[[], Any], value: Any, later: ReplayLater, argument: Any
) -> None:
    """Call an effect at top level: it is refused (nothing written) or it replays exactly,
    at once from the writing store and later through the reader. ``value`` is what it
    returns, unless an equal ``argument`` was given before: then what that call returned."""
    mark = write_mark(runtime.store)
    runtime.top.reset()
    executed = sum(EXECUTED.values())
    try:
        first = call()
    except Exception as e:
        assert own_error(e), f"{name}: {value!r} raised {e!r}, not one of durable_nb.errors"
        assert write_mark(runtime.store) == mark, f"{name}: half-written {value!r}"
        count(name, "refused")
        return
    value = _FIRST.setdefault((name, hash_value(argument)), value)
    assert same(first, value), f"{name}: {value!r} came back as {first!r}"
    runtime.top.reset()
    again = call()
    assert same(again, value), f"{name}: {value!r} replayed as {again!r}"
    assert sum(EXECUTED.values()) <= executed + 1, "a replay executed the effect again"
    later.add(name, call, value)
    count(name, "stored")


@pytest.mark.parametrize("store_pair", STORE_KINDS, indirect=True)
def test_effect_arguments_replay_exactly_or_are_refused(
    store_pair: tuple[Store, Store],
) -> None:
    later = ReplayLater(*store_pair)
    name = entry("effect argument", store_pair[0])

    @PROFILE
    @given(VALUES)
    @example([-0.0])  # then [0.0], the same input: it replays [-0.0] (the 10,000 found it)
    @example([0.0])
    def check(value: Any) -> None:
        _replays(name, lambda: echo(value), value, later, value)

    with timed(name):
        check()
        later.check()


@pytest.mark.parametrize("store_pair", STORE_KINDS, indirect=True)
def test_effect_results_replay_exactly_or_are_refused(
    store_pair: tuple[Store, Store],
) -> None:
    later = ReplayLater(*store_pair)
    name = entry("effect result", store_pair[0])
    token = iter(range(10**9))

    @PROFILE
    @given(VALUES | st.builds(lambda: lambda: 1))
    def check(value: Any) -> None:
        n = next(token)
        _RESULTS[n] = value
        _replays(name, lambda: make(n), value, later, n)

    with timed(name):
        check()
        later.check()
