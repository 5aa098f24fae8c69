"""The admin API: listing, inspecting, steering, pruning, exporting and importing runs."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import durable_nb as dn
from durable_nb.client import parse_duration, parse_time
from durable_nb.engine import runtime
from durable_nb.errors import (
    ArgumentError,
    ArgumentTypeError,
    ExportFormatError,
    PayloadIntegrityError,
    RunLockedError,
    RunNotFoundError,
)
from durable_nb.store import EffectRecord, MemoryStore, RunRecord, Store

from .helpers import wait_until

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


@dn.effect
def add(a: int, b: int) -> int:
    calls["add"] += 1
    return a + b


class Opaque:
    """No codec but pickle keeps it: its payload is signed."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.n == self.n

    def __hash__(self) -> int:
        return self.n


@dn.effect
def opaque(n: int) -> Opaque:
    calls["opaque"] += 1
    return Opaque(n)


@dn.effect(shared=True)
def shared_square(n: int) -> int:
    calls["shared_square"] += 1
    return n * n


@dn.durable(name="leaf")
async def leaf(ctx: dn.Context, n: int) -> int:
    return add(n, 1)


@dn.durable(name="mid")
async def mid(ctx: dn.Context, n: int) -> int:
    return await ctx.child(leaf, n) + await ctx.child(leaf, n + 10)


@dn.durable(name="top")
async def top(ctx: dn.Context, n: int) -> int:
    ctx.set_status({"n": n})
    o = opaque(n)
    return await ctx.child(mid, n) + o.n + shared_square(n)


def _make_runs(clock: dn.FakeClock) -> None:
    assert dn.run(top, 1, run_id="t1") == (2 + 12) + 1 + 1
    clock.advance(3600)
    assert dn.run(leaf, 5, run_id="solo") == 6


def test_runs_filters_and_run_info(store: Store, clock: dn.FakeClock) -> None:
    _make_runs(clock)
    c = dn.Client()
    assert c.store is store
    ids = [r["run_id"] for r in c.runs()]
    assert len(ids) == 5  # t1, its mid, mid's two leaves, solo
    assert ids[0] == "solo"  # newest first
    assert [r["run_id"] for r in c.runs(workflow="top")] == ["t1"]
    assert {r["workflow"] for r in c.runs(workflow="leaf")} == {"leaf"}
    assert len(c.runs(limit=2)) == 2
    assert [r["run_id"] for r in c.runs(status="completed", since=clock.now - 10)] == ["solo"]
    assert "solo" not in [r["run_id"] for r in c.runs(until=clock.now - 10)]
    mid_id = c.runs(parent="t1")[0]["run_id"]
    assert mid_id.startswith("t1/mid-0-")
    assert len(c.runs(parent=mid_id)) == 2
    info = c.run("t1")
    assert info["status"] == "completed" and info["custom_status"] == {"n": 1}
    assert info["children"] == [mid_id]
    assert c.custom_status("t1") == {"n": 1}
    assert c.custom_status("solo") is None
    assert c.trace("t1")["run"]["run_id"] == "t1"
    hist = c.history("t1")
    assert [h["kind"] for h in hist if h["type"] == "event"] == ["started", "completed"]
    # the shared effect is recorded in the shared scope, not in the run's history
    assert [h["kind"] for h in hist if h["type"] == "step"] == ["status", "effect", "child"]


def test_tree_nests_children(store: Store, clock: dn.FakeClock) -> None:
    _make_runs(clock)
    tree = dn.Client().tree("t1")
    assert tree["run_id"] == "t1" and tree["parent_id"] is None
    (m,) = tree["children"]
    assert m["workflow"] == "mid" and m["parent_id"] == "t1"
    assert [k["workflow"] for k in m["children"]] == ["leaf", "leaf"]
    assert all(k["children"] == [] for k in m["children"])
    assert dn.Client().tree("solo")["children"] == []


def test_argument_errors(store: Store) -> None:
    c = dn.Client()
    with pytest.raises(
        ArgumentError, match=r"^status must be one of queued, running, .*got 'done'$"
    ):
        c.runs(status="done")
    with pytest.raises(ArgumentError, match=r"^limit must be an int >= 1, got 0$"):
        c.runs(limit=0)
    with pytest.raises(ArgumentError, match=r"^a time must be epoch seconds, .*got 'yesterday'$"):
        c.runs(since="yesterday")
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope' in the store '.*'; list runs"):
        c.run("nope")
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope'"):
        c.tree("nope")
    with pytest.raises(RunNotFoundError, match=r"^no run 'nope'"):
        c.delete("nope")
    with pytest.raises(ArgumentTypeError, match=r"^run_id must be a non-empty str, got 3$"):
        c.trace(3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match=r"^store must be a Store, a path, .*got 3$"):
        dn.Client(3)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match=r"^a duration must be seconds or text like"):
        c.gc("soon")
    with pytest.raises(ArgumentError, match=r"^statuses must be a list of queued, .*"):
        c.gc(1, statuses="completed")


def test_parse_duration_and_time() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90") == 90
    assert parse_duration(" 1.5h ") == 5400
    assert parse_duration(timedelta(minutes=2)) == 120
    assert parse_time("2h", now=10_000) == 10_000 - 7200
    assert parse_time(timedelta(seconds=5), now=100) == 95
    assert parse_time(12.5) == 12.5
    assert (
        parse_time("2024-05-01T00:00+00:00")
        == datetime.fromisoformat("2024-05-01T00:00+00:00").timestamp()
    )
    with pytest.raises(ArgumentError, match=r"^a duration must be a finite number of seconds >= 0"):
        parse_duration(-1)


def test_delete_removes_a_run_and_its_children(store: Store, clock: dn.FakeClock) -> None:
    _make_runs(clock)
    c = dn.Client()
    assert c.delete("t1") == 4
    assert [r["run_id"] for r in c.runs()] == ["solo"]
    assert store.load_effects("run/t1") == []
    assert c.delete("solo", children=False) == 1
    assert c.runs() == []


def test_delete_refuses_a_run_that_executes(store: Store) -> None:
    @dn.durable
    async def waits(ctx: dn.Context) -> Any:
        return await ctx.wait_signal("go")

    job = dn.start(waits, run_id="w")
    wait_until(
        lambda: (rec := store.get_run("w")) is not None and rec.status == "waiting",
        "the run waiting for its signal",
    )
    c = dn.Client()
    with pytest.raises(RunLockedError, match=r"^cannot delete run 'w' while it executes \("):
        c.delete("w")
    assert c.run("w")["waiting"] == [{"kind": "signal", "name": "go"}]
    buf = io.StringIO()
    c.export(buf, ["w"])
    buf.seek(0)
    with pytest.raises(RunLockedError, match=r"^cannot import run 'w' while it executes \("):
        c.import_records(buf, replace=True)
    c.signal("w", "go", {"ok": True})
    assert job.result(timeout=30) == {"ok": True}
    assert c.delete("w") == 1


def test_signal_and_cancel_through_another_store_object() -> None:
    """A Client over a store that is not the engine's writes signals and cancellations into
    it directly (as the CLI of another process would)."""
    other = MemoryStore()
    other.put_run(RunRecord("idle", "wf", "waiting", 1.0, 1.0))
    c = dn.Client(other)
    c.signal("idle", "go", [1])
    assert [(s.name, s.payload) for s in other.list_signals("idle")] == [("go", "[1]")]
    assert c.trace("idle")["pending_signals"] == ["go"]
    c.cancel("idle", "not needed")
    rec = other.get_run("idle")
    assert rec is not None and rec.status == "cancelled"
    assert json.loads(rec.detail) == {"reason": "not needed"}
    c.cancel("idle")  # already over: nothing happens
    with pytest.raises(RunNotFoundError):
        c.signal("nope", "go")


def test_gc_prunes_old_finished_runs_and_cached_effects(store: Store, clock: dn.FakeClock) -> None:
    # gc measures age on the wall clock, so the records are dated in the past by hand
    now = time.time()
    for rid, status, age in [
        ("old-done", "completed", 10 * 86400),
        ("old-failed", "failed", 10 * 86400),
        ("old-waiting", "waiting", 10 * 86400),
        ("new-done", "completed", 3600),
    ]:
        store.put_run(RunRecord(rid, "wf", status, now - age, now - age))  # type: ignore[arg-type]
    from durable_nb import _codecs

    p = _codecs.encode(1, store.signer)
    store.put_effects(
        [
            EffectRecord("top/nb", "f", "", "h1", 0, p, started_at=now - 30 * 86400),
            EffectRecord("top/nb", "f", "", "h2", 0, p, started_at=now - 60),
            EffectRecord("shared", "g", "", "h1", 0, p, started_at=now - 30 * 86400),
            EffectRecord("run/new-done", "f", "", "h1", 0, p, started_at=now - 30 * 86400),
        ]
    )
    c = dn.Client()
    dry = c.gc("7d", dry_run=True)
    assert (dry["runs"], dry["top_effects"], dry["shared_effects"], dry["dry_run"]) == (
        2,
        None,
        1,
        True,
    )
    assert len(c.runs()) == 4
    done = c.gc(timedelta(days=7))
    assert (done["runs"], done["top_effects"], done["shared_effects"]) == (2, 1, 1)
    assert sorted(r["run_id"] for r in c.runs()) == ["new-done", "old-waiting"]
    assert len(store.load_effects("top/nb")) == 1
    assert len(store.load_effects("run/new-done")) == 1  # a kept run keeps its history
    assert c.gc(7 * 86400, runs=False, effects=False)["runs"] == 0
    assert c.gc("1s", statuses=["waiting"], effects=False)["runs"] == 1


fails = [True]


@dn.durable(name="gc_flaky")
async def flaky(ctx: dn.Context) -> int:
    if fails[0]:
        raise RuntimeError("failed on purpose")
    return add(3, 4)


def test_gc_never_deletes_a_run_resumed_and_finished_after_its_scan(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: gc lists an old failed run, then, before gc takes its lease, someone resumes
    it and it completes. gc must read the run again under the lease and keep it."""
    runtime.clock = dn.FakeClock(time.time() - 10 * 86400)  # the run failed 10 days ago
    fails[0] = True
    with pytest.raises(RuntimeError, match="failed on purpose"):
        dn.run(flaky, run_id="raced")
    real_acquire = store.acquire_run
    raced: list[str] = []

    def acquire_run(run_id: str, owner: str) -> Any:
        if run_id == "raced" and not raced:  # between gc's scan and its lease
            raced.append(run_id)
            fails[0] = False
            runtime.clock = dn.FakeClock(time.time())
            assert dn.resume("raced").result() == 7
        return real_acquire(run_id, owner)

    monkeypatch.setattr(store, "acquire_run", acquire_run)
    out = dn.Client().gc("7d", effects=False)
    assert raced == ["raced"]  # the race happened
    assert out["runs"] == 0
    run = store.get_run("raced")
    assert run is not None and run.status == "completed"
    assert dn.get_job("raced").result() == 7


def test_metrics_count_statuses_and_replays(store: Store, clock: dn.FakeClock) -> None:
    _make_runs(clock)
    store.put_run(RunRecord("q", "top", "queued", 1.0, 1.0))
    clock.advance(10)
    assert dn.run(top, 1, run_id="t1", restart=False) == 16  # recorded result: no execution
    m = dn.Client().metrics()
    assert m["runs"] == 6
    assert m["by_status"]["completed"] == 5 and m["by_status"]["queued"] == 1
    assert m["by_workflow"] == {"leaf": 3, "mid": 1, "top": 2}
    # 3 adds, 1 opaque, 3 child steps, 1 set_status (the shared effect is not a step of the run)
    assert m["steps_executed"] == 8
    assert m["steps_replayed"] == 0
    assert m["executions"] == 5 and m["executions_ended"] == 5


def _roundtrip(src: Store, dst: Store, key: bytes | None, tmp_path: Path) -> dict[str, int]:
    path = tmp_path / "export.jsonl"
    counts = dn.Client(src).export(path)
    assert counts["runs"] == 5
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["format"] == "durable_nb-export"
    assert {line["type"] for line in lines[1:-1]} == {"run", "effect", "event"}
    assert lines[-1] == {"type": "end", **counts}
    return dn.Client(dst).import_records(path, source_key=key)


def test_export_import_roundtrip_memory_to_duckdb(clock: dn.FakeClock, tmp_path: Path) -> None:
    key = b"k" * 32
    src = MemoryStore(key=key)
    runtime._store = src
    _make_runs(clock)
    assert calls == {"add": 3, "opaque": 1, "shared_square": 1}
    from durable_nb.store._duckdb import DuckDBStore

    dst = DuckDBStore(tmp_path / "dst.duckdb")
    try:
        with pytest.raises(
            PayloadIntegrityError, match=r"pickled payload\(s\) are signed by another key"
        ):
            _roundtrip(src, dst, None, tmp_path)
        assert dst.list_runs() == []  # checked before anything was written
        counts = _roundtrip(src, dst, key, tmp_path)
        assert counts["runs"] == 5 and counts["skipped_runs"] == 0
        assert counts["effects"] == len(src.load_effects("shared")) + sum(
            len(src.load_effects("run/" + r.run_id)) for r in src.list_runs()
        )
        for r in src.list_runs():
            assert (
                dn.Client(dst).trace(r.run_id)["steps"] == dn.Client(src).trace(r.run_id)["steps"]
            )
        again = dn.Client(dst).import_records(tmp_path / "export.jsonl", source_key=key)
        assert again["runs"] == 0 and again["skipped_runs"] == 5
        # the moved runs and cache work in the new store: nothing executes again
        runtime._store = dst
        assert dn.run(top, 1, run_id="t1", restart=False) == 16
        assert dn.run(top, 1, run_id="t1-again") == 16  # a fresh run: its steps execute...
        assert calls["shared_square"] == 1  # ...but the shared cache moved along
        assert calls["opaque"] == 2
    finally:
        runtime._store = None
        dst.close()


def test_export_selected_runs_with_tables(tmp_path: Path, store: Store) -> None:
    pa = pytest.importorskip("pyarrow")

    @dn.effect
    def table(n: int) -> Any:
        return pa.table({"x": list(range(n))})

    @dn.durable
    async def wf(ctx: dn.Context) -> int:
        return int(table(5).num_rows)

    dn.run(wf, run_id="tab")
    dn.run(leaf, 1, run_id="other")
    buf = io.StringIO()
    counts = dn.Client().export(buf, ["tab"], include_effects=False)
    assert counts == {"runs": 1, "effects": 1, "signals": 0, "events": 2}
    dst = MemoryStore(key=b"x" * 32)
    buf.seek(0)
    assert dn.Client(dst).import_records(buf)["runs"] == 1
    (rec,) = dst.load_effects("run/tab")
    from durable_nb import _codecs

    back: Any = _codecs.decode(rec.payload, dst.signer)
    assert back.equals(pa.table({"x": list(range(5))}))


def test_import_refuses_damaged_files(tmp_path: Path) -> None:
    c = dn.Client(MemoryStore())
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ("", r"^.*bad\.jsonl: it is empty; the file is not a durable_nb export"),
        ("{}\n", r"^.*bad\.jsonl, line 1: the first line must be the durable_nb-export header"),
        ("nope\n", r"^.*bad\.jsonl, line 1: not JSON"),
        (
            '{"type": "header", "format": "durable_nb-export", "version": 99}\n',
            r"^.*line 1: the export has format version 99, this durable_nb reads versions 1-2",
        ),
        (
            '{"type": "header", "format": "durable_nb-export", "version": 1}\n{"type": "x"}\n',
            r"^.*line 2: unknown record type 'x'",
        ),
        (
            '{"type": "header", "format": "durable_nb-export", "version": 1}\n'
            '{"type": "event", "run_id": "r", "event_id": "e", "ts": 1.0, "kind": "started"}\n',
            r"^.*: it has records of run 'r' but not the run itself",
        ),
    ]:
        bad.write_text(text)
        with pytest.raises(ExportFormatError, match=message):
            c.import_records(bad)
    assert c.runs() == []


def test_a_tampered_pickle_is_refused(tmp_path: Path, clock: dn.FakeClock) -> None:
    key = b"k" * 32
    src = MemoryStore(key=key)
    runtime._store = src
    _make_runs(clock)
    path = tmp_path / "e.jsonl"
    dn.Client(src).export(path)
    lines = path.read_text().splitlines()
    import base64

    for i, line in enumerate(lines):
        d = json.loads(line)
        if d["type"] == "effect" and d["payload"]["codec"] == "pickle":
            raw = bytearray(base64.b64decode(d["payload"]["data"]))
            raw[-1] ^= 1
            d["payload"]["data"] = base64.b64encode(bytes(raw)).decode()
            lines[i] = json.dumps(d)
    path.write_text("\n".join(lines) + "\n")
    dst = MemoryStore()
    with pytest.raises(PayloadIntegrityError, match=r"signed neither by this store's key nor by"):
        dn.Client(dst).import_records(path, source_key=key)
    assert dst.list_runs() == []


def test_client_opens_and_closes_a_store_by_path(tmp_path: Path) -> None:
    with dn.Client(str(tmp_path / "c.duckdb")) as c:
        assert c.runs() == []
        assert c.store.url.endswith("c.duckdb")
    assert repr(dn.Client()) == "<durable_nb.Client the engine's store>"


def test_export_import_roundtrip_from_every_store(store: Store, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")

    @dn.effect(cache_errors=True)
    def refuse(n: int) -> int:
        raise ValueError(f"no {n}")

    @dn.effect
    def frame(n: int) -> Any:
        return pa.table({"x": list(range(n)), "y": [str(i) for i in range(n)]})

    @dn.durable(name="mixed")
    async def mixed(ctx: dn.Context) -> int:
        try:
            refuse(1)
        except ValueError:
            pass
        ctx.set_status("half")
        return int(frame(3).num_rows) + opaque(4).n + add(1, 1)

    assert dn.run(mixed, run_id="m") == 3 + 4 + 2
    path = tmp_path / "m.jsonl"
    dn.Client().export(path)
    # the source store's key, as a user would pass it (tests read it from the signer)
    key = store.signer._key if store.signer.can_sign else None
    dst = MemoryStore()
    counts = dn.Client(dst).import_records(path, source_key=key)
    assert counts["runs"] == 1 and counts["effects"] == 5
    a, b = dn.Client(store).trace("m"), dn.Client(dst).trace("m")
    assert a == b
    assert [s["error"] for s in b["steps"]] == ["ValueError('no 1')", None, None, None, None]
    runtime._store = dst
    calls.clear()
    assert dn.run(mixed, run_id="m", restart=False) == 9  # its recorded result
    assert dn.run(mixed, run_id="m2") == 9
    assert calls == {"opaque": 1, "add": 1}
    store.close()
