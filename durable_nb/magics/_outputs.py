"""What a ``%%effect`` cell showed, captured in order and replayed in its final state: stdout,
stderr and rich displays interleaved as they came, a widget (a tqdm bar) as the text of its
final state, the last expression's value.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from IPython.core.interactiveshell import InteractiveShell

__all__ = ["RESULT_NAME", "capture", "split_last_expression"]

RESULT_NAME = "__durable_nb_result__"  # the name a cell's last expression is kept under


def split_last_expression(tree: ast.Module) -> ast.Module:
    """Make the value of a trailing expression land in ``__durable_nb_result__``."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        assign = ast.Assign(targets=[ast.Name(RESULT_NAME, ast.Store())], value=last.value)
        tree.body[-1] = ast.copy_location(assign, last)
        ast.fix_missing_locations(tree)
    return tree


# ---------------------------------------------------------------------------- output capture


class _Tee:
    """A stream that writes through and remembers what was written, in order with the
    other stream and the displays (``events``)."""

    def __init__(self, target: Any, name: str, events: list[list[Any]]) -> None:
        self.target = target
        self.name = name
        self.events = events

    def write(self, text: str) -> int:
        events = self.events
        if events and events[-1][0] == self.name:
            events[-1][1] += text
        else:
            events.append([self.name, text])
        return int(self.target.write(text) or 0)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _final_state(data: dict[str, Any]) -> dict[str, Any]:
    """A display as it should replay: a widget (a tqdm.auto bar) as the text of its final
    state, since its model dies with the kernel; anything else as it was."""
    view = data.get(_WIDGET_VIEW)
    if not isinstance(view, dict):
        return data
    from IPython.lib.pretty import pretty

    from ..widgets._snapshot import find_widget

    widget = find_widget(str(view.get("model_id")))
    text = str(data.get("text/plain", ""))
    if widget is not None:
        try:
            text = pretty(widget)
        except Exception:  # tqdm's repr needs its bar object, which may be gone by now
            text = _widget_text(widget) or text
    return {"text/plain": text}


def _widget_text(widget: Any) -> str:
    """A widget's state as text, from its parts: labels and HTML as their text, a progress
    bar as ``|█████     |`` (a tqdm.auto bar reads ``100%|██████████| 20/20 [...]``)."""
    import html
    import re

    children = getattr(widget, "children", None)
    if isinstance(children, (list, tuple)):
        return "|".join(t for t in (_widget_text(c) for c in children) if t)
    value, top = getattr(widget, "value", None), getattr(widget, "max", None)
    if isinstance(value, (int, float)) and isinstance(top, (int, float)) and top > 0:
        filled = max(0, min(10, round(10 * value / top)))
        return "█" * filled + " " * (10 - filled)
    if isinstance(value, str):
        text = html.unescape(re.sub(r"<[^>]*>", "", value))
        return text.replace("\u2007", " ").replace("\xa0", " ")  # HTML's fixed-width spaces
    return ""


@contextmanager
def capture(ip: InteractiveShell) -> Iterator[dict[str, Any]]:
    """Show the cell's output live and keep a copy: stdout, stderr and rich displays, in the
    order they came (``events``: ``["stdout", text]``, ``["display", data, metadata]``)."""
    events: list[list[Any]] = []
    out, err = _Tee(sys.stdout, "stdout", events), _Tee(sys.stderr, "stderr", events)
    pub = ip.display_pub
    original_publish = pub.publish

    def publish(data: dict[str, Any], metadata: dict[str, Any] | None = None, **kw: Any) -> None:
        if not kw.get("update"):  # an update of a live display (a bar) is in its final state
            events.append(["display", data, metadata or {}])
        original_publish(data, metadata, **kw)

    got: dict[str, Any] = {}
    sys.stdout, sys.stderr = cast(Any, out), cast(Any, err)  # tees, duck-typed streams
    pub.publish = publish  # type: ignore[method-assign,assignment]  # restored below
    try:
        yield got
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:  # figures are shown at the end of a cell: show them now
            inline.flush_figures()
    finally:
        sys.stdout, sys.stderr = out.target, err.target
        pub.publish = original_publish  # type: ignore[method-assign]
        for event in events:
            if event[0] == "display":
                event[1] = _final_state(event[1])
        got["events"] = events


# ---------------------------------------------------------------------------- magics
