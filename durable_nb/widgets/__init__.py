"""Widgets: a run's live trace timeline and signal panel (guide, "Widgets").

The only package that imports anywidget and ipywidgets (ruff's banned-api rule holds the
line); importing ``durable_nb`` never loads it. The front-end is an ES module built from
``extension/widget`` into ``durable_nb/static/`` and shipped in the wheel; the wire format
between the two is ``_messages.py``.
"""

from __future__ import annotations

from ._widget import BUNDLE, TraceWidget

__all__ = ["BUNDLE", "TraceWidget"]
