"""The architecture holds: public surface pinned, heavy modules loaded lazily, layers respected.

The layer check reads every import in the package the way Python will execute it —
``import x``, ``from x import y`` (absolute or relative, including ``from .. import name``,
which imports the package ``..`` itself unless ``name`` is a module), function-level
imports, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name —
leaving out only imports under ``if TYPE_CHECKING:``, which never run. On that graph a
module may import only its own layer or lower ones, the rooms inside ``engine/``, ``store/``
and ``widgets/`` keep their order, and no cycle exists. The checker is itself tested on
copies of the package with one bad import added.
"""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import durable_nb as dn

from .helpers import ROOT, run_python

HEAVY = ["duckdb", "pyarrow", "numpy", "pandas", "polars", "IPython", "ipywidgets", "anywidget"]
HEAVY += ["psycopg", "psycopg_pool"]


def test_public_surface_is_pinned() -> None:
    assert sorted(dn.__all__) == sorted(
        [
            "Client",
            "Clock",
            "Context",
            "DuplicateRunError",
            "DurableError",
            "EffectFunction",
            "FakeClock",
            "Interrupted",
            "Job",
            "NonDeterminismError",
            "Retry",
            "RunCancelledError",
            "RunLockedError",
            "SignalTimeoutError",
            "Store",
            "SystemClock",
            "Workflow",
            "__version__",
            "cancel",
            "cancelled",
            "current_session",
            "durable",
            "effect",
            "enqueue",
            "errors",
            "fork",
            "get_job",
            "get_store",
            "instrument",
            "map",
            "progress",
            "queue",
            "resume",
            "run",
            "set_clock",
            "set_store",
            "signal",
            "start",
            "wrap",
        ]
    )
    for name in dn.__all__:
        assert hasattr(dn, name), name


def test_import_loads_no_heavy_module() -> None:
    code = (
        "import sys, json, durable_nb, durable_nb.cli\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------ layers
PACKAGE = "durable_nb"
LAYERS = {  # a module may import only from its own layer or lower ones
    "errors": 0,
    "_version": 0,
    "_arrow_ipc": 0,
    "_journal": 1,
    "_hashing": 1,
    "_codecs": 1,
    "_cells": 1,
    "_provenance": 1,
    "_otel": 4,
    "store": 2,
    "engine": 3,
    "trace": 4,
    "_explain": 4,
    "client": 4,
    "_metrics": 4,
    "_export": 4,
    "worker": 4,
    "_kernelspec": 4,
    "cli": 5,
    "magics": 5,
    "widgets": 5,
    "__main__": 6,
    "": 6,  # the package itself: the public API over everything
}
#: the rooms of a folder, lowest first: a room imports only rooms before it (its
#: ``__init__`` may import them all)
ORDER = {
    "engine": [
        "_clock",
        "_runtime",
        "_observe",
        "_state",
        "_retry",
        "_usage",
        "_limits",
        "_queues",
        "_progress",
        "_executors",
        "_streams",
        "_streaming",
        "_effects",
        "_wrap",
        "_map",
        "_kv",
        "_interrupts",
        "_branches",
        "_jobs",
        "_workflow",
        "_log",
        "_context",
        "_starts",
        "_driver",
        "_resume",
        "_fork",
        "_api",
    ],
    "store": [
        "_protocol",
        "_queues",
        "_rows",
        "_base",
        "_migrations",
        "_memory",
        "_keyfilter",
        "_lockfiles",
        "_handoff",
        "_syncer",
        "_wal",
        "_duckdb_schema",
        "_duckdb_file",
        "_duckdb_merge",
        "_duckdb",
        "_pg_session",
        "_pg_url",
        "_pg_schema",
        "_pg_wire",
        "_pg_commit",
        "_pg_leases",
        "_pg_queues",
        "_pg_start",
        "_postgres",
    ],
    "magics": ["_outputs", "_magics"],
    "widgets": ["_messages", "_snapshot", "_model", "_static", "_inspect", "_widget"],
}


def _modules(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file (a package's name
    for its ``__init__.py``)."""
    out = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can execute: the bodies of ``if TYPE_CHECKING:`` are left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """``(imported module of the package, line)`` for each import ``module`` executes."""
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # ``from pkg import name`` imports pkg itself unless name is a module of it
                names.append(sub if sub in known else target)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            names = [node.args[0].value]
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                # the deepest module of the package that the name reaches
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in known and name != module:
                    yield name, node.lineno  # type: ignore[attr-defined]


def _unit(module: str) -> tuple[str, str | None]:
    """``(layer key, room inside a folder or None)`` of a module."""
    parts = module.split(".")[1:]
    if not parts:
        return "", None
    return parts[0], (parts[1] if len(parts) > 1 else None)


def layer_violations(root: Path) -> list[str]:
    """Every import of the package under ``root`` that breaks the layers, the order of the
    rooms or makes a cycle, as readable lines (empty: the architecture holds)."""
    mods = _modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems: list[str] = []
    for mod, path in sorted(mods.items()):
        key, room = _unit(mod)
        if key not in LAYERS:
            problems.append(f"{mod} is in no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for target, line in _imports(mod, path, known):
            graph[mod].add(target)
            tkey, troom = _unit(target)
            where = f"{path.relative_to(root)}:{line}"
            if LAYERS.get(tkey, 99) > LAYERS[key]:
                problems.append(f"{where}: {mod} imports {target}, a higher layer")
            elif tkey == key and key in ORDER and room is not None and troom is not None:
                order = ORDER[key]
                if room not in order or troom not in order:
                    problems.append(f"{where}: {mod} or {target} is not in ORDER[{key!r}]")
                elif order.index(troom) >= order.index(room):
                    problems.append(f"{where}: {mod} imports {target}, a later room of {key}/")
            elif tkey == key and key in ORDER and room is not None and troom is None:
                problems.append(f"{where}: {mod} imports its own package {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    path through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append([*sorted(comp), sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_lower_layers_never_import_higher_ones_and_nothing_is_cyclic() -> None:
    assert layer_violations(ROOT) == []


def test_every_room_of_a_folder_is_in_its_order() -> None:
    for folder, order in ORDER.items():
        rooms = {p.stem for p in (ROOT / PACKAGE / folder).glob("_*.py") if p.stem != "__init__"}
        assert rooms == set(order), folder


# One bad import of each kind, added to a copy of the package: the checker must see each.
BAD = {
    "absolute upward import": ("store/_memory.py", "import durable_nb.engine\n", "higher layer"),
    "from .. import a name of the package root": (
        "store/_duckdb.py",
        "from .. import __version__\n",
        "durable_nb.store._duckdb imports durable_nb, a higher layer",
    ),
    "importlib string in a function": (
        "engine/_jobs.py",
        "def _w():\n    import importlib\n    return importlib.import_module('durable_nb.widgets')\n",
        "durable_nb.engine._jobs imports durable_nb.widgets, a higher layer",
    ),
    "__import__ string": (
        "trace.py",
        "__import__('durable_nb.cli')\n",
        "durable_nb.trace imports durable_nb.cli, a higher layer",
    ),
    "function-level import": (
        "_journal.py",
        "def _f():\n    from .engine import runtime\n    return runtime\n",
        "durable_nb._journal imports durable_nb.engine, a higher layer",
    ),
    "a later room of the engine": (
        "engine/_state.py",
        "from ._driver import start_run\n",
        "durable_nb.engine._state imports durable_nb.engine._driver, a later room of engine/",
    ),
    "a cycle within one layer": (
        "trace.py",
        "def _c():\n    from . import client\n    return client\n",
        "import cycle: durable_nb.client -> durable_nb.trace -> durable_nb.client",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_the_checker_sees_each_kind_of_bad_import(tmp_path: Path, kind: str) -> None:
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("static"))
    assert layer_violations(tmp_path) == []
    rel, code, expected = BAD[kind]
    target = tmp_path / PACKAGE / rel
    target.write_text(target.read_text() + "\n\n" + code)
    problems = layer_violations(tmp_path)
    assert any(expected in p for p in problems), problems


def test_imports_only_for_typing_are_allowed(tmp_path: Path) -> None:
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("static"))
    target = tmp_path / PACKAGE / "engine" / "_state.py"
    target.write_text(
        target.read_text() + "\n\nif TYPE_CHECKING:\n    from ..widgets import TraceWidget\n"
    )
    assert layer_violations(tmp_path) == []


def test_only_the_duckdb_store_imports_duckdb() -> None:
    store = ROOT / "durable_nb" / "store"
    for path in (ROOT / "durable_nb").rglob("*.py"):
        text = path.read_text()
        if not (path.parent == store and path.name.startswith("_duckdb")):
            assert "import duckdb" not in text, path
    assert Path(store / "_duckdb.py").exists()


# The journal's vocabulary is written once (durable_nb/_journal.py): no other file retypes a
# reserved signal, the final statuses, the execution events or the bookkeeping kinds.
RETYPED = [
    '"__cancel__"',
    '"__queue__:"',
    '"completed", "failed", "cancelled"',
    '"started", "resumed"',
    '"retry", "kv_base"',
    '"signal", "dequeue", "interrupt"',
    '"queued", "running", "waiting"',
    '"dn.retry:"',
    '"dn.chunk:"',
]


def test_the_journal_vocabulary_is_written_once() -> None:
    for path in (ROOT / PACKAGE).rglob("*.py"):
        if path.name == "_journal.py":
            continue
        text = path.read_text()
        for literal in RETYPED:
            assert literal not in text, f"{path.relative_to(ROOT)} retypes {literal}"


def test_no_error_raised_is_the_bare_base_class() -> None:
    """Callers catch the specific case: every error is a subclass of DurableError."""
    for path in (ROOT / PACKAGE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                assert name != "DurableError", (
                    f"{path.relative_to(ROOT)}:{node.lineno} raises the bare DurableError; "
                    "raise (or add) a subclass in durable_nb/errors.py"
                )
