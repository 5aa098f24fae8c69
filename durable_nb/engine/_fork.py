"""Forking a run from a step (time travel): ``dn.fork(run_id, from_step=N)``.

A fork is a new run of the same workflow with the same arguments whose journal starts as a
copy of the original's steps before step ``N`` (``N`` is the step number ``durable-nb trace``
and the trace widget show: steps numbered without gaps, ``_journal.shown_seqs``): those replay from the copies without
executing; every step from ``N`` on executes. The original run, its records and its child
runs are only read. What a fork copies (guide, "Workflow features"):

* **steps before N**, each as recorded: effects (results and cached errors), timers
  (their deadlines: a timer that had fired has fired), signals and queue messages received
  (their payloads), races (their winners), ``ctx.now``/``random``/``uuid``, logs, status and
  kv writes; also the retry schedules of those steps and a generation's ``kv_base``;
* **child runs**: a ``ctx.child`` recorded before N replays the child's result (the child is
  shared, read-only); a ``ctx.start_child`` before N whose child has ended refers to that
  child (read-only); one whose child has not ended forks the child too (its whole history,
  as a child of the fork), so the fork's replay resumes its own copy;
* **signals**: those consumed before N are in the copied steps; the others — consumed by
  steps from N on, or not yet consumed — are sent to the fork again in their order (as a
  reset in Temporal reapplies them), unless ``signals=False``; cancellations are not;
* **streams**: the leading chunks of each run stream written before step N's first record
  (and a close made before it), and the chunks of streaming effects whose final value is
  copied;
* **key/value state and custom status**: as the copied steps left them.

Steps that had not finished are not steps yet: an effect or a ``ctx.child`` in flight when
the original stopped runs afresh in the fork. A child started with an explicit ``run_id=``
is the run of that id wherever it is used. The fork's record carries no link to the
original; its first trace event, ``forked``, names the original and the step.
"""

from __future__ import annotations

import json
import uuid as _uuid
from typing import Any

from .. import _codecs
from .._journal import (
    CANCEL_SIGNAL,
    CHUNK_PREFIX,
    FINAL_STATUSES,
    StartChildDetail,
    check_run_id,
    detail_text,
    read_detail,
    run_scope,
    shown_seqs,
    signal_id_of,
    stream_scope,
)
from ..errors import ArgumentError, ArgumentTypeError, RunNotFoundError
from ..store import EffectRecord, EventRecord, RunRecord, SignalRecord
from ._jobs import Job, send_time
from ._kv import kv_at
from ._resume import resume, workflow_of
from ._runtime import runtime

__all__ = ["fork", "fork_records"]

# kinds a fork leaves out: a resume's consumption of the original's cancel signals
_NOT_COPIED = ("cancel_cleared",)


def fork(
    original: str,
    /,
    *,
    from_step: int,
    run_id: str | None = None,
    on: str = "here",
    signals: bool = True,
) -> Job[Any]:
    """Fork run ``original`` from step ``from_step`` as run ``run_id`` (default
    ``<original>@<step>-<8 hex digits>``) and start it: ``on="here"`` executes it in this
    process (its workflow must be defined here), ``on="worker"`` queues it for a worker.
    Returns the fork's job. See the module docstring for what is copied."""
    if on not in ("here", "worker"):
        raise ArgumentError(
            f"on must be 'here' (execute in this process) or 'worker' (queue it for a worker), "
            f"got {on!r}"
        )
    new_id = fork_records(
        original, from_step=from_step, run_id=run_id, signals=signals, here=on == "here"
    )
    return resume(new_id, on=on)


def fork_records(
    original: str,
    /,
    *,
    from_step: int,
    run_id: str | None = None,
    signals: bool = True,
    here: bool = False,
) -> str:
    """Write the fork of ``original`` from ``from_step`` (an ``interrupted`` run, ready to
    resume) and return its run id; ``here``: refuse first if this process cannot execute
    it."""
    rid = check_run_id(original)
    if not isinstance(from_step, int) or isinstance(from_step, bool):
        raise ArgumentTypeError(
            f"from_step must be an int (a step number from `durable-nb trace`), got {from_step!r}"
        )
    store = runtime.store
    rec = store.get_run(rid)
    if rec is None:
        raise RunNotFoundError(
            f"no run {rid!r} in the store {store.url!r}; list runs with `durable-nb runs`"
        )
    journal = store.load_effects(run_scope(rid))
    seqs = shown_seqs(journal)  # step n is the n-th step shown: its seq is seqs[n]
    if not 0 <= from_step <= len(seqs):
        raise ArgumentError(
            f"from_step must be a step number of run {rid!r}, 0 to {len(seqs)} (one past its "
            f"last step copies every step), got {from_step!r}; see `durable-nb trace {rid}`"
        )
    # what comes before step n is everything up to step n-1: bookkeeping between the two
    # (a timed wait's deadline) belongs to step n and is made again with it
    from_seq = seqs[from_step - 1] + 1 if from_step else 0
    if here:
        workflow_of(rec)  # refused before anything is written if it cannot execute here
    new_id = check_run_id(run_id) if run_id is not None else _fork_id(rid, from_step)
    if store.get_run(new_id) is not None:
        raise ArgumentError(
            f"run_id {new_id!r} names a run that exists already; pick another run_id for the "
            f"fork (or forget that run with `durable-nb forget {new_id}`)"
        )
    lease = store.acquire_run(new_id, runtime.owner)  # nobody executes it while it is built
    try:
        _copy(rec, journal, from_seq, new_id, None, signals, step=from_step)
    finally:
        lease.release()
    return new_id


def _fork_id(run_id: str, step: int) -> str:
    tail = f"@{step}-{_uuid.uuid4().hex[:8]}"
    return run_id[: 200 - len(tail)] + tail


def _copy(
    rec: RunRecord,
    journal: list[EffectRecord],
    from_seq: int | None,
    new_id: str,
    parent_id: str | None,
    signals: bool,
    step: int | None = None,
) -> None:
    """Write the fork ``new_id`` of ``rec`` from ``seq`` ``from_seq`` (step number ``step``;
    None: every step — an open child forked with its parent). The records first, the run record last: a crash in between
    leaves records no run shows, which a fork of the same id overwrites."""
    store = runtime.store
    signer = store.signer
    now = runtime.clock.time()
    kept: list[EffectRecord] = []
    later: list[EffectRecord] = []
    for r in journal:
        if r.kind in _NOT_COPIED:
            continue
        before = from_seq is None or r.seq < from_seq or r.kind == "kv_base"
        (kept if before else later).append(r)
    records: list[EffectRecord] = []
    for r in kept:
        copy = _moved(r, run_scope(new_id))
        if r.kind == "start_child":
            copy = _child_of_fork(r, copy, rec.run_id, new_id, signals)
        records.append(copy)
    records += _streams(rec.run_id, new_id, kept, later)
    records += list(kv_at(store, new_id, kept).values())
    store.put_effects(records)
    consumed = {sid for r in kept if (sid := signal_id_of(r.kind, r.detail)) is not None}
    if signals:
        for sig in store.list_signals(rec.run_id):
            if sig.name != CANCEL_SIGNAL and sig.signal_id not in consumed:
                store.add_signal(
                    SignalRecord(new_id, _uuid.uuid4().hex, sig.name, sig.payload, send_time())
                )
    custom, version = _status_at(kept, signer)
    data = {"from": rec.run_id, "step": step, "steps": len(kept)}
    store.append_events([EventRecord(new_id, _uuid.uuid4().hex, now, "forked", json.dumps(data))])
    store.put_run(
        RunRecord(
            new_id,
            rec.workflow,
            "interrupted",
            now,
            now,
            args=rec.args,
            custom_status=custom,
            status_version=version,
            parent_id=parent_id,
            generation=rec.generation,
            version=rec.version,
        )
    )


def _moved(r: EffectRecord, scope: str) -> EffectRecord:
    return EffectRecord(
        scope,
        r.identity,
        r.version,
        r.input_hash,
        r.occurrence,
        r.payload,
        is_error=r.is_error,
        kind=r.kind,
        seq=r.seq,
        started_at=r.started_at,
        duration=r.duration,
        detail=r.detail,
    )


def _child_of_fork(
    r: EffectRecord, copy: EffectRecord, run_id: str, new_id: str, signals: bool
) -> EffectRecord:
    """A copied ``start_child``: an ended child stays the original's (read-only); an open one
    is forked whole as a child of the fork, and the copy names that fork."""
    store = runtime.store
    child_id = read_detail(r.detail).get("run_id")
    if not isinstance(child_id, str):
        return copy
    child = store.get_run(child_id)
    if child is None or child.status in FINAL_STATUSES:
        return copy
    prefix = run_id + "/"
    suffix = child_id[len(prefix) :] if child_id.startswith(prefix) else child_id
    forked_id = check_run_id((new_id + "/" + suffix)[:200])
    if store.get_run(forked_id) is None:
        _copy(child, store.load_effects(run_scope(child_id)), None, forked_id, new_id, signals)
    copy.payload = _codecs.encode(forked_id, store.signer)
    copy.detail = detail_text(StartChildDetail(run_id=forked_id, workflow=child.workflow))
    return copy


def _streams(
    run_id: str, new_id: str, kept: list[EffectRecord], later: list[EffectRecord]
) -> list[EffectRecord]:
    """The stream records a fork starts with: the chunks of the copied streaming effects,
    and of each run stream its leading chunks (and end) written by copied steps — a chunk a
    streaming effect mirrored into a stream has no step of its own: it counts as copied when
    it was written before the first record of the steps not copied."""
    store = runtime.store
    cut = min((r.started_at for r in later), default=float("inf"))
    chunk_keys: set[tuple[str, str, str]] = set()  # of the copied streaming effects' chunks
    written: set[tuple[str, int]] = set()  # (stream, index) of copied writes and closes
    stepped: set[tuple[str, int]] = set()  # ... of every write and close in the journal
    for copied, records in ((True, kept), (False, later)):
        for r in records:
            d = read_detail(r.detail) if r.kind == "stream" else {}
            if "args" in d and copied:
                chunk_keys.add(
                    (CHUNK_PREFIX + r.identity, r.version, r.input_hash + f"#{r.occurrence}")
                )
            position = d.get("index", d.get("chunks")) if "stream" in d else None
            if isinstance(position, int):
                stepped.add((d["stream"], position))
                if copied:
                    written.add((d["stream"], position))
    out: list[EffectRecord] = []
    by_stream: dict[str, list[EffectRecord]] = {}
    for c in store.load_effects(stream_scope(run_id)):
        if c.identity.startswith(CHUNK_PREFIX):
            # a later generation's chunks carry "@<generation>" after the occurrence
            if (c.identity, c.version, c.input_hash.split("@", 1)[0]) in chunk_keys:
                out.append(_moved(c, stream_scope(new_id)))
        else:
            by_stream.setdefault(c.identity, []).append(c)
    for name, chunks in by_stream.items():
        chunks.sort(key=lambda c: c.occurrence)
        for i, c in enumerate(chunks):
            at = (name, c.occurrence)
            copied = at in written if at in stepped else c.started_at < cut
            if c.occurrence != i or not copied:
                break
            out.append(_moved(c, stream_scope(new_id)))
            if c.kind == "stream_end":
                break
    return out


def _status_at(kept: list[EffectRecord], signer: Any) -> tuple[str | None, int]:
    """The custom status (JSON text) and its version after the copied steps."""
    last = max((r for r in kept if r.kind == "status"), key=lambda r: r.seq, default=None)
    if last is None:
        return None, 0
    value = _codecs.decode(last.payload, signer)
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return value["value"], int(value.get("version", 0))
    # recorded before status steps held their value: its preview, when that is whole JSON
    preview = read_detail(last.detail).get("value")
    try:
        json.loads(str(preview))
    except ValueError:
        return None, int(value) if isinstance(value, int) else 0
    return str(preview), int(value) if isinstance(value, int) else 0
