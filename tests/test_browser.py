"""The trace widget in a real browser: JupyterLab on 127.0.0.1, driven by Playwright with
Debian's chromium (Playwright cannot download its own browsers here).

Opens ``notebooks/approval.ipynb``, runs it, sees the timeline render with the right step
states, clicks the approval button, sees the run complete and the timeline update; then
restarts the kernel, runs it again and sees every step replayed. A second notebook runs a
long effect that reports progress: its elapsed time ticks and its progress advances, a timed
signal wait shows no deadline row, step numbers have no gaps, the ``--background`` cell's
value shows when the run completes, and after a kernel restart the replayed row shows the
recorded final count without spinning. Screenshots go to ``tests/artifacts/`` (git-ignored;
CI keeps them as artifacts).

Skipped when chromium is missing, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
TIMEOUT_MS = 60_000  # per wait: generous, a loaded CI machine is slow

pytestmark = pytest.mark.browser


def _need_browser() -> None:
    missing = [
        what
        for what, ok in [
            (str(CHROMIUM), CHROMIUM.exists()),
            ("playwright", _importable("playwright")),
            ("jupyterlab", _importable("jupyterlab")),
        ]
        if not ok
    ]
    if missing:
        message = f"the browser test needs {', '.join(missing)} (scripts/test.sh installs chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on 127.0.0.1 with a random port and token, serving a copy of the
    example notebook from its own folder (the kernel's store lands there too)."""
    _need_browser()
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "approval.ipynb", root / "approval.ipynb")
    _progress_notebook(root / "progress.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("DURABLE_NB_STORE", "JPY_SESSION_NAME")}
    for var, sub in [
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("IPYTHONDIR", "ipython"),
    ]:
        env[var] = str(tmp_path / sub)
    log = (tmp_path / "lab.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",  # CI runs as root in a container
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.close()
                    pytest.fail(
                        "JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:]
                    )
                time.sleep(0.3)
        yield {"base": base, "token": token, "root": root}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


PROGRESS_CELLS = [
    "%load_ext durable_nb",
    "import time\n"
    "import durable_nb as dn\n\n\n"
    "def slow(n: int) -> int:\n"
    "    pages = 0\n"
    "    for _ in dn.progress(range(n), desc='pages'):\n"
    "        time.sleep(0.5)  # a slow page\n"
    "        pages += 1\n"
    "    return pages\n\n\n"
    "def publish(pages: int, who: object) -> str:\n"
    "    return f'{pages} pages, approved by {who}'",
    "%%durable slow --background\n"
    "pages = await ctx.run(slow, 12)\n"
    "who = await ctx.wait_signal('approve', timeout=3600)\n"
    "await ctx.run(publish, pages, who)",
]


def _progress_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(src, id=f"progress-{i}") for i, src in enumerate(PROGRESS_CELLS)
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, str(path))


def _shot(page: Any, name: str) -> None:
    """The whole window, and the widget itself (the notebook scrolls inside the window)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"))
    widget = ARTIFACTS / f"browser-{name}-widget.png"
    # JupyterLab's toasts (its news prompt) would cover the widget's right side
    page.add_style_tag(content=".Toastify { display: none !important; }")
    page.locator(".dn-trace").first.screenshot(path=str(widget))
    if name == "2-completed" and os.environ.get("DURABLE_NB_DOCS_SCREENSHOT") == "1":
        # the picture of the widget in the README and the guide (committed; made here, by a
        # real JupyterLab in Chromium, when asked)
        shutil.copyfile(widget, ROOT / "docs" / "images" / "trace-widget.png")


def _run_all(page: Any) -> None:
    # not awaited: the command's promise settles only when every cell has run
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def _wait_idle(page: Any) -> None:
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.sessionContext && w.sessionContext.session"
        " && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected'"
        " && w.sessionContext.session.kernel.status === 'idle'; }",
        timeout=TIMEOUT_MS,
    )


def _states(page: Any) -> list[str]:
    return list(
        page.eval_on_selector_all(
            ".dn-trace .dn-row[data-state]", "rows => rows.map(r => r.dataset.state)"
        )
    )


def test_approval_notebook_in_jupyterlab(lab: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{lab['base']}/lab/tree/approval.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
            _wait_idle(page)

            # first run: two effects execute, then the run waits for "approve"
            _run_all(page)
            trace = page.wait_for_selector('.dn-trace[data-status="waiting"]')
            assert trace is not None
            page.wait_for_function(
                "() => document.querySelectorAll("
                "'.dn-trace .dn-row[data-state=\"executed\"]').length >= 2"
            )
            assert _states(page) == ["executed", "executed", "waiting"]
            labels = page.eval_on_selector_all(
                ".dn-trace .dn-row .dn-label code", "c => c.map(e => e.textContent)"
            )
            assert labels == ["fetch_sales", "summarize", "wait_signal('approve')"]
            _shot(page, "1-waiting")

            # click a step: its output (a DataFrame) shows as a table
            page.click('.dn-trace .dn-row[data-seq="0"]')
            page.wait_for_selector(".dn-trace .dn-detail table")
            assert "north" in page.inner_text(".dn-trace .dn-detail")
            # ... and why it executed instead of replaying
            assert page.inner_text(".dn-trace .dn-detail .dn-why").startswith(
                "executed: first call with this key in this run"
            )

            # approve with a payload: the run continues and completes
            page.fill('.dn-trace input[data-payload="approve"]', '"alice"')
            page.click('.dn-trace button[data-signal="approve"]')
            page.wait_for_selector('.dn-trace[data-status="completed"]')
            page.wait_for_function(
                "() => [...document.querySelectorAll('.dn-trace .dn-row[data-state]')]"
                ".map(r => r.dataset.state).join() === 'executed,executed,executed,executed'"
            )
            labels = page.eval_on_selector_all(
                ".dn-trace .dn-row .dn-label code", "c => c.map(e => e.textContent)"
            )
            assert labels == ["fetch_sales", "summarize", "wait_signal('approve')", "publish"]
            assert page.locator('.dn-trace button[data-signal="approve"]').count() == 0
            _shot(page, "2-completed")

            # restart the kernel and run everything again: every step replays
            page.evaluate("() => { window.jupyterapp.commands.execute('kernelmenu:restart'); }")
            page.click(".jp-Dialog .jp-mod-accept")
            _wait_idle(page)
            _run_all(page)
            page.wait_for_function(
                "() => { const t = document.querySelector('.dn-trace');"
                " return t && t.dataset.status === 'completed'"
                " && [...t.querySelectorAll('.dn-row[data-state]')].map(r => r.dataset.state)"
                ".join() === 'replayed,replayed,replayed,replayed'; }"
            )
            totals = page.inner_text(".dn-trace .dn-totals")
            assert totals.startswith("4 steps · 0 executed · 4 replayed · 0 failed")
            page.click('.dn-trace .dn-row[data-seq="0"]')
            page.wait_for_selector(".dn-trace .dn-detail .dn-why")
            why = page.inner_text(".dn-trace .dn-detail .dn-why")
            assert why.startswith("replayed: recorded at ") and "nothing in its key changed" in why
            _shot(page, "3-replayed")
        finally:
            browser.close()


def test_cancel_resume_and_rerun_from_here_in_jupyterlab(lab: dict[str, Any]) -> None:
    """Cancel the waiting run, resume it (the finished steps replay, the cancellation is
    cleared), approve it; then "Re-run from here" on its wait step: the widget follows a
    fork whose first two steps replay and whose wait and publish execute again."""
    from playwright.sync_api import sync_playwright

    def rows_are(states: str) -> None:
        page.wait_for_function(
            "s => [...document.querySelectorAll('.dn-trace .dn-row[data-state]')]"
            ".map(r => r.dataset.state).join() === s",
            arg=states,
        )

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{lab['base']}/lab/tree/approval.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
            _wait_idle(page)
            _run_all(page)
            page.wait_for_selector('.dn-trace[data-status="waiting"]')
            rows_are("executed,executed,waiting")

            page.click('.dn-trace button[data-action="cancel"]')
            page.wait_for_selector('.dn-trace[data-status="cancelled"]')
            page.click('.dn-trace button[data-action="resume"]')
            page.wait_for_selector('.dn-trace[data-status="waiting"]')
            rows_are("replayed,replayed,waiting")
            _shot(page, "4-resumed-after-cancel")

            page.fill('.dn-trace input[data-payload="approve"]', '"bob"')
            page.click('.dn-trace button[data-signal="approve"]')
            page.wait_for_selector('.dn-trace[data-status="completed"]')
            rows_are("replayed,replayed,executed,executed")

            page.click('.dn-trace .dn-row[data-seq="2"]')
            page.click('.dn-trace .dn-detail button[data-action="fork"]')
            page.wait_for_function(
                "() => { const t = document.querySelector('.dn-trace');"
                " return t && t.dataset.status === 'completed'"
                " && t.querySelector('.dn-forked')"
                " && t.querySelector('.dn-forked').textContent === 'forked from approval at step 2'"
                " && [...t.querySelectorAll('.dn-row[data-state]')].map(r => r.dataset.state)"
                ".join() === 'replayed,replayed,executed,executed'; }"
            )
            head = page.inner_text(".dn-trace .dn-head")
            assert "approval@2-" in head
            _shot(page, "5-forked")
        finally:
            browser.close()


def test_progress_ticks_and_the_timeline_is_clean_in_jupyterlab(lab: dict[str, Any]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{lab['base']}/lab/tree/progress.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
            _wait_idle(page)
            _run_all(page)

            # the 6-second effect runs: its progress advances and its elapsed time ticks
            running = '.dn-trace .dn-row[data-state="running"]'
            page.wait_for_selector(f"{running} .dn-progress")
            first_progress = page.inner_text(f"{running} .dn-progress")
            first_elapsed = page.inner_text(f"{running} .dn-dur")
            assert first_progress.endswith("/12 pages"), first_progress
            page.wait_for_function(
                "([sel, before]) => { const e = document.querySelector(sel);"
                " return e && e.textContent !== before; }",
                arg=[f"{running} .dn-dur", first_elapsed],
            )
            page.wait_for_function(
                "([sel, before]) => { const e = document.querySelector(sel);"
                " return e && e.textContent !== before; }",
                arg=[f"{running} .dn-progress", first_progress],
            )
            assert page.inner_text(f"{running} .dn-dur") != "…"
            _shot(page, "4-progress")

            # the effect finished: its final progress stays, nothing spins; the timed wait
            # shows as the wait, without a "deadline" row
            page.wait_for_selector('.dn-trace[data-status="waiting"]')
            page.wait_for_selector('.dn-trace .dn-row[data-state="executed"] .dn-progress')
            assert (
                page.inner_text('.dn-trace .dn-row[data-state="executed"] .dn-progress')
                == "12/12 pages"
            )
            kinds = page.eval_on_selector_all(
                ".dn-trace .dn-row[data-kind]", "rows => rows.map(r => r.dataset.kind)"
            )
            assert "deadline" not in kinds
            page.fill('.dn-trace input[data-payload="approve"]', '"alice"')
            page.click('.dn-trace button[data-signal="approve"]')
            page.wait_for_selector('.dn-trace[data-status="completed"]')

            # contiguous numbers (the deadline took a seq of its own), and the cell's value
            page.wait_for_function(
                "() => [...document.querySelectorAll('.dn-trace .dn-row[data-state]')]"
                ".map(r => r.dataset.state).join() === 'executed,executed,executed'"
            )
            numbers = page.eval_on_selector_all(
                ".dn-trace .dn-row .dn-seq", "c => c.map(e => e.textContent)"
            )
            assert numbers == ["0", "1", "2"]
            assert "signal_id" not in page.inner_text(".dn-trace .dn-timeline")
            page.click('.dn-trace .dn-row[data-kind="signal"]')
            page.wait_for_selector(".dn-trace .dn-detail .dn-why")
            assert "signal_id" not in page.inner_text(".dn-trace .dn-detail")
            assert page.inner_text(".dn-trace .dn-detail h4").startswith("step 1 · ")
            page.wait_for_selector(".dn-trace .dn-result")
            assert page.inner_text(".dn-trace .dn-result") == "→ '12 pages, approved by alice'"
            _shot(page, "5-progress-completed")

            # after a kernel restart the cell replays: the effect's row shows the final count
            # that was recorded with its result, and nothing runs or spins
            page.evaluate(
                "async () => { const w = window.jupyterapp.shell.currentWidget;"
                " await w.sessionContext.session.kernel.restart(); }"
            )
            _wait_idle(page)
            _run_all(page)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.dn-trace .dn-row[data-state]')]"
                ".map(r => r.dataset.state).join() === 'replayed,replayed,replayed'"
            )
            slow = '.dn-trace .dn-row[data-state="replayed"][data-kind="effect"]'
            assert page.inner_text(f"{slow} .dn-progress") == "12/12 pages"
            assert page.query_selector('.dn-trace .dn-row[data-state="running"]') is None
            _shot(page, "6-progress-replayed")
        finally:
            browser.close()
