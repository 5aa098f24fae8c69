"""``@effect(shared=True)``: one cache for every process on a store; concurrent first calls
of one key execute once (a claim), the others replay what it recorded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import durable_nb as dn

from .helpers import ROOT

CALLER = textwrap.dedent(
    """
    import os, sys, time
    import durable_nb as dn

    @dn.effect(shared=True, name="embed")
    def embed(text: str) -> list[int]:
        fd = os.open(os.environ["DN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()} {text}\\n".encode())
        os.close(fd)
        time.sleep(1.0)  # long enough that the other caller arrives while this one holds it
        return [ord(c) for c in text]

    # start together: wait for the go file
    while not os.path.exists(os.environ["DN_GO"]):
        time.sleep(0.005)
    print(embed("hello"), embed("hello"))
    """
)


def _callers(tmp_path: Path, url: str, n: int) -> list[tuple[int, str, str]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DURABLE_NB_STORE": url,
        "DURABLE_NB_KEY": "shared-cache-test-key-0123456789",
        "DN_LOG": str(tmp_path / "log"),
        "DN_GO": str(tmp_path / "go"),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CALLER],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.parametrize("kind", ["duckdb", "postgres"])
def test_concurrent_first_calls_in_three_processes_execute_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = str(tmp_path / "store.duckdb") if kind == "duckdb" else request.getfixturevalue("pg_url")
    results = _callers(tmp_path, url, 3)
    for rc, out, err in results:
        assert rc == 0, err
        assert out.strip() == "[104, 101, 108, 108, 111] [104, 101, 108, 108, 111]", err
    executions = (tmp_path / "log").read_text().splitlines()
    assert len(executions) == 1, executions


# -------------------------------------------- regressions found in review (each failed before its fix)


def test_concurrent_calls_of_a_shared_effect_in_one_process_execute_once() -> None:
    """Two runs of a worker (one process, one owner) call one shared key at once."""
    calls: list[int] = []

    @dn.effect(shared=True)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0.05)
        return x * 2

    @dn.effect(shared=True)
    def fetch_sync(x: int) -> int:
        calls.append(x)
        time.sleep(0.05)
        return x * 3

    async def body() -> list[int]:
        return list(await asyncio.gather(fetch(1), fetch(1)))

    assert asyncio.run(body()) == [2, 2]
    assert calls == [1]

    async def threads() -> list[int]:
        return list(
            await asyncio.gather(asyncio.to_thread(fetch_sync, 2), asyncio.to_thread(fetch_sync, 2))
        )

    assert asyncio.run(threads()) == [6, 6]
    assert calls == [1, 2]
