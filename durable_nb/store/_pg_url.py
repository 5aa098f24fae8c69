"""What a ``postgresql://`` URL and a signing key say to the PostgreSQL store.

``?schema=`` and ``?lease_seconds=`` are the store's own parameters, taken out of the URL
before libpq sees it; every other parameter is libpq's. The URL the store shows (its
``url``, its error messages) never has a password. The signing key (``key=`` or
``$DURABLE_NB_KEY``) must be long enough to be a secret.
"""

from __future__ import annotations

import math
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["DEFAULT_SCHEMA", "check_schema", "lease_from_url", "resolve_key", "split_url"]

DEFAULT_SCHEMA = "durable_nb"
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MIN_KEY = 16


def check_schema(schema: object) -> str:
    if not isinstance(schema, str):
        raise ArgumentTypeError(
            f"schema must be a str naming a PostgreSQL schema, got {type(schema).__name__} "
            f"{schema!r}"
        )
    if (
        not _SCHEMA_RE.fullmatch(schema)
        or len(schema) > 63
        or schema.lower().startswith("pg_")
        or schema.lower() == "information_schema"
    ):
        raise ArgumentError(
            f"schema must be a plain PostgreSQL identifier (a letter or '_', then letters, "
            f"digits or '_', at most 63 characters, not starting with 'pg_'), got {schema!r}; "
            "pick a name like 'durable_nb' or 'team_ml'"
        )
    return schema


def split_url(url: str, schema: str | None) -> tuple[str, str, str]:
    """``(conninfo for libpq, schema, url to show)``: ``?schema=`` is ours, not libpq's,
    and the shown url has no password."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_url = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    if len(in_url) > 1:
        raise ArgumentError(f"the store URL names more than one schema: {in_url!r}; keep one")
    if in_url and schema is not None and in_url[0] != schema:
        raise ArgumentError(
            f"the store URL says schema={in_url[0]!r} but schema={schema!r} was passed; "
            "give the schema once"
        )
    name = check_schema(in_url[0] if in_url else schema if schema is not None else DEFAULT_SCHEMA)
    conninfo = urlunsplit(parts._replace(query=urlencode(rest)))
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = userinfo.partition(":")[0] + "@" + hostport
    shown = [(k, v) for k, v in rest if k != "password"]
    if name != DEFAULT_SCHEMA:
        shown.append(("schema", name))
    return conninfo, name, urlunsplit(parts._replace(netloc=netloc, query=urlencode(shown)))


def lease_from_url(url: str, lease_seconds: float) -> tuple[str, float]:
    """``?lease_seconds=S`` in the URL (ours, not libpq's) wins over the argument, so a
    worker started by URL alone (``durable-nb worker --store ...``) can set it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [v for k, v in query if k == "lease_seconds"]
    if not given:
        return url, lease_seconds
    try:
        value = float(given[-1])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(
            f"lease_seconds in the store URL must be a number of seconds > 0, got {given[-1]!r}"
        )
    rest = [(k, v) for k, v in query if k != "lease_seconds"]
    return urlunsplit(parts._replace(query=urlencode(rest))), value


def resolve_key(key: bytes | str | None) -> bytes | None:
    if key is None:
        env = os.environ.get("DURABLE_NB_KEY")
        if not env:
            return None
        if len(env.encode()) < _MIN_KEY:
            raise ArgumentError(
                f"DURABLE_NB_KEY must be at least {_MIN_KEY} characters long, got "
                f"{len(env.encode())}; set it to a long random secret, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        return env.encode()
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes | bytearray):
        raise ArgumentTypeError(
            f"key must be bytes or str (the team's signing key), got {type(key).__name__}"
        )
    if len(key) < _MIN_KEY:
        raise ArgumentError(
            f"key must be at least {_MIN_KEY} bytes long, got {len(key)} bytes; "
            "use e.g. secrets.token_bytes(32)"
        )
    return bytes(key)
