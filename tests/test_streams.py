"""Streams (ctx.stream / job.stream) and streaming effects (async-generator @effect):
writers and readers in one process, across threads and across processes; exactly-once chunk
positions after a SIGKILL; streaming effects resuming from the chunks they had received."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb import trace
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    EffectTimeoutError,
    StoreUnavailableError,
    StreamClosedError,
    UnstorableValueError,
)
from durable_nb.store import EffectRecord, MemoryStore, Store

ROOT = Path(__file__).resolve().parent.parent

calls: list[Any] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    flaky["fail"] = False


def _stream(store: Store, run_id: str, name: str) -> list[tuple[int, str, Any]]:
    """The stored records of a stream: (position, kind, value)."""
    recs = [r for r in store.load_effects("stream/" + run_id) if r.identity == name]
    recs.sort(key=lambda r: r.occurrence)
    return [(r.occurrence, r.kind, json.loads(r.payload.data)) for r in recs]


# ------------------------------------------------------------------------ writer / reader
@dn.durable
async def writer(ctx: dn.Context, n: int) -> int:
    async with ctx.stream("tokens") as w:
        for i in range(n):
            assert await w.write(f"t{i}") == i
    return n


def test_reader_after_the_writer_gets_every_chunk_then_ends(store: Store) -> None:
    assert dn.run(writer, 4, run_id="w") == 4
    expected = ["t0", "t1", "t2", "t3"]
    assert list(dn.get_job("w").stream("tokens")) == expected  # the plain-for form

    async def read() -> list[Any]:
        return [c async for c in dn.get_job("w").stream("tokens")]

    assert asyncio.run(read()) == expected
    assert _stream(store, "w", "tokens") == [
        (0, "chunk", "t0"),
        (1, "chunk", "t1"),
        (2, "chunk", "t2"),
        (3, "chunk", "t3"),
        (4, "stream_end", None),
    ]
    # the run's trace shows each write and the close as steps of kind "stream"
    steps = trace.run_trace(store, "w")["steps"]
    assert [(s["kind"], s["name"]) for s in steps] == [("stream", "dn.stream:tokens")] * 4 + [
        ("stream", "dn.stream_close:tokens")
    ]
    assert json.loads(steps[1]["args"]) == {"stream": "tokens", "index": 1, "chunk": "'t1'"}
    assert json.loads(steps[4]["args"]) == {"stream": "tokens", "closed": True, "chunks": 4}


@dn.durable
async def gated(ctx: dn.Context, n: int) -> str:
    w = ctx.stream("s")
    for i in range(n):
        await ctx.wait_signal("next")
        await w.write({"i": i})
    await w.close()
    return "done"


def test_async_reader_started_before_the_writer_sees_each_chunk_live() -> None:
    async def main() -> tuple[list[Any], str]:
        job = dn.start(gated, 3, run_id="g")  # on this loop
        got: list[Any] = []

        async def read() -> None:
            async for chunk in job.stream("s"):
                got.append(chunk)
                if len(got) < 3:
                    job.signal("next")  # the next chunk is written only once this one was read

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        assert got == []
        job.signal("next")
        await asyncio.wait_for(reader, 60)
        return got, await job.wait()

    got, result = asyncio.run(main())
    assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert result == "done"


def test_plain_for_reader_in_another_thread_follows_a_run_on_the_engine_loop() -> None:
    job = dn.start(gated, 3, run_id="t")  # no loop in this thread: the engine's loop runs it
    got: list[Any] = []

    def read() -> None:
        for chunk in job.stream("s"):
            got.append(chunk)
            if len(got) < 3:
                job.signal("next")

    t = threading.Thread(target=read)
    t.start()
    job.signal("next")
    t.join(60)
    assert not t.is_alive()
    assert got == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert job.result() == "done"


@dn.durable
async def unclosed(ctx: dn.Context) -> int:
    w = ctx.stream("s")
    await w.write(b"\x00raw")
    await w.write(bytearray(b"ba"))
    await w.write([1, {"two": 2.5}, None, True])
    return 3


def test_a_reader_ends_when_the_run_ends_without_closing_the_stream() -> None:
    async def main() -> list[Any]:
        job = dn.start(unclosed, run_id="u")
        return [c async for c in job.stream("s")]

    assert asyncio.run(main()) == [b"\x00raw", b"ba", [1, {"two": 2.5}, None, True]]
    assert list(dn.get_job("u").stream("s")) == [b"\x00raw", b"ba", [1, {"two": 2.5}, None, True]]
    assert list(dn.get_job("u").stream("never-written")) == []


def test_writers_of_one_name_share_positions_and_a_rerun_writes_nothing(
    store: Store, clock: dn.FakeClock
) -> None:
    state = {"fail": True}

    @dn.durable(name="shared_positions")
    async def wf(ctx: dn.Context) -> list[int]:
        a, b = ctx.stream("s"), ctx.stream("s")
        positions = [await a.write("a0"), await b.write("b0"), await a.write("a1")]
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("after three writes")
        positions.append(await b.write("b1"))
        await a.close()
        await b.close()  # already closed through a: harmless
        return positions

    with pytest.raises(RuntimeError, match=r"^after three writes$"):
        dn.run(wf, run_id="p")
    clock.advance(1)  # the trace tells executions apart by time
    assert dn.run(wf, run_id="p") == [0, 1, 2, 3]
    assert [v for _, _, v in _stream(store, "p", "s")] == ["a0", "b0", "a1", "b1", None]
    steps = trace.run_trace(store, "p")["steps"]
    assert [s["state"] for s in steps] == ["replayed"] * 3 + ["executed"] * 2


# -------------------------------------------------------------------------- across processes
def _child(tmp: Path, code: str, *args: str, store: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DURABLE_NB_STORE": store or str(tmp / "s.duckdb"),
            "DURABLE_NB_KEY": "streams test key",
        },
    )


@pytest.fixture(params=["duckdb", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store two processes share: a DuckDB file (one process holds it at a time, so chunks
    reach the other in bursts) or a PostgreSQL schema."""
    if request.param == "duckdb":
        yield str(tmp_path / "s.duckdb")
    else:
        yield request.getfixturevalue("pg_url")


REMOTE_WRITER = """
    import durable_nb as dn

    @dn.durable
    async def wf(ctx):
        w = ctx.stream("tokens")
        for i in range(3):
            await w.write(f"t{i}")
        print("WROTE", flush=True)
        await ctx.wait_signal("more")
        for i in range(3, 5):
            await w.write(f"t{i}")
        await w.close()
        return "ok"

    print("RESULT", dn.run(wf, run_id="x"), flush=True)
"""


def test_reader_here_follows_a_run_in_another_process(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DURABLE_NB_KEY", "streams test key")
    p = _child(tmp_path, REMOTE_WRITER, store=shared_url)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "WROTE"
        dn.set_store(shared_url)
        dn.set_clock(None)
        got = []
        for chunk in dn.get_job("x").stream("tokens"):
            got.append(chunk)
            if len(got) == 3:  # the rest is written only after this signal
                dn.signal("x", "more")
        assert got == ["t0", "t1", "t2", "t3", "t4"]
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert "RESULT ok" in out
    finally:
        p.kill()
        p.communicate()


REMOTE_READER = """
    import durable_nb as dn

    for chunk in dn.get_job("here").stream("tokens"):
        print(chunk, flush=True)
    print("END", flush=True)
"""


@dn.durable(name="here_writer")
async def here_writer(ctx: dn.Context) -> str:
    w = ctx.stream("tokens")
    for i in range(3):
        await w.write(f"t{i}")
    await ctx.wait_signal("more")
    for i in range(3, 5):
        await w.write(f"t{i}")
    await w.close()
    return "ok"


def test_reader_in_another_process_follows_a_run_here(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DURABLE_NB_KEY", "streams test key")
    dn.set_store(shared_url)
    dn.set_clock(None)
    job = dn.start(here_writer, run_id="here")
    p = _child(tmp_path, REMOTE_READER, store=shared_url)
    try:
        assert p.stdout is not None
        lines = [p.stdout.readline().strip() for _ in range(3)]
        assert lines == ["t0", "t1", "t2"]
        job.signal("more")
        assert job.result(timeout=60) == "ok"
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.split() == ["t3", "t4", "END"]
    finally:
        p.kill()
        p.communicate()


KILLED_WRITER = """
    import os, signal
    import durable_nb as dn

    @dn.durable
    async def wf(ctx):
        w = ctx.stream("nums")
        for i in range(10):
            await w.write(i)
            if i == 4 and not os.path.exists("killed"):
                open("killed", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        await w.close()
        return "done"

    print("RESULT", dn.run(wf, run_id="k"), flush=True)
"""


def test_sigkill_after_five_writes_then_resume_stores_each_chunk_once(tmp_path: Path) -> None:
    p = _child(tmp_path, KILLED_WRITER)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err
    p = _child(tmp_path, KILLED_WRITER)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "RESULT done" in out
    store = dn.set_store(str(tmp_path / "s.duckdb"))
    assert _stream(store, "k", "nums") == [(i, "chunk", i) for i in range(10)] + [
        (10, "stream_end", None)
    ]
    assert list(dn.get_job("k").stream("nums")) == list(range(10))
    steps = trace.run_trace(store, "k")["steps"]
    assert [s["state"] for s in steps if s["kind"] == "stream"] == ["replayed"] * 5 + [
        "executed"
    ] * 6


# -------------------------------------------------------------------------- streaming effects
WORDS = [f"w{i} " for i in range(20)]


@dn.effect
async def llm(prompt: str, resume_from: Sequence[str] = ()) -> AsyncIterator[str]:
    """Continues from the chunks already received, like an LLM given the partial answer."""
    calls.append(("call", prompt, list(resume_from)))
    for tok in WORDS[len(resume_from) :]:
        await asyncio.sleep(0)
        calls.append(tok)
        if len(calls) == 9 and flaky["fail"]:
            flaky["fail"] = False
            raise ConnectionError("stream dropped")
        yield tok


flaky = {"fail": False}


@dn.durable
async def chat(ctx: dn.Context, prompt: str) -> tuple[list[str], str]:
    call = llm(prompt)
    seen = [tok async for tok in call]
    return seen, await call


def test_streaming_effect_iterates_awaits_and_replays_without_running(
    store: Store, clock: dn.FakeClock
) -> None:
    state = {"fail": True}

    @dn.durable(name="chat_then_fail")
    async def wf(ctx: dn.Context) -> tuple[list[str], str]:
        seen, text = await chat.fn(ctx, "hi")
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("after the effect")
        return seen, text

    with pytest.raises(RuntimeError):
        dn.run(wf, run_id="c")
    assert calls[0] == ("call", "hi", [])
    assert len(calls) == 21
    clock.advance(1)
    seen, text = dn.run(wf, run_id="c")  # replays: the generator is not called again
    assert seen == WORDS and text == "".join(WORDS)
    assert len(calls) == 21
    steps = trace.run_trace(store, "c")["steps"]
    assert [(s["kind"], s["state"]) for s in steps] == [("stream", "replayed")]
    assert json.loads(steps[0]["args"]) == {"args": "('hi')", "chunks": 20}


def test_failed_stream_resumes_from_the_chunks_received(store: Store) -> None:
    flaky["fail"] = True  # the first call breaks after yielding 7 tokens
    with pytest.raises(ConnectionError, match=r"^stream dropped$"):
        dn.run(chat, "hi", run_id="f")
    assert calls[0] == ("call", "hi", []) and calls[1:] == WORDS[:8]
    recorded = [r for r in store.load_effects("stream/f") if r.identity.startswith("dn.chunk:")]
    assert sorted(r.occurrence for r in recorded) == list(range(7))
    calls.clear()
    seen, text = dn.run(chat, "hi", run_id="f")
    assert calls[0] == ("call", "hi", WORDS[:7])  # resume_from: what was received
    assert calls[1:] == WORDS[7:]
    assert seen == WORDS and text == "".join(WORDS)


def test_retry_resumes_the_stream_in_the_same_execution() -> None:
    flaky["fail"] = True

    @dn.effect(retry=dn.Retry(attempts=2, initial_delay=1))
    async def retried(prompt: str, resume_from: Sequence[str] = ()) -> AsyncIterator[str]:
        async for tok in llm.fn(prompt, resume_from=resume_from):
            yield tok

    @dn.durable(name="retrying_chat")
    async def wf(ctx: dn.Context) -> str:
        return str(await retried("hi"))

    assert dn.run(wf, run_id="r") == "".join(WORDS)
    assert [c for c in calls if isinstance(c, tuple)] == [
        ("call", "hi", []),
        ("call", "hi", WORDS[:7]),
    ]


deterministic_calls: list[int] = []


@dn.effect
async def counter(n: int) -> AsyncIterator[int]:
    """No resume_from: called afresh, the chunks already received are skipped."""
    deterministic_calls.append(n)
    for i in range(n):
        await asyncio.sleep(0)
        if i == 5 and len(deterministic_calls) == 1:
            raise ConnectionError("dropped at 5")
        yield i


def test_a_generator_without_resume_from_is_called_afresh_and_skips_what_was_received(
    store: Store,
) -> None:
    deterministic_calls.clear()
    seen: list[int] = []

    @dn.durable(name="count_chunks")
    async def wf(ctx: dn.Context) -> int:
        seen.clear()
        call = counter(8)
        async for i in call:
            seen.append(i)
        return int(sum(await call))

    with pytest.raises(ConnectionError):
        dn.run(wf, run_id="d")
    assert seen == [0, 1, 2, 3, 4]
    assert dn.run(wf, run_id="d") == sum(range(8))
    assert seen == list(range(8))  # each chunk once: 0-4 replayed, 5-7 new (0-4 dropped)
    assert deterministic_calls == [8, 8]


def test_custom_reducer_and_default_reducers() -> None:
    @dn.effect(reducer=lambda chunks: sum(chunks))
    async def numbers() -> AsyncIterator[int]:
        for i in range(5):
            yield i

    @dn.effect
    async def blobs() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    @dn.effect
    async def records() -> AsyncIterator[dict[str, int]]:
        yield {"a": 1}
        yield {"b": 2}

    @dn.effect
    async def nothing() -> AsyncIterator[str]:
        return
        yield ""

    async def main() -> list[Any]:
        return [await numbers(), await blobs(), await records(), await nothing()]

    assert asyncio.run(main()) == [10, b"abcd", [{"a": 1}, {"b": 2}], []]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[tuple[str, str]]] = []

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        self.writes.append([(r.kind, r.identity) for r in records])
        super().put_effects(records)


def test_chunks_arriving_in_one_loop_iteration_share_one_store_write() -> None:
    store = runtime._store = CountingStore()

    @dn.effect
    async def burst(n: int, pause_every: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            if pause_every and (i + 1) % pause_every == 0:
                await asyncio.sleep(0)  # the loop turns: what arrived so far is journaled

    @dn.durable(name="bursty")
    async def wf(ctx: dn.Context) -> list[Any]:
        return [await burst(12, 0), await burst(12, 4)]

    assert dn.run(wf, run_id="b") == [list(range(12))] * 2
    chunk_writes = [w for w in store.writes if ("chunk", "dn.chunk:" + burst.identity) in w]
    assert [len(w) for w in chunk_writes] == [12, 4, 4, 4]
    assert sum(("stream", burst.identity) in w for w in store.writes) == 2  # the two results


def test_chunks_are_durable_before_the_workflow_sees_them() -> None:
    store = runtime._store = CountingStore()
    stored_when_seen: list[int] = []

    @dn.effect
    async def ticks() -> AsyncIterator[int]:
        for i in range(6):
            await asyncio.sleep(0)
            yield i

    @dn.durable(name="observer")
    async def wf(ctx: dn.Context) -> None:
        async for i in ticks():
            chunks = [
                r for r in store.load_effects("stream/o") if r.identity.startswith("dn.chunk:")
            ]
            stored_when_seen.append(len(chunks))
            assert i < len(chunks)

    dn.run(wf, run_id="o")
    assert stored_when_seen == sorted(stored_when_seen) and len(stored_when_seen) == 6


def test_top_level_streaming_effect_memoizes_value_and_chunks() -> None:
    async def consume() -> tuple[list[str], str]:
        call = llm("top")
        return [t async for t in call], await call

    first = asyncio.run(consume())
    assert len(calls) == 21
    runtime.top.reset()  # a new cell: occurrences count afresh
    again = asyncio.run(consume())
    runtime.top.reset()
    awaited_only = asyncio.run(_await(llm("top")))
    assert first == again == (WORDS, "".join(WORDS))
    assert awaited_only == "".join(WORDS)
    assert len(calls) == 21  # replayed twice, executed once


async def _await(aw: Any) -> Any:
    return await aw


def test_mirrored_chunks_reach_run_stream_readers_live(store: Store) -> None:
    @dn.effect(stream="tokens")
    async def speak(n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(0)
            yield f"s{i}"

    @dn.durable(name="speaker")
    async def wf(ctx: dn.Context) -> str:
        w = ctx.stream("tokens")
        await w.write("<start>")
        text = await speak(3)
        await w.write("<end>")
        await w.close()
        return str(text)

    async def main() -> tuple[list[Any], str]:
        job = dn.start(wf, run_id="m")
        return [c async for c in job.stream("tokens")], await job.wait()

    got, text = asyncio.run(main())
    assert got == ["<start>", "s0", "s1", "s2", "<end>"]
    assert text == "s0s1s2"
    steps = trace.run_trace(store, "m")["steps"]
    assert [s["kind"] for s in steps] == ["stream"] * 4  # write, the effect, write, close


def test_live_steps_report_chunk_counts_to_listeners() -> None:
    @dn.effect
    async def three() -> AsyncIterator[str]:
        for t in "abc":
            await asyncio.sleep(0)
            yield t

    @dn.durable(name="listened")
    async def wf(ctx: dn.Context) -> str:
        await ctx.stream("s").write("x")
        return str(await three())

    messages: list[dict[str, Any]] = []

    async def main() -> None:
        job = dn.start(wf, run_id="l")
        job.subscribe(messages.append)
        await job.wait()

    asyncio.run(main())
    steps = [(m["step"], m["state"], m.get("chunks")) for m in messages if m["kind"] == "step"]
    assert ("stream", "executed", None) in steps  # the write
    assert [c for s, st, c in steps if st == "running" and c is not None] == [1, 2, 3]
    assert steps[-1][:2] == ("stream", "executed")  # the effect's result


def test_breaking_out_stops_the_generator_and_a_later_await_continues() -> None:
    produced: list[int] = []

    @dn.effect
    async def endless_ish(resume_from: Sequence[int] = ()) -> AsyncIterator[int]:
        for i in range(len(resume_from), 10):
            await asyncio.sleep(0)
            produced.append(i)
            yield i

    async def main() -> tuple[list[int], Any]:
        call = endless_ish()
        first = []
        async for i in call:
            first.append(i)
            if i == 2:
                break
        for _ in range(10):
            await asyncio.sleep(0)  # the abandoned iteration is closed; the generator stops
        stopped_at = len(produced)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(produced) == stopped_at  # stopped for good, not just slow
        return [*first, stopped_at], await call

    (a, b, c, stopped_at), value = asyncio.run(main())
    assert [a, b, c] == [0, 1, 2]
    assert stopped_at < 10
    assert value == list(range(10))
    assert sorted(produced) == list(range(10))  # nothing produced twice


def test_streaming_effect_timeout() -> None:
    @dn.effect(timeout=0.05)
    async def stalls() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(3600)
        yield "b"

    with pytest.raises(
        EffectTimeoutError,
        match=r"^streaming effect .*stalls did not finish within timeout=0\.05s; raise the timeout",
    ):
        asyncio.run(_await(stalls()))


def test_ctx_run_streams_a_plain_async_generator() -> None:
    async def plain(n: int) -> AsyncIterator[str]:
        for i in range(n):
            yield str(i)

    @dn.durable(name="ctx_run_stream")
    async def wf(ctx: dn.Context) -> str:
        return str(await ctx.run(plain, 3))

    assert dn.run(wf, run_id="cr") == "012"


@dn.effect
async def two_tokens(gen: int) -> AsyncIterator[str]:
    calls.append(gen)
    yield f"g{gen}a "
    yield f"g{gen}b "


@dn.durable(name="generations")
async def generations(ctx: dn.Context, n: int) -> int:
    w = ctx.stream("log")
    await w.write(f"gen {n}")
    await w.write(await two_tokens(0))  # the same call in each generation executes afresh
    if n < 2:
        ctx.continue_as_new(n + 1)
    await w.close()
    return n


def test_streams_continue_across_generations_of_a_run(store: Store) -> None:
    assert dn.run(generations, 0, run_id="gen") == 2
    assert list(dn.get_job("gen").stream("log")) == [
        "gen 0",
        "g0a g0b ",
        "gen 1",
        "g0a g0b ",
        "gen 2",
        "g0a g0b ",
    ]
    assert calls == [0, 0, 0]


def test_streaming_effect_retries_within_total_timeout(clock: dn.FakeClock) -> None:
    @dn.effect(retry=dn.Retry(attempts=5, initial_delay=10, backoff=2, total_timeout=15))
    async def breaks(resume_from: Sequence[str] = ()) -> AsyncIterator[str]:
        calls.append(list(resume_from))
        yield f"t{len(resume_from)}"
        raise ConnectionError("dropped")

    @dn.durable(name="total_timeout_stream")
    async def wf(ctx: dn.Context) -> str:
        return str(await breaks())

    with pytest.raises(
        EffectTimeoutError,
        match=(
            r"^effect .*breaks did not succeed within total_timeout=15s \(2 failed attempts, "
            r"the last with ConnectionError\('dropped'\)\)"
        ),
    ):
        dn.run(wf, run_id="tt")
    assert calls == [[], ["t0"]]  # the retry resumed from the chunk received
    assert clock.slept == [10]


def test_cached_streaming_error_replays_its_chunks_then_raises() -> None:
    @dn.effect(cache_errors=True)
    async def half() -> AsyncIterator[str]:
        calls.append("called")
        yield "a"
        raise ValueError("no more")

    async def consume() -> list[str]:
        got: list[str] = []
        with pytest.raises(ValueError, match=r"^no more"):
            async for t in half():
                got.append(t)
        return got

    assert asyncio.run(consume()) == ["a"]
    runtime.top.reset()
    assert asyncio.run(consume()) == ["a"]  # replayed: the recorded chunk, then the error
    runtime.top.reset()
    with pytest.raises(ValueError, match=r"^no more"):
        asyncio.run(_await(half()))
    assert calls == ["called"]


@dn.durable(name="strict_streams", strict=True)
async def strict_streams(ctx: dn.Context) -> str:
    await ctx.stream("s").write("x")
    text = str(await two_tokens(1))
    if flaky["fail"]:
        flaky["fail"] = False
        raise RuntimeError("once")
    await ctx.stream("s").write(text)
    return text


def test_streams_replay_in_recorded_order_under_strict() -> None:
    flaky["fail"] = True
    with pytest.raises(RuntimeError, match=r"^once$"):
        dn.run(strict_streams, run_id="strict")
    assert dn.run(strict_streams, run_id="strict") == "g1a g1b "
    assert list(dn.get_job("strict").stream("s")) == ["x", "g1a g1b "]
    assert calls == [1]


def test_a_streaming_call_is_not_a_plain_iterable() -> None:
    with pytest.raises(
        BlockingCallError,
        match=r"^a call of streaming effect .*llm is read with `async for` \(or `await`ed",
    ):
        list(llm("sync"))


class FailingStore(MemoryStore):
    """Fails its n-th put_effects call (0: never), like a full disk."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.puts = fail_at, 0

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise StoreUnavailableError("disk full (injected)")
        super().put_effects(records)


@dn.effect(stream="s")
async def spoken(n: int, resume_from: Sequence[str] = ()) -> AsyncIterator[str]:
    for i in range(len(resume_from), n):
        await asyncio.sleep(0)
        calls.append(i)
        yield f"e{i}"


@dn.durable(name="mixed_stream")
async def mixed(ctx: dn.Context) -> str:
    w = ctx.stream("s")
    for i in range(3):
        await w.write(f"w{i}")
    text = await spoken(4)
    await w.write("end")
    await w.close()
    return str(text)


def test_a_store_failing_at_any_write_leaves_a_stream_that_resumes_exactly_once() -> None:
    expected = ["w0", "w1", "w2", "e0", "e1", "e2", "e3", "end"]
    clean = runtime._store = FailingStore(0)
    assert dn.run(mixed, run_id="clean") == "e0e1e2e3"
    writes = clean.puts
    assert writes == 3 + 4 + 1 + 1 + 1  # writes, chunk batches, the effect's result, write, close
    for n in range(1, writes + 1):
        calls.clear()
        store = runtime._store = FailingStore(n)
        with pytest.raises(StoreUnavailableError, match=r"^disk full \(injected\)$"):
            dn.run(mixed, run_id=f"f{n}")
        store.fail_at = 0
        assert dn.run(mixed, run_id=f"f{n}") == "e0e1e2e3", n
        assert list(dn.get_job(f"f{n}").stream("s")) == expected, n
        assert sorted(calls) == [0, 1, 2, 3], n  # each chunk produced once, failure or not


LLM_SCRIPT = """
    import asyncio, json, os, signal
    import durable_nb as dn

    WORDS = [f"w{i} " for i in range(20)]

    def log(entry):
        with open("llm.log", "a") as f:
            f.write(json.dumps(entry) + "\\n")

    @dn.effect(stream="live")
    async def llm(prompt, resume_from=()):
        log({"call": list(resume_from)})
        for tok in WORDS[len(resume_from):]:
            await asyncio.sleep(0.02)
            log({"tok": tok})
            yield tok

    @dn.durable
    async def wf(ctx):
        call = llm("hi")
        seen = []
        async for tok in call:
            seen.append(tok)
            if len(seen) == 7 and not os.path.exists("killed"):
                open("killed", "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        text = await call
        if not os.path.exists("failed"):
            open("failed", "w").close()
            raise RuntimeError("fail once after the effect")
        return {"seen": seen, "text": text}

    print("RESULT", json.dumps(dn.run(wf, run_id="s")), flush=True)
"""


def test_streaming_effect_killed_half_read_resumes_from_what_it_received(tmp_path: Path) -> None:
    def log() -> list[dict[str, Any]]:
        return [json.loads(line) for line in (tmp_path / "llm.log").read_text().splitlines()]

    p = _child(tmp_path, LLM_SCRIPT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err
    first = log()
    assert first[0] == {"call": []}
    assert [e["tok"] for e in first[1:8]] == WORDS[:7]

    p = _child(tmp_path, LLM_SCRIPT)  # resumes: replays 7 tokens, continues, then fails once
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "fail once after the effect" in err, err
    second = log()[len(first) :]
    assert second[0] == {"call": WORDS[:7]}
    assert [e["tok"] for e in second[1:]] == WORDS[7:]

    p = _child(tmp_path, LLM_SCRIPT)  # resumes again: the effect replays, nothing is called
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert len(log()) == len(first) + len(second)
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result == {"seen": WORDS, "text": "".join(WORDS)}
    store = dn.set_store(str(tmp_path / "s.duckdb"))
    assert [v for _, _, v in _stream(store, "s", "live")] == WORDS  # mirrored once each


STREAMING_CELL = """%%durable chat_cell
import durable_nb as dn

@dn.effect(stream="tokens")
async def speak(prompt, resume_from=()):
    for word in ["hello ", "from ", "a ", "cell"][len(resume_from):]:
        tick(word)
        yield word

async with ctx.stream("tokens") as w:
    await w.write(">>> ")
    answer = speak("hi")
    heard = [t async for t in answer]
    text = await answer
text
"""


def test_streams_in_a_durable_cell_replay_after_a_restart() -> None:
    from IPython.core.interactiveshell import InteractiveShell

    shell: Any = InteractiveShell.instance()  # IPython is untyped
    shell.run_cell("%load_ext durable_nb", store_history=False)
    try:
        shell.user_ns["calls"] = calls
        shell.run_cell("def tick(v):\n    calls.append(v)\n", store_history=False)
        for _ in range(2):  # the second time, as after a kernel restart: it replays
            for name in ("heard", "text", "answer", "w", "speak"):
                shell.user_ns.pop(name, None)
            res = shell.run_cell(STREAMING_CELL, store_history=False)
            assert res.error_in_exec is None and res.error_before_exec is None
            assert res.result == "hello from a cell"
            assert shell.user_ns["heard"] == ["hello ", "from ", "a ", "cell"]
        assert calls == ["hello ", "from ", "a ", "cell"]  # generated once
        assert list(dn.get_job("chat_cell").stream("tokens")) == [
            ">>> ",
            "hello ",
            "from ",
            "a ",
            "cell",
        ]
    finally:
        shell.run_cell("%unload_ext durable_nb", store_history=False)
        for name in ("heard", "text", "answer", "w", "speak", "tick", "calls"):
            shell.user_ns.pop(name, None)


# ------------------------------------------------------------------------------ bad input
@dn.durable
async def misuse(ctx: dn.Context, what: str) -> None:
    if what == "name":
        ctx.stream(3)  # type: ignore[arg-type]
    elif what == "empty":
        ctx.stream("")
    elif what == "after close":
        w = ctx.stream("tokens")
        await w.write("a")
        await w.close()
        await w.write("b")
    elif what == "closed elsewhere":
        await ctx.stream("tokens").close()
        await ctx.stream("tokens").write("b")
    elif what == "chunk":
        await ctx.stream("tokens").write(object())
    elif what == "tuple":
        await ctx.stream("tokens").write((1, 2))
    elif what == "mirror closed":

        @dn.effect(stream="tokens")
        async def gen() -> AsyncIterator[str]:
            yield "x"

        await ctx.stream("tokens").close()
        await gen()


@pytest.mark.parametrize(
    ("what", "error", "message"),
    [
        ("name", ArgumentTypeError, r"^name must be a str naming the stream, got 3; use a short"),
        ("empty", ArgumentError, r"^name must be 1-200 printable characters, got ''"),
        (
            "after close",
            StreamClosedError,
            r"^stream 'tokens' of run 'after close' is closed; write every chunk before closing",
        ),
        ("closed elsewhere", StreamClosedError, r"^stream 'tokens' of run 'closed elsewhere'"),
        (
            "chunk",
            UnstorableValueError,
            r"^a chunk written to stream 'tokens' must be JSON data \(None, bool, int, float, "
            r"str, list, dict\) or bytes, got <object object at .*> of type object; convert",
        ),
        ("tuple", UnstorableValueError, r"^a chunk written to stream 'tokens' must be JSON"),
        ("mirror closed", StreamClosedError, r"^stream 'tokens' of run 'mirror closed' is closed"),
    ],
)
def test_bad_stream_use_is_refused(what: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        dn.run(misuse, what, run_id=what)


def test_bad_reader_and_effect_arguments_are_refused() -> None:
    dn.run(writer, 1, run_id="ok")
    with pytest.raises(ArgumentTypeError, match=r"^name must be a str naming the stream, got None"):
        dn.get_job("ok").stream(None)  # type: ignore[arg-type]

    async def agen() -> AsyncIterator[int]:
        yield 1

    def plain() -> int:
        return 1

    with pytest.raises(
        ArgumentTypeError, match=r"^reducer must be a callable taking the list of chunks, got 5$"
    ):
        dn.effect(reducer=5)(agen)  # type: ignore[call-overload]
    with pytest.raises(
        ArgumentTypeError,
        match=(
            r"^reducer= is for streaming effects, whose function is an async generator "
            r"\(`async def` with `yield`\); .*plain is not one: remove reducer= or make it yield"
        ),
    ):
        dn.effect(reducer=sum)(plain)
    with pytest.raises(ArgumentTypeError, match=r"^stream= is for streaming effects"):
        dn.effect(stream="tokens")(plain)
    with pytest.raises(ArgumentTypeError, match=r"^stream must be a str naming the stream, got 3"):
        dn.effect(stream=3)(agen)  # type: ignore[call-overload]

    async def no_default(*, resume_from: list[int]) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(
        ArgumentTypeError,
        match=r"^.*no_default declares resume_from without a default; give it one",
    ):
        dn.effect(no_default)
    with pytest.raises(
        ArgumentError,
        match=r"^resume_from=\['w0 '\] passed to streaming effect .*llm; durable_nb passes it",
    ):
        llm("x", resume_from=["w0 "])


def test_a_plain_for_on_the_runs_own_loop_is_refused() -> None:
    async def main() -> None:
        job = dn.start(gated, 1, run_id="own")
        with pytest.raises(
            BlockingCallError,
            match=re.escape(
                "a plain `for` over stream 's' would block the event loop that runs 'own'; "
                "use `async for chunk in job.stream('s')` here"
            ),
        ):
            iter(job.stream("s"))
        job.cancel()
        with pytest.raises(dn.RunCancelledError):
            await job.wait()

    asyncio.run(main())
