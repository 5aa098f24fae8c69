"""Starting runs: ``dn.start`` (a :class:`~._jobs.Job` at once), ``dn.run`` (its result),
and ``dn.start(..., on="worker")``, which queues a run in the store for a worker instead of
executing it here.
"""

from __future__ import annotations

from typing import Any, ParamSpec, TypeVar

from .. import _codecs
from .._journal import check_run_id
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    RunLockedError,
    UnstorableValueError,
    WorkflowVersionError,
)
from ..store import RunLease, RunRecord
from ._driver import check_same_workflow, start_run
from ._jobs import Job
from ._runtime import current_scope, running_loop, runtime
from ._state import RunState
from ._workflow import Workflow, for_run, newest, version_of

__all__ = ["run", "start"]

P = ParamSpec("P")
R = TypeVar("R")


def start(
    workflow: Workflow[P, R],
    /,
    *args: Any,
    run_id: str | None = None,
    restart: bool = False,
    on: str = "here",
    version: str | None = None,
    **kwargs: Any,
) -> Job[R]:
    """Start (or resume) a run and return its :class:`Job` at once.

    The run id is ``run_id`` or derived from the workflow's name and arguments; it belongs
    to one workflow (a run of another workflow under that id raises
    :class:`~durable_nb.errors.RunConflictError`). Starting a run that completed returns its
    recorded result without executing anything; a failed or interrupted run resumes.
    ``restart=True`` forgets the run's history first.

    ``on="worker"`` does not execute the run here: it is queued in the store for a worker
    (``durable-nb worker``) that knows the workflow; the Job follows it through the store.
    ``version`` starts a new run on that version of a versioned workflow instead of the
    newest (it must be defined in this process, and a worker's).
    """
    if on == "worker":
        return _queue_for_worker(
            workflow, args, kwargs, run_id=run_id, restart=bool(restart), version=version
        )
    if on != "here":
        raise ArgumentError(
            f"on must be 'here' (execute in this process) or 'worker' (queue it for a "
            f"worker), got {on!r}"
        )
    return start_run(workflow, args, kwargs, run_id=run_id, restart=bool(restart), version=version)


def _queue_for_worker(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None,
    restart: bool,
    version: str | None,
) -> Job[R]:
    """Queue a run for a worker: a ``queued`` record carrying its arguments. A run that is
    queued or executing somewhere is left alone; one that completed with these arguments
    and this code keeps its outcome; a failed one, or one whose arguments or code changed,
    is queued again (and resumes from its history on the worker)."""
    if not isinstance(workflow, Workflow):
        raise ArgumentTypeError(
            f"expected a @durable workflow, got {workflow!r}; decorate it with @durable"
        )
    wf = newest(workflow) if version is None else version_of(workflow, version)
    bound = wf.binder.bind(args, kwargs)
    rid = check_run_id(run_id) if run_id is not None else wf.run_id_for(*args, **kwargs)
    store = runtime.store
    try:
        payload = _codecs.encode(bound, store.signer, what="the workflow's arguments")
    except UnstorableValueError as e:
        raise UnstorableValueError(
            f"a run started on a worker needs storable arguments: {e}"
        ) from None
    # the run's lease while its record changes: no worker claims it meanwhile, and a run
    # executing somewhere is left alone (a restart of it is refused, as for a local run)
    try:
        lease: RunLease | None = store.acquire_run(rid, runtime.owner)
    except RunLockedError:
        if restart:
            raise
        lease = None
    if lease is not None:
        try:
            if restart:
                store.delete_run(rid)
            rec = store.get_run(rid)
            now = runtime.clock.time()
            if rec is not None:
                check_same_workflow(rec, wf)
                if version is not None and rec.version != version:
                    raise WorkflowVersionError(
                        f"run {rid!r} runs on version {rec.version or '(none)'!r} of workflow "
                        f"{wf.name!r}, not {version!r}; start it without version=, or afresh "
                        "with restart=True"
                    )
            if rec is None:
                store.put_run(
                    RunRecord(
                        rid, wf.name, "queued", now, now, args=payload, version=wf.version or ""
                    )
                )
            elif rec.status in ("failed", "completed") and not (
                rec.status == "completed"
                # a later generation runs on continue_as_new's arguments, not the caller's
                and (rec.generation > 0 or rec.input_hash == wf.binder.hash_bound(bound))
                and rec.code_version == for_run(wf, rec).code_version
            ):
                rec.status, rec.updated_at, rec.detail = "queued", now, ""
                if rec.generation == 0:
                    rec.args = payload
                store.put_run(rec)
        finally:
            lease.release()
    job: Job[R] = Job(rid, workflow)
    job._watch()
    return job


def run(
    workflow: Workflow[P, R],
    /,
    *args: Any,
    run_id: str | None = None,
    restart: bool = False,
    version: str | None = None,
    **kwargs: Any,
) -> R:
    """Run a workflow to completion and return its result; works in any thread, including a
    notebook cell whose thread already runs an event loop, and a sync effect running in a
    worker thread. ``run_id``, ``restart`` and ``version`` as for :func:`start`."""
    if isinstance(current_scope.get(), RunState) and running_loop() is not None:
        raise BlockingCallError(
            "dn.run() inside a run would block it; use `await ctx.child(workflow, ...)`"
        )
    return start_run(
        workflow,
        args,
        kwargs,
        run_id=run_id,
        restart=bool(restart),
        blocking=True,
        version=version,
    ).result()
