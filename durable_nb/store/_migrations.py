"""Schema migrations: named, ordered, recorded — one bookkeeping for every SQL store.

A store's schema is a list of :class:`Migration` (append only: a released one is never
edited). Opening a store reads the schema version it was written with from ``dn_meta``;
a newer one than this durable_nb knows is refused untouched (:func:`check_version`);
an older one gets the missing migrations in one transaction, each recorded by version and
name in ``dn_migrations`` with when and by which durable_nb it was applied (as
sqlite-utils records its named migrations). The store supplies only its dialect: the
statements of :class:`Bookkeeping` and a function that executes one statement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._version import __version__
from ..errors import StoreFormatError, StoreVersionError

__all__ = ["Bookkeeping", "Migration", "Migrations", "check_version", "migrate", "not_a_store"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


class Migrations(tuple[Migration, ...]):
    """A store's migrations, in order: versions 1, 2, 3 ..., each with its own name."""

    def __new__(cls, *migrations: Migration) -> Migrations:
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(migrations) + 1)):
            raise ValueError(f"migration versions must be 1, 2, 3 ... in order, got {versions}")
        names = [m.name for m in migrations]
        if len(set(names)) != len(names):
            raise ValueError(f"migration names must be unique, got {names}")
        return super().__new__(cls, migrations)

    @property
    def latest(self) -> int:
        return self[-1].version if self else 0


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """A dialect's statements around the migrations (its placeholders, its types)."""

    setup: tuple[str, ...]  # create dn_meta and dn_migrations if missing
    record: str  # params: version, name, applied_at (epoch seconds), written_by
    set_meta: str  # params: schema_version (text), written_by


def check_version(current: int, written_by: str, known: int, store: str) -> None:
    """Refuse a store written with a newer schema than this durable_nb knows (``store``
    describes it for the message); touches nothing."""
    if current > known:
        raise StoreVersionError(
            f"{store} has schema version {current}, written by durable_nb {written_by}; "
            f"this durable_nb knows schema versions up to {known}; upgrade durable_nb "
            "(pip install -U durable_nb) to use it"
        )


def not_a_store(store: str, tables: Sequence[str], fix: str) -> StoreFormatError:
    """The error for a database (or schema) that has tables but is not a durable_nb store."""
    return StoreFormatError(
        f"{store} has tables {sorted(tables)[:5]!r} but is not a durable_nb store "
        f"(no dn_meta table); {fix}"
    )


def migrate(
    execute: Callable[[str, Sequence[Any]], object],
    migrations: Migrations,
    current: int,
    book: Bookkeeping,
) -> list[str]:
    """Apply the migrations after ``current`` with ``execute(statement, params)``, inside
    the caller's transaction; returns the names applied."""
    for stmt in book.setup:
        execute(stmt, ())
    applied = []
    for m in migrations:
        if m.version <= current:
            continue
        for stmt in m.statements:
            execute(stmt, ())
        execute(book.record, (m.version, m.name, time.time(), __version__))
        applied.append(m.name)
    execute(book.set_meta, (str(migrations.latest), __version__))
    return applied
