"""The PostgreSQL store's liveness: a session whose end tells every other process that the
holder of a run (or of a shared effect's claim) is gone.

A store that takes leases or claims keeps one dedicated connection holding a session-level
advisory lock on a random key, the *session key*, and writes that key at the start of every
lease token and claim owner it writes (``"<key>.<rest>"``). The server releases the lock the
moment the session ends: when the holder exits or is SIGKILLed (its socket closes and its
backend ends at once; measured: free 0.3 ms after the kill), or when the server restarts or
terminates the session. :func:`gone` is the SQL that asks "has the session that wrote this
value ended?"; the store then lets another process take the run over after
:data:`TAKEOVER_GRACE` instead of waiting out the lease.

Two rules keep a live holder from being displaced:

* **A holder gives up whatever its session guarded when the session ends.** A watcher thread
  sleeps on the connection's socket; when the connection fails (terminated, server restarted,
  network path dead) it calls ``on_lost(key)`` at once — the store marks every lease taken
  under that key lost (fencing: the runs stop) — and the next lease opens a new session with a
  new key. The grace gives the holder time to notice before anyone takes over.
* **The holder notices a dead path before the server gives up on it.** Client-side TCP
  keepalives (probes after 5 s of silence, 3 probes 2 s apart) find a dead network path in
  about 11 s; the session asks the server to wait far longer before it drops a silent client
  (probes after 60 s, 6 probes 10 s apart: about 2 minutes). A host that dies, or a network cut
  (a half-open connection), is therefore seen by the server only after about 2 minutes: its
  runs are taken over then, or when their lease expires if that is sooner — the lease stays
  the fence for those cases.

A connection pooler in transaction mode (pgbouncer ``pool_mode=transaction``) would hand the
session lock to whichever client uses the server connection next: connect directly, or
through session pooling.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg

__all__ = ["TAKEOVER_GRACE", "Session", "gone", "session_key_of"]

_log = logging.getLogger(__name__)

#: seconds between finding a holder's session ended and taking its run (or claim) over: the
#: holder, if it lives on, notices its connection broke within milliseconds and stops
TAKEOVER_GRACE = 0.2

_KEY_LIMIT = 10**18  # keys have at most 18 decimal digits: they always fit a bigint

#: libpq options of the session's connection (client side: find a dead path in ~11 s)
_CLIENT_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
#: server settings of the session (the server waits ~2 min before dropping a silent client,
#: never kills it for being idle); tcp_user_timeout 0 means the system's (long) default
_SERVER_SETTINGS = (
    ("tcp_keepalives_idle", "60"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "6"),
    ("tcp_user_timeout", "0"),
    ("idle_session_timeout", "0"),
)


def gone(column: str) -> str:
    """SQL that is true when the session whose key starts the text in ``column`` has ended.

    Values without a session key (written by older versions) are never gone: only their
    expiry frees them. Taking the key's lock for the rest of the transaction, when it is
    free, is harmless: nobody holds or will hold that key again."""
    return (
        f"(CASE WHEN {column} ~ '^[0-9]{{1,18}}[.]' THEN "
        f"pg_try_advisory_xact_lock(split_part({column}, '.', 1)::bigint) ELSE false END)"
    )


def session_key_of(value: str) -> int | None:
    """The session key a lease token or claim owner starts with, if any."""
    head, dot, _ = value.partition(".")
    return int(head) if dot and head.isdigit() and len(head) <= 18 else None


class Session:
    """One store's liveness session; :meth:`key` opens it on first use (and again after it
    was lost). ``on_lost(key)`` runs on the watcher thread when the session ends unasked."""

    def __init__(
        self,
        conninfo: str,
        connect_kwargs: dict[str, Any],
        on_lost: Callable[[int], None],
        name: str,
    ) -> None:
        self._conninfo = conninfo
        self._kwargs = {**connect_kwargs, **_CLIENT_KEEPALIVES}
        self._on_lost = on_lost
        self._name = name
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._key: int | None = None
        self._closed = False

    def key(self) -> int:
        """The live session's key, opening a session if there is none. Raises
        ``psycopg.Error`` when the server cannot be reached."""
        with self._lock:
            if self._closed:
                raise psycopg.InterfaceError("the store's session is closed")
            if self._key is not None:
                return self._key
            conn = psycopg.connect(self._conninfo, **self._kwargs)
            try:
                for name, value in _SERVER_SETTINGS:
                    with contextlib.suppress(psycopg.errors.UndefinedObject):  # older servers
                        conn.execute("SELECT set_config(%s, %s, false)", [name, value])
                while True:  # a random key is all but certainly free; if not, draw again
                    key = secrets.randbelow(_KEY_LIMIT - 1) + 1
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
                    if row is not None and row[0]:
                        break
            except BaseException:
                conn.close()
                raise
            self._conn, self._key = conn, key
            threading.Thread(
                target=self._watch, args=(conn, key), name=f"{self._name}-session", daemon=True
            ).start()
            return key

    def is_live(self, key: int) -> bool:
        """Whether ``key`` is the key of the session open now."""
        return self._key == key

    def _watch(self, conn: psycopg.Connection[Any], key: int) -> None:
        """Sleep on the socket; anything arriving (an error, the connection closing, a
        keepalive failure) is checked with a query, which fails if the session ended."""
        while True:
            with self._lock:
                if self._conn is not conn:
                    return  # closed
            try:
                ready, _, _ = select.select([conn.fileno()], [], [], 0.5)
                if ready:
                    conn.execute("SELECT 1")
            except (psycopg.Error, OSError, ValueError) as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                break
        with self._lock:
            if self._conn is not conn:
                return  # closed while we looked: not a loss
            self._conn, self._key = None, None
        with contextlib.suppress(psycopg.Error):
            conn.close()
        _log.warning(
            "durable_nb: the PostgreSQL session guarding this process's runs ended (%s); "
            "the runs it guarded stop here and may be taken over by another process",
            reason,
        )
        self._on_lost(key)

    def close(self) -> None:
        """End the session (its lock goes with it); ``on_lost`` is not called."""
        with self._lock:
            self._closed = True
            conn, self._conn, self._key = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
