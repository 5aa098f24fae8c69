"""The trace widget, kernel side: wire format, live rows, batching, buttons, static picture,
packaging; and a real kernel where a message sent exactly as the front-end sends it reaches
a background run waiting for a signal and resumes it.

The front-end itself is tested by vitest (extension/widget/test) and in a real browser
(tests/test_browser.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import queue
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import KernelManager

import durable_nb as dn
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    RunCancelledError,
    RunNotFoundError,
    WidgetUnavailableError,
)
from durable_nb.widgets import TraceWidget, _widget
from durable_nb.widgets._messages import MESSAGE_TYPES, typescript
from durable_nb.widgets._model import TraceModel
from durable_nb.widgets._static import static_html

from .helpers import ROOT


def capture(w: TraceWidget) -> list[dict[str, Any]]:
    """Everything the widget sends to the front-end from now on (state updates and custom
    messages), as the comm would carry it."""
    sent: list[dict[str, Any]] = []
    w.comm.send = lambda data=None, buffers=None, **_: sent.append(data)
    return sent


def customs(sent: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m["content"] for m in sent if m["method"] == "custom" and m["content"]["kind"] == kind]


def states(w: TraceWidget) -> list[tuple[str, str]]:
    return [(r["label"], r["state"]) for r in w.rows]


calls: list[str] = []


@dn.effect
async def fetch(day: str) -> dict[str, Any]:
    calls.append(f"fetch {day}")
    return {"day": day, "rows": 3}


@dn.effect
async def publish(report: dict[str, Any], who: object) -> str:
    calls.append("publish")
    if who == "boom":
        raise ValueError("cannot publish for boom")
    return f"{report['day']} by {who}"


@dn.durable
async def approval(ctx: dn.Context, day: str) -> str:
    report = await fetch(day)
    who = await ctx.wait_signal("approve")
    return await publish(report, who)


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop (the project has no async pytest plugin)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------- wire format


def test_typescript_mirror_is_generated_from_the_python_messages() -> None:
    committed = (ROOT / "extension" / "widget" / "src" / "messages.ts").read_text()
    assert committed == typescript(), "regenerate: npm run messages (in extension/widget)"
    for td in MESSAGE_TYPES:
        assert f"export type {td.__name__} = {{" in committed


# ---------------------------------------------------------------------------- live rows


@aio
async def test_rows_follow_a_live_run_and_the_approve_button_resumes_it() -> None:
    calls.clear()
    job = dn.start(approval, "mon", run_id="a1")
    w = job.widget()
    sent = capture(w)
    await settle()
    w.flush()
    assert states(w) == [("fetch", "executed"), ("wait_signal('approve')", "waiting")]
    assert w.run["status"] == "waiting" and w.run["live"] and w.run["can_cancel"]
    assert w.run["detail"] == "waiting for signal 'approve'"
    assert w.waiting == [{"kind": "signal", "name": "approve", "until": ""}]
    assert w.run["workflow"] == approval.name

    # the button's message, as the front-end sends it
    w._on_frontend(w, {"kind": "signal", "name": "approve", "payload": '"alice"'}, [])
    assert await job.wait() == "mon by alice"
    await settle()
    w.flush()
    assert states(w) == [
        ("fetch", "executed"),
        ("wait_signal('approve')", "executed"),
        ("publish", "executed"),
    ]
    assert w.run["status"] == "completed" and not w.run["live"] and w.waiting == []
    assert w.totals == {
        "steps": 3,
        "executed": 3,
        "replayed": 0,
        "failed": 0,
        "running": 0,
        "saved_seconds": 0.0,
    }
    assert customs(sent, "notice") == [
        {"kind": "notice", "level": "info", "text": "sent 'approve' to a1"}
    ]
    # the run ended: the synced list is whole again, at the latest revision
    assert w.steps == w.rows and w.steps_rev == w._model.rev
    assert calls == ["fetch mon", "publish"]


@aio
async def test_live_steps_are_batched_into_one_patch_per_flush() -> None:
    @dn.durable
    async def many(ctx: dn.Context, n: int) -> int:
        for i in range(n):
            await fetch(f"d{i}")
        await ctx.wait_signal("go")
        return n

    job = dn.start(many, 200, run_id="many")
    w = TraceWidget(job, flush_interval=10)  # no timer flush during the test
    await settle()
    w.flush()  # the run started: its rows go out whole once
    sent = capture(w)
    dn.signal("many", "go")
    await job.wait()
    await settle()
    assert sent == []  # 200 listener calls so far, nothing shipped
    w._model.run["live"] = True  # hold the end-of-run full resend back to see the patch
    w._pending = [m for m in w._pending if m["kind"] == "step"]
    w.flush()
    (patch,) = customs(sent, "rows")
    assert patch["rev"] == w._model.rev
    assert [i for i, _ in patch["updates"]] == [200]  # only the changed row: the signal


def test_a_patch_carries_only_changed_rows() -> None:
    m = TraceModel("r")
    m.take_patch()
    for seq in range(5):
        m.apply({"kind": "step", "seq": seq, "name": "m.f", "state": "running", "args": "()"})
    full, updates = m.take_patch()
    assert not full and [i for i, _ in updates] == [0, 1, 2, 3, 4]
    m.apply({"kind": "step", "seq": 3, "name": "m.f", "state": "executed", "duration": 0.5})
    full, updates = m.take_patch()
    assert not full and [(i, r["state"]) for i, r in updates] == [(3, "executed")]
    assert m.take_patch() == (False, [])
    assert m.totals()["running"] == 4 and m.totals()["executed"] == 1


@aio
async def test_a_rerun_shows_replayed_steps_and_the_resume_button_continues_a_failed_run() -> None:
    calls.clear()
    job = dn.start(approval, "tue", run_id="a2")
    dn.signal("a2", "approve", "boom")
    with pytest.raises(ValueError, match=r"^cannot publish for boom$"):
        await job.wait()
    w = TraceWidget(job)
    sent = capture(w)
    w.flush()
    assert w.run["status"] == "failed" and w.run["can_resume"]
    assert [r["state"] for r in w.rows] == ["executed", "executed", "failed"]

    # inspect the failed step: the error with the run's traceback
    w._on_frontend(w, {"kind": "inspect", "seq": 2, "name": w.rows[2]["name"]}, [])
    (detail,) = customs(sent, "detail")
    assert detail["error"].startswith("ValueError('cannot publish for boom')")
    assert "Traceback (most recent call last)" in detail["error"]

    # Resume: the same workflow and arguments; the finished steps replay
    w._on_frontend(w, {"kind": "resume"}, [])
    assert w._job is not job
    with pytest.raises(ValueError):
        await w._job.wait()  # the signal said "boom" again: it replays as recorded
    await settle()
    w.flush()
    assert [r["state"] for r in w.rows] == ["replayed", "replayed", "failed"]
    assert w.totals["replayed"] == 2
    w._on_frontend(w, {"kind": "inspect", "seq": 0, "name": w.rows[0]["name"]}, [])
    assert re.fullmatch(
        r"replayed: recorded at \S+ \S+, nothing in its key changed",
        customs(sent, "detail")[-1]["why"],
    )
    assert calls == ["fetch tue", "publish", "publish"]  # fetch did not run again


@aio
async def test_cancel_button_cancels_a_waiting_run() -> None:
    job = dn.start(approval, "wed", run_id="a3")
    w = job.widget()
    await settle()
    w._on_frontend(w, {"kind": "cancel"}, [])
    with pytest.raises(RunCancelledError):
        await job.wait()
    await settle()
    w.flush()
    assert w.run["status"] == "cancelled" and not w.run["can_cancel"]
    assert w.rows[-1]["state"] == "failed" and w.waiting == []


@aio
async def test_resume_button_resumes_a_cancelled_run_from_its_history() -> None:
    calls.clear()
    job = dn.start(approval, "fri", run_id="a5")
    w = job.widget()
    await settle()
    w._on_frontend(w, {"kind": "cancel"}, [])
    with pytest.raises(RunCancelledError):
        await job.wait()
    await settle()
    w.flush()
    assert w.run["status"] == "cancelled" and w.run["can_resume"]
    sent = capture(w)
    w._on_frontend(w, {"kind": "resume"}, [])
    assert customs(sent, "notice")[-1]["text"] == "resumed a5"
    await settle()
    w.flush()
    assert w.run["status"] == "waiting" and states(w) == [
        ("fetch", "replayed"),
        ("wait_signal('approve')", "waiting"),
    ]
    w._on_frontend(w, {"kind": "signal", "name": "approve", "payload": '"eve"'}, [])
    assert await w._job.wait() == "fri by eve"  # type: ignore[union-attr]
    assert calls == ["fetch fri", "publish"]  # fetch did not run again


@aio
async def test_rerun_from_here_forks_the_run_at_the_clicked_step_and_follows_the_fork() -> None:
    calls.clear()
    job = dn.start(approval, "sat", run_id="a6")
    await settle()
    dn.signal("a6", "approve", "ann")
    assert await job.wait() == "sat by ann"
    w = TraceWidget("a6")
    assert w.run["can_fork"] and w.run["forked_from"] == ""
    sent = capture(w)
    w._on_frontend(w, {"kind": "fork", "seq": 2}, [])  # step 2: publish
    fork = w._job
    assert fork is not None and fork.run_id.startswith("a6@2-") and w.run_id == fork.run_id
    assert customs(sent, "notice")[-1]["text"] == f"re-running a6 from step 2 as {fork.run_id}"
    assert await fork.wait() == "sat by ann"
    await settle()
    w.flush()
    assert w.run["forked_from"] == "a6 at step 2" and w.run["status"] == "completed"
    assert [r["state"] for r in w.rows] == ["replayed", "replayed", "executed"]
    assert calls == ["fetch sat", "publish", "publish"]
    assert dn.Client().run("a6")["totals"]["steps"] == 3  # the original is as it was
    w._on_frontend(w, {"kind": "fork", "seq": "x"}, [])
    assert customs(sent, "notice")[-1] == {
        "kind": "notice",
        "level": "error",
        "text": "seq must be a step number (an int), got 'x'",
    }


@aio
async def test_a_payload_that_is_not_json_is_refused_with_a_notice() -> None:
    job = dn.start(approval, "thu", run_id="a4")
    w = job.widget()
    sent = capture(w)
    await settle()
    w._on_frontend(w, {"kind": "signal", "name": "approve", "payload": "yes"}, [])
    (notice,) = customs(sent, "notice")
    assert notice["level"] == "error"
    assert re.match(r"^the payload 'yes' is not JSON \(.*\); quote text: \"yes\"", notice["text"])
    assert not job.done()
    job.cancel()
    with pytest.raises(RunCancelledError):
        await job.wait()


@aio
async def test_inspect_shows_a_dataframe_output_as_a_small_table() -> None:
    pd = pytest.importorskip("pandas")

    @dn.effect
    async def table(n: int) -> Any:
        return pd.DataFrame({"i": range(n), "sq": [i * i for i in range(n)]})

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return len(await table(50))

    job = dn.start(wf, run_id="df")
    assert await job.wait() == 50
    w = TraceWidget("df")
    sent = capture(w)
    w._on_frontend(w, {"kind": "inspect", "seq": 0, "name": w.rows[0]["name"]}, [])
    (detail,) = customs(sent, "detail")
    assert detail["args"] == "(50)" and detail["output_text"] == ""
    assert detail["why"] == (
        "executed: first call with this key in this run (no earlier execution recorded it)"
    )
    assert detail["output_html"].startswith("<div>(50, 2) · first 20 rows</div><table")
    assert detail["output_html"].count("<tr") == 21  # the header and 20 rows


def test_a_view_that_missed_patches_gets_the_whole_list() -> None:
    w = TraceWidget("x", _missing_ok=True)
    sent = capture(w)
    w._on_frontend(w, {"kind": "sync", "rev": w._model.rev}, [])
    assert sent == []  # up to date
    w._on_frontend(w, {"kind": "sync", "rev": 0}, [])
    (update,) = sent
    assert update["method"] == "update"
    assert set(update["state"]) == {"steps", "steps_rev"}


# ---------------------------------------------------------------------------- arguments


def test_arguments_are_checked() -> None:
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope' in the store"):
        TraceWidget("nope")
    with pytest.raises(ArgumentTypeError, match=r"^run must be a Job or a run id \(str\), got 42"):
        TraceWidget(42)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^flush_interval must be a number of seconds"):
        TraceWidget("x", flush_interval=0, _missing_ok=True)


def test_a_missing_bundle_is_a_clear_error_when_a_widget_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_widget, "BUNDLE", tmp_path / "gone.js")
    monkeypatch.setattr(_widget, "_bundle_cache", None)
    with pytest.raises(
        WidgetUnavailableError,
        match=r"^the trace widget's front-end bundle '.*gone\.js' is missing",
    ):
        TraceWidget("x", _missing_ok=True)


# ---------------------------------------------------------------------------- static picture


def test_the_static_picture_folds_replayed_runs_and_has_no_script() -> None:
    m = TraceModel("long")
    m.take_patch()
    for seq in range(100):
        state = "replayed" if seq < 90 else "executed"
        m.apply({"kind": "step", "seq": seq, "name": "m.f", "state": state, "duration": 0.25})
    m.apply({"kind": "status", "status": "waiting", "detail": {"signal": "ok"}})
    html = static_html(m.run, m.rows, m.totals(), m.waiting)
    assert "<script" not in html
    assert "90 replayed steps" in html and "saved 22.5 s" in html
    assert html.count('data-state="executed"') == 10
    assert html.count('data-state="waiting"') == 1  # the open wait for "ok"
    assert "waiting for signal <code>ok</code>" in html


@aio
async def test_nbconvert_shows_the_static_picture_where_the_widget_cannot_run() -> None:
    from nbconvert import HTMLExporter

    job = dn.start(approval, "fri", run_id="a5")
    dn.signal("a5", "approve", "bob")
    await job.wait()
    w = TraceWidget("a5")
    data, _ = w._repr_mimebundle_()
    assert set(data) == {"text/plain", "text/html", "application/vnd.jupyter.widget-view+json"}
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("%%durable a5")
    cell.outputs = [nbformat.v4.new_output("display_data", data=data)]
    nb.cells.append(cell)
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert "durable-nb-trace" in body
    assert "<code>publish</code>" in body and "3 steps · 3 executed" in body


# ---------------------------------------------------------------------------- a real kernel

WAITING_CELL = """%%durable approval-k --background
import time as _t
first = await ctx.run(lambda: 1)
who = await ctx.wait_signal("approve")
resumed_at = _t.time()
who
"""


def _kernel_messages(kc: Any, until: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while time.monotonic() < until:
        try:
            out.append(kc.get_iopub_msg(timeout=0.1))
        except queue.Empty:
            if out:
                break
    return out


def _run(kc: Any, code: str) -> tuple[str, list[dict[str, Any]]]:
    msg_id = kc.execute(code)
    msgs: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=60)
        msgs.append(msg)
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    reply = kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
    out = "".join(
        m["content"]["text"]
        for m in msgs
        if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
    )
    return out, msgs


def test_a_widget_message_reaches_a_background_run_in_a_real_kernel(tmp_path: Path) -> None:
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path), env={**_kernel_env(), "DURABLE_NB_STORE": ":memory:"})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        _run(kc, "%load_ext durable_nb")
        _, msgs = _run(kc, WAITING_CELL)
        opened = [
            m
            for m in msgs
            if m["msg_type"] == "comm_open"
            and m["content"]["data"]["state"].get("_anywidget_id", "").endswith("TraceWidget")
        ]
        (comm,) = opened
        comm_id = comm["content"]["comm_id"]
        out, _ = _run(kc, "import durable_nb as dn; print(dn.get_job('approval-k').status())")
        assert out == "waiting\n"
        # exactly what the front-end's "Send approve" button sends through the comm
        sent_at = time.time()
        msg = kc.session.msg(
            "comm_msg",
            {
                "comm_id": comm_id,
                "data": {
                    "method": "custom",
                    "content": {"kind": "signal", "name": "approve", "payload": '"k"'},
                },
            },
        )
        kc.shell_channel.send(msg)
        updates = _kernel_messages(kc, time.monotonic() + 10)
        out, _ = _run(
            kc,
            "import asyncio\nr = await asyncio.wait_for(dn.get_job('approval-k').wait(), 30)\n"
            "print(r, resumed_at)",
        )
        result, resumed_at = out.split()
        assert result == "k"
        latency_ms = (float(resumed_at) - sent_at) * 1000
        (ROOT / "tests" / "artifacts").mkdir(parents=True, exist_ok=True)
        (ROOT / "tests" / "artifacts" / "kernel-signal-latency.txt").write_text(
            f"{latency_ms:.1f} ms from the comm message to the run resuming\n"
        )
        print(f"widget click -> run resumed: {latency_ms:.1f} ms")
        statuses = [
            m["content"]["data"]["state"]["run"]["status"]
            for m in updates
            if m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == comm_id
            and "run" in m["content"]["data"].get("state", {})
        ]
        assert "completed" in statuses
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _kernel_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("JPY_SESSION_NAME",)}


# ---------------------------------------------------------------------------- packaging


@pytest.mark.wheel
def test_the_wheel_and_the_sdist_ship_the_bundle(tmp_path: Path) -> None:
    bundle = ROOT / "durable_nb" / "static" / "trace_widget.js"
    assert bundle.exists(), "build it: bash scripts/setup.sh"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps"),
            *("--no-build-isolation", "-w", str(tmp_path), "-q"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("durable_nb-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("durable_nb/static/trace_widget.js")
        names = z.namelist()
    assert shipped == bundle.read_bytes()
    assert "durable_nb/widgets/_widget.py" in names
    out = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (sdist,) = tmp_path.glob("durable_nb-*.tar.gz")
    import tarfile

    with tarfile.open(sdist) as t:
        members = t.getnames()
    assert any(m.endswith("durable_nb/static/trace_widget.js") for m in members)
    assert not any("node_modules" in m for m in members)


def test_importing_the_package_loads_no_widget_library() -> None:
    from .helpers import run_python

    out = run_python(
        "import sys, json, durable_nb, durable_nb.magics\n"
        "print(json.dumps([m for m in ('anywidget', 'ipywidgets') if m in sys.modules]))"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
