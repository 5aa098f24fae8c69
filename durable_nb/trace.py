"""A run's journal as trace data and text: the one reading of runs shared by the CLI, the admin
:class:`~durable_nb.client.Client`, the notebook magics and the widgets.

:func:`run_trace` is the contract the widgets code against; everything in it is JSON data.
:func:`step_label` is the one way a step is named (the CLI's tables, the widget's timeline)
and :func:`waiting_of` the one rule for what a waiting run waits on (a run's record, or a
live status message). It reads only through the :class:`~durable_nb.store.Store` protocol,
so it works on any store, and it never imports user code: a recorded error is described from
its signed record without rebuilding the exception. The vocabulary it reads — step kinds,
their details, statuses, events — is ``_journal``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict, cast

from . import _codecs
from ._journal import (
    AUX_KINDS,
    CANCEL_SIGNAL,
    CLOSING_EVENTS,
    EXECUTION_EVENTS,
    HIDDEN_KINDS,
    PROGRESS_PREFIX,
    USAGE_PREFIX,
    ProgressDetail,
    read_detail,
    run_scope,
    signal_id_of,
    signal_label,
)
from .errors import RunNotFoundError
from .store import EffectRecord, EventRecord, RunRecord, Store

__all__ = [
    "EXECUTION_EVENTS",
    "Tokens",
    "TraceStep",
    "describe_error",
    "format_history",
    "format_run",
    "format_runs",
    "format_trace",
    "map_note",
    "progress_text",
    "run_history",
    "run_info",
    "run_summary",
    "run_trace",
    "shown_detail",
    "step_label",
    "token_totals",
    "waiting_of",
]


class TraceStep(TypedDict):
    """One step of a trace (see :func:`run_trace`)."""

    seq: int  # its position in the execution that recorded it
    step: int | None  # the number a person sees (0, 1, 2... without gaps); None: not shown
    # (the engine's own steps, such as a timed wait's deadline: ``_journal.HIDDEN_KINDS``)
    kind: str  # a _journal.StepKind (a store a newer version wrote may hold others)
    name: str  # the effect's identity, or the engine step's (``dn.sleep``...)
    state: Literal["executed", "replayed", "failed"]
    started_at: float
    duration: float
    args: str  # the stored detail: an effect's argument preview, else the kind's JSON detail
    error: str | None  # ``Type('message')`` of a failure
    attempts: int
    tokens: Tokens | None  # what an LLM call's result reported it used
    progress: ProgressDetail | None  # how far its progress bar got, when one reported


class MapItems(TypedDict):
    """How a ``map`` step's items stand (see :func:`run_trace`)."""

    items: int  # how many items the map has
    done: int  # items with a result: executed + replayed
    executed: int  # items the latest execution computed
    replayed: int  # items an earlier execution computed
    failed: int  # items that failed for good (their errors are recorded in runs)
    in_flight: int  # items not ended yet, while the run is running (else 0)
    missing: int  # items not ended when the run stopped (a rerun or resume sends them)
    durations: list[float]  # seconds each recorded item took on its worker, in input order


class MapStep(TraceStep, total=False):
    map: MapItems  # only on ``map`` steps


class Tokens(TypedDict):
    """Tokens an LLM call used (``prompt`` = input, ``completion`` = output)."""

    prompt: int
    completion: int
    model: str


# within one instant: a fork's origin, then an execution's opening, ..., its closing event
_EVENT_RANK = {"forked": -1} | {k: 0 for k in EXECUTION_EVENTS} | {k: 2 for k in CLOSING_EVENTS}
_NOISE = ("signal_id",)  # ids that make a timeline line long and say nothing to a reader


def progress_text(p: object) -> str:
    """A step's final progress as the widget and the trace show it: ``12/12 pages``, ``37``
    (no total); '' for none."""
    if not isinstance(p, Mapping) or not isinstance(p.get("n"), int):
        return ""
    total = p.get("total")
    text = f"{p['n']}/{total}" if isinstance(total, int) else str(p["n"])
    return f"{text} {p.get('desc') or ''}".strip()


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _json(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:  # a store written by hand or by a newer version: show it raw
        return text


def _not_found(store: Store, run_id: str) -> RunNotFoundError:
    return RunNotFoundError(
        f"no run {run_id!r} in the store {store.url!r}; list runs with `durable-nb runs`"
    )


def describe_error(rec: EffectRecord, store: Store) -> str:
    """``Type('message')`` of a recorded error, read without rebuilding the exception."""
    return _codecs.describe_error(rec.payload, store.signer)


def run_summary(rec: RunRecord) -> dict[str, Any]:
    """A run record as JSON data (the ``run`` part of a trace; payloads left out)."""
    return {
        "run_id": rec.run_id,
        "workflow": rec.workflow,
        "status": rec.status,
        "custom_status": _json(rec.custom_status or ""),
        "status_version": rec.status_version,
        "parent_id": rec.parent_id,
        "executions": rec.executions,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "detail": _json(rec.detail),
        "generation": rec.generation,
        "version": rec.version,
    }


def waiting_of(status: str, detail: Any) -> list[dict[str, Any]]:
    """What a waiting run waits on, from its record's detail (or a live ``status`` message):
    a list of ``{"kind": "signal", "name": ...}``, ``{"kind": "timer", "until": ...}`` and,
    for a run waiting on several things at once (``ctx.all``), the engine's own entries
    (``queue``, ``retry``) too.

    The engine writes ``{"signal": name}``, ``{"timer_until": iso}`` or a ready-made
    ``waiting`` list; lists under ``signals`` / ``timers`` are read too."""
    if status != "waiting" or not isinstance(detail, dict):
        return []
    out: list[dict[str, Any]] = []
    ready = detail.get("waiting")
    if isinstance(ready, list):
        out += [w for w in ready if isinstance(w, dict) and "kind" in w]
    names = detail.get("signals")
    names = names if isinstance(names, list) else []
    if isinstance(detail.get("signal"), str):
        names = [detail["signal"], *names]
    out += [{"kind": "signal", "name": n} for n in names if isinstance(n, str)]
    untils = detail.get("timers")
    untils = untils if isinstance(untils, list) else []
    if isinstance(detail.get("timer_until"), str):
        untils = [detail["timer_until"], *untils]
    out += [{"kind": "timer", "until": u} for u in untils if isinstance(u, str)]
    return out


def _event_dict(ev: EventRecord) -> dict[str, Any]:
    data = _json(ev.data)
    return {"ts": ev.ts, "kind": ev.kind, "data": data if data is not None else {}}


def run_trace(store: Store, run_id: str) -> dict[str, Any]:
    """A run as JSON-ready trace data, read from ``store``.

    The shape (the widgets code against it; keep it stable)::

        {"run": {run_id, workflow, status, custom_status, status_version, parent_id,
                 executions, created_at, updated_at, detail, generation, version,
                 forked_from: {run_id, step} | None},
         "steps": [{seq, step, kind, name, state, started_at, duration, args, error,
                    attempts, tokens}],
         "waiting": [{"kind": "signal", "name": ...} | {"kind": "timer", "until": ...}],
         "pending_signals": [name, ...],
         "children": [run_id, ...],
         "events": [{ts, kind, data}],
         "totals": {steps, executed, replayed, failed, saved_seconds, tokens,
                    tokens_saved, tokens_by_model, tokens_before}}

    ``steps`` are in ``seq`` order. A step's ``state`` is ``"executed"`` when it was recorded
    by the latest execution (the one opened by the last ``started``/``resumed`` event),
    ``"replayed"`` when an earlier execution recorded it, ``"failed"`` for a recorded error,
    and also for a step whose last attempt failed (``step_failed`` event) in the latest
    execution of a run that is no longer running, when no record exists for it (an error
    that is not cached leaves no record). ``attempts`` is the number of ``step_failed``
    events of the step plus one. ``error`` is ``"Type('message')"`` or ``None``.
    ``totals.saved_seconds`` is the time the replayed steps took when they executed.

    ``step`` numbers the shown steps without gaps (``seq`` counts engine bookkeeping too,
    such as a timed wait's deadline, which is in ``steps`` with ``step`` None and which no
    timeline shows nor the totals count). ``tokens`` is what an LLM
    call's result reported (``{prompt, completion, model}``), else ``None``; the totals
    count each recorded call once (``tokens``) and what replayed steps had cost
    (``tokens_saved``).

    Raises :class:`~durable_nb.errors.RunNotFoundError` if the store has no such run.
    """
    rec = store.get_run(run_id)
    if rec is None:
        raise _not_found(store, run_id)
    records = store.load_effects(run_scope(run_id))
    events = [_event_dict(e) for e in store.load_events(run_id)]
    # events of one instant come back in event-id order, which says nothing about their order
    # (the clock's resolution, or a fake clock, gives them one timestamp): an execution's
    # opening event goes first and its closing one last
    events.sort(key=lambda e: (e["ts"], _EVENT_RANK.get(e["kind"], 1)))
    starts = [e["ts"] for e in events if e["kind"] in EXECUTION_EVENTS]
    latest = starts[-1] if starts else float("-inf")

    failures: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for e in events:
        d = e["data"]
        if e["kind"] == "step_failed" and isinstance(d, dict) and isinstance(d.get("seq"), int):
            failures.setdefault((d["seq"], str(d.get("identity", ""))), []).append(e)

    steps: list[TraceStep] = []
    recorded: set[tuple[int, str]] = set()
    usage: dict[tuple[int, str], Tokens] = {}
    bars: dict[tuple[int, str], ProgressDetail] = {}
    items: dict[int, list[EffectRecord]] = {}
    for r in records:
        if r.kind == "map_item":
            items.setdefault(r.seq, []).append(r)
        elif r.kind == "progress":
            d = read_detail(r.detail)
            if isinstance(d.get("n"), int):
                total = d.get("total")
                bars[(r.seq, r.identity.removeprefix(PROGRESS_PREFIX))] = {
                    "n": d["n"],
                    "total": total if isinstance(total, int) else None,
                    "desc": str(d.get("desc") or ""),
                }
        elif r.kind == "usage":
            d = read_detail(r.detail)
            usage[(r.seq, r.identity.removeprefix(USAGE_PREFIX))] = {
                "prompt": int(d.get("prompt_tokens", 0) or 0),
                "completion": int(d.get("completion_tokens", 0) or 0),
                "model": str(d.get("model", "") or ""),
            }
    for r in records:
        if r.kind in AUX_KINDS:
            continue
        recorded.add((r.seq, r.identity))
        state: Literal["executed", "replayed", "failed"]
        error: str | None
        if r.is_error:
            state, error = "failed", describe_error(r, store)
        else:
            state, error = ("executed" if r.started_at >= latest else "replayed"), None
        kind = r.kind
        if kind == "cleared":  # an error that failed the run, shown as the call it was
            kind = "stream" if "chunks" in read_detail(r.detail) else "effect"
        steps.append(
            {
                "seq": r.seq,
                "kind": kind,
                "name": r.identity,
                "state": state,
                "started_at": r.started_at,
                "duration": r.duration,
                "args": r.detail,
                "error": error,
                "attempts": len(failures.get((r.seq, r.identity), ())) + 1,
                "step": 0,
                "tokens": usage.get((r.seq, r.identity)),
                "progress": bars.get((r.seq, r.identity)),
            }
        )
    if rec.status != "running":
        for (seq, identity), evs in failures.items():
            last = evs[-1]
            if (seq, identity) in recorded or last["ts"] < latest:
                continue
            steps.append(
                {
                    "seq": seq,
                    "kind": "effect",
                    "name": identity,
                    "state": "failed",
                    "started_at": last["ts"],
                    "duration": 0.0,
                    "args": "",
                    "error": str(last["data"].get("error", "")) or None,
                    "attempts": len(evs),
                    "step": 0,
                    "tokens": None,
                    "progress": None,
                }
            )
    for st in steps:
        if st["kind"] == "map":
            cast(MapStep, st)["map"] = _map_items(st, items.get(st["seq"], []), latest, rec.status)
    steps.sort(key=lambda s: (s["seq"], s["started_at"]))
    # numbers without gaps, the ones dn.fork(from_step=) takes (_journal.shown_seqs); the
    # engine's own steps (a timed wait's deadline) stay in the data, unnumbered and unshown
    shown = [s for s in steps if s["kind"] not in HIDDEN_KINDS]
    number = {seq: i for i, seq in enumerate(sorted({s["seq"] for s in shown}))}
    for s in steps:
        s["step"] = number.get(s["seq"]) if s["kind"] not in HIDDEN_KINDS else None

    consumed = {sid for r in records if (sid := signal_id_of(r.kind, r.detail)) is not None}
    pending = [
        signal_label(s.name)
        for s in store.list_signals(run_id)
        if s.signal_id not in consumed and s.name != CANCEL_SIGNAL
    ]
    children = sorted(
        store.list_runs(parent_id=run_id, limit=1_000_000), key=lambda c: (c.created_at, c.run_id)
    )
    run = run_summary(rec)
    run["forked_from"] = _forked_from(events)
    counts = {state: sum(s["state"] == state for s in shown) for state in _STATES}
    return {
        "run": run,
        "steps": steps,
        "waiting": waiting_of(rec.status, run["detail"]),
        "pending_signals": pending,
        "children": [c.run_id for c in children],
        "events": events,
        "totals": {
            "steps": len(shown),
            **counts,
            "saved_seconds": round(
                sum(s["duration"] for s in shown if s["state"] == "replayed"), 6
            ),
            **token_totals(shown, events),
        },
    }


def _map_items(step: TraceStep, recs: list[EffectRecord], latest: float, status: str) -> MapItems:
    d = read_detail(step["args"])
    n = int(d.get("items", len(recs)) or 0)
    ok = [r for r in recs if not r.is_error]
    failed = len(recs) - len(ok)
    executed = sum(r.started_at >= latest for r in ok)
    open_ = max(0, n - len(recs)) if not d.get("complete") else 0
    return {
        "items": n,
        "done": len(ok),
        "executed": executed,
        "replayed": len(ok) - executed,
        "failed": failed,
        "in_flight": open_ if status == "running" else 0,
        "missing": open_ if status != "running" else 0,
        "durations": [round(r.duration, 6) for r in sorted(recs, key=lambda r: r.started_at)],
    }


def token_totals(
    steps: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """Tokens of a trace's steps: ``tokens`` (prompt, completion) spent by every recorded
    execution, ``tokens_saved`` by the replayed steps (recorded by an earlier execution), and
    spent per model (``tokens_by_model``). The earlier generations of a run that continued
    as new (their journals are gone; each ``continued_as_new`` event in ``events`` keeps what
    its generation spent) count in ``tokens`` and ``tokens_by_model`` too, and alone in
    ``tokens_before`` — the whole chain's spend, not only the latest generation's."""
    spent = {"prompt": 0, "completion": 0}
    saved = {"prompt": 0, "completion": 0}
    before = {"prompt": 0, "completion": 0}
    by_model: dict[str, dict[str, int]] = {}
    for e in events:
        d = e.get("data")
        if e.get("kind") != "continued_as_new" or not isinstance(d, dict):
            continue
        for model, t in (d.get("tokens_by_model") or {}).items():
            m = by_model.setdefault(str(model), {"prompt": 0, "completion": 0})
            for k in ("prompt", "completion"):
                n = int(t.get(k, 0) or 0)
                m[k] += n
                spent[k] += n
                before[k] += n
    for s in steps:
        t = s.get("tokens")
        if not t:
            continue
        for k in ("prompt", "completion"):
            spent[k] += t[k]
            if s["state"] == "replayed":
                saved[k] += t[k]
        m = by_model.setdefault(t["model"] or "?", {"prompt": 0, "completion": 0})
        m["prompt"] += t["prompt"]
        m["completion"] += t["completion"]
    return {
        "tokens": spent,
        "tokens_saved": saved,
        "tokens_by_model": by_model,
        "tokens_before": before,
    }


_STATES = ("executed", "replayed", "failed")


def _forked_from(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``{"run_id", "step"}`` of the run a fork was made from (its ``forked`` event)."""
    for e in events:
        d = e["data"]
        if e["kind"] == "forked" and isinstance(d, dict) and isinstance(d.get("from"), str):
            return {"run_id": d["from"], "step": d.get("step")}
    return None


def run_info(store: Store, run_id: str) -> dict[str, Any]:
    """A run's record with its steps, waits, children and totals in one flat object (what
    ``durable-nb show --json`` prints): :func:`run_trace` without the events."""
    trace = run_trace(store, run_id)
    return {
        **trace["run"],
        "waiting": trace["waiting"],
        "pending_signals": trace["pending_signals"],
        "children": trace["children"],
        "totals": trace["totals"],
        "steps": trace["steps"],
    }


def run_history(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step and event of a trace in time order, each tagged ``"type": "step"`` or
    ``"event"`` with its time in ``ts``. Within one instant an execution's opening event comes
    first, then steps, then other events, then its closing event."""
    items = [{"type": "step", "ts": s["started_at"], **s} for s in trace["steps"]]
    items += [{"type": "event", **e} for e in trace["events"]]

    def order(i: dict[str, Any]) -> tuple[float, float, int]:
        if i["type"] == "step":
            return (i["ts"], 1.0, i["seq"])
        rank = _EVENT_RANK.get(i["kind"], 1)
        return (i["ts"], rank if rank != 1 else 1.5, 0)

    items.sort(key=order)
    return items


# --------------------------------------------------------------------------- text


def _table(header: list[str], rows: Iterable[list[str]], right: Iterable[int] = ()) -> list[str]:
    rows = list(rows)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    align = set(right)

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in align else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def format_runs(runs: Sequence[RunRecord | dict[str, Any]]) -> str:
    """A table of runs (records or :func:`run_summary` data), newest first."""
    if not runs:
        return "no runs"
    rows = [r if isinstance(r, dict) else run_summary(r) for r in runs]
    table = [
        [r["run_id"], r["status"], _when(r["updated_at"]), r["workflow"], r["parent_id"] or ""]
        for r in rows
    ]
    header = ["RUN", "STATUS", "UPDATED", "WORKFLOW", "PARENT"]
    if not any(r[4] for r in table):
        header, table = header[:4], [r[:4] for r in table]
    return "\n".join(_table(header, table))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def step_label(step: Mapping[str, Any], *, compact: bool = False) -> str:
    """A step as a person reads it: ``module.fetch('a', 2)``, ``wait_signal('go')``,
    ``sleep 10s until ...``, ``child parent/child-0-ab12``.

    ``step`` has the keys of a trace step (``kind``, ``name``, ``args``: the stored detail).
    ``compact`` (the widget's timeline, which shows arguments on click) names an effect by
    its function's name alone; every other step reads the same either way."""
    kind, name, detail = step["kind"], str(step["name"]), str(step.get("args") or "")
    if kind == "effect":
        return name.rsplit(".", 1)[-1] if compact else f"{name}{detail}"
    d = read_detail(detail)
    if kind == "signal":
        return f"wait_signal({d.get('name', '?')!r})"
    if kind == "dequeue":
        return f"dequeue({d.get('queue', '?')!r})"
    if kind == "interrupt":
        return f"interrupted by signal {d.get('name', '?')!r}"
    if kind == "deadline":
        if "signal" in d:
            return f"deadline of wait_signal({d['signal']!r})"
        return "deadline" + (f" of dequeue({d['queue']!r})" if "queue" in d else "")
    if kind in ("child", "start_child"):
        return f"{kind} {d.get('run_id', name.removeprefix('dn.child:'))}"
    if kind == "sleep":
        if "seconds" in d:
            return f"sleep {d['seconds']:g}s until {d.get('until', '?')}"
        return f"sleep until {d.get('until', '?')}"
    if kind == "status":
        return f"set_status({d.get('value', '')})"
    if kind == "stream":  # a streaming effect's result, a write to a stream, or its close
        if "args" in d:
            fn = name.rsplit(".", 1)[-1] if compact else f"{name}{d['args']}"
            return f"{fn} ({d.get('chunks', '?')} chunks)"
        if d.get("closed"):
            return f"close stream {d.get('stream', '?')!r} ({d.get('chunks', '?')} chunks)"
        return f"write stream {d.get('stream', '?')!r} #{d.get('index', '?')}: {d.get('chunk', '')}"
    if kind == "race":
        return f"race: #{d.get('winner', '?')} of {d.get('of', '?')} won"
    if kind == "map":
        fn = str(d.get("fn", name.removeprefix("dn.map:")))
        fn = fn.rsplit(".", 1)[-1] if compact else fn
        where = f" on {d['executor']}" if d.get("executor") and not compact else ""
        return f"map {fn} over {d.get('items', '?')} items{where}"
    if kind == "log":
        return f"log {d.get('level', '')}: {d.get('message', '')}"
    if kind in ("now", "random", "uuid"):
        return f"ctx.{kind}()"
    if kind in ("kv_set", "kv_delete"):
        verb = "kv.set" if kind == "kv_set" else "kv.delete"
        value = f", {d['value']}" if "value" in d else ""
        return f"{verb}({d.get('key', '?')!r}{value})"
    return name + (f" {detail}" if detail else "")


def map_note(m: Mapping[str, Any]) -> str:
    """A map step's items as a person reads them: ``2000 done (1000 executed, 1000
    replayed), 0 failed, 0 in flight; per item median 1.2 ms, max 9.0 ms``."""
    text = (
        f"{m['done']} done ({m['executed']} executed, {m['replayed']} replayed), "
        f"{m['failed']} failed"
    )
    if m.get("in_flight"):
        text += f", {m['in_flight']} in flight"
    if m.get("missing"):
        text += f", {m['missing']} missing"
    ds = sorted(m.get("durations") or ())
    if ds:
        text += f"; per item median {_ms(ds[len(ds) // 2])}, max {_ms(ds[-1])}"
    return text


def _tokens_note(step: Mapping[str, Any]) -> str:
    t = step.get("tokens")
    return f"  {t['prompt']}+{t['completion']} tokens" if t else ""


def _progress_note(step: Mapping[str, Any]) -> str:
    text = progress_text(step.get("progress"))
    return f"  {text}" if text else ""


def _tokens_total(totals: Mapping[str, Any]) -> str:
    """``; tokens 1200 prompt + 300 completion spent, 400 + 100 saved by replay`` or ''."""
    spent, saved = totals.get("tokens"), totals.get("tokens_saved")
    if not spent or not (spent["prompt"] or spent["completion"]):
        return ""
    text = f"; tokens {spent['prompt']} prompt + {spent['completion']} completion spent"
    if saved and (saved["prompt"] or saved["completion"]):
        text += f", {saved['prompt']} + {saved['completion']} saved by replay"
    return text


def shown_detail(kind: str, detail: str) -> str:
    """A step's stored detail as a person is shown it (the widget's rows and detail panel):
    an effect's argument preview as is; an engine step's JSON detail without the internal
    ids (``signal_id``) that say nothing to a reader."""
    if kind == "effect":
        return detail
    d = read_detail(detail)
    if not d or not any(k in d for k in _NOISE):
        return detail
    return json.dumps({k: v for k, v in d.items() if k not in _NOISE})


def _waits(waiting: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"signal {w.get('name')!r}"
        if w.get("kind") == "signal"
        else f"timer until {w.get('until')}"
        for w in waiting
    )


def format_run(info: dict[str, Any]) -> str:
    """A run as readable text (see :func:`run_info`)."""
    lines = [
        f"run       {info['run_id']}",
        f"workflow  {info['workflow']}"
        + (f" (version {info['version']})" if info["version"] else ""),
        f"status    {info['status']}",
        f"created   {_when(info['created_at'])}",
        f"updated   {_when(info['updated_at'])}",
    ]
    if info["parent_id"]:
        lines.append(f"parent    {info['parent_id']}")
    if info.get("forked_from"):
        forked = info["forked_from"]
        lines.append(f"forked    from {forked['run_id']} at step {forked['step']}")
    if info["waiting"]:
        lines.append(f"waits on  {_waits(info['waiting'])}")
    if info["pending_signals"]:
        lines.append(f"inbox     {', '.join(info['pending_signals'])}")
    if info["detail"] and not info["waiting"]:
        lines.append(f"detail    {json.dumps(info['detail'])}")
    if info["custom_status"] is not None:
        lines.append(f"custom    {json.dumps(info['custom_status'])} (v{info['status_version']})")
    if info["children"]:
        lines.append(f"children  {', '.join(info['children'])}")
    t = info["totals"]
    gen = f", continued as new {info['generation']} time(s)" if info["generation"] else ""
    if tokens := _tokens_total(t):
        lines.append(f"tokens    {tokens.removeprefix('; tokens ')}")
    lines.append(
        f"steps     {t['steps']} recorded ({t['executed']} executed, {t['replayed']} replayed, "
        f"{t['failed']} failed), {info['executions']} execution(s){gen}"
    )
    for s in info["steps"]:
        if s["step"] is None:  # the engine's own step: part of the wait it belongs to
            continue
        flag = f"  {s['error']}" if s["error"] else ""
        lines.append(
            f"  {s['step']:>5}  {s['kind']:<8} {s['state']:<8}  {step_label(s)}  "
            f"{_ms(s['duration'])}{_progress_note(s)}{_tokens_note(s)}{flag}"
        )
    return "\n".join(lines)


def format_trace(trace: dict[str, Any]) -> str:
    """A trace as a readable timeline: the run, then one line per step and event in time
    order, with offsets from the run's creation."""
    run = trace["run"]
    # a fork's copied steps happened before the fork was created
    t0 = min([run["created_at"], *(s["started_at"] for s in trace["steps"])])
    head = [
        f"run {run['run_id']}  workflow {run['workflow']}  status {run['status']}",
    ]
    forked = run.get("forked_from")
    if forked:
        head.append(f"forked from run {forked['run_id']} at step {forked['step']}")
    if trace["waiting"]:
        head.append(f"waiting on {_waits(trace['waiting'])}")
    if trace["pending_signals"]:
        head.append(f"signals not yet received: {', '.join(trace['pending_signals'])}")
    if trace["children"]:
        head.append(f"children: {', '.join(trace['children'])}")
    rows: list[list[str]] = []
    for item in run_history(trace):
        at = f"+{item['ts'] - t0:.3f}s"
        if item["type"] == "step" and item["step"] is None:
            continue  # the engine's own step: part of the wait it belongs to
        if item["type"] == "step":
            what = step_label(item)
            note = item["error"] or ""
            if item.get("tokens"):
                note = _tokens_note(item).strip() + (f"; {note}" if note else "")
            if item.get("progress"):
                note = _progress_note(item).strip() + (f"; {note}" if note else "")
            if item["attempts"] > 1:
                note = f"{item['attempts']} attempts" + (f"; {note}" if note else "")
            if item.get("map"):
                note = map_note(item["map"]) + (f"; {note}" if note else "")
            rows.append(
                [
                    at,
                    str(item["step"]),
                    item["kind"],
                    item["state"],
                    _ms(item["duration"]),
                    what,
                    note,
                ]
            )
        else:
            data = item["data"]
            note = (
                ", ".join(f"{k}={v}" for k, v in data.items() if k not in _NOISE)
                if isinstance(data, dict)
                else str(data)
            )
            rows.append([at, "", "event", item["kind"], "", "", note])
    t = trace["totals"]
    foot = (
        f"{t['steps']} step(s): {t['executed']} executed, {t['replayed']} replayed, "
        f"{t['failed']} failed; replay saved {t['saved_seconds']:.3f} s" + _tokens_total(t)
    )
    table = _table(["AT", "SEQ", "KIND", "STATE", "TOOK", "STEP", "NOTE"], rows, right=(0, 1, 4))
    return "\n".join([*head, *table, foot])


def format_history(items: list[dict[str, Any]]) -> str:
    """:func:`run_history` items as one line each (absolute local times)."""
    out = []
    for i in items:
        if i["type"] == "step":
            out.append(f"{_when(i['ts'])}  step {i['seq']} {i['kind']} {i['name']} {i['state']}")
        else:
            out.append(f"{_when(i['ts'])}  event {i['kind']} {json.dumps(i['data'])}")
    return "\n".join(out)
