"""The DuckDB store's write-ahead journal: one file per process, framed records.

Each record is ``(kind, row)`` marshalled, framed by its length and CRC32, and a batch of
records is appended with one ``os.write`` — durable against a crash of the process as soon
as it returns (against an OS crash with ``fsync=True``, an ``fdatasync`` per write, or
``fsync="group"``, one ``fdatasync`` per batch of writes by ``_syncer.GroupSync``; in both
the journal's directory entry is synced when the file is created). The writing process holds an
exclusive ``flock`` on its journal for as long as it lives, so a journal whose lock is free
was left by a dead process: :func:`dead_journals` finds those for merging.

Kinds: ``E`` (effect row), ``R`` (run row), ``S`` (signal row), ``V`` (event row) and
``X`` (a reset: ``(run row, consumed signal ids)``).
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import os
import secrets
import socket
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreUnavailableError
from ._syncer import GroupSync

__all__ = [
    "ROTATE_SIZE",
    "Journal",
    "Op",
    "dead_journals",
    "frame",
    "makes_work",
    "read_frames",
    "sync_dir",
]

_FRAME = struct.Struct("<II")  # payload length, crc32
#: a journal is replaced by a fresh one once it is fully merged and past this size
ROTATE_SIZE = 64 * 2**20


class Op:
    """One journal record waiting to be merged; ``end`` is the journal offset after it."""

    __slots__ = ("end", "kind", "row")

    def __init__(self, kind: str, row: tuple[Any, ...], end: int) -> None:
        self.kind = kind
        self.row = row
        self.end = end


def makes_work(kind: str, row: tuple[Any, ...]) -> bool:
    """Whether merging this record may give an idle worker something to claim."""
    if kind == "S":
        return True
    if kind == "R":
        return bool(row[2] == "queued")
    if kind == "X":
        return bool(row[0][2] == "queued")
    return False


def frame(ops: Sequence[tuple[str, tuple[Any, ...]]]) -> bytes:
    buf = bytearray()
    for kind, row in ops:
        body = marshal.dumps((kind, row))
        buf += _FRAME.pack(len(body), zlib.crc32(body))
        buf += body
    return bytes(buf)


def read_frames(path: Path, offset: int) -> tuple[list[tuple[str, tuple[Any, ...]]], int]:
    """Every intact record after ``offset`` and the offset after the last; a torn tail (a
    crash mid-write) ends the reading."""
    data = path.read_bytes()
    ops: list[tuple[str, tuple[Any, ...]]] = []
    pos = offset
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        kind, row = marshal.loads(body)
        ops.append((kind, row))
        pos += _FRAME.size + length
    return ops, pos


def sync_dir(folder: Path) -> None:
    """Make the creation or removal of files in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """This process's journal file in ``folder``: appended to, locked while it lives.

    ``fsync``: ``False`` (never synced), ``True`` (``fdatasync`` per write) or ``"group"``
    (writes wait in :meth:`wait_synced` for the shared syncer)."""

    def __init__(self, folder: Path, *, fsync: bool | str) -> None:
        self._folder = folder
        self._fsync = fsync
        self.wal_id, self.path, self._fd = self._open()
        self.size = 0
        self._group = GroupSync(self._fd, str(self.path)) if fsync == "group" else None
        #: the syncer position of the last write (what :meth:`wait_synced` waits for)
        self.position = 0

    def _open(self) -> tuple[str, Path, int]:
        wal_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        path = self._folder / f"{wal_id}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self._fsync:  # a synced record in a file whose name was lost is lost too
            sync_dir(self._folder)
        return wal_id, path, fd

    def wait_synced(self, position: int) -> None:
        """In group mode, return once the write at ``position`` is on disk."""
        if self._group is not None:
            self._group.wait(position)

    @property
    def syncs(self) -> int:
        """``fdatasync`` calls made by the group syncer (for benchmarks)."""
        return self._group.syncs if self._group is not None else 0

    def append(self, data: bytes) -> int:
        """Write ``data`` with one ``os.write``; returns the journal's size after it."""
        n = os.write(self._fd, data)
        if n != len(data):  # a short write on a regular file means the disk is full
            raise StoreUnavailableError(
                f"the journal {str(self.path)!r} accepted {n} of {len(data)} bytes; "
                "free some disk space"
            )
        if self._group is not None:
            self.position = self._group.wrote(n)
        elif self._fsync:
            os.fdatasync(self._fd)
        self.size += n
        return self.size

    def rotate(self) -> str:
        """Start a fresh journal (the old one is fully merged); returns the old one's id."""
        old_fd, old_path, old_id = self._fd, self.path, self.wal_id
        self.wal_id, self.path, self._fd = self._open()
        self.size = 0
        if self._group is not None:
            self._group.switch(self._fd, str(self.path))
        old_path.unlink()
        os.close(old_fd)
        return old_id

    def close(self, *, merged: bool) -> None:
        """Close the file; remove it if everything in it was merged."""
        if self._group is not None:
            self._group.close()
        os.close(self._fd)
        if merged:
            with contextlib.suppress(OSError):
                self.path.unlink()


def dead_journals(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(wal id, path)`` of each journal in ``folder`` whose writer is dead, locked by this
    process while the caller handles it (the caller removes the file once merged)."""
    for path in sorted(folder.glob("*.wal")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive and merges it itself
            yield path.stem, path
        finally:
            os.close(fd)
