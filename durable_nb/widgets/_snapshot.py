"""Live ipywidgets by model id: a cached cell's widget outputs are recorded as the widget's
final state (its text), never as a model id that no kernel will know after a restart."""

from __future__ import annotations

from typing import Any

__all__ = ["find_widget"]


def find_widget(model_id: str) -> Any:
    """The live widget with this model id, or None (ipywidgets not loaded, or closed)."""
    import sys

    module = sys.modules.get("ipywidgets.widgets.widget")
    if module is None:
        return None
    instances = getattr(module, "_instances", None)  # ipywidgets 8
    if not isinstance(instances, dict):
        instances = getattr(getattr(module, "Widget", None), "widgets", None) or {}
    return instances.get(model_id)
