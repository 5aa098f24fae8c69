"""``dn.progress``: how far an executing effect got reaches the run's live listeners (from the
loop or a worker thread), a replay reports nothing, and the widget's model shows it; the
trace hides engine bookkeeping and numbers its steps without gaps."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb import trace
from durable_nb.errors import ArgumentError, ArgumentTypeError

from . import helpers


def _run_following(wf: dn.Workflow[..., int], run_id: str) -> tuple[int, list[Any], set[str]]:
    """Run ``wf`` on this thread's own loop with a listener: its result, the progress
    messages, and the threads they arrived on (besides the loop's own)."""
    seen: list[tuple[dict[str, Any], str]] = []

    async def go() -> tuple[int, str]:
        job = dn.start(wf, run_id=run_id)
        job.subscribe(lambda m: seen.append((m, threading.current_thread().name)))
        result: int = await job.wait()
        return result, threading.current_thread().name

    result, loop_thread = asyncio.run(go())
    progress = [m for m, _ in seen if m["kind"] == "progress"]
    others = {t for m, t in seen if m["kind"] == "progress"} - {loop_thread}
    return result, progress, others


def test_progress_reaches_the_listeners_on_the_runs_loop_and_a_replay_reports_nothing() -> None:
    def pages(n: int) -> int:  # a sync effect: ctx.run runs it in a worker thread
        return sum(1 for _ in dn.progress(range(n), desc="pages"))

    @dn.effect
    async def chunks(n: int) -> int:
        done = 0
        for _ in dn.progress(iter(range(n)), total=n):
            done += 1
            await asyncio.sleep(0)
        return done

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return await ctx.run(pages, 30) + await chunks(5)

    result, progress, other_threads = _run_following(wf, "p")
    assert result == 35
    assert other_threads == set()  # the worker thread's reports reached the loop's thread
    by_step: dict[int, list[Any]] = {}
    for m in progress:
        by_step.setdefault(m["seq"], []).append(m)
    assert sorted(by_step) == [0, 1]
    first, last = by_step[0][0], by_step[0][-1]
    assert (first["done"], first["total"], first["desc"]) == (0, 30, "pages")
    assert (last["done"], last["total"], last["desc"]) == (30, 30, "pages")
    assert [m["done"] for m in by_step[0]] == sorted(m["done"] for m in by_step[0])
    assert (by_step[1][-1]["done"], by_step[1][-1]["total"]) == (5, 5)

    result, progress, _ = _run_following(wf, "p")
    assert result == 35
    assert progress == []  # replayed: nothing ran, nothing to report, nothing spins


def test_progress_outside_a_run_passes_the_items_through() -> None:
    assert list(dn.progress(["a", "b"])) == ["a", "b"]


def test_progress_refuses_bad_arguments() -> None:
    with pytest.raises(ArgumentTypeError, match=r"^progress needs an iterable .* got 5$"):
        dn.progress(5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^total must be an int >= 0 or None, got -1$"):
        dn.progress([], total=-1)
    with pytest.raises(ArgumentTypeError, match=r"^desc must be a str or None, got 3$"):
        dn.progress([], desc=3)  # type: ignore[arg-type]


def test_the_widget_model_shows_progress_and_keeps_the_final_state() -> None:
    from durable_nb.widgets._model import TraceModel

    m = TraceModel("r")
    m.apply({"kind": "event", "event": "started", "data": {"execution": 1}})
    m.apply(
        {
            "kind": "step",
            "seq": 0,
            "step": "effect",
            "name": "m.slow",
            "state": "running",
            "args": "(12)",
            "ts": 1000.0,
        }
    )
    assert m.rows[0]["started"] == 1000.0 and m.rows[0]["progress"] == ""
    m.apply(
        {"kind": "progress", "seq": 0, "name": "m.slow", "done": 3, "total": 12, "desc": "pages"}
    )
    assert m.rows[0]["progress"] == "3/12 pages"
    m.apply(
        {
            "kind": "step",
            "seq": 0,
            "step": "effect",
            "name": "m.slow",
            "state": "executed",
            "args": "(12)",
            "duration": 6.0,
            "tokens": {"prompt": 10, "completion": 4, "model": "m"},
        }
    )
    row = m.rows[0]
    assert (row["state"], row["started"], row["progress"]) == ("executed", 0.0, "3/12 pages")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (10, 4)
    totals = m.totals()
    assert (totals["prompt_tokens"], totals["completion_tokens"], totals["tokens_saved"]) == (
        10,
        4,
        0,
    )


def test_the_trace_hides_deadlines_numbers_steps_without_gaps_and_shows_no_ids(
    clock: dn.FakeClock,
) -> None:
    @dn.effect
    def note(x: str) -> str:
        return x

    @dn.durable
    async def wf(ctx: dn.Context) -> str:
        note("a")
        who = await ctx.wait_signal("approve", timeout=3600)
        return note(str(who))

    # sent first: on the virtual clock the wait's hour passes at once
    dn.signal("clean", "approve", "bob", missing_ok=True)
    assert dn.run(wf, run_id="clean") == "bob"
    t = trace.run_trace(dn.get_store(), "clean")
    # the deadline stays in the data for scripts, unnumbered; the totals do not count it
    assert [(s["seq"], s["kind"], s["step"]) for s in t["steps"]] == [
        (0, "effect", 0),
        (1, "signal", 1),
        (2, "deadline", None),  # the wait's seq is taken when it starts, its deadline's after
        (3, "effect", 2),
    ]
    assert t["totals"]["steps"] == 3
    text = trace.format_trace(t)
    assert "deadline of" not in text and "signal_id" not in text
    assert trace.shown_detail("signal", t["steps"][1]["args"]) == '{"name": "approve"}'

    # fork takes the same numbers: from step 1 (the wait) the deadline is made again with it
    clock.advance(10)
    fork = dn.fork("clean", from_step=1, run_id="clean-again")
    assert fork.result(timeout=30) == "bob"  # the signal it consumed was sent to the fork again
    f = trace.run_trace(dn.get_store(), "clean-again")
    assert f["run"]["forked_from"] == {"run_id": "clean", "step": 1}
    assert [(s["step"], s["kind"]) for s in f["steps"]] == [
        (0, "effect"),
        (1, "signal"),
        (None, "deadline"),
        (2, "effect"),
    ]
    deadlines = [r for r in dn.get_store().load_effects("run/clean-again") if r.kind == "deadline"]
    assert len(deadlines) == 1 and deadlines[0].started_at > t["steps"][0]["started_at"]

    from durable_nb.widgets._model import TraceModel

    m = TraceModel("clean")
    m.load_trace(t)
    assert [r["kind"] for r in m.rows] == ["effect", "signal", "effect"]
    assert all("signal_id" not in r["args"] for r in m.rows)


# ------------------------------------------------------------------ tqdm and the final count
def test_a_users_tqdm_bars_report_and_the_final_count_is_recorded_and_replayed(
    clock: dn.FakeClock,
) -> None:
    """A tqdm bar of the user's own inside an effect reports like dn.progress (an inner bar
    of nested ones does not: the outermost open bar is the effect's); its final count is
    recorded with the result, shown by the trace, and sent with a replayed step's message,
    which the widget's model shows (a replay executes nothing: no progress, no spinner)."""
    import io

    from tqdm import tqdm
    from tqdm.asyncio import tqdm as atqdm

    calls: list[str] = []
    sink = io.StringIO()  # the bars' own text: not this test's output

    def rows(n: int) -> int:  # sync, in ctx.run's worker thread: nested bars
        calls.append("rows")
        done = 0
        for _ in tqdm(range(n), desc="rows", file=sink, mininterval=0):
            for _ in tqdm(range(3), desc="cells", file=sink, mininterval=0):
                done += 1
        return done

    @dn.effect
    async def pages(n: int) -> int:  # async, a manual bar updated by hand
        calls.append("pages")
        bar = atqdm(total=n, desc="pages", file=sink)
        for _ in range(n):
            await asyncio.sleep(0)
            bar.update(1)
        bar.close()
        return n

    @dn.effect
    def plain(x: int) -> int:  # no bar: no progress record
        return x

    fail = [True]

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        total = await ctx.run(rows, 20) + await pages(7) + plain(1)
        if fail:  # the first execution fails after its steps: a resume replays them
            raise RuntimeError(fail.pop())
        return total

    seen: list[tuple[dict[str, Any], str]] = []

    async def first() -> str:
        job = dn.start(wf, run_id="bars")
        job.subscribe(lambda m: seen.append((m, threading.current_thread().name)))
        with pytest.raises(RuntimeError):
            await job.wait()
        return threading.current_thread().name

    loop_thread = asyncio.run(first())
    assert calls == ["rows", "pages"]
    progress = [m for m, _ in seen if m["kind"] == "progress"]
    assert {t for m, t in seen if m["kind"] == "progress"} == {loop_thread}
    descs = {(m["seq"], m["desc"]) for m in progress}
    assert descs == {(0, "rows"), (1, "pages")}  # the inner bar "cells" never reached the row
    last = {m["seq"]: (m["done"], m["total"]) for m in progress}
    assert last == {0: (20, 20), 1: (7, 7)}

    store = dn.get_store()
    t = trace.run_trace(store, "bars")
    assert [s["progress"] for s in t["steps"]] == [
        {"n": 20, "total": 20, "desc": "rows"},
        {"n": 7, "total": 7, "desc": "pages"},
        None,
    ]
    text = trace.format_trace(t)
    assert "20/20 rows" in text and "7/7 pages" in text
    assert "20/20 rows" in trace.format_run(trace.run_info(store, "bars"))

    # replayed: nothing runs or reports, and each step's message carries its final count
    steps: list[dict[str, Any]] = []

    async def again() -> int:
        job = dn.resume("bars")
        job.subscribe(lambda m: steps.append(m))
        out: int = await job.wait()
        return out

    clock.advance(1)  # the trace tells executions apart by time
    assert asyncio.run(again()) == 68 and calls == ["rows", "pages"]
    assert [m for m in steps if m["kind"] == "progress"] == []
    replayed = [m for m in steps if m["kind"] == "step"]
    assert [(m["state"], m.get("progress")) for m in replayed] == [
        ("replayed", {"n": 20, "total": 20, "desc": "rows"}),
        ("replayed", {"n": 7, "total": 7, "desc": "pages"}),
        ("replayed", None),
    ]

    from durable_nb.widgets._model import TraceModel

    live = TraceModel("bars")
    for m in steps:
        live.apply(m)
    stored = TraceModel("bars")
    stored.load_trace(trace.run_trace(store, "bars"))
    for model in (live, stored):
        assert [(r["state"], r["progress"]) for r in model.rows] == [
            ("replayed", "20/20 rows"),
            ("replayed", "7/7 pages"),
            ("replayed", ""),
        ]


def test_the_final_count_is_recorded_without_a_listener_and_a_broken_loop_keeps_its_count() -> None:
    """No widget follows the run (a script's dn.run): dn.progress is a tqdm bar there, whose
    final count is still recorded; a loop left early records how far it got."""

    @dn.effect
    def scan(n: int) -> int:
        seen = 0
        for i in dn.progress(range(n), desc="scan"):
            if i == 4:
                break
            seen += 1
        return seen

    @dn.effect
    def count(n: int) -> int:
        return sum(1 for _ in dn.progress(iter(range(n))))  # no total, no desc

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return scan(10) + count(3)

    assert dn.run(wf, run_id="quiet") == 7
    t = trace.run_trace(dn.get_store(), "quiet")
    assert [s["progress"] for s in t["steps"]] == [
        {"n": 4, "total": 10, "desc": "scan"},
        {"n": 3, "total": None, "desc": ""},
    ]
    assert trace.progress_text(t["steps"][0]["progress"]) == "4/10 scan"
    assert trace.progress_text(t["steps"][1]["progress"]) == "3"


def test_tqdm_imported_inside_an_effect_after_durable_nb_is_hooked_too(tmp_path: Path) -> None:
    """tqdm is hooked when it is imported, not before: durable_nb imports nothing for it."""
    code = (
        "import sys, durable_nb as dn\n"
        "assert 'tqdm' not in sys.modules, 'durable_nb imported tqdm'\n"
        "dn.set_store(sys.argv[1])\n"
        "@dn.effect\n"
        "def work(n):\n"
        "    from tqdm import tqdm\n"
        "    return sum(1 for _ in tqdm(range(n), desc='late', disable=False))\n"
        "@dn.durable\n"
        "async def wf(ctx):\n"
        "    return work(5)\n"
        "print(dn.run(wf, run_id='late'))\n"
    )
    p = helpers.spawn_python("-c", code, str(tmp_path / "s.duckdb"), cwd=tmp_path)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.strip() == "5"
    t = trace.run_trace(dn.set_store(str(tmp_path / "s.duckdb")), "late")
    assert t["steps"][0]["progress"] == {"n": 5, "total": 5, "desc": "late"}
