"""The PostgreSQL store's queues, sessions and workers (:class:`~._queues.WorkQueues`),
and the shared limits of effects (``dn.limit``), which count in the same tables.

* **Routes.** A run queued with a queue, a priority, a dedup id or a session has a row in
  ``dn_routes`` (deleted with the run). ``queue_run`` writes the run and its route in one
  transaction; a dedup id is checked under an advisory lock of ``(queue, dedup id)``, so two
  starts racing for one id cannot both pass.
* **Claims.** One transaction per claim: the advisory locks of the queues that have limits
  (always taken in name order), then their figures — runs holding a live lease (all, and
  this worker's) against ``concurrency`` / ``worker_concurrency``, starts in the sliding
  window against the rate, counted in ``dn_limit_starts`` as the effect limits do, by the
  database's clock — then the oldest run of the highest priority (lower first) outside the
  full queues, ``FOR UPDATE SKIP LOCKED``, then its lease, its start and its session.
* **Sessions** belong to a worker's node id (``dn_sessions``). A node holds a session while
  its worker lives (``dn_workers.token`` carries the store's liveness-session key, as leases
  do) and a run of the session executes or ended less than the node's idle timeout ago (a
  released lease stamps its run's session: ``release`` in ``_pg_schema``). A
  run of a session another live node holds is left to that node; a run of a free session is
  taken by a node that has room (``max_sessions``), under the session's advisory lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from .._journal import FINAL_STATUSES
from ..errors import ArgumentError, DuplicateRunError
from ._base import StoreBase
from ._pg_schema import CLAIMABLE
from ._pg_session import gone
from ._protocol import RunLease, RunRecord
from ._queues import DEFAULT_QUEUE, Node, QueueSpec, Route

__all__ = ["PgQueues", "queue_statements"]

_T = TypeVar("_T")
_Conn = psycopg.Connection[tuple[Any, ...]]
_BATCH = 8  # candidates locked per claim attempt
_RATE_PREFIX = "queue/"  # a queue's starts in dn_limit_starts: "queue/<name>"


def queue_statements(schema: str) -> dict[str, str]:
    """The statements of queues, routes, workers and sessions for ``schema`` (validated)."""
    q = _statements(schema)
    # arrival order alone while no queue has priorities: the claimable-runs index serves it
    q["candidates_fifo"] = q["candidates"].replace("{order}", "")
    q["candidates"] = q["candidates"].replace("{order}", "coalesce(t.priority, 0),")
    return q


def _statements(schema: str) -> dict[str, str]:
    s = sql.Identifier(schema).as_string()
    live_lease = f"SELECT 1 FROM {s}.dn_leases l WHERE l.run_id = {{}} AND l.expires_at > now()"
    live_worker = f"(w.node_id IS NOT NULL AND w.stopped_at IS NULL AND NOT {gone('w.token')})"
    # a session some run of which executes now
    busy = (
        f"EXISTS (SELECT 1 FROM {s}.dn_routes b JOIN {s}.dn_leases bl ON bl.run_id = b.run_id "
        "WHERE b.session = x.session AND bl.expires_at > now())"
    )
    # session x is held by its node: the node's worker lives and the session is not idle
    held = f"{live_worker} AND (x.used_at > now() - make_interval(secs => w.idle_s) OR {busy})"
    final = "(" + ", ".join(f"'{f}'" for f in FINAL_STATUSES) + ")"
    return {
        "put_queue": f"INSERT INTO {s}.dn_queues AS q VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (name) DO UPDATE SET concurrency = EXCLUDED.concurrency, "
        "worker_concurrency = EXCLUDED.worker_concurrency, calls = EXCLUDED.calls, "
        "window_s = EXCLUDED.window_s, priority = EXCLUDED.priority",
        "get_queue": f"SELECT name, concurrency, worker_concurrency, calls, window_s, priority "
        f"FROM {s}.dn_queues WHERE name = %s",
        "queues": f"SELECT name, concurrency, worker_concurrency, calls, window_s, priority "
        f"FROM {s}.dn_queues ORDER BY name",
        # the database's clock and the queues, in one round trip
        "clock_queues": "SELECT extract(epoch FROM clock_timestamp()), q.name, q.concurrency, "
        "q.worker_concurrency, q.calls, q.window_s, q.priority FROM (SELECT 1) AS one "
        f"LEFT JOIN {s}.dn_queues q ON true ORDER BY q.name",
        "lock": "SELECT pg_advisory_xact_lock(hashtextextended(%s, 2))",
        "clock": "SELECT extract(epoch FROM clock_timestamp())",
        "dedup_holder": f"SELECT t.run_id, r.status FROM {s}.dn_routes t "
        f"JOIN {s}.dn_runs r ON r.run_id = t.run_id WHERE t.queue = %s AND t.dedup_id = %s "
        f"AND t.run_id <> %s AND r.status NOT IN {final} LIMIT 1",
        "put_route": f"INSERT INTO {s}.dn_routes VALUES (%s, %s, %s, %s, %s, "
        "extract(epoch FROM clock_timestamp()), NULL) ON CONFLICT (run_id) DO UPDATE SET "
        "queue = EXCLUDED.queue, priority = EXCLUDED.priority, dedup_id = EXCLUDED.dedup_id, "
        "session = EXCLUDED.session, enqueued_at = EXCLUDED.enqueued_at, claimed_at = NULL",
        "get_route": f"SELECT queue, priority, dedup_id, session FROM {s}.dn_routes "
        "WHERE run_id = %s",
        # runs of the limited queues that hold a live lease: all, and this worker's
        "running": f"SELECT t.queue, count(*), count(*) FILTER (WHERE l.owner = %s) "
        f"FROM {s}.dn_routes t JOIN {s}.dn_leases l ON l.run_id = t.run_id "
        "WHERE l.expires_at > now() AND t.queue = ANY(%s) GROUP BY t.queue",
        "forget_starts": f"DELETE FROM {s}.dn_limit_starts WHERE name = %s AND at <= %s",
        "starts": f"SELECT count(*) FROM {s}.dn_limit_starts WHERE name = %s",
        "start": f"INSERT INTO {s}.dn_limit_starts VALUES (%s, %s)",
        "worker_seen": f"UPDATE {s}.dn_workers SET token = %s, seen_at = now(), "
        "stopped_at = NULL WHERE node_id = %s",
        # this node's sessions that went idle (no run of theirs executes, none for a while)
        # end; how many it holds then
        "drop_idle": f"WITH d AS (DELETE FROM {s}.dn_sessions x WHERE x.node_id = %(node)s "
        f"AND x.used_at <= now() - make_interval(secs => %(idle)s) AND NOT {busy} "
        f"RETURNING x.session) SELECT count(*) FROM {s}.dn_sessions x "
        "WHERE x.node_id = %(node)s AND x.session NOT IN (SELECT session FROM d)",
        "candidates": f"SELECT r.run_id, coalesce(t.queue, '{DEFAULT_QUEUE}'), "
        "coalesce(t.priority, 0), t.dedup_id, t.session "
        f"FROM {s}.dn_runs r LEFT JOIN {s}.dn_routes t ON t.run_id = r.run_id "
        f"WHERE r.status IN {CLAIMABLE} AND r.workflow = ANY(%(names)s) "
        f"AND NOT EXISTS ({live_lease.format('r.run_id')}) "
        "AND (t.queue IS NULL OR NOT (t.queue = ANY(%(blocked)s))) "
        "AND (t.session IS NULL OR (%(node)s::text IS NOT NULL AND ("
        f"EXISTS (SELECT 1 FROM {s}.dn_sessions x WHERE x.session = t.session "
        "AND x.node_id = %(node)s) OR (NOT %(full)s AND NOT EXISTS ("
        f"SELECT 1 FROM {s}.dn_sessions x JOIN {s}.dn_workers w ON w.node_id = x.node_id "
        f"WHERE x.session = t.session AND x.node_id <> %(node)s AND {held}))))) "
        "ORDER BY {order} r.created_at, r.run_id LIMIT %(batch)s FOR UPDATE OF r SKIP LOCKED",
        # who holds the session now (re-read under the session's lock)
        "session_holder": f"SELECT x.node_id, (x.node_id = %(node)s OR ({held})) "
        f"FROM {s}.dn_sessions x LEFT JOIN {s}.dn_workers w ON w.node_id = x.node_id "
        "WHERE x.session = %(session)s",
        "take_session": f"INSERT INTO {s}.dn_sessions AS x VALUES (%s, %s, now(), now(), 0) "
        "ON CONFLICT (session) DO UPDATE SET node_id = EXCLUDED.node_id, used_at = now(), "
        "taken_at = CASE WHEN x.node_id = EXCLUDED.node_id THEN x.taken_at ELSE now() END, "
        "moves = x.moves + CASE WHEN x.node_id = EXCLUDED.node_id THEN 0 ELSE 1 END",
        "claimed": f"UPDATE {s}.dn_routes SET claimed_at = %s WHERE run_id = %s",
        "worker": f"SELECT owner, holder, {live_worker} FROM {s}.dn_workers w WHERE node_id = %s",
        "put_worker": f"INSERT INTO {s}.dn_workers VALUES (%s, %s, %s, %s, %s, %s, %s, now(), "
        "now(), NULL) ON CONFLICT (node_id) DO UPDATE SET owner = EXCLUDED.owner, "
        "token = EXCLUDED.token, holder = EXCLUDED.holder, workflows = EXCLUDED.workflows, "
        "max_sessions = EXCLUDED.max_sessions, idle_s = EXCLUDED.idle_s, "
        "started_at = now(), seen_at = now(), stopped_at = NULL",
        "stop_worker": f"UPDATE {s}.dn_workers SET stopped_at = now() WHERE node_id = %s",
        "live_workers": "SELECT w.node_id, w.owner, w.holder, w.workflows, w.max_sessions, "
        "w.idle_s, extract(epoch FROM w.started_at), "
        f"(SELECT count(*) FROM {s}.dn_leases l WHERE l.owner = w.owner "
        "AND l.expires_at > now()), "
        f"ARRAY(SELECT x.session FROM {s}.dn_sessions x WHERE x.node_id = w.node_id "
        f"AND ({held}) ORDER BY x.session) "
        f"FROM {s}.dn_workers w WHERE {live_worker} ORDER BY w.node_id",
        "depths": f"SELECT coalesce(t.queue, '{DEFAULT_QUEUE}'), r.workflow, "
        f"count(*) FILTER (WHERE NOT EXISTS ({live_lease.format('r.run_id')})), "
        f"count(*) FILTER (WHERE EXISTS ({live_lease.format('r.run_id')})) "
        f"FROM {s}.dn_runs r LEFT JOIN {s}.dn_routes t ON t.run_id = r.run_id "
        f"WHERE r.status IN {CLAIMABLE} GROUP BY 1, 2 ORDER BY 1, 2",
        "sessions": "SELECT x.session, x.node_id, extract(epoch FROM x.taken_at), "
        f"extract(epoch FROM x.used_at), x.moves, coalesce({held}, false) "
        f"FROM {s}.dn_sessions x LEFT JOIN {s}.dn_workers w ON w.node_id = x.node_id "
        "ORDER BY x.session",
    }


def _spec(row: Sequence[Any]) -> QueueSpec:
    return QueueSpec(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


class PgQueues(StoreBase):
    """What :class:`~._postgres.PostgresStore` does for queues, sessions and workers (it
    inherits this class, with :class:`~._base.StoreBase`'s checked public calls, and
    provides the connection, lease and record helpers below)."""

    _qq: dict[str, str]
    _seen_keys: dict[str, str]  # node id -> the liveness-session key its worker row names
    _q: dict[str, str]
    _channel: str
    _lease_seconds: float
    _schema: str

    # provided by the store ---------------------------------------------------------------
    def _call(self, fn: Callable[[Any], _T]) -> _T:
        raise NotImplementedError

    def _token(self) -> str:
        raise NotImplementedError

    def _holder_info(self) -> str:
        raise NotImplementedError

    def _lease(self, run_id: str, owner: str, token: str) -> RunLease | None:
        raise NotImplementedError

    def _condemn_dead(self) -> bool:
        """Cut the leases of holders whose session ended to the grace; whether there were."""
        raise NotImplementedError

    def _run_row(self, run: RunRecord) -> tuple[Any, ...]:
        raise NotImplementedError

    def _run_from_row(self, r: Sequence[Any]) -> RunRecord:
        raise NotImplementedError

    # shared limits (``dn.limit``: effects' rate and concurrency limits) ------------------
    def limit_take(
        self,
        name: str,
        slot: str,
        concurrency: int | None,
        calls: int | None,
        window: float | None,
        hold: float,
    ) -> float | None:
        s = sql.Identifier(self._schema)

        def take(conn: _Conn) -> float | None:
            with conn.transaction():
                # one taker per limit name at a time, in every process: count, then insert
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))",
                    ["durable_nb limit " + name],
                )
                row = conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()
                now = float(row[0]) if row else 0.0
                if concurrency is not None:
                    conn.execute(
                        sql.SQL(
                            "DELETE FROM {}.dn_limit_slots WHERE name = %s "
                            "AND expires_at <= clock_timestamp()"
                        ).format(s),
                        [name],
                    )
                    held = conn.execute(
                        sql.SQL("SELECT count(*) FROM {}.dn_limit_slots WHERE name = %s").format(s),
                        [name],
                    ).fetchone()
                    if held is not None and int(held[0]) >= concurrency:
                        return 0.0
                if calls is not None and window is not None:
                    conn.execute(
                        sql.SQL(
                            "DELETE FROM {}.dn_limit_starts WHERE name = %s AND at <= %s"
                        ).format(s),
                        [name, now - window],
                    )
                    got = conn.execute(
                        sql.SQL(
                            "SELECT count(*), min(at) FROM {}.dn_limit_starts WHERE name = %s"
                        ).format(s),
                        [name],
                    ).fetchone()
                    if got is not None and int(got[0]) >= calls:
                        return max(float(got[1]) + window - now, 1e-3)
                    conn.execute(
                        sql.SQL("INSERT INTO {}.dn_limit_starts VALUES (%s, %s)").format(s),
                        [name, now],
                    )
                if concurrency is not None:
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {}.dn_limit_slots VALUES "
                            "(%s, %s, clock_timestamp() + make_interval(secs => %s))"
                        ).format(s),
                        [name, slot, float(hold)],
                    )
                return None

        return self._call(take)

    def limit_give(self, name: str, slot: str) -> None:
        q = sql.SQL("DELETE FROM {}.dn_limit_slots WHERE name = %s AND slot = %s").format(
            sql.Identifier(self._schema)
        )
        self._call(lambda conn: conn.execute(q, [name, slot]))

    # queues ------------------------------------------------------------------------------
    def put_queue(self, spec: QueueSpec) -> None:
        q = self._qq["put_queue"]
        params = (
            spec.name,
            spec.concurrency,
            spec.worker_concurrency,
            spec.calls,
            spec.window,
            spec.priority,
        )
        self._call(lambda conn: conn.execute(q, params))

    def get_queue(self, name: str) -> QueueSpec | None:
        q = self._qq["get_queue"]
        row = self._call(lambda conn: conn.execute(q, [name]).fetchone())
        return _spec(row) if row is not None else None

    def queue_run(self, run: RunRecord, route: Route) -> None:
        qq, put_run = self._qq, self._q["put_run"]
        run_params = (*self._run_row(run), self._channel)

        def write(conn: Any) -> None:
            with conn.transaction():
                if route.dedup_id is not None:
                    conn.execute(
                        qq["lock"],
                        ["durable_nb dedup " + json.dumps([route.queue, route.dedup_id])],
                    )
                    row = conn.execute(
                        qq["dedup_holder"], [route.queue, route.dedup_id, run.run_id]
                    ).fetchone()
                    if row is not None:
                        raise DuplicateRunError(
                            f"dedup_id {route.dedup_id!r} is held by run {row[0]!r} "
                            f"({row[1]}) in queue {route.queue!r}; wait for that run to end "
                            f"(`durable-nb show {row[0]}`), cancel it, or give another "
                            "dedup_id"
                        )
                conn.execute(put_run, run_params)
                conn.execute(
                    qq["put_route"],
                    [run.run_id, route.queue, route.priority, route.dedup_id, route.session],
                )

        self._call(write)

    def get_route(self, run_id: str) -> Route | None:
        q = self._qq["get_route"]
        row = self._call(lambda conn: conn.execute(q, [run_id]).fetchone())
        return Route(row[0], int(row[1]), row[2], row[3]) if row is not None else None

    # workers -----------------------------------------------------------------------------
    def register_worker(self, node: Node) -> None:
        qq = self._qq
        token = self._token()
        params = (
            node.node_id,
            node.owner,
            token,
            self._holder_info(),
            json.dumps(list(node.workflows)),
            node.max_sessions,
            node.idle_timeout,
        )

        def register(conn: Any) -> None:
            with conn.transaction():
                conn.execute(qq["lock"], ["durable_nb node " + node.node_id])
                row = conn.execute(qq["worker"], [node.node_id]).fetchone()
                if row is not None and row[2] and row[0] != node.owner:
                    try:
                        info = json.loads(row[1])
                    except ValueError:
                        info = {}
                    raise ArgumentError(
                        f"node_id {node.node_id!r} is in use by the live worker {row[0]!r} "
                        f"(process {info.get('pid', '?')} on {info.get('host', '?')}); give "
                        "each worker its own node id, or stop that worker first"
                    )
                conn.execute(qq["put_worker"], params)

        self._call(register)
        self._seen_keys[node.node_id] = token.partition(".")[0]

    def unregister_worker(self, node_id: str) -> None:
        q = self._qq["stop_worker"]
        self._call(lambda conn: conn.execute(q, [node_id]))

    def live_workers(self) -> list[dict[str, Any]]:
        q = self._qq["live_workers"]
        rows = self._call(lambda conn: conn.execute(q).fetchall())
        out = []
        for node_id, owner, holder, flows, max_s, idle, started, running, sessions in rows:
            try:
                info = json.loads(holder)
            except ValueError:
                info = {}
            out.append(
                {
                    "node_id": node_id,
                    "name": owner,
                    "pid": info.get("pid"),
                    "host": info.get("host"),
                    "workflows": json.loads(flows),
                    "max_sessions": max_s,
                    "session_idle_timeout": idle,
                    "started_at": float(started),
                    "running": int(running),
                    "sessions": list(sessions),
                }
            )
        return out

    def queue_depths(self) -> dict[str, Any]:
        qq = self._qq

        def read(conn: Any) -> tuple[list[Any], list[Any], list[Any]]:
            return (
                conn.execute(qq["depths"]).fetchall(),
                conn.execute(qq["queues"]).fetchall(),
                conn.execute(qq["sessions"]).fetchall(),
            )

        depths, specs, sessions = self._call(read)
        queues: dict[str, dict[str, Any]] = {}
        for row in specs:
            spec = _spec(row)
            queues[spec.name] = {"queued": 0, "running": 0, "by_workflow": {}, "limits": spec}
        for queue, workflow, queued, running in depths:
            d = queues.setdefault(
                queue, {"queued": 0, "running": 0, "by_workflow": {}, "limits": None}
            )
            d["queued"] += int(queued)
            d["running"] += int(running)
            d["by_workflow"][workflow] = {"queued": int(queued), "running": int(running)}
        for d in queues.values():
            spec = d["limits"]
            d["limits"] = None if spec is None else _limits(spec)
        workers = self.live_workers()
        return {
            "queues": queues,
            "workers": {w["node_id"]: w for w in workers},
            "sessions": {
                r[0]: {
                    "node_id": r[1],
                    "taken_at": float(r[2]),
                    "used_at": float(r[3]),
                    "moves": int(r[4]),
                    "held": bool(r[5]),
                }
                for r in sessions
            },
        }

    # claims ------------------------------------------------------------------------------
    def claim_routed(self, node: Node) -> tuple[RunRecord, RunLease, Route | None] | None:
        return self._claim(node.owner, node.workflows, node)

    def _claim(
        self, owner: str, workflows: Sequence[str], node: Node | None
    ) -> tuple[RunRecord, RunLease, Route | None] | None:
        names = list(workflows)
        if not names:
            return None
        holder = self._holder_info()
        for attempt in range(2):
            token = self._token()

            def claim(conn: Any, token: str = token) -> tuple[RunRecord, Route | None] | None:
                try:
                    with conn.transaction():
                        return self._claim_in(conn, owner, names, node, token, holder)
                except BaseException:
                    if node is not None:  # the worker row may not have been written
                        self._seen_keys.pop(node.node_id, None)
                    raise

            got = self._call(claim)
            if got is not None:
                run, route = got
                lease = self._lease(run.run_id, owner, token)
                return None if lease is None else (run, lease, route)
            if attempt or not self._condemn_dead():
                return None
        return None

    def _claim_in(
        self,
        conn: Any,
        owner: str,
        names: list[str],
        node: Node | None,
        token: str,
        holder: str,
    ) -> tuple[RunRecord, Route | None] | None:
        qq, q = self._qq, self._q
        rows = conn.execute(qq["clock_queues"]).fetchall()
        now = float(rows[0][0])
        # flow control: the limited queues, locked in name order, then their figures
        queues = [_spec(r[1:]) for r in rows if r[1] is not None]
        specs = [spec for spec in queues if spec.limited]
        ordered = "candidates" if any(spec.priority for spec in queues) else "candidates_fifo"
        blocked: list[str] = []
        rated: set[str] = set()
        if specs:
            for spec in specs:
                conn.execute(qq["lock"], ["durable_nb queue " + spec.name])
            # the time of this claim, read holding the queues' locks: claims of a queue are
            # stamped in the order they count its window. With the time read before the
            # locks, a claimer that waited for them counted a window another claimer, later
            # by the clock but first to the locks, had already pruned: 101 starts in a second
            # of a queue limited to 100 (test_queue_limits_hold_across_workers_under_500_runs)
            row = conn.execute(qq["clock"]).fetchone()
            assert row is not None
            now = float(row[0])
            running = {
                r[0]: (int(r[1]), int(r[2]))
                for r in conn.execute(qq["running"], [owner, [s.name for s in specs]]).fetchall()
            }
            for spec in specs:
                all_, mine = running.get(spec.name, (0, 0))
                if (spec.concurrency is not None and all_ >= spec.concurrency) or (
                    spec.worker_concurrency is not None and mine >= spec.worker_concurrency
                ):
                    blocked.append(spec.name)
                    continue
                if spec.calls is not None and spec.window is not None:
                    name = _RATE_PREFIX + spec.name
                    conn.execute(qq["forget_starts"], [name, now - spec.window])
                    started = conn.execute(qq["starts"], [name]).fetchone()
                    if started is not None and int(started[0]) >= spec.calls:
                        blocked.append(spec.name)
                        continue
                    rated.add(spec.name)
        # sessions: this node's idle ones end; is it full?
        full = False
        if node is not None:
            key = token.partition(".")[0]
            if self._seen_keys.get(node.node_id) != key:  # our liveness session changed
                conn.execute(qq["worker_seen"], [token, node.node_id])
                self._seen_keys[node.node_id] = key
            if node.max_sessions is not None:
                held = conn.execute(
                    qq["drop_idle"], {"node": node.node_id, "idle": node.idle_timeout}
                ).fetchone()
                full = held is not None and int(held[0]) >= node.max_sessions
        params = {
            "names": names,
            "blocked": blocked,
            "node": node.node_id if node is not None else None,
            "full": full,
            "batch": _BATCH,
        }
        for run_id, queue, priority, dedup_id, session in conn.execute(
            qq[ordered], params
        ).fetchall():
            if session is not None and node is not None:
                conn.execute(qq["lock"], ["durable_nb session " + session])
                held = conn.execute(
                    qq["session_holder"], {"node": node.node_id, "session": session}
                ).fetchone()
                ours = held is not None and held[0] == node.node_id
                if held is not None and held[1] and not ours:
                    continue  # another live node took it since we looked
                if not ours and full:
                    continue
            got = conn.execute(
                q["acquire"], [run_id, token, owner, holder, self._lease_seconds]
            ).fetchone()
            if got is None:
                continue
            if queue in rated:
                conn.execute(qq["start"], [_RATE_PREFIX + queue, now])
            if session is not None and node is not None:
                conn.execute(qq["take_session"], [session, node.node_id])
            route = Route(queue, int(priority), dedup_id, session)
            if not route.plain:  # only routed runs have a route row
                conn.execute(qq["claimed"], [now, run_id])
            rec = conn.execute(q["get_run"], [run_id], binary=True).fetchone()
            assert rec is not None  # locked by us: it cannot have gone
            return self._run_from_row(rec), (None if route.plain else route)
        return None


def _limits(spec: QueueSpec) -> dict[str, Any]:
    return {
        "concurrency": spec.concurrency,
        "worker_concurrency": spec.worker_concurrency,
        "rate": None if spec.calls is None else f"{spec.calls}/{spec.window:g}s",
        "priority": spec.priority,
    }
