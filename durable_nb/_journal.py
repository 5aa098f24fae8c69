"""The journal's vocabulary, written once: what the records of a store may say.

Everything durable is a record: a *step* of a run's journal (an ``EffectRecord`` whose
``kind`` is a :data:`StepKind`, with a short ``detail`` for traces), a run's record (its
``status`` a :data:`RunStatus`), a trace *event* (:data:`EventKind`) and a signal. This
module names them all — step kinds and the ``detail`` each carries, the bookkeeping records
that are not steps, reserved signal names and identities, scopes, run statuses, event kinds
— and holds the validators of run ids and names (one rule each, one error class each).

The engine writes with it; the stores, the trace, the client, the CLI and the widgets read
with it, so nothing else retypes a kind, a status or a reserved name. It imports nothing of
durable_nb but :mod:`durable_nb.errors`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Final, Literal, TypedDict, Union, get_args

from .errors import ArgumentError, ArgumentTypeError, UnstorableValueError

__all__ = [
    "AUX_KINDS",
    "CANCEL_SIGNAL",
    "CHUNK_PREFIX",
    "CLAIMABLE_STATUSES",
    "CLOSING_EVENTS",
    "EXECUTION_EVENTS",
    "FINAL_STATUSES",
    "HIDDEN_KINDS",
    "PROGRESS_PREFIX",
    "QUEUE_PREFIX",
    "RETRY_PREFIX",
    "RUN_STATUSES",
    "SHARED_SCOPE",
    "SIGNAL_STEP_KINDS",
    "STEP_KINDS",
    "TOP_SCOPE_PREFIX",
    "USAGE_PREFIX",
    "CancelClearedDetail",
    "ChildDetail",
    "DeadlineDetail",
    "DequeueDetail",
    "EndStatus",
    "EventKind",
    "InterruptDetail",
    "KvBaseDetail",
    "KvDeleteDetail",
    "KvOfDetail",
    "KvPruneDetail",
    "KvSetDetail",
    "LiveKind",
    "LogDetail",
    "MapDetail",
    "ProgressDetail",
    "RaceDetail",
    "RecordKind",
    "RetryDetail",
    "RunStatus",
    "SignalDetail",
    "SleepDetail",
    "StartChildDetail",
    "StatusDetail",
    "StepDetail",
    "StepKind",
    "StreamDetail",
    "TimeoutDetail",
    "UsageDetail",
    "check_name",
    "check_queue",
    "check_run_id",
    "check_stream_name",
    "check_user_signal",
    "detail_text",
    "iso_time",
    "json_problem",
    "json_text",
    "kv_scope",
    "queue_signal",
    "read_detail",
    "run_of_scope",
    "run_scope",
    "run_scopes",
    "shown_seqs",
    "signal_id_of",
    "signal_label",
    "storable_text",
    "stream_scope",
    "usage_totals",
]

# ------------------------------------------------------------------------- step kinds
#: What a step of a run's journal is. ``effect``: an ``@effect`` or ``ctx.run`` call (its
#: ``detail`` is the argument preview, plain text; an error it raised that the run saw is
#: recorded too, ``is_error``); ``stream``: a write to a run stream, its close, or a streaming
#: effect's final value; ``deadline``: the deadline of a timed ``wait_signal``/``dequeue``
#: or of a ``ctx.timeout``/``ctx.wait_for``; ``timeout``: such a block ran out of time;
#: ``kv_prune``: ``ctx.kv.prune`` and ``ctx.kv.clear``; ``kv_of``: ``ctx.kv_of``, another
#: run's key read; the others are the ``ctx`` operations of the same name. ``cleared``
#: replaces the record of an effect's error that failed its run: the step still shows as
#: failed, but resuming the run calls that effect again. ``retry``, ``kv_base`` and
#: ``cancel_cleared`` (a resume of a cancelled run consumed its cancel signal) are
#: bookkeeping kept in the journal (see :data:`AUX_KINDS`), as are ``usage`` (the tokens an
#: effect's result reported) and ``progress`` (how far its progress bar got: its final
#: ``dn.progress`` or tqdm count), both written in the same write as the result. ``map`` is
#: a ``ctx.map``/``dn.map`` fan-out, one step however many items (its detail a
#: :class:`MapDetail`, written when it starts and again when it ends); each item's result is
#: a ``map_item`` record of the same ``seq``, keyed like a call of the mapped effect, written
#: as it completes (bookkeeping: the map step shows them).
StepKind = Literal[
    "effect",
    "stream",
    "now",
    "random",
    "uuid",
    "sleep",
    "deadline",
    "signal",
    "dequeue",
    "interrupt",
    "race",
    "child",
    "start_child",
    "status",
    "log",
    "kv_set",
    "kv_delete",
    "kv_prune",
    "kv_of",
    "timeout",
    "retry",
    "kv_base",
    "cleared",
    "cancel_cleared",
    "usage",
    "progress",
    "map",
    "map_item",
]
#: Records of a run's other scopes: a stream's chunk and end marker (``stream/<run>``), a
#: key's current value (``kv/<run>``; a deleted key leaves a ``kv_delete`` tombstone); and of
#: a notebook's scope: a cached ``%%effect`` cell (``cell``), a variable it assigned
#: (``cell-var``), and what a cell read when it last executed, to explain its next miss
#: (``cell-last``, one per cell).
RecordKind = Union[StepKind, Literal["chunk", "stream_end", "kv", "cell", "cell-var", "cell-last"]]
STEP_KINDS: Final[tuple[str, ...]] = get_args(StepKind)
#: bookkeeping records: not calls of the workflow, so they have no place in the recorded
#: order and a trace does not show them as steps
AUX_KINDS: Final[tuple[str, ...]] = (
    "retry",
    "kv_base",
    "cancel_cleared",
    "usage",
    "progress",
    "map_item",
    "chunk",
    "stream_end",
    "kv",
)
#: steps the engine writes for itself: shown by no timeline, numbered in none (a timed
#: wait's deadline is part of the wait, not something the workflow did)
HIDDEN_KINDS: Final[tuple[str, ...]] = ("deadline",)
#: records that consume a signal (their detail names its ``signal_id``)
SIGNAL_STEP_KINDS: Final[tuple[str, ...]] = ("signal", "dequeue", "interrupt", "cancel_cleared")


# What each kind's ``detail`` holds (JSON text of one of these; ``effect`` steps keep their
# argument preview as plain text). Written by the engine, read by the trace.
class SleepDetail(TypedDict, total=False):
    seconds: float  # ctx.sleep; absent for ctx.sleep_until
    until: str  # the deadline, ISO 8601 UTC


class DeadlineDetail(TypedDict, total=False):
    signal: str  # of wait_signal(signal, timeout=...)
    queue: str  # of dequeue(queue, timeout=...)
    timeout: float  # of ctx.timeout(seconds) / ctx.wait_for(aw, seconds): the seconds
    until: str  # of ctx.timeout / ctx.wait_for: the deadline, ISO 8601 UTC


class TimeoutDetail(TypedDict):
    timeout: float  # the block's seconds
    at: str  # when it ran out, ISO 8601 UTC


class SignalDetail(TypedDict):
    name: str
    signal_id: str


class DequeueDetail(TypedDict):
    queue: str
    signal_id: str


class InterruptDetail(TypedDict):
    name: str
    signal_id: str


class RaceDetail(TypedDict):
    winner: int
    of: int


class ChildDetail(TypedDict):
    run_id: str


class StartChildDetail(TypedDict):
    run_id: str
    workflow: str


class StatusDetail(TypedDict):
    value: str  # the custom status as JSON text, cut to 200 characters


class LogDetail(TypedDict):
    level: str
    message: str


class KvSetDetail(TypedDict):
    key: str
    value: str  # JSON text, cut to 200 characters


class KvDeleteDetail(TypedDict):
    key: str


class KvPruneDetail(TypedDict, total=False):
    keys: list[str]  # the keys it removed, in order
    updated_before: str  # ctx.kv.prune: the cut-off, ISO 8601 UTC; absent for ctx.kv.clear


class KvOfDetail(TypedDict):
    run_id: str  # whose state was read
    key: str
    found: bool


class CancelClearedDetail(TypedDict):
    signal_id: str  # the cancel signal a resume consumed


class StreamDetail(TypedDict, total=False):
    stream: str  # a write or a close: the stream's name
    index: int  # a write: the chunk's position
    chunk: str  # a write: a preview of the chunk
    closed: bool  # a close
    chunks: int  # a close, or a streaming effect's result: how many chunks
    args: str  # a streaming effect's result: its argument preview


class RetryDetail(TypedDict, total=False):
    identity: str
    attempt: int  # failed attempts so far
    next_at: str  # when the next attempt is due, ISO 8601 UTC


class KvBaseDetail(TypedDict):
    keys: int


class UsageDetail(TypedDict, total=False):
    """What an LLM call's result reported it used (``usage`` records): counted once, when
    the result is recorded, never again by a replay."""

    prompt_tokens: int  # OpenAI ``prompt_tokens``, Anthropic ``input_tokens``
    completion_tokens: int  # OpenAI ``completion_tokens``, Anthropic ``output_tokens``
    model: str  # the response's ``model``, when it says


class ProgressDetail(TypedDict):
    """How far an executed effect's progress bar got (``progress`` records): its final state,
    shown on its row afterwards (replayed or opened from the store) instead of a spinner."""

    n: int  # items done
    total: int | None  # the bar's total, None when it had none
    desc: str  # its label, "" when none


class MapDetail(TypedDict, total=False):
    """A ``map`` step: the mapped function and how its items stood when it was written."""

    fn: str  # the mapped effect's identity
    items: int  # how many items the map has
    complete: bool  # False while it runs (written at its start), True once every item ended
    executed: int  # items this execution computed
    replayed: int  # items found recorded
    failed: int  # items that failed for good
    executor: str  # the executor's type, as a person reads it ("distributed.Client")


StepDetail = Union[
    MapDetail,
    SleepDetail,
    DeadlineDetail,
    SignalDetail,
    DequeueDetail,
    InterruptDetail,
    RaceDetail,
    TimeoutDetail,
    ChildDetail,
    StartChildDetail,
    StatusDetail,
    LogDetail,
    KvSetDetail,
    KvDeleteDetail,
    KvPruneDetail,
    KvOfDetail,
    CancelClearedDetail,
    StreamDetail,
    RetryDetail,
    KvBaseDetail,
    UsageDetail,
    ProgressDetail,
]


def detail_text(detail: StepDetail) -> str:
    """A step's ``detail`` as stored."""
    return json.dumps(detail)


def read_detail(text: str) -> dict[str, Any]:
    """A stored ``detail`` as a dict: ``{}`` for an ``effect`` step's argument preview, an
    empty detail, or one a newer version wrote in another shape."""
    if not text or text[0] != "{":
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def signal_id_of(kind: str, detail: str) -> str | None:
    """The signal a step consumed (steps of :data:`SIGNAL_STEP_KINDS`), else None."""
    if kind not in SIGNAL_STEP_KINDS:
        return None
    sid = read_detail(detail).get("signal_id")
    return sid if isinstance(sid, str) and sid else None


def shown_seqs(records: Iterable[Any]) -> list[int]:
    """The ``seq`` of each step a person sees, in order: step number ``n`` of a run (in
    ``durable-nb trace``, the widget, ``dn.fork(from_step=n)``) is the ``n``-th of them.
    Bookkeeping (:data:`AUX_KINDS`) and engine steps (:data:`HIDDEN_KINDS`) take a ``seq``
    of their own but no number, so the numbers have no gaps."""
    hidden = (*AUX_KINDS, *HIDDEN_KINDS, "cancel_cleared")
    return sorted({r.seq for r in records if r.seq >= 0 and r.kind not in hidden})


def usage_totals(records: Iterable[Any]) -> dict[str, Any]:
    """The tokens of the ``usage`` records among ``records``: ``{"prompt", "completion",
    "by_model": {model: {"prompt", "completion"}}}`` (a model the response did not name is
    ``"?"``)."""
    out: dict[str, Any] = {"prompt": 0, "completion": 0, "by_model": {}}
    for r in records:
        if r.kind != "usage":
            continue
        d = read_detail(r.detail)
        p, c = int(d.get("prompt_tokens", 0) or 0), int(d.get("completion_tokens", 0) or 0)
        m = out["by_model"].setdefault(str(d.get("model") or "?"), {"prompt": 0, "completion": 0})
        out["prompt"] += p
        out["completion"] += c
        m["prompt"] += p
        m["completion"] += c
    return out


def iso_time(ts: float) -> str:
    """Epoch seconds as the ISO 8601 UTC text of details (``until``, ``next_at``)."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------- identities and scopes
#: an effect call's retry schedule: identity ``RETRY_PREFIX + the effect's identity``
RETRY_PREFIX: Final = "dn.retry:"
#: the tokens an effect call used: identity ``USAGE_PREFIX + the effect's identity``, the
#: rest of the key the call's own
USAGE_PREFIX: Final = "dn.usage:"
#: how far an effect call's progress bar got: identity ``PROGRESS_PREFIX + the effect's
#: identity``, the rest of the key the call's own
PROGRESS_PREFIX: Final = "dn.progress:"
#: a streaming effect's chunks: identity ``CHUNK_PREFIX + the effect's identity``
CHUNK_PREFIX: Final = "dn.chunk:"
#: notebook and script scopes are ``TOP_SCOPE_PREFIX + name``
TOP_SCOPE_PREFIX: Final = "top/"
#: the scope of ``@effect(shared=True)``: every notebook, script and run on the store
SHARED_SCOPE: Final = "shared"


def run_scope(run_id: str) -> str:
    """A run's journal: its steps."""
    return "run/" + run_id


def kv_scope(run_id: str) -> str:
    """A run's key/value state: one record per key, ``identity`` = the key."""
    return "kv/" + run_id


def stream_scope(run_id: str) -> str:
    """A run's streams (``identity`` = the stream, ``occurrence`` = the chunk's position) and
    its streaming effects' chunks."""
    return "stream/" + run_id


def run_scopes(run_id: str) -> tuple[str, str, str]:
    """The effect scopes a run owns: its journal, its key/value state and its streams."""
    return (run_scope(run_id), kv_scope(run_id), stream_scope(run_id))


def run_of_scope(scope: str) -> str | None:
    """The run that owns ``scope`` (one of :func:`run_scopes`), or None for a notebook's,
    a script's or the shared scope."""
    for prefix in ("run/", "kv/", "stream/"):
        if scope.startswith(prefix):
            return scope[len(prefix) :]
    return None


# -------------------------------------------------------------------- reserved signals
#: the signal ``job.cancel()`` sends
CANCEL_SIGNAL: Final = "__cancel__"
#: queue messages are signals named ``QUEUE_PREFIX + queue``: ordered, stored, delivered once
QUEUE_PREFIX: Final = "__queue__:"


def queue_signal(queue: str) -> str:
    """The signal name that carries messages of queue ``queue``."""
    return QUEUE_PREFIX + queue


def signal_label(name: str) -> str:
    """A signal's name as a person reads it: a queue's messages show as ``queue:NAME``."""
    return "queue:" + name[len(QUEUE_PREFIX) :] if name.startswith(QUEUE_PREFIX) else name


def check_user_signal(name: str) -> None:
    """Refuse the reserved signal names for a user's own signals."""
    if name == CANCEL_SIGNAL or name.startswith(QUEUE_PREFIX):
        raise ArgumentError(
            f"signal name {name!r} is reserved (cancellation, queues); use job.cancel(), "
            "ctx.dequeue() or another name"
        )


# ------------------------------------------------------------------ statuses and events
#: ``interrupted``: stopped in the process that started it (Ctrl-C, "interrupt kernel", the
#: loop shut down) and resumable there or with ``dn.resume``; no worker claims it
RunStatus = Literal[
    "queued", "running", "waiting", "completed", "failed", "cancelled", "interrupted"
]
RUN_STATUSES: Final[tuple[str, ...]] = get_args(RunStatus)
#: a run in one of these statuses will not progress again (unless resumed or restarted)
FINAL_STATUSES: Final[tuple[str, ...]] = ("completed", "failed", "cancelled")
#: a worker may claim a run in one of these statuses when no process holds its lease: queued
#: for a worker, or left executing by a holder that died
CLAIMABLE_STATUSES: Final[tuple[str, ...]] = ("queued", "running", "waiting")

#: how a run's execution can end: both a run status and the event that records it
EndStatus = Literal["completed", "failed", "cancelled"]
#: what a run's trace events say happened
EventKind = Literal[
    "started",
    "resumed",
    "completed",
    "failed",
    "cancelled",
    "interrupted",
    "continued_as_new",
    "step_failed",
    "signal_received",
    "forked",
    "session",
]
#: events that open an execution of a run; the last one opens the latest execution
EXECUTION_EVENTS: Final[tuple[str, ...]] = ("started", "resumed")
#: events that close an execution, with its totals: ``replayed``, ``executed``,
#: ``saved_seconds`` and, when replayed steps had reported tokens, ``tokens_saved``
#: (``{prompt, completion}``) and ``tokens_saved_by_model``; ``continued_as_new`` also
#: carries what the generation's journal (dropped then) had spent: ``spent_seconds``,
#: ``tokens`` and ``tokens_by_model``
CLOSING_EVENTS: Final[tuple[str, ...]] = (
    "completed",
    "failed",
    "cancelled",
    "interrupted",
    "continued_as_new",
)
#: what a running run tells its live listeners (``Job.subscribe``): a step's state, the
#: run's status, a trace event, a new custom status, or how far an executing effect got
#: (``progress``: its ``seq``, ``name``, ``done``, ``total`` or None, ``desc``)
LiveKind = Literal["step", "status", "event", "custom_status", "progress"]


# --------------------------------------------------------------------------- validators
def storable_text(text: str) -> bool:
    """Whether every store can keep ``text`` as a name: UTF-8 (a lone surrogate is not) with
    no NUL character (PostgreSQL text cannot hold one). Names are refused alike whichever
    store is behind them, so a workflow that runs on one store runs on the others."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be stored
        return False
    return "\x00" not in text


def check_run_id(run_id: object) -> str:
    """A run id: 1-200 printable characters."""
    if not isinstance(run_id, str):
        raise ArgumentTypeError(f"run_id must be a non-empty str, got {run_id!r}")
    if (
        not run_id
        or len(run_id) > 200
        or any(ord(c) < 32 for c in run_id)
        or not storable_text(run_id)
    ):
        raise ArgumentError(
            f"run_id must be 1-200 printable characters, got {run_id!r}; pick a short name"
        )
    return run_id


def check_name(name: object, what: str = "name") -> str:
    """A signal's or a workflow's name: a non-empty str of at most 200 characters."""
    if not isinstance(name, str) or not name or len(name) > 200 or not storable_text(name):
        raise ArgumentError(
            f"{what} must be a non-empty str of at most 200 characters (no NUL character, no "
            f"lone surrogate), got {name!r}"
        )
    return name


def check_queue(queue: object) -> str:
    """A queue's name: it travels inside a signal name, so it may be a little shorter."""
    limit = 200 - len(QUEUE_PREFIX)
    if not isinstance(queue, str) or not queue or len(queue) > limit or not storable_text(queue):
        raise ArgumentError(
            f"queue must be a non-empty str of at most {limit} characters (no NUL character, "
            f"no lone surrogate), got {queue!r}"
        )
    return queue


def check_stream_name(name: object, what: str = "name") -> str:
    """A stream's name: 1-200 printable characters."""
    if not isinstance(name, str):
        raise ArgumentTypeError(
            f"{what} must be a str naming the stream, got {name!r}; use a short name such as "
            "'tokens'"
        )
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name) or not storable_text(name):
        raise ArgumentError(
            f"{what} must be 1-200 printable characters, got {name!r}; use a short name such "
            "as 'tokens'"
        )
    return name


_JSON_LEAVES = (str, int, float, bool, type(None))


def json_problem(value: object, **dumps: Any) -> tuple[str | None, str]:
    """``(why not, text)``: ``value`` as JSON text, or why JSON cannot give it back as it is.

    ``json.dumps`` alone accepts values that come back changed: a tuple comes back as a list,
    ``{1: 'a'}`` as ``{'1': 'a'}``, an ``IntEnum`` or a ``str`` subclass as a plain int or
    str. Those are refused here, like NaN, cycles and nesting too deep to encode, so a stored
    payload replays exactly or is not stored at all."""
    try:
        text = json.dumps(value, allow_nan=False, **dumps)
    except (TypeError, ValueError, RecursionError) as e:
        return (str(e) if not isinstance(e, RecursionError) else "nested too deeply"), ""
    stack = [value]  # json.dumps succeeded: no cycles, so this walk ends
    while stack:
        v = stack.pop()
        t = type(v)
        if t is dict:
            for k, item in v.items():  # type: ignore[attr-defined]
                if type(k) is not str:
                    return f"key {k!r} is a {type(k).__name__}, and JSON keys are str", ""
                stack.append(item)
        elif t is list:
            stack.extend(v)  # type: ignore[arg-type]
        elif t not in _JSON_LEAVES:
            kind = "a tuple (use a list)" if t is tuple else f"a {t.__name__}"
            return f"{_preview_value(v)} is {kind}, which JSON would give back changed", ""
    return None, text


def _preview_value(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def json_text(value: object, what: str) -> str:
    """``value`` as JSON text (signal payloads, custom statuses), or a clear error."""
    problem, text = json_problem(value)
    if problem is not None:
        raise UnstorableValueError(
            f"{what} must be JSON data (None, bool, int, float, str, list, dict with str "
            f"keys), got {_preview_value(value)}; convert it first ({problem})"
        )
    return text
