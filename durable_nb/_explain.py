"""Why a cell or an effect executed instead of replaying (guide, "Why did it run?").

One reading of the records, shared by ``%durable why``, the note a ``%%effect`` cell prints
when it runs again, and the trace widget's step detail. Everything needed is in the store,
so the answer survives a kernel restart:

- a ``%%effect`` cell leaves a ``cell-last`` record per cell (Jupyter cell id, else its
  ``--name``, else its source): what it read (each input's kind, type and short hash), its
  normalized-source version and its source text, and why it ran;
- an ``@effect`` call's record keeps its code version, input hash and a preview of its
  arguments, which is enough to compare it with the previous call of the same function.
"""

from __future__ import annotations

import difflib
import time
from typing import Any

from .store import EffectRecord

__all__ = ["cell_reasons", "effect_why", "step_why", "when"]

#: an input as the ``cell-last`` record keeps it: ``[kind, type name, short hash]``, kind
#: being "content", "provenance" or "module"
Input = list[str]


def _short(h: str) -> str:
    return h[:8]


def cell_reasons(prev: dict[str, Any] | None, now: dict[str, Any], *, force: bool) -> list[str]:
    """Why a ``%%effect`` cell executes: each difference between its last execution
    (``prev``, a ``cell-last`` summary) and now, most telling first."""
    if force:
        return ["--force was given"]
    if prev is None:
        return ["first run of this cell"]
    reasons: list[str] = []
    if prev.get("version") != now.get("version"):
        reasons.append("the code changed: " + _changed_lines(prev.get("source", ""), now["source"]))
    old: dict[str, Input] = prev.get("inputs", {})
    new: dict[str, Input] = now.get("inputs", {})
    for name in new:
        if name not in old:
            reasons.append(f"it reads a new input {name!r} ({new[name][1]})")
        elif old[name] != new[name]:
            (ok, ot, oh), (nk, nt, nh) = old[name], new[name]
            if ot != nt:
                what = f"type {ot} → {nt}"
            elif ok != nk:
                what = f"keyed by {ok} → {nk}"
            else:
                what = f"{nk} {_short(oh)} → {_short(nh)}"
            reasons.append(f"input {name!r} ({nt}) changed: {what}")
    reasons += [f"it no longer reads {name!r}" for name in old if name not in new]
    old_env, new_env = prev.get("env", {}), now.get("env", {})
    reasons += [
        f"environment variable {e!r} changed"
        for e in sorted(set(old_env) | set(new_env))
        if old_env.get(e) != new_env.get(e)
    ]
    if reasons:
        return reasons
    if not prev.get("recorded", True):
        why = prev.get("not_recorded") or "it did not finish"
        return [f"its last run was not recorded ({why})"]
    return [
        "its record is gone (cleared with %durable cache clear, pruned by gc, or another store)"
    ]


def _changed_lines(old: str, new: str, limit: int = 3) -> str:
    diff = [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    if not diff:
        return "(formatting aside)"
    shown = " | ".join(_clip(line) for line in diff[:limit])
    return shown + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def _clip(text: str, n: int = 70) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _compare(rec: EffectRecord, other: EffectRecord) -> str:
    """Why ``rec`` did not replay ``other``: the part of the key that differs."""
    if rec.version != other.version:
        if rec.version.startswith("v:") or other.version.startswith("v:"):
            return (
                f"the version pin changed: {other.version.removeprefix('v:')!r} → "
                f"{rec.version.removeprefix('v:')!r}"
            )
        return f"its code changed (version {_short(other.version)} → {_short(rec.version)})"
    if rec.input_hash != other.input_hash:
        before = other.detail or "?"
        now = rec.detail or "?"
        return (
            f"its arguments changed (input {_short(other.input_hash)} → "
            f"{_short(rec.input_hash)}): before {_clip(before, 120)}, now {_clip(now, 120)}"
        )
    return (
        f"it was called more often with these arguments (occurrence {rec.occurrence}; "
        f"the earlier call was occurrence {other.occurrence})"
    )


def effect_why(records: list[EffectRecord], identity: str) -> str:
    """Why the latest call of ``identity`` among a notebook's records executed."""
    mine = [r for r in records if r.identity == identity and r.kind == "effect"]
    if not mine:
        return f"no call of {identity!r} is recorded in this notebook"
    mine.sort(key=lambda r: r.started_at)
    last = mine[-1]
    earlier = [r for r in mine[:-1] if r.key != last.key]
    head = f"{identity} executed at {when(last.started_at)}"
    if not earlier:
        return f"{head}: first call (no earlier call of it is recorded here)"
    return f"{head}: {_compare(last, earlier[-1])}"


def step_why(records: list[EffectRecord], rec: EffectRecord, *, replayed: bool = False) -> str:
    """Why step ``rec`` of a run executed (or that it replayed), comparing it with the
    run's other records of the same function."""
    if replayed:
        return f"replayed: recorded at {when(rec.started_at)}, nothing in its key changed"
    others = [
        r
        for r in records
        if r.identity == rec.identity and r.key != rec.key and r.started_at <= rec.started_at
    ]
    if not others:
        return "executed: first call with this key in this run (no earlier execution recorded it)"
    same_place = [r for r in others if r.seq == rec.seq] or others
    return "executed: " + _compare(rec, max(same_place, key=lambda r: r.started_at))
