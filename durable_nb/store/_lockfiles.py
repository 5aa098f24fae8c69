"""The DuckDB store's lock files: who executes a run, who computes a shared effect, and
the touched files other processes watch.

Ownership is an exclusive ``flock`` held by the owning process: the kernel drops it when
that process dies, however it dies, so a dead owner never blocks anyone. The file's
content only says who the owner is (for messages) and, for effect claims, until when.

* ``locks/<hash of run id>.lock``: the process executing a run (:func:`lock_run`).
* ``claims/<hash of key>.claim``: the process computing a shared effect
  (:class:`EffectClaims`), with the owner and expiry written in one fixed-size ``pwrite``.
* touched files (:func:`touch`, :func:`file_token`): a waiting process compares a
  ``stat`` instead of querying the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from ..errors import RunLockedError
from ._protocol import EffectKey

__all__ = ["EffectClaims", "file_token", "lock_run", "say_holder", "touch", "unlock"]

_TOKEN_FILE_MAX = 4096  # a touched file is emptied past this size
_CLAIM_SIZE = 512  # bytes of a claim file's record (written with one pwrite)


def _hash(text: str) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(text.encode())


def unlock(fd: int) -> None:
    """Let go of a run lock: empty the file, then close it (which drops the ``flock``)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.close(fd)


def file_token(path: str) -> object:
    """A value that changes whenever :func:`touch` touched ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def touch(path: str) -> None:
    # the size changes on every touch (file timestamps tick only every few milliseconds)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
        if os.fstat(fd).st_size > _TOKEN_FILE_MAX:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def lock_run(folder: Path, run_id: str, owner: str) -> int:
    """Take the run's lock file (or raise :class:`RunLockedError` naming its holder);
    returns the descriptor that holds it. Call :func:`say_holder` once the run is yours."""
    fd = os.open(folder / f"{_hash(run_id)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        raise RunLockedError(
            f"run {run_id!r} is being executed by process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} ({holder.get('owner', '?')}, since {since}); "
            "wait for it to finish, or stop that process and start the run again"
        ) from None
    return fd


def say_holder(fd: int, owner: str) -> None:
    """Write who holds a run lock taken with :func:`lock_run` (read by :func:`lock_run`)."""
    info = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _write_claim(fd: int, owner: str, until: float) -> None:
    body = json.dumps({"owner": owner[:200], "until": until, "pid": os.getpid()})
    text = f"{zlib.crc32(body.encode()):08x}{body}".encode()
    # one fixed-size pwrite, so a reader never sees a shorter, truncated record
    os.pwrite(fd, text.ljust(_CLAIM_SIZE), 0)


def _read_claim(fd: int) -> dict[str, Any] | None:
    """The claim recorded in a claim file; ``None`` if empty, torn or unreadable."""
    text = os.pread(fd, _CLAIM_SIZE, 0).rstrip()
    if len(text) <= 8:
        return None
    body = text[8:]
    try:
        if int(text[:8], 16) != zlib.crc32(body):
            return None
        info = json.loads(body)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class EffectClaims:
    """This process's claims on shared effects, one locked file per key in ``folder``.

    Another process's claim counts while it holds the lock and its expiry is ahead; claims
    within this process are decided by owner and expiry alone."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self._held: dict[Path, tuple[int, str, float]] = {}  # file -> fd, owner, until

    def _path(self, key: EffectKey) -> Path:
        return self._folder / f"{_hash(repr(key))}.claim"

    def claim(self, key: EffectKey, owner: str, seconds: float) -> bool:
        path = self._path(key)
        now = time.time()
        until = now + seconds
        with self._lock:
            held = self._held.get(path)
            if held is not None:
                fd, holder, held_until = held
                if holder != owner and held_until > now:
                    return False
                _write_claim(fd, owner, until)
                self._held[path] = (fd, owner, until)
                return True
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = _read_claim(fd)
                    os.close(fd)
                    if info is None:  # being written right now: someone is claiming it
                        return False
                    # a live process holds it; its claim lapsed unless it is ahead of now
                    return bool(info.get("owner") == owner[:200]) or not (
                        float(info.get("until", 0)) > now
                    )
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # its holder released it (and removed the file) meanwhile
            _write_claim(fd, owner, until)
            self._held[path] = (fd, owner, until)
            return True

    def release(self, key: EffectKey, owner: str) -> None:
        path = self._path(key)
        with self._lock:
            held = self._held.get(path)
            if held is None or held[1] != owner:
                return
            del self._held[path]
            # removed while still locked, so a claimer never locks a file nobody can see
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            os.close(held[0])

    def close(self) -> None:
        with self._lock:
            for path, (fd, _, _) in self._held.items():
                with contextlib.suppress(OSError):
                    path.unlink()  # while still locked (see release)
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._held.clear()
