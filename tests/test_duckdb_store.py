"""What only the DuckDB store has: its file format, schema versions, journal recovery."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import duckdb
import pytest

from durable_nb import _codecs
from durable_nb.errors import (
    StoreFormatError,
    StoreUnavailableError,
    StoreVersionError,
)
from durable_nb.store import EffectRecord, open_store
from durable_nb.store._duckdb import SCHEMA_VERSION, DuckDBStore

from .helpers import run_python


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
    assert names == ["initial: effects, runs, signals, events, journal offsets"]
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
            r"^'.*other\.duckdb' is a DuckDB database but not a durable_nb store "
            r"\(it has tables \['customers'\] and no dn_meta\); choose another store path$"
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
    wal = store._wal_path
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
