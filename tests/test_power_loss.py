"""Power loss, simulated (issue 20, item 5).

A power loss keeps of each file what was last synced to disk. The writer runs in a child
process whose ``os.fsync``/``os.fdatasync`` are wrapped: each call logs the file's size (a
directory's entries) when the sync began, which the sync made durable. The child is
SIGKILLed while writing; then every journal is cut back to its last synced size, and a
journal whose directory entry was never synced is removed, before the store is opened
again. DuckDB's own files are left as they are: DuckDB syncs them itself, in C++, at each
commit — which ``test_duckdb_syncs_its_commit_before_the_journal_is_removed`` checks with
``strace``. (A simulation, not an ``LD_PRELOAD`` shim: it drops exactly what durable_nb
did not sync, not what the kernel happened to write back.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from durable_nb.errors import ArgumentError
from durable_nb.store._duckdb import DuckDBStore

from .helpers import ROOT

WRITER = textwrap.dedent(
    """
    import os, stat, sys, threading

    path, mode, log, merge = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "merge"
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def hook(real):
        def synced(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            st = os.fstat(fd)
            what = ",".join(sorted(os.listdir(name))) if stat.S_ISDIR(st.st_mode) else st.st_size
            real(fd)
            os.write(log_fd, f"{name}\\t{what}\\n".encode())
        return synced

    os.fsync, os.fdatasync = hook(os.fsync), hook(os.fdatasync)

    from durable_nb._codecs import Payload
    from durable_nb.store import EffectRecord
    from durable_nb.store._duckdb import DuckDBStore

    fsync = {"False": False, "True": True, "group": "group"}[mode]
    s = DuckDBStore(path, fsync=fsync, merge_interval=0.05 if merge else 3600, idle_close=3600)
    out = threading.Lock()

    def write(t):
        for i in range(10_000):
            key = f"{t}-{i}"
            s.put_effects([EffectRecord("run/x", "f", "v", key, 0, Payload("json", b"1"), seq=i)])
            with out:
                print("ack", key, flush=True)
            if merge and t == 0 and i == 50:
                s.flush()  # merged into DuckDB: every ack before this line
                with out:
                    print("merged", flush=True)

    for t in range(4):
        threading.Thread(target=write, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


def _crash(tmp: Path, mode: str, *, merge: bool = False, acks: int = 300) -> tuple[list[str], int]:
    """Run the writer, kill it after ``acks`` acknowledged writes, cut the journals back to
    what was synced; returns the acknowledged keys and how many were acked before the
    ``merged`` line (0 without one)."""
    path, log = tmp / "s.duckdb", tmp / "syncs.log"
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode, str(log), "merge" if merge else "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    acked: list[str] = []
    merged_at = 0
    try:
        assert p.stdout is not None
        while len(acked) < acks or (merge and not merged_at):
            line = p.stdout.readline()
            assert line, p.communicate()[1]
            if line.startswith("merged"):
                merged_at = len(acked)
                acks = merged_at + 50  # then some more after it
            else:
                acked.append(line.split()[1])
        p.send_signal(signal.SIGKILL)  # mid-write: the power goes
    finally:
        p.kill()
        p.communicate()
    _cut_to_last_sync(tmp / "s.duckdb.d" / "journal", log)
    return acked, merged_at


def _cut_to_last_sync(folder: Path, log: Path) -> None:
    sizes: dict[str, int] = {}
    entries: set[str] = set()
    text = log.read_text() if log.exists() else ""
    for line in text.splitlines():
        name, what = line.split("\t")
        if name == str(folder):
            entries = set(what.split(",")) if what else set()
        else:
            sizes[name] = max(sizes.get(name, 0), int(what))
    for wal in folder.glob("*.wal"):
        if wal.name not in entries:
            wal.unlink()  # its name never reached the disk
        else:
            with open(wal, "r+b") as f:
                f.truncate(sizes.get(str(wal), 0))


def _present(tmp: Path, keys: list[str]) -> list[str]:
    store = DuckDBStore(tmp / "s.duckdb")
    try:
        return [k for k in keys if store.get_effect(("run/x", "f", "v", k, 0)) is not None]
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["True", "group"])
def test_a_synced_journal_keeps_every_acknowledged_write(tmp_path: Path, mode: str) -> None:
    acked, _ = _crash(tmp_path, mode)  # never merged: the records are only in the journal
    assert _present(tmp_path, acked) == acked


def test_an_unsynced_journal_loses_writes_the_simulation_bites(tmp_path: Path) -> None:
    acked, _ = _crash(tmp_path, "False")
    # fsync=False survives a crash of the process, not of the OS: what was only in the
    # journal is gone (this shows the cut above drops what was not synced)
    assert len(_present(tmp_path, acked)) < len(acked)


def test_what_was_merged_survives_without_a_synced_journal(tmp_path: Path) -> None:
    acked, merged_at = _crash(tmp_path, "False", merge=True)
    assert merged_at > 0
    present = set(_present(tmp_path, acked))
    # every write the flushing thread made before its flush is in DuckDB, which synced its
    # commit (other threads' acks may have raced the flush)
    before = [k for k in acked[:merged_at] if k.startswith("0-")]
    assert len(before) == 51
    assert all(k in present for k in before)


def test_fsync_takes_three_values(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"^fsync must be False .* got 'always'$"):
        DuckDBStore(tmp_path / "s.duckdb", fsync="always")


ORDER = textwrap.dedent(
    """
    import sys
    import durable_nb.store._duckdb_merge as m
    from durable_nb._codecs import Payload
    from durable_nb.store import EffectRecord
    from durable_nb.store._duckdb import DuckDBStore

    m.ROTATE_SIZE = 1  # start a fresh journal after every merge
    s = DuckDBStore(sys.argv[1], merge_interval=3600)
    for i in range(3):
        s.put_effects([EffectRecord("run/x", "f", "v", f"h{i}", 0, Payload("json", b"1"))])
        s.flush()
    s.close()
    """
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_duckdb_syncs_its_commit_before_the_journal_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    DuckDBStore(path).close()
    trace = tmp_path / "trace.txt"
    p = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=write,pwrite64,fdatasync,fsync,unlink,unlinkat",
            sys.executable,
            "-c",
            ORDER,
            str(path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = trace.read_text().splitlines()
    db_wal = f"<{path}.wal>"
    journal = str(path) + ".d/journal/"
    removed = [
        i
        for i, line in enumerate(lines)
        if re.search(r"unlink(at)?\(.*" + re.escape(journal), line)
    ]
    assert len(removed) >= 3  # one per rotation (and the last journal at close)
    for i in removed:
        written = [
            j for j in range(i) if db_wal in lines[j] and re.search(r"\b(p?write(64)?)\(", lines[j])
        ]
        assert written, "no DuckDB commit before the journal was removed"
        synced = [
            j for j in range(written[-1], i) if db_wal in lines[j] and "fdatasync(" in lines[j]
        ]
        assert synced, f"DuckDB's commit was not synced before {lines[i]!r}"
    # after each rotation's removal, the journal directory is synced before the commit that
    # forgets the removed journal's offset
    folder = f"<{journal.rstrip('/')}>"
    for i in removed[:3]:
        after = [j for j in range(i, len(lines)) if db_wal in lines[j] and "write" in lines[j]]
        assert after, "no commit after the rotation"
        dir_synced = [j for j in range(i, after[0]) if "fsync(" in lines[j] and folder in lines[j]]
        assert dir_synced, f"the journal directory was not synced after {lines[i]!r}"
