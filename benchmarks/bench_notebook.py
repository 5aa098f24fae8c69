"""durable_nb's notebook figures: what ``%%effect`` adds to a cell, and what loading costs.

Run ``python benchmarks/bench_notebook.py``; ``benchmarks/run.py`` imports :func:`run`, which
returns rows ``{"name", "value", "unit"}``. Benchmarks report, they never assert.

- ``%%effect`` hit overhead: an IPython ``InteractiveShell`` with ``%load_ext durable_nb``,
  on a DuckDB store in a temp dir. The cell reads two small inputs (an int and a list of
  ten ints), assigns two names and ends with an expression. Each iteration runs, through
  ``shell.run_cell`` (the kernel's path: pre-run hooks, magics, display hook, history), the
  plain cell and then the same cell under ``%%effect`` on a hit (inputs hashed, record
  looked up, variables restored, outputs and the replay note printed). The figure is the
  median of the ``%%effect`` runs minus the median of the plain ones. Every hit is checked
  to have replayed. ``--force`` (run the body and record it again) is measured the same way.
- ``import durable_nb`` and ``%load_ext durable_nb``: fresh interpreters, timed inside the
  process around the statement (interpreter start-up is not counted), median of
  ``fresh_runs``. For ``%load_ext`` the ``InteractiveShell`` exists first (a kernel has one)
  and ``durable_nb`` is not imported yet, so the figure includes importing it. Each reports
  which heavy modules (duckdb, pyarrow, numpy, pandas, ipywidgets, anywidget) it loaded;
  they should load on first use, not here. The first ``%%effect`` cell after loading (a
  miss: it opens the DuckDB store) is timed in the same interpreters, for context.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

HEAVY_MODULES = ("duckdb", "pyarrow", "numpy", "pandas", "ipywidgets", "anywidget")

BODY = """total = sum(v * scale for v in values)
label = f"total={total}"
total
"""
REPLAY_NOTE = "[durable_nb] replayed this cell"


def _row(name: str, value: Any, unit: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit}


def _ms(ns: list[int]) -> float:
    return round(statistics.median(ns) / 1e6, 3)


# --------------------------------------------------------------------------- %%effect


def effect_overhead(repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """``run_cell`` of the ``%%effect`` cell (hit, and ``--force``) against the plain cell."""
    from IPython.core.interactiveshell import InteractiveShell

    import durable_nb as dn

    dn.set_store(str(tmp / "store.duckdb"))
    # room for every output, so IPython never pauses to flush its output cache mid-way
    shell = InteractiveShell.instance(cache_size=10 * repeats + 100)
    sink = io.StringIO()  # the display hook's and the cells' output

    def run_cell(cell: str) -> int:
        t0 = time.perf_counter_ns()
        res = shell.run_cell(cell, store_history=True)
        elapsed = time.perf_counter_ns() - t0
        if not res.success:
            raise RuntimeError(f"cell failed: {res.error_before_exec or res.error_in_exec!r}")
        return elapsed

    plain, hit, force, reopened_plain, reopened = [], [], [], [], []
    replayed = 0
    with contextlib.redirect_stdout(sink):
        run_cell("%load_ext durable_nb")
        run_cell("scale = 3\nvalues = list(range(10))")
        for _ in range(3):  # warm up: the miss that records, the store's caches, the hooks
            run_cell(BODY)
            run_cell("%%effect\n" + BODY)
        for _ in range(repeats):  # interleaved, so drift hits all alike
            plain.append(run_cell(BODY))
            before = sink.tell()
            hit.append(run_cell("%%effect\n" + BODY))
            replayed += REPLAY_NOTE in sink.getvalue()[before:]
        for _ in range(repeats):
            plain.append(run_cell(BODY))
            force.append(run_cell("%%effect --force\n" + BODY))
        # what a kernel restart leaves: every record on disk, none in the store's memory
        for i in range(repeats):
            run_cell(f"scale = {i}")
            run_cell("%%effect\n" + BODY)
        dn.set_store(":memory:")  # closes the DuckDB store
        dn.set_store(str(tmp / "store.duckdb"))
        reopened_replays = 0
        for i in range(repeats):
            run_cell(f"scale = {i}")
            reopened_plain.append(run_cell(BODY))
            before = sink.tell()
            reopened.append(run_cell("%%effect\n" + BODY))  # the first lookup of this key
            reopened_replays += REPLAY_NOTE in sink.getvalue()[before:]
        run_cell("%unload_ext durable_nb")
    dn.set_store(":memory:")  # closes the DuckDB store in the temp dir
    return [
        _row(
            "%%effect hit overhead, small inputs (hit minus plain cell, run_cell): median",
            round(_ms(hit) - _ms(plain), 3),
            "ms",
        ),
        _row("%%effect hit, small inputs: run_cell median", _ms(hit), "ms"),
        _row("plain cell, same body: run_cell median", _ms(plain), "ms"),
        _row(
            "%%effect hit: p90 of run_cell",
            round(statistics.quantiles(hit, n=10)[-1] / 1e6, 3),
            "ms",
        ),
        _row("%%effect hits that replayed (of runs)", f"{replayed}/{repeats}", ""),
        _row(
            "%%effect hit overhead, store reopened (first lookup of each key): median",
            round(_ms(reopened) - _ms(reopened_plain), 3),
            "ms",
        ),
        _row(
            "%%effect hits after reopening that replayed (of runs)",
            f"{reopened_replays}/{repeats}",
            "",
        ),
        _row(
            "%%effect --force overhead (runs the body and records it; minus plain): median",
            round(_ms(force) - _ms(plain), 3),
            "ms",
        ),
    ]


# --------------------------------------------------------------------------- provenance

CLIENT = """
import threading
class Client:  # like an SDK client: it holds a lock, so it has no content hash
    def __init__(self, base_url):
        self.base_url = base_url
        self._lock = threading.Lock()
    def ask(self, q):
        return f"{self.base_url}: {q}"
client = Client("http://127.0.0.1:1/v1")
"""
ASK = 'answer = client.ask("hi")\nanswer\n'


def provenance_costs(repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """What provenance tracking adds to an ordinary cell (small inputs, and 50 MB ones: no
    data is hashed), and a ``%%effect`` hit on a cell that uses a provenance-keyed client."""
    from IPython.core.interactiveshell import InteractiveShell

    import durable_nb as dn
    from durable_nb import _provenance

    dn.set_store(str(tmp / "prov.duckdb"))
    shell = InteractiveShell.instance(cache_size=20 * repeats + 100)
    sink = io.StringIO()
    cells = {
        "small inputs": "b = a + 1\nc = [b, a]\n",
        "50 MB inputs": "n = len(big) + len(rows)\nhead = big[:4]\n",
    }

    def run_cell(cell: str) -> int:
        t0 = time.perf_counter_ns()
        res = shell.run_cell(cell, store_history=True)
        elapsed = time.perf_counter_ns() - t0
        if not res.success:
            raise RuntimeError(f"cell failed: {res.error_before_exec or res.error_in_exec!r}")
        return elapsed

    rows: list[dict[str, Any]] = []
    with contextlib.redirect_stdout(sink):
        shell.run_cell("a = 1\nbig = bytes(50_000_000)\nrows = list(range(1_000_000))")
        for what, cell in cells.items():
            unloaded, loaded, hooks = [], [], []
            for _ in range(max(1, repeats // 20)):  # blocks, so load/unload is not timed
                for _ in range(20):
                    unloaded.append(run_cell(cell))
                run_cell("%load_ext durable_nb")
                shell.run_cell("a = 1\nbig = bytes(50_000_000)\nrows = list(range(1_000_000))")
                for _ in range(20):
                    loaded.append(run_cell(cell))
                    source = shell.transform_cell(cell)
                    t0 = time.perf_counter_ns()  # the post-cell hook's own work
                    _provenance.tracker.after_cell(source)
                    hooks.append(time.perf_counter_ns() - t0)
                run_cell("%unload_ext durable_nb")
            rows += [
                _row(
                    f"provenance tracking, ordinary cell, {what}: added to run_cell "
                    "(loaded minus not loaded), median",
                    round(_ms(loaded) - _ms(unloaded), 3),
                    "ms",
                ),
                _row(
                    f"provenance tracking, ordinary cell, {what}: the post-cell hook alone, median",
                    round(statistics.median(hooks) / 1e3, 1),
                    "us",
                ),
            ]
        run_cell("%load_ext durable_nb")
        run_cell(CLIENT)
        plain, hit = [], []
        replayed = 0
        for _ in range(3):
            run_cell(ASK)
            run_cell("%%effect\n" + ASK)
        for _ in range(repeats):
            plain.append(run_cell(ASK))
            before = sink.tell()
            hit.append(run_cell("%%effect\n" + ASK))
            replayed += REPLAY_NOTE in sink.getvalue()[before:]
        run_cell("%unload_ext durable_nb")
    dn.set_store(":memory:")
    return [
        *rows,
        _row(
            "%%effect hit on a cell using a provenance-keyed client (hit minus plain cell): median",
            round(_ms(hit) - _ms(plain), 3),
            "ms",
        ),
        _row("%%effect hit, provenance-keyed client: run_cell median", _ms(hit), "ms"),
        _row(
            "%%effect hits on the client cell that replayed (of runs)", f"{replayed}/{repeats}", ""
        ),
    ]


# --------------------------------------------------------------------------- fresh interpreters

_IMPORT = """
import json, sys, time
t0 = time.perf_counter_ns()
import durable_nb
elapsed = time.perf_counter_ns() - t0
print(json.dumps({"ns": elapsed, "loaded": [m for m in HEAVY if m in sys.modules]}))
"""

_LOAD_EXT = """
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
assert "durable_nb" not in sys.modules
before = set(sys.modules)
t0 = time.perf_counter_ns()
shell.run_line_magic("load_ext", "durable_nb")
elapsed = time.perf_counter_ns() - t0
loaded = [m for m in HEAVY if m in sys.modules and m not in before]
shell.run_cell("scale = 3\\nvalues = list(range(10))")
t0 = time.perf_counter_ns()
res = shell.run_cell("%%effect\\n" + BODY)
first = time.perf_counter_ns() - t0
assert res.success, res
print(json.dumps({
    "ns": elapsed, "loaded": loaded, "first_cell_ns": first,
    "by_ipython": [m for m in HEAVY if m in before],
    "after_first_cell": [m for m in HEAVY if m in sys.modules],
}))
"""


def _fresh(code: str, tmp: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["DURABLE_NB_STORE"] = str(tmp / f"fresh-{time.perf_counter_ns()}.duckdb")
    prelude = f"HEAVY = {HEAVY_MODULES!r}\nBODY = {BODY!r}\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fresh interpreter failed: {proc.stderr[-600:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def fresh_interpreters(runs: int, tmp: Path) -> list[dict[str, Any]]:
    _fresh(_IMPORT, tmp)  # warm the bytecode and OS page caches
    _fresh(_LOAD_EXT, tmp)
    imports, loads = [], []
    for _ in range(runs):  # interleaved, so drift hits both alike
        imports.append(_fresh(_IMPORT, tmp))
        loads.append(_fresh(_LOAD_EXT, tmp))

    def modules(results: list[dict[str, Any]], key: str) -> str:
        seen = sorted({m for r in results for m in r[key]})
        return ", ".join(seen) if seen else "none"

    heavy = "/".join(HEAVY_MODULES)
    return [
        _row(
            "import durable_nb (fresh interpreter, timed in-process): median",
            _ms([r["ns"] for r in imports]),
            "ms",
        ),
        _row(f"import durable_nb: heavy modules loaded ({heavy})", modules(imports, "loaded"), ""),
        _row(
            "%load_ext durable_nb (fresh interpreter with a shell; includes importing "
            "durable_nb): median",
            _ms([r["ns"] for r in loads]),
            "ms",
        ),
        _row(f"%load_ext durable_nb: heavy modules loaded ({heavy})", modules(loads, "loaded"), ""),
        _row(
            "heavy modules the InteractiveShell itself had loaded", modules(loads, "by_ipython"), ""
        ),
        _row(
            "first %%effect cell after %load_ext (a miss; opens the DuckDB store): median",
            _ms([r["first_cell_ns"] for r in loads]),
            "ms",
        ),
        _row("heavy modules loaded after that first cell", modules(loads, "after_first_cell"), ""),
    ]


# --------------------------------------------------------------------------- main


def run(repeats: int = 200, fresh_runs: int = 5) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="dnb-bench-notebook-"))
    try:
        rows = effect_overhead(repeats, tmp)
        rows += provenance_costs(repeats, tmp)
        rows += fresh_interpreters(fresh_runs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--fresh-runs", type=int, default=5)
    args = parser.parse_args(argv)
    for row in run(args.repeats, args.fresh_runs):
        print(f"{row['name']:<92} {row['value']!s:>10} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
