"""Shared test utilities."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> Any:
    """The module ``benchmarks/<name>.py`` (the benchmarks are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def run(ip: InteractiveShell, cell: str) -> Any:
    res = ip.run_cell(cell, store_history=True)
    if res.error_before_exec is not None:
        raise res.error_before_exec
    if res.error_in_exec is not None:
        raise res.error_in_exec
    return res.result


def restart(ip: InteractiveShell) -> None:
    """What a kernel restart leaves: the store, nothing in memory."""
    keep = {"In", "Out", "exit", "quit", "get_ipython", "calls", "tick"}
    for name in [n for n in ip.user_ns if not n.startswith("_") and n not in keep]:
        del ip.user_ns[name]


def llm_server() -> Any:
    """``notebooks/llm_server.py``, the deterministic OpenAI-compatible server, as a module."""
    import importlib.util

    name = "llm_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "notebooks" / "llm_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses and pickles resolve the module by name
    spec.loader.exec_module(module)
    return module


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


def can_take(store: Any, run_id: str) -> bool:
    """Whether ``store`` (another process's) takes the run's lease at once; it lets it go
    again."""
    from durable_nb.errors import RunLockedError

    try:
        store.acquire_run(run_id, "another process").release()
    except RunLockedError:
        return False
    return True


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
