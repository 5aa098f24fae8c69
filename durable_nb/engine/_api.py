"""Starting runs: ``dn.start`` (a :class:`~._jobs.Job` at once), ``dn.run`` (its result),
and ``dn.start(..., on="worker")``, which queues a run in the store for a worker instead of
executing it here.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, ParamSpec, TypeVar

from .. import _codecs
from .._journal import check_name, check_run_id
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    RunLockedError,
    UnstorableValueError,
    WorkflowVersionError,
)
from ..store import EventRecord, Route, RunLease, RunRecord, WorkQueues
from ._driver import check_same_workflow, start_run
from ._jobs import Job
from ._queues import route_for
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
    queue: str | None = None,
    priority: int = 0,
    dedup_id: str | None = None,
    session: str | None = None,
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

    Runs started on workers may go through a queue declared with :func:`dn.queue
    <durable_nb.queue>` (``queue=``, with ``priority=`` if it has priorities), hold a dedup
    id while they live (``dedup_id=``: a second start with it is refused with
    :class:`~durable_nb.errors.DuplicateRunError` naming the run that holds it), and belong
    to a session (``session=``: every run of it executes on the worker that holds it). A run
    started here with a session executes here, and its trace says so.
    """
    if on == "worker":
        route = route_for(runtime.store, queue, priority, dedup_id, session)
        return _queue_for_worker(
            workflow,
            args,
            kwargs,
            run_id=run_id,
            restart=bool(restart),
            version=version,
            route=route,
        )
    if on != "here":
        raise ArgumentError(
            f"on must be 'here' (execute in this process) or 'worker' (queue it for a "
            f"worker), got {on!r}"
        )
    for what, value, unset in (
        ("queue", queue, None),
        ("priority", priority, 0),
        ("dedup_id", dedup_id, None),
    ):
        if value != unset:
            raise ArgumentError(
                f"{what}={value!r} applies to runs started on workers; add on='worker', or "
                f"leave {what} out to execute the run here"
            )
    if session is not None:
        check_name(session, "session")
    job = start_run(workflow, args, kwargs, run_id=run_id, restart=bool(restart), version=version)
    if session is not None:
        _note_local_session(job.run_id, session)
    return job


def _note_local_session(run_id: str, session: str) -> None:
    """A run started here with a session: its trace says it executed here, pinned nowhere."""
    data = {
        "session": session,
        "where": "here",
        "pid": os.getpid(),
        "note": "started in this process, not on a worker: it executes here and the "
        "session pins nothing",
    }
    runtime.store.append_events(
        [EventRecord(run_id, uuid.uuid4().hex, runtime.clock.time(), "session", json.dumps(data))]
    )


def _queue_for_worker(
    workflow: Workflow[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None,
    restart: bool,
    version: str | None,
    route: Route | None = None,
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
                _put(
                    RunRecord(
                        rid, wf.name, "queued", now, now, args=payload, version=wf.version or ""
                    ),
                    route,
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
                _put(rec, route)
        finally:
            lease.release()
    job: Job[R] = Job(rid, workflow)
    job._watch()
    return job


def _put(rec: RunRecord, route: Route | None) -> None:
    store = runtime.store
    if route is None:
        store.put_run(rec)
    else:
        assert isinstance(store, WorkQueues)  # route_for checked
        store.queue_run(rec, route)


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
