"""The storage seam: the records every store keeps and the rules every store obeys.

The engine talks to storage only through :class:`Store`. Every implementation (memory,
DuckDB, PostgreSQL) passes the same conformance suite (``tests/test_store_conformance.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from .._journal import (
    CLAIMABLE_STATUSES,
    FINAL_STATUSES,
    RUN_STATUSES,
    EventKind,
    RecordKind,
    RunStatus,
    run_scopes,
)

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import Future

    from .._codecs import Payload, Signer

__all__ = [
    "CLAIMABLE_STATUSES",
    "FINAL_STATUSES",
    "RUN_STATUSES",
    "EffectKey",
    "EffectRecord",
    "EventRecord",
    "RunLease",
    "RunRecord",
    "RunStart",
    "RunStatus",
    "SharedLimits",
    "SignalRecord",
    "Store",
    "WriteDone",
    "run_scopes",
    "submit_now",
]

#: told how a :meth:`Store.submit` ended: ``None`` once every record is durable, else the error
WriteDone = Callable[[BaseException | None], None]

#: ``(scope, identity, version, input_hash, occurrence)``: the effect key (guide, "How
#: it works").
EffectKey = tuple[str, str, str, str, int]


@dataclass(slots=True)
class EffectRecord:
    """One recorded step: an effect's result or error, or an engine step (timer, signal...).

    ``scope`` is ``"run/<run id>"`` inside a run, ``"top/<name>"`` for a notebook or
    script, ``"shared"`` for ``@effect(shared=True)``. A run also owns two auxiliary scopes
    (see :func:`run_scopes`): ``"kv/<run id>"`` (its key/value state, one record per key,
    ``identity`` = the key) and ``"stream/<run id>"`` (its streams, ``identity`` = the
    stream's name, ``occurrence`` = the chunk's position).
    """

    scope: str
    identity: str
    version: str
    input_hash: str
    occurrence: int
    payload: Payload
    is_error: bool = False
    kind: RecordKind = "effect"  # a step kind, or a record of a run's kv/stream scopes
    seq: int = -1  # call position within the execution that first recorded it (-1: top level)
    started_at: float = 0.0  # epoch seconds
    duration: float = 0.0  # seconds the original execution took
    detail: str = ""  # for traces: the kind's detail as JSON (see _journal), or an argument preview

    @property
    def key(self) -> EffectKey:
        return (self.scope, self.identity, self.version, self.input_hash, self.occurrence)


@dataclass(slots=True)
class RunRecord:
    """A run's current state. Only the process holding the run's lease writes it."""

    run_id: str
    workflow: str
    status: RunStatus
    created_at: float
    updated_at: float
    args: Payload | None = None
    result: Payload | None = None
    error: Payload | None = None
    custom_status: str | None = None  # JSON text
    status_version: int = 0
    parent_id: str | None = None
    executions: int = 0  # how many times a process started executing this run
    detail: str = ""  # JSON text: what the run waits on, last error summary...
    input_hash: str = ""  # of the arguments of its last execution
    code_version: str = ""  # of the workflow's code at its last execution
    generation: int = 0  # how many times it continued as new (ctx.continue_as_new)
    version: str = ""  # the workflow version it started on (@durable(version=...))


@dataclass(slots=True)
class SignalRecord:
    """A signal sent to a run. Signals are delivered in ``(sent_at, signal_id)`` order, once."""

    run_id: str
    signal_id: str
    name: str
    payload: str  # JSON text
    sent_at: float


class RunStart(NamedTuple):
    """What a run's execution starts from (:meth:`Store.open_run`): its record (None for a
    new run), its history (None when the record says the run has its outcome, see
    :func:`has_outcome`: a rerun returns that outcome and needs no history), its inbox token
    and its signals (read after the token, so a signal sent meanwhile shows)."""

    record: RunRecord | None
    history: list[EffectRecord] | None
    inbox_token: object
    signals: list[SignalRecord]


def has_outcome(rec: RunRecord) -> bool:
    """A completed run with its result, or a cancelled run: running it again returns that
    outcome when its arguments and code are unchanged."""
    return rec.status == "cancelled" or (rec.status == "completed" and rec.result is not None)


@dataclass(slots=True)
class EventRecord:
    """A trace event of a run (started, resumed, completed, signal received, ...)."""

    run_id: str
    event_id: str
    ts: float
    kind: EventKind
    data: str = ""  # JSON text


@dataclass(slots=True)
class RunLease:
    """Proof that this process may execute a run; ``release()`` is idempotent.

    A store whose leases can expire under a live holder (PostgreSQL: renewals failed for
    longer than the lease) calls :meth:`lost`, which runs ``on_lost`` (set by the engine: it
    interrupts the run, so two processes never go on executing it together)."""

    run_id: str
    owner: str
    _release: object = field(default=None, repr=False)
    on_lost: object = field(default=None, repr=False)
    #: ``(loop) -> Future | None``: starts letting go without waiting (:meth:`release_later`)
    _release_later: object = field(default=None, repr=False)

    def release(self) -> None:
        fn = self._release
        self._release = self._release_later = None
        if callable(fn):
            fn()

    @property
    def releases_later(self) -> bool:
        """:meth:`release_later` lets go without waiting on the calling thread."""
        return callable(self._release_later)

    def release_later(self, loop: asyncio.AbstractEventLoop | None = None) -> Future[None] | None:
        """Start letting go without waiting on this thread: returns a future settled once
        the lease is let go (or once letting go failed, as ``release`` would then return),
        or ``None`` if it was let go here. The DuckDB store lets a run go only once this
        process's records are merged into its file, which its merge thread does; the
        PostgreSQL store deletes the lease as a write of ``loop``'s own writer (the loop the
        engine executes the run on), shared with what other runs write meanwhile."""
        fn = self._release_later
        if not callable(fn):
            self.release()
            return None
        self._release = self._release_later = None
        later: Future[None] | None = fn(loop)
        return later

    def lost(self) -> None:
        """Called by the store when this lease is no longer held (idempotent)."""
        self._release = self._release_later = None
        fn, self.on_lost = self.on_lost, None
        if callable(fn):
            fn()


@runtime_checkable
class SharedLimits(Protocol):
    """A store on which named rate/concurrency limits hold across processes (PostgreSQL).

    ``limit_take`` is atomic (one transaction under a lock of the limit's name) and uses the
    store's own clock, so every process agrees on the sliding window."""

    def limit_take(
        self,
        name: str,
        slot: str,
        concurrency: int | None,
        calls: int | None,
        window: float | None,
        hold: float,
    ) -> float | None:
        """Take a place under limit ``name`` (None), or say how long to wait before asking
        again: fewer than ``concurrency`` slots held (a slot, ``slot``, lasts ``hold`` seconds
        at most: a holder that died frees it then) and fewer than ``calls`` starts in the
        last ``window`` seconds; a place taken records a start and holds a slot."""
        ...

    def limit_give(self, name: str, slot: str) -> None:
        """Give slot ``slot`` of limit ``name`` back."""
        ...


@runtime_checkable
class Store(Protocol):
    """Where everything durable lives.

    Invariants every implementation keeps (the conformance suite checks them):

    * **Durable on return.** When a ``put_*``, ``add_signal`` or ``append_events`` call
      returns, the data survives a crash (``kill -9``) of the calling process. A store may
      batch internally (the DuckDB store appends to a per-process write-ahead journal and
      merges it into DuckDB in the background), but never acknowledges before that point.
    * **Atomic per call.** A ``put_effects`` of several records is all-or-nothing after a
      crash; recovery is idempotent (a record written twice is stored once).
    * **Last write wins per key.** Effect records are keyed by :attr:`EffectRecord.key`,
      runs by ``run_id``, signals by ``(run_id, signal_id)``, events by
      ``(run_id, event_id)``.
    * **Read your writes.** A read in the same process sees every write that returned.
      Writes of other processes are visible once they merged (the DuckDB store merges within
      a fraction of a second and always before it releases the file).
    * **One executor per run.** :meth:`acquire_run` succeeds for at most one holder at a
      time across every process using the store; a holder that dies releases it.
    * **Thread safety.** Every method may be called from any thread; calls are serialized
      internally where needed.
    * **Validation before mutation.** A call that raises leaves the store unchanged.
    """

    @property
    def url(self) -> str:
        """How to reach this store again (a path, ``:memory:``, or a postgresql:// URL)."""
        ...

    @property
    def signer(self) -> Signer:
        """Signs and verifies pickled payloads with this store's key."""
        ...

    @property
    def remote(self) -> bool:
        """Whether a call is a network round trip (PostgreSQL): the engine then makes its
        calls in a thread or awaits :meth:`submit`, so its loop goes on serving other runs.
        A local store's calls (memory, DuckDB) are made on the loop, as they are quick."""
        ...

    # effects -------------------------------------------------------------------------
    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        """Record effects; durable on return, atomic for the whole batch."""
        ...

    def submit(
        self,
        done: WriteDone,
        *,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Write records without waiting for them: as ``put_effects``, ``put_run`` (each run)
        and ``append_events`` would, then ``done(None)`` once every one is durable, or
        ``done(error)`` if they were not all written. ``done`` runs on any thread, possibly
        before ``submit`` returns (a store that writes at once: see :func:`submit_now`); it
        must be quick and must not call the store. A store may write records of concurrent
        ``submit`` calls in one transaction (PostgreSQL: group commit). An error found
        before anything was written (a closed store, a value it cannot keep) may be raised
        by ``submit`` itself. The engine awaits ``done`` instead of blocking its loop.

        ``loop``: a long-lived event loop the caller is running on, which the store may use
        to write without a thread in between (``done`` is then called on that loop)."""
        ...

    def get_effect(self, key: EffectKey) -> EffectRecord | None:
        """The record for one key, or ``None``."""
        ...

    def load_effects(self, scope: str) -> list[EffectRecord]:
        """Every record of a scope (a run's whole history), in ``seq`` order."""
        ...

    def delete_effects(self, scope: str) -> int:
        """Forget every record of a scope; returns how many were deleted."""
        ...

    def effect_scopes(self, prefix: str) -> list[str]:
        """The scopes that hold records and start with ``prefix`` (``"top/"``: the notebooks
        and scripts with cached effects), sorted."""
        ...

    # runs ----------------------------------------------------------------------------
    def put_run(self, run: RunRecord) -> None:
        """Create or replace a run record; durable on return."""
        ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        """The records of the runs named that exist, by run id (a remote store reads them in
        one round trip)."""
        ...

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        parent_id: str | None = None,
        updated_after: float | None = None,
        updated_before: float | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        """Runs, newest (``created_at``) first, filtered by every argument that is not None
        (``updated_after <= updated_at < updated_before``)."""
        ...

    def delete_run(self, run_id: str) -> bool:
        """Forget a run with every scope it owns (:func:`run_scopes`), its signals and events;
        ``False`` if it did not exist."""
        ...

    def reset_run(self, run: RunRecord, consumed_signals: Sequence[str]) -> None:
        """Continue a run as new, atomically: replace its record with ``run``, forget its
        history (scope ``run/<id>``; its kv and stream scopes stay) and delete the signals
        whose ids are given (the ones its old history consumed). Durable on return; after a
        crash either all of it happened or none."""
        ...

    def acquire_run(self, run_id: str, owner: str) -> RunLease:
        """Take the exclusive right to execute a run or raise ``RunLockedError`` naming the
        holder. A holder that dies (or, for a networked store, stops renewing its lease)
        loses it."""
        ...

    def start_runs(
        self, run_ids: Sequence[str], owner: str
    ) -> dict[str, tuple[RunLease, RunStart]]:
        """For runs starting together: take the lease of each run nobody holds and read what
        its execution starts from (:meth:`open_run`), by run id (a remote store does it for
        all of them in one round trip). A run it could not take at once (held, or its
        holder's lease in its grace) is left out: :meth:`acquire_run` says why, or waits."""
        ...

    def claim_run(self, owner: str, workflows: Sequence[str]) -> tuple[RunRecord, RunLease] | None:
        """For workers: take a run whose workflow is one of ``workflows`` and that needs an
        executor — ``queued``, or ``running``/``waiting`` with no live holder (never
        ``interrupted``: stopped where it was started, resumed only on request) — acquiring its
        lease; oldest first. ``None`` when there is none. Never returns a run another holder
        executes."""
        ...

    def wait_for_work(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when a run may have become
        claimable (a run was queued, a signal sent, a lease released). May return early
        spuriously."""
        ...

    # effect maintenance ------------------------------------------------------------------
    def prune_effects(self, scope_prefix: str, older_than: float) -> int:
        """Delete effect records whose scope starts with ``scope_prefix`` and that were
        recorded (``started_at``) before ``older_than``; returns how many. For ``gc`` of
        cached effects (prefixes ``"top/"`` and ``"shared"``)."""
        ...

    def claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        """For shared effects: ``True`` if the caller may execute the effect of ``key`` now
        (nobody else claimed it in the last ``seconds``, or the claim is the caller's own);
        ``False`` if another owner holds a live claim (wait for its record, then claim again).
        Claims are advisory: a store that cannot coordinate may always return ``True``."""
        ...

    def release_effect(self, key: EffectKey, owner: str) -> None:
        """Drop the caller's claim on ``key`` (after recording it, or on failure)."""
        ...

    # signals and events ----------------------------------------------------------------
    def add_signal(self, signal: SignalRecord) -> None:
        """Store a signal for a run (which need not be executing); durable on return."""
        ...

    def list_signals(self, run_id: str) -> list[SignalRecord]:
        """A run's signals in delivery order ``(sent_at, signal_id)``."""
        ...

    def inbox_token(self, run_id: str) -> object:
        """A cheap value that changes when another process may have sent this run a signal."""
        ...

    def open_run(self, run_id: str) -> RunStart:
        """A run's record, history, inbox token and signals, as its execution starts
        (:class:`RunStart`; a remote store reads them in one round trip)."""
        ...

    def inbox_tokens(self, run_ids: Sequence[str]) -> dict[str, object]:
        """:meth:`inbox_token` of each run named, by run id (a remote store reads them in one
        round trip)."""
        ...

    def append_events(self, events: Sequence[EventRecord]) -> None:
        """Append trace events; durable on return."""
        ...

    def load_events(self, run_id: str) -> list[EventRecord]:
        """A run's events in time order."""
        ...

    # lifecycle -------------------------------------------------------------------------
    def flush(self) -> None:
        """Push buffered writes to their final place (no-op for unbuffered stores)."""
        ...

    def close(self) -> None:
        """Flush and release every resource; the store may not be used afterwards."""
        ...


def submit_now(
    store: Store,
    done: WriteDone,
    effects: Sequence[EffectRecord] = (),
    runs: Sequence[RunRecord] = (),
    events: Sequence[EventRecord] = (),
) -> None:
    """:meth:`Store.submit` for a store whose writes are quick: write now, then tell ``done``."""
    try:
        if effects:
            store.put_effects(effects)
        for run in runs:
            store.put_run(run)
        if events:
            store.append_events(events)
    except Exception as e:
        done(e)
        return
    done(None)
