"""Who executes a run on the PostgreSQL store: leases, their renewal, takeover and fencing.

What :class:`~._postgres.PostgresStore` does to give a run one executor at a time (it
inherits this class):

* **Leases.** A run's lease is a row of ``dn_leases`` with an expiry, whose token starts
  with the key of this store's liveness session (``_pg_session``): it lasts while that
  session does, or until it expires. ``acquire_run`` takes it (cutting a dead holder's to
  the grace first), the heartbeat thread renews every lease this store holds each third of
  the lease, and a lease not renewed in time, or taken under a session that ended, is lost:
  its run is interrupted here.
* **Claims.** ``claim_run``/``claim_routed`` (the queries are ``_pg_queues``'s) are not
  repeated while nothing happened that may have made a run claimable, and they look for
  runs of dead holders at most once a second.
* **Fencing.** Every write of a run's records this store holds a lease for names the lease
  token; the server commits it only while that lease is live (``Sql.fence`` in
  ``_pg_commit``, :meth:`PgLeases._check_fence` for the store's own transactions), and a
  refused write stops the run (``RunLockedError``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from .._journal import run_of_scope
from ..errors import RunLockedError, StoreError, StoreUnavailableError
from ._base import StoreBase
from ._pg_commit import Done
from ._pg_session import TAKEOVER_GRACE, Session, session_key_of
from ._protocol import RunLease
from ._queues import Node, Route

if TYPE_CHECKING:
    from ._protocol import EffectRecord, EventRecord, RunRecord

__all__ = ["CONDEMN_EVERY", "Claimed", "PgLeases", "WorkSignal"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
Claimed = tuple["RunRecord", RunLease, "Route | None"]

#: seconds between two looks for runs held by processes that died, by one store's claims:
#: the look probes the session lock of every live lease, and idle workers are woken by every
#: queued run and every released lease (4 workers looked ~30 times a run without a limit)
CONDEMN_EVERY = 1.0


class WorkSignal:
    """Wake-ups for ``wait_for_work``, never missed: a counter each waiting thread compares
    with the value it saw last (an Event cleared by one waiter would hide a wake-up from
    another thread of the same process, such as a worker and a job watcher). ``claimable``
    counts the wake-ups that may mean a run to claim (not a run that ended, not a signal)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self.claimable = 0
        self._seen = threading.local()

    def set(self, claimable: bool = True) -> None:
        with self._cond:
            self._seq += 1
            self.claimable += claimable
            self._cond.notify_all()

    def mark(self) -> None:
        """This thread has looked for work now: a wake-up after this ends its next wait."""
        with self._cond:
            self._seen.seq = self._seq

    def wait(self, timeout: float) -> None:
        with self._cond:
            seen = getattr(self._seen, "seq", None)
            if seen is None or seen == self._seq:
                start = self._seq
                self._cond.wait_for(lambda: self._seq != start, timeout)
            self._seen.seq = self._seq


class PgLeases(StoreBase):
    """Leases, claims and fencing of :class:`~._postgres.PostgresStore` (which provides the
    connections, the statements and the state below, set up in its ``__init__``)."""

    _q: dict[str, str]
    _channel: str
    _lease_seconds: float
    _closed: bool
    _lock: threading.Lock
    _held: dict[str, str]  # lease token -> run id, renewed by the heartbeat
    _lease_objs: dict[str, RunLease]  # lease token -> the holder's RunLease
    # run id -> the token of the lease this store took for it, kept after the lease was lost
    # (until released): the run's writes commit only while that lease is live
    _fences: dict[str, str]
    _next_condemn: float  # monotonic time of the next look for dead holders' runs
    # a claim's node id (None without one) and workflows -> (claimable wake-ups seen, until
    # when) after it found nothing
    _idle: dict[tuple[str | None, ...], tuple[int, float]]
    _stop: threading.Event
    _work: WorkSignal
    _heartbeat: threading.Thread | None
    _listener: threading.Thread | None
    _session: Session
    # the claim's query (``_pg_queues``)
    _claim: Callable[[str, Sequence[str], Node | None], Claimed | None]

    # provided by the store ---------------------------------------------------------------
    def _call(self, fn: Callable[[_Conn], _T]) -> _T:
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    def _unavailable(self, e: BaseException) -> StoreUnavailableError:
        raise NotImplementedError

    def _translate(self, e: BaseException) -> BaseException:
        raise NotImplementedError

    def _send(
        self,
        rows: list[tuple[Any, ...]],
        statements: list[tuple[str, Sequence[Any]]],
        fence: list[str],
        done: Done,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ fencing
    def _fence_of(
        self,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
    ) -> list[str]:
        """The lease tokens a write depends on: those of the runs whose records it holds
        that this store took a lease for (others' writes, e.g. queueing a run, are free)."""
        fences = self._fences
        if not fences:
            return []
        if len(effects) == 1 and not runs and not events:  # an effect's record: most writes
            token = fences.get(run_of_scope(effects[0].scope) or "")
            return [] if token is None else [token]
        run_ids = {run_of_scope(rec.scope) for rec in effects}
        run_ids.update(run.run_id for run in runs)
        run_ids.update(event.run_id for event in events)
        return sorted({t for r in run_ids if r is not None and (t := fences.get(r)) is not None})

    def _fence_of_run(self, run_id: str) -> list[str]:
        token = self._fences.get(run_id)
        return [] if token is None else [token]

    def _fenced_done(self, fence: list[str], done: Done) -> Done:
        if not fence:
            return done

        def told(error: BaseException | None) -> None:
            if isinstance(error, RunLockedError):
                error = self._refused(fence, error)
            done(error)

        return told

    def _refused(self, fence: list[str], error: RunLockedError) -> RunLockedError:
        """A write the server refused because a lease it depends on is not live any more:
        the runs of those leases stop here (another process may hold them), and the error
        names them."""
        runs = sorted({r for r, t in list(self._fences.items()) if t in fence})
        lost: list[RunLease] = []
        with self._lock:  # a write holds the records of one run (or of a run and its scopes)
            for token in fence:
                self._held.pop(token, None)
                if (lease := self._lease_objs.pop(token, None)) is not None:
                    lost.append(lease)
        self._fence(lost)
        refused = RunLockedError(
            f"run{'s' if len(runs) != 1 else ''} {', '.join(map(repr, runs)) or '?'} lost "
            f"{'their leases' if len(runs) > 1 else 'its lease'}: it expired while this "
            "process was stalled or cut off from the server, and another process may have "
            "taken the run over, so the store refused this process's write; the run stops "
            "here and resumes wherever it is executed next"
        )
        refused.__cause__ = error.__cause__
        return refused

    def _check_fence(self, conn: _Conn, fence: list[str]) -> None:
        """Last in a transaction that rewrites or deletes a run this store holds: it fails
        (and with it everything the transaction did) unless the lease is still live, and
        holds the lease row until the commit, as the group writes do (``Sql.fence``)."""
        if fence:
            conn.execute(self._q["fence"], [len(fence), " ".join(fence)])

    def _fenced_call(self, fn: Callable[[_Conn], _T], fence: list[str]) -> _T:
        try:
            return self._call(fn)
        except RunLockedError as e:
            if not fence:
                raise
            raise self._refused(fence, e) from e.__cause__

    # ------------------------------------------------------------------ leases
    def _holder_info(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname()})

    def _session_key(self) -> int:
        """This store's session key, opening the session if needed."""
        self._check_open()
        try:
            return self._session.key()
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None
        except psycopg.Error as e:
            self._check_open()
            raise self._translate(e) from e

    def _token(self) -> str:
        """A fresh lease token, starting with this store's session key: the lease lives as
        long as the session does, or until it expires."""
        return f"{self._session_key()}.{secrets.token_hex(12)}"

    def _session_lost(self, key: int) -> None:
        """This store's session ended (its connection failed): every lease taken under it
        may be taken over by others after the grace, so their runs stop now (fencing)."""
        lost: list[RunLease] = []
        with self._lock:
            for token in [t for t in self._held if session_key_of(t) == key]:
                del self._held[token]
                lease = self._lease_objs.pop(token, None)
                if lease is not None:
                    lost.append(lease)
        self._fence(lost)

    @staticmethod
    def _fence(lost: list[RunLease]) -> None:
        for lease in lost:  # outside the lock: the engine interrupts the run
            release = lease._release
            try:
                lease.lost()
            except Exception:
                _log.exception("durable_nb: interrupting run %r failed", lease.run_id)
            # the engine releases it once the run stopped: that forgets the run's fence (its
            # late writes are refused until then) and leaves the lease row, not ours any more
            lease._release = release

    def _lease(self, run_id: str, owner: str, token: str) -> RunLease | None:
        """Hand out the lease just written, or ``None`` if its session ended meanwhile (the
        row is then deleted again, best effort: it is free for the taking anyway)."""
        lease = RunLease(run_id, owner)
        key = session_key_of(token)
        with self._lock:
            live = key is not None and self._session.is_live(key)
            if live:
                self._held[token] = run_id
                self._lease_objs[token] = lease
                self._fences[run_id] = token
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(
                        target=self._heartbeat_loop, name="durable_nb-pg-heartbeat", daemon=True
                    )
                    self._heartbeat.start()
        q = self._q["release"]

        def forget() -> bool:
            """This store stops renewing and fencing with the lease; False if it is not
            ours to delete any more."""
            with self._lock:
                self._lease_objs.pop(token, None)
                if self._fences.get(run_id) == token:
                    del self._fences[run_id]
                return self._held.pop(token, None) is not None and not self._closed

        def failed(e: BaseException) -> None:  # the lease expires by itself: nothing to undo
            _log.warning("durable_nb: could not release the lease of run %r: %s", run_id, e)

        def release() -> None:
            if not forget():
                return  # lost (taken over after it expired) or released by close()
            try:
                self._call(lambda conn: conn.execute(q, [run_id, token, self._channel]))
            except StoreError as e:
                failed(e)

        def release_later(
            loop: asyncio.AbstractEventLoop | None,
        ) -> concurrent.futures.Future[None] | None:
            """Let go as a write of ``loop``'s writer (or the writer thread's): the runs
            that end together share a commit (and its notification) instead of one
            transaction each, and no thread waits for it."""
            if not forget():
                return None
            later: concurrent.futures.Future[None] = concurrent.futures.Future()
            statement: list[tuple[str, Sequence[Any]]] = [(q, [run_id, token, self._channel])]

            def done(error: BaseException | None) -> None:
                if error is not None:
                    failed(error)
                later.set_result(None)

            def on_loop(error: BaseException | None) -> None:
                if error is None:
                    later.set_result(None)
                    return
                try:  # cut by its loop's teardown (a worker stopping): the writer thread's
                    self._send([], statement, [], done, None)
                except (StoreError, psycopg.Error) as e:
                    done(e)

            try:
                self._send([], statement, [], on_loop if loop is not None else done, loop)
            except (StoreError, psycopg.Error) as e:  # closed meanwhile
                failed(e)
                return None
            return later

        if not live:
            with contextlib.suppress(StoreError):
                self._call(lambda conn: conn.execute(q, [run_id, token, self._channel]))
            return None
        lease._release, lease._release_later = release, release_later
        return lease

    def acquire_run(self, run_id: str, owner: str) -> RunLease:
        qa, qh, qc = self._q["acquire"], self._q["holder"], self._q["condemn"]
        grace = {"grace": TAKEOVER_GRACE, "run_id": run_id}
        while True:
            token = self._token()
            params = (run_id, token, owner, self._holder_info(), self._lease_seconds)

            def acquire(
                conn: _Conn, params: tuple[Any, ...] = params
            ) -> tuple[str, str, float] | None:
                while True:
                    if conn.execute(qa, params).fetchone() is not None:
                        return None
                    # a holder whose session ended keeps the run only for the grace
                    conn.execute(qc, grace)
                    row = conn.execute(qh, [run_id]).fetchone()
                    if row is not None:  # else released meanwhile: try again
                        return (row[0], row[1], row[2])

            held = self._call(acquire)
            if held is None:
                lease = self._lease(run_id, owner, token)
                if lease is None:
                    continue  # our own session ended meanwhile: take it under the next one
                return lease
            holder_owner, holder_json, remaining = held
            if remaining <= TAKEOVER_GRACE:
                # ending now (expired, or its holder is gone): wait for it rather than refuse
                time.sleep(max(remaining, 0.0) + 0.01)
                continue
            break
        try:
            info = json.loads(holder_json)
        except ValueError:
            info = {}
        raise RunLockedError(
            f"run {run_id!r} is being executed by {holder_owner} (process "
            f"{info.get('pid', '?')} on {info.get('host', '?')}); its lease has "
            f"{max(remaining, 0.0):.1f}s left and is renewed while that process lives — wait "
            "for it to finish, or stop that process: the run is taken over within a second of "
            "that process ending (or when its lease expires, if its host died)"
        )

    def _claim_run(self, owner: str, names: list[str]) -> tuple[RunRecord, RunLease] | None:
        self._work.mark()  # work arriving while we look must end the next wait_for_work
        self._check_open()
        if not names:
            return None
        # _pg_queues: queue limits hold, no sessions (no node)
        got = self._idle_claim((None, *names), lambda: self._claim(owner, names, None))
        return None if got is None else (got[0], got[1])

    def claim_routed(self, node: Node) -> tuple[RunRecord, RunLease, Route | None] | None:
        self._work.mark()
        self._check_open()
        return self._idle_claim(
            (node.node_id, *node.workflows), lambda: self._claim(node.owner, node.workflows, node)
        )

    def _idle_claim(
        self, which: tuple[str | None, ...], claim: Callable[[], Claimed | None]
    ) -> Claimed | None:
        """``claim()``, unless the last claim of ``which`` (a worker's node, or the workflows
        of a claim without one) found nothing and nothing since may mean a run to claim: a
        claim that found nothing is not repeated until a run was queued or let go, or a run
        of a queue with a concurrency limit ended (notifications), or CONDEMN_EVERY passed
        (what only time changes: a rate window, a session's idle timeout, dead holders).
        Idle workers, woken by every run that ends anywhere, would otherwise all ask the
        server each time."""
        seen = self._work.claimable
        idle = self._idle.get(which)
        listening = self._listener is not None and self._listener.is_alive()
        if listening and idle is not None and idle[0] == seen and time.monotonic() < idle[1]:
            return None
        got = claim()
        if got is None:
            self._idle[which] = (seen, time.monotonic() + CONDEMN_EVERY)
        else:
            self._idle.pop(which, None)
        return got

    def _condemn_dead(self) -> bool:
        # nothing to claim: are runs held by processes that died? Their leases end after the
        # grace; the caller looks once more after it (at most every CONDEMN_EVERY s)
        now = time.monotonic()
        if now < self._next_condemn:
            return False
        self._next_condemn = now + CONDEMN_EVERY
        q = self._q["condemn_all"]
        if not self._call(lambda conn: conn.execute(q, {"grace": TAKEOVER_GRACE}).fetchall()):
            return False
        time.sleep(TAKEOVER_GRACE + 0.01)
        return True

    def _renew(self, tokens: list[str]) -> set[str]:
        """Renew the leases of ``tokens``; returns the ones still ours."""
        q = self._q["renew"]
        rows = self._call(lambda conn: conn.execute(q, [self._lease_seconds, tokens]).fetchall())
        return {r[0] for r in rows}

    def _heartbeat_loop(self) -> None:
        renewed = time.monotonic()  # the leases are ours until at least this + lease_seconds
        # renewals run on a thread of their own: one that hangs (a server that stopped
        # answering on a connection that stays open) must not keep this loop from fencing
        beats = concurrent.futures.ThreadPoolExecutor(1, "durable_nb-pg-renew")
        try:
            while not self._stop.wait(self._lease_seconds / 3):
                with self._lock:
                    tokens = list(self._held)
                sent = time.monotonic()
                if not tokens:
                    renewed = sent
                    continue
                left = renewed + self._lease_seconds - sent
                try:
                    kept = beats.submit(self._renew, tokens).result(timeout=max(left, 0.001))
                except (StoreError, concurrent.futures.TimeoutError) as e:
                    # the next beat tries again: leases outlive an outage shorter than them
                    if self._closed:
                        continue
                    _log.warning(
                        "durable_nb: could not renew run leases: %s",
                        e if str(e) else "no answer from the server",
                    )
                    if time.monotonic() - renewed < self._lease_seconds:
                        continue
                    kept = set()  # expired by now: another process may hold them
                else:
                    renewed = sent
                self._expire([t for t in tokens if t not in kept])
        finally:
            beats.shutdown(wait=False)

    def _expire(self, tokens: list[str]) -> None:
        """These leases were not renewed in time: another process may hold them now."""
        lost: list[RunLease] = []
        with self._lock:
            for token in tokens:
                if run_id := self._held.pop(token, None):
                    _log.warning(
                        "durable_nb: the lease of run %r expired before it was renewed and "
                        "another process may have taken the run over; this process stops "
                        "executing it",
                        run_id,
                    )
                    lease = self._lease_objs.pop(token, None)
                    if lease is not None:
                        lost.append(lease)
        self._fence(lost)
