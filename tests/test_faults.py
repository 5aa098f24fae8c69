"""A store that fails its n-th write, for every n: a run either fails cleanly or completes, and
resuming on a healthy store never re-executes a step whose record was written."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.engine import runtime
from durable_nb.errors import StoreError
from durable_nb.store import EffectRecord, EventRecord, MemoryStore, RunRecord, SignalRecord

executions: Counter[int] = Counter()


class FailingStore(MemoryStore):
    """Shares a healthy store's data; raises on its n-th write."""

    def __init__(self, base: MemoryStore, fail_at: int) -> None:
        self.__dict__.update(base.__dict__)  # same dicts, same signer
        self.fail_at = fail_at
        self.writes = 0

    def _tick(self) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            raise StoreError(f"injected failure at write {self.writes}")

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        self._tick()
        super().put_effects(records)

    def put_run(self, run: RunRecord) -> None:
        self._tick()
        super().put_run(run)

    def add_signal(self, signal: SignalRecord) -> None:
        self._tick()
        super().add_signal(signal)

    def append_events(self, events: Sequence[EventRecord]) -> None:
        self._tick()
        super().append_events(events)


@dn.effect
async def work(i: int) -> int:
    executions[i] += 1
    await asyncio.sleep(0)
    return i * 10


@dn.durable
async def flow(ctx: dn.Context, n: int) -> int:
    total = 0
    for i in range(n):
        total += await work(i)
        if i == 2:
            await ctx.sleep(1)
            ctx.set_status({"i": i})
    pair = await asyncio.gather(work(100), work(101))
    return total + sum(pair)


def _recorded(store: MemoryStore) -> set[int]:
    from durable_nb import _codecs

    return {
        int(_codecs.decode(r.payload, store.signer)) // 10
        for r in store.load_effects("run/f")
        if r.kind == "effect"
    }


def _writes_of_a_clean_run() -> int:
    """How many writes a healthy run of ``flow`` makes: every one of them is failed once."""
    old_store, old_clock = runtime._store, runtime.clock
    counting = FailingStore(MemoryStore(), fail_at=0)  # never fails, only counts
    runtime._store, runtime.clock = counting, dn.FakeClock()
    try:
        dn.run(flow, 6, run_id="f")
    finally:
        runtime._store, runtime.clock = old_store, old_clock
        executions.clear()
    return counting.writes


WRITES = _writes_of_a_clean_run()


def test_the_clean_run_makes_the_writes_the_fault_tests_fail() -> None:
    assert WRITES >= 10, WRITES  # its steps, status changes and events: each failed below


# every write of the run fails once; the last case fails none (the run completes)
@pytest.mark.parametrize("fail_at", range(1, WRITES + 2))
def test_a_failing_write_never_loses_a_recorded_step(fail_at: int) -> None:
    executions.clear()
    base = MemoryStore()
    runtime._store = FailingStore(base, fail_at)
    outcome: Any
    try:
        outcome = dn.run(flow, 6, run_id="f")
    except StoreError as e:
        outcome = e
    recorded = _recorded(base)
    before = Counter(executions)
    runtime._store = base
    assert dn.run(flow, 6, run_id="f") == sum(i * 10 for i in range(6)) + 2010
    for i in recorded:  # a step whose record was written is never executed again
        assert executions[i] == before[i] == 1
    assert all(c <= 2 for c in executions.values())
    if isinstance(outcome, int):
        assert outcome == 2160
