"""``dn.wrap(obj)``: an object whose method calls are effects (guide, "Wrap a client once").

``client = dn.wrap(OpenAI(...), retry=3)`` makes ``client.chat.completions.create(...)`` an
effect keyed by the wrapped object's key, the method's path and the call's arguments, so an
SDK's calls replay without decorating a function — in ``%%effect`` cells, plain cells and
runs alike (the scope is the caller's, as for any ``@effect`` call).

- The object's key is its content hash when it has one, else its provenance (the cell that
  assigned the wrapper: ``_provenance.py``), else ``key=`` given to ``wrap``; with none of
  them a call raises :class:`UnhashableInputError` saying to pass ``key=``.
- Attributes whose value is an object of the wrapped object's own library
  (``client.chat.completions``) are wrapped in turn, so a call through them is an effect;
  data (strings, numbers, containers) and objects of other libraries pass through as they
  are, and so does anything reached with ``wrapped.__wrapped__``.
- A call returning a stream (an iterator, a generator, an SDK ``Stream``; async ones from
  an awaited method) is read to its end inside the effect and returned as :class:`Chunks`,
  which iterates (sync or async) over the same chunks on every replay.
- The identity is ``wrap:<module>.<class>.<path>`` (or ``name=`` + the path); the code
  version is ``version=`` (default ``"wrap"``: the library's code is not yours, so
  upgrading it does not re-run your calls). ``retry=``, ``timeout=``, ``cache_errors=`` and
  ``shared=`` mean what they mean for ``@effect``.
"""

from __future__ import annotations

import inspect
import io
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

from .. import _hashing
from ..errors import ArgumentError, ArgumentTypeError, UnhashableInputError
from ._effects import EffectFunction
from ._retry import Retry

__all__ = ["Chunks", "Wrapped", "wrap"]

T = TypeVar("T")

_DATA = (str, bytes, bytearray, int, float, complex, bool, type(None), list, tuple, dict, set)


class Chunks:
    """The chunks of a streamed response, read to its end: iterate it with ``for`` or
    ``async for``, as often as you like; ``with`` and ``close()`` work as on a stream."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    async def _aiter(self) -> AsyncIterator[Any]:
        for item in self.items:
            yield item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    def __len__(self) -> int:
        return len(self.items)

    def __enter__(self) -> Chunks:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    async def __aenter__(self) -> Chunks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<Chunks: {len(self.items)} chunks>"


def _is_stream(value: object) -> bool:
    if isinstance(value, (*_DATA, io.IOBase)):
        return False
    t = type(value)
    return hasattr(t, "__next__") or hasattr(t, "__anext__")


class Wrapped(Generic[T]):
    """A proxy of an object (or of one of its attributes) whose method calls are effects."""

    __slots__ = ("__wrapped__", "_calls", "_options", "_path", "_root")

    def __init__(
        self, obj: T, root: Wrapped[Any] | None, path: tuple[str, ...], options: dict[str, Any]
    ) -> None:
        self.__wrapped__ = obj
        self._root: Wrapped[Any] = root if root is not None else self
        self._path = path
        self._options = options
        self._calls: dict[tuple[str, ...], tuple[EffectFunction[..., Any], ...]] = {}

    def __repr__(self) -> str:
        return f"<wrapped {self.__wrapped__!r}>"

    def __dir__(self) -> list[str]:
        return dir(self.__wrapped__)

    def __reduce__(self) -> Any:
        # what a wrapper hashes as: the object (its content or, failing that, the wrapper's
        # provenance), never the effects it has made so far
        return (_unwrapped, (self.__wrapped__, self._path))

    def __getattr__(self, name: str) -> Any:
        if name in Wrapped.__slots__:  # not set yet (a copy under construction)
            raise AttributeError(name)
        value = getattr(self.__wrapped__, name)
        if name.startswith("_") or isinstance(value, (*_DATA, type, types.ModuleType)):
            return value
        if callable(value):
            return self._root._method((*self._path, name))
        top = type(self._root.__wrapped__).__module__.partition(".")[0]
        if type(value).__module__.partition(".")[0] == top:
            return Wrapped(value, self._root, (*self._path, name), self._options)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._root._method(self._path)(*args, **kwargs)

    # the key of the wrapped object: content, else provenance, else key=
    def _root_key(self) -> str:
        given = self._options.get("key")
        if given is not None:
            return str(given)
        try:
            return _hashing.hash_value(self._root, name="the wrapped object").hex()
        except UnhashableInputError as e:
            raise UnhashableInputError(
                f"dn.wrap: {self._root.__wrapped__!r} has no content hash and no provenance "
                "(it was not assigned by a notebook cell); give it a key that stands for "
                "its configuration: dn.wrap(obj, key='openai-prod')"
            ) from e

    def _method(self, path: tuple[str, ...]) -> Any:
        calls = self._calls.get(path)
        if calls is None:
            calls = self._calls[path] = self._effects(path)
        sync_call, async_call = calls

        def call(*args: Any, **kwargs: Any) -> Any:
            target: Any = self.__wrapped__
            for part in path:
                target = getattr(target, part)
            is_async = (
                inspect.iscoroutinefunction(target)
                or inspect.iscoroutinefunction(
                    getattr(target, "__call__", None)  # noqa: B004  # a callable object's method
                )
                # a sync decorator over an async method (openai's AsyncCompletions.create)
                or inspect.iscoroutinefunction(inspect.unwrap(target))
            )
            ef = async_call if is_async else sync_call
            return ef(self._root_key(), _Target(target), *args, **kwargs)

        call.__name__ = path[-1] if path else "__call__"
        return call

    def _effects(self, path: tuple[str, ...]) -> tuple[EffectFunction[..., Any], ...]:
        opts = self._options
        t = type(self.__wrapped__)
        base = opts.get("name") or f"wrap:{t.__module__}.{t.__qualname__}"
        identity = ".".join([base, *path]) if path else base

        def invoke(__key: str, __target: _Target, *args: Any, **kwargs: Any) -> Any:
            result = __target.fn(*args, **kwargs)
            if _is_stream(result):
                return Chunks(list(result))
            return result

        async def invoke_async(__key: str, __target: _Target, *args: Any, **kwargs: Any) -> Any:
            result = await __target.fn(*args, **kwargs)
            if _is_stream(result):
                if hasattr(type(result), "__anext__"):
                    return Chunks([item async for item in result])
                return Chunks(list(result))
            return result

        common: dict[str, Any] = {
            "name": identity,
            "version": opts.get("version") or "wrap",
            "retry": opts.get("retry"),
            "timeout": opts.get("timeout"),
            "cache_errors": opts.get("cache_errors", False),
            "shared": opts.get("shared", False),
            "limit": opts.get("limit"),
            "concurrency": opts.get("concurrency"),
            "rate": opts.get("rate"),
        }
        return (
            EffectFunction(invoke, **common),
            EffectFunction(invoke_async, **common),
        )


class _Target:
    """The method to call travels with the call but is no part of its key: the key is the
    wrapped object's key and the path, which name the method already."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __reduce__(self) -> Any:
        return (_Target, (None,))

    def __repr__(self) -> str:
        return getattr(self.fn, "__qualname__", "method")


def _unwrapped(obj: Any, path: tuple[str, ...]) -> Any:
    return obj


def wrap(
    obj: T,
    *,
    key: str | None = None,
    name: str | None = None,
    version: str | None = None,
    retry: Retry | int | None = None,
    timeout: float | None = None,
    cache_errors: bool = False,
    shared: bool = False,
    limit: str | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
) -> T:
    """Wrap ``obj`` so its method calls are effects (see the module docstring). The result
    passes for ``obj`` (attributes, ``dir``); ``wrapped.__wrapped__`` is ``obj`` itself."""
    if isinstance(obj, Wrapped):
        raise ArgumentError(f"{obj!r} is wrapped already; wrap the object once")
    if isinstance(obj, (*_DATA, type, types.ModuleType)) or (
        not hasattr(obj, "__dict__") and (not hasattr(type(obj), "__slots__"))
    ):
        raise ArgumentTypeError(
            f"dn.wrap needs an object with methods (an API client, a session), got {obj!r}; "
            "decorate a function with @dn.effect instead"
        )
    if key is not None and (not isinstance(key, str) or not key):
        raise ArgumentTypeError(f"key must be a non-empty str, got {key!r}")
    options = {
        "key": key,
        "name": name,
        "version": version,
        "retry": retry,
        "timeout": timeout,
        "cache_errors": cache_errors,
        "shared": shared,
        "limit": limit,
        "concurrency": concurrency,
        "rate": rate,
    }
    w: Wrapped[T] = Wrapped(obj, None, (), options)
    # check the options now, naming them, rather than at the first call
    w._calls[("__check__",)] = w._effects(("__check__",))
    del w._calls[("__check__",)]
    return w  # type: ignore[return-value]  # a proxy that passes for T
