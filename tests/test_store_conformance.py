"""The Store protocol's invariants, checked against every store implementation."""

from __future__ import annotations

import threading

import pytest

from durable_nb import _codecs
from durable_nb.errors import RunLockedError
from durable_nb.store import EffectRecord, EventRecord, RunRecord, SignalRecord, Store


def _eff(store: Store, scope: str, n: int, value: object = None, **kw: object) -> EffectRecord:
    payload = _codecs.encode(value if value is not None else {"n": n}, store.signer)
    return EffectRecord(scope, "mod.f", "v1", f"h{n}", 0, payload, seq=n, **kw)  # type: ignore[arg-type]


def test_put_then_get_effect(store: Store) -> None:
    rec = _eff(store, "run/a", 1)
    store.put_effects([rec])
    got = store.get_effect(rec.key)
    assert got is not None
    assert got.key == rec.key
    assert _codecs.decode(got.payload, store.signer) == {"n": 1}
    assert store.get_effect(("run/a", "mod.f", "v1", "h1", 1)) is None


def test_effects_survive_flush_and_load_in_seq_order(store: Store) -> None:
    store.put_effects([_eff(store, "run/a", n) for n in (3, 1, 2)])
    store.put_effects([_eff(store, "run/b", 9)])
    store.flush()
    loaded = store.load_effects("run/a")
    assert [r.seq for r in loaded] == [1, 2, 3]
    assert [_codecs.decode(r.payload, store.signer) for r in loaded] == [
        {"n": 1},
        {"n": 2},
        {"n": 3},
    ]


def test_last_write_wins_per_key(store: Store) -> None:
    store.put_effects([_eff(store, "run/a", 1, value="old")])
    store.put_effects([_eff(store, "run/a", 1, value="new")])
    store.flush()
    got = store.get_effect(("run/a", "mod.f", "v1", "h1", 0))
    assert got is not None and _codecs.decode(got.payload, store.signer) == "new"
    assert len(store.load_effects("run/a")) == 1


def test_table_payload_round_trips(store: Store) -> None:
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x": [1, 2, None], "s": ["a", None, "c"]})
    rec = _eff(store, "run/t", 1, value=table)
    store.put_effects([rec])
    store.flush()
    got = store.get_effect(rec.key)
    assert got is not None
    assert _codecs.decode(got.payload, store.signer).equals(table)


def test_delete_effects_only_touches_its_scope(store: Store) -> None:
    store.put_effects([_eff(store, "run/a", n) for n in range(3)] + [_eff(store, "top/x", 1)])
    assert store.get_effect(("run/a", "mod.f", "v1", "h1", 0)) is not None
    assert store.delete_effects("run/a") == 3
    assert store.load_effects("run/a") == []
    assert store.get_effect(("run/a", "mod.f", "v1", "h1", 0)) is None
    assert len(store.load_effects("top/x")) == 1


def _run(run_id: str, status: str = "running", created: float = 1.0) -> RunRecord:
    return RunRecord(run_id, "mod.wf", status, created, created)  # type: ignore[arg-type]


def test_runs_put_get_list_delete(store: Store) -> None:
    store.put_run(_run("r1", created=1.0))
    store.put_run(_run("r2", "completed", created=2.0))
    r1 = store.get_run("r1")
    assert r1 is not None and r1.status == "running" and r1.workflow == "mod.wf"
    assert [r.run_id for r in store.list_runs()] == ["r2", "r1"]
    assert [r.run_id for r in store.list_runs(status="completed")] == ["r2"]
    assert store.list_runs(workflow="other") == []
    store.put_effects([_eff(store, "run/r1", 1)])
    store.add_signal(SignalRecord("r1", "s1", "go", "true", 1.0))
    assert store.delete_run("r1") is True
    assert store.get_run("r1") is None
    assert store.load_effects("run/r1") == []
    assert store.list_signals("r1") == []
    assert store.delete_run("r1") is False


def test_run_payloads_round_trip(store: Store) -> None:
    run = _run("r1", "completed")
    run.result = _codecs.encode([1, 2, 3], store.signer)
    run.custom_status = '{"stage": "x"}'
    run.status_version = 4
    store.put_run(run)
    got = store.get_run("r1")
    assert got is not None
    assert got.result is not None and _codecs.decode(got.result, store.signer) == [1, 2, 3]
    assert got.custom_status == '{"stage": "x"}' and got.status_version == 4


def test_signals_in_order_and_inbox_token_changes(store: Store) -> None:
    before = store.inbox_token("r1")
    store.add_signal(SignalRecord("r1", "b", "go", "2", 2.0))
    store.add_signal(SignalRecord("r1", "a", "go", "1", 1.0))
    store.add_signal(SignalRecord("r2", "c", "go", "3", 0.5))
    assert [s.payload for s in store.list_signals("r1")] == ["1", "2"]
    assert store.inbox_token("r1") != before


def test_events_in_time_order(store: Store) -> None:
    store.append_events(
        [EventRecord("r1", "e2", 2.0, "completed"), EventRecord("r1", "e1", 1.0, "started")]
    )
    assert [e.kind for e in store.load_events("r1")] == ["started", "completed"]


def test_one_executor_per_run(store: Store) -> None:
    lease = store.acquire_run("r1", "me")
    with pytest.raises(RunLockedError, match=r"^run 'r1' is (already )?being executed by "):
        store.acquire_run("r1", "you")
    other = store.acquire_run("r2", "you")  # other runs are independent
    lease.release()
    lease.release()  # idempotent
    store.acquire_run("r1", "you").release()
    other.release()


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    def write(t: int) -> None:
        for i in range(50):
            store.put_effects([_eff(store, f"run/t{t}", i)])

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.flush()
    assert [len(store.load_effects(f"run/t{t}")) for t in range(4)] == [50] * 4
