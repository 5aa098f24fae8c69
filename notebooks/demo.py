"""The main demo: a workflow that crashes halfway, then resumes in a new process; then a
notebook run twice headless.

    python notebooks/demo.py

Run 1 executes slow "downloads" and is killed mid-way (like a dying kernel); run 2, a fresh
process, replays the finished steps in microseconds and executes only the rest; run 3 finds
the run completed and returns its recorded result at once. Then ``llm.ipynb`` (the real
``openai`` package against a local deterministic server) runs twice in fresh kernels, as
"Restart & Run All" would: the demo counts the requests at the server, and the second run
sends none. Uses ``demo-store/`` next to the working directory (deleted at the start, so the
demo always starts clean).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import durable_nb as dn

EXECUTED = 0


@dn.effect
async def download(page: int) -> dict[str, object]:
    """Stands in for a slow network call or an LLM request."""
    global EXECUTED
    EXECUTED += 1
    await asyncio.sleep(0.2)
    return {"page": page, "words": 100 + 7 * page}


@dn.effect
def summarize(pages: list[dict[str, object]]) -> int:
    global EXECUTED
    EXECUTED += 1
    return sum(int(str(p["words"])) for p in pages)


@dn.durable
async def pipeline(ctx: dn.Context, n_pages: int, crash_after: int) -> int:
    pages = []
    for i in range(n_pages):
        pages.append(await download(i))
        if i + 1 == crash_after:
            print(f"    ... the process is killed after {crash_after} downloads (SIGKILL)")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    total = summarize(pages)
    ctx.set_status({"pages": n_pages, "words": total})
    return total


def one_run(label: str, crash_after: int) -> None:
    t0 = time.perf_counter()
    total = dn.run(pipeline, 10, crash_after, run_id="demo")
    ms = (time.perf_counter() - t0) * 1000
    print(
        f"{label}: total words = {total}; effects executed in this process: {EXECUTED}; {ms:.0f} ms"
    )


def main() -> None:
    if len(sys.argv) > 1:  # a child process: one execution of the run
        one_run(sys.argv[1], int(sys.argv[2]))
        return
    root = Path.cwd() / "demo-store"
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "DURABLE_NB_STORE": str(root / "store.duckdb")}
    print("durable_nb demo: 10 downloads of 0.2 s each, then a summary.\n")
    for label, crash in (("run 1", 6), ("run 2", 0), ("run 3", 0)):
        print(f"{label} (new process){', crashes' if crash else ''}:")
        subprocess.run([sys.executable, __file__, label, str(crash)], env=env, check=False)
    print(
        "\nrun 2 replayed the 6 finished downloads and executed only the other 4 and the "
        "summary;\nrun 3 executed nothing. Inspect the run with:\n"
        f"  durable-nb --store {root / 'store.duckdb'} show demo"
    )
    notebook_twice(root / "notebook")


def notebook_twice(workdir: Path) -> None:
    """Run notebooks/llm.ipynb twice in fresh kernels; say what the second run skipped."""
    here = Path(__file__).resolve().parent
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        print("\n(the notebook part needs the notebook extra: pip install 'durable_nb[notebook]')")
        return
    sys.path.insert(0, str(here))
    import llm_server

    workdir.mkdir(parents=True)
    nb = nbformat.read(here / "llm.ipynb", as_version=4)
    print("\nnotebooks/llm.ipynb, run twice headless (each run in a fresh kernel):")
    with llm_server.LLMServer() as server:
        os.environ["DURABLE_NB_LLM_URL"] = server.url
        before = 0
        for label in ("first run ", "second run"):
            t0 = time.perf_counter()
            done = nbformat.from_dict(nb)
            NotebookClient(
                done,
                timeout=120,
                kernel_name="python3",
                resources={"metadata": {"path": str(workdir)}},
            ).execute()
            took = time.perf_counter() - t0
            sent, before = server.requests - before, server.requests
            replayed = sum(
                "[durable_nb] replayed this cell" in o.get("text", "")
                for c in done.cells
                if c.cell_type == "code"
                for o in c.outputs
            )
            print(
                f"  {label}: {sent} requests to the LLM server, {replayed} cached cell(s) "
                f"replayed; {took:.1f} s"
            )
    print(
        "  the second run skipped every request: the cached cell, the wrapped client's calls, "
        "the\n  streamed answer and the agent's turns all replayed from the store.\n"
        'Open the examples in JupyterLab (README, "Try it in JupyterLab"):\n'
        "  .venv/bin/durable-nb install-kernel --sys-prefix && .venv/bin/jupyter lab notebooks/"
    )


if __name__ == "__main__":
    main()
