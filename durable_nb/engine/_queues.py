"""Queues with flow control for runs started on workers: ``dn.queue("llm", concurrency=4,
worker_concurrency=1, rate="100/min", priority=True)``, then ``dn.start(wf, ...,
on="worker", queue="llm", priority=1, dedup_id="order-42", session="gpu-1")`` (guide,
"Queues, sessions and the operations view").

A queue is declared in the processes that start its runs (and may be in the workers'); its
limits are written to the store with the first run started on it, and every worker on the
store obeys the store's copy (the last declaration written wins). ``rate`` has the syntax and
sliding window of the effect limits (:func:`~._limits.parse_rate`). Routed runs need a store
that coordinates workers (:class:`~durable_nb.store.WorkQueues`: PostgreSQL); on the others
they are refused with :class:`~durable_nb.errors.StoreFeatureError`.
"""

from __future__ import annotations

import threading

from .._journal import check_name
from ..errors import ArgumentError, ArgumentTypeError, StoreFeatureError
from ..store import DEFAULT_QUEUE, QueueSpec, Route, Store, WorkQueues
from ._limits import parse_rate
from ._runtime import current_scope
from ._state import RunState

__all__ = ["current_session", "publish_queues", "queue", "route_for", "run_sessions"]

#: run id -> the session it executes in, for the runs a worker of this process executes
run_sessions: dict[str, str] = {}


def current_session() -> str | None:
    """The session of the run executing this code (in its workflow or an effect it calls)
    on a worker, or ``None`` (no run, or a run without a session, or one started here):
    the key under which to keep what the session's runs share in this process."""
    scope = current_scope.get()
    return run_sessions.get(scope.run_id) if isinstance(scope, RunState) else None


_lock = threading.Lock()
_declared: dict[str, QueueSpec] = {}
_published: dict[tuple[int, str], QueueSpec] = {}  # (id of the store, queue) -> spec written


def _count(value: object, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArgumentError(f"{what} must be an int >= 1 or None, got {value!r}")
    return value


def queue(
    name: str,
    *,
    concurrency: int | None = None,
    worker_concurrency: int | None = None,
    rate: str | None = None,
    priority: bool = False,
) -> QueueSpec:
    """Declare queue ``name`` for runs started on workers (``dn.start(..., on="worker",
    queue=name)``): at most ``concurrency`` of its runs execute at once on all workers of
    the store together, at most ``worker_concurrency`` on one worker, at most ``rate``
    (``"100/min"``, ``"5/s"``, ``"10/5s"``) start in any sliding window of that length, and
    with ``priority=True`` its runs start by priority (lower first; 0, the default, first of
    all) and then in arrival order. Declaring it again replaces its limits."""
    check_name(name, "queue name")
    if name == DEFAULT_QUEUE:
        raise ArgumentError(
            f"name {name!r} is the queue of runs started without queue=, which has no limits; "
            "give your queue another name"
        )
    conc = _count(concurrency, "concurrency")
    per_worker = _count(worker_concurrency, "worker_concurrency")
    if conc is not None and per_worker is not None and per_worker > conc:
        raise ArgumentError(
            f"worker_concurrency ({per_worker!r}) must not exceed concurrency ({conc!r}); "
            "lower worker_concurrency or raise concurrency"
        )
    calls, window = parse_rate(rate) if rate is not None else (None, None)
    if not isinstance(priority, bool):
        raise ArgumentTypeError(f"priority must be True or False, got {priority!r}")
    spec = QueueSpec(name, conc, per_worker, calls, window, priority)
    with _lock:
        _declared[name] = spec
    return spec


def _publish(store: Store, spec: QueueSpec) -> None:
    assert isinstance(store, WorkQueues)
    key = (id(store), spec.name)
    with _lock:
        if _published.get(key) == spec:
            return
    store.put_queue(spec)
    with _lock:
        _published[key] = spec


def publish_queues(store: Store) -> None:
    """Write every queue declared in this process to ``store`` (a worker does at start)."""
    if not isinstance(store, WorkQueues):
        return
    with _lock:
        specs = list(_declared.values())
    for spec in specs:
        _publish(store, spec)


def _routing_store(store: Store, what: str) -> WorkQueues:
    if not isinstance(store, WorkQueues):
        raise StoreFeatureError(
            f"{what} needs a store that coordinates workers, and {store.url!r} does not "
            "(queues with limits, priorities, dedup ids and sessions hold across workers on "
            "the PostgreSQL store); use a postgresql:// store (dn.set_store or "
            "DURABLE_NB_STORE), or start the run without it"
        )
    return store


def route_for(
    store: Store,
    queue: object,
    priority: object,
    dedup_id: object,
    session: object,
) -> Route | None:
    """The route of a run started on a worker with these options (checked), or ``None`` for
    a plain run; writes the queue's limits to the store if they changed."""
    name = DEFAULT_QUEUE if queue is None else check_name(queue, "queue")
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise ArgumentError(f"priority must be an int >= 0 (lower runs first), got {priority!r}")
    if dedup_id is not None:
        check_name(dedup_id, "dedup_id")
    if session is not None:
        check_name(session, "session")
    route = Route(name, priority, dedup_id, session)  # type: ignore[arg-type]
    if route.plain and priority == 0:
        return None
    what = (
        f"queue={queue!r}"
        if queue is not None
        else f"dedup_id={dedup_id!r}"
        if dedup_id is not None
        else f"session={session!r}"
        if session is not None
        else f"priority={priority!r}"
    )
    wq = _routing_store(store, what)
    if name == DEFAULT_QUEUE:
        if priority:
            raise ArgumentError(
                f"priority={priority!r} needs a queue with priorities: declare one with "
                "dn.queue(name, priority=True) and start the run with queue=name"
            )
        return route
    with _lock:
        spec = _declared.get(name)
    if spec is not None:
        _publish(store, spec)
    else:
        spec = wq.get_queue(name)
        if spec is None:
            raise ArgumentError(
                f"queue {name!r} is not declared; declare it first with dn.queue({name!r}, "
                "concurrency=..., rate=...) in this process"
            )
    if priority and not spec.priority:
        raise ArgumentError(
            f"queue {name!r} has no priorities, so priority={priority!r} would be ignored; "
            f"declare it with dn.queue({name!r}, ..., priority=True)"
        )
    return route
