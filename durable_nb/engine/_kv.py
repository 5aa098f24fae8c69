"""Per-run key/value state: ``ctx.kv`` inside a run, ``job.kv()`` / ``job.wait_kv()``
outside, and ``ctx.kv_of`` reading another run's keys from inside a run.

Two copies of every write, stored in one atomic ``put_effects``: a step in the run's journal
(``kind="kv_set"`` with the value's JSON text, ``"kv_delete"``, ``"kv_prune"`` for
``prune``/``clear``), so a replay rebuilds exactly the state the workflow saw at each point
(and a fork, the state at its step), and the current value under scope ``kv/<run id>``
(``identity`` = the key, last write wins, a delete leaves a ``kv_delete`` tombstone), which
outside readers see at once. Continue-as-new keeps the ``kv/`` scope; the new generation
starts from it (recorded as a ``kv_base`` step, so its replays start from the same state).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, MutableMapping
from datetime import datetime
from typing import Any

from .. import _codecs, _hashing
from .._journal import (
    KvDeleteDetail,
    KvOfDetail,
    KvPruneDetail,
    KvSetDetail,
    check_run_id,
    detail_text,
    iso_time,
    json_problem,
    kv_scope,
    read_detail,
    storable_text,
)
from ..errors import ArgumentError, ArgumentTypeError, UnstorableValueError
from ..store import EffectRecord, Store
from ._runtime import runtime
from ._state import RunState, replay

__all__ = [
    "MAX_KEYS",
    "MAX_KEY_CHARS",
    "MAX_VALUE_BYTES",
    "RunKV",
    "check_kv_key",
    "kv_at",
    "kv_base_texts",
    "kv_of",
    "kv_of_step",
    "kv_snapshot",
    "kv_value",
]

#: the limits of one run's key/value state
MAX_KEY_CHARS = 200
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 1000


def check_kv_key(key: object) -> str:
    if not isinstance(key, str):
        raise ArgumentTypeError(f"kv keys are str, got {key!r} of type {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ArgumentError(
            f"kv key must be 1-{MAX_KEY_CHARS} characters, got {key!r} ({len(key)} characters); "
            "use a shorter key"
        )
    if not storable_text(key):
        raise ArgumentError(
            f"kv key must be text every store can keep (no NUL character, no lone surrogate), "
            f"got {key!r}"
        )
    return key


def _value_text(key: str, value: object) -> str:
    problem, text = json_problem(value, separators=(",", ":"))
    if problem is not None:
        raise UnstorableValueError(
            f"kv value for key {key!r} must be JSON data (None, bool, int, float, str, list, "
            f"dict with str keys), got {value!r:.200}; convert it first ({problem})"
        )
    size = len(text.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise ArgumentError(
            f"kv value for key {key!r} is {size} bytes as JSON, over the limit of "
            f"{MAX_VALUE_BYTES} bytes (64 KiB); keep large data as an effect's result and "
            "store a reference to it in kv"
        )
    return text


def _tombstone(st: RunState, key: str, seq: int, now: float) -> EffectRecord:
    """The ``kv/`` record of a deleted key (written with the journal step ``seq``)."""
    return EffectRecord(
        kv_scope(st.run_id),
        key,
        "",
        "",
        0,
        payload=_codecs.encode(None, runtime.store.signer),
        kind="kv_delete",
        started_at=now,
        detail=json.dumps({"seq": seq}),
    )


class RunKV(MutableMapping[str, Any]):
    """``ctx.kv``: the run's key/value state (JSON values), readable from outside while the
    run executes (``job.kv()``). Reads come from memory and replay exactly; each write is
    a journaled step. Limits: keys of 1-200 characters, values of at most 64 KiB as JSON, at
    most 1000 keys per run."""

    __slots__ = ("_state",)

    def __init__(self, state: RunState) -> None:
        self._state = state

    def __repr__(self) -> str:
        return f"<durable_nb kv of run {self._state.run_id!r}: {len(self)} keys>"

    @property
    def _view(self) -> dict[str, str]:
        return self._state.kv

    def __getitem__(self, key: str) -> Any:
        text = self._view[key]  # a KeyError for a missing key, like a dict
        return json.loads(text)  # a fresh copy: mutating it changes nothing stored

    def __contains__(self, key: object) -> bool:
        return key in self._view

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._view))

    def __len__(self) -> int:
        return len(self._view)

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self._view:
            raise KeyError(key)
        self.delete(key)

    def set(self, key: str, value: Any) -> None:
        """Set ``key`` to ``value`` (JSON data), durably."""
        key = check_kv_key(key)
        text = _value_text(key, value)
        view = self._view
        st = self._state
        if key not in view and len(view) >= MAX_KEYS:
            raise ArgumentError(
                f"run {st.run_id!r} already holds {MAX_KEYS} kv keys, the limit; delete keys it "
                f"no longer needs before setting {key!r}"
            )
        key4, seq, rec = st.step("dn.kv.set", _hashing.hash_value((key, text)).hex())
        if rec is not None:
            replay(st, rec)
        else:
            signer = runtime.store.signer
            now = runtime.clock.time()
            preview = text if len(text) <= 200 else text[:197] + "..."
            journal = EffectRecord(
                st.scope_id,
                *key4,
                payload=_codecs.encode(text, signer),  # the state at any step (dn.fork)
                kind="kv_set",
                seq=seq,
                started_at=now,
                detail=detail_text(KvSetDetail(key=key, value=preview)),
            )
            current = EffectRecord(
                kv_scope(st.run_id),
                key,
                "",
                "",
                0,
                payload=_codecs.encode(json.loads(text), signer),
                kind="kv",
                started_at=now,
                detail=json.dumps({"seq": seq}),
            )
            st.record_together(journal, [current])
        view[key] = text
        st.kv_times[key] = rec.started_at if rec is not None else now

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``False`` if it was not set."""
        key = check_kv_key(key)
        view = self._view
        if key not in view:
            return False
        st = self._state
        key4, seq, rec = st.step("dn.kv.delete", _hashing.hash_value(key).hex())
        if rec is not None:
            replay(st, rec)
        else:
            signer = runtime.store.signer
            now = runtime.clock.time()
            journal = EffectRecord(
                st.scope_id,
                *key4,
                payload=_codecs.encode(None, signer),
                kind="kv_delete",
                seq=seq,
                started_at=now,
                detail=detail_text(KvDeleteDetail(key=key)),
            )
            st.record_together(journal, [_tombstone(st, key, seq, now)])
        del view[key]
        st.kv_times.pop(key, None)
        return True

    def prune(self, *, updated_before: datetime | float) -> list[str]:
        """Remove every key last set before ``updated_before`` (an aware datetime or epoch
        seconds, compared with the time each ``set`` was recorded; keys a new generation
        inherited count as set when it started) in one durable step; returns the keys
        removed, oldest first. A replay removes the same keys."""
        if isinstance(updated_before, datetime):
            if updated_before.tzinfo is None:
                raise ArgumentError(
                    f"updated_before must be timezone-aware, got {updated_before!r}; add "
                    "tzinfo=timezone.utc"
                )
            cutoff = updated_before.timestamp()
        elif (
            isinstance(updated_before, (int, float))
            and not isinstance(updated_before, bool)
            and math.isfinite(updated_before)
        ):
            cutoff = float(updated_before)
        else:
            raise ArgumentTypeError(
                f"updated_before must be a datetime or epoch seconds, got {updated_before!r}"
            )
        times = self._state.kv_times
        doomed = sorted(
            (k for k in self._view if times.get(k, 0.0) < cutoff),
            key=lambda k: (times.get(k, 0.0), k),
        )
        return self._remove("dn.kv.prune", _hashing.hash_value(cutoff).hex(), doomed, cutoff)

    def clear(self) -> None:
        """Remove every key, in one durable step."""
        self._remove("dn.kv.clear", "", sorted(self._view), None)

    def _remove(
        self, identity: str, input_hash: str, keys: list[str], cutoff: float | None
    ) -> list[str]:
        st, view = self._state, self._view
        key4, seq, rec = st.step(identity, input_hash)
        if rec is not None:
            recorded = replay(st, rec)
            keys = [str(k) for k in recorded] if isinstance(recorded, list) else keys
        else:
            signer = runtime.store.signer
            now = runtime.clock.time()
            detail: KvPruneDetail = {"keys": keys[:50]}
            if cutoff is not None:
                detail["updated_before"] = iso_time(cutoff)
            journal = EffectRecord(
                st.scope_id,
                *key4,
                payload=_codecs.encode(keys, signer),
                kind="kv_prune",
                seq=seq,
                started_at=now,
                detail=detail_text(detail),
            )
            st.record_together(journal, [_tombstone(st, key, seq, now) for key in keys])
        for key in keys:
            view.pop(key, None)
            st.kv_times.pop(key, None)
        return keys


async def kv_of(
    state: RunState, run_id: str, key: str, default: Any, step: tuple[Any, int, Any]
) -> Any:
    """``ctx.kv_of``: the value of ``key`` in run ``run_id``'s key/value state now, as a
    recorded step (its step taken at call time: ``step``); a replay returns what was read."""
    key4, seq, rec = step
    if rec is not None:
        got = replay(state, rec)
    else:
        store = runtime.store
        found, value = kv_value(store, run_id, key)
        got = [found, value]
        state.record_value(
            key4, seq, got, "kv_of", detail_text(KvOfDetail(run_id=run_id, key=key, found=found))
        )
    if isinstance(got, list) and len(got) == 2 and got[0]:
        return got[1]
    return default


def kv_of_step(state: RunState, run_id: str, key: str) -> tuple[Any, int, Any]:
    """The step of ``ctx.kv_of(run_id, key)``, taken when it is called."""
    check_run_id(run_id)
    check_kv_key(key)
    return state.step("dn.kv_of", _hashing.hash_value((run_id, key)).hex())


def kv_value(store: Store, run_id: str, key: str) -> tuple[bool, Any]:
    """``(True, value)`` if run ``run_id`` holds ``key`` now, else ``(False, None)``: one
    point read of its current-value record."""
    rec = store.get_effect((kv_scope(run_id), key, "", "", 0))
    if rec is None or rec.kind != "kv":
        return False, None
    return True, _codecs.decode(rec.payload, store.signer)


def kv_at(store: Store, run_id: str, journal: Iterable[EffectRecord]) -> dict[str, EffectRecord]:
    """The key/value state after the given steps of run ``run_id``'s journal (a fork's state
    at its step): key -> a current-value record (scope ``kv/<run_id>``). A ``kv_set`` recorded
    before values were journaled (an older store) takes the run's current value when that was
    written by the same step, else its preview when that is whole JSON, else is left out."""
    signer = store.signer
    state: dict[str, tuple[Any, float, int]] = {}  # key -> (value, set at, seq)
    current: dict[str, EffectRecord] | None = None
    for r in sorted(journal, key=lambda r: (r.seq, r.started_at)):
        if r.kind == "kv_base":
            base = _codecs.decode(r.payload, signer)
            if isinstance(base, dict):
                for k, text in base.items():
                    state[str(k)] = (json.loads(text), r.started_at, r.seq)
        elif r.kind == "kv_set":
            key = str(read_detail(r.detail).get("key", ""))
            text = _codecs.decode(r.payload, signer)
            if isinstance(text, str):
                state[key] = (json.loads(text), r.started_at, r.seq)
                continue
            if current is None:
                current = {c.identity: c for c in store.load_effects(kv_scope(run_id))}
            now = current.get(key)
            if now is not None and now.kind == "kv" and read_detail(now.detail).get("seq") == r.seq:
                state[key] = (_codecs.decode(now.payload, signer), r.started_at, r.seq)
                continue
            try:
                state[key] = (
                    json.loads(str(read_detail(r.detail).get("value"))),
                    r.started_at,
                    r.seq,
                )
            except ValueError:
                state.pop(key, None)
        elif r.kind == "kv_delete":
            state.pop(str(read_detail(r.detail).get("key", "")), None)
        elif r.kind == "kv_prune":
            gone = _codecs.decode(r.payload, signer)
            for k in gone if isinstance(gone, list) else ():
                state.pop(str(k), None)
    return {
        key: EffectRecord(
            kv_scope(run_id),
            key,
            "",
            "",
            0,
            payload=_codecs.encode(value, signer),
            kind="kv",
            started_at=at,
            detail=json.dumps({"seq": seq}),
        )
        for key, (value, at, seq) in state.items()
    }


def kv_base_texts(store: Store, run_id: str) -> dict[str, str]:
    """The run's current key/value state as key -> JSON text (where a generation starts)."""
    out: dict[str, str] = {}
    for rec in store.load_effects(kv_scope(run_id)):
        if rec.kind == "kv":
            value = _codecs.decode(rec.payload, store.signer)
            out[rec.identity] = json.dumps(value, separators=(",", ":"))
    return out


def kv_snapshot(store: Store, run_id: str) -> dict[str, Any]:
    """The run's current key/value state (what ``job.kv()`` shows)."""
    return {
        rec.identity: _codecs.decode(rec.payload, store.signer)
        for rec in sorted(store.load_effects(kv_scope(run_id)), key=lambda r: r.identity)
        if rec.kind == "kv"
    }
