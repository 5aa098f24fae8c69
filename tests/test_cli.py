"""The durable-nb command, run as users run it (a subprocess) and in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import durable_nb as dn
from durable_nb.cli import main

from .helpers import ROOT


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "s.duckdb"
    dn.set_store(str(path))

    @dn.effect
    def add(a: int, b: int) -> int:
        return a + b

    @dn.durable(name="adder")
    async def wf(ctx: dn.Context) -> int:
        ctx.set_status({"stage": "adding"})
        return add(1, 2)

    assert dn.run(wf, run_id="r1") == 3
    dn.get_store().close()
    return path


def _cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "durable_nb", "--store", str(path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_runs_show_forget(store_path: Path) -> None:
    out = _cli(store_path, "runs")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^r1 +completed +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  adder$", out.stdout, re.M)
    shown = _cli(store_path, "show", "r1", "--json")
    info = json.loads(shown.stdout)
    assert info["status"] == "completed" and info["custom_status"] == {"stage": "adding"}
    assert [s["args"] for s in info["steps"]] == ["(1, 2)"]
    missing = _cli(store_path, "show", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        f"error: no run 'nope' in the store '{store_path}'; list runs with `durable-nb runs`"
    )
    assert _cli(store_path, "forget", "r1").returncode == 0
    assert _cli(store_path, "runs").stdout.strip() == "no runs"


def test_signal_with_bad_json_is_misuse_and_sends_nothing(store_path: Path) -> None:
    out = _cli(store_path, "signal", "r1", "approve", "{not json")
    assert out.returncode == 2
    assert "is not JSON" in out.stderr
    dn.set_store(str(store_path))
    assert dn.get_store().list_signals("r1") == []


def test_every_command_has_help_and_is_in_the_readme() -> None:
    from durable_nb.cli import cli

    readme = (ROOT / "README.md").read_text()
    for name, cmd in cli.commands.items():
        assert cmd.help, f"command {name} has no help"
        assert f"durable-nb {name}" in readme, f"README does not document `durable-nb {name}`"
    assert main(["--help"]) == 0
