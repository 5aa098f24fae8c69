"""The wire format between the trace widget's kernel side and its front-end, written once.

Synced state (the widget's traits) and custom messages in both directions are TypedDicts
here. The front-end's ``extension/widget/src/messages.ts`` is generated from this file
(``npm run messages`` in ``extension/widget``, which calls :func:`typescript`) and a test
fails when the two differ, so a field cannot change on one side only.
"""

from __future__ import annotations

import sys
import types
import typing
from typing import Any, Literal, TypedDict, Union

__all__ = [
    "MESSAGE_TYPES",
    "CancelMessage",
    "DetailMessage",
    "ForkMessage",
    "FrontendMessage",
    "InspectMessage",
    "KernelMessage",
    "NoticeMessage",
    "ResumeMessage",
    "RowsMessage",
    "RunInfo",
    "SignalMessage",
    "StepRow",
    "StepState",
    "SyncMessage",
    "Totals",
    "Waiting",
    "WidgetState",
    "typescript",
]

StepState = Literal["running", "executed", "replayed", "failed", "waiting"]


class StepRow(TypedDict):
    """One row of the timeline."""

    seq: int  # call position within the execution that recorded the step
    kind: str  # effect | sleep | signal | child | now | random | uuid | deadline
    name: str  # the step's identity (module.qualname of an effect, dn.signal, ...)
    label: str  # what the timeline shows: "fetch", "signal approve", "sleep 5 s"
    state: StepState
    duration: float  # seconds (0 while running or waiting)
    args: str  # the recorded argument preview (short JSON text), "" if none
    error: str  # "Type('message')" of a failed step, "" otherwise
    started: float  # epoch seconds a running step started (its elapsed time ticks); 0 else
    progress: str  # how far an effect's bar got (dn.progress, tqdm): "37/100 pages" live, its
    # final count once recorded (also replayed or read from the store); "" if none
    prompt_tokens: int  # what an LLM call's result reported it used (0 when it says nothing)
    completion_tokens: int


class RunInfo(TypedDict):
    run_id: str
    workflow: str
    status: (
        str  # queued | running | waiting | completed | failed | cancelled | interrupted | pending
    )
    detail: str  # one line on what the status means ("waiting for signal 'approve'")
    executions: int
    live: bool  # executing in this kernel now (its steps arrive as they happen)
    can_cancel: bool
    can_resume: bool
    can_fork: bool  # "re-run from here" on a step: its workflow is defined in this kernel
    forked_from: str  # "RUN at step N" for a fork (dn.fork), else ""
    error: str  # the run's error, "" unless it failed
    result: str  # a completed run's value followed in this kernel (short repr), "" otherwise


class Totals(TypedDict):
    steps: int
    executed: int
    replayed: int
    failed: int
    running: int
    saved_seconds: float  # what the replayed steps took when they executed
    prompt_tokens: int  # spent by the recorded LLM calls (each once, replays add nothing)
    completion_tokens: int
    tokens_saved: int  # prompt+completion tokens of the replayed steps


class Waiting(TypedDict):
    kind: Literal["signal", "timer"]
    name: str  # the signal's name; "" for a timer
    until: str  # a timer's deadline (ISO 8601); "" for a signal


class WidgetState(TypedDict):
    """The widget's synced traits. ``steps`` is resent whole only when ``steps_rev`` says the
    front-end's copy is stale; live changes travel as :class:`RowsMessage` patches."""

    run: RunInfo
    steps: list[StepRow]
    steps_rev: int
    totals: Totals
    waiting: list[Waiting]


# kernel -> front-end ------------------------------------------------------------------------


class RowsMessage(TypedDict):
    """Rows that changed or were appended: ``[index, row]`` pairs; ``rev`` is one more than
    the revision the patch applies to (a front-end that sees a gap sends a sync)."""

    kind: Literal["rows"]
    rev: int
    updates: list[tuple[int, StepRow]]


class DetailMessage(TypedDict):
    """What a click on a step asked for: its inputs, output and error."""

    kind: Literal["detail"]
    seq: int
    name: str
    label: str
    args: str
    output_html: str  # a DataFrame's first rows as an HTML table, else ""
    output_text: str  # any other value's repr, else ""
    error: str  # the error with its traceback, else ""
    why: str  # why it executed instead of replaying (or that it replayed), else ""


class NoticeMessage(TypedDict):
    """The outcome of a button (sent, cancelled, resumed) or why it did nothing."""

    kind: Literal["notice"]
    level: Literal["info", "error"]
    text: str


KernelMessage = Union[RowsMessage, DetailMessage, NoticeMessage]

# front-end -> kernel ------------------------------------------------------------------------


class SyncMessage(TypedDict):
    """Sent when a view starts and on a gap: "my rows are at ``rev``"."""

    kind: Literal["sync"]
    rev: int


class SignalMessage(TypedDict):
    kind: Literal["signal"]
    name: str
    payload: str  # JSON text as typed; "" means null


class CancelMessage(TypedDict):
    kind: Literal["cancel"]


class ResumeMessage(TypedDict):
    kind: Literal["resume"]


class InspectMessage(TypedDict):
    kind: Literal["inspect"]
    seq: int
    name: str


class ForkMessage(TypedDict):
    """ "Re-run from here" on step ``seq``: fork the run from that step (``dn.fork``)."""

    kind: Literal["fork"]
    seq: int


FrontendMessage = Union[
    SyncMessage, SignalMessage, CancelMessage, ResumeMessage, InspectMessage, ForkMessage
]

#: every TypedDict of the boundary, in the order the TypeScript mirror declares them
MESSAGE_TYPES: tuple[type, ...] = (
    StepRow,
    RunInfo,
    Totals,
    Waiting,
    WidgetState,
    RowsMessage,
    DetailMessage,
    NoticeMessage,
    SyncMessage,
    SignalMessage,
    CancelMessage,
    ResumeMessage,
    InspectMessage,
    ForkMessage,
)
_ALIASES: dict[str, Any] = {
    "StepState": StepState,
    "KernelMessage": KernelMessage,
    "FrontendMessage": FrontendMessage,
}


def _ts(tp: Any) -> str:
    """A Python annotation as a TypeScript type."""
    for alias, value in _ALIASES.items():
        if tp == value and alias != "KernelMessage" and alias != "FrontendMessage":
            return alias
    if tp in MESSAGE_TYPES:
        return str(tp.__name__)
    simple = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
    if tp in simple:
        return simple[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_ts(a) for a in args)
    if origin is list:
        inner = _ts(args[0])
        return f"({inner})[]" if " | " in inner else f"{inner}[]"
    if origin is tuple:
        return "[" + ", ".join(_ts(a) for a in args) + "]"
    raise TypeError(f"no TypeScript mirror for {tp!r}; extend _ts()")


def typescript() -> str:
    """The TypeScript mirror of this module (``extension/widget/src/messages.ts``)."""
    mod = sys.modules[__name__]
    out = [
        "// Generated from durable_nb/widgets/_messages.py (typescript()) by `npm run messages`.",
        "// Do not edit: change the Python file and regenerate (a test compares the two).",
        "",
        f"export type StepState = {_ts_union(StepState)};",
    ]
    for td in MESSAGE_TYPES:
        hints = typing.get_type_hints(td, vars(mod))
        out.append("")
        out.append(f"export type {td.__name__} = {{")
        out += [f"  {name}: {_ts(tp)};" for name, tp in hints.items()]
        out.append("};")
    out.append("")
    out.append(f"export type KernelMessage = {_ts_union(KernelMessage)};")
    out.append(f"export type FrontendMessage = {_ts_union(FrontendMessage)};")
    return "\n".join(out) + "\n"


def _ts_union(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return " | ".join(f'"{a}"' for a in args)
    return " | ".join(_ts(a) for a in args)
