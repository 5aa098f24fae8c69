"""What only the DuckDB store has: its file format, schema versions, journal recovery."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

import durable_nb as dn
from durable_nb import _codecs
from durable_nb.engine import runtime
from durable_nb.errors import (
    RunLockedError,
    StoreFormatError,
    StoreUnavailableError,
    StoreVersionError,
)
from durable_nb.store import EffectRecord, EventRecord, RunRecord, open_store
from durable_nb.store._duckdb import SCHEMA_VERSION, DuckDBStore
from durable_nb.store._duckdb_merge import MERGE_CHUNK

from .helpers import ROOT, run_python, spawn_python


def _rec(store: DuckDBStore, n: int) -> EffectRecord:
    return EffectRecord("run/x", "m.f", "v", f"h{n}", 0, _codecs.encode(n, store.signer), seq=n)


def test_default_location_and_schema(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    store = open_store()
    try:
        assert isinstance(store, DuckDBStore)
        assert store.path == tmp_path / ".durable_nb" / "store.duckdb"
    finally:
        store.close()
    con = duckdb.connect(str(tmp_path / ".durable_nb" / "store.duckdb"))
    assert con.execute("SELECT value FROM dn_meta WHERE key='schema_version'").fetchall() == [
        (str(SCHEMA_VERSION),)
    ]
    names = [r[1] for r in con.execute("SELECT * FROM dn_migrations ORDER BY version").fetchall()]
    assert names[0] == "initial: effects, runs, signals, events, journal offsets"
    assert len(names) == SCHEMA_VERSION
    con.close()


def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE dn_meta SET value = '99' WHERE key = 'schema_version'")
    con.execute("UPDATE dn_meta SET value = '9.0.0' WHERE key = 'written_by'")
    con.close()
    before = path.read_bytes()
    with pytest.raises(
        StoreVersionError,
        match=(
            rf"^the store '.*s\.duckdb' has schema version 99, written by durable_nb 9\.0\.0; "
            rf"this durable_nb knows schema versions up to {SCHEMA_VERSION}; upgrade durable_nb"
        ),
    ):
        DuckDBStore(path)
    assert path.read_bytes() == before


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE customers (id INT)")
    con.close()
    with pytest.raises(
        StoreFormatError,
        match=(
            r"^the DuckDB database '.*other\.duckdb' has tables \['customers'\] but is not a "
            r"durable_nb store \(no dn_meta table\); choose another store path$"
        ),
    ):
        DuckDBStore(foreign)
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreFormatError, match=r"^'.*junk\.duckdb' is not a DuckDB database"):
        DuckDBStore(junk)
    assert junk.read_bytes() == b"not a database" * 1000


def test_unwritable_location_even_as_root(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory")
    with pytest.raises(
        StoreUnavailableError,
        match=(
            r"^cannot create or write the store directory '.*file'.*; choose a writable location "
            r"with DURABLE_NB_STORE=/path/to/store\.duckdb or `%durable store PATH`$"
        ),
    ):
        DuckDBStore(blocker / "s.duckdb")
    assert blocker.read_text() == "I am a file, not a directory"


def test_journal_of_a_killed_process_is_merged_and_a_torn_tail_ignored(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    code = textwrap.dedent(f"""
        import os, signal
        from durable_nb import _codecs
        from durable_nb.store import EffectRecord
        from durable_nb.store._duckdb import DuckDBStore
        s = DuckDBStore({str(path)!r}, merge_interval=3600)  # never merges on its own
        for n in range(50):
            s.put_effects([EffectRecord("run/x", "m.f", "v", f"h{{n}}", 0,
                                        _codecs.encode(n, s.signer), seq=n)])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = run_python(code)
    assert proc.returncode == -9, proc.stderr
    journals = list((tmp_path / "s.duckdb.d" / "journal").glob("*.wal"))
    assert len(journals) == 1
    with open(journals[0], "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage-of-a-half-written-record")
    store = DuckDBStore(path)
    try:
        recs = store.load_effects("run/x")
        assert [_codecs.decode(r.payload, store.signer) for r in recs] == list(range(50))
        assert not journals[0].exists()
    finally:
        store.close()


def test_recovery_is_idempotent_when_a_journal_was_partly_merged(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path)
    store.put_effects([_rec(store, n) for n in range(5)])
    store.flush()
    wal = store._journal.path
    data = wal.read_bytes()
    store.close()
    # as if the process died after merging but before deleting its journal
    orphan = wal.with_name("dead-1-abcd.wal")
    orphan.write_bytes(data)
    store = DuckDBStore(path)
    try:
        assert len(store.load_effects("run/x")) == 5
        assert not orphan.exists()
    finally:
        store.close()


def test_the_file_is_released_when_idle(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0.05, merge_interval=0.01)
    try:
        store.put_effects([_rec(store, 1)])
        code = textwrap.dedent(f"""
            from durable_nb.store._duckdb import DuckDBStore
            s = DuckDBStore({str(path)!r}, lock_timeout=10)
            print(len(s.load_effects("run/x")))
            s.close()
        """)
        proc = run_python(code)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "1"
    finally:
        store.close()


def test_closed_store_says_so(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "s.duckdb")
    store.close()
    with pytest.raises(Exception, match=r"is closed; open a new one$"):
        store.put_effects([EffectRecord("s", "i", "v", "h", 0, _codecs.Payload("json", b"1"))])
    assert re.match(r"^DuckDBStore\('.*s\.duckdb'\)$", repr(store))


def test_a_long_lived_process_merges_journals_of_processes_that_died_meanwhile(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0.05, merge_interval=0.01)
    try:
        assert store.load_effects("run/x") == []
        code = textwrap.dedent(f"""
            import os, signal
            from durable_nb import _codecs
            from durable_nb.store import EffectRecord
            from durable_nb.store._duckdb import DuckDBStore
            s = DuckDBStore({str(path)!r}, merge_interval=3600)
            for n in range(10):
                s.put_effects([EffectRecord("run/x", "m.f", "v", f"h{{n}}", 0,
                                            _codecs.encode(n, s.signer), seq=n)])
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        assert run_python(code).returncode == -9
        assert len(store.load_effects("run/x")) == 10
    finally:
        store.close()


# ---------------------------------------------------------------------- reset, claims, workers

_OLD_STATE = """
    from durable_nb import _codecs
    from durable_nb.store import EffectRecord, RunRecord, SignalRecord
    from durable_nb.store._duckdb import DuckDBStore

    def eff(s, scope, n, value):
        return EffectRecord(scope, "m.f", "v", f"h{{n}}", 0, _codecs.encode(value, s.signer), seq=n)

    s = DuckDBStore({path!r}, merge_interval=3600)  # never merges on its own
    s.put_run(RunRecord("r1", "m.wf", "running", 1.0, 1.0, args=_codecs.encode("old", s.signer)))
    s.put_effects([eff(s, "run/r1", n, "old") for n in range(3)] + [eff(s, "kv/r1", 0, "kv")])
    s.add_signal(SignalRecord("r1", "s1", "go", "1", 1.0))
    s.add_signal(SignalRecord("r1", "s2", "go", "2", 2.0))
    s.flush()
"""


def _run_child(path: Path, body: str) -> None:
    code = textwrap.dedent(_OLD_STATE).format(path=str(path)) + textwrap.dedent(body)
    proc = run_python(code)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["forgotten"], proc.stdout


_RESET_AND_DIE = """
    new = RunRecord("r1", "m.wf", "running", 1.0, 2.0, args=_codecs.encode("new", s.signer),
                    generation=1)
    s.reset_run(new, ["s1"])
    # read your writes before any merge: the old history is gone for this process already
    print("forgotten" if s.get_effect(("run/r1", "m.f", "v", "h0", 0)) is None else "STALE",
          flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_reset_run_is_all_or_nothing_under_sigkill(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "a" / "s.duckdb"
    path.parent.mkdir()
    _run_child(path, "import os, signal\n" + textwrap.dedent(_RESET_AND_DIE))
    # killed after the journal append and before any merge: DuckDB still has the old state
    con = duckdb.connect(str(path))
    assert con.execute("SELECT generation FROM dn_runs").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM dn_effects WHERE scope = 'run/r1'").fetchall() == [
        (3,)
    ]
    con.close()
    torn = tmp_path / "b"
    shutil.copytree(path.parent, torn)
    (wal,) = (torn / "s.duckdb.d" / "journal").glob("*.wal")
    with open(wal, "r+b") as f:  # as if the kill had come in the middle of the append
        f.truncate(wal.stat().st_size - 1)

    store = DuckDBStore(path)  # the whole reset
    try:
        run = store.get_run("r1")
        assert run is not None and run.generation == 1 and run.updated_at == 2.0
        assert run.args is not None and _codecs.decode(run.args, store.signer) == "new"
        assert store.load_effects("run/r1") == []
        assert [_codecs.decode(r.payload, store.signer) for r in store.load_effects("kv/r1")] == [
            "kv"
        ]
        assert [s.signal_id for s in store.list_signals("r1")] == ["s2"]
    finally:
        store.close()

    store = DuckDBStore(torn / "s.duckdb")  # none of it
    try:
        run = store.get_run("r1")
        assert run is not None and run.generation == 0 and run.updated_at == 1.0
        assert run.args is not None and _codecs.decode(run.args, store.signer) == "old"
        assert len(store.load_effects("run/r1")) == 3
        assert [s.signal_id for s in store.list_signals("r1")] == ["s1", "s2"]
    finally:
        store.close()


def test_a_reset_recovered_from_a_dead_journal_drops_this_process_cached_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0.05, merge_interval=0.01)
    try:
        store.put_effects(
            [EffectRecord("run/r1", "m.f", "v", "h0", 0, _codecs.encode("mine", store.signer))]
        )
        assert store.get_effect(("run/r1", "m.f", "v", "h0", 0)) is not None  # cached
        store.flush()
        # the child waits until this process lets go of the file, then resets r1 and dies
        _run_child(path, "import os, signal\n" + textwrap.dedent(_RESET_AND_DIE))
        run = store.get_run("r1")  # reopens the file and merges the dead journal
        assert run is not None and run.generation == 1
        assert store.get_effect(("run/r1", "m.f", "v", "h0", 0)) is None
    finally:
        store.close()


def test_cached_records_deleted_by_another_process_are_not_served(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0.05, merge_interval=0.01)
    keys = [("run/r1", "m.f", "v", "h0", 0), ("top/t", "m.f", "v", "h0", 0)]
    try:
        store.put_effects(
            [
                EffectRecord(
                    k[0], "m.f", "v", "h0", 0, _codecs.encode(1, store.signer), started_at=1
                )
                for k in keys
            ]
        )
        store.flush()
        assert all(store.get_effect(k) is not None for k in keys)  # cached
        code = textwrap.dedent(f"""
            from durable_nb.store._duckdb import DuckDBStore
            s = DuckDBStore({str(path)!r}, lock_timeout=30)
            print(s.delete_run("r1"), s.prune_effects("top/", 2.0))
            s.close()
        """)
        proc = run_python(code)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["False", "1"]
        assert [store.get_effect(k) for k in keys] == [None, None]
    finally:
        store.close()


def _child(code: str) -> subprocess.Popen[str]:
    proc = spawn_python("-c", textwrap.dedent(code), stdin=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child did not start: {line!r} {err}")
    return proc


def test_claim_run_skips_a_run_leased_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path)
    store.put_run(RunRecord("r-old", "m.wf", "queued", 1.0, 1.0))
    store.put_run(RunRecord("r-new", "m.wf", "queued", 2.0, 2.0))
    store.close()
    child = _child(f"""
        import sys
        from durable_nb.store._duckdb import DuckDBStore
        s = DuckDBStore({str(path)!r})
        lease = s.acquire_run("r-old", "child")
        print("ready", flush=True)
        sys.stdin.read()
    """)
    try:
        store = DuckDBStore(path)  # waits until the child lets go of the file
        got = store.claim_run("me", ["m.wf"])
        assert got is not None and got[0].run_id == "r-new"
        assert store.claim_run("me", ["m.wf"]) is None
        child.kill()  # a holder that dies lets go of its lease
        child.wait()
        got2 = store.claim_run("me", ["m.wf"])
        assert got2 is not None and got2[0].run_id == "r-old"
        got[1].release()
        got2[1].release()
        store.close()
    finally:
        child.kill()
        child.communicate()


def test_wait_for_work_wakes_when_another_process_queues_a_run(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0.05, merge_interval=0.01)
    try:
        assert store.claim_run("me", ["m.wf"]) is None
        code = textwrap.dedent(f"""
            from durable_nb.store import RunRecord
            from durable_nb.store._duckdb import DuckDBStore
            s = DuckDBStore({str(path)!r}, lock_timeout=30)
            s.put_run(RunRecord("q1", "m.wf", "queued", 1.0, 1.0))
            s.close()
        """)
        t0 = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        try:
            store.wait_for_work(30)
            waited = time.monotonic() - t0
        finally:
            assert child.wait(timeout=60) == 0
        assert waited < 30  # woken, not timed out
        got = store.claim_run("me", ["m.wf"])
        assert got is not None and got[0].run_id == "q1"
        got[1].release()
    finally:
        store.close()


def test_effect_claims_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    child = _child(f"""
        import sys
        from durable_nb.store._duckdb import DuckDBStore
        s = DuckDBStore({str(path)!r}, idle_close=0.05)
        assert s.claim_effect(("shared", "m.f", "v", "h1", 0), "child", 600)
        assert s.claim_effect(("shared", "m.f", "v", "h2", 0), "child", 0)  # lapses at once
        assert s.claim_effect(("shared", "m.f", "v", "h3", 0), "child", 600)
        s.release_effect(("shared", "m.f", "v", "h3", 0), "child")
        print("ready", flush=True)
        sys.stdin.read()
    """)
    store = DuckDBStore(path)
    try:
        assert store.claim_effect(("shared", "m.f", "v", "h1", 0), "me", 60) is False
        assert store.claim_effect(("shared", "m.f", "v", "h2", 0), "me", 60) is True
        assert store.claim_effect(("shared", "m.f", "v", "h3", 0), "me", 60) is True
        child.kill()  # a claimer that dies lets go of its claims
        child.wait()
        assert store.claim_effect(("shared", "m.f", "v", "h1", 0), "me", 60) is True
        # the lapsed claim was granted without the dead child's lock; now it is taken
        assert store.claim_effect(("shared", "m.f", "v", "h2", 0), "me", 60) is True
        for n in (1, 2, 3):
            store.release_effect(("shared", "m.f", "v", f"h{n}", 0), "me")
        assert list((tmp_path / "s.duckdb.d" / "claims").iterdir()) == []
    finally:
        child.kill()
        child.communicate()
        store.close()


# -------------------------------------------- regressions found in review (each failed before its fix)


CHILD = textwrap.dedent(
    """
    import sys, time
    from durable_nb.store._duckdb import DuckDBStore
    from durable_nb.store import EffectRecord
    from durable_nb._codecs import Payload
    s = DuckDBStore(sys.argv[1], merge_interval=3600, idle_close=0.05)
    lease = s.acquire_run("R", "child")
    s.put_effects([EffectRecord("run/R", "eff", "v", "h", 0, Payload("json", b"42"), seq=0)])
    s._file.close()  # what the idle close does: the record is only in the journal
    print("ready", flush=True)
    time.sleep(60)  # still executing run R when it is killed
    """
)


def test_a_busy_process_taking_over_a_run_sees_the_dead_holders_journal(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    DuckDBStore(path).close()
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    parent = DuckDBStore(path, idle_close=3600)  # holds the file while the child lives
    try:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        lease = parent.acquire_run("R", "parent")
        assert parent.get_effect(("run/R", "eff", "v", "h", 0)) is not None
        lease.release()
    finally:
        parent.close()


def test_the_run_is_merged_and_released_before_its_result_is_seen(tmp_path: Path) -> None:
    @dn.effect
    def side(x: int) -> int:
        return x

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return side(1)

    path = tmp_path / "s.duckdb"
    a = DuckDBStore(path, merge_interval=3600, idle_close=3600)
    b = DuckDBStore(path)  # another user of the same store
    runtime._store = a
    try:
        assert dn.run(wf, run_id="R") == 1
        lease = b.acquire_run("R", "B")
        rec = b.get_run("R")
        assert rec is not None and rec.status == "completed"
        lease.release()
    finally:
        b.close()


def test_a_crash_between_two_chunks_of_one_write_loses_nothing(tmp_path: Path) -> None:
    """A write of more records than one merge transaction takes is merged in chunks; each
    chunk stores the journal offset after its own last record, so a process killed between
    two chunks leaves the rest of the write to the recovery (the offset of the whole write,
    stored with the first chunk, made the recovery skip it)."""
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    done = run_python(
        textwrap.dedent(f"""
            import os, signal
            from durable_nb import _codecs
            from durable_nb.store import EffectRecord
            from durable_nb.store._duckdb import DuckDBStore
            from durable_nb.store._duckdb_merge import MERGE_CHUNK, Merger
            Merger._loop = lambda self: None  # no merge but the one below
            s = DuckDBStore({str(path)!r})
            s.put_effects([
                EffectRecord("run/x", "m.f", "v", f"h{{n}}", 0, _codecs.encode(n, s.signer), seq=n)
                for n in range(2 * MERGE_CHUNK + 100)
            ])  # one journal write
            s._merger.merge_chunk()  # one transaction: the first MERGE_CHUNK records
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    con = duckdb.connect(str(path), read_only=True)
    try:  # the kill came between the chunks
        assert con.execute("SELECT count(*) FROM dn_effects").fetchall() == [(MERGE_CHUNK,)]
    finally:
        con.close()
    store = DuckDBStore(path)  # recovers the dead process's journal
    try:
        got = store.load_effects("run/x")
        assert [r.input_hash for r in got] == [f"h{n}" for n in range(2 * MERGE_CHUNK + 100)]
    finally:
        store.close()


def test_a_read_merges_only_what_is_pending_for_it(tmp_path: Path) -> None:
    """A run's start reads its record, steps and signals: with nothing of it pending, those
    reads leave the journal's backlog to the merge thread (no commit on the caller's
    thread); a read of something pending merges it first (read your own writes)."""
    store = DuckDBStore(tmp_path / "s.duckdb", merge_interval=3600, idle_close=3600)
    try:
        store.put_run(RunRecord("old", "m.wf", "completed", 1.0, 1.0))
        store.flush()
        store.put_effects([_rec(store, n) for n in range(3)])  # pending: run/x
        store.append_events([EventRecord("new", "e1", 1.0, "started")])
        backlog = len(store._merger.pending)
        assert store.get_run("new") is None
        assert store.load_effects("run/new") == []
        assert store.list_signals("new") == []
        rec = store.get_run("old")
        assert rec is not None and rec.status == "completed"
        assert len(store._merger.pending) == backlog  # nothing was merged for those reads
        assert [r.input_hash for r in store.load_effects("run/x")] == ["h0", "h1", "h2"]
        assert [e.event_id for e in store.load_events("new")] == ["e1"]
        store.put_run(RunRecord("new", "m.wf", "running", 2.0, 2.0))
        assert {r.run_id: r.status for r in store.list_runs()} == {
            "new": "running",
            "old": "completed",
        }
    finally:
        store.close()


def test_a_lease_is_let_go_once_the_records_its_next_holder_reads_are_merged(
    tmp_path: Path,
) -> None:
    """The engine lets go of a run without merging on its loop: the merge thread lets go
    once this process's records are in the file. Until then another store object (as
    another process would) cannot take the run; this process can, at once."""
    path = tmp_path / "s.duckdb"
    a = DuckDBStore(path, merge_interval=3600, idle_close=3600)
    b = DuckDBStore(path, idle_close=3600)  # another user of the file: its own run locks
    try:
        lease = a.acquire_run("R", "a")
        a.put_run(RunRecord("R", "m.wf", "completed", 1.0, 1.0))
        with a._file.lock:  # the merge thread cannot merge meanwhile
            later = lease.release_later()
            assert later is not None and not later.done()
            with pytest.raises(RunLockedError):
                b.acquire_run("R", "b")
            again = a.acquire_run("R", "a again")  # still this process's: taken back
            assert later.done()  # whoever waited for the first release is told
            later = again.release_later()
            assert later is not None
        later.result(timeout=30)  # the merge thread merged, then let go
        taken = b.acquire_run("R", "b")
        rec = b.get_run("R")
        assert rec is not None and rec.status == "completed"
        taken.release()
        assert a.acquire_run("S", "a").release_later() is None  # nothing pending: let go now
    finally:
        a.close()
        b.close()


def test_a_journal_is_never_seen_unlocked_while_its_writer_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that recovers dead journals at the very moment another one opens its
    journal must not take it (it would merge and remove a journal about to be written): a
    journal appears under its name only once locked. A fresh one left by a writer that died
    before naming it is removed by the next recovery."""
    import fcntl

    from durable_nb.store import _wal

    folder = tmp_path / "wal"
    folder.mkdir()
    looks: list[bool] = []
    real = fcntl.flock
    looking = False

    def flock(fd: int, op: int) -> None:
        nonlocal looking
        if not looking:  # a recoverer looks at each step of the writer's locking
            looking = True
            try:
                looks.append(_wal.any_dead_journal(folder))
            finally:
                looking = False
        real(fd, op)

    monkeypatch.setattr(_wal.fcntl, "flock", flock)
    journal = _wal.Journal(folder, fsync=False)
    monkeypatch.setattr(_wal.fcntl, "flock", real)
    assert looks and not any(looks)
    assert [p.name for p in folder.iterdir()] == [journal.path.name]
    assert not _wal.any_dead_journal(folder)
    journal.close(merged=False)
    assert _wal.any_dead_journal(folder)  # its writer gone: now it is for the taking

    left = folder / f"gone-1-abcd{_wal.FRESH_SUFFIX}"
    left.touch()
    assert [stem for stem, _ in _wal.dead_journals(folder)] == [journal.path.stem]
    assert not left.exists()


def test_a_journal_whose_fresh_file_a_recovery_takes_is_opened_under_another_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery may lock (and remove) a fresh journal file between its writer's open and
    its flock: the writer then takes another name instead of failing."""
    import fcntl

    from durable_nb.store import _wal

    folder = tmp_path / "wal"
    folder.mkdir()
    real = fcntl.flock
    raced: list[str] = []

    def flock(fd: int, op: int) -> None:
        if not raced:  # the first fresh file: a recovery wins it and removes it
            (fresh,) = folder.glob(f"*{_wal.FRESH_SUFFIX}")
            raced.append(fresh.name)
            assert [stem for stem, _ in _wal.dead_journals(folder)] == []
            assert not fresh.exists()
        real(fd, op)

    monkeypatch.setattr(_wal.fcntl, "flock", flock)
    journal = _wal.Journal(folder, fsync=False)
    monkeypatch.setattr(_wal.fcntl, "flock", real)
    assert raced and journal.path.name != raced[0].removesuffix(_wal.FRESH_SUFFIX) + ".wal"
    assert [p.name for p in folder.iterdir()] == [journal.path.name]
    journal.append(b"x")  # a live, linked journal
    assert not _wal.any_dead_journal(folder)
    journal.close(merged=False)
