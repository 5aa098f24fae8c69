"""The user guide (``docs/``): it builds with warnings as errors, every Python example in it
runs, every block that does not run says why, and the README links to every page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
RUN = ("python", "ipython")
# a fence: its info string's language and the title attribute, if any
FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)$")
TITLE = re.compile(r'title="(?P<title>[^"]*)"')


def blocks(page: Path) -> list[dict[str, str]]:
    """Every fenced block of a page: ``lang``, ``title``, ``code`` and ``where`` (page:line)."""
    out: list[dict[str, str]] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].lstrip().startswith("```") and lines[i].startswith(" "):
                raise AssertionError(f"{page.name}:{i + 1}: indented fences are not checked")
            i += 1
            continue
        start = i
        i += 1
        body = []
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        t = TITLE.search(m["attrs"])
        out.append(
            {
                "lang": m["lang"],
                "title": t["title"] if t else "",
                "code": "\n".join(body) + "\n",
                "where": f"docs/{page.name}:{start + 1}",
            }
        )
        i += 1
    return out


def test_every_block_runs_or_says_why_not() -> None:
    for name in PAGES:
        for b in blocks(DOCS / name):
            if b["lang"] in RUN and not b["title"].startswith("not run"):
                continue
            assert b["title"].startswith(("not run", "output")), (
                f"{b['where']}: a {b['lang'] or 'plain'} block is not run by the tests; give it "
                'a visible title saying why, e.g. title="not run: a shell command"'
            )


@pytest.mark.parametrize(
    "name",
    [
        p
        for p in PAGES
        if any(b["lang"] in RUN and not b["title"].startswith("not run") for b in blocks(DOCS / p))
    ],
)
def test_the_examples_of_a_page_run(name: str, tmp_path: Path) -> None:
    todo = [
        b for b in blocks(DOCS / name) if b["lang"] in RUN and not b["title"].startswith("not run")
    ]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(todo))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_NB_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "docs_runner.py"), str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in PAGES:
        page = "index.html" if name == "index.md" else f"{name[:-3]}/index.html"
        assert (tmp_path / "site" / page).exists(), page
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("runs", "trace", "worker", "import", "metrics"):
        assert f"durable-nb {command}" in cli, command  # generated from the commands' help


def test_the_readme_links_to_every_guide_page() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in PAGES:
        assert f"docs/{name}" in readme, f"README.md does not link to docs/{name}"


def test_the_picture_of_the_widget_is_committed() -> None:
    # made by tests/test_browser.py in a real JupyterLab (DURABLE_NB_DOCS_SCREENSHOT=1)
    picture = DOCS / "images" / "trace-widget.png"
    assert picture.exists() and picture.stat().st_size > 0
    assert "docs/images/trace-widget.png" in (ROOT / "README.md").read_text()
