"""The in-memory store: the reference implementation of the Store protocol, for tests."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .._journal import run_scope
from ..errors import RunLockedError
from ._base import RunQuery, StoreBase
from ._protocol import CLAIMABLE_STATUSES, RunLease, run_scopes

if TYPE_CHECKING:
    from ._protocol import EffectKey, EffectRecord, EventRecord, RunRecord, SignalRecord

__all__ = ["MemoryStore"]


class MemoryStore(StoreBase):
    """Everything in dicts; lost when the process ends. ``url`` is ``":memory:"``."""

    def __init__(self, *, key: bytes | None = None) -> None:
        from .._codecs import Signer

        self._signer = Signer(key if key is not None else secrets.token_bytes(32))
        self._lock = threading.RLock()
        self._effects: dict[EffectKey, EffectRecord] = {}
        self._runs: dict[str, RunRecord] = {}
        self._signals: dict[str, dict[str, SignalRecord]] = {}
        self._events: dict[str, dict[str, EventRecord]] = {}
        self._leases: dict[str, str] = {}
        self._inbox: dict[str, int] = {}
        self._claims: dict[EffectKey, tuple[str, float]] = {}
        self._work = threading.Condition(self._lock)
        # bumped by every wake-up; per thread, the value its last claim_run/wait_for_work saw,
        # so work that comes between a fruitless claim_run and wait_for_work is not missed
        self._work_seq = 0
        self._work_seen = threading.local()
        self._closed = False

    @property
    def url(self) -> str:
        return ":memory:"

    def put_effects(self, records: Sequence[EffectRecord]) -> None:
        with self._lock:
            for rec in records:
                self._effects[rec.key] = replace(rec)

    def get_effect(self, key: EffectKey) -> EffectRecord | None:
        with self._lock:
            rec = self._effects.get(key)
            return replace(rec) if rec is not None else None

    def load_effects(self, scope: str) -> list[EffectRecord]:
        with self._lock:
            recs = [replace(r) for k, r in self._effects.items() if k[0] == scope]
        recs.sort(key=lambda r: (r.seq, r.started_at))
        return recs

    def _effect_scopes(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted({k[0] for k in self._effects if k[0].startswith(prefix)})

    def delete_effects(self, scope: str) -> int:
        with self._lock:
            doomed = [k for k in self._effects if k[0] == scope]
            for k in doomed:
                del self._effects[k]
            return len(doomed)

    def put_run(self, run: RunRecord) -> None:
        with self._lock:
            self._runs[run.run_id] = replace(run)
        if run.status == "queued":
            self._wake()

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            run = self._runs.get(run_id)
            return replace(run) if run is not None else None

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        with self._lock:
            runs = [replace(r) for r in self._runs.values() if query.matches(r)]
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs[: query.limit]

    def delete_run(self, run_id: str) -> bool:
        with self._lock:
            existed = self._runs.pop(run_id, None) is not None
            self._signals.pop(run_id, None)
            self._events.pop(run_id, None)
            for scope in run_scopes(run_id):
                self.delete_effects(scope)
        return existed

    def _reset_run(self, run: RunRecord, consumed_signals: tuple[str, ...]) -> None:
        with self._lock:
            self._runs[run.run_id] = replace(run)
            self.delete_effects(run_scope(run.run_id))
            sigs = self._signals.get(run.run_id, {})
            for sid in consumed_signals:
                sigs.pop(sid, None)

    def _claim_run(self, owner: str, workflows: list[str]) -> tuple[RunRecord, RunLease] | None:
        wanted = set(workflows)
        with self._lock:
            self._work_seen.seq = self._work_seq
            candidates = sorted(
                (
                    r
                    for r in self._runs.values()
                    if r.workflow in wanted
                    and r.status in CLAIMABLE_STATUSES
                    and r.run_id not in self._leases
                ),
                key=lambda r: (r.created_at, r.run_id),
            )
            for run in candidates:
                lease = self.acquire_run(run.run_id, owner)
                return replace(run), lease
        return None

    def wait_for_work(self, timeout: float) -> None:
        with self._work:
            seen = getattr(self._work_seen, "seq", self._work_seq)
            self._work.wait_for(lambda: self._work_seq != seen, timeout)
            self._work_seen.seq = self._work_seq

    def _wake(self) -> None:
        with self._work:
            self._work_seq += 1
            self._work.notify_all()

    def _prune_effects(self, scope_prefix: str, older_than: float) -> int:
        with self._lock:
            doomed = [
                k
                for k, r in self._effects.items()
                if k[0].startswith(scope_prefix) and r.started_at < older_than
            ]
            for k in doomed:
                del self._effects[k]
            return len(doomed)

    def _claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        now = time.time()
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] != owner and held[1] > now:
                return False
            self._claims[key] = (owner, now + seconds)
            return True

    def release_effect(self, key: EffectKey, owner: str) -> None:
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] == owner:
                del self._claims[key]

    def acquire_run(self, run_id: str, owner: str) -> RunLease:
        with self._lock:
            holder = self._leases.get(run_id)
            if holder is not None:
                raise RunLockedError(
                    f"run {run_id!r} is already being executed by {holder}; "
                    "wait for it to finish (job.wait()) or cancel it before starting it again"
                )
            self._leases[run_id] = owner

        def release() -> None:
            with self._lock:
                if self._leases.get(run_id) == owner:
                    del self._leases[run_id]
            self._wake()

        return RunLease(run_id, owner, release)

    def add_signal(self, signal: SignalRecord) -> None:
        with self._lock:
            self._signals.setdefault(signal.run_id, {})[signal.signal_id] = replace(signal)
            self._inbox[signal.run_id] = self._inbox.get(signal.run_id, 0) + 1
        self._wake()

    def list_signals(self, run_id: str) -> list[SignalRecord]:
        with self._lock:
            sigs = [replace(s) for s in self._signals.get(run_id, {}).values()]
        sigs.sort(key=lambda s: (s.sent_at, s.signal_id))
        return sigs

    def inbox_token(self, run_id: str) -> object:
        with self._lock:
            return self._inbox.get(run_id, 0)

    def append_events(self, events: Sequence[EventRecord]) -> None:
        with self._lock:
            for ev in events:
                self._events.setdefault(ev.run_id, {})[ev.event_id] = replace(ev)

    def load_events(self, run_id: str) -> list[EventRecord]:
        with self._lock:
            evs = [replace(e) for e in self._events.get(run_id, {}).values()]
        evs.sort(key=lambda e: (e.ts, e.event_id))
        return evs

    def flush(self) -> None:
        return None

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"MemoryStore(runs={len(self._runs)}, effects={len(self._effects)}, pid={os.getpid()})"
        )
