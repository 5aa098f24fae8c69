"""The run driver: executes (or resumes) one run, generation after generation.

:func:`start_run` puts a run on a loop of this process (the caller's, or the engine's own
thread when there is none or the caller blocks) and returns its :class:`~._jobs.Job`; the
run's coroutine (``_drive``) takes the run's lease, loads its history and signals, builds
its :class:`~._state.RunState` and :class:`~._context.Context`, calls the workflow, and
settles the job — completed, failed, cancelled, or interrupted and resumable. Around it:
the inbox poller that picks up what other processes send the run, continue-as-new, the
key/value base of a new generation, cancelling children, and a lost lease.

The driver installs :func:`start_run` as ``runtime.start_run`` when it is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import time
import weakref
from dataclasses import replace as _replace
from typing import Any, TypeVar, cast

from .. import _codecs
from .._journal import (
    AUX_KINDS,
    CANCEL_SIGNAL,
    FINAL_STATUSES,
    TOP_SCOPE_PREFIX,
    EndStatus,
    KvBaseDetail,
    check_run_id,
    detail_text,
    run_scope,
    signal_id_of,
    usage_totals,
)
from ..errors import (
    ArgumentTypeError,
    DurableError,
    EngineError,
    RunCancelledError,
    RunConflictError,
    RunLockedError,
    StoreFormatError,
    StoreLockedError,
    StoreUnavailableError,
    UnstorableValueError,
    WorkflowVersionError,
)
from ..store import EffectRecord, RunLease, RunRecord, SignalRecord
from ._context import Context, ContinueAsNew
from ._jobs import Job, cancel, outcome_of_record, reject, resolve
from ._kv import kv_base_texts
from ._runtime import (
    cancel_scope,
    current_scope,
    durable_write,
    off_loop,
    running_loop,
    runtime,
    wait_written,
    writer_loop,
)
from ._starts import start_together
from ._state import INBOX_POLL, RunState
from ._workflow import Workflow, for_run, newest, version_of

__all__ = ["call_of", "check_same_workflow", "fail_unstarted", "start_run"]

R = TypeVar("R")


def start_run(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None = None,
    restart: bool = False,
    parent_id: str | None = None,
    blocking: bool = False,
    lease: RunLease | None = None,
    version: str | None = None,
) -> Job[R]:
    """Start a run on this thread's loop, or on the engine's loop when there is none or the
    caller will block on the result (``blocking``). ``lease``: the run's lease, already taken
    (a worker's claim_run); otherwise the run takes it when it starts. ``version``: a new run
    starts on this version of the workflow instead of the newest."""
    if not isinstance(workflow, Workflow):
        raise ArgumentTypeError(
            f"expected a @durable workflow, got {workflow!r}; decorate it with @durable"
        )
    workflow.binder.bind(args, kwargs)  # a missing argument fails here, before anything runs
    rid = check_run_id(run_id) if run_id is not None else workflow.run_id_for(*args, **kwargs)
    if version is not None:
        version_of(workflow, version)  # an unknown version fails here, before anything runs
    with runtime.jobs_lock:
        live = runtime.jobs.get(rid)
        if live is not None and not live.done():
            if restart:
                raise RunLockedError(
                    f"run {rid!r} is executing in this process; cancel it (job.cancel()) "
                    "before restarting it"
                )
            return cast(Job[R], live)
        job: Job[R] = Job(rid, workflow)
        runtime.jobs[rid] = job
    here = running_loop()
    loop = here if here is not None and not blocking else runtime.engine_loop()
    job._loop = loop
    job._opened = loop.create_future()
    coro = _drive(job, workflow, args, kwargs, restart, parent_id, lease, version)
    if loop is here:
        job._task = loop.create_task(coro)
    else:

        def create() -> None:
            job._task = loop.create_task(coro)

        loop.call_soon_threadsafe(create)
    return job


async def _drive(
    job: Job[R],
    wf: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    restart: bool,
    parent_id: str | None,
    lease: RunLease | None = None,
    version: str | None = None,
) -> None:
    """Execute (or resume) one run, generation after generation when it continues as new.
    The job's future is settled only after the run's lease is released and its records
    merged, so whoever sees the result can start the run again."""
    store, clock = runtime.store, runtime.clock
    state: RunState | None = None
    poller: _InboxPoller | None = None
    outcome: tuple[bool, Any] | None = None  # (ok, value or exception)
    claimed = lease is not None  # a worker's claim: nobody waits here to fix a failed start
    try:
        start = None
        if lease is None and not restart and store.remote:
            # with the runs starting on this loop now: one store call takes all their leases
            # and reads what each starts from
            taken = await start_together(job.run_id)
            if taken is not None:
                lease, start = taken
        if lease is None:
            lease = await _acquire(job.run_id)
        lease.on_lost = functools.partial(_lease_lost, job, asyncio.get_running_loop())
        # what the execution starts from, in one call (one round trip on PostgreSQL); a
        # restart forgets the old run first
        if restart:
            await off_loop(_forget_run, job.run_id)
        elif start is None:
            start = await off_loop(store.open_run, job.run_id)
        rec = start.record if start is not None else None
        if rec is not None:
            check_same_workflow(rec, wf)
        if rec is None:
            wf = newest(wf) if version is None else version_of(wf, version)
        else:
            if version is not None and rec.version != version:
                raise WorkflowVersionError(
                    f"run {rec.run_id!r} runs on version {rec.version or '(none)'!r} of "
                    f"workflow {wf.name!r}, not {version!r}; a run finishes on the version it "
                    "started on: start it without version=, or afresh with restart=True"
                )
            wf = for_run(wf, rec)
            if rec.generation > 0 and rec.args is not None:
                # a later generation runs on the arguments continue_as_new gave it
                args, kwargs = call_of(wf, _codecs.decode(rec.args, store.signer))
        input_hash = wf.binder.input_hash(args, kwargs)
        code_version = wf.code_version
        if rec is not None and (
            rec.status == "cancelled"
            or (
                not wf.replay_completed
                and (rec.input_hash, rec.code_version) == (input_hash, code_version)
            )
        ):
            outcome = outcome_of_record(rec)
            if outcome is not None:
                return  # ended with these arguments and this code: its recorded outcome
        poller = _poll_inbox(job)
        new_generation = False
        while True:
            # reads and writes off the loop: the other runs on it go on meanwhile
            if start is not None and start.history is not None:  # read with the record
                history, token, signals = start.history, start.inbox_token, start.signals
            else:  # a later generation, a restart, a run with an outcome that runs again
                history, token, signals = await off_loop(_read_history, job.run_id)
            start = None
            now = clock.time()
            resumed = rec is not None and not new_generation
            if rec is None:
                try:
                    args_payload = _codecs.encode(
                        wf.binder.bind(args, kwargs), store.signer, what="the workflow's arguments"
                    )
                except UnstorableValueError:
                    args_payload = None
                rec = RunRecord(
                    job.run_id,
                    wf.name,
                    "running",
                    now,
                    now,
                    args=args_payload,
                    parent_id=parent_id,
                    version=wf.version or "",
                )
            rec.status, rec.updated_at, rec.detail = "running", now, ""
            rec.input_hash, rec.code_version = input_hash, code_version
            rec.executions += 1
            rec.error = None
            state = RunState(job, rec, history, signals, wf.strict, token)
            state.workflow = wf
            job._state = state
            opened: dict[str, Any] = {
                "execution": rec.executions,
                "history": len(history),
                # the notebook or script (or worker) executing it: `durable-nb metrics` counts
                # what this execution spends and saves for it
                "notebook": runtime.top.scope_id.removeprefix(TOP_SCOPE_PREFIX),
            }
            if rec.generation:
                opened["generation"] = rec.generation
            started = state.event_record("resumed" if resumed else "started", opened)
            await wait_written(durable_write(store, runs=[rec], events=[started]))
            _opened(job)
            _start_kv(state, history)
            current_scope.set(state)
            cancel_scope.set(state.root_scope)
            cancel_sig = next((s for s in state.inbox if s.name == CANCEL_SIGNAL), None)
            if cancel_sig is not None:
                state.cancel_reason = json.loads(cancel_sig.payload) or "cancelled"
                raise asyncio.CancelledError
            try:
                result: Any = await wf.fn(Context(state), *args, **kwargs)
            except ContinueAsNew as nxt:
                wf, args, kwargs, rec = await _next_generation(state, wf, nxt)
                input_hash, code_version = rec.input_hash, rec.code_version
                new_generation = True
                continue
            break
        state.run.result = _codecs.encode(
            result, store.signer, what=f"the result of workflow {wf.name}"
        )
        await _finish(state, "completed")
        outcome = (True, result)
    except asyncio.CancelledError:
        if state is not None and state.cancel_reason is not None:
            await _finish(state, "cancelled", detail={"reason": state.cancel_reason})
            await _cancel_children(state)
            outcome = (
                False,
                RunCancelledError(
                    f"run {job.run_id!r} was cancelled ({state.cancel_reason}); resume it from "
                    f"its history with dn.resume({job.run_id!r}), or start it again with "
                    "restart=True to run it afresh"
                ),
            )
        else:  # interrupted (Ctrl-C, loop shutdown, lease lost): the run stays resumable
            if state is not None:
                # best effort: a fenced holder's event is refused by the store (RunLockedError:
                # the record belongs to whoever holds the lease now), and a lease lost because
                # the store is unreachable fails this write too; the outcome below is settled
                with contextlib.suppress(Exception):
                    state.event("interrupted", {**_stats(state), "lease_lost": job._lease_lost})
                if not claimed and not job._lease_lost:
                    # stopped where it was started: resumable here (or by dn.resume), and
                    # no worker takes it over, unlike a worker's run, which stays claimable;
                    # a lost lease means another process may hold the run: its record is theirs
                    with contextlib.suppress(Exception):
                        state.set_run_status("interrupted")
            outcome = (
                False,
                RunLockedError(
                    f"run {job.run_id!r} lost its lease (the store could not renew it in time), "
                    "so another process may have taken it over; it stopped here and resumes "
                    "wherever it is executed next"
                )
                if job._lease_lost
                else KeyboardInterrupt(
                    f"run {job.run_id!r} was interrupted; run it again to resume"
                ),
            )
    except BaseException as e:
        if state is not None and state.run.status != "completed":
            try:
                if isinstance(e, Exception):  # resuming it calls what failed it again
                    state.clear_failure(e)
                state.run.error = _codecs.encode_error(e, store.signer)
                await _finish(state, "failed", detail={"error": repr(e)[:500]})
            except Exception:  # the store failed too: the error we report is the run's
                pass
        elif state is None and claimed and isinstance(e, Exception):
            # it could not even start (arguments that no longer bind, a version this worker
            # lacks): left queued it would be claimed again at once, forever
            fail_unstarted(job.run_id, e)
        outcome = (False, e)
        if not isinstance(e, Exception):
            raise
    finally:
        _opened(job)
        if poller is not None:
            poller.discard(job)
        try:
            if state is not None:  # its records written behind are durable before it ends
                with contextlib.suppress(Exception):
                    await state.caught_up()
            if lease is not None:
                await _release(lease)
        finally:
            with runtime.jobs_lock:
                if runtime.jobs.get(job.run_id) is job:
                    del runtime.jobs[job.run_id]
            if outcome is None:
                outcome = (False, EngineError(f"run {job.run_id!r} ended without an outcome"))
            if outcome[0]:
                resolve(job._future, outcome[1])
            else:
                reject(job._future, outcome[1])


def check_same_workflow(rec: RunRecord, wf: Workflow[..., Any]) -> None:
    """A run id belongs to one workflow: starting (or queueing) ``wf`` under the id of a run
    of another workflow is refused, naming both, and changes nothing."""
    if rec.workflow != wf.name:
        raise RunConflictError(
            f"run {rec.run_id!r} is a run of workflow {rec.workflow!r}, not of {wf.name!r}: a "
            "run id belongs to one workflow; pick another run_id, or start "
            f"{rec.workflow!r} to resume it (restart=True replaces it with a run of "
            f"{wf.name!r})"
        )


def fail_unstarted(run_id: str, e: Exception) -> None:
    """Mark a claimed run that failed before it executed as failed (its lease still held),
    unless the store itself was the trouble: then it stays claimable for a later try."""
    if isinstance(e, (StoreLockedError, StoreUnavailableError)):
        return
    store = runtime.store
    with contextlib.suppress(Exception):
        rec = store.get_run(run_id)
        if rec is not None and rec.status not in FINAL_STATUSES:
            rec.status, rec.updated_at = "failed", runtime.clock.time()
            rec.error = _codecs.encode_error(e, store.signer)
            rec.detail = json.dumps({"error": repr(e)[:500]})
            store.put_run(rec)


class _InboxPoller:
    """While runs execute on a loop, pick up what other processes send them (signals, queue
    messages, a cancel) even when they are busy in long effects: every half second, one
    store call reads the inbox tokens of all of them (one round trip on PostgreSQL, whatever
    the number of runs), and a run whose token changed reads its signals."""

    def __init__(self) -> None:
        self.jobs: set[Job[Any]] = set()
        self.task: asyncio.Future[None] | None = None

    def add(self, job: Job[Any]) -> None:
        self.jobs.add(job)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._serve())

    def discard(self, job: Job[Any]) -> None:
        self.jobs.discard(job)
        if not self.jobs and self.task is not None:  # no sleeping task left behind
            self.task.cancel()
            self.task = None

    async def _serve(self) -> None:
        while self.jobs:
            await asyncio.sleep(INBOX_POLL)
            now = time.monotonic()
            due = [
                (job, state)
                for job in list(self.jobs)
                if (state := job._state) is not None and now - state.last_poll >= INBOX_POLL
            ]
            if not due:
                continue
            try:
                tokens = await off_loop(
                    runtime.store.inbox_tokens, [state.run_id for _, state in due]
                )
            except Exception:  # a store hiccup (a busy file): the next round tries again
                continue
            for job, state in due:
                # the run may have ended or continued as new while the store answered
                if job not in self.jobs or job._state is not state:
                    continue
                state.last_poll = now
                token = tokens.get(state.run_id)
                if token != state.inbox_token:
                    with contextlib.suppress(Exception):  # likewise
                        await state.refresh_inbox(token)


#: the inbox poller of each loop runs execute on (the engine's, a worker's)
_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _InboxPoller] = (
    weakref.WeakKeyDictionary()
)


def _poll_inbox(job: Job[Any]) -> _InboxPoller:
    poller = _pollers.get(loop := asyncio.get_running_loop())
    if poller is None:
        poller = _pollers[loop] = _InboxPoller()
    poller.add(job)
    return poller


def call_of(wf: Workflow[..., Any], bound: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Stored bound arguments (name -> value) back into a call of ``wf``."""
    if not isinstance(bound, dict):
        raise StoreFormatError(
            f"the stored arguments of workflow {wf.name} are damaged: {bound!r:.200}; start "
            "the run afresh with restart=True (and its arguments)"
        )
    ba = inspect.BoundArguments(wf.binder.signature, bound)
    return ba.args, ba.kwargs


def _start_kv(state: RunState, history: list[EffectRecord]) -> None:
    """Where the run's key/value state starts in this execution: empty for a new run; for a
    new generation, what the previous one left (recorded as the generation's first step, so
    its replays start from the same state)."""
    base = next((r for r in history if r.kind == "kv_base"), None)
    store = runtime.store
    if base is not None:
        value = _codecs.decode(base.payload, store.signer)
        state.kv = dict(value) if isinstance(value, dict) else {}
        state.kv_times = dict.fromkeys(state.kv, base.started_at)
        return
    if history or state.run.generation == 0:
        return
    texts = kv_base_texts(store, state.run_id)
    if texts:
        rec = EffectRecord(
            state.scope_id,
            "dn.kv.base",
            "",
            "",
            0,
            payload=_codecs.encode(texts, store.signer),
            kind="kv_base",
            seq=-1,
            started_at=runtime.clock.time(),
            detail=detail_text(KvBaseDetail(keys=len(texts))),
        )
        store.put_effects([rec])
        state.index[(rec.identity, rec.version, rec.input_hash, rec.occurrence)] = rec
        state.kv_times = dict.fromkeys(texts, rec.started_at)
    state.kv = texts


async def _next_generation(
    state: RunState, wf: Workflow[..., R], nxt: ContinueAsNew
) -> tuple[Workflow[..., R], tuple[Any, ...], dict[str, Any], RunRecord]:
    """Continue the run as new: one atomic reset of its record and history that also drops
    the signals its history consumed (unconsumed ones and queue messages stay); off the
    loop, after what the run wrote behind (which the reset must not find half written)."""
    store = runtime.store
    # a new generation runs on the newest version, or the one continue_as_new named
    new_wf = newest(wf) if nxt.version is None else version_of(wf, nxt.version)
    args, kwargs = nxt.call
    payload = _codecs.encode(
        new_wf.binder.bind(args, kwargs),
        store.signer,
        what="the arguments given to ctx.continue_as_new",
    )
    consumed = sorted(
        {sid for r in state.index.values() if (sid := signal_id_of(r.kind, r.detail))}
    )
    old = state.run
    state.event(
        "continued_as_new",
        {
            "generation": old.generation + 1,
            "history": len(state.index),
            **_stats(state),
            **_spent(state),
        },
    )
    new = _replace(
        old,
        status="running",
        args=payload,
        result=None,
        error=None,
        detail="",
        input_hash=new_wf.binder.input_hash(args, kwargs),
        code_version=new_wf.code_version,
        generation=old.generation + 1,
        version=new_wf.version or "",
        updated_at=runtime.clock.time(),
    )
    await state.caught_up()
    await off_loop(store.reset_run, new, consumed)
    return new_wf, args, kwargs, new


async def _cancel_children(state: RunState) -> None:
    """A cancelled run's children (started with ctx.start_child) are cancelled too; those
    executing in this process have ended when this returns (so has the parent, for whoever
    waits on it)."""
    ids = set(state.children)
    for r in state.index.values():
        if r.kind == "start_child":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ids.add(str(json.loads(r.detail)["run_id"]))
    ending: list[asyncio.Future[Any]] = []
    for child_id in sorted(ids):
        with contextlib.suppress(DurableError):
            with runtime.jobs_lock:
                live = runtime.jobs.get(child_id)
            rec = runtime.store.get_run(child_id)
            # a child starting here may not have stored its record yet: it reads the
            # cancel signal when it does
            if (live is not None and not live.done()) or (
                rec is not None and rec.status not in FINAL_STATUSES
            ):
                cancel(child_id, f"parent {state.run_id!r} was cancelled")
                if live is not None:
                    ending.append(asyncio.wrap_future(live._future))
    if ending:
        await asyncio.wait(ending, timeout=30)
        for f in ending:  # their outcome (cancelled) is the children's own business
            if f.done() and not f.cancelled():
                f.exception()


def _lease_lost(job: Job[Any], loop: asyncio.AbstractEventLoop) -> None:
    """The store says this process no longer holds the run's lease (called from the store's
    thread): stop executing it, so two processes never go on executing one run together."""

    def stop() -> None:
        job._lease_lost = True
        job.interrupt_task()

    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
        loop.call_soon_threadsafe(stop)


def _stats(state: RunState) -> dict[str, Any]:
    """An execution's totals, for the event that closes it (``_journal.CLOSING_EVENTS``)."""
    out: dict[str, Any] = {
        "replayed": state.replayed,
        "executed": state.executed,
        "saved_seconds": round(state.saved, 6),
    }
    if state.tokens_saved:
        by_model = {m: {"prompt": p, "completion": c} for m, (p, c) in state.tokens_saved.items()}
        out["tokens_saved"] = {
            "prompt": sum(v["prompt"] for v in by_model.values()),
            "completion": sum(v["completion"] for v in by_model.values()),
        }
        out["tokens_saved_by_model"] = by_model
    return out


def _spent(state: RunState) -> dict[str, Any]:
    """What a generation's journal spent (time of its steps, tokens), kept in the event of
    its end by continue_as_new, which drops the journal: the run's totals sum the chain."""
    records = state.index.values()
    out: dict[str, Any] = {
        "spent_seconds": round(sum(r.duration for r in records if r.kind not in AUX_KINDS), 6)
    }
    usage = usage_totals(records)
    if usage["by_model"]:
        out["tokens"] = {"prompt": usage["prompt"], "completion": usage["completion"]}
        out["tokens_by_model"] = usage["by_model"]
    return out


async def _finish(state: RunState, status: EndStatus, detail: dict[str, Any] | None = None) -> None:
    """Store the run's end (its event and its record, one write) without blocking the loop;
    an interruption meanwhile waits for the write, so the job is never settled before it."""
    await state.caught_up()  # what the run wrote behind comes first
    event = state.event_record(status, {**_stats(state), **(detail or {})})
    run = state.status_record(status, detail)
    await wait_written(durable_write(runtime.store, runs=[run], events=[event]))
    state.status_stored(status, detail)


async def _acquire(run_id: str) -> RunLease:
    """Take the run's lease in a thread (it may wait for a dead holder's grace); if the run
    is interrupted meanwhile, the lease taken after all is released, not leaked."""
    if not runtime.store.remote:
        return runtime.store.acquire_run(run_id, runtime.owner)
    taking = asyncio.ensure_future(
        asyncio.to_thread(runtime.store.acquire_run, run_id, runtime.owner)
    )
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:

        def let_go(f: asyncio.Future[RunLease]) -> None:
            if not f.cancelled() and f.exception() is None:
                f.result().release()

        taking.add_done_callback(let_go)
        raise


async def _release(lease: RunLease) -> None:
    """Release the run's lease without blocking the loop (on PostgreSQL a write of the
    loop's own writer, shared with the runs that end meanwhile; on DuckDB the merge thread
    lets go once this process's records are merged); the run's job is settled only after
    it, so whoever sees the result can start the run again. The run is over: a
    cancellation arriving meanwhile does not cut this short."""
    letting_go: asyncio.Future[None]
    if runtime.store.remote and not lease.releases_later:  # a round trip: in a thread
        letting_go = asyncio.ensure_future(asyncio.to_thread(lease.release))
    else:
        later = lease.release_later(writer_loop(asyncio.get_running_loop()))
        if later is None:
            return
        letting_go = asyncio.wrap_future(later)
    while True:
        try:
            await asyncio.shield(letting_go)
            return
        except asyncio.CancelledError:
            if letting_go.done():
                letting_go.result()
                return


def _opened(job: Job[Any]) -> None:
    if job._opened is not None and not job._opened.done():
        job._opened.set_result(None)


def _forget_run(run_id: str) -> None:
    """A restarted run forgets its old record and history: it starts anew."""
    store = runtime.store
    if store.get_run(run_id) is not None:
        store.delete_run(run_id)


def _read_history(run_id: str) -> tuple[list[EffectRecord], object, list[SignalRecord]]:
    """What a run's execution starts from: its history, its inbox token and its signals."""
    store = runtime.store
    history = store.load_effects(run_scope(run_id))
    token = store.inbox_token(run_id)  # before reading: a signal sent meanwhile shows
    return history, token, store.list_signals(run_id)


runtime.start_run = start_run
