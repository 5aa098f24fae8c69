"""What a run's execution starts from on the PostgreSQL store, in one round trip.

A run that starts reads its record, its history, its inbox token and its signals (a
pipeline of four queries, :meth:`PgStarts._open_run`). Runs that start together in one
process (50 ``dn.start`` calls, a notebook's fan-out) also take their leases together:
:meth:`PgStarts._start_runs` sends one multi-row lease upsert and the same four reads for
all of them, in one pipeline on one pooled connection, so 50 starts cost one round trip
and one commit instead of 100 round trips, 50 commits and 100 thread hand-offs. A run
whose lease it could not take at once (held by a live process, or its dead holder's lease
in its grace) is left to ``acquire_run``, which says who holds it or waits.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from .._journal import run_scope
from ..errors import StoreError
from . import _rows
from ._pg_schema import payload_of
from ._protocol import RunLease, RunStart, has_outcome

if TYPE_CHECKING:
    from ._protocol import EffectRecord, RunRecord, SignalRecord

__all__ = ["PgStarts"]

_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]


class PgStarts:
    """Run starts for :class:`~._postgres.PostgresStore` (it inherits this class)."""

    _q: dict[str, str]
    _lease_seconds: float

    if TYPE_CHECKING:  # provided by the store (declared only: the store lists this class
        # first, so that its calls win over StoreBase's, and these must not hide theirs)
        def _call(self, fn: Callable[[_Conn], _T]) -> _T: ...

        def _token(self) -> str: ...

        def _holder_info(self) -> str: ...

        def _lease(self, run_id: str, owner: str, token: str) -> RunLease | None: ...

    # ------------------------------------------------------------------ one run
    def _open_run(self, run_id: str) -> RunStart:
        """The four reads in one round trip (a pipeline; each sees what committed before it,
        in this order)."""
        q = self._q

        def read(conn: _Conn) -> RunStart:
            with conn.pipeline():
                run = conn.execute(q["get_run"], [run_id], binary=True)
                history = conn.execute(q["start_history"], [run_scope(run_id), run_id], binary=True)
                token = conn.execute(q["inbox_token"], [run_id])
                signals = conn.execute(q["list_signals"], [run_id], binary=True)
            row = run.fetchone()
            rec = _rows.run_from_row(row, payload_of) if row is not None else None
            got = token.fetchone()
            return _start(
                rec,
                [_rows.effect_from_row(r, payload_of) for r in history.fetchall()],
                got[0] if got is not None else None,
                [_rows.signal_from_row(r) for r in signals.fetchall()],
            )

        return self._call(read)

    # ------------------------------------------------------------------ many runs
    def _start_runs(self, run_ids: list[str], owner: str) -> dict[str, tuple[RunLease, RunStart]]:
        q = self._q
        ids = sorted(run_ids)
        tokens = [self._token() for _ in ids]  # the same on a retry: it finds what it took
        token_of = dict(zip(ids, tokens, strict=True))
        scopes = [run_scope(r) for r in ids]
        scope_of = dict(zip(ids, scopes, strict=True))
        lease = (owner, self._holder_info(), self._lease_seconds, ids, tokens, tokens)

        def start(conn: _Conn) -> tuple[list[Any], ...]:
            # the reads come after the leases: a run whose lease this takes changes only
            # under it, so its record and history (and whether it has its outcome, which
            # start_histories decides again) agree although each query has its snapshot
            with conn.pipeline():
                taken = conn.execute(q["acquire_many"], lease)
                runs = conn.execute(q["get_runs"], [ids], binary=True)
                history = conn.execute(q["start_histories"], [scopes, ids], binary=True)
                inbox = conn.execute(q["inbox_tokens"], [ids])
                signals = conn.execute(q["list_signals_many"], [ids], binary=True)
            return (
                taken.fetchall(),
                runs.fetchall(),
                history.fetchall(),
                inbox.fetchall(),
                signals.fetchall(),
            )

        taken, runs, history, inbox, signals = self._call(start)
        run_rows = {row[0]: row for row in runs}
        effect_rows, signal_rows = _grouped(history), _grouped(signals)  # by scope, run id
        tokens_of = dict(inbox)
        got: dict[str, tuple[RunLease, RunStart]] = {}
        unused: list[str] = []  # tokens of leases taken but not handed out: deleted again
        try:
            for (run_id,) in taken:
                try:
                    row = run_rows.get(run_id)
                    start_ = _start(
                        _rows.run_from_row(row, payload_of) if row is not None else None,
                        [
                            _rows.effect_from_row(r, payload_of)
                            for r in effect_rows[scope_of[run_id]]
                        ],
                        tokens_of.get(run_id),
                        [_rows.signal_from_row(r) for r in signal_rows[run_id]],
                    )
                except Exception:  # a row it cannot read: acquire_run's path says which
                    unused.append(token_of[run_id])
                    continue
                held = self._lease(run_id, owner, token_of[run_id])
                if held is not None:  # (else our session ended: _lease deleted the row)
                    got[run_id] = (held, start_)
        except BaseException:  # interrupted: nothing taken is kept
            for held, _ in got.values():
                held.release()
            unused = [token_of[r] for (r,) in taken if r not in got]
            raise
        finally:
            if unused:
                with contextlib.suppress(StoreError):  # else they expire by themselves
                    self._call(lambda conn: conn.execute(q["release_all"], [unused]))
        return got


def _grouped(rows: list[Any]) -> collections.defaultdict[str, list[Any]]:
    """Rows by their first column (a run id or a scope)."""
    out: collections.defaultdict[str, list[Any]] = collections.defaultdict(list)
    for row in rows:
        out[row[0]].append(row)
    return out


def _start(
    rec: RunRecord | None, history: list[EffectRecord], token: object, signals: list[SignalRecord]
) -> RunStart:
    """A :class:`RunStart`; no history for a run that has its outcome (the query read none)."""
    return RunStart(rec, None if rec is not None and has_outcome(rec) else history, token, signals)
