"""Faults in the DuckDB store's I/O path, each injected for real where the machine allows: a
full disk (a small tmpfs), a read-only file system (the tmpfs remounted), an I/O error at the
journal write and at the DuckDB merge (injected), damaged journals, truncated and corrupted
DuckDB files, and the store directory deleted under a running store.

For a full disk, an I/O error and a read-only directory: nothing recorded is lost, and once
the fault clears the same process goes on without a restart. For a damaged file: a clear
error naming it, and the file is not written to."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import duckdb
import pytest

import durable_nb as dn
from durable_nb import _codecs
from durable_nb.engine import runtime
from durable_nb.errors import StoreDamageWarning, StoreFormatError, StoreUnavailableError
from durable_nb.store import EffectRecord, MemoryStore, RunRecord, _duckdb_merge, _rows
from durable_nb.store._duckdb import DuckDBStore
from durable_nb.store._wal import Damage, frame, read_frames

from .helpers import wait_until


def _rec(store: DuckDBStore, n: int, scope: str = "run/x") -> EffectRecord:
    return EffectRecord(scope, "m.f", "v", f"h{n}", 0, _codecs.encode(n, store.signer), seq=n)


def _stored(path: Path, scope: str = "run/x") -> list[str]:
    """The input hashes DuckDB itself holds for ``scope`` (read with a plain connection)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT input_hash FROM dn_effects WHERE scope = ? ORDER BY seq", [scope]
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def _hashes(ns: range | list[int]) -> list[str]:
    return [f"h{n}" for n in ns]


# ---------------------------------------------------------------------- a small real disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a disk that really fills up, and can really be made read-only."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; returns it (unlink it to free the disk)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_loses_nothing_and_the_process_goes_on_when_space_is_freed(
    small_disk: Path,
) -> None:
    path = small_disk / "s.duckdb"
    store = DuckDBStore(path, merge_interval=3600)  # merges only when told to
    try:
        store.put_effects([_rec(store, n) for n in range(20)])
        store.flush()
        store.put_effects([_rec(store, n) for n in range(20, 600)])  # in the journal only
        filler = _fill(small_disk)
        # the merge of what the journal holds fails: DuckDB cannot grow its own WAL
        with pytest.raises(
            StoreUnavailableError,
            match=r"^cannot merge the journal '.*\.wal' into the store '.*s\.duckdb': .*No "
            r"space left on device; nothing recorded is lost .*free disk space",
        ):
            store.flush()
        size = store._journal.path.stat().st_size
        with pytest.raises(
            StoreUnavailableError,
            match=r"^cannot write the journal '.*\.wal': .*No space left on device.*nothing of "
            r"this write was recorded.*free disk space",
        ):
            store.put_effects([_rec(store, n) for n in range(2000, 2400)])
        assert store._journal.path.stat().st_size == size  # no torn bytes left behind
        # everything recorded is still readable from this process
        for n in range(600):
            got = store.get_effect(("run/x", "m.f", "v", f"h{n}", 0))
            assert got is not None and _codecs.decode(got.payload, store.signer) == n

        filler.unlink()  # the fault clears: the same process goes on, no restart
        store.put_effects([_rec(store, n) for n in range(600, 650)])
        store.flush()
    finally:
        store.close()
    recorded = set(_stored(path))
    assert set(_hashes(range(650))) <= recorded
    assert not recorded & set(_hashes(range(2000, 2400)))  # the refused write left nothing


def test_a_full_disk_under_a_workflow_then_a_restart_resumes_without_reexecuting(
    small_disk: Path,
) -> None:
    executions: Counter[int] = Counter()

    @dn.effect
    async def step(i: int) -> str:
        executions[i] += 1
        return "x" * 10_000 + str(i)  # ~10 kB a record: the disk fills within the run

    @dn.durable(name="filler_flow")
    async def flow(ctx: dn.Context, n: int) -> int:
        return sum([len(await step(i)) for i in range(n)])

    runtime._store = DuckDBStore(small_disk / "s.duckdb")
    try:
        filler = _fill(small_disk)
        os.truncate(filler, filler.stat().st_size - 300_000)  # room for some steps, not all
        with pytest.raises(StoreUnavailableError, match="No space left on device"):
            dn.run(flow, 60, run_id="r")
        done = {i for i, c in executions.items() if c}
        assert done and len(done) < 60
        filler.unlink()
        runtime._store.close()  # "a restart": a new store on the same path
        runtime._store = DuckDBStore(small_disk / "s.duckdb")
        assert dn.resume("r").result() == sum(10_000 + len(str(i)) for i in range(60))
    finally:
        runtime._store.close()
        runtime._store = MemoryStore()
    # each step executed once, except the one whose record the full disk refused
    assert sum(c - 1 for c in executions.values()) <= 1, executions


def test_a_full_disk_at_a_notebook_effect_records_nothing_and_the_next_call_records(
    small_disk: Path,
) -> None:
    """A top-level effect (a notebook cell's) also writes its scope's key filter, a
    preallocated file: on a full disk it is refused before anything is recorded."""
    executions: Counter[int] = Counter()

    @dn.effect
    def cell(i: int) -> str:
        executions[i] += 1
        return "y" * 5_000 + str(i)

    runtime._store = DuckDBStore(small_disk / "s.duckdb")
    try:
        filler = _fill(small_disk)
        with pytest.raises(StoreUnavailableError, match=r"free (some )?disk space") as info:
            cell(0)
        assert "s.duckdb" in str(info.value)
        filler.unlink()
        runtime.top.reset()  # the cell run again: occurrences count afresh
        assert [cell(i)[-1] for i in range(3)] == ["0", "1", "2"]
        runtime.top.reset()
        assert [cell(i)[-1] for i in range(3)] == ["0", "1", "2"]  # replayed
        assert executions == {0: 2, 1: 1, 2: 1}  # 0 ran again: its first record was refused
    finally:
        runtime._store.close()
        runtime._store = MemoryStore()


def test_a_read_only_store_directory_is_refused_untouched_and_opens_once_writable(
    small_disk: Path, tmp_path: Path
) -> None:
    """A read-only view of the store's directory (a bind mount remounted read-only: Linux
    refuses to remount a file system read-only while a file on it is open for writing, so
    a running store's own directory cannot turn read-only under it; an I/O error there is
    injected below instead)."""
    path = small_disk / "s.duckdb"
    with closing(DuckDBStore(path)) as store:
        store.put_effects([_rec(store, n) for n in range(10)])
    before = path.read_bytes()
    view = tmp_path / "view"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(small_disk), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        with pytest.raises(
            StoreUnavailableError,
            match=r"^cannot create or write the store directory '.*view': .*Read-only file "
            r"system.*choose a writable location",
        ):
            DuckDBStore(view / "s.duckdb")
        assert path.read_bytes() == before
        subprocess.run(["mount", "-o", "remount,rw,bind", str(view)], check=True)
        with closing(DuckDBStore(view / "s.duckdb")) as store:  # writable again: it opens
            store.put_effects([_rec(store, n) for n in range(10, 15)])
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert _stored(path) == _hashes(range(15))


# ---------------------------------------------------------------------- injected I/O errors
@pytest.mark.parametrize("code", [errno.EIO, errno.EROFS, errno.ENOSPC])
def test_an_io_error_at_the_journal_write_records_nothing_and_the_next_write_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path)
    real_write = os.write
    faults = {"eio": 0, "short": 0}

    def write(fd: int, data: Any) -> int:
        if fd == store._journal._fd:
            if faults["eio"]:
                faults["eio"] -= 1
                raise OSError(code, os.strerror(code))
            if faults["short"]:  # the kernel took half the bytes: a torn record
                faults["short"] -= 1
                return real_write(fd, bytes(data)[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    try:
        store.put_effects([_rec(store, n) for n in range(5)])
        faults["eio"] = 1
        with pytest.raises(
            StoreUnavailableError,
            match=rf"^cannot write the journal '.*\.wal': \[Errno {code}\] {os.strerror(code)}; "
            "nothing of this write was recorded",
        ):
            store.put_effects([_rec(store, 5)])
        faults["short"] = 1
        with pytest.raises(StoreUnavailableError, match=r"wrote \d+ of \d+ bytes"):
            store.put_effects([_rec(store, 6)])
        store.put_effects([_rec(store, n) for n in range(7, 10)])
        # the journal holds whole records only: the half record was cut back off
        damage: list[Damage] = []
        ops, end = read_frames(store._journal.path, 0, damage)
        assert damage == [] and end == store._journal.path.stat().st_size
        assert [row[3] for _, row in ops] == _hashes([0, 1, 2, 3, 4, 7, 8, 9])
        assert store.get_effect(("run/x", "m.f", "v", "h5", 0)) is None
        store.flush()
    finally:
        store.close()
    assert _stored(path) == _hashes([0, 1, 2, 3, 4, 7, 8, 9])


def test_a_torn_write_that_cannot_be_cut_back_is_skipped_by_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, merge_interval=3600)
    real_write = os.write
    torn = [True]

    def write(fd: int, data: Any) -> int:
        if fd == store._journal._fd and torn[0]:
            torn[0] = False
            return real_write(fd, bytes(data)[: len(data) - 7])
        return real_write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    store.put_effects([_rec(store, n) for n in range(3)])
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(StoreUnavailableError):
        store.put_effects([_rec(store, 3)])
    monkeypatch.undo()
    store.put_effects([_rec(store, n) for n in range(4, 8)])  # after the torn bytes
    # the process dies now: its journal, torn record in the middle, is all that is left
    dead = tmp_path / "b" / "s.duckdb.d" / "journal" / "dead-1-abcd.wal"
    dead.parent.mkdir(parents=True)
    shutil.copyfile(store._journal.path, dead)
    store.close()
    with pytest.warns(StoreDamageWarning, match=r"dead-1-abcd\.wal' had unreadable bytes"):
        other = DuckDBStore(tmp_path / "b" / "s.duckdb")
    other.close()
    assert _stored(tmp_path / "b" / "s.duckdb") == _hashes([0, 1, 2, 4, 5, 6, 7])


@pytest.mark.parametrize("error", ["duckdb", "oserror"])
def test_an_io_error_at_the_merge_is_retried_not_sticky(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    failures = [0]
    real = _duckdb_merge.insert_batch

    def insert_batch(con: duckdb.DuckDBPyConnection, batch: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            if error == "oserror":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            raise duckdb.IOException("IO Error: Could not write file: Input/output error")
        real(con, batch)

    monkeypatch.setattr(_duckdb_merge, "insert_batch", insert_batch)
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, merge_interval=0.01)  # the background thread merges
    try:
        failures[0] = 3
        store.put_effects([_rec(store, n) for n in range(5)])
        wait_until(lambda: failures[0] == 0 and not store._merger.pending, "the retried merge")
        store.put_effects([_rec(store, n) for n in range(5, 10)])  # never refused
    finally:
        store.close()
    assert _stored(path) == _hashes(range(10))

    store = DuckDBStore(path, merge_interval=3600)  # this process merges when told to
    try:
        store.put_effects([_rec(store, n) for n in range(10, 15)])
        failures[0] = 1
        with pytest.raises(
            StoreUnavailableError,
            match=r"^cannot merge the journal '.*\.wal' into the store '.*s\.duckdb': .*"
            r"Input/output error; nothing recorded is lost",
        ):
            store.flush()
        store.put_effects([_rec(store, n) for n in range(15, 20)])
        store.flush()  # the fault cleared: the same records merge now
    finally:
        store.close()
    assert _stored(path) == _hashes(range(20))


# ---------------------------------------------------------------------- damaged journals
def _journal_bytes(store: DuckDBStore, ns: range) -> tuple[bytes, list[int]]:
    """A journal of one effect record per n, and the offset where each record starts."""
    data, starts = b"", []
    for n in ns:
        starts.append(len(data))
        data += frame([("E", _rows.effect_row(_rec(store, n), None))])
    return data, starts


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize("where", ["length", "crc", "body", "torn", "garbage between"])
def test_a_damaged_record_in_the_middle_keeps_the_records_after_it(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    with closing(DuckDBStore(path)) as store:
        data, starts = _journal_bytes(store, range(40))
    k = 17
    lost = [k]
    if where == "length":
        data = _flip(data, starts[k] + 1)
    elif where == "crc":
        data = _flip(data, starts[k] + 5)
    elif where == "body":
        data = _flip(data, starts[k] + 30)
    elif where == "torn":  # a short write whose tail never came, then more records
        data = data[: starts[k] + 20] + data[starts[k + 1] :]
    else:
        data = data[: starts[k]] + os.urandom(333) + data[starts[k] :]
        lost = []
    wal = path.with_name("s.duckdb.d") / "journal" / "dead-1-abcd.wal"
    wal.write_bytes(data)
    with pytest.warns(
        StoreDamageWarning,
        match=rf"^the journal '{wal}' had unreadable bytes \(bytes \d+\.\.\d+\): the "
        rf"{40 - len(lost)} records around them were merged.*kept as '{wal}\.damaged'",
    ):
        store = DuckDBStore(path)
    store.close()
    assert _stored(path) == _hashes([n for n in range(40) if n not in lost])
    assert not wal.exists() and wal.with_name(wal.name + ".damaged").read_bytes() == data


def test_random_damage_never_invents_a_record_and_keeps_every_undamaged_one(
    tmp_path: Path,
) -> None:
    """Every single-byte flip, byte drop and garbage splice at 300 random places: the reader
    returns exactly the records the damage did not touch, in order."""
    with closing(DuckDBStore(tmp_path / "s.duckdb")) as store:
        data, starts = _journal_bytes(store, range(60))
    wal = tmp_path / "j.wal"
    rng = random.Random(20)
    ends = [*starts[1:], len(data)]
    for trial in range(300):
        at = rng.randrange(len(data))
        hit = next(i for i, e in enumerate(ends) if at < e)
        how = trial % 3
        if how == 0:
            damaged = _flip(data, at)
        elif how == 1:
            damaged = data[:at] + data[at + 1 :]
        else:
            damaged = data[:at] + os.urandom(rng.randrange(1, 200)) + data[at:]
        wal.write_bytes(damaged)
        ops, _ = read_frames(wal, 0)
        got = [row[3] for _, row in ops]
        if how == 2 and at == starts[hit]:  # spliced between two records: none is touched
            assert got == _hashes(range(60)), (trial, at)
        else:
            assert got == _hashes([n for n in range(60) if n != hit]), (trial, at, how)


def test_a_record_framed_inside_a_damaged_payload_is_not_taken_for_a_record(
    tmp_path: Path,
) -> None:
    with closing(DuckDBStore(tmp_path / "s.duckdb")) as store:
        forged = frame([("E", _rows.effect_row(_rec(store, 666), None))])
        data, starts = _journal_bytes(store, range(10))
        # an effect whose result is journal bytes: a whole frame inside its payload
        carrier = _rec(store, 5)
        carrier.payload = _codecs.Payload("bytes", b"prefix" + forged, None)
        body = frame([("E", _rows.effect_row(carrier, None))])
    data = data[: starts[5]] + body + data[starts[6] :]
    wal = tmp_path / "j.wal"
    wal.write_bytes(data)
    assert [row[3] for _, row in read_frames(wal, 0)[0]] == _hashes(range(10))
    wal.write_bytes(_flip(data, starts[5] + 2))  # the carrier's length is damaged
    assert [row[3] for _, row in read_frames(wal, 0)[0]] == _hashes([*range(5), *range(6, 10)])


# ---------------------------------------------------------------------- damaged DuckDB files
def _full_store(path: Path) -> None:
    with closing(DuckDBStore(path)) as store:
        store.put_effects([_rec(store, n) for n in range(3000)])
        store.put_run(_run())


def _run() -> RunRecord:
    return RunRecord("r1", "wf", "completed", created_at=1.0, updated_at=1.0)


@pytest.mark.parametrize("cut", [0.5, 0.01])
def test_a_truncated_store_file_is_refused_and_left_alone(tmp_path: Path, cut: float) -> None:
    path = tmp_path / "s.duckdb"
    _full_store(path)
    os.truncate(path, int(path.stat().st_size * cut))
    before = path.read_bytes()
    # a journal a dead process left: not merged into (nor deleted for) a damaged file
    wal = path.with_name("s.duckdb.d") / "journal" / "dead-1-abcd.wal"
    with closing(DuckDBStore(tmp_path / "scratch.duckdb")) as scratch:
        wal.write_bytes(_journal_bytes(scratch, range(3))[0])
    with pytest.raises(
        StoreFormatError,
        match=r"^the store file '.*s\.duckdb' is damaged or truncated \(.*\); it was not "
        r"changed\. Restore it from a backup, or move it away",
    ):
        DuckDBStore(path)
    assert path.read_bytes() == before
    assert wal.exists()


def test_a_store_file_overwritten_with_garbage_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _full_store(path)
    size = path.stat().st_size
    garbage = random.Random(3).randbytes(size)
    path.write_bytes(garbage)
    with pytest.raises(StoreFormatError, match=r"^'.*s\.duckdb' is not a DuckDB database"):
        DuckDBStore(path)
    assert path.read_bytes() == garbage


def test_corrupted_blocks_inside_a_store_file_give_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _full_store(path)
    data = bytearray(path.read_bytes())
    rng = random.Random(5)
    for block in range(3, len(data) // 262144):  # every data block past the headers
        at = block * 262144 + 1000
        data[at : at + 64] = rng.randbytes(64)
    path.write_bytes(bytes(data))
    with (
        pytest.raises(StoreFormatError, match=r"^the store file '.*s\.duckdb' is damaged"),
        closing(DuckDBStore(path)) as store,
    ):
        store.load_effects("run/x")


# ---------------------------------------------------------------------- directory deleted
def _wait_idle_closed(store: DuckDBStore) -> None:
    """Until the background thread closed the idle file, and DuckDB finished closing it."""
    wait_until(lambda: store._file.con is None, "the idle close")
    with store._file.lock:  # held until DuckDB's close (a checkpoint) returned
        pass


@pytest.mark.parametrize("connected", [True, False])
def test_a_store_directory_deleted_under_a_running_store_is_detected_at_the_next_write(
    tmp_path: Path, connected: bool
) -> None:
    folder = tmp_path / "nb" / ".durable_nb"
    path = folder / "s.duckdb"
    store = DuckDBStore(path, idle_close=0 if not connected else 3600, merge_interval=0.01)
    try:
        store.put_effects([_rec(store, n) for n in range(5)])
        store.flush()
        if not connected:
            _wait_idle_closed(store)
        journal_fd = store._journal._fd
        journal_size = os.fstat(journal_fd).st_size
        shutil.rmtree(folder)
        with pytest.raises(
            StoreUnavailableError,
            match=r"^the journal '.*\.wal' was deleted under this process \(was the store "
            r"directory removed\?\).*open the store again",
        ):
            store.put_effects([_rec(store, 5)])
        assert os.fstat(journal_fd).st_size == journal_size  # nothing written to it
        with pytest.raises(
            StoreUnavailableError,
            match=r"^the store file '.*s\.duckdb' was deleted or replaced since this process "
            "opened it; nothing more is written to it",
        ):
            store.get_run("r1")  # a read that needs the file
        folder.mkdir(parents=True)  # even when the folder comes back, no new empty store
        with pytest.raises(StoreUnavailableError, match="was deleted or replaced"):
            store.list_runs()
        assert list(folder.iterdir()) == []
    finally:
        store.close()
    assert not path.exists()


def test_a_store_file_replaced_under_a_running_store_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = DuckDBStore(path, idle_close=0, merge_interval=0.01)
    other = tmp_path / "other.duckdb"
    _full_store(other)
    try:
        store.put_effects([_rec(store, 1)])
        store.flush()
        _wait_idle_closed(store)
        path.unlink()
        path.with_name("s.duckdb.wal").unlink(missing_ok=True)
        shutil.copyfile(other, path)  # someone put another store in its place
        before = path.read_bytes()
        store.put_effects([_rec(store, 2)])  # the journal is still ours: recorded there
        with pytest.raises(StoreUnavailableError, match="was deleted or replaced"):
            store.flush()
        assert path.read_bytes() == before
    finally:
        with pytest.raises(StoreUnavailableError):
            store.close()
    # the journal survives: the next store opened at that path merges it
    with closing(DuckDBStore(path)) as again:
        got = again.get_effect(("run/x", "m.f", "v", "h2", 0))
        assert got is not None
