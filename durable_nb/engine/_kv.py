"""Per-run key/value state: ``ctx.kv`` inside a run, ``job.kv()`` outside.

Two copies of every write, stored in one atomic ``put_effects``: a step in the run's journal
(``kind="kv_set"`` / ``"kv_delete"``), so a replay rebuilds exactly the state the workflow
saw at each point, and the current value under scope ``kv/<run id>`` (``identity`` = the key,
last write wins, a delete leaves a ``kv_delete`` tombstone), which outside readers see at
once. Continue-as-new keeps the ``kv/`` scope; the new generation starts from it (recorded as
a ``kv_base`` step, so its replays start from the same state).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from typing import Any

from .. import _codecs, _hashing
from .._journal import KvDeleteDetail, KvSetDetail, detail_text, kv_scope
from ..errors import ArgumentError, ArgumentTypeError, UnstorableValueError
from ..store import EffectRecord, Store
from ._runtime import runtime
from ._state import RunState, replay

__all__ = ["MAX_KEYS", "MAX_KEY_CHARS", "MAX_VALUE_BYTES", "RunKV", "kv_base_texts", "kv_snapshot"]

#: the limits of one run's key/value state
MAX_KEY_CHARS = 200
MAX_VALUE_BYTES = 64 * 1024
MAX_KEYS = 1000


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise ArgumentTypeError(f"kv keys are str, got {key!r} of type {type(key).__name__}")
    if not key or len(key) > MAX_KEY_CHARS:
        raise ArgumentError(
            f"kv key must be 1-{MAX_KEY_CHARS} characters, got {key!r} ({len(key)} characters); "
            "use a shorter key"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ArgumentError(f"kv key must be valid text, got {key!r}") from None
    return key


def _value_text(key: str, value: object) -> str:
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise UnstorableValueError(
            f"kv value for key {key!r} must be JSON data (None, bool, int, float, str, list, "
            f"dict), got {value!r:.200}; convert it first ({e})"
        ) from None
    size = len(text.encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise ArgumentError(
            f"kv value for key {key!r} is {size} bytes as JSON, over the limit of "
            f"{MAX_VALUE_BYTES} bytes (64 KiB); keep large data as an effect's result and "
            "store a reference to it in kv"
        )
    return text


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
        key = _check_key(key)
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
                payload=_codecs.encode(None, signer),
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

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``False`` if it was not set."""
        key = _check_key(key)
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
            tombstone = EffectRecord(
                kv_scope(st.run_id),
                key,
                "",
                "",
                0,
                payload=_codecs.encode(None, signer),
                kind="kv_delete",
                started_at=now,
                detail=json.dumps({"seq": seq}),
            )
            st.record_together(journal, [tombstone])
        del view[key]
        return True


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
