"""The admin API: list, inspect, steer, prune, export and import the runs of any store.

:class:`Client` works on the engine's store (``Client()``) or on any other store
(``Client("other.duckdb")``, ``Client(MemoryStore())``); the ``durable-nb`` command is a thin
layer over it. Everything it returns is JSON data, read through the :class:`~durable_nb.store.Store`
protocol only (see :mod:`durable_nb.trace` for the shape of a trace).

Export files are JSON lines: a header line, then one record per line
(``{"type": "run" | "effect" | "signal" | "event", ...}``). Payload bytes are base64; a
table payload's Arrow table travels as an Arrow IPC stream (base64). Pickled payloads stay
signed by the key of the store that wrote them, so an export file cannot smuggle an unsigned
pickle into a store: importing into a store with another key needs the source store's key
(``source_key=``), with which each pickle is verified before it is signed again.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import IO, TYPE_CHECKING, Any

from ._export import EXPORT_FORMAT, open_text, read_export, write_export
from ._journal import (
    CANCEL_SIGNAL,
    SHARED_SCOPE,
    TOP_SCOPE_PREFIX,
    check_name,
    check_run_id,
    check_user_signal,
    json_text,
)
from ._metrics import metrics
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    RunEndedError,
    RunLockedError,
    RunNotFoundError,
)
from .store import (
    CLAIMABLE_STATUSES,
    DEFAULT_QUEUE,
    FINAL_STATUSES,
    RUN_STATUSES,
    RunLease,
    RunRecord,
    SignalRecord,
    Store,
    WorkQueues,
    open_store,
)
from .trace import run_history, run_info, run_summary, run_trace

if TYPE_CHECKING:
    pass

__all__ = ["EXPORT_FORMAT", "Client", "parse_duration", "parse_time"]

#: the first line of an export file names the format and its version
_ALL = 1 << 62  # "no limit" for list_runs
_OWNER = f"durable_nb admin pid {os.getpid()}"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(value: str | float | timedelta) -> float:
    """Seconds in ``value``: a number of seconds, a ``timedelta``, or text like ``90``,
    ``45s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ArgumentError(
            f"a duration must be seconds or text like '45s', '30m', '12h', '7d', '2w', "
            f"got {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ArgumentError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def parse_time(value: str | float | datetime | timedelta, *, now: float | None = None) -> float:
    """Epoch seconds of ``value``: epoch seconds, a ``datetime`` (naive means local time), a
    ``timedelta`` or duration text (that long ago: ``'2h'``), or an ISO date or date-time
    (``'2024-05-01'``, ``'2024-05-01T12:00'``)."""
    now = time.time() if now is None else now
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, timedelta):
        return now - parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ArgumentError(f"a time must be finite epoch seconds, got {value!r}")
        return float(value)
    if isinstance(value, str):
        if _DURATION.match(value) and not value.strip().isdigit():
            return now - parse_duration(value)
        try:
            return datetime.fromisoformat(value.strip()).timestamp()
        except ValueError:
            pass
    raise ArgumentError(
        f"a time must be epoch seconds, a datetime, an ISO date like '2024-05-01' or "
        f"'2024-05-01T12:00', or a duration ago like '2h' or '7d', got {value!r}"
    )


class Client:
    """Admin access to the runs and cached effects of a store.

    ``store`` is ``None`` (the engine's store, the one ``dn.set_store`` chose, followed when
    it changes), a :class:`~durable_nb.store.Store`, or a path / ``":memory:"`` /
    ``postgresql://`` URL, which the client opens and :meth:`close` closes.
    """

    def __init__(self, store: Store | str | os.PathLike[str] | None = None) -> None:
        self._owned = False
        self._store: Store | None
        if store is None or isinstance(store, Store):
            self._store = store
        elif isinstance(store, (str, os.PathLike)):
            self._store = open_store(store)
            self._owned = True
        else:
            raise ArgumentTypeError(
                f"store must be a Store, a path, ':memory:' or a postgresql:// URL, or None "
                f"for the engine's store, got {store!r}"
            )

    @property
    def store(self) -> Store:
        if self._store is not None:
            return self._store
        from .engine import runtime

        return runtime.store

    def close(self) -> None:
        """Close the store if the client opened it (a store passed in stays open)."""
        if self._owned and self._store is not None:
            self._store.close()
            self._owned = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._store.url if self._store is not None else "the engine's store"
        return f"<durable_nb.Client {where}>"

    def _get(self, run_id: str) -> RunRecord:
        rec = self.store.get_run(check_run_id(run_id))
        if rec is None:
            raise RunNotFoundError(
                f"no run {run_id!r} in the store {self.store.url!r}; list runs with "
                "`durable-nb runs`"
            )
        return rec

    # reading -----------------------------------------------------------------------------
    def runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        since: str | float | datetime | timedelta | None = None,
        until: str | float | datetime | timedelta | None = None,
        parent: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Runs, newest first, as JSON data (the ``run`` part of a trace): filtered by status,
        workflow name, parent run id, and last update ``since <= updated_at < until`` (see
        :func:`parse_time` for the forms a time takes)."""
        if status is not None and status not in RUN_STATUSES:
            raise ArgumentError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        for name, value in (("workflow", workflow), ("parent", parent)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ArgumentTypeError(f"{name} must be a non-empty str or None, got {value!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ArgumentError(f"limit must be an int >= 1, got {limit!r}")
        now = time.time()
        recs = self.store.list_runs(
            status=status,
            workflow=workflow,
            parent_id=parent,
            updated_after=parse_time(since, now=now) if since is not None else None,
            updated_before=parse_time(until, now=now) if until is not None else None,
            limit=limit,
        )
        return [run_summary(r) for r in recs]

    def run(self, run_id: str) -> dict[str, Any]:
        """A run's record with its steps, waits, pending signals, children and totals."""
        return run_info(self.store, check_run_id(run_id))

    def trace(self, run_id: str) -> dict[str, Any]:
        """The run's trace (:func:`durable_nb.trace.run_trace`)."""
        return run_trace(self.store, check_run_id(run_id))

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """Every step and event of the run in time order (``"type": "step"`` or ``"event"``)."""
        return run_history(self.trace(run_id))

    def custom_status(self, run_id: str) -> Any:
        """The last value the run published with ``ctx.set_status`` (or None)."""
        rec = self._get(run_id)
        return json.loads(rec.custom_status) if rec.custom_status else None

    def wait_kv(self, run_id: str, key: str, *, timeout: float | None = None) -> Any:
        """Block until run ``run_id`` holds ``key`` in its key/value state and return the
        value (at once if it does). Reads the store a few times a second at first, then once
        a second. Raises ``TimeoutError`` after ``timeout`` seconds, and
        :class:`~durable_nb.errors.RunEndedError` when the run ended without the key."""
        from .engine import check_kv_key, check_timeout, kv_value

        check_kv_key(key)
        timeout = check_timeout(timeout)
        self._get(run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            found, value = kv_value(self.store, run_id, key)
            if found:
                return value
            rec = self._get(run_id)
            if rec.status in FINAL_STATUSES:
                raise RunEndedError(
                    f"run {run_id!r} ended ({rec.status}) without setting kv key {key!r}"
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"run {run_id!r} did not set kv key {key!r} within timeout={timeout:g}s"
                )
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)

    def tree(self, run_id: str) -> dict[str, Any]:
        """The run and its child runs, nested: ``{run_id, workflow, status, parent_id,
        created_at, updated_at, children: [...]}``."""
        root = self._get(run_id)
        seen = {root.run_id}

        def node(rec: RunRecord) -> dict[str, Any]:
            kids = sorted(
                self.store.list_runs(parent_id=rec.run_id, limit=_ALL),
                key=lambda c: (c.created_at, c.run_id),
            )
            fresh = [k for k in kids if k.run_id not in seen]
            seen.update(k.run_id for k in fresh)
            return {
                "run_id": rec.run_id,
                "workflow": rec.workflow,
                "status": rec.status,
                "parent_id": rec.parent_id,
                "created_at": rec.created_at,
                "updated_at": rec.updated_at,
                "children": [node(k) for k in fresh],
            }

        return node(root)

    def metrics(self) -> dict[str, Any]:
        """Counts of runs by status and by workflow, executions, the steps the runs'
        executions executed and replayed, and what was spent and what replay saved — time
        and LLM tokens — overall, per run (``by_run``), per notebook (``by_notebook``) and
        per model (``by_model``; ``tokens_by_model`` and ``tokens_by_run`` are the spent
        tokens alone). Spent is read from the records, saved from the events that close
        executions (one still going is not counted yet); see ``durable_nb/_metrics.py``."""
        return metrics(self.store)

    def queue_depths(self) -> dict[str, Any]:
        """The operations view: per queue its limits and its runs waiting for a worker
        (``queued``) and executing (``running``), in all and per workflow; the live workers
        (node id, name, pid, host, workflows, sessions held, runs executing); the sessions
        (the node holding each, when it took it, how often it moved). On a store without
        queues (memory, DuckDB) every run is in queue ``default``, counted by its status
        (``queued``; ``running`` and ``waiting``), and there are no workers or sessions."""
        store = self.store
        if isinstance(store, WorkQueues):
            return store.queue_depths()
        default: dict[str, Any] = {"queued": 0, "running": 0, "by_workflow": {}, "limits": None}
        for r in store.list_runs(limit=_ALL):
            if r.status not in CLAIMABLE_STATUSES:
                continue
            key = "queued" if r.status == "queued" else "running"
            default[key] += 1
            flow = default["by_workflow"].setdefault(r.workflow, {"queued": 0, "running": 0})
            flow[key] += 1
        queues = {DEFAULT_QUEUE: default} if default["queued"] or default["running"] else {}
        return {"queues": queues, "workers": {}, "sessions": {}}

    def workers(self) -> list[dict[str, Any]]:
        """The live workers on a store that routes runs (PostgreSQL): node id, name, pid,
        host, workflows, ``max_sessions``, the sessions it holds and the runs it executes.
        Other stores do not know their workers: an empty list."""
        store = self.store
        return store.live_workers() if isinstance(store, WorkQueues) else []

    # steering ----------------------------------------------------------------------------
    def signal(self, run_id: str, name: str, payload: Any = None) -> None:
        """Send the run signal ``name`` with JSON ``payload`` (delivered once, in order)."""
        self._get(run_id)
        from .engine import runtime, signal

        if self.store is runtime.store:
            signal(run_id, name, payload)  # also reaches a run executing in this process
            return
        from .engine import send_time

        check_name(name)
        check_user_signal(name)
        text = json_text(payload, "payload")
        self.store.add_signal(SignalRecord(run_id, uuid.uuid4().hex, name, text, send_time()))

    def cancel(self, run_id: str, reason: str = "cancelled") -> None:
        """Cancel the run wherever it executes; a run no process executes ends at once."""
        if not isinstance(reason, str):
            raise ArgumentTypeError(f"reason must be a str, got {reason!r}")
        rec = self._get(run_id)
        from .engine import cancel, runtime

        if self.store is runtime.store:
            cancel(run_id, reason)
            return
        if rec.status in FINAL_STATUSES:
            return
        from .engine import send_time

        self.store.add_signal(
            SignalRecord(run_id, uuid.uuid4().hex, CANCEL_SIGNAL, json.dumps(reason), send_time())
        )
        try:
            lease = self.store.acquire_run(run_id, _OWNER)
        except RunLockedError:
            return  # its executor sees the signal
        try:
            now = self.store.get_run(run_id)
            if now is not None and now.status not in FINAL_STATUSES:
                now.status = "cancelled"
                now.detail = json.dumps({"reason": reason})
                now.updated_at = time.time()
                self.store.put_run(now)
        finally:
            lease.release()

    def resume(self, run_id: str) -> dict[str, Any]:
        """Queue a stopped run (cancelled, failed, interrupted) for a worker, which resumes it
        from its history (as ``dn.resume(run_id, on="worker")``; a completed run stays as it
        is). Returns the run as :meth:`run` does. Works on the engine's store."""
        from .engine import requeue

        self._engine_store("resume")
        requeue(check_run_id(run_id))
        return self.run(run_id)

    def fork(
        self, run_id: str, from_step: int, *, new_id: str | None = None, signals: bool = True
    ) -> dict[str, Any]:
        """Fork run ``run_id`` from step ``from_step`` and queue the fork for a worker (as
        ``dn.fork(..., on="worker")``); returns the fork as :meth:`run` does. Works on the
        engine's store."""
        from .engine import fork_records, requeue

        self._engine_store("fork")
        fork_id = fork_records(run_id, from_step=from_step, run_id=new_id, signals=signals)
        requeue(fork_id)
        return self.run(fork_id)

    def _engine_store(self, what: str) -> None:
        from .engine import runtime

        if self.store is not runtime.store:
            raise ArgumentError(
                f"Client.{what} works on the engine's store, and this client's store is "
                f"{self.store.url!r}; call dn.set_store({self.store.url!r}) and use dn.Client()"
            )

    # deleting ----------------------------------------------------------------------------
    def delete(self, run_id: str, *, children: bool = True) -> int:
        """Forget a run with its history, signals and events, and (``children=True``) its
        child runs, depth first; returns how many runs were deleted. A run some process is
        executing is refused with :class:`~durable_nb.errors.RunLockedError`: cancel it first.
        """
        self._get(run_id)
        ids = self._descendants(run_id) if children else []
        order = [*reversed(ids), run_id]
        with self._leases(order, "delete"):
            return sum(self.store.delete_run(rid) for rid in order)

    def _descendants(self, run_id: str) -> list[str]:
        out: list[str] = []
        seen = {run_id}
        todo = [run_id]
        while todo:
            for kid in self.store.list_runs(parent_id=todo.pop(), limit=_ALL):
                if kid.run_id not in seen:
                    seen.add(kid.run_id)
                    out.append(kid.run_id)
                    todo.append(kid.run_id)
        return out

    @contextmanager
    def _leases(self, run_ids: Iterable[str], what: str) -> Iterator[None]:
        """Hold the leases of these runs, so no process executes one while we rewrite it."""
        held: list[RunLease] = []
        try:
            for rid in run_ids:
                try:
                    held.append(self.store.acquire_run(rid, _OWNER))
                except RunLockedError as e:
                    raise RunLockedError(
                        f"cannot {what} run {rid!r} while it executes ({e}); cancel it or wait "
                        "for it to finish, then try again"
                    ) from None
            yield
        finally:
            for lease in held:
                lease.release()

    def gc(
        self,
        older_than: str | float | timedelta = "7d",
        *,
        runs: bool = True,
        effects: bool = True,
        statuses: Sequence[str] = FINAL_STATUSES,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Prune what was not touched for ``older_than`` (seconds, a ``timedelta`` or text like
        ``'7d'``): runs in ``statuses`` (finished ones by default) last updated before then,
        with everything they own, and cached effects of notebooks and scripts (``top/...``)
        and shared ones (``shared``) recorded before then. Runs some process executes are
        kept. Returns ``{"cutoff", "runs", "top_effects", "shared_effects", "dry_run"}``.

        A dry run deletes nothing: it counts the runs and the shared effects it would delete;
        ``top_effects`` is then ``None`` because the store protocol cannot count those
        without deleting them."""
        age = parse_duration(older_than)
        if isinstance(statuses, str) or any(s not in RUN_STATUSES for s in statuses):
            raise ArgumentError(
                f"statuses must be a list of {', '.join(RUN_STATUSES)}, got {statuses!r}"
            )
        cutoff = time.time() - age
        doomed: list[str] = []
        if runs:
            for status in dict.fromkeys(statuses):
                doomed += [
                    r.run_id
                    for r in self.store.list_runs(status=status, updated_before=cutoff, limit=_ALL)
                ]
        out: dict[str, Any] = {"cutoff": cutoff, "dry_run": bool(dry_run)}
        if dry_run:
            out["runs"] = len(doomed)
            out["top_effects"] = None if effects else 0
            out["shared_effects"] = (
                sum(r.started_at < cutoff for r in self.store.load_effects(SHARED_SCOPE))
                if effects
                else 0
            )
            return out
        deleted = 0
        for rid in doomed:
            try:
                lease = self.store.acquire_run(rid, _OWNER)
            except RunLockedError:
                continue  # restarted since we listed it
            try:
                # read again under the lease: between the listing and the lease the run may
                # have been resumed and finished (or be updated since); then it is kept
                run = self.store.get_run(rid)
                if run is not None and run.status in statuses and run.updated_at < cutoff:
                    deleted += self.store.delete_run(rid)
            finally:
                lease.release()
        out["runs"] = deleted
        out["top_effects"] = self.store.prune_effects(TOP_SCOPE_PREFIX, cutoff) if effects else 0
        out["shared_effects"] = self.store.prune_effects(SHARED_SCOPE, cutoff) if effects else 0
        return out

    # export and import ---------------------------------------------------------------------
    def export(
        self,
        target: str | os.PathLike[str] | IO[str],
        run_ids: Sequence[str] | None = None,
        *,
        children: bool = True,
        include_effects: bool = True,
        scopes: Sequence[str] = (),
    ) -> dict[str, int]:
        """Write runs (all, or ``run_ids`` with their child runs) with their history, key/value
        state, streams, signals and events to ``target`` (a path or a text file) as JSON
        lines; with ``include_effects`` also the shared cached effects (scope ``shared``) and
        those of the ``scopes`` named (a notebook's is ``top/<its path>``). Returns counts of
        what was written."""
        store = self.store
        if run_ids is None:
            recs = store.list_runs(limit=_ALL)
        else:
            if isinstance(run_ids, str) or not isinstance(run_ids, Sequence):
                raise ArgumentTypeError(f"run_ids must be a list of run ids, got {run_ids!r}")
            ids: list[str] = []
            for rid in run_ids:
                self._get(rid)
                ids += [rid, *(self._descendants(rid) if children else [])]
            recs = [self._get(rid) for rid in dict.fromkeys(ids)]
        cached = list(dict.fromkeys([SHARED_SCOPE, *scopes])) if include_effects else []
        for s in cached:
            if not isinstance(s, str) or not (s == SHARED_SCOPE or s.startswith(TOP_SCOPE_PREFIX)):
                raise ArgumentError(
                    f"scopes must name cached-effect scopes like 'top/<notebook path>', "
                    f"got {s!r}; a run's own scopes are exported with the run"
                )
        with open_text(target, "w") as f:
            return write_export(f, store, recs, cached)

    def import_records(
        self,
        source: str | os.PathLike[str] | IO[str],
        *,
        source_key: bytes | None = None,
        replace: bool = False,
    ) -> dict[str, int]:
        """Read an export (see :meth:`export`) into this client's store.

        A run the store already has is kept as it is when it is as recent as the imported one
        (``updated_at``), unless ``replace=True``; otherwise it is replaced with everything it
        owns. Cached effects are written (last write wins per key). Pickled payloads signed by
        another key are verified with ``source_key`` (the exporting store's key) and signed
        again with this store's key; without it they are refused. The whole file is read and
        checked before anything is written; runs are written holding their leases, and a
        run some process executes is refused. Returns counts of what was written and skipped.
        """
        if source_key is not None and not isinstance(source_key, (bytes, bytearray)):
            raise ArgumentTypeError(f"source_key must be bytes or None, got {source_key!r}")
        store = self.store
        from ._codecs import Signer

        src_signer = Signer(bytes(source_key)) if source_key is not None else None
        parsed = read_export(source, store.signer, src_signer)
        counts = {"runs": 0, "skipped_runs": 0, "effects": 0, "signals": 0, "events": 0}
        keep: list[RunRecord] = []
        for run in parsed.runs:
            old = store.get_run(run.run_id)
            if old is not None and not replace and old.updated_at >= run.updated_at:
                counts["skipped_runs"] += 1
            else:
                keep.append(run)
        for run in keep:  # refuse before writing anything if one of them executes
            with self._leases([run.run_id], "import"):
                pass
        for run in keep:
            effs = parsed.run_effects.get(run.run_id, [])
            sigs = parsed.signals.get(run.run_id, [])
            evs = parsed.events.get(run.run_id, [])
            with self._leases([run.run_id], "import"):
                if store.get_run(run.run_id) is not None:
                    store.delete_run(run.run_id)
                if effs:
                    store.put_effects(effs)
                for sig in sigs:
                    store.add_signal(sig)
                if evs:
                    store.append_events(evs)
                # the run record last: an import cut short leaves no run that looks complete
                # and would be skipped by the next import
                store.put_run(run)
            counts["runs"] += 1
            counts["effects"] += len(effs)
            counts["signals"] += len(sigs)
            counts["events"] += len(evs)
        if parsed.cached:
            store.put_effects(parsed.cached)
            counts["effects"] += len(parsed.cached)
        return counts
