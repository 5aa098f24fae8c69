"""The PostgreSQL store's schema: its tables (as named, ordered migrations), every
statement it runs, written once, and how a payload maps to its columns.

Every value reaches SQL as a parameter; the schema name, the only identifier that varies, is
validated by the store and quoted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from psycopg import sql

from .._arrow_ipc import ipc_bytes, read_ipc
from ._migrations import Bookkeeping, Migration, Migrations
from ._pg_session import gone

if TYPE_CHECKING:
    from .._codecs import Payload

__all__ = [
    "BOOKKEEPING",
    "CLAIMABLE",
    "EFFECT_COLS",
    "EFFECT_KEY_COLS",
    "MIGRATIONS",
    "RUN_COLS",
    "SCHEMA_VERSION",
    "ipc_of",
    "payload_of",
    "statements",
]


def payload_of(codec: str | None, data: bytes | None, table_ipc: bytes | None) -> Payload | None:
    """A payload read back (``_rows.ReadPayload``): its table was kept as an IPC stream."""
    from .._codecs import Payload

    if codec is None:
        return None
    table = read_ipc(table_ipc) if table_ipc is not None else None
    return Payload(codec, data if data is not None else b"", table)


def ipc_of(p: Payload | None) -> bytes | None:
    """The IPC stream a payload's table is kept as (its table_ipc column)."""
    return ipc_bytes(p.table) if p is not None and p.table is not None else None


# fmt: off
EFFECT_COLS = (
    "scope", "identity", "version", "input_hash", "occurrence", "codec", "data", "table_ipc",
    "is_error", "kind", "seq", "started_at", "duration", "detail",
)
EFFECT_KEY_COLS = EFFECT_COLS[:5]
EFFECT_TYPES = (
    "text", "text", "text", "text", "bigint", "text", "bytea", "bytea", "boolean", "text",
    "bigint", "float8", "float8", "text",
)
RUN_COLS = (
    "run_id", "workflow", "status", "created_at", "updated_at", "args_codec", "args_data",
    "args_ipc", "result_codec", "result_data", "result_ipc", "error_codec", "error_data",
    "error_ipc", "custom_status", "status_version", "parent_id", "executions", "detail",
    "input_hash", "code_version", "generation", "version",
)
# fmt: on
CLAIMABLE = "('queued', 'running', 'waiting')"

#: Named, ordered schema migrations (``{s}`` is the quoted schema). Append only; never edit
#: a released one.
MIGRATIONS = Migrations(
    Migration(
        1,
        "initial: effects, runs, signals, inbox, events, run leases, effect claims",
        (
            'CREATE TABLE {s}.dn_effects (scope text COLLATE "C" NOT NULL, '
            'identity text COLLATE "C" NOT NULL, version text COLLATE "C" NOT NULL, '
            'input_hash text COLLATE "C" NOT NULL, occurrence bigint NOT NULL, '
            "codec text NOT NULL, data bytea NOT NULL, table_ipc bytea, "
            "is_error boolean NOT NULL, kind text NOT NULL, seq bigint NOT NULL, "
            "started_at double precision NOT NULL, duration double precision NOT NULL, "
            "detail text NOT NULL, "
            "PRIMARY KEY (scope, identity, version, input_hash, occurrence))",
            'CREATE TABLE {s}.dn_runs (run_id text COLLATE "C" PRIMARY KEY, '
            'workflow text COLLATE "C" NOT NULL, status text NOT NULL, '
            "created_at double precision NOT NULL, updated_at double precision NOT NULL, "
            "args_codec text, args_data bytea, args_ipc bytea, "
            "result_codec text, result_data bytea, result_ipc bytea, "
            "error_codec text, error_data bytea, error_ipc bytea, "
            "custom_status text, status_version bigint NOT NULL, "
            'parent_id text COLLATE "C", executions bigint NOT NULL, detail text NOT NULL, '
            "input_hash text NOT NULL, code_version text NOT NULL, "
            "generation bigint NOT NULL, version text NOT NULL)",
            "CREATE INDEX dn_runs_created ON {s}.dn_runs (created_at, run_id)",
            # what claim_run scans: only runs that may need an executor, oldest first
            "CREATE INDEX dn_runs_claimable ON {s}.dn_runs (created_at, run_id) "
            f"WHERE status IN {CLAIMABLE}",
            "CREATE INDEX dn_runs_parent ON {s}.dn_runs (parent_id) WHERE parent_id IS NOT NULL",
            'CREATE TABLE {s}.dn_signals (run_id text COLLATE "C" NOT NULL, '
            'signal_id text COLLATE "C" NOT NULL, name text NOT NULL, payload text NOT NULL, '
            "sent_at double precision NOT NULL, PRIMARY KEY (run_id, signal_id))",
            # one row per run: the id of the transaction that last sent it a signal
            'CREATE TABLE {s}.dn_inbox (run_id text COLLATE "C" PRIMARY KEY, '
            "token bigint NOT NULL)",
            'CREATE TABLE {s}.dn_events (run_id text COLLATE "C" NOT NULL, '
            'event_id text COLLATE "C" NOT NULL, ts double precision NOT NULL, '
            "kind text NOT NULL, data text NOT NULL, PRIMARY KEY (run_id, event_id))",
            'CREATE TABLE {s}.dn_leases (run_id text COLLATE "C" PRIMARY KEY, '
            "token text NOT NULL, owner text NOT NULL, holder text NOT NULL, "
            "acquired_at timestamptz NOT NULL, expires_at timestamptz NOT NULL)",
            "CREATE INDEX dn_leases_token ON {s}.dn_leases (token)",
            'CREATE TABLE {s}.dn_effect_claims (scope text COLLATE "C" NOT NULL, '
            'identity text COLLATE "C" NOT NULL, version text COLLATE "C" NOT NULL, '
            'input_hash text COLLATE "C" NOT NULL, occurrence bigint NOT NULL, '
            "owner text NOT NULL, expires_at timestamptz NOT NULL, "
            "PRIMARY KEY (scope, identity, version, input_hash, occurrence))",
        ),
    ),
    Migration(
        2,
        "limits: named rate and concurrency limits shared by every process on the store",
        (
            'CREATE TABLE {s}.dn_limit_slots (name text COLLATE "C" NOT NULL, '
            'slot text COLLATE "C" NOT NULL, expires_at timestamptz NOT NULL, '
            "PRIMARY KEY (name, slot))",
            'CREATE TABLE {s}.dn_limit_starts (name text COLLATE "C" NOT NULL, '
            "at double precision NOT NULL)",
            "CREATE INDEX dn_limit_starts_name_at ON {s}.dn_limit_starts (name, at)",
        ),
    ),
    Migration(
        3,
        "queues: queue limits, run routes (queue, priority, dedup id, session), workers, sessions",
        (
            'CREATE TABLE {s}.dn_queues (name text COLLATE "C" PRIMARY KEY, '
            "concurrency integer, worker_concurrency integer, calls integer, "
            "window_s double precision, priority boolean NOT NULL)",
            'CREATE TABLE {s}.dn_routes (run_id text COLLATE "C" PRIMARY KEY '
            "REFERENCES {s}.dn_runs (run_id) ON DELETE CASCADE, "
            'queue text COLLATE "C" NOT NULL, priority integer NOT NULL, '
            'dedup_id text COLLATE "C", session text COLLATE "C", '
            "enqueued_at double precision NOT NULL, claimed_at double precision)",
            "CREATE INDEX dn_routes_queue ON {s}.dn_routes (queue)",
            "CREATE INDEX dn_routes_dedup ON {s}.dn_routes (queue, dedup_id) "
            "WHERE dedup_id IS NOT NULL",
            "CREATE INDEX dn_routes_session ON {s}.dn_routes (session) WHERE session IS NOT NULL",
            'CREATE TABLE {s}.dn_workers (node_id text COLLATE "C" PRIMARY KEY, '
            "owner text NOT NULL, token text NOT NULL, holder text NOT NULL, "
            "workflows text NOT NULL, max_sessions integer, idle_s double precision NOT NULL, "
            "started_at timestamptz NOT NULL, seen_at timestamptz NOT NULL, "
            "stopped_at timestamptz)",
            'CREATE TABLE {s}.dn_sessions (session text COLLATE "C" PRIMARY KEY, '
            'node_id text COLLATE "C" NOT NULL, taken_at timestamptz NOT NULL, '
            "used_at timestamptz NOT NULL, moves integer NOT NULL)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS.latest

BOOKKEEPING = Bookkeeping(
    setup=(
        "CREATE TABLE IF NOT EXISTS {s}.dn_meta (key text PRIMARY KEY, value text)",
        "CREATE TABLE IF NOT EXISTS {s}.dn_migrations (version integer PRIMARY KEY, "
        "name text NOT NULL, applied_at timestamptz NOT NULL, written_by text)",
    ),
    record="INSERT INTO {s}.dn_migrations VALUES (%s, %s, to_timestamp(%s), %s)",
    set_meta="INSERT INTO {s}.dn_meta VALUES ('schema_version', %s), ('written_by', %s) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
)


def statements(schema: str) -> dict[str, str]:
    """Every statement the store runs, by name, for the (validated) schema ``schema``."""
    s = sql.Identifier(schema).as_string()

    def upsert(table: str, cols: Sequence[str], key: Sequence[str]) -> str:
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in key)
        return (
            f"INSERT INTO {s}.{table} ({', '.join(cols)}) "
            f"VALUES ({', '.join(['%s'] * len(cols))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
        )

    key_where = " AND ".join(f"{c} = %s" for c in EFFECT_KEY_COLS)
    # a claim's owner as the engine named it: without the session key in front
    claim_owner = "substr({0}.owner, strpos({0}.owner, '.') + 1)"
    # a lease (or claim) whose holder's session ended expires after the grace
    condemn = (
        "SET expires_at = now() + make_interval(secs => %(grace)s) "
        "WHERE expires_at > now() + make_interval(secs => %(grace)s) AND "
    )
    lease_upsert = (
        f"INSERT INTO {s}.dn_leases AS l (run_id, token, owner, holder, acquired_at, "
        "expires_at) VALUES (%s, %s, %s, %s, now(), now() + make_interval(secs => %s)) "
        "ON CONFLICT (run_id) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner, "
        "holder = EXCLUDED.holder, acquired_at = now(), expires_at = EXCLUDED.expires_at "
        # our own token: a retry after a lost reply finds the lease it already took
        "WHERE l.expires_at <= now() OR l.token = EXCLUDED.token RETURNING run_id"
    )
    # binary arrays: dumping text arrays quotes every element in Python
    effect_rows = f"unnest({', '.join(f'%b::{t}[]' for t in EFFECT_TYPES)})"
    effect_conflict = f"ON CONFLICT ({', '.join(EFFECT_KEY_COLS)}) DO UPDATE SET " + ", ".join(
        f"{c} = EXCLUDED.{c}" for c in EFFECT_COLS if c not in EFFECT_KEY_COLS
    )
    # fencing: a write of a run's records commits only while the writer holds the run's
    # lease. Params (number of distinct tokens, the tokens joined by spaces: a text dumps
    # faster than an array). Fails the transaction with
    # division_by_zero unless every token is a live lease; FOR SHARE holds those rows until
    # the transaction ends, so a takeover (which rewrites the row) waits for the write
    fence = (
        "SELECT 1 / (count(*) = %s)::int AS ok FROM (SELECT 1 FROM "
        f"{s}.dn_leases WHERE token = ANY(string_to_array(%s, ' ')) AND expires_at > now() "
        "FOR SHARE) AS l"
    )
    return {
        "put_effect": upsert("dn_effects", EFFECT_COLS, EFFECT_KEY_COLS),
        "put_effects": f"INSERT INTO {s}.dn_effects ({', '.join(EFFECT_COLS)}) "
        f"SELECT * FROM {effect_rows} {effect_conflict}",
        # the same, refused (the transaction fails) unless the leases named are live
        "put_effects_fenced": f"WITH f AS ({fence}) "
        f"INSERT INTO {s}.dn_effects ({', '.join(EFFECT_COLS)}) "
        f"SELECT u.* FROM {effect_rows} AS u, f WHERE f.ok = 1 {effect_conflict}",
        # one row (a sequential run's effect): no arrays to dump
        "put_effect_fenced": f"WITH f AS ({fence}) "
        f"INSERT INTO {s}.dn_effects ({', '.join(EFFECT_COLS)}) "
        f"SELECT {', '.join(f'%s::{t}' for t in EFFECT_TYPES)} FROM f WHERE f.ok = 1 "
        f"{effect_conflict}",
        "fence": fence,
        "get_effect": f"SELECT {', '.join(EFFECT_COLS)} FROM {s}.dn_effects WHERE {key_where}",
        # a map's keys: one scope, identity and version, many input hashes
        "get_effects": f"SELECT {', '.join(EFFECT_COLS)} FROM {s}.dn_effects WHERE scope = %s "
        "AND identity = %s AND version = %s AND input_hash = ANY(%s)",
        "load_effects": f"SELECT {', '.join(EFFECT_COLS)} FROM {s}.dn_effects "
        "WHERE scope = %s ORDER BY seq, started_at",
        # a run's history as its execution starts, unless the run has its outcome (a rerun
        # returns it: _protocol.has_outcome)
        "start_history": f"SELECT {', '.join(EFFECT_COLS)} FROM {s}.dn_effects "
        f"WHERE scope = %s AND NOT EXISTS (SELECT 1 FROM {s}.dn_runs r WHERE r.run_id = %s "
        "AND (r.status = 'cancelled' OR (r.status = 'completed' AND r.result_codec IS NOT NULL)))"
        " ORDER BY seq, started_at",
        # start_history of many runs (their scopes and run ids, in two arrays)
        "start_histories": f"SELECT {', '.join('e.' + c for c in EFFECT_COLS)} "
        f"FROM unnest(%s::text[], %s::text[]) AS w(scope, run_id) JOIN {s}.dn_effects e "
        f"ON e.scope = w.scope WHERE NOT EXISTS (SELECT 1 FROM {s}.dn_runs r "
        "WHERE r.run_id = w.run_id AND (r.status = 'cancelled' OR (r.status = 'completed' "
        "AND r.result_codec IS NOT NULL))) ORDER BY e.scope, e.seq, e.started_at",
        "delete_effects": f"DELETE FROM {s}.dn_effects WHERE scope = %s",
        "effect_scopes": f"SELECT DISTINCT scope FROM {s}.dn_effects "
        "WHERE starts_with(scope, %s) ORDER BY scope",
        "delete_scopes": f"DELETE FROM {s}.dn_effects WHERE scope = ANY(%s)",
        "prune_effects": f"DELETE FROM {s}.dn_effects "
        "WHERE starts_with(scope, %s) AND started_at < %s",
        "prune_claims": f"DELETE FROM {s}.dn_effect_claims WHERE expires_at <= now()",
        # one statement: the run and, if it is queued, the wake-up for idle workers
        "put_run": f"WITH r AS ({upsert('dn_runs', RUN_COLS, ('run_id',))} "
        "RETURNING status) SELECT pg_notify(%s, 'queued') FROM r WHERE r.status = 'queued'",
        "get_run": f"SELECT {', '.join(RUN_COLS)} FROM {s}.dn_runs WHERE run_id = %s",
        "get_runs": f"SELECT {', '.join(RUN_COLS)} FROM {s}.dn_runs WHERE run_id = ANY(%s)",
        "list_runs": f"SELECT {', '.join(RUN_COLS)} FROM {s}.dn_runs",
        "delete_run": f"DELETE FROM {s}.dn_runs WHERE run_id = %s",
        "delete_signals": f"DELETE FROM {s}.dn_signals WHERE run_id = %s",
        "delete_some_signals": f"DELETE FROM {s}.dn_signals "
        "WHERE run_id = %s AND signal_id = ANY(%s)",
        "delete_inbox": f"DELETE FROM {s}.dn_inbox WHERE run_id = %s",
        "delete_events": f"DELETE FROM {s}.dn_events WHERE run_id = %s",
        "acquire": lease_upsert,
        # the leases of many runs starting together: only runs without a lease row (an
        # expired one is acquire's to cut: DO UPDATE would lock the rows of live leases,
        # which writes of their holders hold FOR SHARE in another order: a deadlock), and
        # those this call already took (a retry after a lost reply, same tokens)
        "acquire_many": f"WITH i AS (INSERT INTO {s}.dn_leases (run_id, token, owner, holder, "
        "acquired_at, expires_at) SELECT w.run_id, w.token, %s, %s, now(), "
        "now() + make_interval(secs => %s) FROM unnest(%s::text[], %s::text[]) AS w(run_id, token) "
        "ON CONFLICT (run_id) DO NOTHING RETURNING run_id) SELECT run_id FROM i UNION ALL "
        f"SELECT run_id FROM {s}.dn_leases WHERE token = ANY(%s)",
        "holder": f"SELECT owner, holder, EXTRACT(EPOCH FROM expires_at - now())::float8 "
        f"FROM {s}.dn_leases WHERE run_id = %s",
        "condemn": f"UPDATE {s}.dn_leases {condemn} run_id = %(run_id)s AND "
        f"{gone('token')} RETURNING run_id",
        "condemn_all": f"UPDATE {s}.dn_leases {condemn} {gone('token')} RETURNING run_id",
        "renew": f"UPDATE {s}.dn_leases SET expires_at = now() + make_interval(secs => %s) "
        "WHERE token = ANY(%s) RETURNING token",
        # the lease goes, and the idle time of the run's session (if it has one) starts;
        # 'released' wakes claimers (the run still needs an executor, or its end frees a
        # slot of a queue with a concurrency limit), 'ended' only those who wait for runs
        # to end
        "release": f"WITH d AS (DELETE FROM {s}.dn_leases WHERE run_id = %s AND token = %s "
        f"RETURNING run_id), u AS (UPDATE {s}.dn_sessions x SET used_at = now() "
        f"FROM {s}.dn_routes t, d WHERE t.run_id = d.run_id AND x.session = t.session) "
        "SELECT pg_notify(%s, CASE WHEN EXISTS (SELECT 1 FROM "
        f"{s}.dn_runs r WHERE r.run_id = d.run_id AND r.status IN {CLAIMABLE}) "
        f"OR EXISTS (SELECT 1 FROM {s}.dn_routes t JOIN {s}.dn_queues k ON k.name = t.queue "
        "WHERE t.run_id = d.run_id AND (k.concurrency IS NOT NULL "
        "OR k.worker_concurrency IS NOT NULL)) THEN 'released' ELSE 'ended' END) FROM d",
        "release_all": f"DELETE FROM {s}.dn_leases WHERE token = ANY(%s) RETURNING run_id",
        "notify": "SELECT pg_notify(%s, %s)",
        "claim_effect": f"INSERT INTO {s}.dn_effect_claims AS c "
        f"({', '.join(EFFECT_KEY_COLS)}, owner, expires_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s)) "
        f"ON CONFLICT ({', '.join(EFFECT_KEY_COLS)}) DO UPDATE "
        "SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at "
        f"WHERE {claim_owner.format('c')} = {claim_owner.format('EXCLUDED')} "
        "OR c.expires_at <= now() RETURNING 1",
        "condemn_claim": f"UPDATE {s}.dn_effect_claims {condemn} "
        + " AND ".join(f"{c} = %({c})s" for c in EFFECT_KEY_COLS)
        + f" AND {gone('owner')} RETURNING 1",
        "release_effect": f"DELETE FROM {s}.dn_effect_claims c WHERE {key_where} "
        f"AND {claim_owner.format('c')} = %s",
        # one statement: the signal, its run's inbox token and the wake-up
        "add_signal": "WITH g AS ("
        + upsert(
            "dn_signals",
            ("run_id", "signal_id", "name", "payload", "sent_at"),
            ("run_id", "signal_id"),
        )
        + f" RETURNING run_id), i AS (INSERT INTO {s}.dn_inbox AS i (run_id, token) "
        "SELECT run_id, txid_current() FROM g ON CONFLICT (run_id) DO UPDATE "
        "SET token = EXCLUDED.token RETURNING 1) SELECT pg_notify(%s, 'signal') FROM i",
        "list_signals": f"SELECT run_id, signal_id, name, payload, sent_at FROM {s}.dn_signals "
        "WHERE run_id = %s ORDER BY sent_at, signal_id",
        "list_signals_many": f"SELECT run_id, signal_id, name, payload, sent_at "
        f"FROM {s}.dn_signals WHERE run_id = ANY(%s) ORDER BY run_id, sent_at, signal_id",
        "inbox_token": f"SELECT token FROM {s}.dn_inbox WHERE run_id = %s",
        "inbox_tokens": f"SELECT run_id, token FROM {s}.dn_inbox WHERE run_id = ANY(%s)",
        "put_event": upsert(
            "dn_events", ("run_id", "event_id", "ts", "kind", "data"), ("run_id", "event_id")
        ),
        "load_events": f"SELECT run_id, event_id, ts, kind, data FROM {s}.dn_events "
        "WHERE run_id = %s ORDER BY ts, event_id",
    }
