"""Where everything durable lives: the Store protocol, its records, and the stores.

``open_store(url)`` picks one: ``":memory:"`` (tests), a file path (DuckDB, the default) or
``postgresql://[user@]host[:port]/database[?schema=NAME]`` (PostgreSQL: the schema defaults to
``durable_nb``; see ``_postgres``). Importing this package imports neither DuckDB nor psycopg.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import ArgumentError, ArgumentTypeError
from ._memory import MemoryStore
from ._protocol import (
    CLAIMABLE_STATUSES,
    FINAL_STATUSES,
    RUN_STATUSES,
    EffectKey,
    EffectRecord,
    EventRecord,
    RunLease,
    RunRecord,
    RunStart,
    RunStatus,
    SharedLimits,
    SignalRecord,
    Store,
    run_scopes,
)
from ._queues import DEFAULT_QUEUE, Node, QueueSpec, Route, WorkQueues

if TYPE_CHECKING:
    from ._duckdb import DuckDBStore
    from ._postgres import PostgresStore

__all__ = [
    "CLAIMABLE_STATUSES",
    "DEFAULT_QUEUE",
    "DEFAULT_STORE_PATH",
    "FINAL_STATUSES",
    "RUN_STATUSES",
    "EffectKey",
    "EffectRecord",
    "EventRecord",
    "MemoryStore",
    "Node",
    "QueueSpec",
    "Route",
    "RunLease",
    "RunRecord",
    "RunStart",
    "RunStatus",
    "SharedLimits",
    "SignalRecord",
    "Store",
    "WorkQueues",
    "default_store_url",
    "open_store",
    "run_scopes",
]

DEFAULT_STORE_PATH = os.path.join(".durable_nb", "store.duckdb")


def default_store_url() -> str:
    """``$DURABLE_NB_STORE`` if set, else ``.durable_nb/store.duckdb`` under the working dir."""
    return os.environ.get("DURABLE_NB_STORE") or DEFAULT_STORE_PATH


def open_store(url: str | os.PathLike[str] | None = None) -> Store:
    """Open the store named by ``url`` (see the module docstring); ``None`` means the default."""
    if url is None:
        url = default_store_url()
    if not isinstance(url, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"store must be a path, ':memory:' or a postgresql:// URL, got {url!r}"
        )
    text = os.fspath(url)
    if not text.strip():
        raise ArgumentError(
            f"store must be a path, ':memory:' or a postgresql:// URL, got {text!r}"
        )
    if text == ":memory:":
        return MemoryStore()
    if text.startswith(("postgresql://", "postgres://")):
        from ._postgres import PostgresStore

        pg: PostgresStore = PostgresStore(text)
        return pg
    from ._duckdb import DuckDBStore

    store: DuckDBStore = DuckDBStore(text)
    return store
