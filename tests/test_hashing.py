"""Input hashing: what identifies an effect call (README, "How it works": effect keys)."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import decimal
import enum
import fractions
import functools
import itertools
import json
import linecache
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap
import threading
import typing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pydantic
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from durable_nb._hashing import (
    ArgBinder,
    code_version,
    effect_identity,
    hash_value,
)
from durable_nb.errors import ArgumentTypeError, UnhashableInputError

ROOT = Path(__file__).resolve().parent.parent
H = hash_value

# Timing is the benchmarks' business; on a shared, noisy machine a deadline only flakes.
hypothesis_settings = settings(deadline=None)


# --- strategies and a type-strict equality --------------------------------------------

_text = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates included
_hashable_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.complex_numbers(allow_nan=False)
    | _text
    | st.binary(max_size=8)
)
_scalars = _hashable_scalars | st.floats() | st.complex_numbers()
_hashables = st.recursive(
    _hashable_scalars,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(_hashables, inner, max_size=4)
        | st.sets(_hashables, max_size=4)
        | st.frozensets(_hashables, max_size=4)
    ),
    max_leaves=16,
)


def same(a: Any, b: Any) -> bool:
    """Equal as the hash sees it: == with the types taken into account all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same(k, k2) and same(v, v2) for k2, v2 in b.items()) for k, v in a.items()
        )
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    return bool(a == b)


def rebuilt(v: Any) -> Any:
    """An equal value built afresh: containers filled in reverse order, floats recomputed."""
    if isinstance(v, float):
        return float("nan") if math.isnan(v) else v + 0.0
    if isinstance(v, list):
        return [rebuilt(x) for x in v]
    if isinstance(v, tuple):
        return tuple(rebuilt(x) for x in v)
    if isinstance(v, dict):
        return {rebuilt(k): rebuilt(x) for k, x in reversed(list(v.items()))}
    if isinstance(v, (set, frozenset)):
        return type(v)(rebuilt(x) for x in reversed(list(v)))
    return v


# --- scalars and containers --------------------------------------------------------------


@hypothesis_settings
@given(_values)
def test_equal_values_hash_equal(value: Any) -> None:
    digest = H(value)
    assert isinstance(digest, bytes) and len(digest) == 16
    assert H(copy.deepcopy(value)) == digest
    assert H(rebuilt(value)) == digest


@hypothesis_settings
@given(_values, _values)
def test_hashes_differ_exactly_when_values_differ(a: Any, b: Any) -> None:
    assert (H(a) == H(b)) == same(a, b)


@hypothesis_settings
# unique by hash and by Python equality: equal keys (False and 0) collapse into one dict key
# or set element, the first one kept, so a shuffle would make a different dict or set
@given(st.lists(_hashables, max_size=6, unique_by=(lambda x: H(x), lambda x: x)), st.randoms())
def test_dict_and_set_order_does_not_count(items: list[Any], rnd: Any) -> None:
    shuffled = items[:]
    rnd.shuffle(shuffled)
    assert H(dict.fromkeys(items, 1)) == H(dict.fromkeys(shuffled, 1))
    assert H(set(items)) == H(set(shuffled))
    assert H(frozenset(items)) == H(frozenset(shuffled))


def test_type_is_part_of_identity() -> None:
    values: list[object] = [
        1,
        1.0,
        True,
        1 + 0j,
        "1",
        b"1",
        bytearray(b"1"),
        memoryview(b"1"),
        [1],
        (1,),
        {1},
        frozenset({1}),
        {1: None},
        decimal.Decimal(1),
        fractions.Fraction(1),
        np.int64(1),
        np.array(1),
        np.array([1]),
        dt.timedelta(microseconds=1),
        None,
        0,
        False,
        "",
        b"",
        [],
        (),
        {},
        set(),
        frozenset(),
    ]
    digests = {H(v) for v in values}
    assert len(digests) == len(values)


def test_numbers_equal_by_value_hash_equal() -> None:
    assert H(0.0) == H(-0.0)
    assert H(float("nan")) == H(-float("nan")) == H(float("inf") - float("inf"))
    assert H(complex(-0.0, float("nan"))) == H(complex(0.0, -float("nan")))
    assert H(float("inf")) != H(float("-inf"))
    limits = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -(2**64), 10**40, -(10**40)]
    assert len({H(n) for n in limits}) == len(limits)
    assert H(2**200) == H(1 << 200) != H((1 << 200) + 1)


def test_strings_with_surrogates_and_unicode() -> None:
    assert H("\ud800") != H("\udc00")
    assert H("\ud83d\ude00") != H("\U0001f600")  # a surrogate pair is not the code point
    assert H("é") != H("e\u0301")  # no normalization: they are different strings


def test_nested_containers_are_unambiguous() -> None:
    assert H(["ab", "c"]) != H(["a", "bc"])
    assert H([[1], [2, 3]]) != H([[1, 2], [3]])
    assert H({"a": "bc"}) != H({"ab": "c"})
    assert H(((), ())) != H(((),))


def test_ranges_and_slices() -> None:
    assert H(range(0)) == H(range(5, 5))
    assert H(range(0, 3, 2)) == H(range(0, 4, 2))
    assert H(range(3)) != H(range(4))
    assert H(range(0, 2**100)) != H(range(0, 2**100 + 1))
    assert H(slice(1, 2)) != H(slice(1, 3))
    assert H(...) == H(Ellipsis)


def test_large_buffers_stream_to_the_same_digest_as_one_shot() -> None:
    big = bytes(range(256)) * 1000  # above the streaming threshold
    expected = xxhash.xxh3_128_digest(
        b"l" + struct.pack("<Q", 2) + b"b" + struct.pack("<Q", len(big)) + big + b"N"
    )
    assert H([big, None]) == expected
    assert H([bytearray(big), None]) != expected


# The format is part of the store's contract: a digest that changes breaks every cache.
# If one of these changes on purpose, bump HASH_FORMAT and say so in the changelog.
GOLDEN: dict[str, tuple[object, str]] = {
    "none": (None, "626d368fe0e74b4f1a038927df1311d6"),
    "true": (True, "1d33c0bd3511c80d20948828081ddcb4"),
    "zero": (0, "1c7a1d5059bc77218ad2c0e635141f8a"),
    "minus_one": (-1, "1e0fa58c1f9e577b92f9fc5d04ac20b3"),
    "big_int": (2**64, "e74e98283caed58dd5d103738c7d6c18"),
    "float": (1.5, "770487274eba5d21f254a1028442cd27"),
    "nan": (float("nan"), "1420def684ff33195e46be79eb2f1aac"),
    "str": ("héllo", "471d2b85742b9643143cd27e33b1eefd"),
    "bytes": (b"\x00\xff", "24251eb20df7680b752b6c4fb861d3de"),
    "list": ([1, "a", None], "f6e6b68f9f2bff9752dc97599ea24cc2"),
    "tuple": ((1.0,), "62c2110859dbae28973ece8d0a98f078"),
    "dict": ({"b": 2, "a": [1]}, "9ed01b346a7e02255a21747dd757de07"),
    "set": ({3, 1, 2}, "3203aff5e12dc0cfc34a04fb68f79a66"),
    "datetime": (
        dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc),
        "c1a70f79bf8f83864bb3b3aa9b9b0cbb",
    ),
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_digest_format_is_pinned(name: str) -> None:
    value, expected = GOLDEN[name]
    assert H(value).hex() == expected


def test_argument_digest_format_is_pinned() -> None:
    assert ArgBinder(plain).input_hash((1,), {}) == "8f5c8628471278678263f3998fd618bb"


# --- dates, times and other standard value types ------------------------------------------


def test_aware_datetimes_at_one_instant_hash_equal() -> None:
    utc = dt.datetime(2024, 3, 1, 12, 30, tzinfo=dt.timezone.utc)
    plus2 = utc.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert utc == plus2
    assert H(utc) == H(plus2)
    assert H(utc) != H(utc.replace(tzinfo=None))  # naive and aware are never equal
    assert H(utc) != H(utc + dt.timedelta(microseconds=1))
    assert H(dt.datetime.min) != H(dt.datetime.max)
    extreme = dt.datetime.max.replace(tzinfo=dt.timezone(-dt.timedelta(hours=23)))
    assert len(H(extreme)) == 16  # past datetime.max in UTC: no overflow
    assert H(dt.date(2024, 3, 1)) != H(dt.datetime(2024, 3, 1))
    t = dt.time(12, 0, tzinfo=dt.timezone.utc)
    assert H(t) == H(dt.time(13, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))))
    assert H(t) != H(t.replace(tzinfo=None))
    assert H(dt.timedelta(days=1)) == H(dt.timedelta(hours=24))


def test_decimal_fraction_uuid_path() -> None:
    D = decimal.Decimal
    assert H(D("1.0")) == H(D("1")) == H(D("1.000")) == H(D("0.1E1"))
    assert H(D("100")) == H(D("1E2"))
    assert H(D("0")) == H(D("-0.00"))
    assert H(D("1.01")) != H(D("1.1"))
    assert H(D("-1")) != H(D("1"))
    assert H(D("NaN")) == H(D("NaN"))
    assert len({H(D("NaN")), H(D("sNaN")), H(D("Infinity")), H(D("-Infinity"))}) == 4
    assert H(fractions.Fraction(2, 4)) == H(fractions.Fraction(1, 2))
    assert H(uuid.UUID(int=7)) == H(uuid.UUID(int=7)) != H(uuid.UUID(int=8))
    assert H(pathlib.PurePosixPath("a/b")) == H(pathlib.PosixPath("a/b"))
    assert H(pathlib.PurePosixPath("a/b")) != H(pathlib.PurePosixPath("a/c"))
    assert H(pathlib.PureWindowsPath("C:/Data")) == H(pathlib.PureWindowsPath("c:\\data"))
    assert H(pathlib.PureWindowsPath("a")) != H(pathlib.PurePosixPath("a"))
    assert H(pathlib.Path("a")) != H("a")


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Level(enum.IntEnum):
    LOW = 1


class Pair(typing.NamedTuple):
    a: int
    b: str


@dataclasses.dataclass
class Point:
    x: float
    y: float
    label: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class OtherPoint:
    x: float
    y: float
    label: str = ""


class Model(pydantic.BaseModel):
    name: str
    tags: set[str]
    inner: Point | None = None


class OtherModel(pydantic.BaseModel):
    name: str
    tags: set[str]
    inner: Point | None = None


def test_enums_namedtuples_dataclasses_models() -> None:
    assert H(Color.RED) == H(Color(1)) != H(Color.GREEN)
    assert H(Level.LOW) != H(1)
    assert H(Pair(1, "x")) == H(Pair(1, "x")) != H((1, "x"))
    assert H(Point(1.0, 2.0)) == H(Point(1.0, 2.0, label="ignored: compare=False"))
    assert H(Point(1.0, 2.0)) != H(Point(1.0, 3.0))
    assert H(Point(1.0, 2.0)) != H(OtherPoint(1.0, 2.0))
    m = Model(name="a", tags={"x", "y", "z"}, inner=Point(0.0, 1.0))
    assert H(m) == H(Model(name="a", tags={"z", "y", "x"}, inner=Point(0.0, 1.0)))
    assert H(m) != H(Model(name="a", tags={"x"}, inner=Point(0.0, 1.0)))
    assert H(m) != H(OtherModel(name="a", tags={"x", "y", "z"}, inner=Point(0.0, 1.0)))
    assert H(m) != H(m.model_dump())


class MyStr(str):
    pass


class MyList(list[int]):
    pass


def test_subclasses_of_builtins_differ_from_their_base() -> None:
    assert H(MyStr("a")) == H(MyStr("a")) != H("a")
    assert H(MyList([1])) != H([1])
    tagged = MyList([1])
    tagged.note = "x"  # type: ignore[attr-defined]  # a subclass instance may carry a __dict__
    assert H(tagged) != H(MyList([1]))


# --- functions as values -----------------------------------------------------------------


def _adder(k: int) -> Callable[[int], int]:
    return lambda x: x + k


def test_functions_hash_by_identity_code_and_closure() -> None:
    assert H(_adder) == H(_adder)
    assert H(_adder(1)) == H(_adder(1))
    assert H(_adder(1)) != H(_adder(2))
    assert H(len) == H(len) != H(abs)
    assert H(int) != H(float)
    assert H(np.ndarray) == H(np.ndarray)
    assert H(os) != H(sys)

    def countdown(n: int) -> int:  # refers to itself through its closure
        return 0 if n == 0 else countdown(n - 1)

    assert H(countdown) == H(countdown)


# --- everything else: the reduce protocol -------------------------------------------------


class Bag:
    def __init__(self, **attrs: object) -> None:
        self.__dict__.update(attrs)


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: object, b: object) -> None:
        self.a = a
        self.b = b


class Reduced:
    def __init__(self, value: int) -> None:
        self.value = value
        self.cache = object()  # left out by __reduce__

    def __reduce__(self) -> tuple[Any, ...]:
        return (Reduced, (self.value,))


class Node:
    def __init__(self, name: str, parent: Node | None = None) -> None:
        self.name = name
        self.parent = parent
        self.children: list[Node] = []
        if parent is not None:
            parent.children.append(self)


def _tree(leaf: str) -> Node:
    root = Node("root")
    Node(leaf, Node("mid", root))
    return root


def test_other_objects_hash_through_their_pickle_state() -> None:
    assert H(Bag(a=1, b={"x", "y"})) == H(Bag(b={"y", "x"}, a=1))  # attribute order too
    assert H(Bag(a=1)) != H(Bag(a=2))
    assert H(Slotted(1, 2)) == H(Slotted(1, 2)) != H(Slotted(2, 1))
    assert H(Reduced(3)) == H(Reduced(3)) != H(Reduced(4))
    assert H(re.compile("a+")) == H(re.compile("a+")) != H(re.compile("a*"))
    assert H(functools.partial(int, base=2)) != H(functools.partial(int, base=8))
    # parent pointers: a cycle through plain objects is encoded as a back-reference
    assert H(_tree("leaf")) == H(_tree("leaf")) != H(_tree("other"))


def test_unpicklable_value_names_the_value() -> None:
    lock = threading.Lock()
    with pytest.raises(
        UnhashableInputError,
        match=r"^cannot hash value: <unlocked _thread\.lock object at 0x[0-9a-f]+> of type "
        r"_thread\.lock has no canonical content hash and cannot be pickled "
        r"\(TypeError: cannot pickle '_thread\.lock' object\); pass something that stands "
        r"for its content instead, such as its path, URL or id$",
    ):
        H(lock)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"db": [1, "LOCK"]}, r"cfg\['db'\]\[1\]"),
        (Bag(conn="LOCK"), r"cfg\.conn"),
        (Point(0.0, 0.0), r"cfg\.x"),
        ((1, frozenset({("LOCK",)})), r"cfg\[1\]\{\.\.\.\}\[0\]"),
    ],
)
def test_unpicklable_part_is_located(value: Any, where: str) -> None:
    lock = threading.Lock()

    def put(v: Any) -> Any:
        if v == "LOCK":
            return lock
        if isinstance(v, dict):
            return {k: put(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(put(x) for x in v)
        if isinstance(v, frozenset):
            return frozenset(put(x) for x in v)
        if isinstance(v, Bag):
            return Bag(**{k: put(x) for k, x in vars(v).items()})
        return v

    value = put(value)
    if isinstance(value, Point):
        value.x = lock  # type: ignore[assignment]  # a wrong type on purpose
    with pytest.raises(UnhashableInputError) as info:
        H(value, name="cfg")
    assert re.match(
        rf"^cannot hash cfg: {where} is <unlocked _thread\.lock object at 0x[0-9a-f]+> of type "
        r"_thread\.lock, which has no canonical content hash and cannot be pickled "
        r"\(TypeError: cannot pickle '_thread\.lock' object\); pass something that stands "
        r"for its content instead, such as its path, URL or id$",
        str(info.value),
    ), str(info.value)
    assert isinstance(info.value.__cause__, TypeError)


def test_cycles_in_containers_raise() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(
        UnhashableInputError,
        match=r"^cannot hash value: value\[1\] refers back to an enclosing list, a reference "
        r"cycle: \[1, \[\.\.\.\]\]; cycles have no canonical content hash, so pass an acyclic "
        r"value$",
    ):
        H(loop)
    d: dict[str, object] = {}
    d["self"] = [d]
    with pytest.raises(
        UnhashableInputError,
        match=r"^cannot hash value: value\['self'\]\[0\] refers back to an enclosing dict, ",
    ):
        H(d)


def test_too_deep_nesting_is_a_clear_error() -> None:
    deep: list[object] = []
    for _ in range(sys.getrecursionlimit() * 2):
        deep = [deep]
    with pytest.raises(
        UnhashableInputError,
        match=r"^cannot hash value: it is nested more deeply than Python's recursion limit "
        r"allows; pass a flatter value, or something that stands for it such as a path or "
        r"an id$",
    ):
        H(deep)


# --- numpy ----------------------------------------------------------------------------------


def test_numpy_arrays() -> None:
    a = np.arange(12.0).reshape(3, 4)
    assert H(a) == H(a.copy())
    assert H(a) != H(a.reshape(4, 3))  # shape counts
    assert H(a) != H(a.astype(np.float32))  # dtype counts
    assert H(np.arange(3, dtype=np.int32)) != H(np.arange(3, dtype=np.int64))
    assert H(a[:, ::2]) == H(np.ascontiguousarray(a[:, ::2]))  # views: content, not layout
    assert H(np.asfortranarray(a)) == H(a)
    assert H(np.arange(3, dtype=">i8")) == H(np.arange(3, dtype="<i8"))
    b = a.copy()
    b[2, 3] += 1
    assert H(a) != H(b)
    big = np.arange(100_000, dtype=np.float64)  # streamed to the hasher
    big2 = big.copy()
    assert H(big) == H(big2)
    big2[-1] = -1
    assert H(big) != H(big2)
    assert H(np.array(1.5)) != H(np.array([1.5]))
    assert H(np.array(["2024-01-01"], dtype="datetime64[D]")) != H(
        np.array(["2024-01-01"], dtype="datetime64[s]")
    )
    s = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
    assert H(s) != H(np.zeros(2, dtype=[("a", "i4"), ("c", "f8")]))  # field names count
    assert H(np.array(["ab", "c"])) == H(np.array(["ab", "c"]))


def test_numpy_object_arrays_and_scalars() -> None:
    o = np.array([{"k": {1, 2}}, "x", None], dtype=object)
    assert H(o) == H(np.array([{"k": {2, 1}}, "x", None], dtype=object))
    assert H(o) != H(np.array([{"k": {1}}, "x", None], dtype=object))
    assert H(np.float64(1.5)) == H(np.float64(1.5)) != H(1.5)
    assert H(np.float64(1.5)) != H(np.float32(1.5))
    assert H(np.datetime64("2024-01-01")) != H(np.datetime64("2024-01-02"))
    assert H(np.dtype("f4")) != H(np.dtype("f8"))
    masked = np.ma.masked_array([1, 2, 3], mask=[False, True, False])
    hidden = np.ma.masked_array([1, 99, 3], mask=[False, True, False])
    assert H(masked) == H(hidden)  # what lies under the mask does not count
    assert H(masked) != H(np.ma.masked_array([1, 2, 3], mask=[False, False, False]))
    assert H(np.random.default_rng(5)) == H(np.random.default_rng(5))
    assert H(np.random.default_rng(5)) != H(np.random.default_rng(6))


# --- pandas ---------------------------------------------------------------------------------


def _frame() -> pd.DataFrame:
    frame: pd.DataFrame = pd.DataFrame(
        {
            "f": [1.5, 2.5, float("nan"), 4.0],
            "i": [1, 2, 3, 4],
            "s": ["a", None, "c", "d"],
            "o": pd.Series([{"x": 1}, 2, "three", None], dtype=object),
            "cat": pd.Categorical(["u", "v", "u", "w"]),
            "ts": pd.date_range("2024-01-01", periods=4, tz="Europe/Paris"),
            "n": pd.array([1, None, 3, 4], dtype="Int64"),
            "b": [True, False, True, False],
        },
        index=pd.Index([10, 20, 30, 40], name="key"),
    )
    return frame


def test_pandas_frames_hash_by_content() -> None:
    df = _frame()
    assert H(df) == H(_frame()) == H(df.copy())
    assert H(df) != H(df[list(reversed(df.columns))])  # column order counts
    assert H(df) != H(df.rename(columns={"f": "g"}))
    assert H(df) != H(df.set_axis([10, 20, 30, 41]))
    assert H(df) != H(df.rename_axis("other"))
    changed = df.copy()
    changed.loc[30, "s"] = "C"
    assert H(df) != H(changed)
    assert H(df.iloc[::2]) == H(df.iloc[::2].copy())
    assert H(df["i"]) != H(df["i"].astype("float64"))
    assert H(df["i"]) != H(df["i"].rename("j"))
    assert H(df["i"]) != H(df[["i"]])
    assert H(df["i"]) != H(df["i"].to_numpy())
    # the same instants in another zone: the dtype differs, so the hash does
    assert H(df["ts"]) != H(df["ts"].dt.tz_convert("UTC"))


def test_pandas_numeric_frame_layout_does_not_count() -> None:
    block = np.arange(60_000, dtype=np.float64).reshape(20_000, 3)  # columns above 64 KB
    from_2d = pd.DataFrame(block, columns=["x", "y", "z"])
    from_dict = pd.DataFrame({c: block[:, i].copy() for i, c in enumerate("xyz")})
    assert H(from_2d) == H(from_dict)


def test_pandas_masks_and_categoricals() -> None:
    hidden1 = pd.arrays.IntegerArray(np.array([1, 7, 3]), np.array([False, True, False]))
    hidden2 = pd.arrays.IntegerArray(np.array([1, 9, 3]), np.array([False, True, False]))
    assert H(pd.Series(hidden1)) == H(pd.Series(hidden2))
    assert H(hidden1) == H(hidden2)
    c1 = pd.Series(pd.Categorical(["a", "b"], categories=["a", "b"]))
    assert H(c1) == H(pd.Series(pd.Categorical(["a", "b"], categories=["a", "b"])))
    assert H(c1) != H(pd.Series(pd.Categorical(["a", "b"], categories=["a", "b", "c"])))
    assert H(c1) != H(pd.Series(pd.Categorical(["a", "b"], ordered=True)))
    assert H(c1) != H(pd.Series(["a", "b"]))


def test_pandas_indexes_and_scalars() -> None:
    mi = pd.MultiIndex.from_tuples([(1, "a"), (2, "b")], names=["n", "s"])
    assert H(pd.Series([1, 2], index=mi)) == H(pd.Series([1, 2], index=mi.copy()))
    assert H(mi) != H(mi.set_names(["n", "t"]))
    assert H(pd.RangeIndex(3)) == H(pd.RangeIndex(0, 3, 1))
    assert H(pd.Index(["a", "b"])) != H(pd.Index(["a", "c"]))
    ts = pd.Timestamp("2024-01-01 00:00:00", tz="UTC")
    assert H(ts) == H(ts.tz_convert("Asia/Tokyo"))
    assert H(ts) != H(ts + pd.Timedelta(1, "ns"))  # nanoseconds count
    assert H(ts) != H(ts.tz_localize(None))
    assert H(pd.Timedelta(1, "s")) == H(pd.Timedelta(1000, "ms"))
    assert H(pd.NaT) == H(pd.NaT) != H(None)


# --- Arrow ------------------------------------------------------------------------------------


def _sample_table() -> pa.Table:
    return pa.table(
        {
            "i": pa.array([1, None, 3, 4, 5], pa.int64()),
            "s": pa.array(["a", "bb", None, "", "eeee"]),
            "ls": pa.array(["x", None, "y", "z", "w"], pa.large_string()),
            "b": pa.array([True, None, False, True, True]),
            "l": pa.array([[1], None, [], [2, 3], [4]]),
            "st": pa.array([{"p": 1}, None, {"p": 3}, {"p": None}, {"p": 5}]),
            "d": pa.array(["u", "v", "u", None, "v"]).dictionary_encode(),
            "m": pa.array(
                [[("k", 1)], None, [], [("a", 2)], [("b", 3)]], pa.map_(pa.string(), pa.int64())
            ),
            "t": pa.array([0, 1, 2, 3, None], pa.timestamp("us", tz="UTC")),
            "dec": pa.array(
                [decimal.Decimal("1.5"), None, None, decimal.Decimal("2"), None],
                pa.decimal128(5, 2),
            ),
            "n": pa.nulls(5),
        }
    )


def test_arrow_chunking_and_slicing_do_not_count() -> None:
    table = _sample_table()
    pieces = pa.concat_tables([table.slice(0, 1), table.slice(1, 3), table.slice(4)])
    assert pieces.column("i").num_chunks == 3
    assert H(table) == H(pieces) == H(pieces.combine_chunks())
    for name in table.column_names:
        assert H(table.column(name)) == H(pieces.column(name)), name
        whole = table.column(name).combine_chunks()
        assert H(whole.slice(1, 3)) == H(pa.array(whole.to_pylist()[1:4], whole.type)), name
    assert H(table) != H(table.to_batches()[0])  # a Table is not a RecordBatch
    assert H(table.column("i")) != H(table.column("i").combine_chunks())  # nor an Array


def test_arrow_values_types_and_names_count() -> None:
    table = _sample_table()
    assert H(table) != H(table.rename_columns(["j", *table.column_names[1:]]))
    assert H(pa.array([1, 2], pa.int32())) != H(pa.array([1, 2], pa.int64()))
    assert H(pa.array(["a"], pa.string())) != H(pa.array(["a"], pa.large_string()))
    assert H(pa.array(["ab", "c"])) != H(pa.array(["a", "bc"]))
    assert H(pa.array([1, None])) != H(pa.array([1, 0]))
    assert H(pa.array([None, 1])) != H(pa.array([1, None]))


def test_arrow_bytes_under_nulls_never_reach_the_hash() -> None:
    validity = pa.py_buffer(bytes([0b101]))
    garbage = pa.Array.from_buffers(
        pa.int64(), 3, [validity, pa.py_buffer(struct.pack("<3q", 1, 999, 3))]
    )
    assert H(garbage) == H(pa.array([1, None, 3], pa.int64()))
    offsets = pa.py_buffer(struct.pack("<4i", 0, 2, 5, 8))  # the null slot spans "XYZ"
    strings = pa.Array.from_buffers(pa.string(), 3, [validity, offsets, pa.py_buffer(b"abXYZcde")])
    assert H(strings) == H(pa.array(["ab", None, "cde"]))


def test_arrow_dictionaries_hash_by_value() -> None:
    one = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0], pa.int32()), pa.array(["x", "y"]))
    two = pa.DictionaryArray.from_arrays(pa.array([1, 0, 1], pa.int32()), pa.array(["y", "x"]))
    assert H(one) == H(two)
    assert H(pa.chunked_array([one, two])) == H(
        pa.chunked_array([one.slice(0, 1), one.slice(1), two])
    )


# --- polars -------------------------------------------------------------------------------


def test_polars() -> None:
    first = pl.DataFrame({"a": [1, 2], "s": ["x", None], "c": ["u", "v"]})
    second = pl.DataFrame({"a": [3], "s": ["z"], "c": ["u"]})
    chunked = pl.concat([first, second], rechunk=False)
    assert chunked.n_chunks() == 2
    assert H(chunked) == H(chunked.rechunk())
    assert H(chunked) != H(chunked.with_columns(pl.col("a") + 1))
    assert H(chunked) != H(chunked.to_arrow())
    series = pl.Series("name", [1, None, 3])
    assert H(series) == H(pl.Series("name", [1, None, 3]))
    assert H(series) != H(series.rename("other"))
    assert H(series) != H(series.cast(pl.Int32))
    cat = pl.Series("c", ["a", "b", "a"], dtype=pl.Categorical)
    assert H(cat) == H(pl.Series("c", ["a", "b", "a"], dtype=pl.Categorical))
    assert H(cat) != H(pl.Series("c", ["a", "b", "a"]))


# --- stability across processes ---------------------------------------------------------------

VALUES_MODULE = '''
import dataclasses, datetime, decimal, enum, fractions, pathlib, uuid, typing


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    tags: set


class Pair(typing.NamedTuple):
    a: int
    b: str


class Bag:
    def __init__(self):
        self.names = {"alpha", "beta", "gamma", "delta", "epsilon"}
        self.index = {"k%d" % i: frozenset({"a%d" % i, "b%d" % i}) for i in range(20)}


def scale(x, factor=2):
    """Scales x."""
    return x * factor


def values():
    import numpy as np, pandas as pd, polars as pl, pyarrow as pa

    words = {"w%d" % i for i in range(50)}
    return {
        "scalars": [None, True, 0, -1, 2**70, 1.5, -0.0, float("nan"), 1j, "héllo\\ud800", b"x"],
        "set_of_str": words,
        "frozenset_of_tuples": frozenset(("k%d" % i, i) for i in range(30)),
        "dict_of_sets": {"w%d" % i: {"a", "b", "w%d" % i} for i in range(30)},
        "datetimes": [
            datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone.utc),
            datetime.date(2024, 5, 6),
            datetime.time(1, 2),
            datetime.timedelta(seconds=5),
        ],
        "others": [decimal.Decimal("1.50"), fractions.Fraction(1, 3), uuid.UUID(int=1),
                   pathlib.PurePosixPath("/a/b"), Color.RED, Pair(1, "x"),
                   Point(1, {"p", "q", "r"}), range(3), slice(1, 2)],
        "object": Bag(),
        "function": scale,
        "numpy": np.arange(24.0).reshape(4, 6),
        "numpy_object": np.array([{"x", "y"}, "z"], dtype=object),
        "pandas": pd.DataFrame({
            "f": [1.5, 2.5], "s": ["a", None],
            "c": pd.Categorical(["x", "y"]),
            "t": pd.date_range("2024", periods=2, tz="UTC"),
            "n": pd.array([1, None], dtype="Int64"),
        }),
        "arrow": pa.table({"i": [1, None], "s": ["a", "b"], "l": [[1], None]}),
        "polars": pl.DataFrame({"i": [1, 2], "s": ["a", None]}),
    }
'''

_PRINT_DIGESTS = (
    "import json, dnb_hash_values as m\n"
    "from durable_nb._hashing import hash_value, code_version\n"
    "out = {k: hash_value(v).hex() for k, v in m.values().items()}\n"
    "out['code_version'] = code_version(m.scale)\n"
    "print(json.dumps(out, sort_keys=True))\n"
)


def test_digests_are_stable_across_processes_and_hash_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dnb_hash_values.py").write_text(VALUES_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import dnb_hash_values as m  # type: ignore[import-not-found]  # written just above

        here = {k: hash_value(v).hex() for k, v in m.values().items()}
        here["code_version"] = code_version(m.scale)
    finally:
        sys.modules.pop("dnb_hash_values", None)
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
        done = subprocess.run(
            [sys.executable, "-c", _PRINT_DIGESTS],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == here, f"PYTHONHASHSEED={seed}"


def test_import_loads_no_dataframe_library() -> None:
    code = (
        "import sys, durable_nb._hashing\n"
        "print(','.join(sorted(m for m in ('numpy', 'pandas', 'pyarrow', 'polars')"
        " if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# --- ArgBinder ---------------------------------------------------------------------------------


def add(a: int, b: int = 2, *, c: int = 3) -> int:
    return a + b + c


def plain(a: object, b: object = 2) -> object:
    return a


def variadic(a: int, *rest: int, **options: int) -> int:
    return a


def load(conn: object, n: int = 1) -> object:
    return conn


def test_bind_applies_defaults_and_ignores_keyword_order() -> None:
    binder = ArgBinder(add)
    expected = {"a": 1, "b": 2, "c": 3}
    assert binder.bind((1,), {}) == expected
    assert binder.bind((), {"b": 2, "a": 1}) == expected
    assert binder.bind((1,), {"c": 3, "b": 2}) == expected
    digest = binder.input_hash((1,), {})
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    for args, kwargs in [((1, 2), {}), ((), {"a": 1}), ((1,), {"b": 2}), ((), {"b": 2, "a": 1})]:
        assert binder.input_hash(args, kwargs) == digest, (args, kwargs)
    assert binder.input_hash((1, 3), {}) != digest
    assert binder.input_hash((1,), {"c": 4}) != digest


def test_variadic_arguments() -> None:
    binder = ArgBinder(variadic)
    assert binder.bind((1, 2), {"y": 2, "x": 1}) == {
        "a": 1,
        "rest": (2,),
        "options": {"y": 2, "x": 1},
    }
    assert binder.input_hash((1, 2), {"x": 1, "y": 2}) == binder.input_hash(
        (1, 2), {"y": 2, "x": 1}
    )
    assert binder.input_hash((1, 2), {"x": 1}) != binder.input_hash((1, 2), {"x": 1, "y": 2})
    assert binder.input_hash((1,), {}) != binder.input_hash((1, 2), {})


@hypothesis_settings
@given(_scalars, _scalars)
def test_fast_path_gives_the_general_paths_digest(a: object, b: object) -> None:
    binder = ArgBinder(plain)
    fast = binder.input_hash((a, b), {})
    assert fast == binder.input_hash((), {"b": b, "a": a})
    assert fast == binder.hash_bound({"a": a, "b": b})
    assert fast == binder.input_hash((a,), {"b": b})
    assert binder.input_hash((a,), {}) == binder.input_hash((a, 2), {})


def test_fast_path_does_not_bind_through_inspect() -> None:
    class NoBind:
        def bind(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("the fast path called Signature.bind")

    binder = ArgBinder(plain)
    expected = binder.input_hash((1,), {})
    binder.signature = NoBind()  # type: ignore[assignment]  # a tripwire in place of inspect
    assert binder.input_hash((1,), {}) == expected
    assert binder.input_hash((), {"a": 1}) == expected
    assert binder.input_hash((), {"b": 2, "a": 1}) == expected
    assert binder.input_hash(([1],), {}) == binder.input_hash(([1],), {"b": 2})
    assert binder.bind((1,), {}) == binder.bind((), {"a": 1}) == {"a": 1, "b": 2}
    with pytest.raises(AssertionError):  # only a wrong call asks inspect, for its message
        binder.input_hash((), {"c": 1})


def test_positional_only_parameters() -> None:
    def f(a: int, /, b: int = 2) -> None:
        pass

    binder = ArgBinder(f)
    assert binder.input_hash((1,), {"b": 2}) == binder.input_hash((1,), {})
    with pytest.raises(ArgumentTypeError, match=r"positional"):
        binder.input_hash((), {"a": 1})


def test_non_scalar_defaults_are_hashed_per_call() -> None:
    def with_tuple(a: int, shape: tuple[int, ...] = (2, 3)) -> int:
        return a

    binder = ArgBinder(with_tuple)
    assert binder.input_hash((1,), {}) == binder.input_hash((1, (2, 3)), {})
    assert binder.input_hash((1,), {}) != binder.input_hash((1, (3, 2)), {})


def test_missing_and_unexpected_arguments_are_argument_type_errors() -> None:
    binder = ArgBinder(add)
    ident = re.escape(effect_identity(add))
    signature = r"\(a, b=2, \*, c=3\)"
    cases = [
        (((), {}), r"missing a required argument: 'a'"),
        (((1,), {"z": 1}), r"got an unexpected keyword argument 'z'"),
        (((1, 2, 3), {}), r"too many positional arguments"),
        (((1,), {"a": 1}), r"multiple values for argument 'a'"),
    ]
    for (args, kwargs), message in cases:
        pattern = (
            rf"^{ident}\(\) {message}; pass arguments that match its signature {ident}{signature}$"
        )
        with pytest.raises(ArgumentTypeError, match=pattern):
            binder.input_hash(args, kwargs)
        with pytest.raises(ArgumentTypeError, match=pattern):
            binder.bind(args, kwargs)


def test_unhashable_argument_names_the_argument_and_function() -> None:
    binder = ArgBinder(load)
    ident = re.escape(effect_identity(load))
    with pytest.raises(
        UnhashableInputError,
        match=rf"^cannot hash argument 'conn' of {ident}: <unlocked _thread\.lock object at "
        r"0x[0-9a-f]+> of type _thread\.lock has no canonical content hash and cannot be "
        r"pickled \(TypeError: cannot pickle '_thread\.lock' object\); pass something that "
        r"stands for its content instead, such as its path, URL or id$",
    ):
        binder.input_hash((threading.Lock(),), {})
    with pytest.raises(
        UnhashableInputError,
        match=rf"^cannot hash argument 'conn' of {ident}: conn\['pool'\]\[0\] is <unlocked ",
    ):
        binder.input_hash(({"pool": [threading.Lock()]},), {"n": 2})


def test_skip_first_drops_the_context_parameter() -> None:
    def workflow(ctx: object, a: object, b: object = 2) -> None:
        pass

    binder = ArgBinder(workflow, skip_first=True)
    assert binder.bind((1,), {}) == {"a": 1, "b": 2}
    assert binder.input_hash((1,), {}) == ArgBinder(plain).input_hash((1,), {})
    with pytest.raises(
        ArgumentTypeError,
        match=r"^.*\.<lambda>\(\) has no leading positional parameter to receive the workflow "
        r"context; declare it first, as in def f\(ctx, \.\.\.\)$",
    ):
        ArgBinder(lambda: None, skip_first=True)


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def apply(self, x: int) -> int:
        return x * self.factor

    def __call__(self, x: int) -> int:
        return self.apply(x)


def test_partials_and_bound_methods_hash_their_bound_arguments() -> None:
    assert ArgBinder(functools.partial(add, 1)).input_hash((), {}) == ArgBinder(add).input_hash(
        (1,), {}
    )
    assert ArgBinder(functools.partial(add, 1)).input_hash((), {}) != ArgBinder(
        functools.partial(add, 5)
    ).input_hash((), {})
    assert ArgBinder(functools.partial(add, c=9)).input_hash((1,), {}) == ArgBinder(add).input_hash(
        (1,), {"c": 9}
    )
    two, three = Scaler(2), Scaler(3)
    assert ArgBinder(two.apply).input_hash((5,), {}) == ArgBinder(Scaler(2).apply).input_hash(
        (5,), {}
    )
    assert ArgBinder(two.apply).input_hash((5,), {}) != ArgBinder(three.apply).input_hash((5,), {})
    assert ArgBinder(two.apply).input_hash((5,), {}) == ArgBinder(Scaler.apply).input_hash(
        (two, 5), {}
    )
    assert ArgBinder(two).bind((5,), {}) == {"self": two, "x": 5}


# --- identity and code version -----------------------------------------------------------------


def _decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@_decorate
def decorated(x: int) -> int:
    return x


def test_effect_identity() -> None:
    here = __name__
    assert effect_identity(add) == f"{here}.add"
    assert effect_identity(functools.partial(add, 1)) == f"{here}.add"
    assert effect_identity(decorated) == f"{here}.decorated"
    assert effect_identity(Scaler(2).apply) == f"{here}.Scaler.apply"
    assert effect_identity(Scaler.apply) == f"{here}.Scaler.apply"
    assert effect_identity(Scaler(2)) == f"{here}.Scaler.__call__"
    assert effect_identity(len) == "builtins.len"
    assert effect_identity(str.upper) == "builtins.str.upper"
    assert effect_identity(lambda: 0) == f"{here}.test_effect_identity.<locals>.<lambda>"

    def local() -> None:
        pass

    assert effect_identity(local) == f"{here}.test_effect_identity.<locals>.local"


_sources = itertools.count()


@pytest.fixture
def define() -> Iterator[Callable[..., Any]]:
    """Define functions from source text, as a notebook cell would (source in linecache)."""
    filenames: list[str] = []

    def make(source: str, name: str = "f", *, in_linecache: bool = True) -> Any:
        filename = f"<durable_nb-test-{next(_sources)}>"
        source = textwrap.dedent(source)
        if in_linecache:
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            filenames.append(filename)
        namespace: dict[str, Any] = {"__name__": "cells"}
        exec(compile(source, filename, "exec"), namespace)
        return namespace[name]

    yield make
    for filename in filenames:
        linecache.cache.pop(filename, None)


BASE = """
def f(x, y=1):
    z = x + y
    return z * 2
"""

SAME_CODE = [
    """
    def f(x, y=1):
        # a comment
        z = x + y  # another

        return z * 2
    """,
    """
    def f(x,
          y = 1):
        z = (x +
             y)
        return (z * 2)
    """,
    '''
    def f(x, y=1):
        """A docstring does not count."""
        z = x + y
        return z * 2
    ''',
    """
    def deco(fn):
        return fn

    @deco
    def f(x, y=1):
        z = x + y
        return z * 2
    """,
]

REAL_EDITS = [
    BASE.replace("return z * 2", "return z * 3"),
    BASE.replace("x + y", "x - y"),
    BASE.replace("y=1", "y=2"),
    BASE.replace("z = x + y", "z = x + x"),
    BASE.replace("return z * 2", "return w * 2"),
    BASE + "    print(z)\n",
]


def test_code_version_ignores_comments_formatting_docstrings_decorators(
    define: Callable[..., Any],
) -> None:
    base = code_version(define(BASE))
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    for source in SAME_CODE:
        assert code_version(define(source)) == base, source


def test_code_version_catches_real_edits(define: Callable[..., Any]) -> None:
    versions = {code_version(define(BASE))} | {code_version(define(s)) for s in REAL_EDITS}
    assert len(versions) == len(REAL_EDITS) + 1


def test_code_version_without_source_hashes_the_code_object(define: Callable[..., Any]) -> None:
    base = code_version(define(BASE, in_linecache=False))
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    for source in SAME_CODE[:3]:
        assert code_version(define(source, in_linecache=False)) == base, source
    for source in REAL_EDITS:
        assert code_version(define(source, in_linecache=False)) != base, source


def test_code_version_without_source_ignores_line_breaks_in_jumps_and_paired_loads(
    define: Callable[..., Any],
) -> None:
    """3.13 pairs two loads or stores into one instruction only when they share a line, and
    jumps count bytes: the code version hashes the instructions without either."""
    one = """
    def g(xs, k):
        total, last = 0, None
        for x in xs:
            if x > k and x != last:
                total, last = total + x, x
            else:
                total = total - k
        return total
    """
    broken = """
    def g(xs,
          k):
        total, last = (0,
                       None)
        for x in (
            xs
        ):
            if (x > k
                    and x != last):
                total, last = (total
                               + x), x
            else:
                total = (total
                         - k)
        return (total)
    """
    edited = one.replace("total - k", "total + k")
    base = code_version(define(one, "g", in_linecache=False))
    assert code_version(define(broken, "g", in_linecache=False)) == base
    assert code_version(define(edited, "g", in_linecache=False)) != base
    fn = define(broken, "g", in_linecache=False)
    assert fn([1, 5, 5, 7], 2) == -2 + 5 - 2 + 7


def test_code_version_of_nested_definitions_lambdas_and_builtins(
    define: Callable[..., Any],
) -> None:
    outer = """
    def f():
        def inner():
            '''Inner docs do not count either.'''
            return 1
        return inner
    """
    assert code_version(define(outer)) == code_version(
        define(outer.replace("'''Inner docs do not count either.'''", ""))
    )
    pair = define("fs = [lambda x: x + 1, lambda x: x * 2]\n", "fs")
    assert code_version(pair[0]) != code_version(pair[1])
    alone = define("\n\ng = (lambda x:\n     x + 1)\n", "g")
    assert code_version(alone) == code_version(pair[0])  # only the lambda's own code counts
    assert code_version(len) == code_version(len) != code_version(abs)
    assert code_version(Scaler(2).apply) == code_version(Scaler.apply)
    assert code_version(decorated) == code_version(decorated.__wrapped__)  # type: ignore[attr-defined]
    cls = define("class C:\n    '''Doc.'''\n    def m(self):\n        return 1\n", "C")
    cls2 = define("class C:\n    def m(self):\n        return 2\n", "C")
    assert code_version(cls) != code_version(cls2)


def test_code_version_is_cached_per_function(define: Callable[..., Any]) -> None:
    fn = define(BASE)
    first = code_version(fn)
    fn.__code__ = define(REAL_EDITS[0]).__code__  # the cache, not the source, answers now
    assert code_version(fn) == first
