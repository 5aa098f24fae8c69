"""Resuming a run by its id alone: ``dn.resume(run_id)``, ``job.resume()``.

A run that stopped — cancelled, failed, interrupted (Ctrl-C, "interrupt kernel"), or left
executing by a process that died — is started again from its history: its finished steps
replay, the rest execute. The workflow is found by the name its record holds (the one this
process last defined under that name, a ``%%durable`` cell's too) and its arguments are the
stored ones. Resuming a cancelled run clears the cancellation: each cancel signal it had
not consumed is marked consumed by a ``cancel_cleared`` record in its journal (signals are
never deleted), so the run does not stop again at once. A completed run is not executed: its
job holds the recorded result. A run some process executes now is refused with
:class:`~durable_nb.errors.RunLockedError` naming the holder.

``on="worker"`` does not execute the run here: it is marked ``queued`` for a worker that
serves its workflow (``durable-nb resume RUN`` does this by default).
"""

from __future__ import annotations

from typing import Any

from .. import _codecs
from .._journal import (
    CANCEL_SIGNAL,
    CancelClearedDetail,
    check_run_id,
    detail_text,
    run_scope,
    signal_id_of,
)
from ..errors import (
    ArgumentError,
    RunLockedError,
    RunNotFoundError,
    UnstorableValueError,
    WorkflowNotFoundError,
)
from ..store import EffectRecord, RunRecord
from ._driver import call_of, start_run
from ._jobs import Job, get_job
from ._runtime import runtime
from ._workflow import Workflow, defined

__all__ = ["requeue", "resume", "workflow_of"]


def resume(run_id: str, *, on: str = "here") -> Job[Any]:
    """Resume the run ``run_id`` from its history and return its :class:`Job` (see the module
    docstring). ``on="here"`` executes it in this process; ``on="worker"`` queues it for a
    worker (the job follows it through the store)."""
    rid = check_run_id(run_id)
    if on not in ("here", "worker"):
        raise ArgumentError(
            f"on must be 'here' (execute in this process) or 'worker' (queue it for a worker), "
            f"got {on!r}"
        )
    rec = _reopen(rid, here=on == "here")
    if rec.status == "completed":
        return get_job(rid)
    if on == "worker":
        job: Job[Any] = Job(rid, None)
        job._watch()
        return job
    wf = workflow_of(rec)
    args, kwargs = _arguments(wf, rec)
    return start_run(wf, args, kwargs, run_id=rid, parent_id=rec.parent_id)


def requeue(run_id: str) -> RunRecord:
    """Queue a stopped run for a worker (``resume(run_id, on="worker")`` without a job that
    follows it: the admin client's and the command line's form). Returns its record."""
    return _reopen(check_run_id(run_id), here=False)


def _reopen(rid: str, *, here: bool) -> RunRecord:
    """Make a stopped run resumable: its cancellation cleared, and ``queued`` for a worker
    (``here`` False) or left for this process to execute. A completed run is returned as it
    is; one executing anywhere is refused."""
    with runtime.jobs_lock:
        live = runtime.jobs.get(rid)
    if live is not None and not live.done():
        raise RunLockedError(
            f"run {rid!r} is executing in this process ({runtime.owner}), so there is nothing "
            "to resume; wait for it with job.wait(), or cancel it first"
        )
    store = runtime.store
    rec = store.get_run(rid)
    if rec is None:
        raise RunNotFoundError(
            f"no run {rid!r} in the store {store.url!r}; list runs with `durable-nb runs`"
        )
    if rec.status == "completed":
        return rec
    if here:
        workflow_of(rec)  # refused before anything changes if it cannot execute here
    try:
        lease = store.acquire_run(rid, runtime.owner)
    except RunLockedError as e:
        raise RunLockedError(f"run {rid!r} cannot be resumed while it executes: {e}") from None
    try:
        now = store.get_run(rid)  # as it is now that nobody else may change it
        if now is None:
            raise RunNotFoundError(f"run {rid!r} was deleted from the store {store.url!r}")
        if now.status == "completed":
            return now
        clear_cancel(now)
        if not here:
            now.status = "queued"
        elif now.status == "cancelled":
            now.status = "interrupted"  # resumable here; the driver takes it from there
        now.detail, now.updated_at = "", runtime.clock.time()
        store.put_run(now)
        return now
    finally:
        lease.release()


def workflow_of(rec: RunRecord) -> Workflow[..., Any]:
    """The workflow this process defines for ``rec`` (by the name its record holds)."""
    wf = defined(rec.workflow)
    if wf is None:
        raise WorkflowNotFoundError(
            f"run {rec.run_id!r} is a run of workflow {rec.workflow!r}, which is not defined "
            "in this process; import the module that defines it (or run its %%durable cell "
            "again), or resume it on a worker that serves it (on='worker', `durable-nb resume "
            "RUN`)"
        )
    return wf


def clear_cancel(rec: RunRecord) -> int:
    """Mark every cancel signal the run has not consumed as consumed (a ``cancel_cleared``
    record each, one atomic write); returns how many. The caller holds the run's lease."""
    store = runtime.store
    history = store.load_effects(run_scope(rec.run_id))
    consumed = {sid for r in history if (sid := signal_id_of(r.kind, r.detail)) is not None}
    now = runtime.clock.time()
    records = [
        EffectRecord(
            run_scope(rec.run_id),
            "dn.cancel_cleared",
            "",
            sig.signal_id,
            0,
            payload=_codecs.encode(None, store.signer),
            kind="cancel_cleared",
            seq=-1,
            started_at=now,
            detail=detail_text(CancelClearedDetail(signal_id=sig.signal_id)),
        )
        for sig in store.list_signals(rec.run_id)
        if sig.name == CANCEL_SIGNAL and sig.signal_id not in consumed
    ]
    if records:
        store.put_effects(records)
    return len(records)


def _arguments(wf: Workflow[..., Any], rec: RunRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The run's stored arguments as a call of ``wf``."""
    if rec.args is None:
        if not wf.binder.signature.parameters:
            return (), {}
        raise UnstorableValueError(
            f"run {rec.run_id!r} has no stored arguments (they could not be stored when it "
            "started), so it cannot be resumed by its id; start it again with "
            f"dn.start(workflow, ..., run_id={rec.run_id!r})"
        )
    return call_of(wf, _codecs.decode(rec.args, runtime.store.signer))


runtime.resume_run = resume
