"""PostgreSQL faults under a running workflow, on a private cluster of its own (``initdb`` on
its own port, run as the ``postgres`` user) so the server can be restarted and its backends
killed without touching the shared server other tests use.

A real process runs a workflow of 40 effects; the test restarts the server, or terminates
every backend of the process (``pg_terminate_backend``), while an effect is in flight, three
times. The process retries what the store refuses (``StoreUnavailableError`` while the
server is away, ``RunLockedError`` once its lease's session is gone) and the run resumes
from its history. Executions are counted from a log file the process appends to: no effect
whose result the workflow saw ever runs again, and the run's result is exact.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import PG_TEST_KEY
from .helpers import ROOT

pytestmark = pytest.mark.postgres

_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))

FLOW = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    import durable_nb as dn
    from durable_nb.errors import RunLockedError, StoreUnavailableError

    LOG = os.environ["DN_LOG"]
    SLOW = {int(s) for s in os.environ["DN_SLOW_AT"].split(",")}

    def log(*parts):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(map(str, parts)) + "\\n").encode())
        finally:
            os.close(fd)

    @dn.effect
    async def step(i: int) -> int:
        log("start", i)
        await asyncio.sleep(1.0 if i in SLOW else 0.01)  # the slow ones are hit by a fault
        log("end", i)
        return i * i

    @dn.durable(name="pgfault")
    async def flow(ctx: dn.Context, n: int) -> int:
        total = 0
        for i in range(n):
            total += await step(i)
            log("seen", i)
        return total

    for attempt in range(600):
        try:
            result = dn.run(flow, 40, run_id="r1")
            break
        except (StoreUnavailableError, RunLockedError) as e:  # the server is away, or was
            log("retry", type(e).__name__)
            time.sleep(0.1)
    print(json.dumps({"result": result}), flush=True)
    """
)


class Cluster:
    """A private PostgreSQL cluster: ``initdb`` in a temporary directory, its own port."""

    def __init__(self) -> None:
        self.bin = _BIN[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="dn-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            cwd=self.dir,
        )

    def _ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options, *args
        )

    def start(self) -> None:
        self._ctl("-w", "start")

    def restart(self) -> None:
        self._ctl("-w", "-m", "fast", "restart")

    def terminate_backends(self) -> int:
        """End every client session but this one's: all of the workflow process's."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
        return len(rows)

    def url(self, schema: str | None = None) -> str:
        url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return url + (f"?schema={schema}" if schema else "")

    def stop(self) -> None:
        try:
            self._ctl("-w", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not _BIN or shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs PostgreSQL's server binaries and root (to run them as postgres)")
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


def _lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _wait_for(log: Path, line: list[str], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while line not in _lines(log):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {line} in the log within 120 s"
        time.sleep(0.01)


@pytest.mark.parametrize("fault", ["restart", "terminate"])
def test_server_faults_mid_effect_pause_and_resume_the_run_without_a_second_record(
    cluster: Cluster, tmp_path: Path, fault: str
) -> None:
    log = tmp_path / "log"
    slow = [10, 20, 30]
    flow = tmp_path / "flow.py"
    flow.write_text(FLOW)
    proc = subprocess.Popen(
        [sys.executable, str(flow)],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DN_LOG": str(log),
            "DN_SLOW_AT": ",".join(map(str, slow)),
            "DURABLE_NB_STORE": cluster.url(f"faults_{fault}"),
            "DURABLE_NB_KEY": PG_TEST_KEY.decode(),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for k in slow:
            _wait_for(log, ["start", str(k)], proc)  # the effect is in flight for a second
            if fault == "restart":
                cluster.restart()
            else:
                assert cluster.terminate_backends() >= 1
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"result": sum(i * i for i in range(40))}
    lines = _lines(log)
    assert any(w[0] == "retry" for w in lines), "the faults never reached the run"
    starts: collections.Counter[int] = collections.Counter()
    seen: set[int] = set()
    for what, *rest in lines:
        if what == "seen":
            seen.add(int(rest[0]))
        elif what == "start":
            i = int(rest[0])
            assert i not in seen, f"step {i} executed again after the workflow saw its result"
            starts[i] += 1
    assert sorted(starts) == list(range(40))
    # only an effect in flight when a fault hit may have run twice (its record never landed)
    assert {i for i, c in starts.items() if c > 1} <= set(slow), starts
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT input_hash, count(*) FROM faults_{fault}.dn_effects "
            "WHERE scope = 'run/r1' GROUP BY input_hash"
        ).fetchall()
    assert len(rows) == 40 and all(n == 1 for _, n in rows)  # one record per effect
