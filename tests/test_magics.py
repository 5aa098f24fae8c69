"""The magics, driven through ``run_cell`` the way users hit them."""

from __future__ import annotations

import re
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.store import MemoryStore

from .helpers import restart, run

EFFECT_CELL = """%%effect
import math
print("computing", x)
y = [math.sqrt(x), x * 2]
tick(x)
y[1] + 1
"""


def test_effect_cell_replays_outputs_and_variables(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "x = 16")
    assert run(ip, EFFECT_CELL) == 33
    assert capsys.readouterr().out.startswith("computing 16\n")
    restart(ip)
    run(ip, "x = 16")
    assert run(ip, EFFECT_CELL) == 33
    out = capsys.readouterr().out
    assert out.startswith("computing 16\n")
    assert re.search(
        r"^\[durable_nb\] replayed this cell \(recorded .*\); skipped \d+\.\d\d s of work$",
        out,
        re.M,
    )
    assert ip.user_ns["y"] == [4.0, 32]
    assert ip.user_ns["math"].sqrt(4) == 2
    assert ip.user_ns["calls"] == [16]  # the body ran once
    run(ip, "x = 25")
    assert run(ip, EFFECT_CELL) == 51  # an input changed: it runs
    assert ip.user_ns["calls"] == [16, 25]
    run(ip, EFFECT_CELL.replace("%%effect", "%%effect --force"))
    assert ip.user_ns["calls"] == [16, 25, 25]


def test_effect_cell_key_follows_code_and_reads_in_comprehensions(ip: InteractiveShell) -> None:
    run(ip, "n = 3\nscale = 10")
    cell = "%%effect\nout = [i * scale for i in range(n)]\ntick(1)\n"
    run(ip, cell)
    run(ip, cell)
    assert len(ip.user_ns["calls"]) == 1
    run(ip, "scale = 11")  # read only inside the comprehension: still an input
    run(ip, cell)
    assert ip.user_ns["out"] == [0, 11, 22]
    assert len(ip.user_ns["calls"]) == 2
    run(ip, cell.replace("i * scale", "i * scale + 0"))  # a real edit: runs
    assert len(ip.user_ns["calls"]) == 3
    run(ip, cell.replace("\ntick", "  # a comment\ntick"))  # a comment does not count
    assert len(ip.user_ns["calls"]) == 3


def test_a_variable_that_cannot_be_stored_warns_and_the_cell_still_runs(
    ip: InteractiveShell,
) -> None:
    cell = "%%effect\nimport threading\nlock = threading.Lock()\ntick(1)\n"
    with pytest.warns(UserWarning, match=r"^%%effect: variable 'lock' \(lock\) cannot be stored"):
        run(ip, cell)
    with pytest.warns(UserWarning):
        run(ip, cell)
    assert len(ip.user_ns["calls"]) == 2


def test_effect_functions_in_cells_are_memoized_per_cell(ip: InteractiveShell) -> None:
    run(ip, "import durable_nb as dn\n@dn.effect\ndef sq(v):\n    tick(v)\n    return v * v\n")
    assert run(ip, "sq(3) + sq(3)") == 18
    assert run(ip, "sq(3) + sq(3)") == 18  # a rerun: both occurrences replay
    assert ip.user_ns["calls"] == [3, 3]


DURABLE_CELL = """%%durable pipeline
import asyncio
import durable_nb as dn

@dn.effect
async def fetch(u):
    tick(u)
    await asyncio.sleep(0)
    return len(u)

sizes = await asyncio.gather(*(fetch(u) for u in ["a", "bb"]))
assert ctx.run_id == "pipeline"
print("sizes", sizes)
sum(sizes)
"""


def test_durable_cell_replays_after_a_restart(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(ip, DURABLE_CELL) == 3
    assert ip.user_ns["sizes"] == [1, 2]
    assert "ctx" not in ip.user_ns
    restart(ip)
    assert run(ip, DURABLE_CELL) == 3  # completed: its recorded result
    assert ip.user_ns["calls"] == ["a", "bb"]
    restart(ip)
    edited = DURABLE_CELL.replace('["a", "bb"]', '["a", "bb", "ccc"]')
    assert run(ip, edited) == 6  # edited: replays a and bb, runs ccc
    assert ip.user_ns["calls"] == ["a", "bb", "ccc"]
    assert ip.user_ns["sizes"] == [1, 2, 3]
    assert "sizes [1, 2, 3]" in capsys.readouterr().out
    assert run(ip, edited.replace("%%durable pipeline", "%%durable pipeline --restart")) == 6
    assert ip.user_ns["calls"] == ["a", "bb", "ccc", "a", "bb", "ccc"]


def test_durable_cell_in_the_background_returns_a_job(ip: InteractiveShell) -> None:
    job = run(ip, "%%durable bg --background\nimport asyncio\nawait asyncio.sleep(0)\n41 + 1\n")
    assert job.run_id == "bg"
    assert job.result(timeout=30) == 42


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("%%durable\nx = (1,\n", r"^the %%durable cell has a syntax error on line 2: "),
        ("%%durable\nreturn 5\n", r"^a %%durable cell cannot `return` at top level; "),
        ("%%durable\nctx = 1\n", r"^the %%durable cell assigns `ctx`, which is the run's Context"),
        ("%%durable --nope\n1\n", r"unrecognized arguments: --nope"),
    ],
)
def test_durable_cell_misuse_is_a_usage_error_and_writes_nothing(
    ip: InteractiveShell, cell: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        run(ip, cell)
    assert runtime.store.list_runs() == []


def test_durable_line_magic(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%%durable job1\nimport durable_nb as dn\nawait ctx.sleep(0)\n1")
    capsys.readouterr()
    run(ip, "%durable runs")
    assert re.search(r"^job1 +completed ", capsys.readouterr().out, re.M)
    run(ip, "%durable show job1")
    assert "status    completed" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"^no run 'nope' in the store"):
        run(ip, "%durable show nope")
    with pytest.raises(UsageError, match=r"^the payload '\{bad' is not JSON"):
        run(ip, "%durable signal job1 go {bad")
    with pytest.raises(
        UsageError, match=r"^%durable show takes 1-1 arguments, got 0; type: %durable show RUN$"
    ):
        run(ip, "%durable show")
    with pytest.raises(UsageError, match=r"type %durable\? for help$"):
        run(ip, "%durable frobnicate")
    run(ip, "%durable cache")
    assert re.match(r"^\d+ cached result\(s\) for this notebook", capsys.readouterr().out)
    run(ip, "%durable forget job1")
    assert runtime.store.list_runs() == []
    run(ip, "%durable store :memory:")
    assert isinstance(runtime.store, MemoryStore)


def test_unload_leaves_no_trace_and_reload_is_idempotent(ip: InteractiveShell) -> None:
    hooks = len(ip.events.callbacks["pre_run_cell"])
    run(ip, "%reload_ext durable_nb")
    run(ip, "%load_ext durable_nb")
    assert len(ip.events.callbacks["pre_run_cell"]) == hooks
    run(ip, "%unload_ext durable_nb")
    assert len(ip.events.callbacks["pre_run_cell"]) == hooks - 1
    assert "effect" not in ip.magics_manager.magics["cell"]
    assert "durable" not in ip.magics_manager.magics["line"]
    res = ip.run_cell("%%effect\n1\n")
    assert res.error_in_exec is not None or res.error_before_exec is not None
    run(ip, "%load_ext durable_nb")
    assert "effect" in ip.magics_manager.magics["cell"]


def test_an_input_without_a_content_hash_warns_and_runs_uncached(ip: InteractiveShell) -> None:
    # put there by no cell, so it has no provenance either (tests/test_provenance.py: a lock
    # a cell made is keyed by that cell)
    import threading

    ip.user_ns["guard"] = threading.Lock()
    cell = "%%effect\nwith guard:\n    tick(1)\n"
    for _ in range(2):
        with pytest.warns(
            UserWarning,
            match=r"^%%effect: variable 'guard' has no content hash and no provenance \(no cell "
            r"of this kernel assigned it since durable_nb was loaded\), so this cell is not "
            r"cached; assign it in a cell of this notebook",
        ):
            run(ip, cell)
    assert ip.user_ns["calls"] == [1, 1]


def test_signal_payload_is_the_raw_rest_of_the_line(ip: InteractiveShell) -> None:
    run(ip, "%%durable waiter --background\nv = await ctx.wait_signal('go')\nv")
    run(ip, """%durable signal waiter go '{"by": "you", "n": [1, 2]}'""")
    assert runtime.store.list_signals("waiter")[0].payload == '{"by": "you", "n": [1, 2]}'
    run(ip, '%durable signal waiter go "yes"')
    assert runtime.store.list_signals("waiter")[1].payload == '"yes"'
    # the background run ends on its first signal: wait for it here, or it would still be
    # waiting on this store while later tests run on theirs (its inbox polled with theirs)
    assert dn.get_job("waiter").result(timeout=30) == {"by": "you", "n": [1, 2]}


def test_a_completed_durable_cell_runs_again_replaying_so_its_names_come_back(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = "%%durable again\nimport durable_nb as dn\nn = await ctx.run(tick, 1)\nprint('done')\n"
    run(ip, cell)
    restart(ip)
    capsys.readouterr()
    run(ip, cell)
    assert "n" in ip.user_ns
    assert capsys.readouterr().out == "done\n"
    assert ip.user_ns["calls"] == [1]


def test_tracebacks_show_the_cells_lines(ip: InteractiveShell) -> None:
    res = ip.run_cell("%%effect\nx = 1\nraise ValueError('from the cell')\n")
    assert isinstance(res.error_in_exec, ValueError)
    import traceback

    text = "".join(traceback.format_exception(res.error_in_exec))
    assert "raise ValueError('from the cell')" in text


def test_a_closed_file_from_a_with_block_does_not_stop_caching(
    ip: InteractiveShell, tmp_path: Any
) -> None:
    (tmp_path / "data.txt").write_text("hello")
    ip.user_ns["path"] = str(tmp_path / "data.txt")
    cell = "%%effect\nwith open(path) as f:\n    text = f.read()\ntick(text)\n"
    run(ip, cell)
    run(ip, cell)
    assert ip.user_ns["calls"] == ["hello"]
    assert ip.user_ns["text"] == "hello"
