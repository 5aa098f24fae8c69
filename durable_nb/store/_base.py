"""What every store does the same way: the checks of its public calls.

A store subclasses :class:`StoreBase` and implements the private primitive behind each
checked call (``_list_runs``, ``_prune_effects``, ``_effect_scopes``, ``_claim_effect``,
``_reset_run``, ``_claim_run``); the arguments it receives are already checked and normalized, so bad
input gets the same clear error, and changes nothing, whichever store is behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._journal import run_scope
from ..errors import ArgumentError, ArgumentTypeError, RunLockedError
from ._protocol import (
    EffectKey,
    EffectRecord,
    EventRecord,
    RunLease,
    RunRecord,
    RunStart,
    has_outcome,
    submit_now,
)

if TYPE_CHECKING:
    import asyncio

    from .._codecs import Signer
    from ._protocol import WriteDone

__all__ = ["RunQuery", "StoreBase"]


@dataclass(frozen=True, slots=True)
class RunQuery:
    """A checked ``list_runs`` query: ``(column, operator, value)`` filters, newest first."""

    filters: tuple[tuple[str, str, Any], ...]
    limit: int

    def sql(self, param: str) -> tuple[str, list[Any]]:
        """The query's ``WHERE ... ORDER BY ... LIMIT`` clause (``param``: the placeholder)
        and its parameters."""
        clause = ""
        if self.filters:
            clause = " WHERE " + " AND ".join(f"{c} {op} {param}" for c, op, _ in self.filters)
        clause += f" ORDER BY created_at DESC, run_id DESC LIMIT {param}"
        return clause, [v for _, _, v in self.filters] + [self.limit]

    def matches(self, run: RunRecord) -> bool:
        for column, op, value in self.filters:
            have = getattr(run, column)
            if not (have == value if op == "=" else have >= value if op == ">=" else have < value):
                return False
        return True


def _str_or_none(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be a str or None, got {value!r}")


def _time_or_none(name: str, value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    ):
        raise ArgumentTypeError(f"{name} must be a time in epoch seconds or None, got {value!r}")


def _run_ids(run_ids: object) -> list[str]:
    """``run_ids`` checked (a sequence of str), without repeats, in order."""
    if isinstance(run_ids, str) or not isinstance(run_ids, Sequence):
        raise ArgumentTypeError(
            f"run_ids must be a list of run ids, got {type(run_ids).__name__} {run_ids!r}"
        )
    for run_id in run_ids:
        if not isinstance(run_id, str):
            raise ArgumentTypeError(
                f"run_ids must hold str run ids, got {type(run_id).__name__} {run_id!r}"
            )
    return list(dict.fromkeys(run_ids))


class StoreBase:
    """The checked public calls every store shares; see the module docstring."""

    _signer: Signer
    _remote = False  # whether other machines can share the store (PostgreSQL)

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def remote(self) -> bool:
        return self._remote

    def submit(
        self,
        done: WriteDone,
        *,
        effects: Sequence[EffectRecord] = (),
        runs: Sequence[RunRecord] = (),
        events: Sequence[EventRecord] = (),
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # a store whose writes are quick writes at once, on the caller's thread
        submit_now(self, done, effects, runs, events)  # type: ignore[arg-type]

    def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        return self._get_runs(_run_ids(run_ids))

    def _get_runs(self, run_ids: list[str]) -> dict[str, RunRecord]:
        got = {}
        for run_id in run_ids:
            rec = self.get_run(run_id)  # type: ignore[attr-defined]
            if rec is not None:
                got[run_id] = rec
        return got

    def start_runs(
        self, run_ids: Sequence[str], owner: str
    ) -> dict[str, tuple[RunLease, RunStart]]:
        if not isinstance(owner, str) or not owner:
            raise ArgumentTypeError(f"owner must be a non-empty str, got {owner!r}")
        return self._start_runs(_run_ids(run_ids), owner)

    def _start_runs(self, run_ids: list[str], owner: str) -> dict[str, tuple[RunLease, RunStart]]:
        me: Any = self
        got: dict[str, tuple[RunLease, RunStart]] = {}
        try:
            for run_id in run_ids:
                try:
                    lease = me.acquire_run(run_id, owner)
                except RunLockedError:
                    continue
                got[run_id] = (lease, RunStart(None, None, None, []))  # released if we fail
                got[run_id] = (lease, self._open_run(run_id))
        except BaseException:
            for lease, _ in got.values():
                lease.release()
            raise
        return got

    def open_run(self, run_id: str) -> RunStart:
        return self._open_run(_run_ids([run_id])[0])

    def _open_run(self, run_id: str) -> RunStart:
        me: Any = self
        rec = me.get_run(run_id)
        if rec is not None and has_outcome(rec):
            return RunStart(rec, None, None, [])
        history = me.load_effects(run_scope(run_id))
        token = me.inbox_token(run_id)  # before the signals: a signal sent meanwhile shows
        return RunStart(rec, history, token, me.list_signals(run_id))

    def inbox_tokens(self, run_ids: Sequence[str]) -> dict[str, object]:
        return self._inbox_tokens(_run_ids(run_ids))

    def _inbox_tokens(self, run_ids: list[str]) -> dict[str, object]:
        return {run_id: self.inbox_token(run_id) for run_id in run_ids}  # type: ignore[attr-defined]

    def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        parent_id: str | None = None,
        updated_after: float | None = None,
        updated_before: float | None = None,
        limit: int = 1000,
    ) -> list[RunRecord]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ArgumentError(f"limit must be an int >= 0, got {limit!r}")
        for name, value in (("status", status), ("workflow", workflow), ("parent_id", parent_id)):
            _str_or_none(name, value)
        _time_or_none("updated_after", updated_after)
        _time_or_none("updated_before", updated_before)
        filters = tuple(
            (column, op, value)
            for column, op, value in (
                ("status", "=", status),
                ("workflow", "=", workflow),
                ("parent_id", "=", parent_id),
                ("updated_at", ">=", updated_after),
                ("updated_at", "<", updated_before),
            )
            if value is not None
        )
        return self._list_runs(RunQuery(filters, limit))

    def _list_runs(self, query: RunQuery) -> list[RunRecord]:
        raise NotImplementedError

    def prune_effects(self, scope_prefix: str, older_than: float) -> int:
        if not isinstance(scope_prefix, str):
            raise ArgumentTypeError(
                f"scope_prefix must be a str such as 'top/' or 'shared', got {scope_prefix!r}"
            )
        if isinstance(older_than, bool) or not isinstance(older_than, (int, float)):
            raise ArgumentTypeError(
                f"older_than must be a time in epoch seconds (a number), got {older_than!r}"
            )
        return self._prune_effects(scope_prefix, float(older_than))

    def _prune_effects(self, scope_prefix: str, older_than: float) -> int:
        raise NotImplementedError

    def effect_scopes(self, prefix: str) -> list[str]:
        if not isinstance(prefix, str):
            raise ArgumentTypeError(
                f"prefix must be a str such as 'top/' (notebooks and scripts), got {prefix!r}"
            )
        return self._effect_scopes(prefix)

    def _effect_scopes(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        if not isinstance(owner, str) or not owner:
            raise ArgumentTypeError(f"owner must be a non-empty str, got {owner!r}")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not seconds >= 0
            or math.isinf(seconds)
        ):
            raise ArgumentError(f"seconds must be a finite number of seconds >= 0, got {seconds!r}")
        return self._claim_effect(key, owner, float(seconds))

    def _claim_effect(self, key: EffectKey, owner: str, seconds: float) -> bool:
        raise NotImplementedError

    def reset_run(self, run: RunRecord, consumed_signals: Sequence[str]) -> None:
        if not isinstance(run, RunRecord):
            raise ArgumentTypeError(f"run must be a RunRecord, got {run!r}")
        if isinstance(consumed_signals, (str, bytes)) or not all(
            isinstance(s, str) for s in consumed_signals
        ):
            raise ArgumentTypeError(
                f"consumed_signals must be a list of signal ids (str), got {consumed_signals!r}"
            )
        self._reset_run(run, tuple(consumed_signals))

    def _reset_run(self, run: RunRecord, consumed_signals: tuple[str, ...]) -> None:
        raise NotImplementedError

    def claim_run(self, owner: str, workflows: Sequence[str]) -> tuple[RunRecord, RunLease] | None:
        if not isinstance(owner, str) or not owner:
            raise ArgumentTypeError(f"owner must be a non-empty str, got {owner!r}")
        if isinstance(workflows, (str, bytes)) or not all(isinstance(w, str) for w in workflows):
            raise ArgumentTypeError(
                f"workflows must be a list of workflow names (str), got {workflows!r}"
            )
        return self._claim_run(owner, list(dict.fromkeys(workflows)))

    def _claim_run(self, owner: str, workflows: list[str]) -> tuple[RunRecord, RunLease] | None:
        raise NotImplementedError
