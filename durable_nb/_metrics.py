"""What the runs and notebooks of a store spent and what replay saved them: the figures of
``durable-nb metrics`` and :meth:`durable_nb.client.Client.metrics`, per run, per notebook
and per model.

*Spent* is read from records, so a replay or a recovery never adds to it: the tokens of the
``usage`` records (one per recorded call) and the durations of the recorded steps; for a run
that continued as new, each earlier generation's spend from the ``continued_as_new`` event
that ended it (its journal is gone); a fork's copied steps count for the run they were copied
from, not again. *Saved by replay* is read from the events that close executions (their
``saved_seconds`` and ``tokens_saved``): what the replayed steps had cost when they executed.

A run's spend and savings count for the notebook that executed them: the ``notebook`` of the
execution's opening event (a notebook's path, a script's, a worker's; ``?`` for executions
recorded before it was kept). A notebook's own effects outside runs (its ``top/<name>``
scope) count for it too, and ``@effect(shared=True)`` calls for ``shared``; their replays
write nothing, so they show no savings.
"""

from __future__ import annotations

import bisect
import json
from typing import Any

from ._journal import (
    AUX_KINDS,
    CLOSING_EVENTS,
    EXECUTION_EVENTS,
    RUN_STATUSES,
    SHARED_SCOPE,
    TOP_SCOPE_PREFIX,
    USAGE_PREFIX,
    read_detail,
    run_scope,
)
from .store import EffectRecord, Store

__all__ = ["metrics"]

_ALL = 1 << 62  # "no limit" for list_runs


def _tokens() -> dict[str, int]:
    return {"prompt": 0, "completion": 0}


def _account() -> dict[str, Any]:
    return {
        "tokens": _tokens(),
        "tokens_saved": _tokens(),
        "spent_seconds": 0.0,
        "saved_seconds": 0.0,
    }


def _add(acc: dict[str, int], tokens: object) -> None:
    if isinstance(tokens, dict):
        acc["prompt"] += int(tokens.get("prompt", 0) or 0)
        acc["completion"] += int(tokens.get("completion", 0) or 0)


class _Books:
    """The accounts being summed: overall, per run, per notebook, per model."""

    def __init__(self) -> None:
        self.total = _account()
        self.runs: dict[str, dict[str, Any]] = {}
        self.notebooks: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}

    def accounts(self, run: str | None, notebook: str, model: str | None = None) -> list[Any]:
        out = [self.total, self.notebooks.setdefault(notebook, _account())]
        if run is not None:
            out.append(self.runs.setdefault(run, _account()))
        if model is not None:
            out.append(self.models.setdefault(model, _account()))
        return out

    def spend(self, records: list[EffectRecord], run: str | None, notebook_at: Any) -> None:
        """Tokens and step time of ``records`` (one scope's)."""
        took = {
            (r.identity, r.version, r.input_hash, r.occurrence): r.duration
            for r in records
            if r.kind not in AUX_KINDS
        }
        for r in records:
            notebook = notebook_at(r.started_at)
            if r.kind == "usage":
                d = read_detail(r.detail)
                model = str(d.get("model") or "?")
                of = r.identity.removeprefix(USAGE_PREFIX)  # a cell's: "<its identity>#<model>"
                seconds = took.get(
                    (of, *r.key[2:]), took.get((of.rpartition("#")[0], *r.key[2:]), 0.0)
                )
                tokens = {
                    "prompt": d.get("prompt_tokens"),
                    "completion": d.get("completion_tokens"),
                }
                for acc in self.accounts(run, notebook, model):
                    _add(acc["tokens"], tokens)
                self.models[model]["spent_seconds"] += seconds
            elif r.kind not in AUX_KINDS:
                for acc in self.accounts(run, notebook):
                    acc["spent_seconds"] += r.duration

    def close(self, run: str, notebook: str, data: dict[str, Any], renewed: bool) -> None:
        """An execution's closing event: what replay saved it; and, ``renewed`` (it continued
        as new), what its generation had spent."""
        for acc in self.accounts(run, notebook):
            acc["saved_seconds"] += float(data.get("saved_seconds", 0.0) or 0.0)
            _add(acc["tokens_saved"], data.get("tokens_saved"))
            if renewed:
                acc["spent_seconds"] += float(data.get("spent_seconds", 0.0) or 0.0)
                _add(acc["tokens"], data.get("tokens"))
        for model, tokens in (data.get("tokens_saved_by_model") or {}).items():
            _add(self.models.setdefault(str(model), _account())["tokens_saved"], tokens)
        if renewed:
            for model, tokens in (data.get("tokens_by_model") or {}).items():
                _add(self.models.setdefault(str(model), _account())["tokens"], tokens)


def _data(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _rounded(accounts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        k: {
            **v,
            "spent_seconds": round(v["spent_seconds"], 6),
            "saved_seconds": round(v["saved_seconds"], 6),
        }
        for k, v in sorted(accounts.items())
    }


def metrics(store: Store) -> dict[str, Any]:
    """The figures (see the module docstring and ``Client.metrics``)."""
    recs = store.list_runs(limit=_ALL)
    by_status = dict.fromkeys(RUN_STATUSES, 0)
    by_workflow: dict[str, int] = {}
    books = _Books()
    executed = replayed = ended = 0
    for r in recs:
        by_status[r.status] = by_status.get(r.status, 0) + 1
        by_workflow[r.workflow] = by_workflow.get(r.workflow, 0) + 1
        events = sorted(store.load_events(r.run_id), key=lambda e: e.ts)
        opens = [(e.ts, _data(e.data)) for e in events if e.kind in EXECUTION_EVENTS]
        starts = [ts for ts, _ in opens]
        names = [str(d.get("notebook") or "?") for _, d in opens]

        def notebook_at(ts: float, starts: list[float] = starts, names: list[str] = names) -> str:
            i = bisect.bisect_right(starts, ts) - 1
            return names[max(i, 0)] if names else "?"

        forked = next((e.ts for e in events if e.kind == "forked"), None)
        records = [
            x
            for x in store.load_effects(run_scope(r.run_id))
            if forked is None or x.started_at >= forked  # a fork's copies: the origin's spend
        ]
        books.spend(records, r.run_id, notebook_at)
        books.runs.setdefault(r.run_id, _account())
        for e in events:
            if e.kind not in CLOSING_EVENTS or not e.data:
                continue
            data = _data(e.data)
            ended += 1
            executed += int(data.get("executed", 0) or 0)
            replayed += int(data.get("replayed", 0) or 0)
            # the execution it closes opened last before it (or at its very instant)
            books.close(r.run_id, notebook_at(e.ts), data, e.kind == "continued_as_new")
    for scope in [*store.effect_scopes(TOP_SCOPE_PREFIX), SHARED_SCOPE]:
        name = scope.removeprefix(TOP_SCOPE_PREFIX)
        books.spend(store.load_effects(scope), None, lambda _ts, name=name: name)
    total = books.total
    return {
        "runs": len(recs),
        "by_status": by_status,
        "by_workflow": dict(sorted(by_workflow.items())),
        "executions": sum(r.executions for r in recs),
        "executions_ended": ended,
        "steps_executed": executed,
        "steps_replayed": replayed,
        "spent_seconds": round(total["spent_seconds"], 6),
        "saved_seconds": round(total["saved_seconds"], 6),
        "tokens": total["tokens"],
        "tokens_saved": total["tokens_saved"],
        "tokens_by_model": {m: v["tokens"] for m, v in sorted(books.models.items())},
        "tokens_by_run": {
            k: v["tokens"] for k, v in sorted(books.runs.items()) if any(v["tokens"].values())
        },
        "by_run": _rounded(books.runs),
        "by_notebook": _rounded(books.notebooks),
        "by_model": {
            m: {
                "tokens": v["tokens"],
                "tokens_saved": v["tokens_saved"],
                "spent_seconds": round(v["spent_seconds"], 6),
            }
            for m, v in sorted(books.models.items())
        },
    }
