"""Handles on runs and steering from outside: :class:`Job`, ``signal``, ``enqueue``, ``cancel``.

A :class:`Job` is how a caller holds a run — wait for it, signal it, cancel it, read its
status, custom status, key/value state and streams — whether the run executes in this
process (the driver settles the job) or elsewhere (a worker, another kernel: one watcher
thread settles it from the store). Signals, queue messages and cancellations are stored
first and then handed to the run if it executes here, so a run elsewhere or not running at
all receives them when it next polls or resumes.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import difflib
import json
import threading
import time
import uuid as _uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from .. import _codecs
from .._journal import (
    CANCEL_SIGNAL,
    FINAL_STATUSES,
    check_name,
    check_queue,
    check_run_id,
    check_user_signal,
    json_text,
    queue_signal,
)
from ..errors import (
    ArgumentTypeError,
    BlockingCallError,
    RunCancelledError,
    RunEndedError,
    RunLockedError,
    RunNotFoundError,
    WidgetUnavailableError,
)
from ..store import RunRecord, SignalRecord
from ._kv import check_kv_key, kv_snapshot, kv_value
from ._retry import check_timeout
from ._runtime import running_loop, runtime
from ._streams import StreamReader

if TYPE_CHECKING:
    from ._state import RunState
    from ._workflow import Workflow

__all__ = [
    "Job",
    "cancel",
    "enqueue",
    "get_job",
    "outcome_of_record",
    "reject",
    "resolve",
    "send_time",
    "set_widget_factory",
    "signal",
]

R = TypeVar("R")

#: builds ``Job.widget()``: installed by the package (``durable_nb/__init__.py``), so the
#: engine never imports the widgets layer above it
_widget_factory: Callable[..., Any] | None = None


async def _wait_changed(
    changed: asyncio.Event, deadline: float | None, late: Callable[[], str]
) -> None:
    """One pause of a caller waiting on a run (``wait_kv``, ``wait_status_change``): until
    the run says something changed, at most 1 s (a run elsewhere is read again then), never
    past ``deadline`` (loop time): past it, ``TimeoutError(late())``."""
    wait = 1.0
    if deadline is not None:
        wait = min(wait, deadline - asyncio.get_running_loop().time())
        if wait <= 0:
            raise TimeoutError(late())
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(changed.wait(), wait)


def _seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def set_widget_factory(factory: Callable[..., Any] | None) -> None:
    """Install what ``Job.widget(**options)`` calls as ``factory(job, **options)``."""
    global _widget_factory
    _widget_factory = factory


class Job(Generic[R]):
    """A handle on a run: wait for it, signal it, cancel it, ask its status."""

    def __init__(self, run_id: str, workflow: Workflow[..., R] | None) -> None:
        self.run_id = run_id
        self.workflow = workflow
        self._future: concurrent.futures.Future[R] = concurrent.futures.Future()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: RunState | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lease_lost = False
        #: settled once the run's execution stored its start (or ended without): what
        #: ``ctx.start_child`` awaits, so the child's record exists when it returns
        self._opened: asyncio.Future[None] | None = None
        self._stopping = False  # interrupted here on purpose (not by a cancel of the run)

    def __repr__(self) -> str:
        return f"<durable_nb.Job run_id={self.run_id!r} status={self.status()!r}>"

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[[Job[R]], None]) -> None:
        """Call ``fn(job)`` once the run ends here (at once if it has): on the thread that
        ends it, so keep it quick; ``job.result()`` no longer blocks there."""
        if not callable(fn):
            raise ArgumentTypeError(f"fn must be callable, got {fn!r}")
        self._future.add_done_callback(lambda _f: fn(self))

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener(message)`` for each step, status change and event of this run
        while it executes in this process (on the run's loop; keep it quick). Returns a
        function that unsubscribes."""
        if not callable(listener):
            raise ArgumentTypeError(f"listener must be callable, got {listener!r}")
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def wait(self) -> R:
        """Wait for the run's result (re-raises its error with the original type)."""
        self._watch()
        # shielded: a waiter that gives up must not cancel the run's result for everyone;
        # the outcome a waiter that gave up never reads is retrieved, so asyncio stays quiet
        outcome = asyncio.wrap_future(self._future)
        outcome.add_done_callback(_seen)
        return await asyncio.shield(outcome)

    def _watch(self) -> None:
        """A run that executes elsewhere (a worker, another process) settles this job when
        the store says it ended."""
        if self._loop is None and not self._future.done():  # not started in this process
            _remote.watch(self)

    def __await__(self) -> Any:
        return self.wait().__await__()

    def result(self, timeout: float | None = None) -> R:
        """Block until the run ends and return its result. Ctrl-C stops the run cleanly and
        leaves it resumable."""
        timeout = check_timeout(timeout)
        self._watch()
        if self._loop is not None and running_loop() is self._loop and not self._future.done():
            raise BlockingCallError(
                f"job.result() would block the event loop that runs {self.run_id!r}; "
                "use `await job.wait()` here"
            )
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            if self._future.done():  # the run's own TimeoutError, not ours
                raise
            raise TimeoutError(
                f"run {self.run_id!r} did not finish within timeout={timeout:g}s"
            ) from None
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def interrupt_task(self) -> None:
        """Stop executing the run here, leaving it resumable (Ctrl-C, a worker stopping, a
        lost lease). Call on the run's loop."""
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _interrupt(self) -> None:
        loop, task = self._loop, self._task
        if loop is None or task is None or task.done():
            return
        loop.call_soon_threadsafe(self.interrupt_task)
        try:
            self._future.exception(timeout=5)
        except BaseException:
            pass

    def status(self) -> str:
        if self._state is not None and not self._future.done():
            status = self._state.run.status
            # its end is being stored, or its lease released: final once the job is settled
            # (so that ``result()`` then returns at once, also on the run's own loop)
            return "running" if status in FINAL_STATUSES else status
        if self._task is not None and not self._future.done():
            return "pending"  # started in this process, not yet executing
        rec = runtime.store.get_run(self.run_id)
        return rec.status if rec is not None else "unknown"

    def custom_status(self) -> Any:
        """The last value the run passed to ``ctx.set_status`` (or None)."""
        rec = self._state.run if self._state is not None else runtime.store.get_run(self.run_id)
        return json.loads(rec.custom_status) if rec is not None and rec.custom_status else None

    def signal(self, name: str, payload: Any = None) -> None:
        """Send the run a signal: stored durably, delivered in order, once."""
        signal(self.run_id, name, payload)

    def enqueue(self, queue: str, message: Any = None) -> None:
        """Put ``message`` (JSON data) on the run's queue ``queue`` for ``ctx.dequeue``:
        stored durably, delivered in order, once."""
        enqueue(self.run_id, queue, message)

    def kv(self) -> Mapping[str, Any]:
        """A read-only snapshot of the run's key/value state (``ctx.kv``), also while it
        runs, in this process or another."""
        return MappingProxyType(kv_snapshot(runtime.store, self.run_id))

    async def wait_kv(self, key: str, *, timeout: float | None = None) -> Any:
        """Wait until the run's key/value state holds ``key`` and return its value (at once
        if it does already). A run executing in this process wakes the waiter when it sets a
        key; for a run elsewhere the store is read once a second. Raises ``TimeoutError``
        after ``timeout`` seconds, and :class:`RunEndedError` if the run ended without it."""
        check_kv_key(key)
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener(msg: dict[str, Any]) -> None:
            if msg.get("kind") == "status" or (
                msg.get("kind") == "step" and msg.get("step") in ("kv_set", "kv_base")
            ):
                loop.call_soon_threadsafe(changed.set)

        unsubscribe = self.subscribe(listener)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                changed.clear()
                state = self._state
                if state is not None and not self.done() and key in state.kv:
                    return json.loads(state.kv[key])
                found, value = await asyncio.to_thread(kv_value, runtime.store, self.run_id, key)
                if found:
                    return value
                rec = await asyncio.to_thread(runtime.store.get_run, self.run_id)
                if rec is None and self._task is None:
                    raise RunNotFoundError(
                        f"no run {self.run_id!r} in the store {runtime.store.url!r}"
                    )
                if (
                    rec is not None
                    and rec.status in FINAL_STATUSES
                    and (self._state is None or self.done())
                ):
                    raise RunEndedError(
                        f"run {self.run_id!r} ended ({rec.status}) without setting kv key {key!r}"
                    )
                await _wait_changed(
                    changed,
                    deadline,
                    lambda: (
                        f"run {self.run_id!r} did not set kv key {key!r} within "
                        f"timeout={timeout:g}s"
                    ),
                )
        finally:
            unsubscribe()

    def resume(self, *, on: str = "here") -> Job[R]:
        """Resume this run from its history (see ``dn.resume``): a cancelled, failed or
        interrupted run replays its finished steps and executes the rest; a completed one
        returns its result. Returns the job that follows the resumed run."""
        return cast("Job[R]", runtime.resume_run(self.run_id, on=on))

    async def wait_status_change(
        self, after_version: int | None = None, *, timeout: float | None = None
    ) -> tuple[int, Any]:
        """Wait until the run publishes a custom status (``ctx.set_status``) newer than
        ``after_version`` (default: the current one) and return ``(version, value)``.

        A run executing in this process wakes the waiter at once; for a run elsewhere the
        store is polled (one small read a second, leaving a DuckDB file idle most of the
        time, so the process running the run can use it). Raises ``TimeoutError`` after
        ``timeout`` seconds, and :class:`DurableError` if the run ended without a newer
        status.
        """
        if after_version is not None and (
            not isinstance(after_version, int) or isinstance(after_version, bool)
        ):
            raise ArgumentTypeError(f"after_version must be an int or None, got {after_version!r}")
        timeout = check_timeout(timeout)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener(msg: dict[str, Any]) -> None:
            if msg.get("kind") in ("custom_status", "status"):
                loop.call_soon_threadsafe(changed.set)

        unsubscribe = self.subscribe(listener)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                changed.clear()
                version, value, status = await self._status_now()
                if after_version is None:
                    after_version = version
                elif version > after_version:
                    return version, value
                if status in FINAL_STATUSES and (self._state is None or self.done()):
                    raise RunEndedError(
                        f"run {self.run_id!r} ended ({status}) at status version {version} "
                        f"without a status newer than {after_version}; read its last status "
                        "with job.custom_status()"
                    )

                def late(newer_than: int | None = after_version) -> str:
                    return (
                        f"run {self.run_id!r} published no status newer than version "
                        f"{newer_than} within timeout={timeout:g}s"
                    )

                await _wait_changed(changed, deadline, late)
        finally:
            unsubscribe()

    async def _status_now(self) -> tuple[int, Any, str]:
        state = self._state
        if state is not None and not self.done():
            rec = state.run
        else:  # another process's run: read the store off the loop (a busy file may wait)
            found = await asyncio.to_thread(runtime.store.get_run, self.run_id)
            if found is None:
                if self._task is not None and not self.done():
                    return 0, None, "pending"  # started here, not executing yet
                raise RunNotFoundError(f"no run {self.run_id!r} in the store {runtime.store.url!r}")
            rec = found
        value = json.loads(rec.custom_status) if rec.custom_status else None
        return rec.status_version, value, rec.status

    def stream(self, name: str) -> StreamReader:
        """The run's stream ``name`` from its first chunk, then live as the run writes it:
        ``async for chunk in job.stream(name)`` (or a plain ``for`` off the run's loop). Ends
        when the stream is closed or the run has ended (see :class:`StreamReader`)."""
        return StreamReader(self, name)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run at its next await; it ends as cancelled and runs its finally blocks."""
        cancel(self.run_id, reason)

    def widget(self, **options: Any) -> Any:
        """A live trace widget of this run (a ``durable_nb.widgets.TraceWidget``; needs the
        notebook extra). ``options`` go to its constructor."""
        if _widget_factory is None:
            raise WidgetUnavailableError(
                "no widget factory is installed; import durable_nb (the package installs "
                "its trace widget) before calling job.widget()"
            )
        return _widget_factory(self, **options)


def get_job(run_id: str) -> Job[Any]:
    """A handle on an existing run, live in this process or only in the store."""
    check_run_id(run_id)
    with runtime.jobs_lock:
        job = runtime.jobs.get(run_id)
    if job is not None:
        return job
    rec = runtime.store.get_run(run_id)
    if rec is None:
        raise RunNotFoundError(
            f"no run {run_id!r} in the store {runtime.store.url!r}; list runs with "
            "`durable-nb runs`"
        )
    job = Job(run_id, None)
    outcome = outcome_of_record(rec)
    if outcome is not None:
        (resolve if outcome[0] else reject)(job._future, outcome[1])
    return job


_UNREAD: Any = object()  # a run whose record could not be read this time


class _RemoteRuns:
    """Settles the jobs of runs executing in other processes, from the store: one daemon
    thread reads each watched run's record when the store signals work (a run ending releases
    its lease, which wakes waiters) and at least every 2 s. It does not poll faster: a DuckDB
    file is shared by taking turns, and a reader that never pauses would lock the worker out."""

    def __init__(self) -> None:
        self._jobs: dict[str, list[Job[Any]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        atexit.register(self._close)

    def watch(self, job: Job[Any]) -> None:
        with self._lock:
            jobs = self._jobs.setdefault(job.run_id, [])
            if job not in jobs:
                jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="durable_nb-remote-runs", daemon=True
                )
                self._thread.start()

    def _close(self) -> None:
        # at exit, before the store closes: a thread inside a store call would crash it
        self._closing.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(5)

    def _serve(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                watched = {rid: list(jobs) for rid, jobs in self._jobs.items()}
                if not watched:
                    self._thread = None
                    return
            store = runtime.store
            try:  # one read for them all (a round trip on a remote store)
                records = store.get_runs(list(watched))
            except Exception:  # a busy or unreachable store: look again later
                records = {rid: _UNREAD for rid in watched}
            for rid, jobs in watched.items():
                if self._closing.is_set():
                    return
                rec = records.get(rid)
                if rec is _UNREAD:
                    continue
                try:
                    outcome = _final_outcome(rec) if rec is not None else None
                except Exception as e:  # undecodable here (another key, a newer codec): final
                    outcome = (False, e)
                if rec is None:
                    outcome = (False, RunNotFoundError(f"run {rid!r} was deleted from the store"))
                if outcome is None:
                    continue
                for job in jobs:
                    (resolve if outcome[0] else reject)(job._future, outcome[1])
                with self._lock:
                    self._jobs.pop(rid, None)
            with contextlib.suppress(Exception):
                store.wait_for_work(2.0)


_remote = _RemoteRuns()


def _final_outcome(rec: RunRecord) -> tuple[bool, Any] | None:
    """Like :func:`outcome_of_record`, and a failed run's error too (for a job that only
    watches the run: a failed run does not resume by itself)."""
    if rec.status == "failed" and rec.error is not None:
        return (False, _codecs.decode_error(rec.error, runtime.store.signer))
    return outcome_of_record(rec)


def resolve(fut: concurrent.futures.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def reject(fut: concurrent.futures.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def outcome_of_record(rec: RunRecord) -> tuple[bool, Any] | None:
    """A completed or cancelled run's recorded outcome; None while it can still progress."""
    if rec.status == "completed" and rec.result is not None:
        return (True, _codecs.decode(rec.result, runtime.store.signer))
    if rec.status == "cancelled":
        reason = json.loads(rec.detail or "{}").get("reason", "")
        return (
            False,
            RunCancelledError(
                f"run {rec.run_id!r} was cancelled ({reason}); resume it from its history with "
                f"dn.resume({rec.run_id!r}), or start it again with restart=True to run it afresh"
            ),
        )
    return None


_last_sent = 0.0
_send_lock = threading.Lock()


def send_time() -> float:
    """Wall time, strictly increasing within this process, so signals keep their send order
    even when sent within the clock's resolution or across a clock step backwards."""
    global _last_sent
    with _send_lock:
        _last_sent = max(time.time(), _last_sent + 1e-6)
        return _last_sent


def signal(run_id: str, name: str, payload: Any = None, *, missing_ok: bool = False) -> None:
    """Send a signal to a run (see :meth:`Job.signal`). A run id that names no run raises
    :class:`~durable_nb.errors.RunNotFoundError` (a typo would otherwise wait forever);
    ``missing_ok=True`` stores the signal for a run that will start later with that id.
    The reserved names (cancellation, queues) are refused: use :func:`cancel` and
    :func:`enqueue`."""
    check_name(name)
    check_user_signal(name)
    _send(run_id, name, payload, missing_ok=missing_ok)


def _send(run_id: str, name: str, payload: Any, *, missing_ok: bool) -> None:
    check_run_id(run_id)
    check_name(name)
    text = json_text(payload, "payload")
    with runtime.jobs_lock:
        job = runtime.jobs.get(run_id)
    if job is None and not missing_ok and runtime.store.get_run(run_id) is None:
        raise _no_run_to_signal(run_id)
    sig = SignalRecord(run_id, _uuid.uuid4().hex, name, text, send_time())
    runtime.store.add_signal(sig)
    with runtime.jobs_lock:
        job = runtime.jobs.get(run_id)
    if job is not None and job._loop is not None and job._state is not None:
        state = job._state
        job._loop.call_soon_threadsafe(state.deliver, sig)


def enqueue(run_id: str, queue: str, message: Any = None, *, missing_ok: bool = False) -> None:
    """Put ``message`` (JSON data) on queue ``queue`` of run ``run_id`` (see
    :meth:`Context.dequeue`); the run need not be executing, but must exist unless
    ``missing_ok=True`` (as for :func:`signal`)."""
    check_queue(queue)
    _send(run_id, queue_signal(queue), message, missing_ok=missing_ok)


def _no_run_to_signal(run_id: str) -> RunNotFoundError:
    store = runtime.store
    try:
        ids = [r.run_id for r in store.list_runs(limit=2000)]
    except Exception:  # the error is about the run id; a store hiccup must not hide it
        ids = []
    close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return RunNotFoundError(
        f"no run {run_id!r} in the store {store.url!r} to signal{hint}; check the run id "
        "(`durable-nb runs` lists them), or pass missing_ok=True to keep the signal for a run "
        "that starts later with this id"
    )


def cancel(run_id: str, reason: str = "cancelled") -> None:
    """Cancel a run, wherever it executes; a run no process executes is marked at once."""
    if not isinstance(reason, str):
        raise ArgumentTypeError(f"reason must be a str, got {reason!r}")
    with runtime.jobs_lock:
        live = runtime.jobs.get(run_id)
    if live is None:
        rec = runtime.store.get_run(run_id)
        if rec is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store {runtime.store.url!r}")
        if rec.status in FINAL_STATUSES:
            return
    _send(run_id, CANCEL_SIGNAL, reason, missing_ok=False)
    if live is None:
        try:
            lease = runtime.store.acquire_run(run_id, runtime.owner)
        except RunLockedError:
            return  # another process runs it and will see the signal
        try:
            rec = runtime.store.get_run(run_id)
            if rec is not None and rec.status not in FINAL_STATUSES:
                rec.status = "cancelled"
                rec.detail = json.dumps({"reason": reason})
                rec.updated_at = time.time()
                runtime.store.put_run(rec)
        finally:
            lease.release()
