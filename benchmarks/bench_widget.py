"""The trace widget's figures: what a live update costs the kernel, and how fast a long run
renders in headless Chromium.

Run ``python benchmarks/bench_widget.py``; ``benchmarks/run.py`` imports :func:`run`, which
returns rows ``{"name", "value", "unit"}``. Benchmarks report, they never assert.

- **Kernel cost per live step.** A workflow of ``n_steps`` trivial effects runs on a
  memory store with and without a ``TraceWidget`` following it; the comm's ``send`` is
  replaced by ``json.dumps`` of the message (what the kernel's session does with it), so
  serialization is counted. The figure is the difference of the medians divided by the
  steps; it includes the engine's listener call, queueing, the flushes (every 50 ms) and
  the patches. Also the widget's own CPU per step in isolation: the engine's messages for
  ``n_steps`` steps fed straight to the listener, flushed every 100 steps (a fast run) and
  after every step (a slow run, the worst case: one patch per step on a long timeline).
- **Render in Chromium.** The built bundle is imported in a blank page of Debian's headless
  chromium (through Playwright) with a model holding ``n_steps`` rows; the time runs from
  parsing the model's state (its JSON, as it arrives from the kernel) to the rows being in
  the DOM and painted (the next animation frame). Measured for all-executed rows (nothing
  folds: the virtualized list does the work) and for all-replayed rows (one folded line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(REPO))

CHROMIUM = Path("/usr/bin/chromium")


def _sink(widget: Any) -> None:
    widget.comm.send = lambda data=None, buffers=None, **_: json.dumps(data)


def _engine_cost(n_steps: int, repeats: int) -> dict[str, float]:
    import durable_nb as dn
    from durable_nb.engine import runtime
    from durable_nb.store import MemoryStore
    from durable_nb.widgets import TraceWidget

    @dn.effect
    async def step(i: int) -> int:
        return i

    @dn.durable
    async def wf(ctx: dn.Context, n: int) -> int:
        for i in range(n):
            await step(i)
        return n

    def once(with_widget: bool, k: int) -> float:
        runtime._store = MemoryStore()

        async def main() -> float:
            t0 = time.perf_counter()
            job = dn.start(wf, n_steps, run_id=f"w{k}")
            if with_widget:
                w = TraceWidget(job)
                _sink(w)
            await job.wait()
            if with_widget:
                w.flush()
                w.close()
            return time.perf_counter() - t0

        return asyncio.run(main())

    plain, widget = [], []
    for k in range(repeats):
        plain.append(once(False, 2 * k))
        widget.append(once(True, 2 * k + 1))
    return {
        "plain": statistics.median(plain) / n_steps * 1e6,
        "widget": statistics.median(widget) / n_steps * 1e6,
    }


def _listener_cost(n_steps: int, every: int) -> float:
    from durable_nb.widgets import TraceWidget

    w = TraceWidget("bench", _missing_ok=True, flush_interval=10)
    _sink(w)
    w._model.run["live"] = True
    msgs = []
    for i in range(n_steps):
        base = {"kind": "step", "run_id": "bench", "ts": 0.0, "seq": i, "step": "effect"}
        msgs.append({**base, "name": "m.step", "state": "running", "args": f"({i})"})
        msgs.append(
            {**base, "name": "m.step", "state": "executed", "duration": 1e-5, "args": f"({i})"}
        )
    w._scheduled = True  # the flushes below are the benchmark's, not a timer's
    t0 = time.perf_counter()
    for i in range(n_steps):
        w._on_message(msgs[2 * i])
        w._on_message(msgs[2 * i + 1])
        if (i + 1) % every == 0:
            w.flush()
            w._scheduled = True
    w.flush()
    elapsed = time.perf_counter() - t0
    w.close()
    return elapsed / n_steps * 1e6


_PAGE_JS = """
async ([bundle, stateText]) => {
  const mod = await import(URL.createObjectURL(new Blob([bundle], {type: "text/javascript"})));
  const t0 = performance.now();
  const state = JSON.parse(stateText);
  const handlers = {};
  const model = {
    get: (k) => state[k],
    set: () => {}, save_changes: () => {}, send: () => {},
    on: (e, f) => { (handlers[e] ||= []).push(f); }, off: () => {},
  };
  const el = document.createElement("div");
  document.body.append(el);
  await mod.default.initialize({model});
  await mod.default.render({model, el});
  const lines = el.querySelectorAll(".dn-row").length;
  await new Promise((r) => requestAnimationFrame(() => r()));
  const ms = performance.now() - t0;
  el.remove();
  return [ms, lines, Number(el.querySelector(".dn-trace").dataset.rows)];
}
"""


def _render(n_steps: int, repeats: int) -> list[dict[str, Any]]:
    from durable_nb.widgets import BUNDLE

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return [{"name": "render in chromium: playwright missing", "value": "—", "unit": ""}]
    if not CHROMIUM.exists() or not BUNDLE.exists():
        return [
            {"name": "render in chromium: chromium or bundle missing", "value": "—", "unit": ""}
        ]
    bundle = BUNDLE.read_text()
    rows_out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        for state in ("executed", "replayed"):
            steps = [
                {
                    "seq": i,
                    "kind": "effect",
                    "name": "pipeline.step",
                    "label": "step",
                    "state": state,
                    "duration": 0.001 * (i % 17),
                    "args": f"({i}, 'item-{i}')",
                    "error": "",
                }
                for i in range(n_steps)
            ]
            model = {
                "run": {
                    "run_id": "bench",
                    "workflow": "pipeline",
                    "status": "completed",
                    "detail": "",
                    "executions": 1,
                    "live": False,
                    "can_cancel": False,
                    "can_resume": False,
                    "error": "",
                },
                "steps": steps,
                "steps_rev": 1,
                "totals": {
                    "steps": n_steps,
                    "executed": n_steps if state == "executed" else 0,
                    "replayed": n_steps if state == "replayed" else 0,
                    "failed": 0,
                    "running": 0,
                    "saved_seconds": 0.0,
                },
                "waiting": [],
            }
            text = json.dumps(model)
            times, lines = [], 0
            for _ in range(repeats):
                ms, lines, shown = page.evaluate(_PAGE_JS, [bundle, text])
                assert shown == n_steps
                times.append(ms)
            rows_out.append(
                {
                    "name": f"render {n_steps:,} {state} steps in headless chromium "
                    f"(model JSON parsed -> rows painted; {lines} lines drawn), median",
                    "value": round(statistics.median(times), 1),
                    "unit": "ms",
                }
            )
        browser.close()
    return rows_out


def run(n_steps: int = 5000, repeats: int = 5) -> list[dict[str, Any]]:
    eng = _engine_cost(n_steps, repeats)
    rows = [
        {
            "name": f"live widget: kernel cost per step of a {n_steps:,}-step run "
            "(with widget minus without, medians)",
            "value": round((eng["widget"] - eng["plain"]) / 1000, 4),
            "unit": "ms",
        },
        {
            "name": "  the same run without a widget, per step (for context)",
            "value": round(eng["plain"], 1),
            "unit": "µs",
        },
        {
            "name": "live widget: its own CPU per step, flushed every 100 steps",
            "value": round(_listener_cost(n_steps, 100), 1),
            "unit": "µs",
        },
        {
            "name": f"live widget: its own CPU per step, flushed after every step "
            f"({n_steps:,}-row timeline)",
            "value": round(_listener_cost(n_steps, 1), 1),
            "unit": "µs",
        },
    ]
    rows += _render(n_steps, repeats)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n-steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for row in run(args.n_steps, args.repeats):
        print(f"{row['name']:<100} {row['value']!s:>10} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
