"""The lean PostgreSQL connection the engine's loop writes through (``store/_pg_wire.py``):
binary arrays PostgreSQL reads back exactly, groups that commit all or nothing, errors of
psycopg's own classes, and a connection that dies under a waiting write."""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from durable_nb.store._pg_wire import LoopConnection, binary_array, placeholders

from .conftest import PG_URL, drop_schema, require_postgres
from .helpers import can_take, wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema() -> Iterator[str]:
    require_postgres()
    name = f"wire_{secrets.token_hex(4)}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        conn.execute(f"CREATE TABLE {name}.t (k text PRIMARY KEY, n bigint NOT NULL, b bytea)")
    yield name
    drop_schema(name)


def _rows(schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return conn.execute(f"SELECT k, n, b FROM {schema}.t ORDER BY k").fetchall()


def _go(body: Any) -> Any:
    async def main() -> Any:
        conn = await LoopConnection.connect(PG_URL, {}, asyncio.get_running_loop())
        try:
            return await body(conn)
        finally:
            conn.close()

    return asyncio.run(main())


def test_placeholders_number_the_parameters_and_keep_percent_signs() -> None:
    assert placeholders("SELECT %s, %b::text[], '100%%' || %s") == (
        b"SELECT $1, $2::text[], '100%' || $3",
        3,
    )
    with pytest.raises(ValueError, match="named placeholders"):
        placeholders("SELECT %(a)s")


@pytest.mark.parametrize(
    ("type_name", "values"),
    [
        ("text", ["", "a", "é ✓ 𝄞", None, "x" * 10_000]),
        ("bytea", [b"", b"\x00\xff", None, bytes(range(256))]),
        ("bigint", [0, -1, 2**63 - 1, -(2**63), None]),
        ("float8", [0.0, -1.5, 1e308, math.inf, None]),
        ("boolean", [True, False, None]),
        ("text", []),
    ],
)
def test_binary_arrays_read_back_exactly(type_name: str, values: list[Any]) -> None:
    require_postgres()
    array = binary_array(type_name, values)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        # the server parses the bytes as the array type the oid names, and answers in text
        res = conn.pgconn.exec_params(
            f"SELECT $1::{type_name}[]".encode(), [array.data], [array.oid], [1], 0
        )
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        text = res.get_value(0, 0)
        assert text is not None
        row = conn.execute(f"SELECT %s::text::{type_name}[]", [text.decode()]).fetchone()
    assert row is not None
    loaded = row[0]
    assert loaded == values


def test_a_group_commits_all_or_nothing_and_errors_keep_their_class(schema: str) -> None:
    ins = f"INSERT INTO {schema}.t (k, n, b) VALUES (%s, %s, %s)"

    async def body(conn: LoopConnection) -> None:
        await conn.run([(ins, ["a", 1, b"x"]), (ins, ["b", 2, None])])
        with pytest.raises(psycopg.errors.UniqueViolation):
            await conn.run([(ins, ["c", 3, b"y"]), (ins, ["a", 4, b"z"]), (ins, ["d", 5, None])])
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.run([(ins, ["e", 6, None]), ("SELECT 1 / %s", [0])])
        # the connection goes on after a failed group, its statements still prepared
        await conn.run([(ins, ["f", 7, b""])])
        assert not conn.broken

    _go(body)
    assert _rows(schema) == [("a", 1, b"x"), ("b", 2, None), ("f", 7, b"")]


def test_many_rows_as_binary_arrays_in_one_statement(schema: str) -> None:
    rows = [(f"k{i:03}", i * 7 - 300, None if i % 3 == 0 else bytes([i])) for i in range(200)]
    cols = list(zip(*rows, strict=True))
    q = f"INSERT INTO {schema}.t SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bytea[])"

    async def body(conn: LoopConnection) -> None:
        params = [
            binary_array(t, c) for t, c in zip(("text", "bigint", "bytea"), cols, strict=True)
        ]
        await conn.run([(q, params)])

    _go(body)
    assert _rows(schema) == rows


def test_a_connection_killed_under_a_waiting_write_fails_it(schema: str) -> None:
    async def body(conn: LoopConnection) -> None:
        pid = conn.backend_pid
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            task = asyncio.create_task(conn.run([("SELECT pg_sleep(30)", [])]))
            await asyncio.sleep(0.3)
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            with pytest.raises(psycopg.OperationalError):
                await asyncio.wait_for(task, 20)
        assert conn.broken
        with pytest.raises(psycopg.OperationalError):  # and says so to the next write
            await conn.run([("SELECT 1", [])])

    _go(body)


def test_a_group_larger_than_the_socket_buffer_is_sent_whole(schema: str) -> None:
    big = secrets.token_bytes(24 * 1024 * 1024)  # far past the kernel's socket buffer
    ins = f"INSERT INTO {schema}.t (k, n, b) VALUES (%s, %s, %s)"

    async def body(conn: LoopConnection) -> None:
        await conn.run([(ins, ["big", 1, big]), (ins, ["small", 2, b"s"])])

    _go(body)
    assert _rows(schema) == [("big", 1, big), ("small", 2, b"s")]


def test_a_connection_closed_from_another_thread_leaves_the_loop_clean(schema: str) -> None:
    """The store closes its loop writer's connection from the closing thread; the next
    connection the loop opens (often on the same descriptor) must work."""
    ins = f"INSERT INTO {schema}.t (k, n, b) VALUES (%s, %s, %s)"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(3):
            conn = await LoopConnection.connect(PG_URL, {}, loop)
            await conn.run([(ins, [f"k{i}", i, None])])
            await asyncio.to_thread(conn.close_threadsafe)
            assert conn.broken

    asyncio.run(main())
    assert [r[0] for r in _rows(schema)] == ["k0", "k1", "k2"]


def test_a_failed_prepare_is_forgotten_and_later_statements_still_prepare(schema: str) -> None:
    ins = f"INSERT INTO {schema}.t (k, n, b) VALUES (%s, %s, %s)"

    async def body(conn: LoopConnection) -> None:
        await conn.run([(ins, ["a", 1, None])])
        with pytest.raises(psycopg.errors.UndefinedTable):  # one new statement fine, one not
            await conn.run(
                [
                    (f"SELECT count(*) + %s FROM {schema}.t", [1]),
                    (f"SELECT * FROM {schema}.missing WHERE n = %s", [1]),
                ]
            )
        # new statements after the failed one get names of their own
        await conn.run([(f"SELECT %s::bigint + 1 FROM {schema}.t", [1])])
        await conn.run([(f"UPDATE {schema}.t SET n = %s WHERE k = %s", [5, "a"])])

    _go(body)
    assert _rows(schema) == [("a", 5, None)]


def test_a_close_while_a_send_waits_for_room_fails_the_group(schema: str) -> None:
    """The server is busy with the group's first statement, so the socket fills while the
    rest (24 MB) is sent; closing the connection then fails the group at once instead of
    leaving it waiting for room that never comes."""
    big = secrets.token_bytes(24 * 1024 * 1024)

    async def body(conn: LoopConnection) -> None:
        await conn.run([("SELECT pg_sleep(%s)", [0.0]), ("SELECT length(%s::bytea)", [b""])])
        group = asyncio.ensure_future(
            conn.run([("SELECT pg_sleep(%s)", [5.0]), ("SELECT length(%s::bytea)", [big])])
        )
        for _ in range(500):
            if conn._writable is not None:  # waiting for room in the socket
                break
            await asyncio.sleep(0.01)
        assert conn._writable is not None
        conn.close()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(group, 3)

    _go(body)


def test_a_closed_loop_writer_connects_and_sends_no_more(pg_url: str) -> None:
    from durable_nb.errors import StoreError
    from durable_nb.store._pg_commit import LoopCommit
    from durable_nb.store._postgres import PostgresStore

    from .conftest import PG_TEST_KEY

    store = PostgresStore(pg_url, key=PG_TEST_KEY)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        writer = LoopCommit(
            store._conninfo, store._connect_kwargs, store._sql, store._translate, loop
        )
        told: list[BaseException | None] = []
        writer.submit([], [("SELECT 1", [])], told.append)
        while not told:
            await asyncio.sleep(0.01)
        assert told == [None] and writer._conn is not None
        writer.close_now()
        await asyncio.sleep(0.05)  # the close runs on the loop
        writer.submit([], [("SELECT 1", [])], told.append)
        while len(told) < 2:
            await asyncio.sleep(0.01)
        assert isinstance(told[1], StoreError) and "closed" in str(told[1])
        assert writer._conn is None

    try:
        asyncio.run(main())
    finally:
        store.close()


# ------------------------------------------------------------------ groups sent with a callback
# The engine's writer sends a group with a callback (``send(..., then)``): the socket's reader
# collects the answer and tells the outcome, once, with no task awaiting it.


async def _answer(
    conn: LoopConnection, statements: list[Any], drains: bool = False
) -> list[BaseException | None]:
    """Send ``statements`` with a callback and wait until it was called; every call made.
    ``drains``: the group does not fit in the socket, the rest goes as it drains."""
    told: list[BaseException | None] = []
    if conn.send(statements, told.append) is None:  # not all prepared yet: nothing was sent
        await conn._prepare(statements)
        assert conn.send(statements, told.append) == len(statements)
    assert conn._draining == drains
    for _ in range(2000):
        if told:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # a second call would come now
    return told


def test_a_group_sent_with_a_callback_is_told_its_outcome_once(schema: str) -> None:
    ins = f"INSERT INTO {schema}.t (k, n, b) VALUES (%s, %s, %s)"
    big = secrets.token_bytes(24 * 1024 * 1024)  # sent as the socket drains

    async def body(conn: LoopConnection) -> None:
        await conn.run([(ins, ["a", 1, None])])
        assert await _answer(conn, [(ins, ["b", 2, b"x"]), (ins, ["c", 3, None])]) == [None]
        told = await _answer(conn, [(ins, ["d", 4, None]), (ins, ["a", 5, None])])
        assert len(told) == 1 and isinstance(told[0], psycopg.errors.UniqueViolation)
        told = await _answer(conn, [(ins, ["e", 6, None]), ("SELECT 1 / %s", [0])])
        assert len(told) == 1 and isinstance(told[0], psycopg.errors.DivisionByZero)
        assert await _answer(conn, [(ins, ["big", 7, big]), (ins, ["f", 8, None])], True) == [None]
        assert not conn._draining
        await conn.run([(ins, ["g", 9, None])])  # the awaited path goes on after them
        assert not conn.broken

    _go(body)
    assert [r[:2] for r in _rows(schema)] == [
        ("a", 1),
        ("b", 2),
        ("big", 7),
        ("c", 3),
        ("f", 8),
        ("g", 9),
    ]


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_a_callback_group_is_told_when_its_connection_goes(schema: str, how: str) -> None:
    """A close (the store closing) or a backend the server ended under the group tells it
    the error, once: nobody waits for an answer that will never come."""

    async def body(conn: LoopConnection) -> None:
        await conn.run([("SELECT pg_sleep(%s)", [0.0])])
        told: list[BaseException | None] = []
        assert conn.send([("SELECT pg_sleep(%s)", [30.0])], told.append) == 1
        await asyncio.sleep(0.3)
        if how == "close":
            conn.close()
            assert len(told) == 1  # at once, from the close
        else:
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [conn.backend_pid])
            for _ in range(2000):
                if told:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert len(told) == 1 and isinstance(told[0], psycopg.OperationalError), told
        assert conn.broken

    _go(body)


@pytest.mark.parametrize("path", ["sent", "committed by the task"])
def test_a_loop_torn_down_under_a_group_tells_its_writers(pg_url: str, path: str) -> None:
    """``asyncio.run`` ends (a worker stopping) while the writer's group waits for the
    server, whether it was sent at once or is committed by the writer's task (the first
    write on a loop connects and prepares): the task, cancelled with the loop, tells the
    group it was interrupted, so the loop's teardown does not wait for an answer."""
    from durable_nb.errors import StoreError
    from durable_nb.store._pg_commit import LoopCommit
    from durable_nb.store._postgres import PostgresStore

    from .conftest import PG_TEST_KEY

    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    told: list[BaseException | None] = []

    async def main() -> LoopCommit:
        loop = asyncio.get_running_loop()
        writer = LoopCommit(
            store._conninfo, store._connect_kwargs, store._sql, store._translate, loop
        )
        if path == "sent":
            writer.submit([], [("SELECT pg_sleep(%s)", [0.0])], told.append)  # connects
            while not told:
                await asyncio.sleep(0.01)
        writer.submit([], [("SELECT pg_sleep(%s)", [30.0])], told.append)
        await asyncio.sleep(0.3)
        if path == "sent":
            assert writer._sent is not None  # sent at once: no task awaits it
        else:
            assert writer._committing is not None
        return writer  # the loop is torn down with the group under way

    try:
        done: list[LoopCommit] = []
        thread = threading.Thread(target=lambda: done.append(asyncio.run(main())))
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), "the loop's teardown waited for the group's answer"
        assert done and not done[0].busy
        assert told[:-1] == ([None] if path == "sent" else []) and len(told) == 1 + (path == "sent")
        assert isinstance(told[-1], StoreError) and "interrupted" in str(told[-1])
    finally:
        store.close()


def test_a_lease_let_go_on_a_loop_torn_down_at_once_is_let_go_all_the_same(pg_url: str) -> None:
    """A run's lease let go as a write of its loop's writer, and the loop torn down before
    the writer's task even began (a worker stopping right after its last run): the write is
    cut, and the writer thread lets the lease go instead, so another process takes the run
    at once rather than after the lease expires."""
    from durable_nb.store._postgres import PostgresStore

    from .conftest import PG_TEST_KEY

    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    lease = store.acquire_run("let-go", "me")

    async def main() -> None:
        assert lease.release_later(asyncio.get_running_loop()) is not None

    try:
        asyncio.run(main())  # ends at once: the writer's task is cancelled before it starts
        # let go soon, not when the lease expires
        wait_until(lambda: can_take(other, "let-go"), "the lease let go", timeout=10)
    finally:
        other.close()
        store.close()
