"""The trace widget's state without the widget: rows, totals and waits of one run, updated
from the engine's live messages (``Job.subscribe``) or seeded from the store
(:func:`durable_nb.trace.run_trace`), and which rows changed since the last patch.

Pure Python and cheap per message (a dict lookup and an assignment), so a live run pays
little per step; the widget decides when to ship the changes.
"""

from __future__ import annotations

import json
from typing import Any, TypedDict, cast

from .._journal import EXECUTION_EVENTS, FINAL_STATUSES, HIDDEN_KINDS
from ..trace import progress_text, shown_detail, step_label, waiting_of
from ._messages import RunInfo, StepRow, StepState, Totals, Waiting

__all__ = ["FINAL", "TraceModel", "label_of", "waits_of"]

FINAL = FINAL_STATUSES
_STATES: tuple[StepState, ...] = ("running", "executed", "replayed", "failed", "waiting")
_Key = tuple[Any, ...]


def _json(text: object) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def label_of(kind: str, name: str, args: object) -> str:
    """What the timeline shows for a step: the trace's label (``durable_nb.trace.step_label``),
    compact — an effect by its function's name; the arguments show on click."""
    return step_label({"kind": kind, "name": name, "args": args or ""}, compact=True)


def waits_of(status: str, detail: object) -> list[Waiting]:
    """What a waiting run waits on (``durable_nb.trace.waiting_of``), as the widget shows it:
    the signals it waits for and its timer."""
    return [
        {"kind": w["kind"], "name": str(w.get("name", "")), "until": str(w.get("until", ""))}
        for w in waiting_of(status, detail)
        if w["kind"] in ("signal", "timer")
    ]


class _Tokens(TypedDict):
    prompt_tokens: int
    completion_tokens: int


def _map_progress(m: object) -> str:
    """A map step's items on its row (``durable_nb.trace.MapItems``): ``2000/2000 · 1000
    replayed · 0 failed``."""
    if not isinstance(m, dict):
        return ""
    text = f"{m.get('done', 0)}/{m.get('items', 0)} · {m.get('replayed', 0)} replayed"
    text += f" · {m.get('failed', 0)} failed"
    if m.get("in_flight"):
        text += f" · {m['in_flight']} in flight"
    return text


def _tokens_of(tokens: object) -> _Tokens:
    """A trace step's or a live step message's ``tokens`` as a row's fields."""
    if not isinstance(tokens, dict):
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return {
        "prompt_tokens": int(tokens.get("prompt", 0) or 0),
        "completion_tokens": int(tokens.get("completion", 0) or 0),
    }


def _detail_text(status: str, waiting: list[Waiting], error: str) -> str:
    if waiting:
        return "; ".join(
            f"waiting for signal {w['name']!r}"
            if w["kind"] == "signal"
            else f"waiting until {w['until']}"
            for w in waiting
        )
    if status == "failed":
        return f"failed: {error}" if error else "failed"
    if status == "interrupted":
        return "interrupted; resume it to continue where it stopped"
    return ""


class TraceModel:
    """Rows, totals and waits of one run, and the set of rows changed since the last patch."""

    def __init__(self, run_id: str, *, resumable: bool = False) -> None:
        self.rows: list[StepRow] = []
        self.rev = 0
        # the workflow is defined in this kernel, so the run can be resumed or forked here
        self.resumable = resumable
        self._index: dict[_Key, int] = {}
        self._waits: dict[str, int] = {}  # signal name -> row of its open wait
        self._sleeping: dict[int, StepState] = {}  # row of a timer waiting -> its state before
        self._last_sleep: int | None = None
        self._dirty: dict[int, None] = {}  # ordered set
        self._full = True
        self._counts: dict[str, int] = dict.fromkeys(_STATES, 0)
        self._saved = 0.0
        self._tokens = [0, 0, 0]  # prompt, completion spent; prompt+completion replayed
        self._before = [0, 0]  # prompt, completion of the generations before (continue_as_new)
        self.waiting: list[Waiting] = []
        self.run: RunInfo = {
            "run_id": run_id,
            "workflow": "",
            "status": "pending",
            "detail": "",
            "executions": 0,
            "live": False,
            "can_cancel": False,
            "can_resume": False,
            "can_fork": False,
            "forked_from": "",
            "error": "",
            "result": "",
        }

    # rows ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.rows = []
        self._index.clear()
        self._waits.clear()
        self._sleeping.clear()
        self._last_sleep = None
        self._dirty.clear()
        self._counts = dict.fromkeys(_STATES, 0)
        self._saved = 0.0
        self._tokens = [0, 0, 0]
        self._full = True

    def _count(self, row: StepRow, sign: int) -> None:
        self._counts[row["state"]] += sign
        if row["state"] == "replayed":
            self._saved += sign * row["duration"]
        p, c = row["prompt_tokens"], row["completion_tokens"]
        if p or c:
            self._tokens[0] += sign * p
            self._tokens[1] += sign * c
            if row["state"] == "replayed":
                self._tokens[2] += sign * (p + c)

    def _put(self, key: _Key, row: StepRow) -> int:
        i = self._index.get(key)
        if i is None:
            i = len(self.rows)
            self._index[key] = i
            self.rows.append(row)
        else:
            self._count(self.rows[i], -1)
            self.rows[i] = row
        self._count(row, +1)
        self._dirty[i] = None
        return i

    def _set_state(self, i: int, state: StepState, error: str | None = None) -> None:
        row = self.rows[i]
        self._count(row, -1)
        row = {**row, "state": state}
        if error is not None:
            row["error"] = error
        self.rows[i] = row
        self._count(row, +1)
        self._dirty[i] = None

    def _open_wait(self, name: str) -> None:
        if name in self._waits:
            return
        row: StepRow = {
            "seq": -1,
            "kind": "signal",
            "name": "dn.signal",
            "label": label_of("signal", "dn.signal", json.dumps({"name": name})),
            "state": "waiting",
            "duration": 0.0,
            "args": json.dumps({"name": name}),
            "error": "",
            "started": 0.0,
            "progress": "",
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        self._waits[name] = self._put(("wait", name), row)

    def _close_waits(self, error: str) -> None:
        for i in self._waits.values():
            self._set_state(i, "failed", error)
        self._waits.clear()

    def _end_timers(self) -> None:
        for i, before in self._sleeping.items():
            self._set_state(i, before)
        self._sleeping.clear()

    # seeding from the store ---------------------------------------------------------------
    def load_trace(self, trace: dict[str, Any]) -> None:
        """Replace everything with a static trace (:func:`durable_nb.trace.run_trace`)."""
        self._reset()
        for s in trace.get("steps", []):
            state = s.get("state")
            if s.get("kind") in HIDDEN_KINDS:
                continue
            row: StepRow = {
                "seq": int(s.get("seq", -1)),
                "kind": str(s.get("kind", "effect")),
                "name": str(s.get("name", "")),
                "label": label_of(str(s.get("kind", "")), str(s.get("name", "")), s.get("args")),
                "state": cast(StepState, state if state in _STATES else "executed"),
                "duration": float(s.get("duration") or 0.0),
                "args": shown_detail(str(s.get("kind", "")), str(s.get("args") or "")),
                "error": str(s.get("error") or ""),
                "started": 0.0,
                "progress": (
                    _map_progress(s.get("map"))
                    if s.get("map")
                    else progress_text(s.get("progress"))  # recorded: its final state
                ),
                **_tokens_of(s.get("tokens")),
            }
            i = self._put((row["seq"], row["name"]), row)
            if row["kind"] == "sleep":
                self._last_sleep = i
        run = trace.get("run", {})
        status = str(run.get("status", "unknown"))
        detail = run.get("detail")
        error = str(detail.get("error", "")) if isinstance(detail, dict) else ""
        self.run["workflow"] = str(run.get("workflow", ""))
        self.run["executions"] = int(run.get("executions", 0))
        forked = run.get("forked_from")
        if isinstance(forked, dict):
            self.run["forked_from"] = f"{forked.get('run_id')} at step {forked.get('step')}"
        self.run["error"] = error if status == "failed" else ""
        before = trace.get("totals", {}).get("tokens_before") or {}
        self._before = [int(before.get("prompt", 0)), int(before.get("completion", 0))]
        self._set_status(status, detail, live=False)
        # waits known from the record (a run waiting while no process executes it)
        self.waiting = waits_of(status, detail)
        self._show_waits()
        self._refresh_run()

    # live messages ------------------------------------------------------------------------
    def apply(self, msg: dict[str, Any]) -> None:
        """Take one message of ``Job.subscribe`` (kind step, status or event)."""
        kind = msg.get("kind")
        if kind == "step":
            self._step(msg)
        elif kind == "progress":
            self._progress(msg)
        elif kind == "result":  # the widget's own message: the run's value, when it completed
            self.set_result(str(msg.get("text", "")))
        elif kind == "status":
            self._set_status(str(msg.get("status")), msg.get("detail") or {}, live=True)
            self._show_waits()
            self._refresh_run()
        elif kind == "event":
            self._event(str(msg.get("event")), msg.get("data") or {})

    def _progress(self, m: dict[str, Any]) -> None:
        """How far an executing effect got: shown on its row while it runs, and after."""
        i = self._index.get((int(m.get("seq", -1)), str(m.get("name", ""))))
        if i is None:
            return
        text = progress_text(
            {"n": m.get("done", 0), "total": m.get("total"), "desc": m.get("desc")}
        )
        row = self.rows[i]
        self.rows[i] = {**row, "progress": text}
        self._dirty[i] = None

    def _step(self, m: dict[str, Any]) -> None:
        kind = str(m.get("step") or "effect")
        if kind in HIDDEN_KINDS:
            return
        name = str(m.get("name", ""))
        seq = int(m.get("seq", -1))
        args = m.get("args") or ""
        err = m.get("error")
        state = str(m.get("state", "executed"))
        error = err if isinstance(err, str) else ("error" if err is True else "")
        if error and state == "executed":
            state = "failed"
        row: StepRow = {
            "seq": seq,
            "kind": kind,
            "name": name,
            "label": label_of(kind, name, str(args)),
            "state": state if state in _STATES else "executed",
            "duration": float(m.get("duration") or 0.0),
            "args": shown_detail(kind, str(args)),
            "error": error,
            "started": float(m.get("ts") or 0.0) if state == "running" else 0.0,
            "progress": progress_text(m.get("progress")),  # a recorded step's final state
            **_tokens_of(m.get("tokens")),
        }
        key: _Key = (seq, name)
        if kind == "signal" and key not in self._index:
            signal_name = (_json(args) or {}).get("name") if isinstance(_json(args), dict) else None
            i = self._waits.pop(str(signal_name), None)
            if i is not None:  # the open wait becomes the received signal
                del self._index[("wait", str(signal_name))]
                self._index[key] = i
        old = self._index.get(key)
        if old is not None and self.rows[old]["progress"] and not row["progress"]:
            row["progress"] = self.rows[old]["progress"]  # its final progress stays shown
        i = self._put(key, row)
        if kind == "sleep":
            self._last_sleep = i

    def _event(self, event: str, data: dict[str, Any]) -> None:
        if event in EXECUTION_EVENTS:
            self._reset()  # a new execution: its own timeline
            self.run["live"] = True
            self.run["executions"] = int(data.get("execution", 0))
            self.run["error"] = ""
            self.run["status"] = "running"
            self.waiting = []
            self._refresh_run()
        elif event == "continued_as_new":  # its journal goes, what it spent stays counted
            spent = data.get("tokens")
            spent = spent if isinstance(spent, dict) else {}
            self._before[0] += int(spent.get("prompt", 0) or 0)
            self._before[1] += int(spent.get("completion", 0) or 0)
        elif event == "interrupted":
            self._end_timers()
            self._close_waits("interrupted")
            for i, row in enumerate(self.rows):
                if row["state"] == "running":
                    self._set_state(i, "failed", "interrupted")
            self.run["status"] = "interrupted"
            self.run["live"] = False
            self.waiting = []
            self._refresh_run()

    def _set_status(self, status: str, detail: Any, *, live: bool) -> None:
        before = self.run["status"]
        self.run["status"] = status
        self.waiting = waits_of(status, detail)
        if status == "failed" and isinstance(detail, dict) and detail.get("error"):
            self.run["error"] = str(detail["error"])
        if live and status != "waiting" and before == "waiting":
            self._end_timers()
            # a wait that ended without its step: it timed out, or the run was cancelled
            self._close_waits("the wait ended without the signal")
        if status in FINAL:
            self._end_timers()
            self._close_waits(f"the run {status} while waiting")
            if status != "completed":
                for i, row in enumerate(self.rows):
                    if row["state"] == "running":
                        self._set_state(i, "failed", row["error"] or status)
            self.run["live"] = False
        elif live:
            self.run["live"] = True

    def _show_waits(self) -> None:
        for w in self.waiting:
            if w["kind"] == "signal":
                self._open_wait(w["name"])
            elif self._last_sleep is not None and self._last_sleep not in self._sleeping:
                i = self._last_sleep
                self._sleeping[i] = self.rows[i]["state"]
                self._set_state(i, "waiting")

    def _refresh_run(self) -> None:
        r = self.run
        status = r["status"]
        r["detail"] = _detail_text(status, self.waiting, r["error"])
        r["can_cancel"] = status not in (*FINAL, "pending", "unknown", "interrupted")
        r["can_resume"] = (
            self.resumable
            and not r["live"]
            and status in ("failed", "interrupted", "cancelled", "running", "waiting")
        )
        r["can_fork"] = self.resumable and status not in ("pending", "unknown")

    def set_resumable(self, resumable: bool) -> None:
        self.resumable = resumable
        self._refresh_run()

    # what to ship -------------------------------------------------------------------------
    def totals(self) -> Totals:
        c = self._counts
        return {
            "steps": len(self.rows),
            "executed": c["executed"],
            "replayed": c["replayed"],
            "failed": c["failed"],
            "running": c["running"] + c["waiting"],
            "saved_seconds": round(self._saved, 6),
            "prompt_tokens": self._tokens[0] + self._before[0],  # the whole chain's
            "completion_tokens": self._tokens[1] + self._before[1],
            "tokens_saved": self._tokens[2],
        }

    def set_result(self, text: str) -> None:
        """A completed run's value, as the widget shows it under the header."""
        self.run["result"] = text

    def take_patch(self) -> tuple[bool, list[tuple[int, StepRow]]]:
        """``(full, updates)`` since the last call; ``rev`` moves on when anything changed.
        ``full`` means the rows were replaced: resend them whole."""
        full, self._full = self._full, False
        if full:
            self._dirty.clear()
            self.rev += 1
            return True, []
        if not self._dirty:
            return False, []
        rows = self.rows
        updates = [(i, rows[i]) for i in self._dirty]
        self._dirty.clear()
        self.rev += 1
        return False, updates

    def force_full(self) -> None:
        self._full = True
