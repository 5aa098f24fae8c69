"""The DuckDB store's schema: its tables, as named, ordered migrations (``_migrations``)."""

from __future__ import annotations

from ._migrations import Bookkeeping, Migration, Migrations

__all__ = [
    "BOOKKEEPING",
    "EFFECT_TYPES",
    "EVENT_TYPES",
    "MIGRATIONS",
    "RUN_TYPES",
    "SCHEMA_VERSION",
    "SIGNAL_TYPES",
]

# column types, in the column order of ``_rows`` (a payload's table column holds the name
# of the DuckDB table the payload's Arrow table was written to)
# fmt: off
EFFECT_TYPES = (
    "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "INTEGER", "VARCHAR", "BLOB", "VARCHAR",
    "BOOLEAN", "VARCHAR", "INTEGER", "DOUBLE", "DOUBLE", "VARCHAR",
)
RUN_TYPES = (
    "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE", "DOUBLE",
    "VARCHAR", "BLOB", "VARCHAR", "VARCHAR", "BLOB", "VARCHAR", "VARCHAR", "BLOB", "VARCHAR",
    "VARCHAR", "INTEGER", "VARCHAR", "INTEGER", "VARCHAR", "VARCHAR", "VARCHAR",
    "INTEGER", "VARCHAR",
)
SIGNAL_TYPES = ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE")
EVENT_TYPES = ("VARCHAR", "VARCHAR", "DOUBLE", "VARCHAR", "VARCHAR")
# fmt: on

# the released DDL, kept as it was written (the table column of a payload is named
# ``table_name`` in the effects table and ``<part>_table`` in the runs table)
_EFFECTS = (
    "scope VARCHAR, identity VARCHAR, version VARCHAR, input_hash VARCHAR, occurrence INTEGER, "
    "codec VARCHAR, data BLOB, table_name VARCHAR, is_error BOOLEAN, kind VARCHAR, seq INTEGER, "
    "started_at DOUBLE, duration DOUBLE, detail VARCHAR"
)
_RUNS = (
    "run_id VARCHAR, workflow VARCHAR, status VARCHAR, created_at DOUBLE, updated_at DOUBLE, "
    "args_codec VARCHAR, args_data BLOB, args_table VARCHAR, "
    "result_codec VARCHAR, result_data BLOB, result_table VARCHAR, "
    "error_codec VARCHAR, error_data BLOB, error_table VARCHAR, "
    "custom_status VARCHAR, status_version INTEGER, parent_id VARCHAR, executions INTEGER, "
    "detail VARCHAR, input_hash VARCHAR, code_version VARCHAR, "
    "generation INTEGER, version VARCHAR"
)
_SIGNALS = "run_id VARCHAR, signal_id VARCHAR, name VARCHAR, payload VARCHAR, sent_at DOUBLE"
_EVENTS = "run_id VARCHAR, event_id VARCHAR, ts DOUBLE, kind VARCHAR, data VARCHAR"

#: Append only; never edit a released one.
MIGRATIONS = Migrations(
    Migration(
        1,
        "initial: effects, runs, signals, events, journal offsets",
        (
            f"CREATE TABLE dn_effects ({_EFFECTS}, "
            "PRIMARY KEY (scope, identity, version, input_hash, occurrence))",
            f"CREATE TABLE dn_runs ({_RUNS}, PRIMARY KEY (run_id))",
            f"CREATE TABLE dn_signals ({_SIGNALS}, PRIMARY KEY (run_id, signal_id))",
            f"CREATE TABLE dn_events ({_EVENTS}, PRIMARY KEY (run_id, event_id))",
            "CREATE TABLE dn_journal (wal_id VARCHAR PRIMARY KEY, merged_offset BIGINT)",
        ),
    ),
    Migration(
        2,
        "indexes: effects by input hash and by scope, for point lookups at any store size",
        (
            "CREATE INDEX IF NOT EXISTS dn_effects_input_hash ON dn_effects (input_hash)",
            "CREATE INDEX IF NOT EXISTS dn_effects_scope ON dn_effects (scope)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS.latest

BOOKKEEPING = Bookkeeping(
    setup=(
        "CREATE TABLE IF NOT EXISTS dn_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        "CREATE TABLE IF NOT EXISTS dn_migrations "
        "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at DOUBLE)",
        # a store made before the column existed gets it (its old records say NULL)
        "ALTER TABLE dn_migrations ADD COLUMN IF NOT EXISTS written_by VARCHAR",
    ),
    record="INSERT INTO dn_migrations (version, name, applied_at, written_by) VALUES (?, ?, ?, ?)",
    set_meta="INSERT OR REPLACE INTO dn_meta VALUES ('schema_version', ?), ('written_by', ?)",
)
