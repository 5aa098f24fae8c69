"""Token usage: what an LLM call's result says it used, read once when the result is recorded.

An effect whose result carries a ``usage`` (an OpenAI or Anthropic response object or its
dict, a streamed response read into ``Chunks`` whose chunks carry it) gets a ``usage``
record written in the same store write as its result (:func:`usage_record`). So a token is
"spent" exactly when an execution was recorded: a replay finds the result and writes
nothing, a call lost to a crash before its record is not counted (its tokens were paid but
nobody can know how many), and a resumed run only adds the calls it executes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._codecs import encode
from .._journal import USAGE_PREFIX, RecordKind, StepDetail, UsageDetail, detail_text
from ..store import EffectRecord
from ._runtime import runtime

__all__ = [
    "kept_usage_records",
    "none_payload",
    "record_beside",
    "usage_of",
    "usage_records",
]

# field names, OpenAI's first; Anthropic reports input/output tokens (and its streamed
# message_delta carries the cumulative output count, so the largest value wins over a sum)
_PROMPT = ("prompt_tokens", "input_tokens")
_COMPLETION = ("completion_tokens", "output_tokens")
_SCAN_CHUNKS = 100_000  # a streamed answer longer than this is not scanned for usage


def _field(obj: object, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises is no usage
        return None


def _tokens(usage: object, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = _field(usage, n)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    return None


def _one(value: object) -> UsageDetail | None:
    """The usage a single response (or chunk) reports, or None."""
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return None
    usage = _field(value, "usage")
    if usage is None:
        # Anthropic's streamed message_start keeps it on its message
        message = _field(value, "message")
        usage = _field(message, "usage") if message is not None else None
        value = message if usage is not None else value
    if usage is None:
        return None
    prompt, completion = _tokens(usage, _PROMPT), _tokens(usage, _COMPLETION)
    if prompt is None and completion is None:
        return None
    out: UsageDetail = {"prompt_tokens": prompt or 0, "completion_tokens": completion or 0}
    model = _field(value, "model")
    if isinstance(model, str) and model:
        out["model"] = model[:200]
    return out


def usage_of(value: object) -> UsageDetail | None:
    """The tokens ``value`` (an effect's result) says were used, or None when it says
    nothing: a response with ``usage``, or a list/``Chunks`` of streamed chunks (each
    field's largest value over the chunks: OpenAI sends usage in the last chunk only,
    Anthropic's counts are cumulative)."""
    found = _one(value)
    if found is not None:
        return found
    items = getattr(value, "items", None) if type(value).__name__ == "Chunks" else value
    if not isinstance(items, (list, tuple)) or not items or len(items) > _SCAN_CHUNKS:
        return None
    total: UsageDetail | None = None
    for chunk in items:
        u = _one(chunk)
        if u is None:
            continue
        if total is None:
            total = u
            continue
        total["prompt_tokens"] = max(total.get("prompt_tokens", 0), u.get("prompt_tokens", 0))
        total["completion_tokens"] = max(
            total.get("completion_tokens", 0), u.get("completion_tokens", 0)
        )
        if "model" in u and "model" not in total:
            total["model"] = u["model"]
    return total


_NONE_PAYLOAD: Any = None


def none_payload() -> Any:
    """The payload of a bookkeeping record that keeps its data in its detail."""
    global _NONE_PAYLOAD
    if _NONE_PAYLOAD is None:
        _NONE_PAYLOAD = encode(None, runtime.store.signer)
    return _NONE_PAYLOAD


def record_beside(
    rec: EffectRecord, identity: str, kind: RecordKind, detail: StepDetail
) -> EffectRecord:
    """A bookkeeping record written with the effect record ``rec`` (its scope, key and step;
    ``identity`` its own): the data is in ``detail``, the payload is None."""
    return EffectRecord(
        rec.scope,
        identity,
        rec.version,
        rec.input_hash,
        rec.occurrence,
        payload=none_payload(),
        kind=kind,
        seq=rec.seq,
        started_at=rec.started_at,
        duration=0.0,
        detail=detail_text(detail),
    )


_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def usage_records(rec: EffectRecord, value: object) -> tuple[EffectRecord, ...]:
    """The ``usage`` record to write with the effect record ``rec`` of result ``value``
    (same scope, key and step; the identity prefixed): one, or none when it reports none."""
    if type(value) in _PLAIN:  # most effects: nothing to look at, on every recorded call
        return ()
    usage = usage_of(value)
    if usage is None:
        return ()
    return (record_beside(rec, USAGE_PREFIX + rec.identity, "usage", usage),)


def kept_usage_records(rec: EffectRecord, values: Iterable[object]) -> tuple[EffectRecord, ...]:
    """The ``usage`` records of a ``%%effect`` cell's record ``rec``: the tokens of the LLM
    responses the cell kept — the values of the variables it assigned and its own value, or
    their items one level deep (a list or a dict of responses) — each response once, one
    record per model (identity ``USAGE_PREFIX + rec.identity + "#" + model``). A client the
    cell called without keeping the response (``text = client....content``) leaves no trace
    to count; ``dn.wrap`` the client to count every call."""
    seen: set[int] = set()
    by_model: dict[str, UsageDetail] = {}

    def look(x: object) -> bool:
        if type(x) in _PLAIN or id(x) in seen:
            return False
        seen.add(id(x))
        u = _one(x)
        if u is None:
            return False
        acc = by_model.setdefault(u.get("model", ""), {"prompt_tokens": 0, "completion_tokens": 0})
        acc["prompt_tokens"] = acc.get("prompt_tokens", 0) + u.get("prompt_tokens", 0)
        acc["completion_tokens"] = acc.get("completion_tokens", 0) + u.get("completion_tokens", 0)
        return True

    for v in values:
        if look(v):
            continue
        items = v.values() if isinstance(v, Mapping) else v if isinstance(v, (list, tuple)) else ()
        for i, item in enumerate(items):
            if i >= _SCAN_CHUNKS:
                break
            look(item)
    return tuple(
        record_beside(
            rec,
            f"{USAGE_PREFIX}{rec.identity}#{model}",
            "usage",
            {**u, "model": model} if model else u,
        )
        for model, u in sorted(by_model.items())
    )
