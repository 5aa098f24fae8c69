"""A step's inputs, output and error, read from the store when someone clicks the step.

Loaded lazily (one click, one lookup) rather than for every step: outputs can be large
DataFrames, and most steps are never opened.
"""

from __future__ import annotations

import pprint
from typing import Any

from .. import _codecs, _explain
from .._journal import run_scope
from ..store import EffectRecord, Store
from ._messages import DetailMessage

__all__ = ["step_detail"]

TABLE_ROWS = 20
TEXT_LIMIT = 4000


def _find(records: list[EffectRecord], seq: int, name: str) -> EffectRecord | None:
    found = [r for r in records if r.seq == seq and r.identity == name]
    if not found:
        found = [r for r in records if r.seq == seq]
    return max(found, key=lambda r: r.started_at) if found else None


def _render(value: Any) -> tuple[str, str]:
    """``(html, text)``: a table's first rows as HTML, anything else as text."""
    head = getattr(value, "head", None)
    if callable(head) and hasattr(value, "columns") and hasattr(value, "shape"):
        shape = getattr(value, "shape", None)
        try:
            part = head(TABLE_ROWS)
            to_html = getattr(part, "to_html", None)  # pandas
            html = to_html(max_cols=30) if callable(to_html) else str(part._repr_html_())
        except Exception:  # a frame that cannot render: fall back to text
            pass
        else:
            return f"<div>{shape!r} · first {TABLE_ROWS} rows</div>{html}", ""
    if hasattr(value, "num_rows") and hasattr(value, "slice"):  # an Arrow table
        try:
            return _render(value.slice(0, TABLE_ROWS).to_pandas())
        except Exception:
            pass
    try:
        text = pprint.pformat(value, width=100, compact=True)
    except Exception as e:  # a broken __repr__
        text = f"<{type(value).__name__}: repr failed with {type(e).__name__}>"
    if len(text) > TEXT_LIMIT:
        text = text[:TEXT_LIMIT] + f"\n… ({len(text) - TEXT_LIMIT} more characters)"
    return "", text


def _error_text(rec: EffectRecord, store: Store) -> str:
    try:
        exc = _codecs.decode_error(rec.payload, store.signer)
    except Exception as e:
        return f"the error record cannot be read ({type(e).__name__}: {e})"
    tb = getattr(exc, _codecs.TRACEBACK_ATTR, "")
    return f"{exc!r}\n\n{tb}" if tb else repr(exc)


def _run_error(store: Store, run_id: str) -> str:
    rec = store.get_run(run_id)
    if rec is None or rec.error is None:
        return ""
    try:
        exc = _codecs.decode_error(rec.error, store.signer)
    except Exception:
        return ""
    return str(getattr(exc, _codecs.TRACEBACK_ATTR, "") or repr(exc))


def step_detail(
    store: Store, run_id: str, seq: int, name: str, label: str, error: str, state: str = ""
) -> DetailMessage:
    """What the detail panel shows for step ``seq`` (identity ``name``) of run ``run_id``;
    ``state`` is the row's (executed, replayed ...), for why it executed or replayed."""
    msg: DetailMessage = {
        "kind": "detail",
        "seq": seq,
        "name": name,
        "label": label,
        "args": "",
        "output_html": "",
        "output_text": "",
        "error": "",
        "why": "",
    }
    records = store.load_effects(run_scope(run_id)) if seq >= 0 else []
    rec = _find(records, seq, name) if seq >= 0 else None
    if rec is None:
        msg["output_text"] = "" if error else "(nothing recorded for this step yet)"
        if error:  # an uncached failure leaves no record; the run's traceback says the rest
            tb = _run_error(store, run_id)
            msg["error"] = f"{error}\n\n{tb}" if tb else error
        return msg
    msg["args"] = rec.detail
    if state in ("executed", "replayed", "failed"):
        msg["why"] = _explain.step_why(records, rec, replayed=state == "replayed")
    if rec.is_error:
        msg["error"] = _error_text(rec, store)
        return msg
    try:
        value = _codecs.decode(rec.payload, store.signer)
    except Exception as e:
        msg["output_text"] = f"the output cannot be read here ({type(e).__name__}: {e})"
        return msg
    msg["output_html"], msg["output_text"] = _render(value)
    return msg
