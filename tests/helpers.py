"""Shared test utilities."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh interpreter with the project on its path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


def wait_until(
    condition: Callable[[], object], what: str, *, timeout: float = 30, interval: float = 0.01
) -> None:
    """Poll ``condition`` until it is true; fail loudly (naming ``what``) when it never is.
    A bound on a wait, not a measurement: tests never assert how long something took."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(interval)


def spawn_python(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bool = False,
) -> subprocess.Popen[str]:
    """Start ``python ARGS...`` (a script and its arguments, or ``-c CODE``) in a fresh
    interpreter with the project on its path; text pipes for stdout and stderr (and stdin
    when asked). The one launcher of the tests' real processes."""
    return subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
