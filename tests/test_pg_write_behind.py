"""PostgreSQL: the engine's own records (ctx steps, statuses, trace events) never block the
engine's loop for a round trip, and a durable history is always a prefix of what the run did.

Real PostgreSQL; the store's blocking write (``GroupCommit.write``) is watched for calls on
the engine's thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import durable_nb as dn
from durable_nb import _codecs
from durable_nb.errors import StoreError
from durable_nb.store._pg_commit import GroupCommit
from durable_nb.store._postgres import PostgresStore

from .conftest import PG_TEST_KEY

pytestmark = pytest.mark.postgres


@pytest.fixture
def blocking_on_engine(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each blocking write made on the engine's thread (should stay empty)."""
    calls: list[str] = []
    write = GroupCommit.write

    def watched(self: GroupCommit, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread().name == "durable_nb-engine":
            calls.append(repr(args)[:200])
        write(self, *args, **kwargs)

    monkeypatch.setattr(GroupCommit, "write", watched)
    return calls


def test_ctx_steps_statuses_and_events_do_not_block_the_loop(
    pg_url: str, blocking_on_engine: list[str]
) -> None:
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    executed: list[int] = []

    @dn.effect(name="wb.step")
    async def step(i: int) -> int:
        executed.append(i)
        return i

    @dn.durable(name="wb.flow")
    async def flow(ctx: dn.Context) -> list[Any]:
        seen: list[Any] = []
        for i in range(3):
            seen.append(ctx.now().timestamp())
            seen.append(ctx.random())
            seen.append(str(ctx.uuid()))
            ctx.set_status({"i": i})
            ctx.log.info("step %d", i)
            await ctx.sleep(0.01)
            seen.append(await step(i))
        return seen

    try:
        first = dn.run(flow, run_id="wb")
        assert blocking_on_engine == []
        # every value the workflow saw was recorded: a replay returns the same, executing
        # nothing again
        assert dn.run(flow, run_id="wb") == first
        assert executed == [0, 1, 2]
        assert dn.resume("wb").result(timeout=60) == first
        assert executed == [0, 1, 2]
        run = store.get_run("wb")
        assert run is not None and run.status == "completed"
        assert [e.kind for e in store.load_events("wb")][:1] == ["started"]
    finally:
        dn.set_store(":memory:")


def test_signal_waits_and_interrupt_blocks_read_the_inbox_off_the_loop(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal wait polls the store's inbox; on PostgreSQL each poll is a round trip, so it
    must not be made on the engine's thread, where every other run waits for it."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    on_engine: list[str] = []
    reads = 0
    for name in ("inbox_token", "list_signals"):
        real = getattr(store, name)

        def watched(run_id: str, _real: Any = real, _name: str = name) -> Any:
            nonlocal reads
            reads += 1
            if threading.current_thread().name == "durable_nb-engine":
                on_engine.append(_name)
            return _real(run_id)

        monkeypatch.setattr(store, name, watched)
    dn.set_store(store)
    dn.set_clock(None)

    @dn.durable(name="wb.waits")
    async def waits(ctx: dn.Context) -> Any:
        try:
            async with ctx.interrupt_on("stop"):
                got = await ctx.wait_signal("go", timeout=60)
                await ctx.sleep(60)
        except dn.Interrupted as e:
            return [got, e.payload]
        return "not interrupted"

    try:
        job = dn.start(waits, run_id="waits")
        client = dn.Client(store)
        for _ in range(1200):
            if store.get_run("waits") is not None:
                break
            threading.Event().wait(0.05)
        client.signal("waits", "go", 1)
        for _ in range(1200):  # until the wait took it: then the run sleeps in the block
            if any(e.kind == "signal_received" for e in store.load_events("waits")):
                break
            threading.Event().wait(0.05)
        client.signal("waits", "stop", {"why": "enough"})
        assert job.result(timeout=60) == [1, {"why": "enough"}]
        assert reads > 0
        assert on_engine == []
    finally:
        dn.set_store(":memory:")


def test_runs_waiting_on_one_loop_poll_their_inboxes_in_one_read(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 runs wait for signals from another process: the loop's poller asks the store for
    all their inbox tokens in one call each round, not one round trip per run, and a signal
    sent from another store object (another process's) still reaches every run."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    batches: list[list[str]] = []
    singles: list[str] = []
    tokens, token = store.inbox_tokens, store.inbox_token

    def many(run_ids: Any) -> Any:
        batches.append(list(run_ids))
        return tokens(run_ids)

    def one(run_id: str) -> Any:
        singles.append(run_id)
        return token(run_id)

    monkeypatch.setattr(store, "inbox_tokens", many)
    monkeypatch.setattr(store, "inbox_token", one)
    dn.set_store(store)
    dn.set_clock(None)

    @dn.durable(name="wb.waiter")
    async def waiter(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("go")

    ids = [f"w{k:02}" for k in range(20)]
    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    try:
        jobs = [dn.start(waiter, run_id=r) for r in ids]
        for _ in range(1200):  # until every run waits
            if all((rec := store.get_run(r)) and rec.status == "waiting" for r in ids):
                break
            threading.Event().wait(0.05)
        singles.clear()
        batches.clear()
        for _ in range(1200):  # until two rounds of the poller asked
            if len(batches) >= 2:
                break
            threading.Event().wait(0.05)
        assert len(batches) >= 2
        # each round asks for all 20 in one call (with any other run on the engine's loop)
        assert all(set(ids) <= set(b) for b in batches[:2]), batches
        assert singles == []  # nothing changed: no run asked on its own
        client = dn.Client(other)
        for k, r in enumerate(ids):
            client.signal(r, "go", k)
        assert [job.result(timeout=60) for job in jobs] == list(range(20))
    finally:
        other.close()
        dn.set_store(":memory:")


def test_a_poll_answered_after_the_run_continued_as_new_goes_to_the_new_generation(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's poller asks for the inbox tokens of the runs it polls; if a run continues
    as new before the store answers, what the answer shows (here a cancel sent from another
    process meanwhile) must reach the new generation, not the old one: the run ends
    cancelled, not interrupted."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    other = PostgresStore(pg_url, key=PG_TEST_KEY)
    second = threading.Event()
    tokens = store.inbox_tokens
    held: list[bool] = []

    def late(run_ids: Any) -> Any:
        if not held:  # the first round: answer once the run continued as new, and a cancel
            held.append(True)  # was sent meanwhile
            assert second.wait(30)
            dn.Client(other).cancel("can", "enough")
        return tokens(run_ids)

    monkeypatch.setattr(store, "inbox_tokens", late)
    dn.set_store(store)
    dn.set_clock(None)

    @dn.durable(name="wb.generations")
    async def generations(ctx: dn.Context, gen: int) -> Any:
        if gen == 0:
            while not held:  # the poller has this generation in its round
                await asyncio.sleep(0.05)
            ctx.continue_as_new(1)
        second.set()
        await ctx.sleep(120)  # a timer: only the poller reads the inbox meanwhile
        return "slept"

    try:
        job = dn.start(generations, 0, run_id="can")
        with pytest.raises(dn.RunCancelledError):
            job.result(timeout=60)
        rec = store.get_run("can")
        assert rec is not None and rec.status == "cancelled"
    finally:
        other.close()
        dn.set_store(":memory:")


def test_a_failed_write_behind_fails_the_run_and_history_stays_a_prefix(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ctx step's record that cannot be written fails the run at its next effect, whose
    record is then not written either (the history stays a prefix of what the run did: no
    record depends on a missing one); resumed, the run draws that step afresh, the effect
    runs again on it (as after a crash inside it), and the run completes."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)
    executed: list[int] = []
    real_submit = GroupCommit.submit
    fail = {"on": True}

    def failing_submit(
        self: GroupCommit, effects: Any, statements: Any, done: Any, *a: Any
    ) -> None:
        if fail["on"] and any(row[1] == "dn.uuid" for row in effects):
            fail["on"] = False
            done(StoreError("injected: the uuid's record was not written"))
            return
        real_submit(self, effects, statements, done, *a)

    monkeypatch.setattr(GroupCommit, "submit", failing_submit)

    @dn.effect(name="wb2.step")
    async def step(x: str) -> str:
        executed.append(1)
        return x

    @dn.durable(name="wb2.flow")
    async def flow(ctx: dn.Context) -> str:
        return await step(str(ctx.uuid()))

    try:
        with pytest.raises(StoreError, match="injected"):
            dn.run(flow, run_id="wb2")
        assert executed == [1]
        identities = {r.identity for r in store.load_effects("run/wb2")}
        assert "dn.uuid" not in identities and "wb2.step" not in identities
        got = dn.run(flow, run_id="wb2")
        assert executed == [1, 1]
        recs = {r.identity: r for r in store.load_effects("run/wb2")}
        for name in ("dn.uuid", "wb2.step"):
            payload = recs[name].payload
            assert payload is not None and _codecs.decode(payload, store.signer) == got
    finally:
        dn.set_store(":memory:")


def test_write_behind_keeps_the_loop_free_for_other_runs(pg_url: str) -> None:
    """Many runs doing only ctx steps on one loop: they all complete, and each one's
    history holds every step it took, in order."""
    store = PostgresStore(pg_url, key=PG_TEST_KEY)
    dn.set_store(store)
    dn.set_clock(None)

    @dn.durable(name="wb3.flow")
    async def flow(ctx: dn.Context, n: int) -> list[float]:
        out = []
        for _ in range(n):
            out.append(ctx.random())
            await asyncio.sleep(0)
        return out

    try:
        jobs = [dn.start(flow, 20, run_id=f"wb3-{k}") for k in range(20)]
        results = [j.result(timeout=120) for j in jobs]
        for k, got in enumerate(results):
            recs = sorted(
                (r for r in store.load_effects(f"run/wb3-{k}") if r.identity == "dn.random"),
                key=lambda r: r.seq,
            )
            assert [_codecs.decode(r.payload, store.signer) for r in recs if r.payload] == got
    finally:
        dn.set_store(":memory:")
