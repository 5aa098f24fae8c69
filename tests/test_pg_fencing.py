"""PostgreSQL fencing: a holder that lost its run's lease while it was stopped cannot get a
write in after another process took the run over, and it stops.

Real processes on the local PostgreSQL: the holder is frozen with SIGSTOP inside an effect
(its connections stay open, so the server still sees its session and nobody takes over at
once), kept frozen past its lease, the run is taken over and completed by another process,
then the holder is let go with SIGCONT: its effect finishes there, and its record must be
refused (the record of that step stays the taker's) and the holder must stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from durable_nb import _codecs
from durable_nb._journal import run_scope
from durable_nb.errors import RunLockedError
from durable_nb.store import EffectRecord, EventRecord, RunRecord
from durable_nb.store._postgres import PostgresStore

from .conftest import PG_TEST_KEY, PG_URL
from .helpers import ROOT

pytestmark = pytest.mark.postgres

FLOWS = textwrap.dedent(
    """
    import os, time
    import durable_nb as dn

    LOG = os.environ["DN_LOG"]

    def log(*parts):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(str(p) for p in (*parts, os.getpid())) + "\\n").encode())
        finally:
            os.close(fd)

    @dn.effect(name="fence.step")
    async def step(i: int) -> list[int]:
        log("start", i)
        if str(i) == os.environ.get("DN_STOP_AT"):
            log("inside", i)
            # no await: the loop cannot deliver an interruption before this returns, so
            # the late record is written (and must be refused), not skipped
            time.sleep(float(os.environ["DN_STOP_FOR"]))
        log("end", i)
        return [i, os.getpid()]

    @dn.durable(name="fence.job")
    async def job(ctx: dn.Context, n: int) -> int:
        total = 0
        for i in range(n):
            total += (await step(i))[0]
        return total
    """
)

_RUN = """
import importlib.util, json, sys
import durable_nb as dn
spec = importlib.util.spec_from_file_location("flows", sys.argv[1])
flows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flows)
try:
    print(json.dumps({"result": dn.run(flows.job, int(sys.argv[3]), run_id=sys.argv[2])}))
except dn.RunLockedError as e:
    print(json.dumps({"locked": str(e)}), flush=True)
"""


def _spawn(flows: Path, url: str, log: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUN, str(flows), *args],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DN_LOG": str(log),
            "DURABLE_NB_STORE": url,
            "DURABLE_NB_KEY": PG_TEST_KEY.decode(),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def _lines(log: Path) -> list[tuple[str, int, int]]:
    if not log.exists():
        return []
    return [
        (what, int(i), int(pid))
        for what, i, pid in (line.split() for line in log.read_text().splitlines())
    ]


def test_a_fenced_holders_late_write_is_refused_and_it_stops(tmp_path: Path, pg_url: str) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(FLOWS)
    log = tmp_path / "exec.log"
    url = pg_url + "&lease_seconds=2"
    n, stop_at = 8, 3
    holder = _spawn(flows, url, log, "f", str(n), DN_STOP_AT=str(stop_at), DN_STOP_FOR="1.0")
    try:
        deadline = time.monotonic() + 60
        while not any(what == "inside" for what, _, _ in _lines(log)):
            assert time.monotonic() < deadline and holder.poll() is None, holder.stderr
            time.sleep(0.01)
        os.kill(holder.pid, signal.SIGSTOP)  # frozen inside step 3, connections open
        stopped = len(_lines(log))
        taker = _spawn(flows, url, log, "f", str(n))
        deadline = time.monotonic() + 120
        while True:  # refused while the frozen holder's lease runs, then it takes over
            out = _finish(taker)
            if "result" in out:
                break
            assert "is being executed by" in out["locked"], out
            assert time.monotonic() < deadline, out
            time.sleep(0.3)
            taker = _spawn(flows, url, log, "f", str(n))
        assert out == {"result": sum(range(n))}
        os.kill(holder.pid, signal.SIGCONT)  # its step ends now and its record is sent
        held = _finish(holder)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.communicate()
    # the holder stopped, saying why
    assert "lease" in held.get("locked", ""), held
    rows = _lines(log)
    late = [r for r in rows[stopped:] if r[2] == holder.pid]
    # it finished the step it was frozen in (so its record was written late), and began
    # no step after it
    assert late == [("end", stop_at, holder.pid)], late
    # every step's record is the taker's from the stop on: the late one was refused
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        recorded = {}
        for rec in store.load_effects(run_scope("f")):
            if rec.identity == "fence.step" and rec.payload is not None:
                value = _codecs.decode(rec.payload, store.signer)
                recorded[value[0]] = value[1]
        run = store.get_run("f")
    finally:
        store.close()
    assert run is not None and run.status == "completed"
    assert set(recorded) == set(range(n))
    assert recorded[stop_at] == taker.pid, (recorded, holder.pid, taker.pid)
    assert all(recorded[i] == taker.pid for i in range(stop_at, n)), recorded
    assert all(recorded[i] == holder.pid for i in range(stop_at)), recorded


def test_a_store_refuses_writes_for_a_lease_taken_over_then_forgets_the_fence(
    pg_url: str,
) -> None:
    """In one process, two stores: the first's lease expires (by the database's clock) and
    the second takes the run over; the first's writes of that run's records (an effect, the
    run record, an event) are refused with RunLockedError and its lease is told it is lost;
    once released, the first store writes that run's records freely again (as when it
    queues the run for a worker), while the second's writes were never refused."""
    first = PostgresStore(pg_url, key=PG_TEST_KEY)
    second = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        run = RunRecord("fx", "wf", "running", 1.0, 1.0)
        first.put_run(run)
        lease = first.acquire_run("fx", "first")
        lost: list[str] = []
        lease.on_lost = lambda: lost.append("lost")

        def effect(i: int, who: str) -> EffectRecord:
            payload = _codecs.encode(who, first.signer)
            return EffectRecord(run_scope("fx"), "s", "", f"h{i}", 0, payload=payload, seq=i)

        first.put_effects([effect(0, "first")])  # held: accepted
        with psycopg.connect(PG_URL, autocommit=True) as conn:  # the database's clock ends it
            conn.execute(f'UPDATE "{first.schema}".dn_leases SET expires_at = now()')
        taken = second.acquire_run("fx", "second")
        second.put_effects([effect(1, "second")])
        for write in (
            lambda: first.put_effects([effect(1, "first")]),
            lambda: first.put_run(run),
            lambda: first.append_events([EventRecord("fx", "e1", 2.0, "started", "")]),
            # continue-as-new's reset, and a restart's delete, must not wipe the taker's
            # history either
            lambda: first.reset_run(RunRecord("fx", "wf", "running", 1.0, 2.0, generation=1), ()),
            lambda: first.delete_run("fx"),
        ):
            with pytest.raises(RunLockedError, match=r"^run 'fx' lost its lease: "):
                write()
        assert lost == ["lost"]
        assert second.get_run("fx") is not None
        assert {r.input_hash for r in second.load_effects(run_scope("fx"))} == {"h0", "h1"}
        (rec,) = [r for r in second.load_effects(run_scope("fx")) if r.input_hash == "h1"]
        assert rec.payload is not None and _codecs.decode(rec.payload, second.signer) == "second"
        assert second.load_events("fx") == []
        taken.release()
        lease.release()  # the engine releases it when the run stopped: the fence goes
        first.put_run(RunRecord("fx", "wf", "queued", 1.0, 3.0))
        got = second.get_run("fx")
        assert got is not None and got.status == "queued"
    finally:
        first.close()
        second.close()
