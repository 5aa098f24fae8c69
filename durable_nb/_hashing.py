"""Canonical input hashing: the one definition of what identifies an effect call.

An effect key is ``(scope, identity, code version, input hash, occurrence)`` (guide, "How it works").
This module owns three of its parts and nothing else:

- :func:`effect_identity` -- ``module.qualname`` of the function;
- :func:`code_version` -- a hash of the function's normalized source;
- :func:`hash_value` and :class:`ArgBinder` -- a content hash of the bound arguments.

The encoding
------------
A value is written as a one-byte tag and a self-delimiting payload (fixed width, or a
length/count prefix), and the bytes are fed to xxh3_128. Small values are encoded into one
buffer and hashed once; large buffers (numpy, Arrow, pandas columns) stream into the hasher
without a copy. Tags::

    N None  T/F bool  i int64  I big int  f float  c complex  s str  b bytes  y bytearray
    m memoryview  l list  t tuple  d dict  e set  E frozenset  r range  z slice  . Ellipsis
    D datetime  a date  h time  g timedelta  P path  U uuid  q Decimal  Q Fraction
    C class  M module  L function  B builtin  R reduce-protocol object  G global name
    @ back-reference  n/o numpy array (plain / object dtype)  x numpy scalar  X numpy dtype
    w Arrow column  Y code object  A bound arguments  p provenance key (``_provenance``)
    K<kind> a class-tagged composite: e enum, n namedtuple, d dataclass, p pydantic model,
            s builtin subclass, m masked array, pandas x index / r series / f frame /
            c extension array / T timestamp / D timedelta / N NaT, polars L frame /
            l series, Arrow A table / B record batch / C chunked array / a array

Promises
--------
- Stable across processes and runs: no ``hash()``, no ``PYTHONHASHSEED``-dependent order;
  ``id()`` only detects cycles. Golden digests in the tests pin the format.
- Type is part of identity: ``1``, ``1.0``, ``True`` and ``"1"`` differ, as do list and
  tuple, bytes and bytearray, a subclass and its base, a DataFrame and an Arrow table.
- Equal values of one type hash equal: ``0.0`` and ``-0.0``; every NaN; dicts and sets in
  any order; aware datetimes at the same instant; ``Decimal("1.0")`` and ``Decimal("1")``;
  ``range(0)`` and ``range(5, 5)``; Arrow data however it is chunked or sliced.
- Buffers (numpy arrays, numeric pandas columns, Arrow data) are hashed as their bytes, so
  there ``-0.0`` and ``0.0`` differ, as do NaN payloads; null slots never reach the hash.
- Dataclasses count the fields that take part in ``==`` (``compare=True``).
- Anything else is hashed through the pickle reduce protocol (``copyreg`` table, then
  ``__reduce_ex__(5)``) with this encoding applied recursively, so sets and dicts inside an
  object's state are still order-independent. Objects that cannot be pickled, and cycles
  through lists, tuples, dicts and sets, raise :class:`UnhashableInputError` naming where,
  unless a provenance key stands for them (:func:`set_opaque_keyer`, ``_provenance.py``).
"""

from __future__ import annotations

import copyreg
import functools
import struct
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

import xxhash

from ._arrow_ipc import ipc_buffer
from .errors import ArgumentTypeError, UnhashableInputError

if TYPE_CHECKING:
    import ast
    import inspect

    from numpy.typing import NDArray

__all__ = [
    "HASH_FORMAT",
    "ArgBinder",
    "code_version",
    "effect_identity",
    "hash_value",
    "is_opaque",
    "set_opaque_keyer",
]

HASH_FORMAT = 1
"""Version of the encoding. Bump it whenever a change alters any digest."""

_Handler = Callable[[Any, "_State"], None]

_digest: Callable[[Any], bytes] = xxhash.xxh3_128_digest
_hexdigest: Callable[[Any], str] = xxhash.xxh3_128_hexdigest
_hex64: Callable[[Any], str] = xxhash.xxh3_64_hexdigest

_TAG_LEN = struct.Struct("<cQ").pack
_TAG_I64 = struct.Struct("<cq").pack
_TAG_F64 = struct.Struct("<cd").pack
_TAG_C128 = struct.Struct("<cdd").pack
_U64 = struct.Struct("<Q").pack
_I32_AT = struct.Struct("<i").unpack_from
_I64_AT = struct.Struct("<q").unpack_from

# Buffers at least this large go straight to the hasher instead of through the small buffer.
_BIG = 1 << 16
_NAN = float("nan")
_F64_NAN = _TAG_F64(b"f", _NAN)


# --- scalars: one bytes object each, the replay hot path -------------------------------


def _enc_none(v: None) -> bytes:
    return b"N"


def _enc_bool(v: bool) -> bytes:
    return b"T" if v else b"F"


def _enc_int(v: int) -> bytes:
    try:
        return _TAG_I64(b"i", v)
    except struct.error:
        n = v.bit_length() // 8 + 1
        return _TAG_LEN(b"I", n) + v.to_bytes(n, "little", signed=True)


def _enc_float(v: float) -> bytes:
    if v != v:
        return _F64_NAN
    return _TAG_F64(b"f", v + 0.0)  # -0.0 + 0.0 == +0.0


def _enc_complex(v: complex) -> bytes:
    r, i = v.real, v.imag
    return _TAG_C128(b"c", _NAN if r != r else r + 0.0, _NAN if i != i else i + 0.0)


def _enc_str(v: str) -> bytes:
    b = v.encode("utf-8", "surrogatepass")
    return _TAG_LEN(b"s", len(b)) + b


_SCALAR: dict[type, Callable[[Any], bytes]] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    complex: _enc_complex,
    str: _enc_str,
}
_SCALAR_GET = _SCALAR.get


# --- the encoder state and its errors --------------------------------------------------


class _State:
    """Bytes not yet hashed, the streaming hasher once one is needed, and the open objects."""

    __slots__ = ("buf", "hasher", "stack", "streamed")

    def __init__(self, stack: dict[int, int] | None = None) -> None:
        self.buf = bytearray()
        self.hasher: Any = None
        self.streamed = 0  # buffers fed to the hasher: past them nothing can be taken back
        # id() of every container or object being encoded -> its depth; only for cycles.
        self.stack: dict[int, int] = {} if stack is None else stack

    def stream(self, data: Any) -> None:
        """Feed a (large) buffer to the hasher without copying it."""
        h = self.hasher
        if h is None:
            h = self.hasher = xxhash.xxh3_128()
        if self.buf:
            h.update(self.buf)
            self.buf.clear()
        h.update(data)
        self.streamed += 1

    def digest(self) -> bytes:
        h = self.hasher
        if h is None:
            return _digest(self.buf)
        h.update(self.buf)
        return bytes(h.digest())

    def hexdigest(self) -> str:
        h = self.hasher
        if h is None:
            return _hexdigest(self.buf)
        h.update(self.buf)
        return str(h.hexdigest())


class _Problem(Exception):
    """Internal: an unhashable value, carried up to the entry point that names the input."""

    def __init__(self, value: object, cause: BaseException | None = None) -> None:
        super().__init__()
        self.value = value
        self.cause = cause  # None for a reference cycle
        self.child: object = value
        self.path: list[str] = []

    def up(self, container: object, segment: str) -> None:
        self.path.append(segment)
        self.child = container

    def error(self, what: str, root: str) -> UnhashableInputError:
        where = root + "".join(reversed(self.path))
        shown = _show(self.value)
        tname = _type_label(type(self.value))
        if self.cause is None:
            return UnhashableInputError(
                f"cannot hash {what}: {where} refers back to an enclosing {tname}, "
                f"a reference cycle: {shown}; cycles have no canonical content hash, "
                "so pass an acyclic value"
            )
        subject = (
            f"{shown} of type {tname}"
            if not self.path
            else f"{where} is {shown} of type {tname}, which"
        )
        return UnhashableInputError(
            f"cannot hash {what}: {subject} has no canonical content hash and cannot be pickled "
            f"({type(self.cause).__name__}: {self.cause}); pass something that stands for "
            "its content instead, such as its path, URL or id"
        )


def _show(v: object) -> str:
    try:
        r = repr(v)
    except Exception:
        r = object.__repr__(v)
    return r if len(r) <= 200 else r[:197] + "..."


def _type_label(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _too_deep(what: str) -> UnhashableInputError:
    return UnhashableInputError(
        f"cannot hash {what}: it is nested more deeply than Python's recursion limit allows; "
        "pass a flatter value, or something that stands for it such as a path or an id"
    )


def _global_name(obj: Any) -> str:
    """``module.qualname`` of a function, class or builtin, as pickle would find it."""
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(qualname, str):
        t = type(obj)
        return f"{t.__module__}.{t.__qualname__}"
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        owner = getattr(obj, "__objclass__", None) or getattr(obj, "__self__", None)
        if isinstance(owner, types.ModuleType):
            module = owner.__name__
        else:
            module = getattr(owner, "__module__", None)
            if not isinstance(module, str):
                module = "<unknown>"
    return f"{module}.{qualname}"


# --- dispatch --------------------------------------------------------------------------


def _encode(v: Any, st: _State) -> None:
    t = type(v)
    f = _SCALAR_GET(t)
    if f is not None:
        st.buf += f(v)
        return
    h = _HANDLERS_GET(t)
    if h is None:
        h = _resolve(t)
    h(v, st)


def _encode_items(items: Iterable[Any], st: _State) -> None:
    buf = st.buf  # stream() clears it in place, so the alias stays valid
    get = _SCALAR_GET
    for x in items:
        f = get(type(x))
        if f is None:
            _encode(x, st)
        else:
            buf += f(x)


def _sub(v: Any, st: _State) -> bytes:
    """The digest of one value, for order-independent containers."""
    f = _SCALAR_GET(type(v))
    if f is not None:
        return _digest(f(v))
    sub = _State(st.stack)
    _encode(v, sub)
    return sub.digest()


def _enter_container(v: object, st: _State) -> int:
    key = id(v)
    if key in st.stack:
        raise _Problem(v)
    st.stack[key] = len(st.stack)
    return key


def _enter_object(v: object, st: _State) -> int | None:
    """Push an object; if it is already open, write a back-reference and return None."""
    key = id(v)
    depth = st.stack.get(key)
    if depth is not None:
        st.buf += _TAG_LEN(b"@", len(st.stack) - depth)
        return None
    st.stack[key] = len(st.stack)
    return key


_LIBRARY_NAMES = frozenset({"numpy", "pandas", "polars", "pyarrow"})


def _stable_name(t: type) -> str:
    # Library classes are named by package and class only, so a release that moves one
    # between internal modules (pandas.core.frame -> ...) does not change digests.
    top = t.__module__.partition(".")[0]
    return f"{top}.{t.__qualname__}" if top in _LIBRARY_NAMES else _global_name(t)


def _kind(st: _State, kind: bytes, t: type) -> None:
    st.buf += b"K" + kind + _enc_str(_stable_name(t))


# --- builtin containers ---------------------------------------------------------------


def _seq(tag: bytes, v: Sequence[Any], st: _State) -> None:
    key = _enter_container(v, st)
    try:
        st.buf += _TAG_LEN(tag, len(v))
        _encode_items(v, st)
    except _Problem as p:
        index = next((i for i, x in enumerate(v) if x is p.child), None)
        p.up(v, f"[{index}]" if index is not None else "[?]")
        raise
    finally:
        del st.stack[key]


def _h_list(v: list[Any], st: _State) -> None:
    _seq(b"l", v, st)


def _h_tuple(v: tuple[Any, ...], st: _State) -> None:
    _seq(b"t", v, st)


def _h_dict(v: dict[Any, Any], st: _State) -> None:
    key = _enter_container(v, st)
    try:
        entries = [_sub(k, st) + _sub(x, st) for k, x in dict.items(v)]
        entries.sort()
        st.buf += _TAG_LEN(b"d", len(entries))
        st.buf += b"".join(entries)
    except _Problem as p:
        segment = "[?]"
        for k, x in dict.items(v):
            if x is p.child:
                segment = f"[{_show(k)}]"
                break
            if k is p.child:
                segment = f".keys()[{_show(k)}]"
                break
        p.up(v, segment)
        raise
    finally:
        del st.stack[key]


def _unordered(tag: bytes, v: Iterable[Any], st: _State) -> None:
    key = _enter_container(v, st)
    try:
        entries = sorted([_sub(x, st) for x in v])
        st.buf += _TAG_LEN(tag, len(entries))
        st.buf += b"".join(entries)
    except _Problem as p:
        p.up(v, "{...}")
        raise
    finally:
        del st.stack[key]


def _h_set(v: set[Any], st: _State) -> None:
    _unordered(b"e", v, st)


def _h_frozenset(v: frozenset[Any], st: _State) -> None:
    _unordered(b"E", v, st)


def _h_bytes(v: bytes, st: _State) -> None:
    st.buf += _TAG_LEN(b"b", len(v))
    if len(v) >= _BIG:
        st.stream(v)
    else:
        st.buf += v


def _h_bytearray(v: bytearray, st: _State) -> None:
    st.buf += _TAG_LEN(b"y", len(v))
    if len(v) >= _BIG:
        st.stream(v)
    else:
        st.buf += v


def _h_memoryview(v: memoryview, st: _State) -> None:
    shape = v.shape or ()
    st.buf += _TAG_LEN(b"m", len(shape)) + b"".join(map(_enc_int, shape)) + _enc_str(v.format)
    data: Any = v.cast("B") if v.c_contiguous else v.tobytes()
    st.buf += _U64(len(data))
    st.stream(data)


def _h_range(v: range, st: _State) -> None:
    # range(0) == range(5, 5) and range(0, 3, 2) == range(0, 4, 2): encode what == compares.
    try:
        n = len(v)
    except OverflowError:  # more than sys.maxsize items
        n = (v.stop - v.start + v.step - (1 if v.step > 0 else -1)) // v.step
    st.buf += b"r" + _enc_int(n)
    if n:
        st.buf += _enc_int(v.start)
    if n > 1:
        st.buf += _enc_int(v.step)


def _h_slice(v: slice, st: _State) -> None:
    st.buf += b"z"
    _encode(v.start, st)
    _encode(v.stop, st)
    _encode(v.step, st)


def _h_ellipsis(v: object, st: _State) -> None:
    st.buf += b"."


# --- dates and times: aware values at one instant hash equal ---------------------------


def _micros(v: datetime | time) -> int:
    us = ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond
    if isinstance(v, datetime):
        us += v.toordinal() * 86_400_000_000
    return us


def _offset_micros(off: timedelta) -> int:
    return (off.days * 86_400 + off.seconds) * 1_000_000 + off.microseconds


def _h_datetime(v: datetime, st: _State) -> None:
    off = v.utcoffset()
    if off is None:
        st.buf += b"Dn" + _enc_int(_micros(v))
    else:
        st.buf += b"Da" + _enc_int(_micros(v) - _offset_micros(off))


def _h_date(v: date, st: _State) -> None:
    st.buf += b"a" + _enc_int(v.toordinal())


def _h_time(v: time, st: _State) -> None:
    off = v.utcoffset()
    if off is None:
        st.buf += b"hn" + _enc_int(_micros(v))
    else:
        st.buf += b"ha" + _enc_int(_micros(v) - _offset_micros(off))


def _h_timedelta(v: timedelta, st: _State) -> None:
    st.buf += b"g" + _enc_int(_offset_micros(v))


# --- classes, modules, functions -------------------------------------------------------


def _h_class(v: type, st: _State) -> None:
    st.buf += b"C" + _enc_str(_stable_name(v))


def _h_module(v: types.ModuleType, st: _State) -> None:
    st.buf += b"M" + _enc_str(v.__name__)


def _h_function(v: types.FunctionType, st: _State) -> None:
    # A function argument is its identity, its code version and the values it closes over,
    # so `lambda x: x + k` made with two different k hash apart.
    key = _enter_object(v, st)
    if key is None:
        return
    try:
        st.buf += b"L" + _enc_str(_global_name(v)) + _enc_str(code_version(v))
        _encode(v.__defaults__, st)
        _encode(v.__kwdefaults__, st)
        cells = v.__closure__ or ()
        st.buf += _U64(len(cells))
        for name, cell in zip(v.__code__.co_freevars, cells, strict=True):
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell: the variable is not bound yet
                st.buf += b"~"
                continue
            try:
                _encode(content, st)
            except _Problem as p:
                p.up(v, f".<closure {name!r}>")
                raise
    finally:
        del st.stack[key]


def _h_builtin(v: types.BuiltinFunctionType, st: _State) -> None:
    owner = v.__self__
    if owner is None or isinstance(owner, (types.ModuleType, type)):
        st.buf += b"B" + _enc_str(_global_name(v))
    else:
        _h_reduce(v, st)  # a method bound to an instance, such as [].append


# --- everything else: the pickle reduce protocol, encoded canonically ------------------


#: keys an object with no content hash by where it came from (``_provenance`` installs it:
#: a notebook variable's defining cell, a module global's module); returns None if unknown
_opaque_keyer: list[Callable[[object], str | None]] = []
#: types an instance of which had no content hash: the next one asks the keyer first
_OPAQUE_TYPES: set[type] = set()


def set_opaque_keyer(keyer: Callable[[object], str | None] | None) -> None:
    """Install (or, with None, remove) the fallback for objects that cannot be pickled.

    Such an object, anywhere in a value, is then encoded as ``p`` + the key the keyer gives
    it, and only when that key is None does hashing fail. Content comes first: an object
    is keyed this way only once its content hash failed (then its type is remembered, so
    later instances skip the failing walk)."""
    _opaque_keyer[:] = [] if keyer is None else [keyer]


def is_opaque(t: type) -> bool:
    """Whether instances of ``t`` are keyed by the opaque keyer (their content failed)."""
    return t in _OPAQUE_TYPES


def _h_reduce(v: Any, st: _State) -> None:
    if not _opaque_keyer:
        _h_reduce_content(v, st)
        return
    keyer = _opaque_keyer[0]
    if type(v) in _OPAQUE_TYPES:
        key = keyer(v)
        if key is not None:
            st.buf += b"p" + _enc_str(key)
            return
    mark, streamed = len(st.buf), st.streamed
    try:
        _h_reduce_content(v, st)
    except _Problem:
        if st.streamed != streamed:  # part of it already went into the hasher
            raise
        key = keyer(v)
        if key is None:
            raise
        del st.buf[mark:]
        _OPAQUE_TYPES.add(type(v))
        st.buf += b"p" + _enc_str(key)


def _h_reduce_content(v: Any, st: _State) -> None:
    key = _enter_object(v, st)
    if key is None:
        return
    try:
        t = type(v)
        reducer = copyreg.dispatch_table.get(t)
        try:
            rv = reducer(v) if reducer is not None else v.__reduce_ex__(5)
        except Exception as e:
            raise _Problem(v, e) from e
        if isinstance(rv, str):  # pickled by name, like a singleton
            module = getattr(v, "__module__", None)
            st.buf += b"G" + _enc_str(module if isinstance(module, str) else t.__module__)
            st.buf += _enc_str(rv)
            return
        if not isinstance(rv, tuple) or not 2 <= len(rv) <= 6:
            bad = TypeError(f"__reduce_ex__ returned {_show(rv)}, not a tuple of 2 to 6 items")
            raise _Problem(v, bad)
        func, args, state, listitems, dictitems, setter = rv + (None,) * (6 - len(rv))
        st.buf += b"R" + _enc_str(_global_name(func))
        try:
            _encode(args, st)
            _encode(state, st)
            _encode(None if listitems is None else list(listitems), st)
            _encode(None if dictitems is None else dict(dictitems), st)
        except _Problem as p:
            if p.child is state and p.path and p.path[-1].startswith("['"):
                p.path[-1] = "." + p.path[-1][2:-2]  # state['name'] reads better as .name
            p.up(v, "")
            raise
        if setter is not None:
            st.buf += _enc_str(_global_name(setter))
    finally:
        del st.stack[key]


# --- class-tagged composites -----------------------------------------------------------


def _h_enum(v: Any, st: _State) -> None:
    st.buf += b"Ke" + _enc_str(_global_name(type(v))) + _enc_str(v.name)


def _h_namedtuple(v: tuple[Any, ...], st: _State) -> None:
    st.buf += b"Kn" + _enc_str(_global_name(type(v)))
    _seq(b"t", v, st)


def _dataclass_handler(t: type) -> _Handler:
    import dataclasses

    names = tuple(f.name for f in dataclasses.fields(t) if f.compare)
    prefixes = tuple(map(_enc_str, names))
    head = b"Kd" + _enc_str(_global_name(t)) + _U64(len(names))

    def handler(v: Any, st: _State) -> None:
        key = _enter_object(v, st)
        if key is None:
            return
        try:
            st.buf += head
            for name, prefix in zip(names, prefixes, strict=True):
                st.buf += prefix
                try:
                    _encode(getattr(v, name), st)
                except _Problem as p:
                    p.up(v, f".{name}")
                    raise
        finally:
            del st.stack[key]

    return handler


def _h_pydantic(v: Any, st: _State) -> None:
    key = _enter_object(v, st)
    if key is None:
        return
    try:
        st.buf += b"Kp" + _enc_str(_global_name(type(v)))
        dumped = v.model_dump(mode="python")
        try:
            _encode(dumped, st)
        except _Problem as p:
            if p.child is dumped and p.path and p.path[-1].startswith("['"):
                p.path[-1] = "." + p.path[-1][2:-2]
            p.up(v, "")
            raise
    finally:
        del st.stack[key]


def _subclass_handler(base_handler: _Handler, convert: Callable[[Any], Any]) -> _Handler:
    def handler(v: Any, st: _State) -> None:
        st.buf += b"Ks" + _enc_str(_global_name(type(v)))
        base_handler(convert(v), st)
        extra = getattr(v, "__dict__", None)
        if extra:
            _h_dict(extra, st)
        else:
            st.buf += b"N"

    return handler


def _scalar_handler(enc: Callable[[Any], bytes]) -> _Handler:
    def handler(v: Any, st: _State) -> None:
        st.buf += enc(v)

    return handler


def _same(v: Any) -> Any:
    return v


# --- standard-library value types, looked up only once their module is loaded ----------


def _h_decimal(v: Any, st: _State) -> None:
    # Decimal("1.0") == Decimal("1.00") == Decimal("1"): strip trailing zeros, not by context.
    if v.is_nan():
        st.buf += b"qS" if v.is_snan() else b"qN"
    elif v.is_infinite():
        st.buf += b"q-" if v.is_signed() else b"q+"
    else:
        sign, digits, exponent = v.as_tuple()
        text = "".join(map(str, digits)).rstrip("0")
        if not text:
            st.buf += b"q0"
        else:
            exponent += len(digits) - len(text)
            st.buf += (b"qm" if sign else b"qp") + _enc_str(text) + _enc_int(exponent)


def _h_fraction(v: Any, st: _State) -> None:
    st.buf += b"Q" + _enc_int(v.numerator) + _enc_int(v.denominator)


def _h_uuid(v: Any, st: _State) -> None:
    st.buf += b"U" + v.bytes


def _h_path(v: Any, st: _State) -> None:
    windows = type(v).__name__.endswith("WindowsPath")
    text = str(v)
    # PureWindowsPath compares case-insensitively; hash what == compares.
    st.buf += b"Pw" + _enc_str(text.lower()) if windows else b"Pp" + _enc_str(text)


def _h_picklebuffer(v: Any, st: _State) -> None:
    data = memoryview(v).cast("B")
    st.buf += _TAG_LEN(b"b", len(data))
    st.stream(data)


# --- numpy -----------------------------------------------------------------------------


def _nd_desc(dt: Any) -> str:
    return str(dt.str) if dt.names is None else repr(dt.descr)


def _nd_body(a: NDArray[Any], st: _State) -> None:
    import numpy as np

    dt = a.dtype
    if not dt.isnative:  # equal values in either byte order hash equal
        a = a.astype(dt.newbyteorder("="))
        dt = a.dtype
    shape = a.shape
    head = _enc_str(_nd_desc(dt)) + _U64(len(shape)) + b"".join(map(_enc_int, shape))
    if dt.hasobject:
        key = _enter_container(a, st)
        try:
            st.buf += b"o" + head
            _encode_items(a.reshape(-1).tolist(), st)
        except _Problem as p:
            p.up(a, "[...]")
            raise
        finally:
            del st.stack[key]
        return
    a = np.ascontiguousarray(a)  # a no-op for the usual C-contiguous array
    st.buf += b"n" + head
    if a.nbytes >= _BIG:
        st.stream(a.reshape(-1).view(np.uint8))
    else:
        st.buf += a.tobytes()


def _h_ndarray(v: NDArray[Any], st: _State) -> None:
    import numpy as np

    if type(v) is not np.ndarray:
        st.buf += b"Ks" + _enc_str(_stable_name(type(v)))
    _nd_body(v, st)


def _h_np_masked(v: Any, st: _State) -> None:
    import numpy as np

    _kind(st, b"m", type(v))
    mask = np.ma.getmaskarray(v)
    data = np.ma.getdata(v)
    if mask.any():  # what lies under the mask is not part of the value
        data = data.copy()
        data[mask] = np.zeros((), dtype=data.dtype)
    _nd_body(mask, st)
    _nd_body(data, st)


def _h_np_scalar(v: Any, st: _State) -> None:
    if v.dtype.hasobject:  # a structured scalar holding objects: its bytes are pointers
        st.buf += b"x" + _enc_str(_nd_desc(v.dtype))
        _encode(v.item(), st)
        return
    data = v.tobytes()
    st.buf += b"x" + _enc_str(_nd_desc(v.dtype)) + _TAG_LEN(b"b", len(data)) + data


def _h_np_dtype(v: Any, st: _State) -> None:
    st.buf += b"X" + _enc_str(_nd_desc(v))


def _choose_numpy(t: type) -> _Handler | None:
    np: Any = sys.modules["numpy"]
    if issubclass(t, np.ndarray):
        ma = sys.modules.get("numpy.ma")
        if ma is not None and issubclass(t, ma.MaskedArray):
            return _h_np_masked
        return _h_ndarray
    if issubclass(t, np.generic):
        return _h_np_scalar
    if issubclass(t, np.dtype):
        return _h_np_dtype
    return None


# --- Arrow: chunking-independent, nulls never read --------------------------------------


def _arrow_chunks(typ: Any, chunks: Iterable[Any], st: _State) -> None:
    """Hash one logical column given as any number of chunks (slices, batches).

    Everything is written column-part by column-part across all chunks (validity of every
    chunk, then data of every chunk), so the bytes do not depend on where chunks split.
    """
    pa: Any = sys.modules["pyarrow"]
    parts = [c for c in chunks if len(c)]
    length = sum(map(len, parts))
    nulls = sum(c.null_count for c in parts)
    st.buf += b"w" + _enc_str(str(typ)) + _U64(length) + _U64(nulls)
    if not length:
        return
    import pyarrow.compute as pc

    if nulls and not pa.types.is_null(typ):
        for c in parts:
            if c.null_count:
                valid = pc.cast(c.is_valid(), pa.uint8())
                st.stream(valid.buffers()[1].slice(valid.offset, len(valid)))
            else:
                st.stream(b"\x01" * len(c))
    _arrow_data(pa, pc, typ, parts, st)


def _arrow_data(pa: Any, pc: Any, typ: Any, parts: list[Any], st: _State) -> None:
    at = pa.types
    if at.is_null(typ):
        return
    if isinstance(typ, pa.BaseExtensionType):
        _arrow_chunks(typ.storage_type, [c.storage for c in parts], st)
        return
    if at.is_dictionary(typ):  # chunks may carry different dictionaries: hash the values
        _arrow_chunks(typ.value_type, [c.dictionary_decode() for c in parts], st)
        return
    if at.is_boolean(typ):
        for c in parts:
            u = pc.cast(pc.fill_null(c, False) if c.null_count else c, pa.uint8())
            st.stream(u.buffers()[1].slice(u.offset, len(u)))
        return
    try:
        width = typ.bit_width
    except ValueError:
        width = 0
    if width and width % 8 == 0 and typ.num_buffers == 2:
        w = width // 8
        for c in parts:
            if c.null_count:  # zero the slots under nulls: their bytes are undefined
                c = pc.fill_null(c.view(pa.binary(w)), b"\0" * w)
            st.stream(c.buffers()[1].slice(c.offset * w, len(c) * w))
        return
    view = getattr(at, "is_string_view", None)
    if view is not None and (view(typ) or at.is_binary_view(typ)):
        large = pa.large_string() if view(typ) else pa.large_binary()
        _arrow_var_width(pa, pc, large, [c.cast(large) for c in parts], st)
        return
    if at.is_string(typ) or at.is_binary(typ) or at.is_large_string(typ) or at.is_large_binary(typ):
        _arrow_var_width(pa, pc, typ, parts, st)
        return
    if at.is_map(typ):
        as_list = pa.list_(pa.struct([typ.key_field, typ.item_field]))
        parts = [c.cast(as_list) for c in parts]
        typ = as_list
    if at.is_list(typ) or at.is_large_list(typ) or at.is_fixed_size_list(typ):
        if not at.is_fixed_size_list(typ):
            for c in parts:
                n = pc.fill_null(pc.list_value_length(c), 0)
                w = n.type.bit_width // 8
                st.stream(n.buffers()[1].slice(n.offset * w, len(n) * w))
        values = [c.flatten() for c in parts]  # drops values behind null lists
        _arrow_chunks(values[0].type, values, st)
        return
    if at.is_struct(typ):
        fields = [c.flatten() for c in parts]  # child arrays with the parent's nulls merged
        for i in range(typ.num_fields):
            _arrow_chunks(typ.field(i).type, [f[i] for f in fields], st)
        return
    # Unions, run-end encoded, list views ...: one IPC message of the combined column.
    combined = pa.chunked_array(parts, type=typ).combine_chunks()
    batch = pa.record_batch([combined], names=[""])
    st.stream(ipc_buffer(batch))


def _arrow_var_width(pa: Any, pc: Any, typ: Any, parts: list[Any], st: _State) -> None:
    large = pa.types.is_large_string(typ) or pa.types.is_large_binary(typ)
    width, at = (8, _I64_AT) if large else (4, _I32_AT)
    empty = "" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else b""
    parts = [pc.fill_null(c, empty) if c.null_count else c for c in parts]
    for c in parts:  # lengths, not offsets: offsets depend on where the chunk starts
        n = pc.binary_length(c)
        st.stream(n.buffers()[1].slice(n.offset * width, len(n) * width))
    for c in parts:
        buffers = c.buffers()
        start = at(buffers[1], c.offset * width)[0]
        end = at(buffers[1], (c.offset + len(c)) * width)[0]
        if end > start:
            st.stream(buffers[2].slice(start, end - start))


def _arrow_table_body(table: Any, st: _State) -> None:
    pa: Any = sys.modules["pyarrow"]
    schema = table.schema
    st.buf += _U64(table.num_rows) + _U64(len(schema))
    for field in schema:
        st.buf += _enc_str(field.name) + _enc_str(str(field.type))
        st.buf += b"T" if field.nullable else b"F"
    for i, field in enumerate(schema):
        column = table.column(i)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        _arrow_chunks(field.type, chunks, st)


def _h_arrow_table(v: Any, st: _State) -> None:
    _kind(st, b"A", type(v))
    _arrow_table_body(v, st)


def _h_arrow_batch(v: Any, st: _State) -> None:
    _kind(st, b"B", type(v))
    _arrow_table_body(v, st)


def _h_arrow_chunked(v: Any, st: _State) -> None:
    _kind(st, b"C", type(v))
    _arrow_chunks(v.type, v.chunks, st)


def _h_arrow_array(v: Any, st: _State) -> None:
    _kind(st, b"a", type(v))
    _arrow_chunks(v.type, [v], st)


def _choose_pyarrow(t: type) -> _Handler | None:
    pa: Any = sys.modules["pyarrow"]
    if issubclass(t, pa.Table):
        return _h_arrow_table
    if issubclass(t, pa.RecordBatch):
        return _h_arrow_batch
    if issubclass(t, pa.ChunkedArray):
        return _h_arrow_chunked
    if issubclass(t, pa.Array):
        return _h_arrow_array
    return None


def _arrow_of(converted: Any, st: _State) -> None:
    pa: Any = sys.modules["pyarrow"]
    chunks = converted.chunks if isinstance(converted, pa.ChunkedArray) else [converted]
    _arrow_chunks(converted.type, chunks, st)


# --- polars: through its Arrow export ---------------------------------------------------


def _h_polars_frame(v: Any, st: _State) -> None:
    try:
        table = v.to_arrow()
    except Exception:  # Object columns have no Arrow form
        _h_reduce(v, st)
        return
    _kind(st, b"L", type(v))
    _arrow_table_body(table, st)


def _h_polars_series(v: Any, st: _State) -> None:
    try:
        array = v.to_arrow()
    except Exception:
        _h_reduce(v, st)
        return
    _kind(st, b"l", type(v))
    st.buf += _enc_str(v.name)
    _arrow_of(array, st)


def _choose_polars(t: type) -> _Handler | None:
    pl: Any = sys.modules["polars"]
    if issubclass(t, pl.DataFrame):
        return _h_polars_frame
    if issubclass(t, pl.Series):
        return _h_polars_series
    return None


# --- pandas: numeric columns from their buffers, the rest through Arrow -----------------


def _pd_values(obj: Any, st: _State) -> None:
    """The values of a Series or a flat Index (not its name, not its index)."""
    import numpy as np
    import pandas as pd

    dtype = obj.dtype
    st.buf += _enc_str(str(dtype)) + _U64(len(obj))
    if isinstance(dtype, np.dtype):
        values = obj.to_numpy()  # a view for numpy-backed columns
        if dtype.kind == "O":
            try:
                _encode_items(values, st)
            except _Problem as p:
                p.up(obj, "[...]")
                raise
        else:
            _nd_body(values, st)
    elif isinstance(dtype, pd.CategoricalDtype):
        st.buf += b"T" if dtype.ordered else b"F"
        _pd_index(dtype.categories, st)
        _nd_body(obj.array.codes, st)
    else:
        _pd_extension(obj.array, st)


def _pd_extension(arr: Any, st: _State) -> None:
    try:
        import pyarrow as pa

        converted = pa.array(arr)  # through __arrow_array__: masks become Arrow nulls
    except Exception:
        converted = None
    if converted is not None:
        st.buf += b"w"
        _arrow_of(converted, st)
        return
    st.buf += b"O"
    try:
        _encode_items(list(arr), st)
    except _Problem as p:
        p.up(arr, "[...]")
        raise


def _pd_index(idx: Any, st: _State) -> None:
    import pandas as pd

    _kind(st, b"x", type(idx))
    _encode(list(idx.names), st)
    if isinstance(idx, pd.MultiIndex):
        st.buf += _U64(idx.nlevels)
        for i in range(idx.nlevels):
            _pd_values(idx.get_level_values(i), st)
    elif isinstance(idx, pd.RangeIndex):  # cheap, and not materialized
        _h_range(range(idx.start, idx.stop, idx.step), st)
    else:
        _pd_values(idx, st)


def _h_pd_index(v: Any, st: _State) -> None:
    _pd_index(v, st)


def _h_pd_series(v: Any, st: _State) -> None:

    _kind(st, b"r", type(v))
    _encode(v.name, st)
    _pd_index(v.index, st)
    _pd_values(v, st)


def _h_pd_frame(v: Any, st: _State) -> None:

    _kind(st, b"f", type(v))
    _pd_index(v.columns, st)
    _pd_index(v.index, st)
    ncols = v.shape[1]
    st.buf += _U64(ncols)
    for i in range(ncols):
        try:
            _pd_values(v.iloc[:, i], st)
        except _Problem as p:
            p.up(v, f"[{_show(v.columns[i])}]")
            raise


def _h_pd_array(v: Any, st: _State) -> None:
    import pandas as pd

    _kind(st, b"c", type(v))
    _pd_values(pd.Series(v, copy=False), st)


def _h_pd_timestamp(v: Any, st: _State) -> None:
    # Timestamps of one instant in different units or zones are equal; nanoseconds count.
    off = v.utcoffset()
    us = _micros(v) - (0 if off is None else _offset_micros(off))
    st.buf += b"KT" + (b"n" if off is None else b"a") + _enc_int(us) + _enc_int(v.nanosecond)


def _h_pd_timedelta(v: Any, st: _State) -> None:
    st.buf += b"KD" + _enc_int(_offset_micros(v)) + _enc_int(v.nanoseconds)


def _h_pd_nat(v: Any, st: _State) -> None:
    st.buf += b"KN"


def _choose_pandas(t: type) -> _Handler | None:
    pd: Any = sys.modules["pandas"]
    if issubclass(t, pd.DataFrame):
        return _h_pd_frame
    if issubclass(t, pd.Series):
        return _h_pd_series
    if issubclass(t, pd.Index):
        return _h_pd_index
    if issubclass(t, pd.Timestamp):
        return _h_pd_timestamp
    if issubclass(t, pd.Timedelta):
        return _h_pd_timedelta
    if t is type(pd.NaT):
        return _h_pd_nat
    if issubclass(t, pd.api.extensions.ExtensionArray):
        return _h_pd_array
    return None


# Consulted only when the library is already imported: a value of its types implies that.
_LIBRARIES: tuple[tuple[str, Callable[[type], _Handler | None]], ...] = (
    ("pandas", _choose_pandas),
    ("polars", _choose_polars),
    ("pyarrow", _choose_pyarrow),
    ("numpy", _choose_numpy),
)

_HANDLERS: dict[type, _Handler] = {
    bytes: _h_bytes,
    bytearray: _h_bytearray,
    memoryview: _h_memoryview,
    list: _h_list,
    tuple: _h_tuple,
    dict: _h_dict,
    set: _h_set,
    frozenset: _h_frozenset,
    range: _h_range,
    slice: _h_slice,
    type(Ellipsis): _h_ellipsis,
    datetime: _h_datetime,
    date: _h_date,
    time: _h_time,
    timedelta: _h_timedelta,
    type: _h_class,
    types.ModuleType: _h_module,
    types.FunctionType: _h_function,
    types.BuiltinFunctionType: _h_builtin,
}
_HANDLERS_GET = _HANDLERS.get

# Subclasses of builtin value types: the subclass name, the base value, then any __dict__.
# The converters call the base slot directly so an overriding subclass cannot interfere.
_BUILTIN_BASES: tuple[tuple[type, _Handler, Callable[[Any], Any]], ...] = (
    (int, _scalar_handler(_enc_int), int.__int__),
    (float, _scalar_handler(_enc_float), float.__float__),
    (complex, _scalar_handler(_enc_complex), _same),
    (str, _scalar_handler(_enc_str), str.__str__),
    (bytes, _h_bytes, _same),
    (bytearray, _h_bytearray, _same),
    (list, _h_list, _same),
    (tuple, _h_tuple, _same),
    (dict, _h_dict, _same),
    (set, _h_set, _same),
    (frozenset, _h_frozenset, _same),
    (datetime, _h_datetime, _same),
    (date, _h_date, _same),
    (time, _h_time, _same),
    (timedelta, _h_timedelta, _same),
)

_RESOLVED: weakref.WeakKeyDictionary[type, _Handler] = weakref.WeakKeyDictionary()


def _resolve(t: type) -> _Handler:
    h = _RESOLVED.get(t)
    if h is None:
        h = _choose(t)
        try:
            _RESOLVED[t] = h
        except TypeError:  # a type that cannot be weakly referenced: just do not cache
            pass
    return h


def _choose(t: type) -> _Handler:
    modules = sys.modules
    for name, choose in _LIBRARIES:
        if name in modules:
            h = choose(t)
            if h is not None:
                return h
    if issubclass(t, type):
        return _h_class
    enum = modules.get("enum")
    if enum is not None and issubclass(t, enum.Enum):
        return _h_enum
    if issubclass(t, tuple) and hasattr(t, "_fields"):
        return _h_namedtuple
    dataclasses = modules.get("dataclasses")
    if dataclasses is not None and dataclasses.is_dataclass(t):
        return _dataclass_handler(t)
    pydantic_main = modules.get("pydantic.main")
    if pydantic_main is not None and issubclass(t, pydantic_main.BaseModel):
        return _h_pydantic
    for base, handler, convert in _BUILTIN_BASES:
        if issubclass(t, base):
            return _subclass_handler(handler, convert)
    for module, attr, handler in _STDLIB:
        cls = getattr(modules.get(module), attr, None)
        if cls is not None and issubclass(t, cls):
            return handler
    return _h_reduce


_STDLIB: tuple[tuple[str, str, _Handler], ...] = (
    ("decimal", "Decimal", _h_decimal),
    ("fractions", "Fraction", _h_fraction),
    ("uuid", "UUID", _h_uuid),
    ("pathlib", "PurePath", _h_path),
    ("pickle", "PickleBuffer", _h_picklebuffer),
)


# --- public: values ---------------------------------------------------------------------


def hash_value(value: object, *, name: str = "value") -> bytes:
    """The canonical 16-byte xxh3_128 content digest of ``value``.

    ``name`` says what the value is in error messages ("value", "variable 'df'" ...); an
    unhashable part is located from it (``value['db'][0]``) when it is an identifier.
    Raises :class:`UnhashableInputError` for values that cannot be pickled and for cycles.
    """
    f = _SCALAR_GET(type(value))
    if f is not None:
        return _digest(f(value))
    st = _State()
    try:
        _encode(value, st)
    except _Problem as p:
        raise p.error(name, name if name.isidentifier() else "value") from p.cause
    except RecursionError:
        raise _too_deep(name) from None
    return st.digest()


# --- public: callables -------------------------------------------------------------------


def _class_attr(t: type, name: str) -> object:
    return next((vars(k)[name] for k in t.__mro__ if name in vars(k)), None)


def _split_callable(fn: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The function that really runs, and the arguments bound in front of the caller's.

    partial(f, 1) -> (f, (1,)); obj.method -> (Class.method, (obj,)); a functools.wraps
    wrapper -> what it wraps; a callable instance -> (Class.__call__, (instance,)).
    """
    pre_args: tuple[Any, ...] = ()
    pre_kwargs: dict[str, Any] = {}
    for _ in range(100):  # bounded: __wrapped__ chains can loop
        if isinstance(fn, functools.partial):
            pre_args = tuple(fn.args) + pre_args
            pre_kwargs = {**fn.keywords, **pre_kwargs}
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            pre_args = (fn.__self__, *pre_args)
            fn = fn.__func__
        elif isinstance(fn, (staticmethod, classmethod)):
            fn = fn.__func__
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        elif not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)) and (
            isinstance(_class_attr(type(fn), "__call__"), types.FunctionType)
        ):
            pre_args = (fn, *pre_args)
            fn = type(fn).__call__
        else:
            break
    return fn, pre_args, pre_kwargs


def effect_identity(fn: Callable[..., object]) -> str:
    """``module.qualname`` of the function an effect runs (through partials, bound methods
    and ``functools.wraps`` wrappers). Lambdas and local functions keep their qualname as
    is (``mod.outer.<locals>.<lambda>``); the code version tells such functions apart."""
    target, _, _ = _split_callable(fn)
    return _global_name(target)


_VERSIONS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def code_version(fn: Callable[..., object]) -> str:
    """16 hex chars identifying the code of ``fn``: its source with comments, formatting,
    docstrings and decorators removed (the ``ast`` dump), so only real edits change it.

    Without source (``exec`` without linecache) the code object is hashed instead, and a
    builtin is its ``module.qualname``. Cached per function object. The value is specific
    to the Python minor version, whose ``ast`` and bytecode differ.
    """
    target, _, _ = _split_callable(fn)
    try:
        return _VERSIONS[target]
    except (KeyError, TypeError):
        pass
    version = _compute_version(target)
    try:
        _VERSIONS[target] = version
    except TypeError:
        pass
    return version


def _compute_version(target: Any) -> str:
    if isinstance(target, (types.FunctionType, type)):
        dump = _normalized_source(target)
        if dump is not None:
            return _hex64(b"ast\0" + dump.encode("utf-8", "surrogatepass"))
        st = _State()
        if isinstance(target, types.FunctionType):
            _encode_code(target.__code__, target.__doc__, st)
            # Defaults are not in the code object, but in the source they are.
            try:
                st.buf += _sub((target.__defaults__, target.__kwdefaults__), st)
            except (_Problem, RecursionError):
                st.buf += b"?"
        else:
            st.buf += b"class" + _enc_str(_global_name(target))
            for name, member in sorted(vars(target).items()):
                member = getattr(member, "__func__", member)
                if isinstance(member, types.FunctionType):
                    st.buf += _enc_str(name)
                    _encode_code(member.__code__, member.__doc__, st)
        return _hex64(b"code\0" + st.digest())
    return _hex64(b"name\0" + _global_name(target).encode("utf-8", "surrogatepass"))


#: superinstructions the compiler forms only when both halves are on one line (3.13+):
#: split, so that formatting does not change the code version
_SUPERINSTRUCTIONS = {
    "LOAD_FAST_LOAD_FAST": ("LOAD_FAST", "LOAD_FAST"),
    "STORE_FAST_LOAD_FAST": ("STORE_FAST", "LOAD_FAST"),
    "STORE_FAST_STORE_FAST": ("STORE_FAST", "STORE_FAST"),
    "LOAD_FAST_BORROW_LOAD_FAST_BORROW": ("LOAD_FAST_BORROW", "LOAD_FAST_BORROW"),
}
_OP = struct.Struct("<Hq").pack


def _normalized_bytecode(co: types.CodeType) -> bytes:
    """The instructions of ``co`` without what depends on where its lines break: no NOPs
    (kept for line events), superinstructions split into their halves, and jump targets
    as positions in this normalized stream instead of byte offsets. Line numbers and
    positions (``co_firstlineno``, ``co_linetable``) are not part of it either."""
    import dis

    jumps = frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
    instructions = list(dis.get_instructions(co))
    position: dict[int, int] = {}  # byte offset -> index in the normalized stream
    n = 0
    for ins in instructions:
        position[ins.offset] = n
        if ins.opname != "NOP":
            n += 2 if ins.opname in _SUPERINSTRUCTIONS else 1
    out = bytearray()
    for ins in instructions:
        name, arg = ins.opname, ins.arg if ins.arg is not None else -1
        if name == "NOP":
            continue
        halves = _SUPERINSTRUCTIONS.get(name)
        if halves is not None:
            out += _OP(dis.opmap[halves[0]], arg >> 4) + _OP(dis.opmap[halves[1]], arg & 15)
            continue
        if ins.opcode in jumps and isinstance(ins.argval, int) and ins.argval in position:
            arg = position[ins.argval]
        out += _OP(ins.opcode, arg)
    return bytes(out)


def _encode_code(co: types.CodeType, doc: object, st: _State) -> None:
    # Line numbers live in co_linetable, which is left out: moving code changes nothing.
    code = _normalized_bytecode(co)
    st.buf += b"Y" + _TAG_LEN(b"b", len(code)) + code
    st.buf += b"".join(
        map(_enc_int, (co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_flags))
    )
    for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
        _h_tuple(names, st)
    consts = co.co_consts
    # A def's first constant is its docstring, or None in its place (before Python 3.14).
    if consts and (consts[0] is None or (doc is not None and consts[0] == doc)):
        consts = consts[1:]
    st.buf += _U64(len(consts))
    for const in consts:
        if isinstance(const, types.CodeType):
            _encode_code(const, None, st)
        else:
            _encode(const, st)


def _normalized_source(target: Any) -> str | None:
    import ast
    import inspect

    try:
        source = inspect.getsource(target)
    except Exception:  # OSError, TypeError, and IndexError for stale linecache entries
        return None
    tree = _parse_fragment(source)
    if tree is None:
        return None
    node = _find_definition(tree, target)
    if node is None:
        return None
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = n.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                del body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        node.decorator_list = []
    return ast.dump(node, annotate_fields=False, include_attributes=False)


def _parse_fragment(source: str) -> ast.Module | None:
    import ast
    import textwrap

    try:
        return ast.parse(textwrap.dedent(source))
    except SyntaxError:
        pass
    try:  # an indented block whose strings reach column 0 defeats dedent
        wrapped = ast.parse("if 1:\n" + source)
    except SyntaxError:
        return None
    first = wrapped.body[0]
    return ast.Module(body=first.body, type_ignores=[]) if isinstance(first, ast.If) else None


def _find_definition(tree: ast.Module, target: Any) -> ast.AST | None:
    import ast

    if getattr(target, "__name__", None) == "<lambda>":
        lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
        if len(lambdas) == 1:
            return lambdas[0]
        code = target.__code__
        for node in lambdas:  # several on one line: the one that compiles to this code
            try:
                compiled = compile(ast.Expression(body=node), "<lambda>", "eval")
            except (SyntaxError, ValueError, TypeError):
                continue
            for const in compiled.co_consts:
                if (
                    isinstance(const, types.CodeType)
                    and const.co_code == code.co_code
                    and const.co_names == code.co_names
                ):
                    return node
        return None
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    defs = [n for n in tree.body if isinstance(n, kinds)]
    for definition in defs:
        if definition.name == getattr(target, "__name__", None):
            return definition
    return defs[0] if defs else None


def _generic_signature() -> inspect.Signature:
    import inspect

    return inspect.Signature(
        [
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )


class ArgBinder:
    """Binds a call's arguments to one function's parameters and hashes them.

    Built once per function. ``bind`` applies defaults and makes keyword order irrelevant;
    ``input_hash`` is the effect key's input part: the hex xxh3_128 of every parameter's
    name and canonical value, in signature order. Arguments that partials and bound methods
    carry (including ``self``) are part of the input. With ``skip_first=True`` the first
    parameter after those (a workflow's ``ctx``) is neither bound nor hashed.

    For a signature without ``*args``, ``**kwargs`` or keyword-only parameters, binding
    never goes through ``inspect.Signature.bind`` (only a wrong call does, for its error
    message), and when the values given are None, bool, int, float, complex or str the
    digest is built from precomputed parameter and default encodings in one buffer. Both
    shortcuts produce exactly what the general path would.
    """

    __slots__ = (
        "_default_parts",
        "_defaults",
        "_fast",
        "_head",
        "_n",
        "_names",
        "_nposonly",
        "_nreq",
        "_pre",
        "_pre_kwargs",
        "_prefixes",
        "_shown",
        "_tails",
        "identity",
        "signature",
    )

    def __init__(self, fn: Callable[..., object], *, skip_first: bool = False) -> None:
        import inspect

        target, pre, pre_kwargs = _split_callable(fn)
        self.identity: str = _global_name(target)
        try:
            sig = inspect.signature(target, follow_wrapped=False)
        except (TypeError, ValueError):  # some builtins have no introspectable signature
            sig = _generic_signature()
        params = list(sig.parameters.values())
        kind = inspect.Parameter
        positional = (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)
        if skip_first:
            i = len(pre)
            if i < len(params) and params[i].kind in positional:
                del params[i]
            elif i >= len(params) or params[i].kind is not kind.VAR_POSITIONAL:
                raise ArgumentTypeError(
                    f"{self.identity}{sig} has no leading positional parameter to receive the "
                    "workflow context; declare it first, as in def f(ctx, ...)"
                )
        self.signature: inspect.Signature = sig.replace(parameters=params)
        # For error messages: names and defaults; annotations may be strings or long.
        self._shown = self.identity + str(
            sig.replace(
                parameters=[p.replace(annotation=kind.empty) for p in params],
                return_annotation=kind.empty,
            )
        )
        self._pre = pre
        self._pre_kwargs = pre_kwargs
        n = self._n = len(params)
        self._names = tuple(p.name for p in params)
        self._prefixes = tuple(_enc_str(p.name) for p in params)
        self._head = b"A" + _U64(n)
        self._fast = not pre_kwargs and all(p.kind in positional for p in params)
        self._nposonly = sum(p.kind is kind.POSITIONAL_ONLY for p in params)
        self._nreq = next((i for i, p in enumerate(params) if p.default is not kind.empty), n)
        self._defaults = tuple(p.default for p in params[self._nreq :])
        # Parameter name + default, encoded once; None where the parameter is required or
        # its default is not an immutable scalar (that one is encoded per call).
        parts: list[bytes | None] = [None] * self._nreq
        for prefix, default in zip(self._prefixes[self._nreq :], self._defaults, strict=True):
            enc = _SCALAR_GET(type(default))
            parts.append(None if enc is None else prefix + enc(default))
        self._default_parts = tuple(parts)
        # ... and joined, for a call that gives the first k arguments positionally.
        self._tails: tuple[bytes | None, ...] = tuple(
            None if None in parts[k:] else b"".join(p for p in parts[k:] if p is not None)
            for k in range(n + 1)
        )

    def __repr__(self) -> str:
        return f"ArgBinder({self._shown})"

    def bind(self, args: Sequence[object], kwargs: Mapping[str, object]) -> dict[str, object]:
        """Parameter name -> value for every parameter, defaults applied, in signature order.

        Raises :class:`ArgumentTypeError` for a missing, unexpected or doubled argument.
        """
        full = self._pre + tuple(args) if self._pre else tuple(args)
        if self._fast:
            bound = self._bind_plain(full, kwargs)
            if bound is not None:
                return bound
        merged = {**self._pre_kwargs, **kwargs}
        try:
            ba = self.signature.bind(*full, **merged)
        except TypeError as e:
            raise ArgumentTypeError(
                f"{self.identity}() {e}; pass arguments that match its signature {self._shown}"
            ) from None
        ba.apply_defaults()
        return dict(ba.arguments)

    def _bind_plain(
        self, full: tuple[object, ...], kwargs: Mapping[str, object]
    ) -> dict[str, object] | None:
        """Bind to a plain signature, or None for a wrong call (left to inspect's message)."""
        k = len(full)
        if k > self._n:
            return None
        bound = dict(zip(self._names, full, strict=False))  # full may be shorter
        used = 0
        for i in range(k, self._n):
            name = self._names[i]
            if name in kwargs and i >= self._nposonly:
                bound[name] = kwargs[name]
                used += 1
            elif i >= self._nreq:
                bound[name] = self._defaults[i - self._nreq]
            else:
                return None
        return bound if used == len(kwargs) else None

    def input_hash(self, args: Sequence[object], kwargs: Mapping[str, object]) -> str:
        """32 hex chars: the canonical hash of the call's bound arguments."""
        if self._fast:
            full = self._pre + tuple(args) if self._pre else args
            k = len(full)
            if k <= self._n:
                parts = [self._head]
                get = _SCALAR_GET
                for prefix, v in zip(self._prefixes, full, strict=False):
                    enc = get(type(v))
                    if enc is None:
                        break
                    parts.append(prefix)
                    parts.append(enc(v))
                else:
                    if not kwargs:
                        tail = self._tails[k]
                        if tail is not None:
                            parts.append(tail)
                            return _hexdigest(b"".join(parts))
                    elif self._keyword_parts(k, kwargs, parts):
                        return _hexdigest(b"".join(parts))
        return self.hash_bound(self.bind(args, kwargs))

    def _keyword_parts(self, k: int, kwargs: Mapping[str, object], parts: list[bytes]) -> bool:
        """Append parameters k.. given by keyword or left to default; False: take the long way."""
        get = _SCALAR_GET
        used = 0
        for i in range(k, self._n):
            name = self._names[i]
            if name in kwargs and i >= self._nposonly:
                v = kwargs[name]
                enc = get(type(v))
                if enc is None:
                    return False
                parts.append(self._prefixes[i])
                parts.append(enc(v))
                used += 1
            else:
                default = self._default_parts[i]
                if default is None:
                    return False
                parts.append(default)
        return used == len(kwargs)

    def hash_bound(self, bound: Mapping[str, object]) -> str:
        """``input_hash`` of arguments already bound by :meth:`bind`."""
        st = _State()
        st.buf += self._head
        for name, prefix in zip(self._names, self._prefixes, strict=True):
            st.buf += prefix
            try:
                _encode(bound[name], st)
            except _Problem as p:
                raise p.error(f"argument {name!r} of {self.identity}", name) from p.cause
            except RecursionError:
                raise _too_deep(f"argument {name!r} of {self.identity}") from None
        return st.hexdigest()
