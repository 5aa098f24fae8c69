"""The README's demo command works and shows what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .helpers import ROOT


def test_demo_resumes_after_a_kill_and_then_executes_nothing(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "notebooks" / "demo.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "the process is killed after 6 downloads (SIGKILL)" in text
    assert re.search(
        r"^run 2: total words = 1315; effects executed in this process: 5;", text, re.M
    )
    assert re.search(
        r"^run 3: total words = 1315; effects executed in this process: 0;", text, re.M
    )
    # then a notebook, twice headless: the second run sends nothing to the LLM server
    assert re.search(r"^  first run : 7 requests to the LLM server, 0 cached cell", text, re.M)
    assert re.search(r"^  second run: 0 requests to the LLM server, 1 cached cell", text, re.M)
    assert "jupyter lab notebooks/" in text
