"""The Store protocol's invariants, checked against every store implementation."""

from __future__ import annotations

import threading
import time

import pytest

from durable_nb import _codecs
from durable_nb.errors import ArgumentTypeError, RunLockedError
from durable_nb.store import (
    EffectRecord,
    EventRecord,
    RunLease,
    RunRecord,
    RunStart,
    SignalRecord,
    Store,
    run_scopes,
)


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
    decoded = _codecs.decode(got.payload, store.signer)
    assert isinstance(decoded, pa.Table) and decoded.equals(table)


def test_delete_effects_only_touches_its_scope(store: Store) -> None:
    store.put_effects([_eff(store, "run/a", n) for n in range(3)] + [_eff(store, "top/x", 1)])
    assert store.get_effect(("run/a", "mod.f", "v1", "h1", 0)) is not None
    assert store.delete_effects("run/a") == 3
    assert store.load_effects("run/a") == []
    assert store.get_effect(("run/a", "mod.f", "v1", "h1", 0)) is None
    assert len(store.load_effects("top/x")) == 1


def test_effect_scopes_lists_the_scopes_with_records_under_a_prefix(store: Store) -> None:
    assert store.effect_scopes("top/") == []
    store.put_effects(
        [_eff(store, s, 1) for s in ("top/b.ipynb", "top/a.py", "run/r", "shared", "top/a.py")]
    )
    assert store.effect_scopes("top/") == ["top/a.py", "top/b.ipynb"]
    assert store.effect_scopes("run/") == ["run/r"]
    assert store.effect_scopes("") == ["run/r", "shared", "top/a.py", "top/b.ipynb"]
    store.delete_effects("top/a.py")
    assert store.effect_scopes("top/") == ["top/b.ipynb"]
    with pytest.raises(ArgumentTypeError, match=r"^prefix must be a str such as 'top/' .* got 3$"):
        store.effect_scopes(3)  # type: ignore[arg-type]


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


def test_inbox_tokens_read_many_runs_as_inbox_token_reads_one(store: Store) -> None:
    before = store.inbox_tokens(["r1", "r2", "r3"])
    assert before == {r: store.inbox_token(r) for r in ("r1", "r2", "r3")}
    store.add_signal(SignalRecord("r2", "a", "go", "1", 1.0))
    after = store.inbox_tokens(["r3", "r2", "r1", "r2"])
    assert list(after) == ["r3", "r2", "r1"]  # each once, in the order asked
    assert after["r2"] != before["r2"]
    assert (after["r1"], after["r3"]) == (before["r1"], before["r3"])
    assert store.inbox_tokens([]) == {}
    with pytest.raises(ArgumentTypeError, match=r"^run_ids must be a list of run ids"):
        store.inbox_tokens("r1")


def test_open_run_reads_what_an_execution_starts_from(store: Store) -> None:
    """``open_run`` is the record, history, inbox token and signals the separate reads give,
    except the history of a run that has its outcome (completed with a result, cancelled),
    which a rerun returns without replaying: None."""
    new = store.open_run("fresh")
    assert (new.record, new.history, new.signals) == (None, [], [])
    assert new.inbox_token == store.inbox_token("fresh")
    store.put_run(_run("r1"))
    store.put_effects([_eff(store, "run/r1", 2), _eff(store, "run/r1", 1)])
    store.put_effects([_eff(store, "run/other", 3)])
    store.add_signal(SignalRecord("r1", "s", "go", "1", 1.0))
    start = store.open_run("r1")
    assert start.record is not None and start.record.status == "running"
    assert start.history is not None
    assert [r.key for r in start.history] == [r.key for r in store.load_effects("run/r1")]
    assert [r.seq for r in start.history] == [1, 2]
    assert start.inbox_token == store.inbox_token("r1")
    assert [s.signal_id for s in start.signals] == ["s"]
    done = _run("r1", "completed")
    done.result = _codecs.encode(3, store.signer)
    for status, rec, history in (
        ("failed", _run("r1", "failed"), 2),  # resumes: its history is needed
        ("completed without a result", _run("r1", "completed"), 2),
        ("completed", done, None),
        ("cancelled", _run("r1", "cancelled"), None),
    ):
        store.put_run(rec)
        start = store.open_run("r1")
        assert start.record is not None and start.record.status == rec.status, status
        got = None if start.history is None else len(start.history)
        assert got == history, status
    with pytest.raises(ArgumentTypeError, match=r"run id"):
        store.open_run(3)  # type: ignore[arg-type]


def test_start_runs_takes_the_free_runs_and_reads_their_starts(store: Store) -> None:
    """``start_runs`` takes the lease of each run nobody holds and reads what it starts from,
    as ``acquire_run`` and ``open_run`` would one by one; a held run is left out, and a run
    it took is held (nobody else takes it) until its lease is released."""
    store.put_run(_run("a"))
    store.put_effects([_eff(store, "run/a", 1)])
    store.add_signal(SignalRecord("a", "s", "go", "1", 1.0))
    held = store.acquire_run("held", "someone else")
    got = store.start_runs(["new", "a", "held", "a"], "me")
    assert sorted(got) == ["a", "new"]
    for run_id, (lease, start) in got.items():
        assert lease.run_id == run_id
        alone = store.open_run(run_id)
        assert start.record == alone.record and start.inbox_token == alone.inbox_token
        assert start.history is not None and alone.history is not None
        assert [r.key for r in start.history] == [r.key for r in alone.history]
        assert [x.signal_id for x in start.signals] == [x.signal_id for x in alone.signals]
        with pytest.raises(RunLockedError):
            store.acquire_run(run_id, "someone else")
        lease.release()
        store.acquire_run(run_id, "someone else").release()  # let go: free again
    assert got["new"][1] == RunStart(None, [], store.inbox_token("new"), [])
    held.release()
    assert store.start_runs([], "me") == {}
    with pytest.raises(ArgumentTypeError, match=r"^owner must be a non-empty str"):
        store.start_runs(["x"], "")
    with pytest.raises(ArgumentTypeError, match=r"^run_ids must be a list of run ids"):
        store.start_runs("x", "me")
    assert store.start_runs(["x"], "me")["x"][0].run_id == "x"  # bad calls took nothing


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


# ---------------------------------------------------------------------- runs: queries


def _wf_run(
    run_id: str,
    *,
    workflow: str = "mod.wf",
    status: str = "queued",
    created: float = 1.0,
    updated: float | None = None,
    parent_id: str | None = None,
) -> RunRecord:
    return RunRecord(
        run_id,
        workflow,
        status,  # type: ignore[arg-type]
        created,
        created if updated is None else updated,
        parent_id=parent_id,
    )


def _ids(runs: list[RunRecord]) -> list[str]:
    return [r.run_id for r in runs]


def test_run_record_round_trips_every_field(store: Store) -> None:
    run = RunRecord(
        "r1",
        "mod.wf",
        "queued",
        1.5,
        2.5,
        args=_codecs.encode({"x": 1}, store.signer),
        error=_codecs.encode("boom", store.signer),
        custom_status='{"stage": 2}',
        status_version=3,
        parent_id="p",
        executions=4,
        detail='{"waiting": "go"}',
        input_hash="ih",
        code_version="cv",
        generation=5,
        version="v2",
    )
    store.put_run(run)
    got = store.get_run("r1")
    assert got is not None
    assert got.args is not None and _codecs.decode(got.args, store.signer) == {"x": 1}
    assert got.error is not None and _codecs.decode(got.error, store.signer) == "boom"
    got.args, got.error, run.args, run.error = None, None, None, None
    assert got == run


def test_list_runs_filters(store: Store) -> None:
    store.put_run(_wf_run("a", status="completed", created=1.0, updated=10.0))
    store.put_run(_wf_run("b", status="running", created=2.0, updated=20.0, parent_id="a"))
    store.put_run(_wf_run("c", workflow="mod.other", created=3.0, updated=30.0, parent_id="a"))
    store.put_run(_wf_run("d", status="queued", created=4.0, updated=40.0, parent_id="b"))
    assert _ids(store.list_runs()) == ["d", "c", "b", "a"]  # newest first
    assert _ids(store.list_runs(status="queued")) == ["d", "c"]
    assert _ids(store.list_runs(status="cancelled")) == []
    assert _ids(store.list_runs(workflow="mod.wf")) == ["d", "b", "a"]
    assert _ids(store.list_runs(parent_id="a")) == ["c", "b"]
    assert _ids(store.list_runs(parent_id="zzz")) == []
    # updated_after <= updated_at < updated_before
    assert _ids(store.list_runs(updated_after=20.0)) == ["d", "c", "b"]
    assert _ids(store.list_runs(updated_before=20.0)) == ["a"]
    assert _ids(store.list_runs(updated_after=20.0, updated_before=40.0)) == ["c", "b"]
    assert _ids(store.list_runs(status="queued", workflow="mod.wf", parent_id="b")) == ["d"]
    assert _ids(store.list_runs(status="queued", parent_id="a")) == ["c"]
    assert _ids(store.list_runs(limit=2)) == ["d", "c"]
    assert _ids(store.list_runs(workflow="mod.wf", limit=1)) == ["d"]
    assert store.list_runs(limit=0) == []


def test_list_runs_sees_a_status_change(store: Store) -> None:
    store.put_run(_wf_run("a"))
    store.put_run(_wf_run("a", status="completed", updated=5.0))
    assert _ids(store.list_runs(status="queued")) == []
    assert _ids(store.list_runs(status="completed", updated_after=5.0)) == ["a"]


# ---------------------------------------------------------------------- runs: delete, reset


def _put_run_with_scopes(store: Store, run_id: str) -> None:
    store.put_run(_wf_run(run_id, status="running"))
    for scope in run_scopes(run_id):
        store.put_effects([_eff(store, scope, n) for n in range(2)])
    store.add_signal(SignalRecord(run_id, "s1", "go", "1", 1.0))
    store.append_events([EventRecord(run_id, "e1", 1.0, "started")])


def test_delete_run_forgets_every_scope_it_owns_and_nothing_else(store: Store) -> None:
    for run_id in ("r1", "r10", "r2"):  # r10: a run whose id starts with another's
        _put_run_with_scopes(store, run_id)
    store.put_effects([_eff(store, "top/r1", 1)])
    key = ("kv/r1", "mod.f", "v1", "h1", 0)
    assert store.get_effect(key) is not None  # read once: now in any read cache
    store.flush()
    assert store.delete_run("r1") is True
    assert store.get_run("r1") is None
    for scope in run_scopes("r1"):
        assert store.load_effects(scope) == []
    assert store.get_effect(key) is None
    assert store.get_effect(("stream/r1", "mod.f", "v1", "h0", 0)) is None
    assert store.list_signals("r1") == []
    assert store.load_events("r1") == []
    for run_id in ("r10", "r2"):
        assert store.get_run(run_id) is not None
        for scope in run_scopes(run_id):
            assert len(store.load_effects(scope)) == 2
        assert len(store.list_signals(run_id)) == 1
        assert len(store.load_events(run_id)) == 1
    assert len(store.load_effects("top/r1")) == 1
    assert store.delete_run("r1") is False


def test_delete_run_of_records_not_yet_flushed(store: Store) -> None:
    _put_run_with_scopes(store, "r1")
    assert store.delete_run("r1") is True
    store.flush()
    assert store.get_run("r1") is None
    assert all(store.load_effects(scope) == [] for scope in run_scopes("r1"))


def test_reset_run_continues_as_new(store: Store) -> None:
    _put_run_with_scopes(store, "r1")
    store.put_effects([_eff(store, "run/r1", n) for n in range(2, 5)])
    store.add_signal(SignalRecord("r1", "s2", "go", "2", 2.0))
    store.add_signal(SignalRecord("r1", "s3", "go", "3", 3.0))
    store.add_signal(SignalRecord("r2", "s1", "go", "x", 1.0))  # same id, another run
    old_key = ("run/r1", "mod.f", "v1", "h1", 0)
    assert store.get_effect(old_key) is not None  # read once: now in any read cache
    store.flush()
    store.put_effects([_eff(store, "run/r1", 9)])  # not yet merged when the reset comes

    new = _wf_run("r1", status="running", created=1.0, updated=7.0)
    new.args = _codecs.encode({"n": 2}, store.signer)
    new.generation = 1
    new.executions = 3
    store.reset_run(new, ["s1", "s3"])

    # read your writes, before and after a flush
    assert store.get_effect(old_key) is None
    assert store.get_effect(("run/r1", "mod.f", "v1", "h9", 0)) is None
    for flushed in (False, True):
        if flushed:
            store.flush()
        got = store.get_run("r1")
        assert got is not None and got.generation == 1 and got.executions == 3
        assert got.updated_at == 7.0
        assert got.args is not None and _codecs.decode(got.args, store.signer) == {"n": 2}
        assert store.load_effects("run/r1") == []
        assert store.get_effect(old_key) is None
        assert [s.signal_id for s in store.list_signals("r1")] == ["s2"]
        assert [s.signal_id for s in store.list_signals("r2")] == ["s1"]
        assert len(store.load_effects("kv/r1")) == 2
        assert len(store.load_effects("stream/r1")) == 2
        assert len(store.load_events("r1")) == 1

    # the new generation records under the same keys as the old one
    store.put_effects([_eff(store, "run/r1", 1, value="new")])
    got_eff = store.get_effect(old_key)
    assert got_eff is not None and _codecs.decode(got_eff.payload, store.signer) == "new"
    store.flush()
    assert [_codecs.decode(r.payload, store.signer) for r in store.load_effects("run/r1")] == [
        "new"
    ]


def test_reset_run_twice_before_a_flush(store: Store) -> None:
    _put_run_with_scopes(store, "r1")
    first = _wf_run("r1", status="running")
    first.generation = 1
    store.reset_run(first, ["s1"])
    store.put_effects([_eff(store, "run/r1", 7)])
    second = _wf_run("r1", status="running")
    second.generation = 2
    store.reset_run(second, [])
    store.put_effects([_eff(store, "run/r1", 8)])
    assert store.get_effect(("run/r1", "mod.f", "v1", "h7", 0)) is None
    store.flush()
    got = store.get_run("r1")
    assert got is not None and got.generation == 2
    assert [r.seq for r in store.load_effects("run/r1")] == [8]


def test_reset_run_with_table_payloads(store: Store) -> None:
    pa = pytest.importorskip("pyarrow")
    old_table = pa.table({"x": [1, 2]})
    new_table = pa.table({"x": [3, 4, 5]})
    run = _wf_run("r1", status="running")
    run.args = _codecs.encode(old_table, store.signer)
    store.put_run(run)
    store.put_effects([_eff(store, "run/r1", 1, value=old_table)])
    new = _wf_run("r1", status="running")
    new.args = _codecs.encode(new_table, store.signer)
    new.generation = 1
    store.reset_run(new, [])
    # same key as the old generation's record, written before the reset was flushed
    store.put_effects([_eff(store, "run/r1", 1, value=new_table)])
    store.flush()
    got = store.get_effect(("run/r1", "mod.f", "v1", "h1", 0))
    assert got is not None
    decoded = _codecs.decode(got.payload, store.signer)
    assert isinstance(decoded, pa.Table) and decoded.equals(new_table)
    got_run = store.get_run("r1")
    assert got_run is not None and got_run.args is not None
    decoded = _codecs.decode(got_run.args, store.signer)
    assert isinstance(decoded, pa.Table) and decoded.equals(new_table)


# ---------------------------------------------------------------------- workers


def test_claim_run_takes_the_oldest_claimable_run(store: Store) -> None:
    store.put_run(_wf_run("done", status="completed", created=0.0))
    store.put_run(_wf_run("failed", status="failed", created=0.05))
    store.put_run(_wf_run("held", status="running", created=0.1))
    store.put_run(_wf_run("orphan", status="waiting", created=0.2))  # no live holder
    store.put_run(_wf_run("q2", created=2.0))
    store.put_run(_wf_run("q1", created=1.0))
    store.put_run(_wf_run("other", workflow="mod.other", created=0.0))
    holder = store.acquire_run("held", "someone")
    claimed = []
    while (got := store.claim_run("worker", ["mod.wf"])) is not None:
        run, lease = got
        assert lease.run_id == run.run_id
        assert store.get_run(run.run_id) == run
        with pytest.raises(RunLockedError):  # the lease is really held
            store.acquire_run(run.run_id, "thief")
        claimed.append((run, lease))
    assert [r.run_id for r, _ in claimed] == ["orphan", "q1", "q2"]
    assert [r.status for r, _ in claimed] == ["waiting", "queued", "queued"]

    holder.release()  # its holder stopped: the run needs an executor again
    got = store.claim_run("worker", ["mod.wf", "mod.other"])
    assert got is not None and got[0].run_id == "other"
    got2 = store.claim_run("worker", ["mod.wf", "mod.other"])
    assert got2 is not None and got2[0].run_id == "held"
    assert store.claim_run("worker", ["mod.wf", "mod.other"]) is None
    assert store.claim_run("worker", []) is None
    for _, lease in [*claimed, got, got2]:
        lease.release()


def test_claim_run_returns_none_without_runs(store: Store) -> None:
    assert store.claim_run("worker", ["mod.wf"]) is None


def test_claim_run_skips_a_run_finished_by_a_released_lease(store: Store) -> None:
    store.put_run(_wf_run("r1"))
    lease = store.acquire_run("r1", "me")
    store.put_run(_wf_run("r1", status="completed"))
    lease.release()
    assert store.claim_run("worker", ["mod.wf"]) is None


def test_two_claimers_never_get_the_same_run(store: Store) -> None:
    for i in range(24):
        store.put_run(_wf_run(f"r{i:02d}", created=float(i)))
    store.flush()
    got: dict[str, list[str]] = {f"w{t}": [] for t in range(4)}
    leases: list[RunLease] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def claim(name: str) -> None:
        try:
            start.wait()
            while (c := store.claim_run(name, ["mod.wf"])) is not None:
                got[name].append(c[0].run_id)
                leases.append(c[1])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(name,)) for name in got]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    claimed = [run_id for ids in got.values() for run_id in ids]
    assert sorted(claimed) == [f"r{i:02d}" for i in range(24)]  # each exactly once
    for lease in leases:
        lease.release()


@pytest.mark.parametrize("trigger", ["queue", "signal", "release"])
def test_wait_for_work_wakes_up_early(store: Store, trigger: str) -> None:
    done = threading.Event()

    def make_work() -> None:
        # repeated, so one of them surely lands while the main thread waits
        i = 0
        while not done.is_set():
            i += 1
            if trigger == "queue":
                store.put_run(_wf_run(f"q{i}"))
            elif trigger == "signal":
                store.add_signal(SignalRecord("r1", f"s{i}", "go", "1", float(i)))
            else:
                store.acquire_run("r1", "other").release()
            done.wait(0.02)

    assert store.claim_run("worker", ["mod.nothing"]) is None
    th = threading.Thread(target=make_work)
    t0 = time.monotonic()
    th.start()
    try:
        store.wait_for_work(30)
        waited = time.monotonic() - t0
    finally:
        done.set()
        th.join()
    assert waited < 30  # woken, not timed out


def test_work_that_came_between_claim_and_wait_is_not_missed(store: Store) -> None:
    assert store.claim_run("worker", ["mod.wf"]) is None
    store.put_run(_wf_run("q1"))  # after the look, before the wait
    t0 = time.monotonic()
    store.wait_for_work(30)
    assert time.monotonic() - t0 < 30  # returned at once, not at the timeout
    got = store.claim_run("worker", ["mod.wf"])
    assert got is not None and got[0].run_id == "q1"
    got[1].release()


def test_wait_for_work_with_zero_timeout_returns(store: Store) -> None:
    # with nothing to claim, a zero timeout returns at once instead of waiting for work
    waiter = threading.Thread(target=store.wait_for_work, args=(0,), daemon=True)
    waiter.start()
    waiter.join(20)  # a bound on a wait that must not happen, not a measurement
    assert not waiter.is_alive(), "wait_for_work(0) blocked"


# ---------------------------------------------------------------------- effect maintenance


def test_prune_effects_by_prefix_and_age(store: Store) -> None:
    def at(scope: str, n: int, t: float) -> EffectRecord:
        return _eff(store, scope, n, started_at=t)

    store.put_effects(
        [
            at("top/a", 1, 10.0),
            at("top/a", 2, 20.0),
            at("top/b", 3, 5.0),
            at("topx", 4, 5.0),
            at("shared", 5, 5.0),
            at("run/x", 6, 5.0),
            at("top/a_1", 7, 5.0),
            at("top/ab1", 8, 5.0),
        ]
    )
    store.flush()
    assert store.get_effect(("top/a", "mod.f", "v1", "h1", 0)) is not None  # cached now
    store.put_effects([at("top/b", 9, 1.0)])  # not yet flushed
    # a prefix with LIKE wildcards means itself
    assert store.prune_effects("top/a_", 100.0) == 1
    assert store.load_effects("top/ab1") != []
    assert store.prune_effects("top/", 15.0) == 4  # top/a@10, top/b@5, top/b@1, top/ab1@5
    assert store.get_effect(("top/a", "mod.f", "v1", "h1", 0)) is None
    assert [r.seq for r in store.load_effects("top/a")] == [2]
    assert store.load_effects("top/b") == []
    assert len(store.load_effects("topx")) == 1
    assert len(store.load_effects("run/x")) == 1
    assert store.prune_effects("shared", 5.0) == 0  # strictly before
    assert store.prune_effects("shared", 5.5) == 1
    assert store.load_effects("shared") == []
    assert store.prune_effects("top/", 15.0) == 0


def test_claim_effect_semantics(store: Store) -> None:
    key = ("shared", "mod.f", "v1", "h1", 0)
    other = ("shared", "mod.f", "v1", "h2", 0)
    assert store.claim_effect(key, "a", 60) is True
    assert store.claim_effect(key, "b", 60) is False  # a holds it
    assert store.claim_effect(key, "a", 60) is True  # its own claim
    assert store.claim_effect(other, "b", 60) is True  # keys are independent
    store.release_effect(key, "b")  # not b's claim: nothing happens
    assert store.claim_effect(key, "b", 60) is False
    store.release_effect(key, "a")
    store.release_effect(key, "a")  # idempotent
    assert store.claim_effect(key, "b", 60) is True
    assert store.claim_effect(key, "a", 60) is False
    store.release_effect(key, "b")
    store.release_effect(other, "b")

    # a claim lapses after its seconds; the next one counts again
    assert store.claim_effect(key, "a", 0) is True
    assert store.claim_effect(key, "b", 60) is True
    assert store.claim_effect(key, "a", 60) is False
    store.release_effect(key, "b")
