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
import errno
import fcntl
import marshal
import os
import secrets
import socket
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreDamageWarning, StoreUnavailableError
from ._syncer import GroupSync

__all__ = [
    "ROTATE_SIZE",
    "Damage",
    "Journal",
    "Op",
    "any_dead_journal",
    "dead_journals",
    "frame",
    "keep_damaged",
    "makes_work",
    "read_frames",
    "sync_dir",
]

_FRAME = struct.Struct("<II")  # payload length, crc32
#: a journal is replaced by a fresh one once it is fully merged and past this size
ROTATE_SIZE = 64 * 2**20
#: a journal's name while its writer creates and locks it (not a ``*.wal`` name)
FRESH_SUFFIX = ".wal-new"
_FRESH_TRIES = 8


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


def frame(ops: Sequence[tuple[str, tuple[Any, ...]]], ends: list[int] | None = None) -> bytes:
    """The records framed for one write; ``ends`` gets the offset after each record in
    the returned bytes (a merge that stops inside a write stores the offset it reached)."""
    buf = bytearray()
    for kind, row in ops:
        body = marshal.dumps((kind, row))
        buf += _FRAME.pack(len(body), zlib.crc32(body))
        buf += body
        if ends is not None:
            ends.append(len(buf))
    return bytes(buf)


_KINDS = frozenset("ERSVX")
_BODY_STARTS = (b")\x02", b"\xa9\x02")
#: no record is this long (a table payload goes to DuckDB, not into the journal): a length
#: above it is damage, which spares the reader from checking the CRC of a huge span
_MAX_RECORD = 1 << 30


def _record_at(data: bytes, pos: int) -> tuple[tuple[str, tuple[Any, ...]], int] | None:
    """The record framed at ``pos`` and the offset after it, or None if none is there: the
    frame must fit in ``data``, its CRC32 must match, and its payload must unmarshal to a
    ``(kind, row)`` of a known kind."""
    if pos + _FRAME.size > len(data):
        return None
    length, crc = _FRAME.unpack_from(data, pos)
    end = pos + _FRAME.size + length
    if length > _MAX_RECORD or end > len(data):
        return None
    body = data[pos + _FRAME.size : end]
    if zlib.crc32(body) != crc:
        return None
    try:
        record = marshal.loads(body)
    except (ValueError, EOFError, TypeError):
        return None
    if (
        not isinstance(record, tuple)
        or len(record) != 2
        or record[0] not in _KINDS
        or not isinstance(record[1], tuple)
    ):
        return None
    return (record[0], record[1]), end


def _resync(data: bytes, pos: int) -> int | None:
    """The first offset after ``pos`` where the records line up again, or None.

    A candidate must hold a whole, CRC-checked record of a known kind, and be followed by the
    end of the file or by another such record. A random span passes the CRC alone with odds
    of 2**-32; the follower check guards against the one span that is not random: a record
    framed inside a payload of the damaged record (an effect whose result is journal bytes).
    Such a record is followed by the rest of its row (the columns after the payload), not by
    a frame — except when the payload is the row's last column, which only an event's
    ``data`` is: JSON text with every byte below 0x20 escaped, where a frame header (its
    length has zero bytes) cannot occur. The price: a good record between two damaged spans
    fails the follower check and is skipped with them."""
    start = pos + 1
    while True:
        # a body is a marshalled 2-tuple: it starts with TYPE_SMALL_TUPLE (with or without
        # FLAG_REF) and the count 2, so candidates are found at C speed, not byte by byte
        hits = [h for h in (data.find(p, start + _FRAME.size) for p in _BODY_STARTS) if h >= 0]
        if not hits:
            return None
        candidate = min(hits) - _FRAME.size
        first = _record_at(data, candidate)
        if first is not None:
            after = first[1]
            if after == len(data) or _record_at(data, after) is not None:
                return candidate
        start = candidate + 1


class Damage:
    """Bytes ``[start, end)`` of a journal that hold no readable record, with records after."""

    __slots__ = ("end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end

    def __repr__(self) -> str:
        return f"bytes {self.start}..{self.end}"


def read_frames(
    path: Path, offset: int, damage: list[Damage] | None = None
) -> tuple[list[tuple[str, tuple[Any, ...]]], int]:
    """Every intact record after ``offset`` and the offset after the last one.

    A record that does not check out (torn by a crash mid-write, a short write on a full
    disk, a flipped bit) is skipped: the reader resynchronizes on the next offset where
    records line up again (see ``_resync``) and keeps the records after it. The spans
    skipped are appended to ``damage``; a torn tail (a crash during the last write, nothing
    readable after it) is not damage, just the end."""
    data = path.read_bytes()
    ops: list[tuple[str, tuple[Any, ...]]] = []
    pos = last = offset
    while pos < len(data):
        found = _record_at(data, pos)
        if found is not None:
            ops.append(found[0])
            pos = last = found[1]
            continue
        nxt = _resync(data, pos)
        if nxt is None:
            break  # a torn tail: the last write was cut short by a crash, which is expected
        if damage is not None:
            damage.append(Damage(pos, nxt))
        pos = nxt
    return ops, last


def keep_damaged(path: Path, damage: list[Damage], kept: int) -> None:
    """A journal had bytes that hold no record: keep it as ``*.wal.damaged`` and say so."""
    kept_as = path.with_name(path.name + ".damaged")
    path.rename(kept_as)
    warnings.warn(
        f"the journal {str(path)!r} had unreadable bytes ({', '.join(map(repr, damage))}): "
        f"the {kept} records around them were merged, a record inside them is lost (an "
        f"effect recorded there runs again when next called); the file is kept as "
        f"{str(kept_as)!r} for inspection — delete it when done",
        StoreDamageWarning,
        stacklevel=2,
    )


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
        # created and locked under a name the look for dead journals does not match, then
        # renamed: a journal is never seen unlocked, so no process recovering dead journals
        # can take (and remove) one whose writer is just starting. That look removes fresh
        # files it can lock (a writer that died before naming its journal); one that wins
        # the lock between our open and our flock costs us that name: take another
        for _ in range(_FRESH_TRIES):
            wal_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
            path = self._folder / f"{wal_id}.wal"
            fresh = self._folder / f"{wal_id}{FRESH_SUFFIX}"
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(fresh, path)
            except (BlockingIOError, FileNotFoundError):  # that look took this name first
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    fresh.unlink()
                raise
            break
        else:
            raise StoreUnavailableError(
                f"cannot create a journal in {str(self._folder)!r}: another process kept "
                f"locking the new file ({_FRESH_TRIES} tries); is a recovery looping there?"
            )
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
        """Write ``data`` with one ``os.write``; returns the journal's size after it.

        Refused if the file was deleted (the store directory removed under this process):
        nothing is written to an unlinked file. A failed or short write (a full disk, an I/O
        error) is cut back off the file, so the journal stays a sequence of whole records; if
        even that fails, the reader skips the torn bytes (``read_frames``)."""
        try:
            if os.fstat(self._fd).st_nlink == 0:
                raise StoreUnavailableError(
                    f"the journal {str(self.path)!r} was deleted under this process (was the "
                    "store directory removed?); what this process recorded since the store "
                    "was last merged is lost with it, and nothing more is written there — "
                    "open the store again (restart the kernel or `%durable store PATH`)"
                )
            n = os.write(self._fd, data)
            if n != len(data):  # a short write on a regular file means the disk is full
                raise OSError(
                    errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: wrote {n} of {len(data)} bytes"
                )
            if self._group is None and self._fsync:
                os.fdatasync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            with contextlib.suppress(OSError):
                self.size = os.fstat(self._fd).st_size  # offsets stay true if the cut failed
            raise StoreUnavailableError(
                f"cannot write the journal {str(self.path)!r}: {e}; nothing of this write "
                "was recorded, what was recorded before is safe — free disk space or fix the "
                "disk, then call again (no restart needed)"
            ) from e
        if self._group is not None:  # synced by the group syncer, waited for by the caller
            self.position = self._group.wrote(len(data))
        self.size += len(data)
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


def _locked_if_dead(path: Path) -> int | None:
    """A descriptor of the journal at ``path`` holding its lock if its writer is dead; None
    if its writer is alive (it merges the journal itself) or the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            return None
        raise
    return fd


def dead_journals(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(wal id, path)`` of each journal in ``folder`` whose writer is dead, locked by this
    process while the caller handles it (the caller removes the file once merged). A fresh
    journal left by a writer that died before naming it holds no record: it is removed."""
    for path in folder.glob(f"*{FRESH_SUFFIX}"):
        fd = _locked_if_dead(path)
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
    for path in sorted(folder.glob("*.wal")):
        fd = _locked_if_dead(path)
        if fd is None:
            continue
        try:
            yield path.stem, path
        finally:
            os.close(fd)


def any_dead_journal(folder: Path) -> bool:
    """Whether a journal in ``folder`` was left by a dead writer: a ``flock`` attempt per
    journal (microseconds), no database needed."""
    for path in folder.glob("*.wal"):
        fd = _locked_if_dead(path)
        if fd is not None:
            os.close(fd)
            return True
    return False
