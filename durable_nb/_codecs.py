"""How results and errors are stored, by type.

``encode`` turns a value into a :class:`Payload` (a codec name, bytes, and for tables an
Arrow table the store keeps natively); ``decode`` turns it back into a value of the exact
same type. Pickle is the last resort, and every pickle is signed by a :class:`Signer` and
verified before it is unpickled.

Codecs
------
``json``
    ``None``, ``bool``, ``int``, finite ``float``, ``str``, and lists and ``str``-keyed
    dicts of them, checked by exact type so that decoding gives back the same value:
    tuples, non-``str`` keys, NaN and infinities, ``int``/``float``/``str`` subclasses
    (``IntEnum``, ``numpy.float64``) and ints too long for ``repr`` go to pickle.
``bytes``
    ``bytes`` and ``bytearray``, raw, after one tag byte that says which.
``numpy``
    an ``ndarray`` (exact type) or numpy scalar whose dtype is a plain, fixed-size,
    non-object dtype (bool, ints, floats, complex, datetime64, timedelta64, fixed-width
    bytes/str): a small header (kind, memory order, dtype string, shape) and the raw
    buffer. Object, structured and ``StringDType`` arrays, and subclasses, go to pickle.
``arrow`` / ``pandas`` / ``polars``
    a pyarrow ``Table`` or ``RecordBatch``, a pandas ``DataFrame`` or ``Series``, a
    polars ``DataFrame`` or ``Series``. ``Payload.table`` is an Arrow table for the store
    to keep as a native table; ``Payload.data`` holds what is needed to rebuild the exact
    value from whatever compatible table the store gives back: the serialized Arrow schema
    (with its pandas / polars metadata), the dictionary (category) values, and a JSON
    header (the kind of value, a RangeIndex of column labels, a DatetimeIndex frequency,
    a Series name). A pandas frame is copied first: Arrow would share its numpy buffers,
    which pandas writes into in place, and the stored table must stay the returned value.
``arrow_ipc``
    a table-like value with a column type that a DuckDB table cannot hold exactly (see
    below): the whole value as an Arrow IPC stream in ``data``, ``table=None``.
``pickle``
    everything else: pickle protocol 5, signed.
``error``
    an exception, signed: the pickled exception when it unpickles to its own type, plus
    its module, qualname, message, args, picklable attributes and formatted traceback, so
    that :func:`decode_error` can rebuild the type without pickle, or else return a
    :class:`RecordedError` naming it.

pandas frames are stored natively only when every column and index level has a dtype
whose Arrow round trip is exact: numpy bool/int/uint/float/datetime64/timedelta64, the
nullable ``Int*``/``UInt*``/``Float*``/``boolean`` dtypes, ``str`` and
``string[pyarrow]``, timezone-aware datetimes, and categoricals of those; under pandas 2
(without ``future.infer_string``) also ``object`` columns whose values are all exactly
``str`` or ``None`` (pandas 2's string columns), which pandas 2 reads back as the same
``object`` columns. Column labels must be ``str`` (or tuples of ``str`` for MultiIndex
columns, and not pyarrow's own ``__index_level_N__``) or a ``RangeIndex``; index and
column-axis names ``str`` or ``None``; ``attrs`` plain JSON. Anything else (other object
columns, ``string[python]``, ``ArrowDtype``, periods, intervals, sparse, non-``str``
labels, duplicate labels, subclasses) is pickled, because pyarrow would not rebuild it
exactly. What ``to_pandas`` gives pandas 2 back differently is put right on decode:
``string[pyarrow]`` storage, ``datetime.timezone`` offsets (pyarrow makes pytz ones) and
``attrs`` (pyarrow before 17 drops them).

DuckDB and Arrow types (measured with DuckDB 2.0, pyarrow 26; DuckDB 1.1-1.5, pyarrow 16)
-------------------------------------------------------------------------------------------
A store writes ``Payload.table`` with ``CREATE TABLE ... AS SELECT * FROM <arrow>`` and
reads it back with ``to_arrow_table()``; the table must be read back in insertion order.
``decode`` renames the columns positionally (DuckDB renames duplicate or empty names,
``a``/``A`` -> ``A_1``, ``""`` -> ``v0``) and casts each column to the saved type, so the
store may hand back any of these compatible types:

- kept as is: bool, (u)int8-64, float32/64 (NaN, -0.0), string, binary, date32,
  timestamp[s/ms/us/ns] naive, timestamp[us] with a time zone, time64[us], decimal128,
  list, fixed_size_list, struct, null (DuckDB 1.x gives it back as int32, all null);
- read back as another type and cast back exactly: large_string -> string, large_binary
  and fixed_size_binary -> binary, date64 -> date32,
  time32 -> time64[us], decimal32/64 -> decimal128, large_list -> list, any time zone ->
  ``Etc/UTC`` (the instant is kept); schema and field metadata (pandas and polars keep
  theirs there) and non-null flags are dropped and restored from the saved schema;
- dictionary (pandas categorical, polars Categorical/Enum) -> its value type: the
  dictionary values, their order and the ``ordered`` flag are lost, so ``data`` keeps the
  dictionary and ``decode`` re-encodes the column against it;
- stored as another type by ``encode`` (``Payload.table`` differs from the value):
  float16 (unsupported) -> float32; duration (read back as an interval that cannot be
  cast back) and time64[ns] (DuckDB 1.x keeps microseconds) -> int64; decimal256
  (unsupported) -> string; timestamp[s/ms/ns] with a time zone (converted to
  microseconds, overflowing far dates or dropping nanoseconds) -> the naive timestamp of
  the same instant in UTC; string_view and binary_view (DuckDB 1.x has no binary_view)
  -> string and binary where pyarrow casts back to views (not 16-17: there Arrow IPC);
- column names that collide without case (``a`` and ``A``; DuckDB 1.x refuses to scan
  them) are stored as ``c0``, ``c1``, ...;
- not stored natively, so the value goes to ``arrow_ipc``: month_day_nano and other
  intervals (nanoseconds dropped), map (DuckDB refuses duplicate keys), unions, run-end
  encoded, list views, extension types (uuid, pandas period/interval), dictionaries
  nested in other types or over a value type that needs one of the conversions above,
  struct fields with empty or duplicate names (cast back matches fields by name), and
  tables without columns (DuckDB refuses them).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import io
import json
import json.scanner
import math
import pickle
import reprlib
import struct
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from ._arrow_ipc import ipc_bytes, read_ipc
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableError,
    PayloadIntegrityError,
    StoreFormatError,
    UnstorableValueError,
)

__all__ = [
    "CODECS",
    "PICKLE_PROTOCOL",
    "TEXT_ERROR_PREFIX",
    "TRACEBACK_ATTR",
    "Payload",
    "RecordedError",
    "Signer",
    "decode",
    "decode_error",
    "describe_error",
    "encode",
    "encode_error",
    "is_table_codec",
]

CODECS: Final = frozenset(
    {"json", "bytes", "numpy", "arrow", "pandas", "polars", "arrow_ipc", "pickle", "error"}
)
_TABLE_CODECS: Final = frozenset({"arrow", "pandas", "polars"})
PICKLE_PROTOCOL: Final = 5
#: The attribute a decoded exception carries with the traceback text of the original failure.
TRACEBACK_ATTR: Final = "durable_traceback"


@dataclass(frozen=True, slots=True)
class Payload:
    """A value as a store keeps it.

    ``codec`` names the encoding (see the module docstring). ``data`` is the encoded
    bytes; for the table codecs (``is_table_codec(codec)``) it is the metadata needed to
    rebuild the exact value, and ``table`` is a ``pyarrow.Table`` the store keeps natively
    (the DuckDB store writes it as a table, the memory store keeps the object). For every
    other codec ``table`` is ``None``.
    """

    codec: str
    data: bytes
    table: object | None = None


def is_table_codec(codec: str) -> bool:
    """Whether payloads of this codec carry an Arrow ``table`` the store must keep."""
    return codec in _TABLE_CODECS


# --------------------------------------------------------------------------- signing

_MAC_SIZE: Final = 32
_MIN_KEY: Final = 16
_BLAKE2B_MAX_KEY: Final = 64


class Signer:
    """Signs and verifies pickled bytes with a secret key (keyed BLAKE2b, 32-byte MAC).

    Keyed BLAKE2b is a MAC by design (no HMAC construction needed). It was chosen over
    HMAC-SHA256 because most pickled results are small: 0.4 us against 1.3 us for 100
    bytes here, while both run above 1 GB/s on large buffers.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise ArgumentTypeError(
                f"the signing key must be bytes, got {type(key).__name__} {_short_repr(key)}; "
                "pass bytes, e.g. secrets.token_bytes(32)"
            )
        if len(key) < _MIN_KEY:
            raise ArgumentError(
                f"the signing key must be at least {_MIN_KEY} bytes long, got {len(key)} bytes "
                f"({_short_repr(bytes(key))}); use e.g. secrets.token_bytes(32)"
            )
        if len(key) > _BLAKE2B_MAX_KEY:
            # BLAKE2b takes keys up to 64 bytes; longer keys are hashed first, as HMAC does.
            key = hashlib.blake2b(key, digest_size=_BLAKE2B_MAX_KEY).digest()
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "Signer(<key hidden>)"

    def _mac(self, data: bytes) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=_MAC_SIZE).digest()

    def sign(self, data: bytes) -> bytes:
        """Return ``mac + data``."""
        return self._mac(data) + data

    def verify(self, signed: bytes, *, what: str = "a stored payload") -> bytes:
        """Return the data inside ``signed``, or raise PayloadIntegrityError. Never unpickles."""
        mac = signed[:_MAC_SIZE]
        data = signed[_MAC_SIZE:]
        if len(mac) == _MAC_SIZE and hmac.compare_digest(mac, self._mac(data)):
            return data
        raise PayloadIntegrityError(
            f"refusing to unpickle {what} ({len(signed)} bytes, starting "
            f"{bytes(signed[:16])!r}): its signature does not match the store's key; it was "
            "written by another key or tampered with — open the store with the key that "
            "wrote it, or forget this entry so that it is computed again"
        )

    @property
    def can_sign(self) -> bool:
        """False for :meth:`without_key` signers: values that need pickle cannot be stored."""
        return True

    @staticmethod
    def without_key(where: str) -> Signer:
        """A signer for a store shared without a configured key (``where`` names the store):
        signing raises UnstorableValueError and verifying PayloadIntegrityError, both saying
        to set ``DURABLE_NB_KEY``. A key made up by the store and kept in the store itself
        would let anyone who can write the store forge pickles, so there is none."""
        return _KeylessSigner(where)


class _KeylessSigner(Signer):
    __slots__ = ("_where",)

    def __init__(self, where: str) -> None:  # no super().__init__: there is no key
        self._key = b""
        self._where = where

    def __repr__(self) -> str:
        return "Signer(<no key>)"

    @property
    def can_sign(self) -> bool:
        return False

    def sign(self, data: bytes) -> bytes:
        raise UnstorableValueError(
            f"cannot store a value that needs pickle ({len(data)} bytes): {self._where} has "
            "no signing key for pickled payloads; set the environment variable DURABLE_NB_KEY "
            "to a secret of at least 16 characters that everyone sharing the store uses, or "
            "return plain data (JSON types, bytes, numpy arrays, DataFrames) that needs no pickle"
        )

    def verify(self, signed: bytes, *, what: str = "a stored payload") -> bytes:
        raise PayloadIntegrityError(
            f"refusing to unpickle {what} ({len(signed)} bytes): {self._where} has no signing "
            "key to check it with; set the environment variable DURABLE_NB_KEY to the key of "
            "the team that wrote it"
        )


# --------------------------------------------------------------------------- helpers

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40


def _short_repr(value: object) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{_type_name(type(value))} object>"


def _type_name(t: type) -> str:
    module = t.__module__
    return t.__qualname__ if module == "builtins" else f"{module}.{t.__qualname__}"


def _damaged(codec: str, problem: str) -> StoreFormatError:
    return StoreFormatError(
        f"a stored {codec!r} payload is damaged: {problem}; the store file may be corrupt — "
        "forget this entry so that it is computed again"
    )


# --------------------------------------------------------------------------- json

_JSON_MAX_DEPTH: Final = 100


def _raise_not_json(value: object) -> None:
    raise TypeError(f"not JSON: {type(value).__name__}")


# Encoders are built once: json.dumps builds one per call, which costs ~1 us on its own.
# The C encoder is an undocumented (but long-stable) part of the json package.
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encode_str: Any = json.encoder.encode_basestring
_encode_str_ascii: Any = json.encoder.encode_basestring_ascii
if _c_make_encoder is not None:
    _encode_utf8: Any = _c_make_encoder(
        None, _raise_not_json, _encode_str, None, ":", ",", False, False, False
    )
    _encode_ascii: Any = _c_make_encoder(
        None, _raise_not_json, _encode_str_ascii, None, ":", ",", False, False, False
    )
else:  # pragma: no cover - CPython always has the C accelerator
    _py_utf8 = json.JSONEncoder(
        ensure_ascii=False, check_circular=False, allow_nan=False, separators=(",", ":")
    )
    _py_ascii = json.JSONEncoder(
        ensure_ascii=True, check_circular=False, allow_nan=False, separators=(",", ":")
    )

    def _encode_utf8(value: object, _indent: int) -> list[str]:
        return [_py_utf8.encode(value)]

    def _encode_ascii(value: object, _indent: int) -> list[str]:
        return [_py_ascii.encode(value)]


# scan_once(s, 0) -> (value, end) is what json.loads runs after its Python-level checks.
_scan_once: Any = cast(Any, json.scanner.make_scanner)(json.JSONDecoder())


_JSON_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _json_ok(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` survives a JSON round trip with the exact same types."""
    # Scalars are tested inline in the loops: a call per item would double the cost.
    t = type(value)
    if t in _JSON_SCALARS:
        return True
    if t is float:
        return bool(value - value == 0.0)  # false for NaN and infinities
    if depth >= _JSON_MAX_DEPTH:
        return False  # also stops on cycles; pickle handles both
    if t is list:
        for item in value:
            if type(item) not in _JSON_SCALARS and not _json_ok(item, depth + 1):
                return False
        return True
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            if type(item) not in _JSON_SCALARS and not _json_ok(item, depth + 1):
                return False
        return True
    return False


def _json_bytes(value: object) -> bytes | None:
    """JSON text of a value that passed ``_json_ok``; None if it cannot be written."""
    try:
        text = "".join(_encode_utf8(value, 0))
    except ValueError:  # an int longer than sys.get_int_max_str_digits()
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escape them, JSON keeps them exactly
        return "".join(_encode_ascii(value, 0)).encode("ascii")


def _json_loads(data: bytes) -> object:
    try:
        text = data.decode("utf-8")
        value, end = _scan_once(text, 0)
    except (StopIteration, ValueError) as exc:  # the scanner signals "no value" by StopIteration
        raise _damaged("json", f"{_short_repr(bytes(data[:60]))} is not JSON") from exc
    if end != len(text):
        raise _damaged("json", f"trailing bytes after the value in {_short_repr(bytes(data))}")
    return value


# --------------------------------------------------------------------------- encode / decode

_JSON_NULL: Final = Payload("json", b"null")
_JSON_TRUE: Final = Payload("json", b"true")
_JSON_FALSE: Final = Payload("json", b"false")


def encode(value: object, signer: Signer, *, what: str = "result") -> Payload:
    """Encode ``value`` by its type (see the module docstring).

    ``what`` names the value in error messages (e.g. ``"result of effect 'fetch'"``).
    Raises UnstorableValueError when no codec applies and the value cannot be pickled.
    """
    t = type(value)
    # Hot path first: small plain results are replayed many times.
    if t is int:
        try:
            return Payload("json", int.__repr__(cast(int, value)).encode("ascii"))
        except ValueError:  # too many digits for repr: pickle keeps it
            return _encode_pickle(value, signer, what)
    if t is str:
        try:
            return Payload("json", _encode_str(value).encode("utf-8"))
        except UnicodeEncodeError:
            return Payload("json", _encode_str_ascii(value).encode("ascii"))
    if value is None:
        return _JSON_NULL
    if t is bool:
        return _JSON_TRUE if value else _JSON_FALSE
    if t is float:
        number = cast(float, value)
        if number - number == 0.0:  # finite: json would write the same repr
            return Payload("json", float.__repr__(number).encode("ascii"))
        return _encode_pickle(value, signer, what)
    if t is list or t is dict:
        if _json_ok(value):
            data = _json_bytes(value)
            if data is not None:
                return Payload("json", data)
        return _encode_pickle(value, signer, what)
    if t is bytes:
        return Payload("bytes", b"b" + cast(bytes, value))
    if t is bytearray:
        return Payload("bytes", b"a" + cast(bytearray, value))
    # Third-party types: the value exists, so its package is already imported.
    root = t.__module__.partition(".")[0]
    if root == "numpy":
        payload = _encode_numpy(value)
    elif root == "pandas":
        payload = _encode_pandas(value)
    elif root == "pyarrow":
        payload = _encode_arrow(value)
    elif root == "polars":
        payload = _encode_polars(value)
    else:
        payload = None
    return payload if payload is not None else _encode_pickle(value, signer, what)


def decode(payload: Payload, signer: Signer) -> object:
    """Rebuild the value ``encode`` was given. Pickles are verified before unpickling.

    An ``error`` payload decodes to the exception object (it is not raised).
    """
    codec = payload.codec
    if codec == "json":
        return _json_loads(payload.data)
    if codec == "pickle":
        return _decode_pickle(payload.data, signer)
    if codec == "bytes":
        data = payload.data
        tag = data[:1]
        if tag == b"b":
            return bytes(data[1:])
        if tag == b"a":
            return bytearray(memoryview(data)[1:])
        raise _damaged(codec, f"unknown tag {bytes(tag)!r}")
    if codec == "numpy":
        return _decode_numpy(payload.data)
    if codec in _TABLE_CODECS or codec == "arrow_ipc":
        return _decode_table(payload)
    if codec == "error":
        return decode_error(payload, signer)
    raise StoreFormatError(
        f"unknown payload codec {codec!r}: this store was probably written by a newer "
        "durable_nb; upgrade durable_nb to read it"
    )


# --------------------------------------------------------------------------- pickle


def _encode_pickle(value: object, signer: Signer, what: str) -> Payload:
    try:
        data = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception as exc:  # pickling runs arbitrary __reduce__ code; any failure counts
        name = _type_name(type(value))
        subject = what if what.startswith(("the ", "a ", "an ")) else f"the {what}"
        raise UnstorableValueError(
            f"cannot store {subject} {_short_repr(value)}: a {name} has no codec that keeps it "
            f"exactly (JSON, bytes, numpy, Arrow tables), so it must be pickled, and pickling failed "
            f"({type(exc).__name__}: {exc}); return plain data (dicts, lists, str, numbers), "
            f"an array or a DataFrame instead, or make {name} picklable (define it at "
            "module level, or give it __reduce__)"
        ) from exc
    return Payload("pickle", signer.sign(data))


def _decode_pickle(signed: bytes, signer: Signer) -> object:
    data = signer.verify(signed, what="a stored pickled value")
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise StoreFormatError(
            f"cannot unpickle a stored value ({type(exc).__name__}: {exc}); it refers to a "
            "class or function that this process cannot import — define or import it before "
            "replaying, or forget this entry so that it is computed again"
        ) from exc


# --------------------------------------------------------------------------- numpy

_NUMPY_KINDS: Final = frozenset("biufcmMSUV")
_NUMPY_HEADER: Final = struct.Struct("<ccBB")  # kind (array/scalar), order, ndim, len(dtype str)


def _numpy_dtype_ok(dtype: Any) -> bool:
    import numpy as np

    return (
        dtype.kind in _NUMPY_KINDS
        and not dtype.hasobject
        and dtype.fields is None
        and dtype.subdtype is None
        and dtype.metadata is None
        and dtype.itemsize > 0
        and np.dtype(dtype.str) == dtype
    )


def _encode_numpy(value: object) -> Payload | None:
    import numpy as np

    if type(value) is np.ndarray:
        arr = value
        kind = b"a"
    elif isinstance(value, np.generic):
        arr = np.asarray(value)
        kind = b"s"
    else:
        return None
    if not _numpy_dtype_ok(arr.dtype):
        return None
    fortran = arr.ndim > 1 and arr.flags.f_contiguous and not arr.flags.c_contiguous
    order: Literal["C", "F"] = "F" if fortran else "C"
    dtype_str = arr.dtype.str.encode("ascii")
    header = _NUMPY_HEADER.pack(kind, order.encode("ascii"), arr.ndim, len(dtype_str))
    shape = struct.pack(f"<{arr.ndim}q", *arr.shape)
    return Payload("numpy", b"".join([header, dtype_str, shape, arr.tobytes(order=order)]))


def _decode_numpy(data: bytes) -> object:
    import numpy as np

    try:
        kind, order, ndim, dlen = _NUMPY_HEADER.unpack_from(data, 0)
        offset = _NUMPY_HEADER.size
        dtype = np.dtype(bytes(data[offset : offset + dlen]).decode("ascii"))
        offset += dlen
        shape = struct.unpack_from(f"<{ndim}q", data, offset)
        offset += 8 * ndim
    except (struct.error, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise _damaged("numpy", f"bad header ({exc})") from exc
    # Never build an object array from stored bytes: it would read pointers.
    if not _numpy_dtype_ok(dtype) or kind not in (b"a", b"s") or order not in (b"C", b"F"):
        raise _damaged("numpy", f"header kind={kind!r} order={order!r} dtype={dtype!r}")
    buffer = bytearray(memoryview(data)[offset:])  # one copy, and the array is writable
    if min(shape, default=0) < 0 or len(buffer) != math.prod(shape) * dtype.itemsize:
        raise _damaged("numpy", f"{len(buffer)} bytes do not hold {shape} x {dtype}")
    arr = np.ndarray(shape, dtype, buffer=buffer, order=order.decode("ascii"))
    return arr[()] if kind == b"s" else arr


# --------------------------------------------------------------------------- tables: layout

_TABLE_MAGIC: Final = b"DNT1"
_U32: Final = struct.Struct("<I")


def _pack_table_data(header: dict[str, Any], sections: list[bytes]) -> bytes:
    header["sections"] = [len(s) for s in sections]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return b"".join([_TABLE_MAGIC, _U32.pack(len(head)), head, *sections])


def _unpack_table_data(codec: str, data: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    view = memoryview(data)
    try:
        if bytes(view[:4]) != _TABLE_MAGIC:
            raise ValueError(f"starts with {bytes(view[:4])!r}, not {_TABLE_MAGIC!r}")
        (hlen,) = _U32.unpack_from(view, 4)
        header = json.loads(bytes(view[8 : 8 + hlen]))
        sections = []
        offset = 8 + hlen
        for size in header["sections"]:
            sections.append(view[offset : offset + size])
            offset += size
        if offset != len(view):
            raise ValueError(f"{len(view)} bytes, but the sections end at {offset}")
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise _damaged(codec, str(exc)) from exc
    return header, sections


# --------------------------------------------------------------------------- tables: DuckDB types


_VIEW_CASTS: list[bool] = []  # whether this pyarrow casts string to string_view, once


def _view_storage(t: Any) -> Any:
    """For a string_view or binary_view: string or binary, which every DuckDB reads (1.x
    has no binary_view), if this pyarrow can cast back to the view (16 cannot: then None,
    and the value goes to Arrow IPC); for any other type: False."""
    import pyarrow as pa

    is_string_view = getattr(pa.types, "is_string_view", None)
    if is_string_view is None:  # pyarrow before 16 has no view types
        return False
    if is_string_view(t):
        storage = pa.string()
    elif pa.types.is_binary_view(t):
        storage = pa.binary()
    else:
        return False
    if not _VIEW_CASTS:
        try:
            pa.array(["a"]).cast(pa.string_view())
            _VIEW_CASTS.append(True)
        except pa.ArrowNotImplementedError:
            _VIEW_CASTS.append(False)
    return storage if _VIEW_CASTS[0] else None


def _storage_type(t: Any) -> Any:
    """The type a DuckDB table keeps ``t`` as so that casting back is exact; None if none.

    Dictionaries are handled by the caller (top level only).
    """
    import pyarrow as pa

    types = pa.types
    if types.is_float16(t):
        return pa.float32()
    # time64[ns]: DuckDB 1.x keeps times in microseconds
    if types.is_duration(t) or (types.is_time64(t) and t.unit == "ns"):
        return pa.int64()
    view = _view_storage(t)
    if view is not False:
        return view
    if types.is_decimal256(t):
        return pa.string()
    if types.is_timestamp(t):
        # s/ms: DuckDB converts zoned ones to microseconds; ns: DuckDB 1.x keeps a zoned
        # timestamp in microseconds (2.x in nanoseconds); naive ones keep their unit
        if t.tz is not None and t.unit in ("s", "ms", "ns"):
            return pa.timestamp(t.unit)
        return t
    if (
        types.is_boolean(t)
        or types.is_integer(t)
        or types.is_floating(t)
        or types.is_string(t)
        or types.is_large_string(t)
        or types.is_binary(t)
        or types.is_large_binary(t)
        or types.is_fixed_size_binary(t)
        or types.is_date(t)
        or types.is_time(t)
        or types.is_decimal(t)
        or types.is_null(t)
    ) and not isinstance(t, pa.BaseExtensionType):
        return t
    if types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t):
        item = t.value_field
        inner = _storage_type(item.type)
        if inner is None:
            return None
        if inner.equals(item.type):
            return t
        field = item.with_type(inner)
        if types.is_fixed_size_list(t):
            return pa.list_(field, t.list_size)
        return pa.large_list(field) if types.is_large_list(t) else pa.list_(field)
    if types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        names = [f.name for f in fields]
        if not fields or "" in names or len(set(names)) != len(names):
            return None  # DuckDB renames empty names; casting back matches fields by name
        inners = [_storage_type(f.type) for f in fields]
        if any(i is None for i in inners):
            return None
        if all(i.equals(f.type) for i, f in zip(inners, fields, strict=True)):
            return t
        return pa.struct([f.with_type(i) for f, i in zip(fields, inners, strict=True)])
    return None  # maps, intervals, unions, run-end encoded, extension types, list views


def _storage_table(table: Any) -> tuple[Any, dict[int, Any]] | None:
    """The table to hand to DuckDB and the dictionaries to save; None: not natively storable."""
    import pyarrow as pa

    if table.num_columns == 0:
        return None
    dictionaries: dict[int, Any] = {}
    fields = []
    changed = False
    for i, field in enumerate(table.schema):
        t = field.type
        if pa.types.is_dictionary(t):
            value_storage = _storage_type(t.value_type)
            if value_storage is None or not value_storage.equals(t.value_type):
                return None
            dictionaries[i] = _unified_dictionary(table.column(i))
            fields.append(field)
            continue
        storage = _storage_type(t)
        if storage is None:
            return None
        if not storage.equals(t):
            changed = True
        fields.append(field.with_type(storage))
    if changed:
        table = table.cast(pa.schema(fields))
    names = table.column_names
    if len({n.lower() for n in names}) < len(names):
        # DuckDB 1.x matches an Arrow table's columns by name without case ("a" and "A"
        # collide): the stored table gets positional names; decode restores by position
        table = table.rename_columns([f"c{i}" for i in range(len(names))])
    return table, dictionaries


def _unified_dictionary(column: Any) -> Any:
    import pyarrow as pa

    chunks = column.chunks
    if not chunks:
        return pa.array([], type=column.type.value_type)
    first = chunks[0].dictionary
    if all(c.dictionary.equals(first) for c in chunks[1:]):
        return first
    unified = pa.table({"c": column}).unify_dictionaries().column(0)
    return unified.chunk(0).dictionary


def _restore_dictionary(column: Any, t: Any, dictionary: Any) -> Any:
    """Re-encode a column DuckDB gave back as plain values against the saved dictionary."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):
        if column.type.equals(t) and all(c.dictionary.equals(dictionary) for c in column.chunks):
            return column  # the memory store kept the original column
        column = column.cast(column.type.value_type)
    if not column.type.equals(t.value_type):
        column = column.cast(t.value_type)
    indices = pc.index_in(column, value_set=dictionary)
    if indices.null_count != column.null_count:
        raise _damaged("table", f"a column holds values outside its saved categories {dictionary}")
    indices = indices.cast(t.index_type)
    # At least one chunk, even for no rows: the dictionary lives in the chunks.
    chunks = indices.chunks or [pa.array([], type=t.index_type)]
    return pa.chunked_array(
        [pa.DictionaryArray.from_arrays(c, dictionary, ordered=t.ordered) for c in chunks],
        type=t,
    )


def _restore_table(stored: Any, schema: Any, dictionaries: dict[int, Any]) -> Any:
    import pyarrow as pa

    if not isinstance(stored, pa.Table):
        raise _damaged("table", f"the store gave back {_short_repr(stored)}, not a pyarrow.Table")
    if stored.num_columns != len(schema):
        raise _damaged(
            "table", f"the stored table has {stored.num_columns} columns, not {len(schema)}"
        )
    columns = []
    for i, field in enumerate(schema):
        column = stored.column(i)
        if i in dictionaries:
            column = _restore_dictionary(column, field.type, dictionaries[i])
        elif pa.types.is_null(field.type) and not pa.types.is_null(column.type):
            # DuckDB 1.x gives a null column back as int32, which pyarrow cannot cast
            if column.null_count != len(column):
                raise _damaged("table", f"column {i} should hold only nulls")
            column = pa.nulls(len(column), pa.null())
        elif not column.type.equals(field.type):
            column = column.cast(field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------- tables: encode


def _table_payload(codec: str, table: Any, header: dict[str, Any]) -> Payload:
    """The payload of an Arrow table: native when DuckDB can hold it, else Arrow IPC."""
    import pyarrow as pa

    stored = _storage_table(table)
    if stored is None:
        return Payload("arrow_ipc", _pack_table_data(header, [ipc_bytes(table)]))
    storage, dictionaries = stored
    sections = [table.schema.serialize().to_pybytes()]
    header["dictionaries"] = list(dictionaries)
    sections.extend(ipc_bytes(pa.table({"d": d})) for d in dictionaries.values())
    return Payload(codec, _pack_table_data(header, sections), table=storage)


def _encode_arrow(value: object) -> Payload | None:
    import pyarrow as pa

    if type(value) is pa.Table:
        return _table_payload("arrow", value, {"kind": "table"})
    if type(value) is pa.RecordBatch:
        return _table_payload("arrow", pa.Table.from_batches([value]), {"kind": "batch"})
    return None


def _encode_polars(value: object) -> Payload | None:
    import polars as pl

    if type(value) is pl.DataFrame:
        frame, header = value, {"kind": "polars"}
    elif type(value) is pl.Series:
        frame, header = value.to_frame(), {"kind": "polars_series"}
    else:
        return None
    if not all(_polars_dtype_ok(d) for d in frame.dtypes):
        return None
    try:
        table = frame.to_arrow()
    except Exception:  # e.g. Int128 has no Arrow type: pickle keeps it
        return None
    return _table_payload("polars", table, header)


def _polars_dtype_ok(dtype: Any) -> bool:
    import polars as pl

    if isinstance(dtype, pl.Object):
        return False  # to_arrow would write the object pointers
    if isinstance(dtype, pl.List | pl.Array):
        return _polars_dtype_ok(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return all(_polars_dtype_ok(f.dtype) for f in dtype.fields)
    return True


_SERIES_COLUMN: Final = "__durable_nb_series__"


def _encode_pandas(value: object) -> Payload | None:
    import pandas as pd

    header: dict[str, Any]
    if type(value) is pd.DataFrame:
        frame = value
        header = {"kind": "pandas"}
    elif type(value) is pd.Series:
        name = value.name
        if not _json_scalar(name):  # the name is kept in the JSON header
            return None
        if not _pandas_labels_ok(value.index.names) or not _pandas_dtype_ok(value.dtype, value):
            return None
        frame = value.to_frame(name=_SERIES_COLUMN)
        header = {"kind": "pandas_series", "name": name}
    else:
        return None
    if not _pandas_frame_ok(frame):
        return None
    columns = frame.columns
    if type(columns) is pd.RangeIndex:
        header["columns_range"] = [columns.start, columns.stop, columns.step]
        header["columns_name"] = columns.name
    freq = _pandas_index_freq(frame.index)
    if freq is False:
        return None
    header["index_freq"] = freq
    fixed = _pandas_fixed_offsets(frame)
    if fixed:
        header["fixed_offsets"] = fixed
    if frame.attrs:  # pyarrow before 17 does not restore them from its metadata
        header["attrs"] = frame.attrs
    try:
        table = _pandas_to_arrow(frame, rename_range=type(columns) is pd.RangeIndex)
    except Exception:  # pyarrow refuses the frame: pickle keeps it
        return None
    return _table_payload("pandas", table, header)


def _pandas_to_arrow(frame: Any, *, rename_range: bool) -> Any:
    import pyarrow as pa

    # from_pandas shares the frame's numpy buffers, and pandas writes into them in place
    # (df.loc[0, "a"] = 1) without knowing Arrow holds them: copy, so that the stored
    # table is the result as it was returned, however long the store keeps it in memory.
    frame = frame.copy(deep=True)
    if rename_range:
        frame = frame.set_axis([str(i) for i in range(len(frame.columns))], axis=1)
    return pa.Table.from_pandas(frame, preserve_index=None)


def _pandas_fixed_offsets(frame: Any) -> dict[str, int]:
    """Column position -> UTC offset in seconds, for the columns whose time zone is a
    ``datetime.timezone`` with a fixed offset: pyarrow gives pandas 2 back a pytz offset."""
    import datetime as dt

    import pandas as pd

    out: dict[str, int] = {}
    for i, dtype in enumerate(frame.dtypes):
        if isinstance(dtype, pd.DatetimeTZDtype) and type(dtype.tz) is dt.timezone:
            offset = dtype.tz.utcoffset(None)
            if offset:
                out[str(i)] = int(offset.total_seconds())
    return out


def _json_scalar(value: object) -> bool:
    if type(value) is int:
        return abs(value) < 2**63
    return type(value) in _JSON_SCALARS or (type(value) is float and math.isfinite(value))


def _pandas_labels_ok(names: Any) -> bool:
    return all(n is None or type(n) is str for n in names)


def _pandas_dtype_ok(dtype: Any, values: Any) -> bool:
    """Whether a column (or index level, or categories) of ``dtype`` round-trips exactly;
    ``values`` (a Series or Index) is read only for an ``object`` dtype."""
    import numpy as np
    import pandas as pd

    if isinstance(dtype, np.dtype):
        if dtype.kind == "O":
            return values is not None and _pandas_object_strings_ok(values)
        return dtype.kind in "biufmM"
    if isinstance(dtype, pd.CategoricalDtype):
        return _pandas_dtype_ok(dtype.categories.dtype, dtype.categories)
    if isinstance(dtype, pd.StringDtype):
        return dtype.storage == "pyarrow"
    return isinstance(dtype, _pandas_exact_extension_dtypes())


def _pandas_object_strings_ok(values: Any) -> bool:
    """An ``object`` column of strings, as pandas 2 makes them: Arrow stores it as a string
    column (all ``None``: a null column) and pandas 2 reads that back as the same ``object``
    column, every value exactly ``str`` or ``None`` (a NaN or a ``str`` subclass would come
    back changed, so such a column is pickled). pandas 3 (and pandas 2 with
    ``future.infer_string``) reads strings back as its ``str`` dtype instead: there an
    ``object`` column is pickled, as before."""
    import pandas as pd

    if int(pd.__version__.split(".", 1)[0]) >= 3:
        return False
    try:
        if pd.get_option("future.infer_string"):
            return False
    except (KeyError, pd.errors.OptionError):  # pandas 2.0 has no such option
        pass
    return set(map(type, values.to_numpy())) <= _STR_OR_NONE


_STR_OR_NONE: Final = frozenset((str, type(None)))


def _pandas_exact_extension_dtypes() -> tuple[type, ...]:
    import pandas as pd

    return (
        pd.DatetimeTZDtype,
        pd.BooleanDtype,
        pd.Int8Dtype,
        pd.Int16Dtype,
        pd.Int32Dtype,
        pd.Int64Dtype,
        pd.UInt8Dtype,
        pd.UInt16Dtype,
        pd.UInt32Dtype,
        pd.UInt64Dtype,
        pd.Float32Dtype,
        pd.Float64Dtype,
    )


def _pandas_frame_ok(frame: Any) -> bool:
    import pandas as pd

    columns = frame.columns
    if not columns.is_unique or not frame.flags.allows_duplicate_labels:
        return False
    if type(columns) is pd.MultiIndex:
        if not all(type(part) is str for label in columns for part in label):
            return False
    elif type(columns) is not pd.RangeIndex and not all(type(c) is str for c in columns):
        return False
    elif any(c.startswith("__index_level_") for c in columns if type(c) is str):
        return False  # pyarrow names unnamed index levels so: pyarrow 16-17 mix them up
    if not _pandas_labels_ok(columns.names):
        return False
    for i, dtype in enumerate(frame.dtypes):
        # the values are read for an object column only (iloc costs microseconds a column)
        values = frame.iloc[:, i] if pd.api.types.is_object_dtype(dtype) else None
        if not _pandas_dtype_ok(dtype, values):
            return False
    index = frame.index
    if not _pandas_labels_ok(index.names):
        return False
    if type(index) is pd.MultiIndex:
        if not all(_pandas_dtype_ok(level.dtype, level) for level in index.levels):
            return False
    elif type(index) is not pd.RangeIndex and not _pandas_dtype_ok(index.dtype, index):
        return False
    attrs = frame.attrs
    return not attrs or _json_ok(attrs)


def _pandas_index_freq(index: Any) -> str | bool | None:
    """The index frequency to restore (None: none), or False if it cannot be saved."""
    import pandas as pd

    freq = getattr(index, "freq", None)
    if freq is None or not isinstance(index, pd.DatetimeIndex | pd.TimedeltaIndex):
        return None
    freqstr = index.freqstr
    return freqstr if pd.tseries.frequencies.to_offset(freqstr) == freq else False


# --------------------------------------------------------------------------- tables: decode


def _decode_table(payload: Payload) -> object:
    codec = payload.codec
    header, sections = _unpack_table_data(codec, payload.data)
    if codec == "arrow_ipc":
        table = read_ipc(sections[0])
    else:
        import pyarrow as pa

        if payload.table is None:
            raise _damaged(codec, "the payload has no table")
        schema = pa.ipc.read_schema(pa.py_buffer(sections[0]))
        dictionaries = {
            int(i): read_ipc(s).column(0).combine_chunks()
            for i, s in zip(header["dictionaries"], sections[1:], strict=True)
        }
        table = _restore_table(payload.table, schema, dictionaries)
    kind = header["kind"]
    if kind == "table":
        return table
    if kind == "batch":
        return _to_record_batch(table)
    if kind in ("pandas", "pandas_series"):
        return _to_pandas(table, header)
    if kind in ("polars", "polars_series"):
        import polars as pl

        names = table.column_names
        if "" in names:  # from_arrow would rename "" to "column_0", which may be taken
            table = table.rename_columns([f"c{i}" for i in range(len(names))])
        frame = pl.from_arrow(table)
        if not isinstance(frame, pl.DataFrame):
            raise _damaged(codec, f"polars built a {type(frame).__name__}, not a DataFrame")
        if frame.columns != names:
            frame.columns = names
        return frame.to_series(0) if kind == "polars_series" else frame
    raise _damaged(codec, f"unknown table kind {kind!r}")


def _to_record_batch(table: Any) -> Any:
    import pyarrow as pa

    table = table.combine_chunks()
    arrays = [c.chunk(0) if c.num_chunks else pa.array([], type=c.type) for c in table.columns]
    return pa.RecordBatch.from_arrays(arrays, schema=table.schema)


def _to_pandas(table: Any, header: dict[str, Any]) -> object:
    import pandas as pd

    frame = table.to_pandas()
    _restore_pandas_dtypes(frame, header)
    columns_range = header.get("columns_range")
    if columns_range is not None:
        start, stop, step = columns_range
        frame.columns = pd.RangeIndex(start, stop, step, name=header.get("columns_name"))
    freq = header.get("index_freq")
    if freq is not None:
        index = frame.index
        cls = pd.DatetimeIndex if isinstance(index, pd.DatetimeIndex) else pd.TimedeltaIndex
        frame.index = cls(index, freq=freq)
    if header["kind"] == "pandas_series":
        series = frame[_SERIES_COLUMN]
        series.name = header["name"]
        series.attrs = frame.attrs
        return series
    return frame


def _restore_pandas_dtypes(frame: Any, header: dict[str, Any]) -> None:
    """What ``to_pandas`` gives pandas 2 back otherwise: ``string[python]`` for a
    ``string[pyarrow]`` column (the only string storage stored natively) and a pytz offset
    for a ``datetime.timezone`` one."""
    import datetime as dt

    import pandas as pd

    for i, dtype in enumerate(frame.dtypes):
        if isinstance(dtype, pd.StringDtype) and dtype.storage != "pyarrow":
            frame.isetitem(i, frame.iloc[:, i].astype("string[pyarrow]"))
    for i, seconds in header.get("fixed_offsets", {}).items():
        tz = dt.timezone(dt.timedelta(seconds=seconds))
        frame.isetitem(int(i), frame.iloc[:, int(i)].dt.tz_convert(tz))
    if "attrs" in header:
        frame.attrs = header["attrs"]


# --------------------------------------------------------------------------- errors


class RecordedError(DurableError):
    """A recorded exception whose type cannot be rebuilt in this process.

    ``original_type`` is ``"module.qualname"`` of the original class, ``message`` its
    ``str()``, and ``durable_traceback`` the original traceback text.
    """

    def __init__(self, original_type: str, message: str, traceback_text: str, reason: str):
        super().__init__(
            f"the recorded error {original_type}({message!r}) cannot be rebuilt here: {reason}; "
            "define the exception class at module level in an importable module so that it can "
            f"be replayed as itself (the original traceback is in .{TRACEBACK_ATTR})"
        )
        self.original_type = original_type
        self.message = message
        self.reason = reason
        setattr(self, TRACEBACK_ATTR, traceback_text)

    def __reduce__(self) -> tuple[Any, ...]:
        traceback_text = getattr(self, TRACEBACK_ATTR)
        args = (self.original_type, self.message, traceback_text, self.reason)
        return (type(self), args, dict(vars(self)))


_ERROR_FORMAT: Final = 1
#: starts an error recorded by a store without a signing key: JSON text, no pickle
TEXT_ERROR_PREFIX: Final = b"durable_nb-error-text-1\n"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of {type(exc).__qualname__} failed>"


def _roundtrip_pickle(value: object) -> bytes | None:
    """Pickle bytes that unpickle to a value of the same type, else None."""
    try:
        blob = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        back = pickle.loads(blob)  # our own bytes, just made: safe to load
    except Exception:
        return None
    return blob if type(back) is type(value) else None


def encode_error(exc: BaseException, signer: Signer) -> Payload:
    """Encode an exception so that :func:`decode_error` gives back the same type and message.

    The exception itself is pickled when that round-trips (checked now, not at replay);
    its module, qualname, message, args and picklable attributes are kept too, so a class
    that cannot be pickled is rebuilt without its ``__init__``. The formatted traceback is
    kept alongside and set as ``.durable_traceback`` (and a note) on the decoded exception.
    """
    if not isinstance(exc, BaseException):
        raise ArgumentTypeError(
            f"encode_error() takes an exception, got {type(exc).__name__} {_short_repr(exc)}"
        )
    cls = type(exc)
    state = {k: blob for k, v in vars(exc).items() if (blob := _roundtrip_pickle(v)) is not None}
    record = {
        "format": _ERROR_FORMAT,
        "pickle": _roundtrip_pickle(exc),
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "message": _safe_str(exc),
        "args": _roundtrip_pickle(exc.args),
        "state": state,
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }
    if not signer.can_sign:  # a store without a key still records failures, as plain text
        text: dict[str, object] = {
            k: record[k] for k in ("module", "qualname", "message", "traceback")
        }
        text["args"] = list(exc.args) if _json_ok(list(exc.args)) else None
        return Payload("error", TEXT_ERROR_PREFIX + json.dumps(text).encode())
    return Payload("error", signer.sign(pickle.dumps(record, protocol=PICKLE_PROTOCOL)))


def _text_error_record(data: bytes) -> dict[str, Any]:
    try:
        text = json.loads(data[len(TEXT_ERROR_PREFIX) :])
        fields = {k: text[k] for k in ("module", "qualname", "message", "traceback")}
        json_args = text.get("args")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise _damaged("error", f"unreadable error text ({e})") from None
    if not all(isinstance(v, str) for v in fields.values()) or not (
        json_args is None or isinstance(json_args, list)
    ):
        raise _damaged("error", f"unknown error text {_short_repr(text)}")
    return {
        "format": _ERROR_FORMAT,
        "text": True,
        "json_args": json_args,
        "pickle": None,
        "args": None,
        "state": {},
        **fields,
    }


def decode_error(payload: Payload, signer: Signer) -> BaseException:
    """Rebuild the exception ``encode_error`` recorded (returned, not raised).

    The type is the original one when its class can be imported; otherwise a
    :class:`RecordedError` carrying the original type name, message and traceback.
    """
    if payload.codec != "error":
        raise ArgumentError(
            f"decode_error() takes an 'error' payload, got codec {payload.codec!r}; "
            "use decode() for results"
        )
    if payload.data.startswith(TEXT_ERROR_PREFIX):
        record = _text_error_record(payload.data)
    else:
        record = pickle.loads(signer.verify(payload.data, what="a stored error"))
    if not isinstance(record, dict) or record.get("format") != _ERROR_FORMAT:
        raise _damaged("error", f"unknown error record {_short_repr(record)}")
    tb_text: str = record["traceback"]
    exc: BaseException | None = None
    if record["pickle"] is not None:
        try:
            loaded = pickle.loads(record["pickle"])
        except Exception:  # the class is gone or changed: rebuild from the description
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = _rebuild_error(record)
    try:
        setattr(exc, TRACEBACK_ATTR, tb_text)
        if hasattr(exc, "add_note"):
            exc.add_note(f"(replayed by durable_nb) the original failure was:\n{tb_text}")
    except Exception:  # an exception class that refuses attributes still replays
        pass
    return exc


class _NoImports(pickle.Unpickler):
    """Unpickles plain containers only: an error record is a dict of str, bytes and None, and
    reading it to describe it must never import (let alone run) the code that raised."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def describe_error(payload: Payload, signer: Signer) -> str:
    """``Type('message')`` of a recorded error, read without rebuilding the exception (so
    without importing its module): for traces, which must never run user code."""
    data = payload.data
    if payload.codec != "error":
        return "error"
    try:
        if data.startswith(TEXT_ERROR_PREFIX):
            record = json.loads(data[len(TEXT_ERROR_PREFIX) :])
        else:
            signed = signer.verify(data, what="a stored error")
            record = _NoImports(io.BytesIO(signed)).load()
        return f"{record['qualname']}({record['message']!r})"
    except PayloadIntegrityError:
        return "error (its record is signed by another key and was not read)"
    except Exception as e:  # a damaged or newer record: the trace still shows the rest
        return f"error (its record cannot be read: {type(e).__name__})"


def _rebuild_error(record: dict[str, Any]) -> BaseException:
    module, qualname = record["module"], record["qualname"]
    name = f"{module}.{qualname}"
    message: str = record["message"]
    try:
        if "<locals>" in qualname:
            raise LookupError("it was defined inside a function")
        # unsigned text may name any module: only classes already imported are rebuilt
        obj: Any = (
            sys.modules.get(module) if record.get("text") else importlib.import_module(module)
        )
        if obj is None:
            raise LookupError(f"module {module!r} is not imported in this process")
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, BaseException)):
            raise LookupError(f"{name} is not an exception class")
        if record.get("json_args") is not None:  # the text of a store without a key
            args = tuple(record["json_args"])
        else:
            args = pickle.loads(record["args"]) if record["args"] is not None else (message,)
        exc = obj.__new__(obj, *args)  # skip __init__: its signature is unknown here
        exc.args = args
        for key, blob in record["state"].items():
            setattr(exc, key, pickle.loads(blob))
    except Exception as problem:
        reason = f"{type(problem).__name__}: {problem}"
        return RecordedError(name, message, record["traceback"], reason)
    if type(exc) is not obj:
        return RecordedError(name, message, record["traceback"], f"got a {type(exc).__name__}")
    return exc
