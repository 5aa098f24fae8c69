"""Codecs: every type round-trips exactly, in memory and through a DuckDB table."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import itertools
import math
import pickle
import re
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pandas.testing as pdt
import polars as pl
import polars.testing as plt
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from durable_nb._codecs import (
    TRACEBACK_ATTR,
    Payload,
    RecordedError,
    Signer,
    decode,
    decode_error,
    encode,
    encode_error,
    is_table_codec,
)
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    PayloadIntegrityError,
    StoreFormatError,
    UnstorableValueError,
)

ROOT = Path(__file__).resolve().parent.parent
SIGNER = Signer(b"k" * 32)


# --------------------------------------------------------------------------- DuckDB helper


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(str(tmp_path_factory.mktemp("codecs") / "store.duckdb"))
    yield con
    con.close()


_names = itertools.count()


def through_duckdb(con: duckdb.DuckDBPyConnection, payload: Payload) -> Payload:
    """What the DuckDB store does: a native table in, whatever DuckDB gives back out."""
    if not is_table_codec(payload.codec):
        assert payload.table is None
        return payload
    assert isinstance(payload.table, pa.Table)
    name = f"t{next(_names)}"
    con.register("dn_value", payload.table)
    try:
        con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM dn_value')
    finally:
        con.unregister("dn_value")
    table = con.sql(f'SELECT * FROM "{name}"').to_arrow_table()
    return Payload(payload.codec, bytes(payload.data), table)


def both_ways(con: duckdb.DuckDBPyConnection, value: object, codec: str) -> list[object]:
    """Encode, check the codec, and decode from memory and from a DuckDB table."""
    payload = encode(value, SIGNER)
    assert payload.codec == codec, payload.codec
    assert (payload.table is not None) == is_table_codec(codec)
    return [decode(payload, SIGNER), decode(through_duckdb(con, payload), SIGNER)]


# --------------------------------------------------------------------------- exact equality


def typed(value: object) -> object:
    """A structure that compares equal only if types match too (bool/int, -0.0, NaN)."""
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value.hex())
    if isinstance(value, list | tuple):
        return (type(value), [typed(v) for v in value])
    if isinstance(value, dict):
        return (type(value), [(typed(k), typed(v)) for k, v in value.items()])
    return (type(value), value)


def assert_same_frame(out: object, expected: pd.DataFrame) -> None:
    assert type(out) is pd.DataFrame
    pdt.assert_frame_equal(
        out,
        expected,
        check_exact=True,
        check_dtype=True,
        check_index_type=True,
        check_column_type=True,
        check_frame_type=True,
        check_names=True,
        check_freq=True,
        check_flags=True,
        check_categorical=True,
    )
    assert out.attrs == expected.attrs
    for i in range(expected.index.nlevels):
        assert type(out.index.get_level_values(i)) is type(expected.index.get_level_values(i))


def assert_same_series(out: object, expected: pd.Series) -> None:
    assert type(out) is pd.Series
    pdt.assert_series_equal(
        out,
        expected,
        check_exact=True,
        check_dtype=True,
        check_index_type=True,
        check_series_type=True,
        check_names=True,
        check_freq=True,
        check_flags=True,
        check_categorical=True,
    )
    assert out.name == expected.name and type(out.name) is type(expected.name)
    assert out.attrs == expected.attrs


_TEMPORAL_STORAGE = {
    "timestamp": pa.int64(),
    "duration": pa.int64(),
    "date64": pa.int64(),
    "time64": pa.int64(),
    "date32": pa.int32(),
    "time32": pa.int32(),
}


def arrow_rows(table: pa.Table | pa.RecordBatch) -> list[object]:
    """Rows as typed Python values; far-off dates as integers (datetime cannot hold them)."""
    columns = {}
    for field, column in zip(table.schema, table.columns, strict=True):
        kind = str(field.type).split("[")[0]
        if kind in _TEMPORAL_STORAGE:
            column = column.cast(_TEMPORAL_STORAGE[kind])
        columns[field.name + str(len(columns))] = column
    return [typed(row) for row in pa.table(columns).to_pylist()]


def assert_same_table(out: object, expected: pa.Table | pa.RecordBatch) -> None:
    assert type(out) is type(expected)
    assert out.schema.equals(expected.schema, check_metadata=True), (out.schema, expected.schema)
    for got, want in zip(out.schema, expected.schema, strict=True):
        assert (got.metadata or {}) == (want.metadata or {}) and got.nullable == want.nullable
    assert out.num_rows == expected.num_rows
    # equals() sees NaN != NaN; the rows see far-off dates and duplicate names badly: one suffices
    assert out.equals(expected) or arrow_rows(out) == arrow_rows(expected)


def assert_same_polars(out: object, expected: pl.DataFrame) -> None:
    assert type(out) is pl.DataFrame
    assert out.schema == expected.schema
    plt.assert_frame_equal(out, expected, check_exact=True, check_dtypes=True)


# --------------------------------------------------------------------------- JSON

JSON_VALUES = [
    0,
    -1,
    2**63,
    -(10**100),
    1.5,
    -0.0,
    1e308,
    5e-324,
    1.0,
    "",
    "héllo ✓ 日本 🎉",
    '\x00\n\t"\\/',
    "\ud800 lone surrogate",
    True,
    False,
    None,
    [],
    {},
    [True, 1, 1.0, "1", None],
    {"a": [1, [2, [3, {"b": None, "c": {"d": []}}]]], "é": "ü"},
    {"": 0, " ": [{}]},
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_json_values_round_trip_exactly(value: object) -> None:
    payload = encode(value, SIGNER)
    assert payload.codec == "json"
    assert payload.table is None
    assert typed(decode(payload, SIGNER)) == typed(value)


def test_json_is_compact_text() -> None:
    assert encode(5, SIGNER).data == b"5"
    assert encode("a", SIGNER).data == b'"a"'
    assert encode({"a": [1, 2]}, SIGNER).data == b'{"a":[1,2]}'
    assert encode("é", SIGNER).data == '"é"'.encode()


def test_deep_nesting_within_the_limit_is_json() -> None:
    value: object = 1
    for _ in range(50):
        value = [value]
    assert encode(value, SIGNER).codec == "json"


class Color(enum.IntEnum):
    RED = 1


class MyInt(int):
    pass


class MyStr(str):
    __slots__ = ()


class MyDict(dict[str, int]):
    pass


def _deep(n: int) -> object:
    value: object = 1
    for _ in range(n):
        value = [value]
    return value


def _cyclic() -> object:
    value: list[object] = [1]
    value.append(value)
    return value


NOT_JSON = {
    "tuple": (1, 2),
    "tuple inside a list": [1, (2,)],
    "int keys": {1: "a"},
    "nested int keys": {"a": {2: 3}},
    "nan": float("nan"),
    "inf": float("inf"),
    "nan in a list": [1.0, float("nan")],
    "-inf in a dict": {"x": float("-inf")},
    "IntEnum": Color.RED,
    "int subclass": MyInt(3),
    "str subclass": MyStr("s"),
    "dict subclass": MyDict(a=1),
    "IntEnum in a list": [Color.RED],
    "set": {1, 2},
    "complex": 1j,
    "huge int": 10**5000,
    "huge int in a list": [10**5000],
    "too deep": _deep(200),
    "date": dt.date(2020, 1, 1),
    "decimal": decimal.Decimal("1.10"),
}


@pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
def test_values_json_would_change_go_to_pickle(value: object) -> None:
    payload = encode(value, SIGNER)
    assert payload.codec == "pickle"
    out = decode(payload, SIGNER)
    assert type(out) is type(value)
    assert typed(out) == typed(value) or (isinstance(value, float) and math.isnan(value))


def test_cycles_go_to_pickle() -> None:
    out = decode(encode(_cyclic(), SIGNER), SIGNER)
    assert isinstance(out, list) and out[1] is out


def test_bool_and_int_stay_apart() -> None:
    out = decode(encode([True, 1, {"k": False}, 0], SIGNER), SIGNER)
    assert typed(out) == typed([True, 1, {"k": False}, 0])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None)),  # surrogates included
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_property_json_eligible_values_round_trip_as_json(value: object) -> None:
    payload = encode(value, SIGNER)
    assert payload.codec == "json"
    assert typed(decode(payload, SIGNER)) == typed(value)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.tuples(children, children)
            | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_property_any_plain_value_round_trips_exactly(value: object) -> None:
    assert typed(decode(encode(value, SIGNER), SIGNER)) == typed(value)


@pytest.mark.parametrize(
    "data",
    [b"", b"[1,", b"1 2", b"\xff", b'"unterminated', b"{1:2}"],
    ids=repr,
)
def test_damaged_json_is_a_store_format_error(data: bytes) -> None:
    with pytest.raises(StoreFormatError, match=r"^a stored 'json' payload is damaged: "):
        decode(Payload("json", data), SIGNER)


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    "value",
    [b"", b"\x00" * 10, bytes(range(256)), bytearray(), bytearray(b"abc")],
    ids=repr,
)
def test_bytes_and_bytearray_round_trip_as_themselves(value: bytes | bytearray) -> None:
    payload = encode(value, SIGNER)
    assert payload.codec == "bytes"
    out = decode(payload, SIGNER)
    assert type(out) is type(value) and out == value


class MyBytes(bytes):
    pass


def test_bytes_subclass_goes_to_pickle() -> None:
    payload = encode(MyBytes(b"x"), SIGNER)
    assert payload.codec == "pickle"
    assert type(decode(payload, SIGNER)) is MyBytes


# --------------------------------------------------------------------------- numpy

NUMPY_DTYPES = [
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "bool",
    "datetime64[ns]",
    "datetime64[D]",
    "datetime64[s]",
    "timedelta64[us]",
    ">i4",
    ">f8",
    "S3",
    "U4",
    "V2",
]


def _sample(dtype: np.dtype[Any], n: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).copy()


def assert_same_array(out: object, expected: np.ndarray[Any, Any]) -> None:
    assert type(out) is np.ndarray
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.tobytes(order="A") == expected.tobytes(order="A")
    assert out.flags.writeable


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_arrays_round_trip_bit_for_bit(dtype: str) -> None:
    arr = _sample(np.dtype(dtype), 12).reshape(3, 4)
    payload = encode(arr, SIGNER)
    assert payload.codec == "numpy"
    assert_same_array(decode(payload, SIGNER), arr)


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12.0).reshape(3, 4, order="F"),
        np.asfortranarray(np.arange(24).reshape(2, 3, 4)),
        np.array(7, dtype="int16"),
        np.zeros((0,)),
        np.zeros((0, 4), dtype="uint8"),
        np.zeros((3, 0, 2), dtype="complex64"),
        np.arange(10)[::3],
        np.arange(12).reshape(3, 4)[:, 1:3],
        np.array(["2020-01-01", "NaT"], dtype="datetime64[ms]"),
        np.array([np.nan, -0.0, np.inf]),
    ],
    ids=["F 2d", "F 3d", "0-d", "empty", "empty 2d", "empty 3d", "strided", "sliced", "NaT", "nan"],
)
def test_numpy_layouts_round_trip(arr: np.ndarray[Any, Any]) -> None:
    payload = encode(arr, SIGNER)
    assert payload.codec == "numpy"
    out = decode(payload, SIGNER)
    assert_same_array(out, arr)
    assert isinstance(out, np.ndarray)
    if arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        assert out.flags.f_contiguous


def test_numpy_fortran_order_is_kept() -> None:
    arr = np.arange(6).reshape(2, 3, order="F")
    out = decode(encode(arr, SIGNER), SIGNER)
    assert isinstance(out, np.ndarray)
    assert out.flags.f_contiguous and not out.flags.c_contiguous


def test_decoded_arrays_are_independent() -> None:
    payload = encode(np.arange(3), SIGNER)
    first = decode(payload, SIGNER)
    assert isinstance(first, np.ndarray)
    first[0] = 99
    assert decode(payload, SIGNER).tolist() == [0, 1, 2]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "scalar",
    [
        np.int8(-3),
        np.uint64(2**64 - 1),
        np.float16(1.5),
        np.float32(np.nan),
        np.float64(2.5),
        np.complex128(1 + 2j),
        np.bool_(True),
        np.datetime64("2020-01-01T00:00", "m"),
        np.timedelta64(5, "ns"),
        np.str_("x"),
        np.bytes_(b"y"),
    ],
    ids=repr,
)
def test_numpy_scalars_round_trip_as_scalars(scalar: np.generic) -> None:
    payload = encode(scalar, SIGNER)
    assert payload.codec == "numpy"
    out = decode(payload, SIGNER)
    assert type(out) is type(scalar)
    assert isinstance(out, np.generic)
    assert out.dtype == scalar.dtype and out.tobytes() == scalar.tobytes()


_STRING_DTYPE = getattr(np.dtypes, "StringDType", None)  # numpy 2 and later


@pytest.mark.parametrize(
    "arr",
    [
        pytest.param(np.array([1, "a", None], dtype=object), id="object"),
        pytest.param(np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]), id="structured"),
        pytest.param(
            np.array(["a", "bc"], dtype=_STRING_DTYPE()) if _STRING_DTYPE else None,
            id="StringDType",
            marks=pytest.mark.skipif(_STRING_DTYPE is None, reason="numpy 1.x has no StringDType"),
        ),
        pytest.param(np.ma.masked_array([1, 2], mask=[True, False]), id="masked"),
        pytest.param(np.zeros(2, dtype=np.dtype("i4", metadata={"unit": "m"})), id="metadata"),
    ],
)
def test_numpy_values_without_a_raw_layout_go_to_pickle(arr: np.ndarray[Any, Any]) -> None:
    payload = encode(arr, SIGNER)
    assert payload.codec == "pickle"
    out = decode(payload, SIGNER)
    assert type(out) is type(arr) and out.dtype == arr.dtype


def test_numpy_header_cannot_smuggle_an_object_dtype() -> None:
    good = encode(np.zeros(2, dtype="<i8"), SIGNER).data
    evil = good.replace(b"<i8", b"|O8")
    with pytest.raises(StoreFormatError, match=r"^a stored 'numpy' payload is damaged: "):
        decode(Payload("numpy", evil), SIGNER)
    with pytest.raises(StoreFormatError, match=r"^a stored 'numpy' payload is damaged: "):
        decode(Payload("numpy", good[:-3]), SIGNER)


# --------------------------------------------------------------------------- Arrow


def _newer(name: str, make: Callable[[], Any]) -> dict[str, Any]:
    """``{name: make()}``, or nothing where this pyarrow lacks the type (pyarrow 15 has no
    view types, decimal32 or uuid)."""
    try:
        return {name: make()}
    except AttributeError:
        return {}


def _casts_to_views() -> bool:
    try:
        pa.array(["a"]).cast(pa.string_view())
    except (AttributeError, pa.ArrowNotImplementedError):
        return False
    return True


# view types are stored as string/binary where pyarrow casts back to them (not 16-17)
VIEWS = {
    **_newer("string_view", lambda: pa.array(["a", None], pa.string_view())),
    **_newer("binary_view", lambda: pa.array([b"a", None], pa.binary_view())),
}
NATIVE_ARROW = {
    **(VIEWS if _casts_to_views() else {}),
    "int8": pa.array([1, None, -3], pa.int8()),
    "uint64": pa.array([1, None, 2**64 - 1], pa.uint64()),
    # from numpy: pyarrow before 16 takes only np.float16 values for float16
    "float16": pa.array(
        np.array([1.5, 0, np.nan], np.float16), mask=np.array([False, True, False])
    ),
    "float32": pa.array([1.5, None, float("nan"), -0.0], pa.float32()),
    "float64": pa.array([5e-324, None, float("inf")]),
    "bool": pa.array([True, None, False]),
    "string": pa.array(["a", None, "é"]),
    "large_string": pa.array(["a", None], pa.large_string()),
    "binary": pa.array([b"a", None], pa.binary()),
    "large_binary": pa.array([b"a", None], pa.large_binary()),
    "fixed_size_binary": pa.array([b"ab", None], pa.binary(2)),
    "date32": pa.array([dt.date(2020, 1, 1), None]),
    "date64": pa.array([dt.date(2020, 1, 1), None], pa.date64()),
    "time32[s]": pa.array([1, None], pa.time32("s")),
    "time32[ms]": pa.array([1, None], pa.time32("ms")),
    "time64[us]": pa.array([1, None], pa.time64("us")),
    "time64[ns]": pa.array([1, None], pa.time64("ns")),
    "timestamp[s]": pa.array([2**40, None], pa.timestamp("s")),
    "timestamp[ms]": pa.array([1, None], pa.timestamp("ms")),
    "timestamp[us]": pa.array([-(2**60), None], pa.timestamp("us")),
    "timestamp[ns]": pa.array([2**62, None], pa.timestamp("ns")),
    "timestamp[s, tz]": pa.array([2**40, None, -(2**40)], pa.timestamp("s", "America/New_York")),
    "timestamp[ms, tz]": pa.array([2**55, None], pa.timestamp("ms", "+05:30")),
    "timestamp[us, tz]": pa.array([1, None], pa.timestamp("us", "Asia/Tokyo")),
    "timestamp[ns, tz]": pa.array([1, None], pa.timestamp("ns", "Europe/Paris")),
    "duration[s]": pa.array([1, None, -5], pa.duration("s")),
    "duration[ns]": pa.array([2**62, None], pa.duration("ns")),
    **_newer("decimal32", lambda: pa.array([decimal.Decimal("1.23"), None], pa.decimal32(5, 2))),
    "decimal128": pa.array([decimal.Decimal("1.23"), None], pa.decimal128(38, 2)),
    "decimal256": pa.array([decimal.Decimal("1" * 45 + ".23"), None], pa.decimal256(50, 2)),
    "list": pa.array([[1, 2], None, []], pa.list_(pa.int64())),
    "large_list": pa.array([[1, 2], None, []], pa.large_list(pa.int64())),
    "fixed_size_list": pa.array([[1, 2], None], pa.list_(pa.int64(), 2)),
    "list<duration>": pa.array([[1], None], pa.list_(pa.duration("ms"))),
    "struct": pa.array([{"x": 1, "y": "a"}, None]),
    "struct<float16>": pa.array([{"x": np.float16(1.5)}], pa.struct([("x", pa.float16())])),
    "struct case": pa.array([{"a": 1, "A": 2}]),
    "null": pa.array([None, None], pa.null()),
    "dictionary": pa.DictionaryArray.from_arrays(
        pa.array([0, 2, None], pa.int8()), pa.array(["x", "y", "z"])
    ),
    "dictionary ordered": pa.DictionaryArray.from_arrays(
        pa.array([2, None, 2], pa.uint32()), pa.array(["c", "b", "a"]), ordered=True
    ),
    "dictionary<int64>": pa.array([5, 6, 5]).dictionary_encode(),
    "dictionary<large_string>": pa.DictionaryArray.from_arrays(
        pa.array([1], pa.int32()), pa.array(["u", "v"], pa.large_string())
    ),
}

IPC_ARROW = {
    **({} if _casts_to_views() else VIEWS),
    "month_day_nano": pa.array([pa.MonthDayNano([1, 2, 3]), None], pa.month_day_nano_interval()),
    "map": pa.array([[("a", 1), ("a", 2)], None], pa.map_(pa.string(), pa.int64())),
    "union": pa.UnionArray.from_dense(
        pa.array([0, 1], pa.int8()), pa.array([0, 0], pa.int32()), [pa.array([1]), pa.array(["a"])]
    ),
    **_newer(
        "uuid",
        lambda: pa.ExtensionArray.from_storage(
            pa.uuid(), pa.array([b"0" * 16, None], pa.binary(16))
        ),
    ),
    "run_end": pa.RunEndEncodedArray.from_arrays([2, 3], [1, 2]),
    "list<dictionary>": pa.array([["a"], None]).cast(
        pa.list_(pa.dictionary(pa.int32(), pa.string()))
    ),
    "dictionary<duration>": pa.array([1, 1], pa.duration("s")).dictionary_encode(),
    "struct with an empty name": pa.array([{"": 1}]),
    "struct with duplicate names": pa.StructArray.from_arrays(
        [pa.array([1]), pa.array([2])], names=["a", "a"]
    ),
    **_newer("list_view", lambda: pa.array([[1], None], pa.list_view(pa.int64()))),
}


@pytest.mark.parametrize("array", NATIVE_ARROW.values(), ids=NATIVE_ARROW.keys())
def test_arrow_types_duckdb_holds_round_trip_natively(
    duck: duckdb.DuckDBPyConnection, array: pa.Array
) -> None:
    table = pa.table({"c": array, "n": pa.array(range(len(array)))})
    for out in both_ways(duck, table, "arrow"):
        assert_same_table(out, table)


@pytest.mark.parametrize("array", IPC_ARROW.values(), ids=IPC_ARROW.keys())
def test_arrow_types_duckdb_cannot_hold_go_to_arrow_ipc(
    duck: duckdb.DuckDBPyConnection, array: pa.Array
) -> None:
    table = pa.table({"c": array})
    for out in both_ways(duck, table, "arrow_ipc"):
        assert_same_table(out, table)


def test_the_stored_table_of_a_converted_type_is_readable_in_duckdb(
    duck: duckdb.DuckDBPyConnection,
) -> None:
    table = pa.table({"d": pa.array([1500], pa.duration("ms"))})
    payload = encode(table, SIGNER)
    assert isinstance(payload.table, pa.Table)
    assert payload.table.schema.field(0).type == pa.int64()
    assert through_duckdb(duck, payload).table.column(0).to_pylist() == [1500]  # type: ignore[union-attr]


def test_dictionaries_keep_unused_values_order_and_flag(duck: duckdb.DuckDBPyConnection) -> None:
    chunks = [
        pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int16()), pa.array(["b", "a"])),
        pa.DictionaryArray.from_arrays(pa.array([1, None], pa.int16()), pa.array(["c", "a"])),
    ]
    table = pa.table({"c": pa.chunked_array(chunks)})
    for out in both_ways(duck, table, "arrow"):
        assert isinstance(out, pa.Table)
        assert out.column(0).to_pylist() == ["b", "a", "a", None]
        assert out.schema == table.schema
    one = pa.table({"c": chunks[0]})
    for out in both_ways(duck, one, "arrow"):
        assert isinstance(out, pa.Table)
        assert out.column(0).chunk(0).dictionary.to_pylist() == ["b", "a"]


def test_arrow_metadata_nullability_and_odd_names_survive(duck: duckdb.DuckDBPyConnection) -> None:
    schema = pa.schema(
        [
            pa.field("a", pa.int64(), nullable=False, metadata={"unit": "m"}),
            pa.field("A", pa.string()),
            pa.field("a", pa.float64()),
            pa.field("", pa.int8()),
            pa.field('we"ird name', pa.bool_()),
        ],
        metadata={"source": "test"},
    )
    table = pa.Table.from_arrays(
        [
            pa.array([1, 2]),
            pa.array(["x", None]),
            pa.array([0.5, 1.5]),
            pa.array([1, 2], pa.int8()),
            pa.array([True, False]),
        ],
        schema=schema,
    )
    for out in both_ways(duck, table, "arrow"):
        assert_same_table(out, table)


def test_big_chunked_tables_keep_their_rows_in_order(duck: duckdb.DuckDBPyConnection) -> None:
    batches = [
        pa.RecordBatch.from_pydict({"a": np.arange(i, i + 300_000)})
        for i in range(0, 1_200_000, 300_000)
    ]
    table = pa.Table.from_batches(batches)
    for out in both_ways(duck, table, "arrow"):
        assert isinstance(out, pa.Table)
        assert out.equals(table)


@pytest.mark.parametrize(
    "batch",
    [
        pa.RecordBatch.from_pydict({"a": [1, 2], "b": ["x", None]}),
        pa.RecordBatch.from_pydict({"a": pa.array([], pa.int64())}),
        pa.RecordBatch.from_pydict({"d": pa.array(["x"]).dictionary_encode()}),
    ],
    ids=["rows", "empty", "dictionary"],
)
def test_record_batches_round_trip_as_record_batches(
    duck: duckdb.DuckDBPyConnection, batch: pa.RecordBatch
) -> None:
    for out in both_ways(duck, batch, "arrow"):
        assert_same_table(out, batch)


def test_tables_without_columns_go_to_arrow_ipc(duck: duckdb.DuckDBPyConnection) -> None:
    table = pa.table({"a": [1, 2, 3]}).drop_columns(["a"])
    for out in both_ways(duck, table, "arrow_ipc"):
        assert isinstance(out, pa.Table)
        assert out.num_columns == 0 and out.num_rows == 3


def test_a_table_payload_without_its_table_is_damaged() -> None:
    payload = encode(pa.table({"a": [1]}), SIGNER)
    with pytest.raises(StoreFormatError, match=r"^a stored 'arrow' payload is damaged: "):
        decode(Payload("arrow", payload.data, None), SIGNER)
    with pytest.raises(StoreFormatError, match=r"stored table has 2 columns, not 1"):
        decode(Payload("arrow", payload.data, pa.table({"a": [1], "b": [2]})), SIGNER)


# --------------------------------------------------------------------------- pandas

_N = 4
PANDAS_COLUMNS: dict[str, Any] = {
    "int8": pd.Series([1, 2, -3, 4], dtype="int8"),
    "int16": pd.Series([1, 2, 3, 4], dtype="int16"),
    "int32": pd.Series([1, 2, 3, 4], dtype="int32"),
    "int64": pd.Series([1, 2, 3, 2**62], dtype="int64"),
    "uint8": pd.Series([1, 2, 3, 255], dtype="uint8"),
    "uint64": pd.Series([1, 2, 3, 2**64 - 1], dtype="uint64"),
    "float16": pd.Series([1.5, np.nan, 3, -0.0], dtype="float16"),
    "float32": pd.Series([1.5, np.nan, 3, np.inf], dtype="float32"),
    "float64": pd.Series([1.5, np.nan, 3, 5e-324], dtype="float64"),
    "bool": pd.Series([True, False, True, False]),
    "Int64": pd.Series([1, None, 3, 4], dtype="Int64"),
    "Int8": pd.Series([1, None, 3, 4], dtype="Int8"),
    "UInt32": pd.Series([1, None, 3, 4], dtype="UInt32"),
    "Float32": pd.Series([1.5, None, 3, 4], dtype="Float32"),
    "Float64": pd.Series([1.5, None, 3, 4], dtype="Float64"),
    "boolean": pd.Series([True, None, False, True], dtype="boolean"),
    "str": pd.Series(["a", None, "é", ""]),
    "string[pyarrow]": pd.Series(["a", None, "c", ""], dtype="string[pyarrow]"),
    "category": pd.Categorical(["b", "a", None, "b"], categories=["c", "b", "a"]),
    "category ordered": pd.Categorical(
        ["b", "a", None, "a"], categories=["c", "b", "a"], ordered=True
    ),
    "category of ints": pd.Categorical([3, 1, None, 3], categories=[3, 2, 1]),
    "category unused only": pd.Categorical([None] * _N, categories=["x", "y"]),
    "datetime64[ns]": pd.Series(
        pd.to_datetime(["2020-01-01", None, "1677-09-22", "2262-04-11"])
    ).astype("datetime64[ns]"),
    # from numpy with the unit: pandas 2's to_datetime makes nanoseconds, out of these bounds
    "datetime64[us]": pd.Series(
        np.array(["2020-01-01", "NaT", "0001-01-01", "9999-12-31"], "datetime64[us]")
    ),
    "datetime64[s]": pd.Series(
        pd.to_datetime(["2020-01-01", None, "2021-01-01", "1900-01-01"])
    ).astype("datetime64[s]"),
    "datetime64[ms] tz": pd.Series(
        np.array(["2020-01-01", "NaT", "2300-01-01", "1800-01-01"], "datetime64[ms]")
    ).dt.tz_localize("America/New_York"),
    "datetime64[ns] tz": pd.Series(
        pd.to_datetime(["2020-03-29 01:30", None, "2021-01-01 00:00", "2020-01-01 12:00"])
    )
    .astype("datetime64[ns]")
    .dt.tz_localize("Europe/Paris"),
    "datetime64 UTC": pd.Series(
        pd.to_datetime(["2020-01-01", None, "2021-01-01", "2020-01-01"])
    ).dt.tz_localize("UTC"),
    "datetime64 fixed offset": pd.Series(
        pd.to_datetime(["2020-01-01", None, "2021-01-01", "2020-01-01"])
    ).dt.tz_localize(dt.timezone(dt.timedelta(hours=5, minutes=30))),
    "timedelta64[ns]": pd.Series(pd.to_timedelta([1, None, -2, 10**9], unit="s")).astype(
        "timedelta64[ns]"
    ),
    "timedelta64[us]": pd.Series(pd.to_timedelta([1, None, -2, 10**9], unit="s")).astype(
        "timedelta64[us]"
    ),
    "timedelta64[s]": pd.Series(pd.to_timedelta([1, None, -2, 10**9], unit="s")).astype(
        "timedelta64[s]"
    ),
}


@pytest.mark.parametrize("column", PANDAS_COLUMNS.values(), ids=PANDAS_COLUMNS.keys())
def test_pandas_column_dtypes_round_trip_natively(
    duck: duckdb.DuckDBPyConnection, column: Any
) -> None:
    df = pd.DataFrame({"c": column, "n": range(_N)})
    for out in both_ways(duck, df, "pandas"):
        assert_same_frame(out, df)


def test_pandas_all_dtypes_in_one_frame(duck: duckdb.DuckDBPyConnection) -> None:
    df = pd.DataFrame(PANDAS_COLUMNS)
    for out in both_ways(duck, df, "pandas"):
        assert_same_frame(out, df)


_BASE = {"x": [1, 2, 3], "y": ["a", "b", None]}
PANDAS_SHAPES: dict[str, pd.DataFrame] = {
    "RangeIndex(5, 11, 2)": pd.DataFrame(_BASE, index=pd.RangeIndex(5, 11, 2)),
    "named RangeIndex": pd.DataFrame(_BASE, index=pd.RangeIndex(3, name="r")),
    "named int index": pd.DataFrame(_BASE, index=pd.Index([10, 20, 30], name="k")),
    "str index": pd.DataFrame(_BASE, index=pd.Index(["p", "q", "r"])),
    "float index with NaN": pd.DataFrame(_BASE, index=[1.5, 2.5, np.nan]),
    "MultiIndex": pd.DataFrame(
        _BASE, index=pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)], names=["l1", "l2"])
    ),
    "MultiIndex without names": pd.DataFrame(
        _BASE, index=pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)])
    ),
    "DatetimeIndex with freq": pd.DataFrame(
        _BASE, index=pd.date_range("2020", periods=3, freq="D")
    ),
    "DatetimeIndex tz freq": pd.DataFrame(
        _BASE, index=pd.date_range("2020", periods=3, freq="2h", tz="Asia/Tokyo", name="t")
    ),
    "DatetimeIndex business days": pd.DataFrame(
        _BASE, index=pd.bdate_range("2020-01-03", periods=3)
    ),
    "TimedeltaIndex with freq": pd.DataFrame(
        _BASE, index=pd.timedelta_range("1s", periods=3, freq="s")
    ),
    "CategoricalIndex": pd.DataFrame(
        _BASE, index=pd.CategoricalIndex(["a", "b", "a"], categories=["b", "a", "z"])
    ),
    "index named like a column": pd.DataFrame(_BASE, index=pd.Index([1, 2, 3], name="x")),
    "RangeIndex columns": pd.DataFrame(np.arange(6).reshape(3, 2)),
    "named RangeIndex columns": pd.DataFrame(np.arange(6).reshape(3, 2)).rename_axis(
        columns="cols"
    ),
    "MultiIndex columns": pd.DataFrame(
        [[1, 2], [3, 4]], columns=pd.MultiIndex.from_tuples([("a", "x"), ("a", "y")])
    ),
    "named columns axis": pd.DataFrame(_BASE).rename_axis(columns="cn"),
    "attrs": pd.DataFrame(_BASE).pipe(lambda d: (d.attrs.update({"src": "x", "n": [1]}), d)[1]),
    "empty with typed columns": pd.DataFrame(
        {"a": pd.Series([], dtype="int64"), "b": pd.Series([], dtype="str")}
    ),
    "empty with categorical": pd.DataFrame({"a": pd.Categorical([], categories=["p", "q"])}),
    "index but no columns": pd.DataFrame(index=pd.Index([1, 2], name="i")),
}


@pytest.mark.parametrize("df", PANDAS_SHAPES.values(), ids=PANDAS_SHAPES.keys())
def test_pandas_indexes_labels_and_empty_frames_round_trip(
    duck: duckdb.DuckDBPyConnection, df: pd.DataFrame
) -> None:
    for out in both_ways(duck, df, "pandas"):
        assert_same_frame(out, df)


@pytest.mark.parametrize(
    "df",
    [pd.DataFrame(), pd.DataFrame(index=pd.RangeIndex(3))],
    ids=["no columns", "RangeIndex only"],
)
def test_pandas_frames_without_any_table_column_use_arrow_ipc(
    duck: duckdb.DuckDBPyConnection, df: pd.DataFrame
) -> None:
    for out in both_ways(duck, df, "arrow_ipc"):
        assert_same_frame(out, df)


PANDAS_PICKLED: dict[str, pd.DataFrame] = {
    "object column": pd.DataFrame({"o": pd.Series([{"a": 1}, None], dtype=object)}),
    "object str column with NaN": pd.DataFrame({"o": pd.Series(["a", np.nan], dtype=object)}),
    "object column of str subclasses": pd.DataFrame({"o": pd.Series([np.str_("a")], dtype=object)}),
    "string[python]": pd.DataFrame({"s": pd.Series(["a", None], dtype="string[python]")}),
    "ArrowDtype": pd.DataFrame(
        {"s": pd.Series([[1], None], dtype=pd.ArrowDtype(pa.list_(pa.int64())))}
    ),
    "period": pd.DataFrame({"p": pd.period_range("2020-01", periods=2, freq="M")}),
    "interval": pd.DataFrame({"i": pd.interval_range(0, 2)}),
    "sparse": pd.DataFrame({"s": pd.arrays.SparseArray([0, 1])}),
    "complex": pd.DataFrame({"c": [1j, 2j]}),
    "int column labels": pd.DataFrame({3: [1], 8: [2], 4: [3]}),
    "mixed column labels": pd.DataFrame({0: [1], "a": [2]}),
    "bool column labels": pd.DataFrame({True: [1], False: [2]}),
    "duplicate column labels": pd.DataFrame([[1, 2]], columns=["a", "a"]),
    "int index name": pd.DataFrame({"a": [1]}, index=pd.Index([0], name=0)),
    # pyarrow's own name for an unnamed index level: pyarrow 16-17 mix the two up
    "column named like an index level": pd.DataFrame({"__index_level_0__": [1, 2]}, index=[5, 6]),
    "timestamp column labels": pd.DataFrame([[1]], columns=pd.to_datetime(["2020-01-01"])),
    "object index": pd.DataFrame({"a": [1, 2]}, index=pd.Index([1, "x"], dtype=object)),
    "period index": pd.DataFrame({"a": [1, 2]}, index=pd.period_range("2020", periods=2, freq="Y")),
    "attrs not JSON": pd.DataFrame({"a": [1]}).pipe(
        lambda d: (d.attrs.update({"t": (1, 2)}), d)[1]
    ),
    "custom business day freq": pd.DataFrame(
        {"a": [1, 2]},
        index=pd.date_range(
            "2020-01-01", periods=2, freq=pd.offsets.CustomBusinessDay(holidays=["2020-01-02"])
        ),
    ),
    "duplicate labels disallowed": pd.DataFrame({"a": [1]}).set_flags(
        allows_duplicate_labels=False
    ),
}


PANDAS_2 = int(pd.__version__.split(".")[0]) < 3
PANDAS_OBJECT_STRINGS: dict[str, pd.DataFrame] = {
    "object str column": pd.DataFrame({"o": pd.Series(["a", None, "é"], dtype=object)}),
    "all None": pd.DataFrame({"o": pd.Series([None, None], dtype=object)}),
    "empty object columns": pd.DataFrame(columns=["a", "b"]).astype(object),
    "str index": pd.DataFrame({"a": [1, 2]}, index=pd.Index(["x", "y"], dtype=object)),
    "MultiIndex of str": pd.DataFrame(
        {"a": [1, 2]},
        index=pd.MultiIndex.from_arrays(
            [pd.Index(["x", "y"], dtype=object), [1, 2]], names=["k", None]
        ),
    ),
    "categories of str": pd.DataFrame(
        {"c": pd.Categorical(["b", None, "a"], categories=pd.Index(["a", "b"], dtype=object))}
    ),
}


@pytest.mark.parametrize("df", PANDAS_OBJECT_STRINGS.values(), ids=PANDAS_OBJECT_STRINGS.keys())
def test_pandas_object_str_columns_are_native_tables_under_pandas_2(
    duck: duckdb.DuckDBPyConnection, df: pd.DataFrame
) -> None:
    """pandas 2 makes string columns ``object``: a native table, read back as the same
    ``object`` column with ``None`` as None. pandas 3 reads strings back as its ``str``
    dtype, so there an ``object`` column (rare: its strings are ``str``) is pickled."""
    if PANDAS_2:
        outs = both_ways(duck, df, "pandas")
    else:
        payload = encode(df, SIGNER)
        assert payload.codec == "pickle"
        outs = [decode(payload, SIGNER)]
    for out in outs:
        assert_same_frame(out, df)
        assert isinstance(out, pd.DataFrame)
        for i, dtype in enumerate(df.dtypes):
            if pd.api.types.is_object_dtype(dtype):
                assert [type(v) for v in out.iloc[:, i]] == [type(v) for v in df.iloc[:, i]]


def test_a_plain_frame_of_strings_is_a_native_table_under_every_pandas(
    duck: duckdb.DuckDBPyConnection,
) -> None:
    df = pd.DataFrame({"a": [1, 2, 3], "s": ["x", "y", "z"]})
    for out in both_ways(duck, df, "pandas"):
        assert_same_frame(out, df)


@pytest.mark.parametrize("df", PANDAS_PICKLED.values(), ids=PANDAS_PICKLED.keys())
def test_pandas_frames_arrow_cannot_rebuild_go_to_pickle(df: pd.DataFrame) -> None:
    payload = encode(df, SIGNER)
    assert payload.codec == "pickle"
    assert_same_frame(decode(payload, SIGNER), df)


def test_pandas_subclass_goes_to_pickle() -> None:
    payload = encode(SubFrame({"a": [1]}), SIGNER)
    assert payload.codec == "pickle"
    assert type(decode(payload, SIGNER)) is SubFrame


class SubFrame(pd.DataFrame):
    pass


PANDAS_SERIES: dict[str, pd.Series] = {
    "named": pd.Series([1, 2, 3], name="s"),
    "unnamed": pd.Series([1.5, None, 3.0]),
    "int name": pd.Series(["a", "b"], name=7),
    "float name": pd.Series(["a", "b"], name=1.5),
    "name like the storage column": pd.Series([1], name="__durable_nb_series__"),
    "categorical": pd.Series(
        pd.Categorical(["x", None], categories=["y", "x"], ordered=True), name="c"
    ),
    "datetime index": pd.Series(
        [1, 2, 3], index=pd.date_range("2020", periods=3, freq="W"), name="w"
    ),
    "tz values": pd.Series(pd.date_range("2020", periods=2, tz="UTC")),
    "MultiIndex": pd.Series([1, 2], index=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)])),
    "empty": pd.Series([], dtype="Int64", name="e"),
    "attrs": pd.Series([1]).pipe(lambda s: (s.attrs.update({"k": "v"}), s)[1]),
}


@pytest.mark.parametrize("series", PANDAS_SERIES.values(), ids=PANDAS_SERIES.keys())
def test_pandas_series_round_trip(duck: duckdb.DuckDBPyConnection, series: pd.Series) -> None:
    for out in both_ways(duck, series, "pandas"):
        assert_same_series(out, series)


@pytest.mark.parametrize(
    "series",
    [pd.Series([1], name=("a", "b")), pd.Series([object()]), pd.Series([1j])],
    ids=["tuple name", "object", "complex"],
)
def test_pandas_series_arrow_cannot_rebuild_go_to_pickle(series: pd.Series) -> None:
    payload = encode(series, SIGNER)
    assert payload.codec == "pickle"
    out = decode(payload, SIGNER)
    assert type(out) is pd.Series and out.name == series.name


def test_decoded_frames_are_independent(duck: duckdb.DuckDBPyConnection) -> None:
    df = pd.DataFrame({"a": [1, 2, 3]})
    payload = encode(df, SIGNER)
    first = decode(payload, SIGNER)
    assert isinstance(first, pd.DataFrame)
    first.loc[0, "a"] = 99
    assert_same_frame(decode(payload, SIGNER), df)
    assert df.loc[0, "a"] == 1


def test_the_stored_table_is_a_snapshot_of_the_frame() -> None:
    df = pd.DataFrame({"a": np.arange(3), "b": np.arange(3.0)})
    payload = encode(df, SIGNER)
    df.loc[0, "a"] = 99
    df.iloc[1, 1] = -1.0
    assert_same_frame(
        decode(payload, SIGNER), pd.DataFrame({"a": np.arange(3), "b": np.arange(3.0)})
    )

    values = np.arange(3)
    series = pd.Series(values, copy=False)
    payload = encode(series, SIGNER)
    values[0] = 42
    assert decode(payload, SIGNER).tolist() == [0, 1, 2]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- polars

POLARS_COLUMNS: dict[str, pl.Series] = {
    "Int8": pl.Series([1, None, 3], dtype=pl.Int8),
    "UInt64": pl.Series([1, None, 2**64 - 1], dtype=pl.UInt64),
    "Float16": pl.Series([1.5, None, 2.0], dtype=pl.Float16),
    "Float32": pl.Series([1.5, None, float("nan")], dtype=pl.Float32),
    "Boolean": pl.Series([True, None, False]),
    "String": pl.Series(["a", None, "é"]),
    "Binary": pl.Series([b"a", None, b""]),
    "Categorical": pl.Series(["b", "a", None], dtype=pl.Categorical),
    "Enum": pl.Series(["b", None, "b"], dtype=pl.Enum(["c", "b", "a"])),
    "Date": pl.Series([dt.date(2020, 1, 1), None, dt.date(1, 1, 1)]),
    "Datetime us": pl.Series([dt.datetime(2020, 1, 1), None, dt.datetime(2020, 1, 2)]),
    "Datetime ns": pl.Series([dt.datetime(2020, 1, 1), None, dt.datetime(2020, 1, 2)]).cast(
        pl.Datetime("ns")
    ),
    "Datetime ms tz": pl.Series([dt.datetime(2020, 1, 1), None, dt.datetime(2400, 1, 2)])
    .cast(pl.Datetime("ms"))
    .dt.replace_time_zone("Asia/Tokyo"),
    "Datetime ns tz": pl.Series([dt.datetime(2020, 1, 1), None, dt.datetime(2020, 1, 2)])
    .cast(pl.Datetime("ns"))
    .dt.replace_time_zone("Europe/Paris"),
    "Duration": pl.Series([dt.timedelta(1), None, dt.timedelta(seconds=-1)]),
    "Duration ns": pl.Series([dt.timedelta(1), None, dt.timedelta(0)]).cast(pl.Duration("ns")),
    "Time": pl.Series([dt.time(1), None, dt.time(23, 59, 59, 999999)]),
    "Decimal": pl.Series(
        [decimal.Decimal("1.5"), None, decimal.Decimal("2.25")], dtype=pl.Decimal(10, 2)
    ),
    "List": pl.Series([[1], None, [2, 3]]),
    "List(Duration)": pl.Series([[dt.timedelta(1)], None, []]),
    "Array": pl.Series([[1, 2], None, [2, 3]], dtype=pl.Array(pl.Int64, 2)),
    "Struct": pl.Series([{"a": 1, "b": "x"}, None, {"a": 2, "b": None}]),
    "Null": pl.Series([None, None, None], dtype=pl.Null),
}


@pytest.mark.parametrize("column", POLARS_COLUMNS.values(), ids=POLARS_COLUMNS.keys())
def test_polars_dtypes_round_trip_natively(
    duck: duckdb.DuckDBPyConnection, column: pl.Series
) -> None:
    df = pl.DataFrame({"c": column, "n": [0, 1, 2]})
    for out in both_ways(duck, df, "polars"):
        assert_same_polars(out, df)


def test_polars_all_dtypes_in_one_frame(duck: duckdb.DuckDBPyConnection) -> None:
    df = pl.DataFrame({name: s for name, s in POLARS_COLUMNS.items()})
    for out in both_ways(duck, df, "polars"):
        assert_same_polars(out, df)


def test_polars_odd_column_names(duck: duckdb.DuckDBPyConnection) -> None:
    df = pl.DataFrame({"": [1], "a": [2], "A": [3], "column_0": [4]})
    for out in both_ways(duck, df, "polars"):
        assert_same_polars(out, df)


def test_polars_enum_keeps_unused_categories(duck: duckdb.DuckDBPyConnection) -> None:
    df = pl.DataFrame({"e": pl.Series(["a"], dtype=pl.Enum(["z", "a", "m"]))})
    for out in both_ways(duck, df, "polars"):
        assert isinstance(out, pl.DataFrame)
        assert out.schema["e"] == pl.Enum(["z", "a", "m"])


@pytest.mark.parametrize(
    "series",
    [pl.Series("s", [1, None]), pl.Series("", ["a"]), pl.Series("e", [], dtype=pl.Categorical)],
    ids=["named", "empty name", "empty categorical"],
)
def test_polars_series_round_trip(duck: duckdb.DuckDBPyConnection, series: pl.Series) -> None:
    for out in both_ways(duck, series, "polars"):
        assert type(out) is pl.Series
        plt.assert_series_equal(out, series, check_exact=True)


def test_polars_empty_frames(duck: duckdb.DuckDBPyConnection) -> None:
    schema_only = pl.DataFrame(schema={"a": pl.Int32, "b": pl.Enum(["x"])})
    for out in both_ways(duck, schema_only, "polars"):
        assert_same_polars(out, schema_only)
    for out in both_ways(duck, pl.DataFrame(), "arrow_ipc"):
        assert_same_polars(out, pl.DataFrame())


def test_polars_nested_categoricals_use_arrow_ipc(duck: duckdb.DuckDBPyConnection) -> None:
    df = pl.DataFrame({"l": pl.Series([["a"], None, ["b", "a"]], dtype=pl.List(pl.Categorical))})
    for out in both_ways(duck, df, "arrow_ipc"):
        assert_same_polars(out, df)


def test_polars_frames_without_an_arrow_form_go_to_pickle() -> None:
    df = pl.DataFrame({"i": pl.Series([1, None], dtype=pl.Int128)})
    payload = encode(df, SIGNER)
    assert payload.codec == "pickle"
    assert_same_polars(decode(payload, SIGNER), df)


def test_polars_object_columns_are_refused() -> None:
    df = pl.DataFrame({"o": pl.Series([object(), None], dtype=pl.Object)})
    with pytest.raises(
        UnstorableValueError,
        match=r"(?s)^cannot store the result shape: .*: a polars\.dataframe\.frame\.DataFrame has "
        r"no codec that keeps it exactly .*pickling failed \(ComputeError: ",
    ):
        encode(df, SIGNER)


# --------------------------------------------------------------------------- signing

INTEGRITY = (
    r"^refusing to unpickle a stored pickled value \(\d+ bytes, starting b.*\): its signature "
    r"does not match the store's key; it was written by another key or tampered with — open "
    r"the store with the key that wrote it, or forget this entry so that it is computed again$"
)

_unpickled: list[str] = []


class Tripwire:
    """Records it was unpickled: a forged pickle could run anything instead."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_unpickled.append, ("tripwire",))


def test_pickles_are_signed_and_verified() -> None:
    payload = encode((1, 2), SIGNER)
    assert payload.codec == "pickle"
    assert payload.data[32:] == pickle.dumps((1, 2), protocol=5)
    assert decode(payload, Signer(b"k" * 32)) == (1, 2)


@pytest.mark.parametrize(
    "forge",
    [
        lambda p: p.data[:40] + bytes([p.data[40] ^ 1]) + p.data[41:],
        lambda p: bytes([p.data[0] ^ 1]) + p.data[1:],
        lambda p: pickle.dumps(Tripwire(), protocol=5),
        lambda p: p.data[:10],
        lambda p: b"",
        lambda p: Signer(b"another key, 16+ bytes").sign(pickle.dumps(Tripwire())),
    ],
    ids=["tampered data", "tampered mac", "unsigned", "truncated", "empty", "other key"],
)
def test_unsigned_tampered_or_foreign_pickles_are_refused_unread(forge: Any) -> None:
    _unpickled.clear()
    payload = encode(Tripwire(), SIGNER)
    forged = Payload("pickle", forge(payload))
    with pytest.raises(PayloadIntegrityError, match=INTEGRITY):
        decode(forged, SIGNER)
    assert _unpickled == []


def test_tampered_error_payloads_are_refused() -> None:
    payload = encode_error(ValueError("x"), SIGNER)
    with pytest.raises(
        PayloadIntegrityError, match=r"^refusing to unpickle a stored error \(\d+ bytes"
    ):
        decode_error(Payload("error", payload.data[:-1] + b"!"), SIGNER)


def test_signer_keys_are_validated() -> None:
    with pytest.raises(
        ArgumentError,
        match=r"^the signing key must be at least 16 bytes long, got 5 bytes \(b'short'\); use ",
    ):
        Signer(b"short")
    with pytest.raises(ArgumentTypeError, match=r"^the signing key must be bytes, got str 'k+'"):
        Signer("k" * 32)  # type: ignore[arg-type]
    assert "kkkk" not in repr(SIGNER)


def test_long_keys_work_and_differ() -> None:
    a, b = Signer(b"a" * 100), Signer(b"a" * 99 + b"b")
    signed = a.sign(b"data")
    assert a.verify(signed) == b"data"
    with pytest.raises(PayloadIntegrityError):
        b.verify(signed)


# --------------------------------------------------------------------------- unpicklable values


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (lambda: 1, "function"),
        (threading.Lock(), "_thread.lock"),
        ((x for x in []), "generator"),
        (memoryview(b"x"), "memoryview"),
    ],
    ids=["lambda", "lock", "generator", "memoryview"],
)
def test_unpicklable_values_are_refused_with_advice(value: object, type_name: str) -> None:
    pattern = (
        rf"^cannot store the result of fetch .+: a {re.escape(type_name)} has no codec that keeps "
        r"it exactly \(JSON, bytes, numpy, Arrow tables\), so it must be pickled, and pickling "
        r"failed \(\w+: .+\); return "
        r"plain data \(dicts, lists, str, numbers\), an array or a DataFrame instead, or make "
        rf"{re.escape(type_name)} picklable \(define it at module level, or give it __reduce__\)$"
    )
    with pytest.raises(UnstorableValueError, match=pattern):
        encode(value, SIGNER, what="the result of fetch")


def test_what_defaults_to_result() -> None:
    with pytest.raises(UnstorableValueError, match=r"^cannot store the result <function "):
        encode(lambda: 1, SIGNER)
    with pytest.raises(UnstorableValueError, match=r"^cannot store the variable 'x' \["):
        encode([lambda: 1], SIGNER, what="variable 'x'")


def test_unknown_codecs_are_refused() -> None:
    with pytest.raises(
        StoreFormatError, match=r"^unknown payload codec 'zstd': .* upgrade durable_nb"
    ):
        decode(Payload("zstd", b""), SIGNER)


def test_a_pickle_of_a_class_that_is_gone_is_a_clear_error() -> None:
    data = pickle.dumps(MyInt(1), protocol=5).replace(b"MyInt", b"MyIny")
    with pytest.raises(
        StoreFormatError, match=r"^cannot unpickle a stored value \(AttributeError: "
    ):
        decode(Payload("pickle", SIGNER.sign(data)), SIGNER)


# --------------------------------------------------------------------------- errors


class AppError(Exception):
    pass


class TwoArgError(Exception):
    """Pickle calls cls(*args), which this __init__ refuses: the type is rebuilt instead."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class DescribedError(Exception):
    def __init__(self, lock: Any) -> None:
        super().__init__("needs a lock", lock)
        self.lock = lock
        self.where = "here"

    def __str__(self) -> str:
        return f"failed at {self.where}"


def _raised(exc: BaseException) -> BaseException:
    def inner() -> None:
        raise exc

    try:
        inner()
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


ERRORS: list[BaseException] = [
    ValueError("bad value"),
    KeyError("k"),
    OSError(2, "No such file"),
    FileNotFoundError(2, "gone", "/x"),
    AppError("custom", 1),
    KeyboardInterrupt(),
]
if sys.version_info >= (3, 11):
    import builtins

    ERRORS.append(builtins.ExceptionGroup("many", [ValueError("a"), AppError("b")]))


@pytest.mark.parametrize("exc", ERRORS, ids=repr)
def test_errors_round_trip_with_type_and_message(exc: BaseException) -> None:
    raised = _raised(exc)
    payload = encode_error(raised, SIGNER)
    assert payload.codec == "error" and payload.table is None
    out = decode_error(payload, SIGNER)
    assert type(out) is type(exc)
    assert str(out) == str(exc) and repr(out.args) == repr(exc.args)
    assert out is not exc
    tb = getattr(out, TRACEBACK_ATTR)
    assert "in inner" in tb
    assert "".join(traceback.format_exception_only(type(exc), exc)).strip() in tb
    if sys.version_info >= (3, 11):
        assert any("the original failure was" in note for note in out.__notes__)


def test_decode_returns_the_exception_of_an_error_payload() -> None:
    out = decode(encode_error(ValueError("v"), SIGNER), SIGNER)
    assert type(out) is ValueError and str(out) == "v"


def test_traceback_text_includes_the_chain() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise AppError("outer") from e
    except AppError as exc:
        out = decode_error(encode_error(exc, SIGNER), SIGNER)
    tb = getattr(out, TRACEBACK_ATTR)
    assert "KeyError: 'inner'" in tb and "direct cause" in tb and "AppError: outer" in tb


def test_errors_pickle_cannot_rebuild_keep_their_type_message_and_state() -> None:
    exc = _raised(TwoArgError(404, "missing"))
    out = decode_error(encode_error(exc, SIGNER), SIGNER)
    assert type(out) is TwoArgError
    assert str(out) == "404: missing" and out.args == ("404: missing",)
    assert out.code == 404  # type: ignore[attr-defined]

    exc = _raised(DescribedError(threading.Lock()))
    out = decode_error(encode_error(exc, SIGNER), SIGNER)
    assert type(out) is DescribedError
    assert str(out) == "failed at here"
    assert not hasattr(out, "lock")


def test_errors_whose_class_cannot_be_found_become_recorded_errors() -> None:
    class LocalError(Exception):
        pass

    out = decode_error(encode_error(_raised(LocalError("boom")), SIGNER), SIGNER)
    assert type(out) is RecordedError
    assert re.match(
        r"^the recorded error test_codecs\.test_errors_whose_class_cannot_be_found_become_recorded"
        r"_errors\.<locals>\.LocalError\('boom'\) cannot be rebuilt here: LookupError: it was "
        r"defined inside a function; define the exception class at module level in an importable "
        r"module so that it can be replayed as itself \(the original traceback is in "
        r"\.durable_traceback\)$",
        str(out).replace("tests.test_codecs", "test_codecs"),
    )
    assert out.message == "boom"
    assert "LocalError: boom" in getattr(out, TRACEBACK_ATTR)

    ghost = type("Ghost", (Exception,), {"__module__": "no_such_module_for_durable_nb"})
    out = decode_error(encode_error(ghost("who"), SIGNER), SIGNER)
    assert type(out) is RecordedError
    assert out.original_type == "no_such_module_for_durable_nb.Ghost"
    assert "ModuleNotFoundError" in str(out)


def test_recorded_errors_replay_as_themselves() -> None:
    class LocalError(Exception):
        pass

    first = decode_error(encode_error(_raised(LocalError("boom")), SIGNER), SIGNER)
    again = decode_error(encode_error(first, SIGNER), SIGNER)
    assert type(again) is RecordedError
    assert str(again) == str(first)
    assert isinstance(first, RecordedError) and isinstance(again, RecordedError)
    assert (again.original_type, again.message) == (first.original_type, first.message)


def test_decode_error_refuses_other_payloads() -> None:
    with pytest.raises(
        ArgumentError, match=r"^decode_error\(\) takes an 'error' payload, got codec 'json'"
    ):
        decode_error(encode(1, SIGNER), SIGNER)
    with pytest.raises(
        ArgumentTypeError, match=r"^encode_error\(\) takes an exception, got str 'x'"
    ):
        encode_error("x", SIGNER)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lazy imports


def test_importing_and_using_codecs_loads_no_heavy_module() -> None:
    code = """
import sys
import durable_nb._codecs as c
s = c.Signer(b"k" * 32)
for v in (1, "x", {"a": [1.5, None]}, (1, 2), b"x"):
    assert c.decode(c.encode(v, s), s) == v
heavy = sorted(m for m in ("numpy", "pandas", "pyarrow", "polars", "duckdb") if m in sys.modules)
print(",".join(heavy))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_benchmark_runs_on_a_small_frame() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_codecs", ROOT / "benchmarks" / "bench_codecs.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(n_rows=20_000, repeats=1)
    assert {row["unit"] for row in rows} == {"MB", "MB/s", "us"}
    assert all(row["value"] > 0 for row in rows)
    assert any(row["name"] == "DuckDB native table (pandas codec): load" for row in rows)
