"""Queues, sessions and workers: what a store that routes runs to workers keeps (guide,
"Queues, sessions and the operations view").

A run started for a worker may carry a :class:`Route`: the queue it waits in (with the
queue's limits, :class:`QueueSpec`), its priority in that queue, a dedup id, and the session
that pins it to one worker. A store that coordinates workers implements :class:`WorkQueues`
(PostgreSQL); the others (memory, DuckDB) do not, and starting a routed run on them is
refused with :class:`~durable_nb.errors.StoreFeatureError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._protocol import RunLease, RunRecord

__all__ = ["DEFAULT_QUEUE", "Node", "QueueSpec", "Route", "WorkQueues"]

#: the queue of runs started without ``queue=``: no limits, arrival order
DEFAULT_QUEUE = "default"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue's limits, shared by every worker on the store: at most ``concurrency`` of its
    runs execute at once (all workers together) and ``worker_concurrency`` on one worker; at
    most ``calls`` runs start in any ``window`` seconds; ``priority`` orders its runs by
    their priority (lower first) before their arrival."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    calls: int | None = None
    window: float | None = None
    priority: bool = False

    @property
    def limited(self) -> bool:
        return (
            self.concurrency is not None
            or self.worker_concurrency is not None
            or self.calls is not None
        )


@dataclass(frozen=True, slots=True)
class Route:
    """Where a queued run goes: its queue, its priority there (lower runs first; 0 when
    the queue has no priorities), the dedup id it holds while it lives, its session."""

    queue: str = DEFAULT_QUEUE
    priority: int = 0
    dedup_id: str | None = None
    session: str | None = None

    @property
    def plain(self) -> bool:
        """Nothing to route: the default queue, no dedup id, no session."""
        return self.queue == DEFAULT_QUEUE and self.dedup_id is None and self.session is None


@dataclass(frozen=True, slots=True)
class Node:
    """A worker as the store sees it: its stable ``node_id`` (sessions belong to the node,
    so a worker restarted with the same id keeps them), the name its leases carry, the
    workflows it serves, how many sessions it may hold and how long an idle one stays."""

    node_id: str
    owner: str
    workflows: tuple[str, ...]
    max_sessions: int | None = None
    idle_timeout: float = 600.0


@runtime_checkable
class WorkQueues(Protocol):
    """A store on which queues, dedup ids and sessions hold across every worker."""

    def put_queue(self, spec: QueueSpec) -> None:
        """Create or replace a queue's limits."""
        ...

    def get_queue(self, name: str) -> QueueSpec | None: ...

    def queue_run(self, run: RunRecord, route: Route) -> None:
        """Write a queued run with its route, atomically; raise ``DuplicateRunError`` naming
        the run that holds ``route.dedup_id`` in that queue if another live run holds it."""
        ...

    def get_route(self, run_id: str) -> Route | None: ...

    def register_worker(self, node: Node) -> None:
        """Announce a worker; ``ArgumentError`` if a live worker already has its node id."""
        ...

    def unregister_worker(self, node_id: str) -> None:
        """The worker stopped: it holds its sessions no more (another worker may take them,
        or the node again when it comes back)."""
        ...

    def claim_routed(self, node: Node) -> tuple[RunRecord, RunLease, Route | None] | None:
        """As :meth:`Store.claim_run`, for a worker: the queues' limits hold, runs come in
        priority then arrival order, a run of a session goes only to the node that holds the
        session (or to this one, which then takes the session, if nobody holds it and the
        node has room). Releasing the lease of a run of a session starts the session's idle
        time."""
        ...

    def queue_depths(self) -> dict[str, Any]:
        """Queued and running runs per queue and workflow, runs per worker, sessions held."""
        ...

    def live_workers(self) -> list[dict[str, Any]]:
        """The live workers: node id, name, pid and host, workflows, sessions, runs held."""
        ...


def routes_of(rows: Sequence[tuple[Any, ...]]) -> list[Route]:
    """Routes from ``(queue, priority, dedup_id, session)`` rows."""
    return [Route(r[0], int(r[1]), r[2], r[3]) for r in rows]
