"""Process-wide engine state: the store in use, the clock, scopes, and the engine's loop.

A *scope* is where effect records live and how occurrences are counted (guide, "How
it works"): a run's history (``run/<id>``, a ``_state.RunState``), the notebook or script
(``top/<name>``), or everything (``shared``) — the last two are :class:`TopScope`. The
current scope travels in a context variable, so tasks created under a run
(``asyncio.gather``) and worker threads (``asyncio.to_thread``) inherit it.

The runtime also holds the jobs of the runs executing in this process, and
:meth:`Runtime.start_run`: the run driver (``_driver.py``) installs itself there when the
engine is imported, so the rooms below it (workflows, the ``Context``) start runs without
importing it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

from .._journal import SHARED_SCOPE, TOP_SCOPE_PREFIX
from ..errors import (
    ArgumentTypeError,
    EngineError,
)
from ._clock import Clock, SystemClock, writes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..store import EffectRecord, EventRecord, RunLease, RunRecord, Store
    from ._jobs import Job
    from ._state import RunState
    from ._workflow import Workflow

__all__ = [
    "CancelScope",
    "Runtime",
    "TopScope",
    "Written",
    "cancel_scope",
    "cancelled",
    "current_scope",
    "durable_write",
    "off_loop",
    "runtime",
    "wait_written",
]

T = TypeVar("T")

#: four of the five parts of an effect key; the scope is the fifth
Key4 = tuple[str, str, str, int]


class Launcher(Protocol):
    """Starts (or resumes) a run on a loop of this process and returns its job: the run
    driver's ``start_run`` (see :meth:`Runtime.start_run`)."""

    def __call__(
        self,
        workflow: Workflow[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        run_id: str | None = None,
        restart: bool = False,
        parent_id: str | None = None,
        blocking: bool = False,
        lease: RunLease | None = None,
        version: str | None = None,
    ) -> Job[T]: ...


class Resumer(Protocol):
    """Resumes a stopped run by its id and returns its job: ``_resume.resume`` (see
    :meth:`Job.resume <durable_nb.engine._jobs.Job.resume>`)."""

    def __call__(self, run_id: str, *, on: str = "here") -> Job[Any]: ...


def _no_driver(*args: Any, **kwargs: Any) -> NoReturn:
    raise EngineError(
        "the run driver (durable_nb.engine._driver) is not loaded; import durable_nb.engine "
        "before starting runs"
    )


def _claimer() -> str:
    """The owner of one call's claim: calls in one process (runs of a worker, threads) must
    not count as one owner, or each would take the others' claim for its own."""
    return f"{runtime.owner} call {next(_claim_numbers)}"


_claim_numbers = itertools.count(1)


class TopScope:
    """Effects called outside any run: memoized per notebook (or script), or shared."""

    __slots__ = ("_counts", "inflight", "scope_id", "shared")
    listeners: tuple[()] = ()  # nobody watches top-level calls live (runs have listeners)

    def __init__(self, scope_id: str, *, shared: bool = False) -> None:
        self.scope_id = scope_id
        self.inflight = 0
        self.shared = shared
        self._counts: dict[tuple[str, str], int] = {}

    def next_occurrence(self, identity: str, input_hash: str) -> int:
        if self.shared:
            return 0  # shared effects are pure: one result per input, however often called
        k = (identity, input_hash)
        n = self._counts.get(k, 0)
        self._counts[k] = n + 1
        return n

    def next_seq(self) -> int:
        return -1

    def lookup(self, key4: Key4, seq: int) -> EffectRecord | None:
        return runtime.store.get_effect((self.scope_id, *key4))

    # claims of shared keys (see EffectFunction._claimed_sync): ``(record, claimer)``, and a
    # record of None means "execute it, then release_claim(key4, claimer)"
    def claim_sync(self, key4: Key4, seconds: float) -> tuple[EffectRecord | None, str]:
        claimer = _claimer()
        delay = 0.01
        while True:
            decided, rec = self._try_claim(key4, seconds, claimer)
            if decided:
                return rec, claimer
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def claim_async(self, key4: Key4, seconds: float) -> tuple[EffectRecord | None, str]:
        claimer = _claimer()
        delay = 0.01
        while True:
            decided, rec = self._try_claim(key4, seconds, claimer)
            if decided:
                return rec, claimer
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _try_claim(
        self, key4: Key4, seconds: float, claimer: str
    ) -> tuple[bool, EffectRecord | None]:
        """``(True, None)`` once claimed (execute it), ``(True, record)`` when another holder
        recorded it meanwhile (replay it), ``(False, None)`` while another holder's claim is
        live (wait)."""
        store, key = runtime.store, (self.scope_id, *key4)
        if store.claim_effect(key, claimer, seconds):
            rec = store.get_effect(key)  # recorded between our lookup and our claim?
            if rec is not None:
                store.release_effect(key, claimer)
            return True, rec
        # no read while another holds it: its record shows once it lets go (and reading a
        # DuckDB file in a loop would keep it from the holder)
        return False, None

    def release_claim(self, key4: Key4, claimer: str) -> None:
        store = runtime.store
        # the waiters read the record as soon as the claim goes: it must be visible to other
        # processes first (the DuckDB store shows another process's writes once merged)
        with contextlib.suppress(Exception):
            store.flush()
        store.release_effect((self.scope_id, *key4), claimer)

    def record(self, rec: EffectRecord, *also: EffectRecord) -> None:
        runtime.store.put_effects([rec, *also])

    async def record_async(self, rec: EffectRecord, *also: EffectRecord) -> None:
        await wait_written(durable_write(runtime.store, effects=[rec, *also]))

    def note_replay(self, rec: EffectRecord) -> None:
        return None

    def note_error(self, exc: BaseException, rec: EffectRecord) -> None:
        return None

    def check_cut(self) -> None:
        return None

    def note_cancelled(self, identity: str) -> None:
        return None

    def note_failure(
        self,
        key4: Key4,
        seq: int,
        exc: BaseException,
        started: float,
        *,
        attempt: int = 1,
        retry_in: float | None = None,
    ) -> None:
        return None

    def retry_state(self, key4: Key4) -> dict[str, Any] | None:
        return None  # retries outside a run restart with the process

    def record_retry(self, key4: Key4, seq: int, state: dict[str, Any]) -> None:
        return None

    async def caught_up(self) -> None:
        """Nothing is written behind outside a run."""

    def begin_wait(self, what: dict[str, Any]) -> None:
        return None

    def end_wait(self, what: dict[str, Any]) -> None:
        return None

    def note_start(self, key4: Key4, seq: int, detail: str) -> None:
        return None

    def reset(self) -> None:
        """Count occurrences afresh (called before each notebook cell executes)."""
        self._counts.clear()


current_scope: contextvars.ContextVar[RunState | TopScope | None] = contextvars.ContextVar(
    "durable_nb_scope", default=None
)


class CancelScope:
    """A flag telling work that its result is no longer wanted: a run was cancelled, a race
    lost, an effect attempt timed out. Scopes nest (a run, a branch of ``ctx.race``, one
    attempt of an effect); a scope is cancelled when it or any enclosing scope is.

    Worker threads cannot be stopped from outside, so an effect running in one learns of its
    cancellation only by asking (:func:`cancelled`); the flag is a plain attribute, readable
    from any thread."""

    __slots__ = ("_cancelled", "parent")

    def __init__(self, parent: CancelScope | None = None) -> None:
        self.parent = parent
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        s: CancelScope | None = self
        while s is not None:
            if s._cancelled:
                return True
            s = s.parent
        return False


cancel_scope: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar(
    "durable_nb_cancel_scope", default=None
)


def cancelled() -> bool:
    """True when the work calling it is no longer wanted: its run is being cancelled, it lost
    a ``ctx.race``, a sibling in ``ctx.all`` failed, or its attempt timed out. Works in the
    workflow body, in async effects and in sync effects running in worker threads; a
    long effect can poll it and stop early."""
    scope = cancel_scope.get()
    if scope is not None and scope.cancelled():
        return True
    loop = running_loop()
    if loop is None:
        return False
    task = asyncio.current_task(loop)
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+: a cancel is under way
    return bool(cancelling is not None and cancelling())


def _default_top_name() -> str:
    env = os.environ.get("DURABLE_NB_SCOPE")
    if env:
        return env
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return os.path.abspath(path) if path else "interactive"


class Runtime:
    """The one engine state of this process."""

    def __init__(self) -> None:
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self.clock: Clock = SystemClock()
        self.top = TopScope(TOP_SCOPE_PREFIX + _default_top_name())
        self.shared = TopScope(SHARED_SCOPE, shared=True)
        #: starts a run here (``start_run(workflow, args, kwargs, run_id=..., ...)``)
        self.start_run: Launcher = _no_driver
        #: resumes a stopped run by its id (``resume_run(run_id, on=...)``; ``_resume.py``)
        self.resume_run: Resumer = _no_driver
        self.jobs: dict[str, Job[Any]] = {}
        self.jobs_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        #: loops besides the engine's that serve runs for a long time (a worker's): a store
        #: may keep a connection on them (see ``durable_write``)
        self.serving_loops: set[asyncio.AbstractEventLoop] = set()
        self.owner = f"pid {os.getpid()}"

    # store -------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            with self._store_lock:
                if self._store is None:
                    from ..store import open_store

                    self._store = open_store()
                store = self._store
        return store

    def set_store(self, store: Store | str | os.PathLike[str] | None) -> Store:
        from ..store import Store, open_store

        if store is None or isinstance(store, (str, os.PathLike)):
            new = open_store(store)
        elif isinstance(store, Store):
            new = store
        else:
            raise ArgumentTypeError(
                f"store must be a Store, a path, ':memory:' or a postgresql:// URL, got {store!r}"
            )
        with self._store_lock:
            old, self._store = self._store, new
        if old is not None and old is not new:
            old.close()
        return new

    def set_clock(self, clock: Clock | None) -> None:
        self.clock = clock if clock is not None else SystemClock()

    def set_top_scope(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ArgumentTypeError(f"scope name must be a non-empty str, got {name!r}")
        self.top = TopScope(TOP_SCOPE_PREFIX + name)

    # loops -------------------------------------------------------------------------
    def engine_loop(self) -> asyncio.AbstractEventLoop:
        """A loop on a daemon thread, for runs started from threads without a loop of their own."""
        loop = self._loop
        if loop is not None and self._loop_thread is not None and self._loop_thread.is_alive():
            return loop
        with self._store_lock:
            if self._loop is None or self._loop_thread is None or not self._loop_thread.is_alive():
                new_loop = asyncio.new_event_loop()
                started = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(new_loop)
                    new_loop.call_soon(started.set)
                    new_loop.run_forever()

                thread = threading.Thread(target=serve, name="durable_nb-engine", daemon=True)
                thread.start()
                started.wait()
                self._loop, self._loop_thread = new_loop, thread
            return self._loop

    def in_engine_thread(self) -> bool:
        return self._loop_thread is threading.current_thread()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.engine_loop())

    def shutdown(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # at exit, a store another process holds is not our problem
                pass


runtime = Runtime()
atexit.register(runtime.shutdown)


def _interrupt_engine_runs(timeout: float = 5.0) -> None:
    """At exit, before the store closes (atexit runs this first): interrupt the runs still
    executing on the engine's loop thread (a child run left waiting, a background run), so
    they end as ``interrupted`` with their leases released, and no daemon thread is inside
    the store's native code while the interpreter finalizes (DuckDB aborts the process
    then)."""
    loop, thread = runtime._loop, runtime._loop_thread
    if loop is None or thread is None or not thread.is_alive():
        return
    with runtime.jobs_lock:
        jobs = [j for j in runtime.jobs.values() if j._loop is loop and not j.done()]
    for job in jobs:
        task = job._task
        if task is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)
    deadline = time.monotonic() + timeout
    for job in jobs:
        with contextlib.suppress(BaseException):
            job._future.exception(timeout=max(0.0, deadline - time.monotonic()))


atexit.register(_interrupt_engine_runs)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Written:
    """A write of records under way, settled on its loop once they are durable (or not);
    :func:`wait_written` awaits it. Its outcome is kept apart from the future that wakes the
    waiter, so a waiter cancelled meanwhile can wait again without losing it."""

    __slots__ = ("error", "finished", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.wake: asyncio.Future[None] = loop.create_future()
        self.finished = False
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        if self.finished:
            return
        self.finished, self.error = True, error
        if not self.wake.done():
            self.wake.set_result(None)


def durable_write(
    store: Store,
    *,
    effects: Sequence[EffectRecord] = (),
    runs: Sequence[RunRecord] = (),
    events: Sequence[EventRecord] = (),
    on_loop: bool = True,
) -> Written:
    """Hand records to the store (:meth:`~durable_nb.store.Store.submit`); the returned write
    is settled once they are durable: the loop serves other runs while a PostgreSQL store
    commits them (together with what other runs wrote meanwhile). A store that writes at once
    settles it before this returns, so awaiting it does not suspend. ``on_loop=False``: let
    the store write them as it writes blocking calls (PostgreSQL: its writer thread), in
    order with those."""
    loop = asyncio.get_running_loop()
    written = Written(loop)
    here = threading.get_ident()

    def done(error: BaseException | None) -> None:
        if threading.get_ident() == here:
            written.settle(error)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits it
                loop.call_soon_threadsafe(written.settle, error)

    mine = writer_loop(loop) if on_loop else None
    store.submit(done, effects=effects, runs=runs, events=events, loop=mine)
    return written


def writer_loop(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop | None:
    """``loop`` if the store may write on it directly: the engine's own loop lives as long
    as the process, a worker's as long as it serves; None for any other loop."""
    return loop if runtime.in_engine_thread() or loop in runtime.serving_loops else None


async def off_loop(fn: Callable[..., T], *args: Any, thread: bool = False) -> T:
    """Call the store off the loop when a call is a round trip (``Store.remote``), or
    ``thread`` says it may wait (a DuckDB file another process holds), so the other runs on
    the loop go on meanwhile; otherwise it is called right here. A fake clock's time stands
    still while the call is under way, as for a write."""
    if not (thread or runtime.store.remote):
        return fn(*args)
    writes.started()
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        writes.ended()


async def wait_written(written: Written) -> None:
    """Await a record's write as if it were synchronous. A cancellation that arrives
    meanwhile (an interrupt, a cancel, a lost race) waits for the write and is delivered again
    at the task's next await: the workflow sees the result whose record it waited for, as it
    would have had the write not suspended, so a replay takes the same branch."""
    if not written.finished:
        task = asyncio.current_task()
        deferred = False
        writes.started()  # a fake clock's time stands still until this task goes on
        try:
            while not written.finished:
                try:
                    await written.wake
                except asyncio.CancelledError:
                    deferred = True
                    uncancel = getattr(task, "uncancel", None)  # Python 3.11+: keep the count
                    if uncancel is not None:
                        uncancel()
                    if written.wake.cancelled():
                        written.wake = asyncio.get_running_loop().create_future()
        finally:
            writes.ended()
            if deferred and task is not None:
                task.cancel()
    if written.error is not None:
        raise written.error
