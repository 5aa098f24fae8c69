"""The architecture holds: public surface pinned, heavy modules loaded lazily, layers respected."""

from __future__ import annotations

import ast
import json
from pathlib import Path

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
            "durable",
            "effect",
            "enqueue",
            "errors",
            "get_job",
            "get_store",
            "run",
            "set_clock",
            "set_store",
            "signal",
            "start",
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


LAYERS = {  # a module may import only from its own layer or lower ones
    "errors": 0,
    "_hashing": 1,
    "_codecs": 1,
    "store": 2,
    "engine": 3,
    "trace": 4,
    "client": 4,
    "worker": 4,
    "cli": 5,
    "magics": 5,
    "widgets": 5,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "durable_nb" else None


def test_lower_layers_never_import_higher_ones() -> None:
    pkg = ROOT / "durable_nb"
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        mod = ".".join(rel.parts)
        own = _layer(mod if not mod.endswith("__init__") else mod.rsplit(".", 1)[0] + ".x")
        if own is None:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = rel.parts[: len(rel.parts) - node.level]
                target = ".".join([*base, node.module or ""]).rstrip(".")
                for alias in node.names:
                    full = target if node.module else f"{target}.{alias.name}"
                    other = _layer(full)
                    if other is not None:
                        assert other <= own, f"{mod} imports {full} (a higher layer)"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name != "duckdb" or path.name == "_duckdb.py", (
                        f"{mod} imports duckdb; only store/_duckdb.py may"
                    )


def test_only_the_duckdb_store_imports_duckdb() -> None:
    for path in (ROOT / "durable_nb").rglob("*.py"):
        text = path.read_text()
        if path.name != "_duckdb.py":
            assert "import duckdb" not in text, path
    assert Path(ROOT / "durable_nb" / "store" / "_duckdb.py").exists()
