"""Which effect keys a notebook's scope cannot hold: a miss without a database query.

An ``@effect`` called in a notebook cell looks its key up before it executes; most of those
lookups miss (new arguments), and on DuckDB a point query costs about 0.7 ms. A
:class:`KeyFilter` answers "certainly not recorded" from memory-mapped files instead, for
the notebook (``top/...``) and shared scopes, in about two microseconds.

It is a blocked Bloom filter kept next to the store (``<store>.d/keys/``), shared by every
process that opens the store:

- **No false negatives.** A writer sets a key's slots *before* the record reaches the
  journal, so a record that exists has its slots set; a crash in between leaves slots
  without a record, which only costs a query. Each slot is a whole byte, written without
  reading it first, so two processes writing at once cannot undo each other's slot.
  Deleted records leave their slots set (a query tells). Files are preallocated, so a full
  disk fails the write that grows the filter, never a later read of the mapping.
- **No eager load.** Files are mapped, not read: a lookup touches one 64-byte block per
  generation. A scope starts with a 64 KiB generation; when it holds its capacity, a
  generation eight times larger is added (a 1M-key scope has four files, about 37 MB). A
  key may be in any generation, so a lookup checks all of them and looks for a newer one
  (one ``stat``) each time, so a generation another process just added is never missed.
- **Trusted only when complete.** Records written before the filter existed (a store
  made by an older version) are added once, by the first process that needs the filter,
  in one pass over the scope's keys; a flag in the first generation's header then says
  the filter is complete. Until it says so, every lookup queries.
- ``fsync=True`` stores also write a key's slots to disk before its record.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import xxhash

__all__ = ["KeyFilter"]

_MAGIC = b"DNKEYS01"
_HEADER = 4096  # magic, complete flag, key count; a page, so blocks stay page-aligned
_COMPLETE_AT = 8
_COUNT = struct.Struct("<Q")
_COUNT_AT = 16
_BLOCK = 64  # bytes (slots) per block: one cache line
_SLOTS = 6  # slots set per key, all in its block
_FIRST_BLOCKS = 1024  # 64 KiB
_GROWTH = 8
_KEYS_PER_BLOCK = 4  # a generation's capacity; 0.7 % false positives measured at 1M keys


def _digest(key: tuple[str, str, str, int]) -> int:
    text = f"{key[0]}\x1f{key[1]}\x1f{key[2]}\x1f{key[3]}"
    return int(xxhash.xxh3_128_intdigest(text.encode("utf-8", "surrogatepass")))


class _Generation:
    __slots__ = ("blocks", "capacity", "fd", "mm")

    def __init__(self, path: Path, blocks: int, *, create: bool) -> None:
        size = _HEADER + blocks * _BLOCK
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            have = os.fstat(fd).st_size
            if have < size:  # allocated now: a full disk fails here, not as SIGBUS later
                allocate = getattr(os, "posix_fallocate", None)
                if allocate is not None:
                    allocate(fd, 0, size)
                else:  # macOS: write the zeros
                    zeros = bytes(1 << 20)
                    for at in range(have, size, len(zeros)):
                        os.pwrite(fd, zeros[: min(len(zeros), size - at)], at)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        if mm[:8] != _MAGIC:  # a new file, or not one of ours: nothing in it is trusted
            mm[_COMPLETE_AT] = 0
            mm[:8] = _MAGIC
        self.fd, self.mm, self.blocks = fd, mm, blocks
        self.capacity = blocks * _KEYS_PER_BLOCK

    def offsets(self, d: int) -> list[int]:
        base = _HEADER + (d % self.blocks) * _BLOCK
        d >>= 64  # the other half of the digest picks the slots
        return [base + ((d >> (6 * i)) & (_BLOCK - 1)) for i in range(_SLOTS)]

    def may_contain(self, d: int) -> bool:
        mm = self.mm
        return all(mm[o] for o in self.offsets(d))

    def add(self, d: int) -> list[int]:
        mm = self.mm
        offsets = self.offsets(d)
        for o in offsets:
            mm[o] = 1  # a whole byte: no read-modify-write for another process to race
        return offsets

    @property
    def count(self) -> int:
        return int(_COUNT.unpack_from(self.mm, _COUNT_AT)[0])

    def bump(self, n: int) -> None:
        # a count two processes race on may come out low: it only decides when to grow
        _COUNT.pack_into(self.mm, _COUNT_AT, self.count + n)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class KeyFilter:
    """The filter of one scope (see the module docstring). Thread-safe."""

    def __init__(self, folder: Path, scope: str, *, fsync: bool = False) -> None:
        self._prefix = folder / xxhash.xxh3_64_hexdigest(scope.encode("utf-8", "surrogatepass"))
        self._fsync = fsync
        self._lock = threading.Lock()
        self._gens: list[_Generation] = []
        folder.mkdir(parents=True, exist_ok=True)
        self._gens.append(_Generation(self._path(0), _FIRST_BLOCKS, create=True))
        self._discover()

    def _path(self, n: int) -> Path:
        return self._prefix.with_name(f"{self._prefix.name}.{n}")

    def _discover(self) -> None:
        """Open the generations other processes added since we last looked."""
        while True:
            n = len(self._gens)
            path = self._path(n)
            if not os.path.exists(path):
                return
            try:
                gen = _Generation(path, _FIRST_BLOCKS * _GROWTH**n, create=False)
            except FileNotFoundError:
                return
            self._gens.append(gen)

    @property
    def complete(self) -> bool:
        return bool(self._gens[0].mm[_COMPLETE_AT])

    def mark_complete(self) -> None:
        with self._lock:
            first = self._gens[0]
            first.mm[_COMPLETE_AT] = 1
            first.mm.flush(0, _HEADER)

    def absent(self, key: tuple[str, str, str, int]) -> bool:
        """True when ``key`` is certainly not recorded (the filter is complete and no
        generation has its slots); False: it may be, ask the store."""
        d = _digest(key)
        with self._lock:
            if not self._gens[0].mm[_COMPLETE_AT]:
                return False
            self._discover()
            return not any(g.may_contain(d) for g in self._gens)

    def add(self, keys: Iterable[tuple[str, str, str, int]]) -> None:
        """Set the keys' slots (before their records are written)."""
        digests = [_digest(k) for k in keys]
        if not digests:
            return
        with self._lock:
            self._discover()
            gen = self._gens[-1]
            if gen.count + len(digests) > gen.capacity:
                gen = self._grow()
            touched = [o for d in digests for o in gen.add(d)]
            gen.bump(len(digests))
            if self._fsync:
                page = mmap.PAGESIZE
                for start in sorted({o // page * page for o in touched}):
                    gen.mm.flush(start, page)

    def _grow(self) -> _Generation:
        n = len(self._gens)
        gen = _Generation(self._path(n), _FIRST_BLOCKS * _GROWTH**n, create=True)
        self._gens.append(gen)
        return gen

    def close(self) -> None:
        with self._lock:
            for g in self._gens:
                g.close()
            self._gens.clear()
