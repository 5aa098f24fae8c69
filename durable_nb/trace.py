"""Runs and their journals as plain data and text: shared by the CLI and the notebook magics."""

from __future__ import annotations

import json
import time
from typing import Any

from .errors import RunNotFoundError
from .store import RunRecord, Store

__all__ = ["format_run", "format_runs", "run_info"]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def run_info(store: Store, run_id: str) -> dict[str, Any]:
    """A run's status, custom status and recorded steps, as JSON-ready data."""
    rec = store.get_run(run_id)
    if rec is None:
        raise RunNotFoundError(
            f"no run {run_id!r} in the store {store.url!r}; list runs with `durable-nb runs`"
        )
    steps = store.load_effects("run/" + run_id)
    return {
        "run_id": rec.run_id,
        "workflow": rec.workflow,
        "status": rec.status,
        "executions": rec.executions,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "parent_id": rec.parent_id,
        "detail": json.loads(rec.detail) if rec.detail else None,
        "custom_status": json.loads(rec.custom_status) if rec.custom_status else None,
        "steps": [
            {
                "seq": s.seq,
                "kind": s.kind,
                "name": s.identity,
                "args": s.detail,
                "duration_s": round(s.duration, 6),
                "error": s.is_error,
            }
            for s in steps
        ],
    }


def format_runs(runs: list[RunRecord]) -> str:
    """A table of runs, newest first."""
    if not runs:
        return "no runs"
    w = max(len(r.run_id) for r in runs)
    lines = [f"{'RUN':<{w}}  {'STATUS':<10} {'UPDATED':<19}  WORKFLOW"]
    lines += [f"{r.run_id:<{w}}  {r.status:<10} {_when(r.updated_at)}  {r.workflow}" for r in runs]
    return "\n".join(lines)


def format_run(info: dict[str, Any]) -> str:
    """A run as readable text (see :func:`run_info`)."""
    lines = [
        f"run       {info['run_id']}",
        f"workflow  {info['workflow']}",
        f"status    {info['status']}",
    ]
    if info["detail"]:
        lines.append(f"detail    {json.dumps(info['detail'])}")
    if info["custom_status"] is not None:
        lines.append(f"custom    {json.dumps(info['custom_status'])}")
    steps = info["steps"]
    lines.append(f"steps     {len(steps)} recorded, {info['executions']} execution(s)")
    for s in steps:
        args = s["args"] if s["kind"] == "effect" else ""
        flag = " ERROR" if s["error"] else ""
        lines.append(
            f"  {s['seq']:>5}  {s['kind']:<8} {s['name']}{args}  {s['duration_s'] * 1000:.1f} ms{flag}"
        )
    return "\n".join(lines)
