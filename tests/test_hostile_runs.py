"""Run ids, kv keys and values, stream names and chunks, queue names and messages, signal
names and payloads: each hostile one is stored and replayed exactly, or refused with one of
durable_nb's errors with nothing written; on DuckDB and on PostgreSQL. A name with a NUL
character (PostgreSQL cannot keep it) or a lone surrogate is refused on every store (issue
20, item 6; what the properties share: ``hostile.py``). One run per example exercises them
all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import durable_nb as dn
from durable_nb import errors
from durable_nb._journal import queue_signal
from durable_nb.store import Store

from .hostile import (
    HOSTILE_NAMES,
    JSONISH,
    PROFILE,
    RUN_IDS,
    RUN_STORE_KINDS,
    count,
    engine_on,
    entry,
    own_error,
    same,
    timed,
    unkeepable,
    write_mark,
)


class PlannedFailure(Exception):
    pass


_FAIL_FIRST: set[str] = set()
REFUSED = "<refused>"


def _refusal(e: Exception) -> str:
    if not own_error(e):
        raise e
    return f"{REFUSED} {type(e).__name__}"


def _refused(seen: Any) -> bool:
    return isinstance(seen, str) and seen.startswith(REFUSED)


@dn.durable(name="hostile.steps", version="1")
async def steps(
    ctx: dn.Context,
    kv_key: Any,
    kv_value: Any,
    stream: Any,
    chunk: Any,
    queue: Any,
    signal: Any,
) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    try:
        ctx.kv[kv_key] = kv_value
        seen["kv"] = ctx.kv[kv_key]
    except Exception as e:
        seen["kv"] = _refusal(e)
        seen["kv keys after refusal"] = sorted(ctx.kv)
    try:
        w = ctx.stream(stream)
    except Exception as e:
        seen["stream"] = _refusal(e)
    else:
        try:
            seen["stream"] = await w.write(chunk)
        except Exception as e:
            seen["stream"] = _refusal(e)
        seen["next position"] = await w.write("sentinel")
    try:
        seen["queue"] = await ctx.dequeue(queue)
    except Exception as e:
        seen["queue"] = _refusal(e)
    try:
        seen["signal"] = await ctx.wait_signal(signal)
    except Exception as e:
        seen["signal"] = _refusal(e)
    if ctx.run_id in _FAIL_FIRST:
        _FAIL_FIRST.discard(ctx.run_id)
        raise PlannedFailure("the first execution fails after its steps, so they replay")
    return seen


def _sent(send: Callable[[Any], None], value: Any, fallback: Any) -> tuple[str, Any]:
    """Send ``value``; when the value (not the name) is refused, send ``fallback`` so the
    run is not left waiting. Returns ("sent" | "refused name" | "refused value", what went)."""
    try:
        send(value)
        return "sent", value
    except errors.UnstorableValueError:
        try:
            send(fallback)
        except Exception as e:  # the name too, by a store that refuses it only when written
            assert own_error(e), f"sending {fallback!r} raised {e!r}"
            return "refused name", None
        return "refused value", fallback
    except Exception as e:
        assert own_error(e), f"sending {value!r} raised {e!r}"
        return "refused name", None


_JSON_TYPES = (type(None), bool, int, float, str, list, dict)


def _json_exact(value: Any) -> bool:
    """Whether JSON text gives ``value`` back as it is (no tuples, only str keys)."""
    if type(value) in (list,):
        return all(_json_exact(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return type(value) in _JSON_TYPES


@pytest.mark.parametrize("store_pair", RUN_STORE_KINDS, indirect=True)
def test_run_ids_kv_streams_queues_and_signals_replay_exactly_or_are_refused(
    store_pair: tuple[Store, Store],
) -> None:
    writer, reader = store_pair
    names = {
        what: entry(what, writer)
        for what in ("run id", "kv key/value", "stream chunk", "queue message", "signal")
    }
    serial = iter(range(10**9))

    @PROFILE
    @given(
        run_id=RUN_IDS,
        kv_key=HOSTILE_NAMES,
        kv_value=JSONISH,
        stream=HOSTILE_NAMES,
        chunk=JSONISH | st.binary(),
        queue=HOSTILE_NAMES,
        message=JSONISH,
        signal=HOSTILE_NAMES,
        payload=JSONISH,
    )
    def check(
        run_id: Any,
        kv_key: Any,
        kv_value: Any,
        stream: Any,
        chunk: Any,
        queue: Any,
        message: Any,
        signal: Any,
        payload: Any,
    ) -> None:
        args = (kv_key, kv_value, stream, chunk, queue, signal)
        if isinstance(run_id, str) and run_id:
            run_id += f"#{next(serial)}"  # a new run each time; "" stays ""
        mark = write_mark(writer)
        if isinstance(run_id, str):
            _FAIL_FIRST.add(run_id)  # before it starts: a run with nothing to wait for ends at once
        try:
            job = dn.start(steps, *args, run_id=run_id)
        except Exception as e:
            assert own_error(e), f"run id {run_id!r} raised {e!r}"
            assert write_mark(writer) == mark, f"run id {run_id!r} was refused but written"
            count(names["run id"], "refused")
            run_id = f"fallback-{next(serial)}"
            _FAIL_FIRST.add(run_id)
            job = dn.start(steps, *args, run_id=run_id)
        else:
            assert not unkeepable(run_id), f"run id {run_id!r} was kept"
            count(names["run id"], "stored")
        queued = _sent(lambda m: job.enqueue(queue, m), message, "fallback")
        signalled = _sent(lambda p: job.signal(signal, p), payload, None)
        with pytest.raises(PlannedFailure):
            job.result(timeout=60)
        writer.flush()
        with engine_on(reader):
            seen = dn.run(steps, *args, run_id=run_id)  # replays every step from the database
        assert reader.get_run(run_id) is not None
        if _refused(seen["kv"]):
            assert kv_key not in seen["kv keys after refusal"]
            count(names["kv key/value"], "refused")
        else:
            assert not unkeepable(kv_key), f"kv key {kv_key!r} was kept"
            assert _json_exact(kv_value) and same(seen["kv"], kv_value), (kv_value, seen["kv"])
            count(names["kv key/value"], "stored")
        if _refused(seen["stream"]):
            assert seen.get("next position", 0) == 0  # the refused chunk took no position
            count(names["stream chunk"], "refused")
        else:
            assert not unkeepable(stream), f"stream {stream!r} was kept"
            assert seen["stream"] == 0 and seen["next position"] == 1
            got = list(dn.get_job(run_id).stream(stream))
            expected = bytes(chunk) if isinstance(chunk, bytearray) else chunk
            assert same(got[0], expected), (chunk, got)
            count(names["stream chunk"], "stored")
        kept = [s.name for s in writer.list_signals(run_id)]
        for what, name, (outcome, sent), got in (
            ("queue message", queue, queued, seen["queue"]),
            ("signal", signal, signalled, seen["signal"]),
        ):
            if outcome == "refused name":
                assert _refused(got), (what, got)
                queued_as = what == "queue message" and isinstance(name, str)
                stored_as = queue_signal(name) if queued_as else name
                assert stored_as not in kept, f"{what} name {name!r} was refused but stored"
                count(names[what], "refused")
            else:
                assert not unkeepable(name), f"{what} name {name!r} was kept"
                assert same(got, sent), f"{what}: sent {sent!r}, the run got {got!r}"
                count(names[what], "stored" if outcome == "sent" else "refused")

    with timed(names["run id"]):
        check()
