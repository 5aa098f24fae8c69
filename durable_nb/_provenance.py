"""Provenance keys: what stands for a value that has no content hash (guide, "Provenance").

An API client, a database connection or an HTTP session cannot be content-hashed (it holds
locks and sockets), yet the cells that use it should be cached. Such a value is keyed by
where it came from:

- a variable assigned by a cell: the cell's normalized source (comments and formatting do
  not count), the name, and the keys of everything that cell read, recursively — the
  provenance keys of the variables it read, modules by name and version, environment
  variables it read by a literal name (``os.environ["X"]``) by their value, and the
  versions of the packages it imports (names read only inside a function body count when
  they have a key and are skipped when not). Changing the defining cell (another ``base_url``,
  another model, another database path) therefore re-keys every cell that uses the value;
- a variable changed in place by a later cell (``client.base_url = ...``, ``cfg["k"] = v``,
  ``del obj.attr``): its key becomes the old key combined with that cell's key. Changes
  made by calling a method (``con.execute("CREATE ...")``) are not seen;
- a variable assigned by a ``%%effect`` or ``%%durable`` cell: that cell's key (the magic
  registers it);
- an object that is a global of an imported module: the module's name, its package's
  version and the attribute's name.

Configuration a library reads from the environment by itself (``OpenAI()`` reading
``OPENAI_BASE_URL``) is not part of any key: read it in the cell (``OpenAI(base_url=
os.environ["OPENAI_BASE_URL"])``) to make it one.

Tracking costs no hashing of data: after each ordinary cell the analysis of its source
(cached by source) gives the names it assigned, and each gets a key computed from the
names it read, which are dict lookups. A key is trusted only while the variable still holds
the object it was computed for (checked by identity), so a value that changed by other
means (``global`` in a function, another extension) has no provenance and a ``%%effect``
cell that needs it warns and runs uncached.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import xxhash

from . import _cells, _hashing

__all__ = ["Origin", "Tracker", "module_version", "tracker"]

_CHEAP = (type(None), bool, int, float, complex)


class Origin(NamedTuple):
    """Where a variable's current value came from: its key, or why it has none."""

    key: str | None  # 32 hex chars; None: no provenance
    value_id: int  # id() of the value the key was computed for
    reason: str = ""  # for a value without a key: why, in words


def _h(*parts: str) -> str:
    return xxhash.xxh3_128_hexdigest("\x1f".join(parts).encode("utf-8", "surrogatepass"))


_versions: dict[str, str] = {}


def module_version(name: str) -> str:
    """The version of the package a module belongs to ("" when it has none)."""
    top = name.partition(".")[0]
    v = _versions.get(top)
    if v is None:
        mod = sys.modules.get(top)
        got = getattr(mod, "__version__", None)
        if not isinstance(got, str):
            try:
                got = importlib.metadata.version(top)
            except (importlib.metadata.PackageNotFoundError, ValueError):
                got = ""
        v = _versions[top] = got
    return v


class Tracker:
    """Provenance of the variables of one namespace (the kernel's ``user_ns``)."""

    def __init__(self) -> None:
        self.ns: Mapping[str, Any] = {}
        self.hidden: Mapping[str, Any] = {}  # IPython's own names (In, Out, get_ipython)
        self.origins: dict[str, Origin] = {}
        self._by_id: dict[int, str] = {}  # id(value) -> a name holding it, for @effect args
        # id -> (object, its key as a module global or None); holds the object, so an id
        # is never taken for another object's
        self._module_globals: dict[int, tuple[object, str | None]] = {}
        # the source of the cell being run (a thunk: transformed only when asked), so a
        # value is keyed already in the cell that assigns it: `llm = dn.wrap(...); llm.f()`
        self._running: Callable[[], str | None] | None = None

    def attach(self, ns: Mapping[str, Any], hidden: Mapping[str, Any]) -> None:
        """Track this namespace from now on (forgetting any other)."""
        self.ns, self.hidden = ns, hidden
        self.origins.clear()
        self._by_id.clear()

    def detach(self) -> None:
        self.attach({}, {})

    def begin_cell(self, source: Callable[[], str | None] | None) -> None:
        """A cell starts (``source`` gives its Python source, or None for a magic's)."""
        self._running = source

    # ------------------------------------------------------------------ reading keys
    def key_of(self, name: str, value: object) -> str | None:
        """The provenance key of ``value`` held in variable ``name``, if it has one."""
        origin = self.origins.get(name)
        if origin is not None and origin.value_id == id(value):
            return origin.key
        return None

    def why_none(self, name: str, value: object) -> str:
        """Why ``name`` has no provenance, in words (for the warning)."""
        origin = self.origins.get(name)
        if origin is None:
            return "no cell of this kernel assigned it since durable_nb was loaded"
        if origin.value_id != id(value):
            return "it changed outside the cells that assign it (e.g. through `global`)"
        return origin.reason

    def input_key(self, name: str) -> str | None:
        """The key a cell's read of ``name`` contributes; None if it has none. Never
        hashes data: a variable's provenance, a module's name and version, a small scalar's
        value."""
        try:
            value = self.ns[name]
        except KeyError:
            return "" if name not in self.hidden else "ipython"  # a builtin, or a NameError
        origin = self.origins.get(name)
        if origin is not None and origin.value_id == id(value):
            return origin.key
        if isinstance(value, types.ModuleType):
            return _h("module", value.__name__, module_version(value.__name__))
        if name in self.hidden and self.hidden[name] is value:
            return "ipython"
        if isinstance(value, _CHEAP) or (isinstance(value, (str, bytes)) and len(value) < 4096):
            return _hashing.hash_value(value).hex()
        return None

    def key_object(self, obj: object) -> str | None:
        """The keyer installed in ``_hashing``: the provenance of an object found as a
        variable of the namespace, else as a global of an imported module."""
        name = self._by_id.get(id(obj))
        if name is not None and self.ns.get(name) is obj:
            key = self.key_of(name, obj)
            if key is not None:
                return key
        return self._in_running_cell(obj) or self._module_global(obj)

    def _in_running_cell(self, obj: object) -> str | None:
        """The key the running cell gives ``obj`` if one of the names it assigns holds it
        (what :meth:`after_cell` will record when the cell ends)."""
        running = self._running
        source = running() if running is not None else None
        cell = _cells.analyse(source) if source is not None else None
        if cell is None:
            return None
        for name in cell.writes:
            if self.ns.get(name) is obj:
                base = self._cell_key(cell)
                return None if base is None else _h(base, name)
        return None

    def _module_global(self, obj: object) -> str | None:
        hit = self._module_globals.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]  # a global, or None: not one when last looked for
        if len(self._module_globals) > 1024:
            self._module_globals.clear()
        ns = self.ns
        for mod_name, mod in list(sys.modules.items()):
            if mod_name == "__main__" or mod is None:
                continue
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict) or d is ns:
                continue
            for attr, value in d.items():
                if value is obj:
                    key = _h("global", mod_name, module_version(mod_name), attr)
                    self._module_globals[id(obj)] = (obj, key)
                    return key
        self._module_globals[id(obj)] = (obj, None)
        return None

    # ------------------------------------------------------------------ recording keys
    def assign(self, names: list[str] | tuple[str, ...], base: str) -> None:
        """Names a cell assigned, keyed by ``base`` (the cell's key) and their name."""
        ns = self.ns
        for name in names:
            if name in ns:
                value = ns[name]
                old = self.origins.get(name)
                if old is not None and self._by_id.get(old.value_id) == name:
                    del self._by_id[old.value_id]  # that value is no longer this name's
                self.origins[name] = Origin(_h(base, name), id(value))
                self._by_id[id(value)] = name

    def forget(self, names: list[str] | tuple[str, ...], reason: str) -> None:
        ns = self.ns
        for name in names:
            if name in ns:
                self.origins[name] = Origin(None, id(ns[name]), reason)

    def after_cell(self, source: str) -> None:
        """Key what an ordinary cell (transformed source) assigned and changed in place."""
        self._running = None
        cell = _cells.analyse(source)
        if cell is None:
            return
        base = self._cell_key(cell)
        if base is None:
            name = self._unkeyed_read(cell) or "?"
            origin = self.origins.get(name)
            why = (origin.reason if origin and origin.key is None else "") or (
                "no cell of this kernel assigned it since durable_nb was loaded"
            )
            reason = f"the cell that assigned it read {name!r}, which has none: {why}"
            self.forget(cell.writes, reason)
            self.forget([m for m in cell.mutates if m not in cell.writes], reason)
            return
        self.assign(cell.writes, base)
        for name in cell.mutates:
            if name in cell.writes or name not in self.ns:
                continue
            old = self.key_of(name, self.ns[name])
            if old is not None:
                self.assign([name], _h("changed", old, base))

    def _unkeyed_read(self, cell: _cells.Cell) -> str | None:
        for name in cell.reads:
            if name not in cell.deferred and self.input_key(name) is None:
                return name
        return None

    def _cell_key(self, cell: _cells.Cell) -> str | None:
        """The key of a cell's run: its normalized source and the keys of what it read; None
        when something it read has no key."""
        parts = [_cell_hash(cell)]
        for name in cell.reads:
            k = self.input_key(name)
            if k is None and name in cell.deferred:
                # a function's globals are looked up when it is called; one that has no
                # key yet (a list the function appends to) does not stop keying the function
                k = "?"
            if k is None:
                return None
            parts.append(f"{name}={k}")
        environ = _environ()
        parts += [f"${e}={environ.get(e)!r}" for e in cell.env]
        parts += [f"import {m}={module_version(m)}" for m in cell.imports]
        return _h("cell", *parts)


def _cell_hash(cell: _cells.Cell) -> str:
    return xxhash.xxh3_128_hexdigest(cell.tree_dump.encode("utf-8", "surrogatepass"))


def _environ() -> Mapping[str, str]:
    import os

    return os.environ


#: the kernel's tracker (one namespace per process is what IPython has)
tracker = Tracker()
_hashing.set_opaque_keyer(tracker.key_object)
