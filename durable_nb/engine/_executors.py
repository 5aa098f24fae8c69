"""Where a map's items and ``@effect(executor=...)`` calls execute: any
``concurrent.futures.Executor`` (a ``ProcessPoolExecutor``, a thread pool), or a Dask
cluster through its ``distributed.Client`` (or ``client.get_executor()``), used first-class:
items go out in tasks of one or several items with Dask's own ``client.map``, come back
through Dask futures, and the results of every task that finished meanwhile are fetched
with one ``client.gather``.

Workers never see the store: they run the function (wrapped in :func:`timed_batch` or
:func:`timed`, which measure it and carry a trace context) and send the result back; the
notebook process journals it.
Dask is never imported here: a client is recognised by its type's module.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from ..errors import ArgumentTypeError

__all__ = [
    "Done",
    "Pool",
    "check_executor",
    "executor_name",
    "is_dask",
    "local_pool",
    "open_pool",
    "run_on",
    "set_tracing",
    "shippable",
    "timed",
    "timed_batch",
]


def _no_carrier() -> dict[str, str] | None:
    return None


#: set by ``dn.instrument`` (``durable_nb._otel``): the current trace context as a carrier
#: dict for a worker (None: tracing is off)
_carrier: list[Callable[[], dict[str, str] | None]] = [_no_carrier]


def trace_carrier() -> dict[str, str] | None:
    return _carrier[0]()


def set_tracing(carrier: Callable[[], dict[str, str] | None] | None) -> None:
    """Installed by ``dn.instrument``: items carry the step's trace context to workers."""
    _carrier[0] = carrier or _no_carrier


@contextmanager
def _in_trace(carrier: dict[str, str] | None) -> Iterator[None]:
    """On a worker: the sender's trace context is current, so spans the function opens
    nest under the step (W3C trace context, OpenTelemetry's default propagator)."""
    if not carrier:
        yield
        return
    try:
        from opentelemetry import context, propagate
    except ImportError:  # no opentelemetry on this worker: run untraced
        yield
        return
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def timed(fn: Callable[..., Any], carrier: dict[str, str] | None, /, *args: Any, **kw: Any) -> Any:
    """Runs on the worker: ``(fn(*args, **kw), seconds it took)``, under the trace context
    of the step that sent it (when tracing is on)."""
    with _in_trace(carrier):
        t0 = time.perf_counter()
        value = fn(*args, **kw)
        return value, time.perf_counter() - t0


class _ByName:
    """A module-level ``@effect`` function shipped to a worker process by its name: pickle
    cannot ship the undecorated function (its module's attribute is the decorated one), so
    the worker imports the module and calls the function behind the decoration."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj: Any = sys.modules.get(self.module) or __import__(self.module, fromlist=["_"])
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return getattr(obj, "fn", obj)(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ByName, (self.module, self.qualname))


def shippable(fn: Callable[..., Any], wrapper: object, *, dask: bool) -> Callable[..., Any]:
    """What to send to a worker for ``fn`` (the function an ``@effect`` ``wrapper`` wraps).
    Dask pickles with cloudpickle, which sends a function hidden behind its decoration by
    value; plain pickle (a ``ProcessPoolExecutor``) needs it by name."""
    if dask:
        return fn
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    qualname = getattr(fn, "__qualname__", "")
    if module is not None and "<" not in qualname:
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is wrapper:
            return _ByName(module.__name__, qualname)
    return fn


# ------------------------------------------------------------------ recognising executors
def _dask_client(executor: object) -> tuple[Any, dict[str, Any]] | None:
    """``(client, submit options)`` for a ``distributed.Client`` or its ``get_executor()``
    (whose options, such as ``resources=``, apply to every item), else None."""
    cls = type(executor)
    if not cls.__module__.startswith("distributed"):
        return None
    if cls.__name__ == "ClientExecutor":
        return executor._client, dict(getattr(executor, "_kwargs", {}))  # type: ignore[attr-defined]
    if all(hasattr(executor, a) for a in ("map", "submit", "gather", "scheduler_info")):
        return executor, {}
    return None


def check_executor(executor: object, what: str = "executor") -> object:
    """Validate an ``executor=`` argument."""
    if executor is None or isinstance(executor, concurrent.futures.Executor):
        return executor
    if _dask_client(executor) is not None:
        return executor
    raise ArgumentTypeError(
        f"{what} must be a concurrent.futures.Executor (ProcessPoolExecutor(), "
        f"ThreadPoolExecutor()) or a dask distributed.Client, got {executor!r}; for a Dask "
        "cluster pass Client(cluster) or client.get_executor()"
    )


def executor_name(executor: object) -> str:
    dask = _dask_client(executor)
    if dask is not None:
        return "distributed.Client"
    cls = type(executor)
    return f"{cls.__module__}.{cls.__qualname__}".removeprefix("concurrent.futures.")


_local: concurrent.futures.ThreadPoolExecutor | None = None
_local_lock = threading.Lock()


def local_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The executor of ``executor=None``: threads of this process."""
    global _local
    with _local_lock:
        if _local is None:
            _local = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="durable_nb-map"
            )
        return _local


# ------------------------------------------------------------------------ single calls
def run_on(executor: object, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``@effect(executor=...)``: one call on the executor, waited for here."""
    carrier = trace_carrier()
    dask = _dask_client(executor)
    if dask is not None:
        client, options = dask
        fut = client.submit(timed, fn, carrier, *args, pure=False, **options, **kwargs)
        value, _ = fut.result()
        return value
    assert isinstance(executor, concurrent.futures.Executor)
    value, _ = executor.submit(timed, fn, carrier, *args, **kwargs).result()
    return value


# --------------------------------------------------------------------------- map pools
def timed_batch(
    fn: Callable[..., Any], carrier: dict[str, str] | None, items: list[Any]
) -> list[tuple[bool, Any, float]]:
    """Runs on the worker: one task of a map, a few items (see :class:`Pool`): for each,
    ``(True, value, seconds)`` or ``(False, the exception it raised, seconds)``."""
    out: list[tuple[bool, Any, float]] = []
    clock = time.perf_counter
    with _in_trace(carrier):
        for item in items:
            t0 = clock()
            try:
                out.append((True, fn(item), clock() - t0))
            except Exception as e:
                out.append((False, e, clock() - t0))
    return out


class Done(NamedTuple):
    """An item that ended on the executor: its value, or the error it raised."""

    pos: int  # the item's position in the map
    ok: bool
    value: Any
    duration: float  # seconds the function took on the worker


#: one task: its key and its ``(index, item)`` pairs
Task = tuple[str, list[tuple[int, Any]]]


class Pool:
    """A map's tasks in flight on one executor. A task carries one item or several (the
    map's driver sizes them from the items' measured durations, so trivial items travel in
    batches and slow ones alone); each item's outcome comes back on its own."""

    name = "executor"
    threads = 1  # how many items the executor runs at once

    def submit(self, fn: Callable[..., Any], tasks: list[Task]) -> None:
        """Send tasks, each running ``fn`` on its items."""
        raise NotImplementedError

    def wait(self, timeout: float) -> tuple[int, list[Done]]:
        """``(tasks ended, their items)`` since the last call; waits up to ``timeout``."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Give up the tasks in flight."""
        raise NotImplementedError


def _drain(q: queue.SimpleQueue[Any], timeout: float) -> list[Any]:
    try:
        ended = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            ended.append(q.get_nowait())
        except queue.Empty:
            return ended


def _unpack(task: list[tuple[int, Any]], ok: bool, value: Any) -> list[Done]:
    """A task's items: its per-item outcomes, or the task's own error for each."""
    if ok and isinstance(value, list) and len(value) == len(task):
        return [Done(i, good, v, secs) for (i, _), (good, v, secs) in zip(task, value, strict=True)]
    err = value if not ok else RuntimeError(f"a map task returned {value!r}")
    return [Done(i, False, err, 0.0) for i, _ in task]


class _FuturesPool(Pool):
    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self.executor = executor
        self.name = executor_name(executor)
        self.threads = int(getattr(executor, "_max_workers", 0) or os.cpu_count() or 1)
        self.done: queue.SimpleQueue[tuple[str, concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self.futures: dict[str, tuple[list[tuple[int, Any]], concurrent.futures.Future[Any]]] = {}

    def submit(self, fn: Callable[..., Any], tasks: list[Task]) -> None:
        carrier = trace_carrier()
        put = self.done.put
        for key, task in tasks:
            try:
                fut = self.executor.submit(timed_batch, fn, carrier, [item for _, item in task])
            except Exception as e:  # a broken or shut down pool: the task's items fail
                fut = concurrent.futures.Future()
                fut.set_exception(e)
            self.futures[key] = (task, fut)
            fut.add_done_callback(functools.partial(_tag, put, key))

    def wait(self, timeout: float) -> tuple[int, list[Done]]:
        out: list[Done] = []
        ended = 0
        for key, fut in _drain(self.done, timeout):
            entry = self.futures.pop(key, None)
            if entry is None:
                continue
            ended += 1
            if fut.cancelled():
                out += _unpack(entry[0], False, concurrent.futures.CancelledError())
            elif (exc := fut.exception()) is not None:
                out += _unpack(entry[0], False, exc)
            else:
                out += _unpack(entry[0], True, fut.result())
        return ended, out

    def cancel(self) -> None:
        for _, fut in self.futures.values():
            fut.cancel()
        self.futures.clear()


def _tag(put: Callable[[Any], None], key: str, fut: concurrent.futures.Future[Any]) -> None:
    put((key, fut))


class _DaskPool(Pool):
    name = "distributed.Client"

    def __init__(self, client: Any, options: dict[str, Any]) -> None:
        self.client, self.options = client, options
        try:
            workers = client.scheduler_info().get("workers", {}).values()
            self.threads = max(1, sum(int(w.get("nthreads", 1)) for w in workers))
        except Exception:  # a client not connected yet: the submit will say so
            self.threads = 1
        self.done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.futures: dict[str, tuple[list[tuple[int, Any]], Any]] = {}

    def submit(self, fn: Callable[..., Any], tasks: list[Task]) -> None:
        # Dask's own map: one message for the batch, our keys (content hashes) for its keys
        call = functools.partial(timed_batch, fn, trace_carrier())
        futs = self.client.map(
            call,
            [[item for _, item in task] for _, task in tasks],
            key=[key for key, _ in tasks],
            **self.options,
        )
        put = self.done.put
        for (key, task), fut in zip(tasks, futs, strict=True):
            self.futures[key] = (task, fut)
            fut.add_done_callback(put)

    def wait(self, timeout: float) -> tuple[int, list[Done]]:
        out: list[Done] = []
        finished: list[tuple[list[tuple[int, Any]], Any]] = []
        ended = 0
        for fut in _drain(self.done, timeout):
            entry = self.futures.pop(fut.key, None)
            if entry is None:
                continue
            ended += 1
            if fut.status == "finished":
                finished.append(entry)
            elif fut.status == "error":
                out += _unpack(entry[0], False, fut.exception())
            else:  # cancelled: the client or the cluster went away
                out += _unpack(entry[0], False, concurrent.futures.CancelledError(fut.key))
        if finished:
            # one round trip for every result that came in meanwhile
            try:
                values = self.client.gather([f for _, f in finished])
            except Exception:  # a result lost with its worker since: one by one
                values = None
            for n, (task, fut) in enumerate(finished):
                if values is not None:
                    out += _unpack(task, True, values[n])
                    continue
                try:
                    out += _unpack(task, True, fut.result())
                except Exception as e:
                    out += _unpack(task, False, e)
        return ended, out

    def cancel(self) -> None:
        futs = [f for _, f in self.futures.values()]
        self.futures.clear()
        if futs:
            self.client.cancel(futs)


def open_pool(executor: object) -> Pool:
    dask = _dask_client(executor)
    if dask is not None:
        return _DaskPool(*dask)
    assert isinstance(executor, concurrent.futures.Executor)
    return _FuturesPool(executor)


def is_dask(executor: object) -> bool:
    return _dask_client(executor) is not None
