"""Workers: processes that execute the runs started for them in a shared store (guide,
"Workers and the PostgreSQL store").

``dn.start(workflow, ..., on="worker")`` writes the run as ``queued``; any worker that knows
the workflow claims it (the store guarantees one executor per run: leases that end with
their holder's process, or expire when it stops renewing them) and executes it like a local
run, so a run resumes from its history wherever it is taken over. ``durable-nb worker MODULE...`` is the command form.

On a store that routes runs (:class:`~durable_nb.store.WorkQueues`: PostgreSQL) a worker is a
*node* (``node_id``): it obeys the queues' limits, and holds up to ``max_sessions`` sessions,
whose runs execute only here while it lives and a run of theirs executed within
``session_idle_timeout`` seconds (guide, "Queues, sessions and the operations view").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal as _signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from . import _codecs
from ._journal import check_name
from .engine import (
    Job,
    Workflow,
    call_of,
    fail_unstarted,
    publish_queues,
    run_sessions,
    runtime,
    start_run,
)
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    StoreFeatureError,
    StoreLockedError,
    StoreUnavailableError,
    WorkflowNotFoundError,
)
from .store import EventRecord, Node, Route, RunLease, RunRecord, Store, WorkQueues

__all__ = ["Worker", "load_workflows"]

_log = logging.getLogger("durable_nb.worker")


def _import_target(target: str) -> ModuleType:
    """A module by dotted name, or a ``.py`` file by path."""
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise ArgumentError(
                f"module {target!r} is not a file; give a dotted module name (pkg.flows) or "
                "the path of a .py file"
            )
        name = "durable_nb_worker_" + path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ArgumentError(
                f"cannot import {target!r} as a Python file; give the path of a .py file, or "
                "a module name on PYTHONPATH"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ArgumentError(
            f"cannot import module {target!r} ({e}); check the name and that its folder is on "
            "PYTHONPATH (or give the path of the .py file)"
        ) from None


def load_workflows(targets: Iterable[Workflow[..., Any] | str]) -> dict[str, Workflow[..., Any]]:
    """Workflow name -> workflow, from workflow objects and modules (dotted names or file
    paths) whose top-level ``@durable`` workflows are collected."""
    found: dict[str, Workflow[..., Any]] = {}
    for target in targets:
        if isinstance(target, Workflow):
            found[target.name] = target
            continue
        if not isinstance(target, str):
            raise ArgumentTypeError(
                f"workflows must be @durable workflows or module names, got {target!r}"
            )
        module = _import_target(target)
        mine = [v for v in vars(module).values() if isinstance(v, Workflow)]
        if not mine:
            raise ArgumentError(
                f"module {target!r} defines no @durable workflow at top level; decorate the "
                "workflows the worker should run with @durable"
            )
        for wf in mine:
            found[wf.name] = wf
    if not found:
        raise ArgumentError("a worker needs at least one workflow or module to run")
    return found


class Worker:
    """Claims and executes runs of the given workflows from a store until stopped.

    ``concurrency`` runs execute at once (as tasks on one event loop). ``stop()`` (or SIGTERM /
    SIGINT under :meth:`run`) stops claiming; runs in progress get ``grace`` seconds to finish,
    then are interrupted: their leases are released and they stay resumable by any worker.
    """

    def __init__(
        self,
        workflows: Iterable[Workflow[..., Any] | str],
        *,
        store: Store | str | None = None,
        concurrency: int = 16,
        grace: float = 30.0,
        name: str | None = None,
        node_id: str | None = None,
        max_sessions: int | None = None,
        session_idle_timeout: float = 600.0,
    ) -> None:
        if isinstance(workflows, (str, Workflow)):
            workflows = [workflows]
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ArgumentError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not isinstance(grace, (int, float)) or isinstance(grace, bool) or grace < 0:
            raise ArgumentError(f"grace must be a number of seconds >= 0, got {grace!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ArgumentError(f"name must be a non-empty str, got {name!r}")
        if node_id is not None:
            check_name(node_id, "node_id")
        if max_sessions is not None and (
            not isinstance(max_sessions, int) or isinstance(max_sessions, bool) or max_sessions < 1
        ):
            raise ArgumentError(f"max_sessions must be an int >= 1 or None, got {max_sessions!r}")
        if (
            not isinstance(session_idle_timeout, (int, float))
            or isinstance(session_idle_timeout, bool)
            or not session_idle_timeout >= 0
        ):
            raise ArgumentError(
                f"session_idle_timeout must be a number of seconds >= 0, got "
                f"{session_idle_timeout!r}"
            )
        self.workflows = load_workflows(workflows)
        if store is not None:
            runtime.set_store(store)
        self.store = runtime.store
        self.concurrency = concurrency
        self.grace = float(grace)
        self.name = name or f"worker {socket.gethostname()} pid {os.getpid()}"
        runtime.owner = self.name
        self.node: Node | None = None
        if isinstance(self.store, WorkQueues):
            self.node = Node(
                node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                self.name,
                tuple(sorted(self.workflows)),
                max_sessions,
                float(session_idle_timeout),
            )
        elif node_id is not None or max_sessions is not None:
            raise StoreFeatureError(
                f"node_id and max_sessions need a store that routes runs to workers, and "
                f"{self.store.url!r} does not (sessions hold on the PostgreSQL store); use a "
                "postgresql:// store or leave them out"
            )
        self._stopping = threading.Event()
        self._active: dict[str, Job[Any]] = {}
        self.claimed = 0
        self.finished = 0
        self._loop: asyncio.AbstractEventLoop
        self._freed: asyncio.Event

    def __repr__(self) -> str:
        return (
            f"<durable_nb.Worker {self.name!r} workflows={sorted(self.workflows)} "
            f"active={len(self._active)}>"
        )

    def stop(self) -> None:
        """Stop claiming runs; :meth:`serve` returns once the active runs finished (or the
        grace period ended and they were interrupted)."""
        self._stopping.set()

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (blocking; the ``durable-nb worker`` command)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (_signal.SIGTERM, _signal.SIGINT):
                _signal.signal(sig, lambda *_: self.stop())
        asyncio.run(self.serve())

    async def serve(self) -> None:
        """Claim and execute runs until :meth:`stop`."""
        names = sorted(self.workflows)
        loop = asyncio.get_running_loop()
        self._loop = loop
        node, store = self.node, self.store
        if node is not None:  # its queues' limits, and itself, are known to the store
            assert isinstance(store, WorkQueues)
            await loop.run_in_executor(None, publish_queues, store)
            await loop.run_in_executor(None, store.register_worker, node)
        runtime.serving_loops.add(loop)  # its runs' records may be written on it directly
        try:
            await self._serve(names, loop)
        finally:
            runtime.serving_loops.discard(loop)
            if node is not None:
                assert isinstance(store, WorkQueues)
                with contextlib.suppress(Exception):  # a closed store: its session ended anyway
                    await loop.run_in_executor(None, store.unregister_worker, node.node_id)

    async def _serve(self, names: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self._freed = asyncio.Event()
        waiter: asyncio.Future[None] | None = None  # one wait_for_work call at a time
        while not self._stopping.is_set():
            while len(self._active) < self.concurrency and not self._stopping.is_set():
                try:
                    got = await loop.run_in_executor(None, self._claim, names)
                except (StoreLockedError, StoreUnavailableError) as e:
                    # a DuckDB file busy for a while, a database restarting: try again later
                    _log.warning("%s: cannot claim runs now (%s); trying again", self.name, e)
                    break
                if got is None:
                    break
                self._launch(*got)
            if self._stopping.is_set():
                break
            # woken by a queued run, a released lease, a signal, a run of ours ending (a free
            # slot), or at worst after a second (also how a stop is noticed)
            if waiter is None or waiter.done():
                waiter = loop.run_in_executor(None, self.store.wait_for_work, 1.0)
            self._freed.clear()
            freed: asyncio.Future[Any] = asyncio.ensure_future(self._freed.wait())
            ends: list[asyncio.Future[Any]] = [waiter, freed]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            freed.cancel()
        await self._drain()

    def _claim(self, names: list[str]) -> tuple[RunRecord, RunLease, Route | None] | None:
        store, node = self.store, self.node
        if node is None:
            got = store.claim_run(self.name, names)
            return None if got is None else (*got, None)
        assert isinstance(store, WorkQueues)
        claimed = store.claim_routed(node)
        if claimed is not None and claimed[2] is not None and claimed[2].session is not None:
            data = {
                "session": claimed[2].session,
                "where": "worker",
                "node_id": node.node_id,
                "worker": self.name,
                "pid": os.getpid(),
            }
            try:  # the trace says where the session pinned the run
                store.append_events(
                    [
                        EventRecord(
                            claimed[0].run_id,
                            uuid.uuid4().hex,
                            runtime.clock.time(),
                            "session",
                            json.dumps(data),
                        )
                    ]
                )
            except BaseException:
                claimed[1].release()
                raise
        return claimed

    def _launch(self, rec: RunRecord, lease: RunLease, route: Route | None) -> None:
        wf = self.workflows.get(rec.workflow)
        try:
            if wf is None:  # claim_run only returns our workflows; a store bug if not
                raise WorkflowNotFoundError(
                    f"claimed run {rec.run_id!r} of workflow {rec.workflow!r}, which this "
                    f"worker does not serve (it serves {', '.join(sorted(self.workflows))}); "
                    "this is a store bug: claim_run must return only the workflows asked for"
                )
            bound = _codecs.decode(rec.args, self.store.signer) if rec.args is not None else {}
            args, kwargs = call_of(wf, bound)
            self._launch_session(rec.run_id, route)
            job = start_run(wf, args, kwargs, run_id=rec.run_id, lease=lease)
        except Exception as e:
            # a run this worker cannot start (damaged or no longer binding arguments) fails,
            # so whoever waits on it learns why, instead of taking the worker down with it
            _log.error("%s: cannot start run %r: %s", self.name, rec.run_id, e)
            try:
                fail_unstarted(rec.run_id, e)
            finally:
                lease.release()
            return
        except BaseException:
            lease.release()
            raise
        self.claimed += 1
        self._active[rec.run_id] = job
        run_id = rec.run_id
        session = route.session if route is not None else None
        job._future.add_done_callback(lambda _f: self._done(run_id, session))

    def _launch_session(self, run_id: str, route: Route | None) -> None:
        if route is not None and route.session is not None:
            run_sessions[run_id] = route.session

    def _done(self, run_id: str, session: str | None = None) -> None:
        self._active.pop(run_id, None)
        self.finished += 1
        if session is not None:  # (its idle time started when its lease was released)
            run_sessions.pop(run_id, None)
        with contextlib.suppress(RuntimeError):  # serve() ended and closed its loop
            self._loop.call_soon_threadsafe(self._freed.set)

    async def _drain(self) -> None:
        jobs = list(self._active.values())
        if not jobs:
            return
        waits = [asyncio.wrap_future(j._future) for j in jobs]
        _, pending = await asyncio.wait(waits, timeout=self.grace)
        if pending:
            for job in list(self._active.values()):
                job.interrupt_task()  # interrupted, not cancelled: the run stays resumable
            await asyncio.wait(waits, timeout=10)
