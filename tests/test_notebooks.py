"""The example notebooks, executed in real kernels: "Restart & Run All" twice.

nbclient starts a fresh kernel for each execution, which is exactly a kernel restart. The
first run executes every effect; the second executes none (each effect appends a line to
``$DURABLE_NB_EXEC_LOG``, inherited by the kernel) and shows the same outputs.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

import durable_nb as dn

from . import helpers
from .helpers import ROOT

NOTEBOOKS = ROOT / "notebooks"
REPLAY_NOTE = re.compile(r"^\[durable_nb\] replayed this cell \(recorded .*\); skipped .*\n", re.M)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# A background cell's value is its Job, shown before the run's task had a chance to start
# (first run) or after the store already says the run completed (second run).
JOB_STATUS = re.compile(r"(<durable_nb\.Job run_id='[^']*') status='[a-z]+'>")


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kernel inherits this process's environment: an execution log, the default store."""
    log = tmp_path / "executions.log"
    monkeypatch.setenv("DURABLE_NB_EXEC_LOG", str(log))
    monkeypatch.delenv("DURABLE_NB_STORE", raising=False)  # .durable_nb/ in the working dir
    monkeypatch.delenv("DURABLE_NB_SCOPE", raising=False)
    return log


def execute(nb: nbformat.NotebookNode, workdir: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel whose working directory is ``workdir``; a cell that
    raises fails the test (nbclient's CellExecutionError shows the traceback)."""
    nb = copy.deepcopy(nb)  # the caller's notebook keeps no outputs
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict[str, Any]]:
    """What each code cell showed: its streams (joined, since how a stream is split into
    messages depends on timing) and its rich outputs, without replay notes or timings."""
    shown: list[dict[str, Any]] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        streams: dict[str, str] = {}
        data: list[tuple[str, str]] = []
        for out in cell.outputs:
            if out.output_type == "stream":
                streams[out.name] = streams.get(out.name, "") + REPLAY_NOTE.sub("", out.text)
            elif out.output_type in ("execute_result", "display_data"):
                if WIDGET_VIEW in out.data:
                    continue  # the run's trace widget: executed steps first, replayed ones next
                for mime in ("text/plain", "text/html"):
                    if mime in out.data:
                        data.append((mime, JOB_STATUS.sub(r"\1 status=...>", out.data[mime])))
            else:
                data.append((out.output_type, str(out.get("ename", ""))))
        shown.append({"source": cell.source, "streams": streams, "data": data})
    return shown


def executions(log: Path) -> Counter[str]:
    return Counter(log.read_text(encoding="utf-8").splitlines()) if log.exists() else Counter()


def run_twice(
    name: str, tmp_path: Path, log: Path
) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode, Counter[str]]:
    """Execute ``notebooks/<name>.ipynb`` twice in ``tmp_path``; check that the second run
    executed no effect and showed the same outputs; return both runs and the first's log."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first = execute(nb, workdir)
    executed = executions(log)
    assert (workdir / ".durable_nb" / "store.duckdb").is_file()
    second = execute(nb, workdir)
    assert executions(log) == executed, "the second run executed effects again"
    assert outputs(second) == outputs(first)
    return first, second, executed


def code_cell(nb: nbformat.NotebookNode, starts: str) -> nbformat.NotebookNode:
    """The one code cell whose source starts with ``starts``."""
    cells: list[nbformat.NotebookNode] = [
        c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)
    ]
    (cell,) = cells
    return cell


def cell_text(nb: nbformat.NotebookNode, starts: str) -> str:
    """Everything that code cell showed, as text (streams and text/plain)."""
    outs = code_cell(nb, starts).outputs
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outs)


@pytest.mark.parametrize("name", ["pipeline", "agent", "llm", "cluster"])
def test_committed_notebooks_are_valid_and_have_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    first, second = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert second.cell_type == "code" and second.source == "%load_ext durable_nb"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_pipeline_notebook_replays_everything_after_a_restart(
    tmp_path: Path, kernel_env: Path
) -> None:
    first, second, executed = run_twice("pipeline", tmp_path, kernel_env)
    downloads = [line for line in executed if line.startswith("download https://")]
    assert len(downloads) == 4
    assert executed == Counter([*downloads, "transform", "aggregate"])  # each exactly once

    widget, result = code_cell(first, "%%durable pipeline").outputs
    assert WIDGET_VIEW in widget.data and "durable-nb-trace" in widget.data["text/html"]
    assert result.output_type == "execute_result"
    assert "<table" in result.data["text/html"]  # the workflow's value: a DataFrame
    assert re.search(r"^27 +Perth +7 ", result.data["text/plain"], re.M)
    summary = cell_text(first, "%%effect")
    assert summary.startswith("aggregated 28 readings from 4 cities\n")
    assert re.search(r"^Lima +7 +15\.7 +14\.3 +0$", summary, re.M)
    assert "[durable_nb] replayed this cell" not in summary
    assert "[durable_nb] replayed this cell (recorded " in cell_text(second, "%%effect")


def test_agent_notebook_waits_for_approval_and_replays_after_a_restart(
    tmp_path: Path, kernel_env: Path
) -> None:
    first, _, executed = run_twice("agent", tmp_path, kernel_env)
    assert len(executed) == 4 and set(executed.values()) == {1}  # 3 turns and the answer
    assert all(re.fullmatch(r"model [0-9a-f]{12}", line) for line in executed)
    assert "<durable_nb.Job run_id='agent'" in cell_text(first, "%%durable agent --background")
    final = cell_text(first, "result = await job.wait()")
    assert final.startswith(
        "last status: {'stage': 'done', 'approved_by': 'notebook'}\n{'answer': "
    )
    assert "'turns': 3,\n 'approved_by': 'notebook'}" in final


def test_llm_notebook_sends_no_request_the_second_time(
    tmp_path: Path, kernel_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real openai package against the local server, counted at the server: a %%effect
    cell using a client made by another cell, a wrapped client, a streamed answer and a
    background agent approved by a later cell."""
    llm_server = helpers.llm_server()
    with llm_server.LLMServer() as server:
        monkeypatch.setenv("DURABLE_NB_LLM_URL", server.url)
        workdir = tmp_path / "work"
        workdir.mkdir()
        nb = nbformat.read(NOTEBOOKS / "llm.ipynb", as_version=4)
        first = execute(nb, workdir)
        # 1 cached cell + 1 wrapped call + 1 stream + 4 agent turns
        assert server.paths == {"/v1/chat/completions": 7}
        second = execute(nb, workdir)
        assert server.paths == {"/v1/chat/completions": 7}, "the second run sent requests"
    assert outputs(second) == outputs(first)
    cached = cell_text(first, "%%effect")
    answer, tokens = cached.splitlines()[:2]
    assert answer in llm_server.REPLIES and re.fullmatch(r"tokens: \d+", tokens)
    assert "warning" not in cached.lower()
    assert "[durable_nb] replayed this cell (recorded " in cell_text(second, "%%effect")
    streamed = cell_text(first, "stream = llm.")
    assert re.fullmatch(r"[^\n]+\n\(\d+ completion tokens\)\n", streamed)
    assert cell_text(first, 'job = dn.get_job("llm-agent")').startswith("agent: ")


def test_cluster_notebook_maps_on_dask_and_computes_nothing_the_second_time(
    tmp_path: Path, kernel_env: Path
) -> None:
    """A LocalCluster of worker processes started by the kernel: the first run computes
    every item once (counted by the workers), the second, with a new cluster, none."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("dask[distributed] is not installed (durable_nb[dask])")
    first, _, executed = run_twice("cluster", tmp_path, kernel_env)
    assert executed == Counter(f"score {i}" for i in range(400))  # each item exactly once
    assert "300 scores, the first three [" in cell_text(first, "scores = dn.map(")
    widget, result = code_cell(first, "%%durable cluster-scores").outputs
    assert WIDGET_VIEW in widget.data
    assert re.fullmatch(r"-?\d+\.\d+", result.data["text/plain"])


def test_cached_cells_replay_outputs_in_order_and_in_their_final_state(
    tmp_path: Path, kernel_env: Path
) -> None:
    """stdout, stderr and displays interleaved as they came; a tqdm.auto bar (an ipywidget)
    as the text of its final state, not a dead widget; a matplotlib figure."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext durable_nb"),
            new_code_cell(
                "%%effect\nimport sys\nfrom tqdm.auto import tqdm\nprint('before')\n"
                "for i in tqdm(range(20)):\n    pass\nprint('warn', file=sys.stderr)\n"
                "print('after')\n"
            ),
            new_code_cell(
                "%%effect\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\n"
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    first = execute(nb, workdir)
    second = execute(nb, workdir)
    assert first.cells[1].outputs[0].output_type == "stream"
    assert any(WIDGET_VIEW in o.get("data", {}) for o in first.cells[1].outputs)  # live bar
    shown = []
    for o in second.cells[1].outputs:
        if o.output_type == "stream":
            shown.append((o.name, REPLAY_NOTE.sub("", o.text)))
        else:
            assert WIDGET_VIEW not in o.data
            shown.append((o.output_type, o.data["text/plain"]))
    assert shown[:4] == [
        ("stdout", "before\n"),
        ("display_data", AnyText(r"^100%\|█+\| 20/20 \[")),
        ("stderr", "warn\n"),
        ("stdout", "after\n"),
    ]
    (figure,) = [o for o in second.cells[2].outputs if o.output_type == "display_data"]
    assert figure.data["image/png"] and "Figure" in figure.data["text/plain"]


def test_dn_progress_in_a_cached_cell_is_a_bar_that_replays_in_its_final_state(
    tmp_path: Path, kernel_env: Path
) -> None:
    """Outside a run dn.progress is a tqdm.auto bar; a replay shows its final text."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext durable_nb"),
            new_code_cell(
                "%%effect\nimport durable_nb as dn\n"
                "pages = [p for p in dn.progress(range(12), desc='pages')]\nlen(pages)"
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    first = execute(nb, workdir)
    second = execute(nb, workdir)
    assert any(WIDGET_VIEW in o.get("data", {}) for o in first.cells[1].outputs)  # a live bar
    shown = [o.data["text/plain"] for o in second.cells[1].outputs if o.output_type != "stream"]
    assert shown[0] == AnyText(r"^pages: 100%\|█+\| 12/12 \[")  # the final state, no widget
    assert shown[-1] == "12"
    assert not any(WIDGET_VIEW in o.get("data", {}) for o in second.cells[1].outputs)


def test_a_tqdm_bar_inside_a_durable_cells_effect_reaches_its_widget_and_replays_its_count(
    tmp_path: Path, kernel_env: Path
) -> None:
    """A tqdm.auto bar of the user's own, inside an effect of a %%durable cell, in a real
    kernel: the cell's live trace widget shows its final count on the effect's row; after a
    restart the cell replays (the effect does not run again) and the row still shows the
    count, as does a widget opened from the store."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext durable_nb"),
            new_code_cell(
                "import os\nimport durable_nb as dn\nfrom tqdm.auto import tqdm\n\n"
                "@dn.effect\ndef crunch(n):\n"
                "    with open(os.environ['DURABLE_NB_EXEC_LOG'], 'a') as f:\n"
                "        f.write('crunch\\n')\n"
                "    return sum(1 for _ in tqdm(range(n), desc='rows'))"
            ),
            new_code_cell("%%durable bars\ncrunch(25)"),
            new_code_cell(
                "from ipywidgets.widgets.widget import _instances\n"
                "from durable_nb.widgets import TraceWidget\n"
                "(live,) = [w for w in list(_instances.values()) "
                "if isinstance(w, TraceWidget) and w.run_id == 'bars']\n"
                "live.flush()  # what its timer ships next\n"
                "print('live', [(r['state'], r['progress']) for r in live._model.rows])\n"
                "print('stored', [(r['state'], r['progress']) for r in "
                "TraceWidget('bars')._model.rows])"
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    first = execute(nb, workdir)
    assert executions(kernel_env) == Counter(["crunch"])
    assert cell_text(first, "%%durable").strip().endswith("25")
    assert cell_text(first, "from ipywidgets.widgets").splitlines() == [
        "live [('executed', '25/25 rows')]",
        "stored [('executed', '25/25 rows')]",
    ]
    second = execute(nb, workdir)
    assert executions(kernel_env) == Counter(["crunch"])  # replayed: the effect did not run
    assert cell_text(second, "from ipywidgets.widgets").splitlines() == [
        "live [('replayed', '25/25 rows')]",
        "stored [('replayed', '25/25 rows')]",
    ]


def test_an_unwrapped_clients_responses_kept_by_a_cached_cell_are_counted_once(
    tmp_path: Path, kernel_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A %%effect cell that calls the real `openai` client without dn.wrap, in a real kernel:
    the responses it keeps (a variable, a list of them) count once for the notebook, when
    the cell is recorded; the replay after a restart sends nothing and adds nothing."""
    from nbformat.v4 import new_code_cell, new_notebook

    from durable_nb.client import Client

    llm_server = helpers.llm_server()
    nb = new_notebook(
        cells=[
            new_code_cell("%load_ext durable_nb"),
            new_code_cell(
                "import os\nfrom openai import OpenAI\n"
                "client = OpenAI(base_url=os.environ['LLM_URL'], api_key='x', max_retries=0)"
            ),
            new_code_cell(
                "%%effect\n"
                "msgs = [{'role': 'user', 'content': 'one question'}]\n"
                "first = client.chat.completions.create(model='m', messages=msgs)\n"
                "more = [\n"
                "    client.chat.completions.create(\n"
                "        model='n', messages=[{'role': 'user', 'content': q}]\n"
                "    )\n"
                "    for q in ('two', 'three more words')\n"
                "]\n"
                "first.choices[0].message.content"
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    with llm_server.LLMServer() as server:
        monkeypatch.setenv("LLM_URL", server.url)
        first = execute(nb, workdir)
        assert server.requests == 3
        second = execute(nb, workdir)
        assert server.requests == 3  # replayed: nothing sent again
    assert cell_text(second, "%%effect").endswith(cell_text(first, "%%effect").split("\n")[-1])

    def bill(q: str) -> dict[str, int]:
        msgs = [{"role": "user", "content": q}]
        u = llm_server._usage(msgs, llm_server.reply_for(msgs))
        return {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}

    m_bill = bill("one question")
    n_bill = {k: bill("two")[k] + bill("three more words")[k] for k in ("prompt", "completion")}
    store = dn.set_store(str(workdir / ".durable_nb" / "store.duckdb"))
    m = Client(store).metrics()
    assert m["tokens_by_model"] == {"m": m_bill, "n": n_bill}
    (notebook,) = m["by_notebook"].values()
    assert notebook["tokens"] == {k: m_bill[k] + n_bill[k] for k in ("prompt", "completion")}
    assert notebook["tokens_saved"] == {"prompt": 0, "completion": 0}  # replays outside runs
    store.close()


class AnyText(str):
    """Equal to any string the pattern matches."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.search(str(self), other) is not None

    __hash__ = str.__hash__
