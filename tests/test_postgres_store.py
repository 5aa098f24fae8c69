"""What only the PostgreSQL store has: URLs and schemas, migrations, leases that expire,
claims across processes, LISTEN/NOTIFY, signed pickles in a shared database.

The Store protocol itself is checked by tests/test_store_conformance.py (the ``store``
fixture runs it against PostgreSQL too). Every test here works in a fresh schema of the
test database (``pg_url``), dropped afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from psycopg import sql

import durable_nb as dn
from durable_nb import _codecs
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    PayloadIntegrityError,
    RunLockedError,
    StoreError,
    StoreFormatError,
    StoreUnavailableError,
    StoreVersionError,
    UnstorableValueError,
)
from durable_nb.store import EffectRecord, EventRecord, RunRecord, SignalRecord, open_store
from durable_nb.store._postgres import SCHEMA_VERSION, PostgresStore

from .conftest import PG_TEST_KEY, PG_URL, require_postgres
from .helpers import ROOT

pytestmark = pytest.mark.postgres

# ---------------------------------------------------------------------------- helpers


def _schema_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["schema"][0]


@pytest.fixture
def open_pg(pg_url: str) -> Iterator[Callable[..., PostgresStore]]:
    """Opens stores on the test's schema (with the test key unless told otherwise) and closes
    them all before the schema is dropped."""
    opened: list[PostgresStore] = []

    def open_(**kw: Any) -> PostgresStore:
        kw.setdefault("key", PG_TEST_KEY)
        store = PostgresStore(kw.pop("url", pg_url), **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def _sql(schema: str, text: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run SQL on the test schema behind the store's back (as a tamperer or an old version)."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        cur = conn.execute(sql.SQL(text).format(s=sql.Identifier(schema)), params)
        return cur.fetchall() if cur.description else []


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait (in real time: leases run on the database's clock) until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.1)


def _run(run_id: str, status: str = "queued", created: float = 1.0) -> RunRecord:
    return RunRecord(run_id, "wf", status, created, created)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- URLs, schemas


def test_open_store_selects_postgres_and_the_schema_from_the_url(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema == _schema_of(pg_url)
        assert store.url == pg_url
        assert _sql(store.schema, "SELECT value FROM {s}.dn_meta WHERE key = 'schema_version'")
    finally:
        store.close()


def test_the_url_never_shows_the_password(pg_url: str) -> None:
    parts = urlsplit(pg_url)
    user, _, host = parts.netloc.rpartition("@")
    secret_url = parts._replace(netloc=f"{user or 'postgres'}:hunter2@{host}").geturl()
    store = PostgresStore(secret_url, key=PG_TEST_KEY)  # trust auth: the password is unused
    try:
        assert "hunter2" not in store.url
        assert "hunter2" not in repr(store)
        assert store.url.endswith(f"?schema={store.schema}")
    finally:
        store.close()


def test_the_schema_given_twice_must_agree() -> None:
    with pytest.raises(
        ArgumentError,
        match=r"^the store URL says schema='a' but schema='b' was passed; give the schema once$",
    ):
        PostgresStore("postgresql://127.0.0.1:1/x?schema=a", schema="b")


@pytest.mark.parametrize(
    "schema",
    ["", "1abc", "a-b", "a;DROP SCHEMA public", 'x"y', "pg_catalog", "PG_mine", "a" * 64, "é"],
)
def test_schema_names_are_validated_before_connecting(schema: str) -> None:
    # port 1: nothing listens there, so reaching the server would be a different error
    with pytest.raises(
        ArgumentError,
        match=r"^schema must be a plain PostgreSQL identifier \(a letter or '_', then letters, "
        r"digits or '_', at most 63 characters, not starting with 'pg_'\), got .*; pick a name",
    ):
        PostgresStore("postgresql://127.0.0.1:1/x", schema=schema)
    with pytest.raises(ArgumentError, match=r"^schema must be a plain PostgreSQL identifier"):
        open_store(f"postgresql://127.0.0.1:1/x?schema={schema}")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ArgumentTypeError, match=r"^schema must be a str naming a PostgreSQL"):
        PostgresStore("postgresql://127.0.0.1:1/x", schema=3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^url must be a postgresql:// URL, got 'mysql://x'"):
        PostgresStore("mysql://x")
    with pytest.raises(ArgumentError, match=r"^lease_seconds must be a number of seconds > 0"):
        PostgresStore("postgresql://127.0.0.1:1/x", lease_seconds=0)
    with pytest.raises(ArgumentError, match=r"^pool_size must be an int >= 1, got 0$"):
        PostgresStore("postgresql://127.0.0.1:1/x", pool_size=0)
    with pytest.raises(ArgumentError, match=r"^key must be at least 16 bytes long, got 5 bytes"):
        PostgresStore("postgresql://127.0.0.1:1/x", key=b"short")


def test_an_unreachable_server_names_the_url_and_what_to_do() -> None:
    url = "postgresql://alice:hunter2@127.0.0.1:1/team?schema=ml"
    for opener in (lambda: PostgresStore(url, connect_timeout=2), lambda: open_store(url)):
        with pytest.raises(StoreUnavailableError) as info:
            opener()
        text = str(info.value)
        assert "hunter2" not in text
        assert text.startswith(
            "cannot reach the PostgreSQL store 'postgresql://alice@127.0.0.1:1/team?schema=ml': "
        ), text
        assert text.endswith(
            "; check that the server is running and accepts connections at that address (user, "
            "database; a password goes in PGPASSWORD or ~/.pgpass), or choose another store "
            "with DURABLE_NB_STORE"
        ), text


def test_a_dropped_connection_is_replaced_transparently(open_pg: Any) -> None:
    store = open_pg()
    store.put_run(_run("r1"))
    # the server ends every session of this store (a restart, an idle timeout, a proxy)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [f"durable_nb:{store.schema}"],
        ).fetchall()
    assert killed
    run = store.get_run("r1")
    assert run is not None and run.status == "queued"


def test_a_closed_store_says_so(open_pg: Any) -> None:
    store = open_pg()
    store.close()
    store.close()  # idempotent
    with pytest.raises(
        StoreError, match=r"^the store 'postgresql://.*' is closed; open a new one$"
    ):
        store.get_run("r1")


# ---------------------------------------------------------------------------- migrations


def test_migrations_are_recorded_and_reopening_changes_nothing(open_pg: Any) -> None:
    store = open_pg()
    rows = _sql(store.schema, "SELECT version, name, written_by FROM {s}.dn_migrations")
    assert [(v, n.split(":")[0]) for v, n, _ in rows] == [
        (1, "initial"),
        (2, "limits"),
        (3, "queues"),
    ]
    assert rows[0][2] == dn.__version__
    meta = dict(_sql(store.schema, "SELECT key, value FROM {s}.dn_meta"))
    assert meta == {"schema_version": str(SCHEMA_VERSION), "written_by": dn.__version__}
    store.put_run(_run("r1"))
    again = open_pg()
    assert again.get_run("r1") is not None
    assert len(_sql(store.schema, "SELECT * FROM {s}.dn_migrations")) == 3


def test_processes_opening_a_new_schema_at_once_migrate_it_once(pg_url: str) -> None:
    code = """
        import sys
        from durable_nb.store._postgres import PostgresStore
        PostgresStore(sys.argv[1]).close()
        print("ok")
    """
    procs = [_spawn(code, pg_url) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip() for o, _ in outs] == ["ok"] * 4, [e for _, e in outs]
    assert len(_sql(_schema_of(pg_url), "SELECT * FROM {s}.dn_migrations")) == SCHEMA_VERSION


def test_a_schema_from_a_newer_version_is_refused(open_pg: Any) -> None:
    store = open_pg()
    store.close()
    _sql(store.schema, "UPDATE {s}.dn_meta SET value = '99' WHERE key = 'schema_version'")
    _sql(store.schema, "UPDATE {s}.dn_meta SET value = '9.9.0' WHERE key = 'written_by'")
    with pytest.raises(
        StoreVersionError,
        match=r"^the PostgreSQL store 'postgresql://.*' \(schema 'dn_test_\w+'\) has schema "
        rf"version 99, written by durable_nb 9\.9\.0; this durable_nb knows schema versions up to "
        rf"{SCHEMA_VERSION}; upgrade durable_nb \(pip install -U durable_nb\) to use it$",
    ):
        open_pg()


def test_a_schema_with_other_tables_is_not_taken_over(pg_url: str, open_pg: Any) -> None:
    schema = _schema_of(pg_url)
    _sql(schema, "CREATE SCHEMA {s}")
    _sql(schema, "CREATE TABLE {s}.users (id int)")
    with pytest.raises(
        StoreFormatError,
        match=rf"^the schema '{schema}' of 'postgresql://.*' has tables \['users'\] but is not a "
        r"durable_nb store \(no dn_meta table\); choose another schema with \?schema=NAME",
    ):
        open_pg()
    assert _sql(schema, "SELECT count(*) FROM {s}.users") == [(0,)]


# ---------------------------------------------------------------------------- payloads


def test_dataframes_are_arrow_ipc_and_come_back_exactly(open_pg: Any) -> None:
    pd = pytest.importorskip("pandas")
    store = open_pg()
    frame = pd.DataFrame(
        {
            "i": pd.array([1, None, 3], dtype="Int64"),
            "t": pd.to_datetime(["2024-01-01", "2024-06-01", None]).tz_localize("Europe/Paris"),
            "c": pd.Categorical(["b", "a", "b"], categories=["b", "a"], ordered=True),
            "s": ["x", "y", None],
        },
        index=pd.Index([10, 20, 30], name="k"),
    )
    payload = _codecs.encode(frame, store.signer)
    assert payload.table is not None
    rec = EffectRecord("run/t", "m.f", "v1", "h", 0, payload)
    store.put_effects([rec])
    [(ipc,)] = _sql(store.schema, "SELECT table_ipc FROM {s}.dn_effects")
    assert bytes(ipc[:4]) == b"\xff\xff\xff\xff"  # an Arrow IPC stream message
    got = store.get_effect(rec.key)
    assert got is not None
    back = _codecs.decode(got.payload, store.signer)
    pd.testing.assert_frame_equal(back, frame)
    assert back["c"].cat.ordered and list(back["c"].cat.categories) == ["b", "a"]


def test_a_frame_of_strings_is_stored_without_a_key_under_every_pandas(
    open_pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pandas 2 gives string columns the object dtype, which was pickled, and a store without
    a key stores no pickles: now it is an Arrow table there too."""
    pd = pytest.importorskip("pandas")
    monkeypatch.delenv("DURABLE_NB_KEY", raising=False)
    runtime._store = open_pg(key=None)
    calls: list[int] = []

    @dn.effect
    def frame(n: int) -> Any:
        calls.append(n)
        return pd.DataFrame({"a": [1, 2, 3], "s": ["x", "y", "z"]})

    first = frame(3)
    # as another process would: from the table, not from memory, with occurrences afresh
    runtime._store = open_pg(key=None)
    runtime.set_top_scope("test")
    again = frame(3)
    assert calls == [3]
    pd.testing.assert_frame_equal(again, first, check_exact=True)
    assert [type(v) for v in again["s"]] == [str, str, str]


def test_run_ids_and_names_are_parameters_not_sql(open_pg: Any) -> None:
    store = open_pg()
    nasty = "x'); DROP TABLE dn_runs; --"
    store.put_run(RunRecord(nasty, nasty, "queued", 1.0, 1.0))
    store.add_signal(SignalRecord(nasty, nasty, nasty, '"$1"', 1.0))
    payload = _codecs.encode(1, store.signer)
    store.put_effects([EffectRecord("run/" + nasty, nasty, "%s", "{}", 0, payload)])
    got = store.get_run(nasty)
    assert got is not None and got.workflow == nasty
    assert [s.name for s in store.list_signals(nasty)] == [nasty]
    assert store.get_effect(("run/" + nasty, nasty, "%s", "{}", 0)) is not None
    claimed = store.claim_run("me", [nasty])
    assert claimed is not None and claimed[0].run_id == nasty
    claimed[1].release()
    assert store.delete_run(nasty) is True


def test_text_postgres_cannot_hold_is_refused_and_changes_nothing(open_pg: Any) -> None:
    store = open_pg()
    for bad in ("nul\x00inside", "lone \udc80 surrogate"):
        with pytest.raises(
            StoreError,
            match=r"^the PostgreSQL store 'postgresql://.*' (refused a request: PostgreSQL text "
            r"fields cannot contain NUL|cannot keep text that is not UTF-8 \('utf-8' codec)",
        ):
            store.put_effects(
                [
                    EffectRecord("run/a", "m.f", "v1", "h0", 0, _codecs.encode(0, store.signer)),
                    EffectRecord("run/a", bad, "v1", "h1", 0, _codecs.encode(1, store.signer)),
                ]
            )
    assert store.load_effects("run/a") == []
    # the field is named (psycopg's own error would not say which), nothing is written
    for write, what in (
        (lambda: store.put_run(RunRecord("a", "wf\x00", "running", 1.0, 1.0)), "run's workflow"),
        (lambda: store.add_signal(SignalRecord("a", "s1", "go\x00", "1", 1.0)), "signal's name"),
        (
            lambda: store.append_events(
                [
                    EventRecord("a", "e1", 1.0, "started", "{}"),
                    EventRecord("a", "e2", 1.0, "x\x00", "{}"),
                ]
            ),
            "event's kind",
        ),
    ):
        with pytest.raises(
            StoreError,
            match=rf"^the PostgreSQL store 'postgresql://.*' refused a request: PostgreSQL text "
            rf"fields cannot contain NUL \(0x00\) characters, and the {what} '.*' has one; "
            "remove it$",
        ):
            write()
    assert store.get_run("a") is None and store.list_signals("a") == []
    assert store.load_events("a") == []


# ---------------------------------------------------------------------------- signing


class _Evil:
    """Unpickling this makes a directory: proof that a refused payload was never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def test_a_tampered_or_unsigned_pickle_is_refused_and_never_unpickled(
    open_pg: Any, tmp_path: Path
) -> None:
    store = open_pg()
    rec = EffectRecord("top/x", "m.f", "v1", "h", 0, _codecs.encode({1, 2}, store.signer))
    assert rec.payload.codec == "pickle"
    run = _run("r1", "completed")
    run.result = _codecs.encode({3}, store.signer)
    store.put_effects([rec])
    store.put_run(run)
    got = store.get_effect(rec.key)
    assert got is not None and _codecs.decode(got.payload, store.signer) == {1, 2}

    refused = (
        r"^refusing to unpickle a stored pickled value \(\d+ bytes, starting .*\): its signature "
        r"does not match the store's key; it was written by another key or tampered with"
    )
    # one bit flipped inside the signed pickle, by someone with write access to the database
    _sql(
        store.schema, "UPDATE {s}.dn_effects SET data = set_byte(data, 40, get_byte(data, 40) # 1)"
    )
    tampered = store.get_effect(rec.key)
    assert tampered is not None
    with pytest.raises(PayloadIntegrityError, match=refused):
        _codecs.decode(tampered.payload, store.signer)

    evil = pickle.dumps(_Evil(tmp_path / "pwned"))
    forged = _codecs.Signer(b"an attacker's own key, not ours").sign(evil)
    for data in (evil, forged):  # unsigned, and signed by another key
        _sql(store.schema, "UPDATE {s}.dn_effects SET data = %s", [data])
        _sql(store.schema, "UPDATE {s}.dn_runs SET result_data = %s", [data])
        bad = store.get_effect(rec.key)
        bad_run = store.get_run("r1")
        assert bad is not None and bad_run is not None and bad_run.result is not None
        with pytest.raises(PayloadIntegrityError, match=refused):
            _codecs.decode(bad.payload, store.signer)
        with pytest.raises(PayloadIntegrityError, match=refused):
            _codecs.decode(bad_run.result, store.signer)
    assert not (tmp_path / "pwned").exists()

    # through the engine: a cached result that was tampered with is refused, not unpickled
    runtime._store = store

    @dn.effect
    def parts() -> set[int]:
        return {1, 2}

    assert parts() == {1, 2}
    _sql(store.schema, "UPDATE {s}.dn_effects SET data = %s WHERE scope <> 'top/x'", [forged])
    runtime.top.reset()
    with pytest.raises(PayloadIntegrityError, match=refused):
        parts()
    assert not (tmp_path / "pwned").exists()


def test_the_key_comes_from_durable_nb_key(open_pg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DURABLE_NB_KEY", "the team's shared secret, 2026")
    kernel, worker = open_pg(key=None), open_pg(key=None)
    payload = _codecs.encode({"a", "b"}, kernel.signer)
    assert _codecs.decode(payload, worker.signer) == {"a", "b"}
    outsider = open_pg(key=b"some other team's secret key")
    with pytest.raises(PayloadIntegrityError, match=r"^refusing to unpickle"):
        _codecs.decode(payload, outsider.signer)
    monkeypatch.setenv("DURABLE_NB_KEY", "short")
    with pytest.raises(
        ArgumentError, match=r"^DURABLE_NB_KEY must be at least 16 characters long, got 5; "
    ):
        open_pg(key=None)


def test_without_a_key_plain_values_work_and_pickles_are_refused(
    open_pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DURABLE_NB_KEY", raising=False)
    store = open_pg(key=None)
    assert not store.signer.can_sign
    with pytest.raises(
        UnstorableValueError,
        match=r"^cannot store a value that needs pickle \(\d+ bytes\): the PostgreSQL store "
        r"'postgresql://.*' has no signing key for pickled payloads; set the environment "
        r"variable DURABLE_NB_KEY to a secret of at least 16 characters",
    ):
        _codecs.encode({1, 2}, store.signer)
    signed = _codecs.encode({1, 2}, _codecs.Signer(PG_TEST_KEY))
    with pytest.raises(
        PayloadIntegrityError,
        match=r"^refusing to unpickle a stored pickled value \(\d+ bytes\): the PostgreSQL store "
        r"'postgresql://.*' has no signing key to check it with; set the environment variable "
        r"DURABLE_NB_KEY",
    ):
        _codecs.decode(signed, store.signer)

    runtime._store = store
    calls: Counter[str] = Counter()

    @dn.effect(cache_errors=True)
    def fetch(x: int) -> dict[str, int]:
        calls["fetch"] += 1
        if x < 0:
            raise ValueError(f"negative: {x}")
        return {"x": x}

    @dn.durable
    async def fails(ctx: dn.Context) -> None:
        raise KeyError("boom")

    for _ in range(2):
        runtime.top.reset()
        assert fetch(1) == {"x": 1}
        with pytest.raises(ValueError, match=r"^negative: -1(\n|$)"):
            fetch(-1)
    assert calls["fetch"] == 2  # errors recorded as text replay without a key
    with pytest.raises(KeyError):
        dn.run(fails, run_id="keyless")
    run = store.get_run("keyless")
    assert run is not None and run.status == "failed" and run.error is not None
    assert repr(_codecs.decode_error(run.error, store.signer)) == "KeyError('boom')"


# ---------------------------------------------------------------------------- leases

_HOLDER = """
    import sys, time
    from durable_nb.store import RunRecord
    from durable_nb.store._postgres import PostgresStore

    store = PostgresStore(sys.argv[1], key=b"durable_nb test key, not a secret", lease_seconds=1.0)
    store.put_run(RunRecord("r1", "wf", "running", 1.0, 1.0))
    claimed = store.claim_run("victim", ["wf"])
    assert claimed is not None and claimed[0].run_id == "r1"
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_holders_lease_expires_and_another_process_takes_the_run(
    pg_url: str, open_pg: Any
) -> None:
    holder = _spawn(_HOLDER, pg_url)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr
        store = open_pg(lease_seconds=1.0)
        with pytest.raises(
            RunLockedError,
            match=rf"^run 'r1' is being executed by victim \(process {holder.pid} on .*\); its "
            r"lease has \d+\.\ds left and is renewed while that process lives",
        ):
            store.acquire_run("r1", "me")
        assert store.claim_run("me", ["wf"]) is None
        time.sleep(3.0)  # three lease periods: the live holder keeps renewing
        assert store.claim_run("me", ["wf"]) is None
        holder.send_signal(signal.SIGKILL)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60  # the lease expires about a second after the kill
    while (claimed := store.claim_run("me", ["wf"])) is None:
        assert time.monotonic() < deadline, "the run of the killed holder was not taken over"
        time.sleep(0.1)
    run, lease = claimed
    assert run.run_id == "r1" and run.status == "running"
    with pytest.raises(RunLockedError, match=r"^run 'r1' is being executed by me "):
        open_pg().acquire_run("r1", "other")
    lease.release()


def test_the_heartbeat_keeps_a_lease_alive_past_its_expiry(open_pg: Any) -> None:
    holder, other = open_pg(lease_seconds=1.0), open_pg()
    lease = holder.acquire_run("r1", "holder")
    time.sleep(3.5)
    with pytest.raises(RunLockedError, match=r"^run 'r1' is being executed by holder "):
        other.acquire_run("r1", "other")
    [(left,)] = _sql(holder.schema, "SELECT expires_at > now() FROM {s}.dn_leases")
    assert left is True
    lease.release()
    other.acquire_run("r1", "other").release()


def test_a_lease_taken_over_after_expiry_is_not_deleted_by_its_old_holder(
    open_pg: Any,
) -> None:
    old, new = open_pg(lease_seconds=30.0), open_pg()
    stale = old.acquire_run("r1", "old")
    # the old holder was cut off long enough for its lease to expire
    _sql(old.schema, "UPDATE {s}.dn_leases SET expires_at = now() - interval '1 second'")
    fresh = new.acquire_run("r1", "new")
    stale.release()  # must not release the new holder's lease
    with pytest.raises(RunLockedError, match=r"^run 'r1' is being executed by new "):
        old.acquire_run("r1", "old")
    fresh.release()


def test_closing_a_store_releases_its_leases(open_pg: Any) -> None:
    a, b = open_pg(), open_pg()
    lease = a.acquire_run("r1", "a")
    a.close()
    lease.release()  # after close: a no-op
    b.acquire_run("r1", "b").release()


_CLAIMER = """
    import json, os, sys, threading
    from durable_nb.store._postgres import PostgresStore

    store = PostgresStore(sys.argv[1], key=b"durable_nb test key, not a secret")
    got, lock = [], threading.Lock()

    def work(t):
        while (claimed := store.claim_run(f"{os.getpid()}-{t}", ["wf"])) is not None:
            run, lease = claimed
            with lock:
                got.append(run.run_id)
            run.status = "completed"  # as a worker does: finish, then let go
            store.put_run(run)
            lease.release()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    print(json.dumps(got))
"""


def test_claim_run_never_hands_one_run_to_two_claimers(pg_url: str, open_pg: Any) -> None:
    store = open_pg()
    for i in range(120):
        store.put_run(_run(f"r{i:03}", created=float(i)))
    procs = [_spawn(_CLAIMER, pg_url) for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    claimed: list[str] = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        claimed.extend(json.loads(out))
    counts = Counter(claimed)
    assert [r for r, n in counts.items() if n > 1] == []
    assert sorted(counts) == [f"r{i:03}" for i in range(120)]
    assert store.list_runs(status="queued") == []


def test_claim_run_takes_runs_oldest_first_and_skips_live_leases(open_pg: Any) -> None:
    store = open_pg()
    store.put_run(_run("new", created=3.0))
    store.put_run(_run("old", created=1.0))
    store.put_run(_run("mid", "waiting", created=2.0))
    store.put_run(_run("done", "completed", created=0.5))
    busy = store.acquire_run("old", "someone")
    first = store.claim_run("me", ["wf", "other"])
    assert first is not None and first[0].run_id == "mid"
    second = store.claim_run("me", ["wf"])
    assert second is not None and second[0].run_id == "new"
    assert store.claim_run("me", ["wf"]) is None
    assert store.claim_run("me", []) is None
    busy.release()
    third = store.claim_run("me", ["wf"])
    assert third is not None and third[0].run_id == "old"
    for _, lease in (first, second, third):
        lease.release()


# ---------------------------------------------------------------------------- wake-ups

_NOTIFIER = """
    import sys
    from durable_nb.store import RunRecord, SignalRecord
    from durable_nb.store._postgres import PostgresStore

    store = PostgresStore(sys.argv[1])
    if sys.argv[2] == "queue":
        store.put_run(RunRecord("q1", "wf", "queued", 1.0, 1.0))
    elif sys.argv[2] == "signal":
        store.add_signal(SignalRecord("w1", "s1", "go", "true", 1.0))
    else:
        store.acquire_run("w1", "other").release()
    store.close()
"""


@pytest.mark.parametrize("event", ["queue", "signal", "release"])
def test_listen_notify_wakes_wait_for_work_from_another_process(
    pg_url: str, open_pg: Any, event: str
) -> None:
    store = open_pg()
    store.wait_for_work(60)  # starts listening; returns once the listener is connected
    woken = threading.Event()

    def waiter() -> None:
        store.wait_for_work(600)  # far longer than the test: only a NOTIFY ends it in time
        woken.set()

    threading.Thread(target=waiter, daemon=True).start()
    proc = _spawn(_NOTIFIER, pg_url, event)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert woken.wait(60), f"wait_for_work was not woken by a {event} from another process"


def test_inbox_token_sees_signals_from_another_store(open_pg: Any) -> None:
    a, b = open_pg(), open_pg()
    before = a.inbox_token("r1")
    b.add_signal(SignalRecord("r1", "s1", "go", "1", 1.0))
    after = a.inbox_token("r1")
    assert after != before
    b.add_signal(SignalRecord("r1", "s1", "go", "1", 1.0))  # the same signal again
    assert a.inbox_token("r1") != after
    assert [s.signal_id for s in a.list_signals("r1")] == ["s1"]


def test_effect_claims_hold_across_stores_until_released_or_expired(open_pg: Any) -> None:
    a, b = open_pg(), open_pg()
    key = ("shared", "m.f", "v1", "h", 0)
    assert a.claim_effect(key, "a", 60.0) is True
    assert b.claim_effect(key, "b", 60.0) is False
    assert a.claim_effect(key, "a", 60.0) is True  # its own claim
    a.release_effect(key, "b")  # not b's to release: nothing happens
    assert b.claim_effect(key, "b", 60.0) is False
    a.release_effect(key, "a")
    assert b.claim_effect(key, "b", 0.2) is True
    _eventually(lambda: a.claim_effect(key, "a", 60.0), "the expiry of b's claim")
    assert b.claim_effect(key, "b", 60.0) is False


def test_require_postgres_is_a_failure_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import conftest

    monkeypatch.setattr(conftest, "_pg_problem", ["OperationalError: connection refused"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^PostgreSQL is not reachable at "):
        require_postgres()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"^PostgreSQL is not reachable at "):
        require_postgres()


def test_errors_recorded_without_a_key_never_import_the_module_they_name() -> None:
    signer = _codecs.Signer.without_key("the test store")
    payload = _codecs.encode_error(KeyError("boom"), signer)
    assert not payload.data.startswith(b"\x80")  # text, not a pickle
    back = _codecs.decode_error(payload, signer)
    assert type(back) is KeyError and back.args == ("boom",)
    # anyone who can write the store can write this text: a named module is not imported
    forged = _codecs.Payload("error", payload.data.replace(b'"builtins"', b'"antigravity"'))
    assert "antigravity" not in sys.modules
    rebuilt = _codecs.decode_error(forged, signer)
    assert isinstance(rebuilt, _codecs.RecordedError)
    assert rebuilt.reason == "LookupError: module 'antigravity' is not imported in this process"
    assert "antigravity" not in sys.modules
